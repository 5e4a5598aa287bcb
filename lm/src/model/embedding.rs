//! The input embedding matrix, read a few rows at a time.
//!
//! Dream steps need `E[i]` for a few hundred kept tokens per step; a 262k-row vocabulary must
//! never be dequantized whole per step (Gemma's would be 671 MB of f32). Rows come out in the
//! model's *input space*: already multiplied by the architecture's embedding scale, so that
//! `forward(embed(ids)) == forward(ids)` and mixes of rows are valid inputs as they are.

use crate::error::Result;
use candle_core::quantized::QTensor;
use candle_core::{DType, Device, Tensor};
use std::sync::Arc;

#[derive(Debug, Clone)]
pub(crate) enum Table {
    Quantized(Arc<QTensor>),
    /// `[vocab, hidden]` in the activation dtype.
    Dense(Tensor),
}

#[derive(Debug, Clone)]
pub struct Embedding {
    table: Table,
    vocab: usize,
    hidden: usize,
    scale: Option<f32>,
    dtype: DType,
    device: Device,
    mean_row_rms: f32,
    /// `‖E[i]‖` in input space, for cosine similarity.
    row_norms: Tensor,
}

impl Embedding {
    pub(crate) fn new(
        table: Table,
        scale: Option<f32>,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let (vocab, hidden) = match &table {
            Table::Quantized(q) => q.shape().dims2()?,
            Table::Dense(t) => t.dims2()?,
        };
        let mut e = Self {
            table,
            vocab,
            hidden,
            scale,
            dtype,
            device: device.clone(),
            mean_row_rms: 0.0,
            row_norms: Tensor::zeros(0, DType::F32, device)?,
        };
        let norms = e.compute_row_norms()?;
        let rms_sum: f64 = norms
            .iter()
            .map(|&n| n as f64 / (hidden as f64).sqrt())
            .sum();
        e.mean_row_rms = (rms_sum / vocab as f64) as f32;
        e.row_norms = Tensor::from_vec(norms, vocab, device)?;
        Ok(e)
    }

    pub fn vocab(&self) -> usize {
        self.vocab
    }

    pub fn hidden(&self) -> usize {
        self.hidden
    }

    /// Mean over rows of `rms(E[i])`, in input space. The scale `hidden` latents are brought to.
    pub fn mean_row_rms(&self) -> f32 {
        self.mean_row_rms
    }

    /// `[ids.len(), hidden]` rows, in input space. Ids must be `< vocab` (checked).
    pub fn rows(&self, ids: &[u32]) -> Result<Tensor> {
        if let Some(&bad) = ids.iter().find(|&&i| i as usize >= self.vocab) {
            return Err(crate::LmError::InvalidInput(format!(
                "token id {bad} is outside the vocabulary (size {})",
                self.vocab
            )));
        }
        let idx = Tensor::new(ids, &self.device)?;
        let rows = match &self.table {
            Table::Quantized(q) => q.embedding(&idx)?.to_dtype(self.dtype)?,
            Table::Dense(t) => t.index_select(&idx, 0)?,
        };
        Ok(match self.scale {
            Some(s) => (rows * s as f64)?,
            None => rows,
        })
    }

    /// `Σ wᵢ·E[idᵢ]` as `[1, hidden]`: a concept vector, from the kept rows only.
    pub fn mix(&self, ids: &[u32], weights: &[f32]) -> Result<Tensor> {
        let rows = self.rows(ids)?;
        // Converted on the host: on a GPU that is one upload, not an upload and a cast.
        let w = Tensor::from_slice(weights, (1, weights.len()), &Device::Cpu)?
            .to_dtype(self.dtype)?
            .to_device(&self.device)?;
        Ok(w.matmul(&rows)?)
    }

    /// `‖E[i]‖` for every row, in chunks: the table is never dequantized whole.
    fn compute_row_norms(&self) -> Result<Vec<f32>> {
        const CHUNK: usize = 8192;
        let mut norms = Vec::with_capacity(self.vocab);
        for start in (0..self.vocab).step_by(CHUNK) {
            let ids: Vec<u32> = (start as u32..(start + CHUNK).min(self.vocab) as u32).collect();
            let rows = self.rows(&ids)?.to_dtype(DType::F32)?;
            norms.extend(rows.sqr()?.sum(1)?.sqrt()?.to_vec1::<f32>()?);
        }
        Ok(norms)
    }

    /// The token whose row is nearest to `e` (`[hidden]` or `[1, hidden]`) by cosine, and that
    /// cosine. Costs a vocabulary-sized product: call it only when asked for.
    pub fn nearest(&self, e: &Tensor) -> Result<(u32, f32)> {
        let e = e.flatten_all()?.to_dtype(DType::F32)?;
        let e_norm = e.sqr()?.sum_all()?.sqrt()?.to_scalar::<f32>()?;
        let dots = match &self.table {
            // Raw rows: `E_in = s·E`, so `E_in·e = s·(E·e)`.
            Table::Quantized(q) => {
                let raw = candle_core::Module::forward(&self.similarity(q)?, &e.unsqueeze(0)?)?
                    .squeeze(0)?;
                (raw * self.scale.unwrap_or(1.0) as f64)?
            }
            Table::Dense(t) => t
                .to_dtype(DType::F32)?
                .matmul(&e.unsqueeze(1)?)?
                .squeeze(1)?,
        };
        let cos = (dots / (&self.row_norms * e_norm as f64)?.clamp(1e-12f32, f32::MAX)?)?;
        let cos: Vec<f32> = cos.to_vec1()?;
        let id = crate::sampling::argmax(&cos);
        Ok((id, cos[id as usize]))
    }

    fn similarity(&self, q: &Arc<QTensor>) -> Result<candle_core::quantized::QMatMul> {
        // Shares the table's memory; no copy.
        Ok(candle_core::quantized::QMatMul::from_arc(q.clone())?)
    }
}
