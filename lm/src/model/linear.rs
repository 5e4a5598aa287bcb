//! Linear layers over quantized (GGUF) or dense (safetensors) weights.

use crate::error::Result;
use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{DType, Module, Tensor};
use std::sync::Arc;

#[derive(Debug, Clone)]
pub(crate) enum Weight {
    Quantized(QMatMul),
    /// `[out, in]`, already in the activation dtype.
    Dense(Tensor),
}

#[derive(Debug, Clone)]
pub(crate) struct Linear {
    weight: Weight,
    bias: Option<Tensor>,
}

/// GGML types whose CPU dot product candle runs with a scalar loop (CANDLE-NOTES.md): 3–5×
/// slower than Q8_0. They are re-quantized to Q8_0 at load (+~60% weight memory for Q4_1).
/// Q4_1 → Q4_0 would be smaller but measurably damages the output.
fn slow_on_cpu(dtype: GgmlDType) -> bool {
    matches!(
        dtype,
        GgmlDType::Q4_1 | GgmlDType::Q5_0 | GgmlDType::Q5_1 | GgmlDType::Q8_1
    )
}

impl Linear {
    pub(crate) fn quantized(q: Arc<QTensor>, bias: Option<Tensor>) -> Result<Self> {
        let q = if q.device().is_cpu() && slow_on_cpu(q.dtype()) {
            let dense = q.dequantize(&q.device())?;
            Arc::new(QTensor::quantize(&dense, GgmlDType::Q8_0)?)
        } else {
            q
        };
        Ok(Self {
            weight: Weight::Quantized(QMatMul::from_arc(q)?),
            bias,
        })
    }

    pub(crate) fn dense(w: Tensor, bias: Option<Tensor>) -> Self {
        Self {
            weight: Weight::Dense(w),
            bias,
        }
    }

    /// `x: [n, in] -> [n, out]`
    pub(crate) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = match &self.weight {
            Weight::Quantized(m) => m.forward(x)?,
            Weight::Dense(w) => x.matmul(&w.t()?)?,
        };
        Ok(match &self.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        })
    }

    /// Bytes of weight read per forward row: for bandwidth figures.
    pub(crate) fn weight_bytes(&self) -> usize {
        match &self.weight {
            Weight::Quantized(QMatMul::QTensor(q)) => q.storage_size_in_bytes(),
            Weight::Quantized(QMatMul::Tensor(t) | QMatMul::TensorF16(t)) | Weight::Dense(t) => {
                t.elem_count() * t.dtype().size_in_bytes()
            }
        }
    }
}

/// Converts a dense weight to the activation dtype (f32 on CPU, where gemm is fastest).
pub(crate) fn to_activation_dtype(t: Tensor, dtype: DType) -> Result<Tensor> {
    Ok(if t.dtype() == dtype {
        t
    } else {
        t.to_dtype(dtype)?
    })
}
