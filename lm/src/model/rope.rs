//! Rotary position tables, one per distinct rope base (Gemma 3 has two), sized to the usable
//! context rather than the trained one (131k-position tables cost gigabytes).

use super::config::{ModelConfig, RopeStyle};
use crate::error::Result;
use candle_core::{DType, Device, Tensor};

#[derive(Debug)]
pub(crate) struct RopeTables {
    style: RopeStyle,
    /// (theta, cos `[max, d/2]`, sin `[max, d/2]`)
    tables: Vec<(f32, Tensor, Tensor)>,
}

impl RopeTables {
    pub(crate) fn new(c: &ModelConfig, max: usize, dtype: DType, device: &Device) -> Result<Self> {
        let mut thetas: Vec<f32> = (0..c.layers).map(|l| c.rope_theta_of(l)).collect();
        thetas.sort_by(f32::total_cmp);
        thetas.dedup();
        let half = c.head_dim / 2;
        let tables = thetas
            .into_iter()
            .map(|theta| {
                let inv: Vec<f32> = (0..half)
                    .map(|i| 1.0 / theta.powf(2.0 * i as f32 / c.head_dim as f32))
                    .collect();
                let inv = Tensor::from_vec(inv, (1, half), device)?;
                let t = Tensor::arange(0u32, max as u32, device)?
                    .to_dtype(DType::F32)?
                    .reshape((max, 1))?;
                let freqs = t.broadcast_mul(&inv)?;
                Ok((
                    theta,
                    freqs.cos()?.to_dtype(dtype)?,
                    freqs.sin()?.to_dtype(dtype)?,
                ))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            style: c.rope_style,
            tables,
        })
    }

    /// Rotates `x: [heads, n, d]` for positions `pos..pos+n`.
    pub(crate) fn apply(&self, x: &Tensor, pos: usize, theta: f32) -> Result<Tensor> {
        let (_, cos, sin) = self
            .tables
            .iter()
            .find(|(t, _, _)| *t == theta)
            .expect("a table per layer theta");
        let n = x.dim(1)?;
        let cos = cos.narrow(0, pos, n)?;
        let sin = sin.narrow(0, pos, n)?;
        let x = x.unsqueeze(0)?;
        let y = match self.style {
            RopeStyle::Interleaved => candle_nn::rotary_emb::rope_i(&x, &cos, &sin)?,
            RopeStyle::Halves => candle_nn::rotary_emb::rope(&x, &cos, &sin)?,
        };
        Ok(y.squeeze(0)?)
    }
}
