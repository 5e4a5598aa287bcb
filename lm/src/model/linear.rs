//! Linear layers over quantized (GGUF) or dense (safetensors) weights.

use crate::error::{LmError, Result};
use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{DType, Module, Tensor};
use mm_kernels::{matmul_multi, KernelPool, QType, QWeight, QuantizedActivation};
use std::sync::Arc;

#[derive(Debug, Clone)]
pub(crate) enum Weight {
    /// Our AVX2 kernels (CPU): Q4_0, Q4_1, Q5_0, Q8_0, Q4_K, Q6_K in their GGUF bytes,
    /// exactly as ggml computes them (activations quantized to Q8_0/Q8_1/Q8_K per row).
    Kernel(QWeight),
    /// candle's quantized matmul (other k-quants, and every type off the CPU).
    Quantized(QMatMul),
    /// `[out, in]`, already in the activation dtype.
    Dense(Tensor),
}

#[derive(Debug, Clone)]
pub(crate) struct Linear {
    weight: Weight,
    bias: Option<Tensor>,
}

/// Types our kernels run; candle runs Q4_1 and Q5_0 with a scalar loop (CANDLE-NOTES.md).
/// Q4_K and Q6_K (Gemma) run here too: one thread pool instead of two, 1.65× candle's decode
/// on the AVX2 box, and a row's product is the same at every batch size (candle's is not),
/// which batched steps need.
fn kernel_type(dtype: GgmlDType) -> Option<QType> {
    match dtype {
        GgmlDType::Q4_0 => Some(QType::Q4_0),
        GgmlDType::Q4_1 => Some(QType::Q4_1),
        GgmlDType::Q5_0 => Some(QType::Q5_0),
        GgmlDType::Q8_0 => Some(QType::Q8_0),
        GgmlDType::Q4K => Some(QType::Q4K),
        GgmlDType::Q6K => Some(QType::Q6K),
        _ => None,
    }
}

/// The remaining types candle runs with a scalar loop: re-quantized to Q8_0 at load.
fn slow_on_cpu(dtype: GgmlDType) -> bool {
    matches!(dtype, GgmlDType::Q5_1 | GgmlDType::Q8_1)
}

impl Linear {
    pub(crate) fn quantized(q: Arc<QTensor>, bias: Option<Tensor>) -> Result<Self> {
        if let (true, Some(kind)) = (q.device().is_cpu(), kernel_type(q.dtype())) {
            let (rows, cols) = q.shape().dims2()?;
            let w = QWeight::new(kind, rows, cols, q.data()?.into_owned())
                .map_err(|e| LmError::Layout(format!("weight layout: {e}")))?;
            return Ok(Self {
                weight: Weight::Kernel(w),
                bias,
            });
        }
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

    /// The weight `[out, in]` and bias of a dense layer; `None` for quantized ones.
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    pub(crate) fn dense_parts(&self) -> Option<(&Tensor, Option<&Tensor>)> {
        match &self.weight {
            Weight::Dense(w) => Some((w, self.bias.as_ref())),
            _ => None,
        }
    }

    /// Checks the weight is `[out, input]` and any bias `[out]`, so a file whose metadata
    /// contradicts its tensors fails at load, not mid-request.
    pub(crate) fn expect_shape(&self, what: &str, out: usize, input: usize) -> Result<()> {
        let dims = match &self.weight {
            Weight::Kernel(w) => (w.rows(), w.cols()),
            Weight::Quantized(QMatMul::QTensor(q)) => q.shape().dims2()?,
            Weight::Quantized(QMatMul::Tensor(t) | QMatMul::TensorF16(t)) | Weight::Dense(t) => {
                t.dims2()?
            }
        };
        if dims != (out, input) {
            return Err(LmError::BadModel(format!(
                "{what} is {}x{} but the metadata implies {out}x{input}",
                dims.0, dims.1
            )));
        }
        if let Some(b) = self.bias.as_ref().filter(|b| b.dims() != [out]) {
            return Err(LmError::BadModel(format!(
                "{what}'s bias has shape {:?} but the metadata implies [{out}]",
                b.dims()
            )));
        }
        Ok(())
    }

    /// `x: [n, in] -> [n, out]`
    pub(crate) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = match &self.weight {
            Weight::Kernel(w) => {
                let (n, k) = x.dims2()?;
                let xs: Vec<f32> = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
                let mut out = vec![0f32; n * w.rows()];
                debug_assert_eq!(k, w.cols());
                w.matmul(KernelPool::global(), &xs, n, &mut out);
                Tensor::from_vec(out, (n, w.rows()), x.device())?
            }
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
            Weight::Kernel(w) => w.bytes().len(),
            Weight::Quantized(QMatMul::QTensor(q)) => q.storage_size_in_bytes(),
            Weight::Quantized(QMatMul::Tensor(t) | QMatMul::TensorF16(t)) | Weight::Dense(t) => {
                t.elem_count() * t.dtype().size_in_bytes()
            }
        }
    }
}

/// Applies several linears to the same input (q/k/v, gate/up). When all run on our kernels
/// with one activation format, the input is quantized once and all products share one pool
/// dispatch; otherwise each runs on its own.
pub(crate) fn forward_many(linears: &[&Linear], x: &Tensor) -> Result<Vec<Tensor>> {
    let kernels: Option<Vec<&QWeight>> = linears
        .iter()
        .map(|l| match &l.weight {
            Weight::Kernel(w) => Some(w),
            _ => None,
        })
        .collect();
    let Some(ws) = kernels.filter(|ws| ws.windows(2).all(|p| p[0].act_kind() == p[1].act_kind()))
    else {
        return linears.iter().map(|l| l.forward(x)).collect();
    };
    let (n, k) = x.dims2()?;
    let xs: Vec<f32> = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
    let q = QuantizedActivation::new(ws[0].act_kind(), &xs, n, k);
    let mut outs: Vec<Vec<f32>> = ws.iter().map(|w| vec![0f32; n * w.rows()]).collect();
    {
        let mut slices: Vec<&mut [f32]> = outs.iter_mut().map(|o| o.as_mut_slice()).collect();
        matmul_multi(KernelPool::global(), &ws, &q, &mut slices);
    }
    outs.into_iter()
        .zip(linears)
        .zip(&ws)
        .map(|((o, l), w)| {
            let y = Tensor::from_vec(o, (n, w.rows()), x.device())?;
            Ok(match &l.bias {
                Some(b) => y.broadcast_add(b)?,
                None => y,
            })
        })
        .collect()
}

/// Converts a dense weight to the activation dtype (f32 on CPU, where gemm is fastest).
pub(crate) fn to_activation_dtype(t: Tensor, dtype: DType) -> Result<Tensor> {
    Ok(if t.dtype() == dtype {
        t
    } else {
        t.to_dtype(dtype)?
    })
}
