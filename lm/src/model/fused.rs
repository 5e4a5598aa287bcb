//! The CUDA decode path for dense (bf16/f16) llama and Qwen2 models.
//!
//! candle's ops launch ~25 kernels per layer, each with host-side overhead that dwarfs the
//! work at batch 1 (a 1.5B step must read 3 GB, ~1 ms on an H100). Here a layer is 8
//! launches: one fused q/k/v matmul, rope + bias + KV append in one kernel, our attention
//! kernel, the output matmul, residual-add + RMSNorm in one kernel, one fused gate/up matmul,
//! SiLU·up, the down matmul. Rows carry their own position and cache address in device
//! buffers, so:
//! - a prompt is a set of rows sharing one cache (positions `p..p+n`), and
//! - a batch is a set of rows from different sequences (ragged lengths),
//!
//! and the decode step of each batch size is captured once as a CUDA graph and replayed, which
//! removes the per-launch host cost altogether.

use super::batch::StepQueue;
use super::config::RopeStyle;
use super::{Block, ModelConfig, Norm};
use crate::cuda::{self, addr, empty, launch, opt_ptr, Arg};
use crate::error::{LmError, Result};
use candle_core::backend::BackendDevice;
use candle_core::cuda_backend::cudarc::driver::{sys, CudaGraph};
use candle_core::{CudaDevice, DType, Device, Tensor};
use std::collections::HashMap;
use std::sync::Mutex;

/// Batch sizes whose decode step is captured as a graph at load.
pub const GRAPH_BATCHES: usize = 8;

#[derive(Debug)]
struct Layer {
    attn_norm: Tensor,
    /// `[(heads + 2·kv_heads)·d, hidden]`: q, k and v stacked.
    qkv: Tensor,
    qkv_bias: Option<Tensor>,
    o: Tensor,
    ffn_norm: Tensor,
    /// `[2·ffn, hidden]`: gate then up.
    gate_up: Tensor,
    down: Tensor,
}

/// One captured decode step and the buffers it reads and writes.
struct Captured {
    graph: CudaGraph,
    /// `[b, hidden]`: the inputs; the residual stream is updated in place.
    x: Tensor,
    pos: Tensor,
    kv: Tensor,
    /// `[b, hidden]`: the final hidden states.
    out: Tensor,
}

/// A graph is only launched while its mutex is held; the handles are plain driver objects.
struct Graphs(HashMap<usize, Captured>);
// SAFETY: CudaGraph holds raw driver handles; they are only used under the Mutex in `Fused`,
// and the CUDA driver allows use of a graph from any thread when calls are serialised.
unsafe impl Send for Graphs {}

pub(crate) struct Fused {
    layers: Vec<Layer>,
    final_norm: Tensor,
    eps: f32,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    hidden: usize,
    ffn: usize,
    theta: f32,
    interleaved: bool,
    attn_scale: f32,
    /// Positions per sequence cache (the cache's fixed capacity).
    cap: usize,
    dtype: DType,
    graphs: Mutex<Graphs>,
    /// Single-position steps of concurrent sequences, batched up to [`GRAPH_BATCHES`].
    steps: StepQueue<(Tensor, Row), Tensor>,
}

impl std::fmt::Debug for Fused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Fused({} layers, cap {})", self.layers.len(), self.cap)
    }
}

/// Where one row goes: its sequence's cache and its position there.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Row {
    pub cache: u64,
    pub pos: usize,
}

impl Fused {
    /// Builds the fused path when it applies: a CUDA device, dense weights, and a plain
    /// llama/Qwen2 block (no q/k norms, sandwich norms, sliding windows or GELU).
    pub(crate) fn build(
        c: &ModelConfig,
        blocks: &[Block],
        final_norm: &Norm,
        cap: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<Option<Self>> {
        let Device::Cuda(_) = device else {
            return Ok(None);
        };
        // bf16 only: the kernels read and write bf16 activations.
        let plain = blocks
            .iter()
            .all(|b| b.q_norm.is_none() && b.post_attn_norm.is_none() && b.post_ffn_norm.is_none())
            && c.sliding_window.is_none()
            && c.activation == super::Activation::Silu
            && c.embed_scale.is_none()
            && dtype == DType::BF16
            && (0..c.layers).all(|l| c.rope_theta_of(l) == c.rope_theta)
            && c.head_dim % 2 == 0
            && c.head_dim <= 1024
            && c.heads % c.kv_heads == 0;
        if !plain {
            return Ok(None);
        }
        let mut layers = Vec::with_capacity(blocks.len());
        for b in blocks {
            let (Some((q, qb)), Some((k, kb)), Some((v, vb))) =
                (b.q.dense_parts(), b.k.dense_parts(), b.v.dense_parts())
            else {
                return Ok(None);
            };
            let (Some((o, None)), Some((g, None)), Some((u, None)), Some((d, None))) = (
                b.o.dense_parts(),
                b.gate.dense_parts(),
                b.up.dense_parts(),
                b.down.dense_parts(),
            ) else {
                return Ok(None);
            };
            let qkv_bias = match (qb, kb, vb) {
                (Some(qb), Some(kb), Some(vb)) => {
                    Some(Tensor::cat(&[qb, kb, vb], 0)?.contiguous()?)
                }
                (None, None, None) => None,
                _ => return Ok(None),
            };
            layers.push(Layer {
                attn_norm: b.attn_norm.weight.clone(),
                qkv: Tensor::cat(&[q, k, v], 0)?.contiguous()?,
                qkv_bias,
                o: o.clone(),
                ffn_norm: b.ffn_norm.weight.clone(),
                gate_up: Tensor::cat(&[g, u], 0)?.contiguous()?,
                down: d.clone(),
            });
        }
        let fused = Self {
            layers,
            final_norm: final_norm.weight.clone(),
            eps: final_norm.eps,
            heads: c.heads,
            kv_heads: c.kv_heads,
            head_dim: c.head_dim,
            hidden: c.hidden,
            ffn: c.ffn,
            theta: c.rope_theta,
            interleaved: c.rope_style == RopeStyle::Interleaved,
            attn_scale: c.attn_scale,
            cap: cap.min(cuda::ATTENTION_SCRATCH_FLOATS - c.head_dim),
            dtype,
            graphs: Mutex::new(Graphs(HashMap::new())),
            // No gathering: the batch is held open while the GPU runs it (see `run_jobs`).
            steps: StepQueue::new(GRAPH_BATCHES, std::time::Duration::ZERO),
        };
        fused.capture(GRAPH_BATCHES)?;
        Ok(Some(fused))
    }

    fn lock_graphs(&self) -> Result<std::sync::MutexGuard<'_, Graphs>> {
        self.graphs
            .lock()
            .map_err(|_| LmError::Device("a CUDA graph launch panicked earlier".into()))
    }

    /// Positions one sequence cache holds.
    pub(crate) fn capacity(&self) -> usize {
        self.cap
    }

    /// Elements of one sequence's cache: `[layers][2][kv_heads][cap][head_dim]`.
    pub(crate) fn cache_elems(&self) -> usize {
        self.layers.len() * 2 * self.kv_heads * self.cap * self.head_dim
    }

    /// Runs `x [rows, hidden]` (one row per entry of `rows`) and returns the final hidden states.
    /// Single-position batches of up to [`GRAPH_BATCHES`] rows replay a captured graph.
    pub(crate) fn forward(&self, x: &Tensor, rows: &[Row]) -> Result<Tensor> {
        if rows.is_empty() || x.dim(0)? != rows.len() {
            return Err(LmError::Layout(format!(
                "fused forward: {} input rows for {} positions",
                x.dim(0)?,
                rows.len()
            )));
        }
        // Callers reserve cache room first; this guards the kernels' writes all the same.
        if let Some(bad) = rows.iter().find(|r| r.pos >= self.cap) {
            return Err(LmError::ContextOverflow {
                needed: bad.pos + 1,
                limit: self.cap,
            });
        }
        let x = x.to_dtype(self.dtype)?;
        let (pos, kv) = row_tables(rows);
        let distinct = {
            let mut caches: Vec<u64> = rows.iter().map(|r| r.cache).collect();
            caches.sort_unstable();
            caches.windows(2).all(|w| w[0] != w[1])
        };
        let mut graphs = self.lock_graphs()?;
        if distinct {
            if let Some(g) = graphs.0.get_mut(&rows.len()) {
                g.x.slice_set(&x, 0, 0)?;
                cuda::upload(&g.pos, &pos)?;
                cuda::upload(&g.kv, &kv)?;
                g.graph.launch().map_err(candle_core::Error::wrap)?;
                return Ok(g.out.copy()?);
            }
        }
        drop(graphs);
        let dev = cuda::cuda_device(x.device())?;
        let resid = x.copy()?;
        let pos_t = Tensor::from_slice(&pos, rows.len(), x.device())?;
        let kv_t = Tensor::from_slice(&kv, rows.len(), x.device())?;
        let out = empty((rows.len(), self.hidden), self.dtype, dev)?;
        let max_pos = rows.iter().map(|r| r.pos).max().unwrap_or(0);
        self.layers_forward(&resid, &pos_t, &kv_t, &out, max_pos + 1)?;
        Ok(out)
    }

    /// One position of one sequence, batched with the single-position steps other threads
    /// submit meanwhile (continuous batching at step granularity: latent steps and commit
    /// tokens of concurrent sessions share one forward). Returns this row's hidden state.
    pub(crate) fn step(&self, x: &Tensor, row: Row) -> Result<Tensor> {
        self.steps
            .submit((x.clone(), row), 1, |jobs| self.run_jobs(&jobs))
    }

    /// Runs waiting steps as one batch; every job gets its row, or the batch's error.
    fn run_jobs(&self, jobs: &[(Tensor, Row)]) -> Vec<Result<Tensor>> {
        let run = || -> Result<Tensor> {
            let xs: Vec<&Tensor> = jobs.iter().map(|(x, _)| x).collect();
            let rows: Vec<Row> = jobs.iter().map(|&(_, r)| r).collect();
            let h = self.forward(&Tensor::cat(&xs, 0)?, &rows)?;
            // Hold the batch open until the GPU has run it: a launch returns at once, and
            // without this wait the steps arriving meanwhile would each start a batch of one
            // instead of gathering into the next.
            h.device().synchronize()?;
            Ok(h)
        };
        match run() {
            Ok(h) => (0..jobs.len())
                .map(|i| h.narrow(0, i, 1).map_err(LmError::from))
                .collect(),
            Err(e) => {
                let msg = e.to_string();
                jobs.iter()
                    .map(|_| Err(LmError::Device(format!("a batched step failed: {msg}"))))
                    .collect()
            }
        }
    }

    /// Captures the single-position step for batch sizes `1..=max_batch`, against a scratch
    /// cache. Runs at load, before any other work can reach the device's stream.
    fn capture(&self, max_batch: usize) -> Result<()> {
        let device = self.final_norm.device();
        let dev = cuda::cuda_device(device)?;
        let scratch = Tensor::zeros(self.cache_elems(), self.dtype, device)?;
        let scratch_addr = addr(&scratch)?;
        let mut graphs = self.lock_graphs()?;
        for b in 1..=max_batch {
            let x = Tensor::zeros((b, self.hidden), self.dtype, device)?;
            let pos = Tensor::zeros(b, DType::U32, device)?;
            let kv = Tensor::from_vec(vec![scratch_addr as i64; b], b, device)?;
            let out = Tensor::zeros((b, self.hidden), self.dtype, device)?;
            // Warm-up outside the capture: loads the kernels, lets cuBLAS pick its algorithms.
            self.layers_forward(&x, &pos, &kv, &out, self.cap)?;
            let stream = dev.cuda_stream();
            let _cache = dev.enable_cuda_graph_htod_cache();
            stream
                .begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_RELAXED)
                .map_err(candle_core::Error::wrap)?;
            let body = self.layers_forward(&x, &pos, &kv, &out, self.cap);
            let graph = stream
                .end_capture(sys::CUgraphInstantiate_flags(0))
                .map_err(candle_core::Error::wrap)?;
            body?;
            let Some(graph) = graph else {
                return Err(LmError::Device(
                    "CUDA graph capture recorded nothing".into(),
                ));
            };
            graphs.0.insert(
                b,
                Captured {
                    graph,
                    x,
                    pos,
                    kv,
                    out,
                },
            );
        }
        dev.synchronize()?;
        drop(scratch);
        Ok(())
    }

    /// The decoder over `resid [rows, hidden]` (updated in place), writing the final hidden
    /// states to `out`. `span` bounds the keys any row sees (sizes the attention scratch).
    fn layers_forward(
        &self,
        resid: &Tensor,
        pos: &Tensor,
        kv: &Tensor,
        out: &Tensor,
        span: usize,
    ) -> Result<()> {
        let dev = cuda::cuda_device(resid.device())?;
        let rows = resid.dim(0)?;
        let (h, kvh, d) = (self.heads, self.kv_heads, self.head_dim);
        let (pos_a, kv_a, resid_a) = (
            Arg::Ptr(addr(pos)?),
            Arg::Ptr(addr(kv)?),
            Arg::Ptr(addr(resid)?),
        );
        let mut delta: Option<Tensor> = None;
        for (i, l) in self.layers.iter().enumerate() {
            let normed = empty((rows, self.hidden), self.dtype, dev)?;
            self.add_rms_norm(dev, delta.as_ref(), resid_a, &l.attn_norm, &normed, rows)?;
            let qkv = normed.matmul(&l.qkv.t()?)?;
            let q = empty((rows, h * d), self.dtype, dev)?;
            launch(
                dev,
                "rope_kv_append",
                (rows as u32, (h + 2 * kvh) as u32),
                (d / 2) as u32,
                0,
                &[
                    Arg::Ptr(addr(&qkv)?),
                    opt_ptr(l.qkv_bias.as_ref())?,
                    pos_a,
                    kv_a,
                    Arg::Ptr(addr(&q)?),
                    Arg::I32(i as i32),
                    Arg::I32(h as i32),
                    Arg::I32(kvh as i32),
                    Arg::I32(d as i32),
                    Arg::I32(self.cap as i32),
                    Arg::F32(self.theta),
                    Arg::I32(self.interleaved as i32),
                ],
            )?;
            let attn = empty((rows, h * d), self.dtype, dev)?;
            let threads = (d.div_ceil(32) * 32).clamp(128, 1024) as u32;
            launch(
                dev,
                "decode_attention",
                (rows as u32, h as u32),
                threads,
                ((span + d) * 4) as u32,
                &[
                    Arg::Ptr(addr(&q)?),
                    pos_a,
                    kv_a,
                    Arg::Ptr(addr(&attn)?),
                    Arg::I32(i as i32),
                    Arg::I32(h as i32),
                    Arg::I32(kvh as i32),
                    Arg::I32(d as i32),
                    Arg::I32(self.cap as i32),
                    Arg::F32(self.attn_scale),
                ],
            )?;
            let o = attn.matmul(&l.o.t()?)?;
            let normed = empty((rows, self.hidden), self.dtype, dev)?;
            self.add_rms_norm(dev, Some(&o), resid_a, &l.ffn_norm, &normed, rows)?;
            let gu = normed.matmul(&l.gate_up.t()?)?;
            let act = empty((rows, self.ffn), self.dtype, dev)?;
            let total = rows * self.ffn;
            launch(
                dev,
                "silu_mul",
                (total.div_ceil(256) as u32, 1),
                256,
                0,
                &[
                    Arg::Ptr(addr(&gu)?),
                    Arg::Ptr(addr(&act)?),
                    Arg::I32(self.ffn as i32),
                    Arg::I32(total as i32),
                ],
            )?;
            delta = Some(act.matmul(&l.down.t()?)?);
        }
        self.add_rms_norm(dev, delta.as_ref(), resid_a, &self.final_norm, out, rows)
    }

    fn add_rms_norm(
        &self,
        dev: &CudaDevice,
        delta: Option<&Tensor>,
        resid: Arg,
        weight: &Tensor,
        out: &Tensor,
        rows: usize,
    ) -> Result<()> {
        launch(
            dev,
            "add_rms_norm",
            (rows as u32, 1),
            256,
            0,
            &[
                opt_ptr(delta)?,
                resid,
                Arg::Ptr(addr(weight)?),
                Arg::Ptr(addr(out)?),
                Arg::I32(self.hidden as i32),
                Arg::F32(self.eps),
            ],
        )
    }
}

/// Per-row position and cache address, as uploaded to the device.
fn row_tables(rows: &[Row]) -> (Vec<u32>, Vec<i64>) {
    (
        rows.iter().map(|r| r.pos as u32).collect(),
        rows.iter().map(|r| r.cache as i64).collect(),
    )
}
