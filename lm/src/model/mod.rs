//! A decoder-only transformer with its steps exposed separately: `embed`, `forward` over token
//! ids *or* arbitrary input vectors (returning the final hidden state, after the final norm),
//! and `logits`. candle-transformers' model files take ids only and hide the hidden state;
//! latent steps and constrained decoding need all three, so the forward is ours.

mod batch;
mod config;
mod embedding;
#[cfg(feature = "cuda")]
mod fused;
mod gguf;
mod linear;
mod random;
mod rope;
mod safetensors;

pub use config::{Activation, Architecture, ModelConfig};
pub use embedding::Embedding;
pub use gguf::GgufFile;
pub use random::{shape_named, NamedShape, SHAPES};
pub(crate) use safetensors::safetensors_shards;

use crate::cache::KvCache;
use crate::error::{LmError, Result};
use batch::StepQueue;
pub use batch::StepStats;
use candle_core::{DType, Device, Tensor};
use linear::{forward_many, Linear};
use mm_kernels::attention::{causal_attention, AttentionShape, KvView};
use mm_kernels::KernelPool;
use rope::RopeTables;

/// What to feed at the next positions.
#[derive(Debug, Clone, Copy)]
pub enum Input<'a> {
    Tokens(&'a [u32]),
    /// `[n, hidden]` vectors in input space (see [`Model::embed`]).
    Vectors(&'a Tensor),
}

/// Options that change how a model is loaded.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// Positions a sequence may hold; defaults to the model's context, capped at 8192 so rope
    /// tables and caches stay small. A sequence longer than this is a typed error.
    pub max_context: Option<usize>,
    pub device: Device,
    /// Dequantize GGUF weights to f32 at load: slower and larger, but free of the rounding
    /// of quantized activations — a float reference for the same file.
    pub dequantize: bool,
    /// On a CUDA device, run dense llama/Qwen2 models on the fused path (our kernels, CUDA
    /// graphs, batched steps). Off: candle's ops only — slower, a reference for the fused path.
    pub fused: bool,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            max_context: None,
            device: Device::Cpu,
            dequantize: false,
            fused: true,
        }
    }
}

const DEFAULT_MAX_CONTEXT: usize = 8192;

#[derive(Debug, Clone)]
struct Norm {
    weight: Tensor,
    eps: f32,
}

impl Norm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(candle_nn::ops::rms_norm(x, &self.weight, self.eps)?)
    }
}

#[derive(Debug, Clone)]
struct Block {
    attn_norm: Norm,
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    q_norm: Option<Norm>,
    k_norm: Option<Norm>,
    post_attn_norm: Option<Norm>,
    ffn_norm: Norm,
    gate: Linear,
    up: Linear,
    down: Linear,
    post_ffn_norm: Option<Norm>,
}

/// A loaded model. Immutable and shareable across threads; per-sequence state lives in
/// [`KvCache`].
#[derive(Debug)]
pub struct Model {
    config: ModelConfig,
    embedding: Embedding,
    blocks: Vec<Block>,
    final_norm: Norm,
    output: Linear,
    rope: RopeTables,
    max_context: usize,
    dtype: DType,
    device: Device,
    quantization: String,
    /// The fused CUDA decode path, for dense llama/Qwen2 models on a CUDA device.
    #[cfg(feature = "cuda")]
    fused: Option<fused::Fused>,
    /// Forwards of concurrent sequences (steps, prompt chunks, forced tokens), batched
    /// (everywhere but the fused path, which batches its own steps).
    steps: StepQueue<Job, Forwarded>,
}

/// The most rows one batched forward takes (a longer prompt runs alone): enough for a prompt
/// chunk and the steps of the sessions beside it, few enough that a step waits for one chunk
/// at most.
pub const MAX_STEP_BATCH: usize = 64;

/// How long a batch waits for the sequences of the last batch to come back from their own
/// per-step work: a fraction of a step (SmolLM2-135M: ~7 ms on 2 cores), far below the cost of
/// running them in separate batches.
const STEP_GATHER: std::time::Duration = std::time::Duration::from_millis(2);

/// One position's output: the final hidden state `[1, hidden]` and the logits `[1, vocab]` (f32).
#[derive(Debug, Clone)]
pub struct Stepped {
    pub hidden: Tensor,
    pub logits: Tensor,
}

impl Stepped {
    /// The logits as a host vector (token sampling).
    pub fn host_logits(&self) -> Result<Vec<f32>> {
        Ok(self.logits.squeeze(0)?.to_vec1()?)
    }
}

/// A sequence's cache handed to the thread that runs a batch. The submitting thread waits in
/// [`StepQueue::submit`], holding its `&mut KvCache`, until the batch has stored its result,
/// and the batch is done with the pointer before it stores results: the cache is never
/// touched by two threads at once.
struct CachePtr(*mut KvCache);
// SAFETY: see above; the pointee is only used by the thread running the batch, while its
// owner is blocked.
unsafe impl Send for CachePtr {}

/// A queued forward: its input rows `[n, hidden]`, its sequence's cache, and whether the
/// caller wants the logits of its last row (a step) or the hidden states only.
struct Job {
    x: Tensor,
    cache: CachePtr,
    logits: bool,
}

/// A forward's hidden states `[n, hidden]`, and the last row's logits if asked for.
type Forwarded = (Tensor, Option<Tensor>);

/// One sequence's rows in a forward: the next `rows` input rows go at its cache's end.
struct Segment<'c> {
    cache: &'c mut KvCache,
    rows: usize,
}

/// The tensors a loader hands over; shared by the GGUF and safetensors paths.
struct Parts {
    config: ModelConfig,
    embedding: Embedding,
    blocks: Vec<Block>,
    final_norm: Norm,
    output: Linear,
    quantization: String,
}

impl Parts {
    /// Every tensor against the config: metadata that contradicts the weights would otherwise
    /// surface as a shape error mid-request, or as wrong text.
    fn check_shapes(&self) -> Result<()> {
        let c = &self.config;
        let (q, kv) = (c.heads * c.head_dim, c.kv_heads * c.head_dim);
        let (vocab, hidden) = (self.embedding.vocab(), self.embedding.hidden());
        if (vocab, hidden) != (c.vocab, c.hidden) {
            return Err(LmError::BadModel(format!(
                "the token embedding is {vocab}x{hidden} but the metadata implies {}x{}",
                c.vocab, c.hidden
            )));
        }
        self.output
            .expect_shape("the output projection", c.vocab, c.hidden)?;
        let norm = |what: String, n: &Norm, len: usize| match n.weight.dims() {
            [l] if *l == len => Ok(()),
            dims => Err(LmError::BadModel(format!(
                "{what} has shape {dims:?} but the metadata implies [{len}]"
            ))),
        };
        norm("the final norm".into(), &self.final_norm, c.hidden)?;
        for (i, b) in self.blocks.iter().enumerate() {
            for (name, l, out, input) in [
                ("q", &b.q, q, c.hidden),
                ("k", &b.k, kv, c.hidden),
                ("v", &b.v, kv, c.hidden),
                ("attention output", &b.o, c.hidden, q),
                ("gate", &b.gate, c.ffn, c.hidden),
                ("up", &b.up, c.ffn, c.hidden),
                ("down", &b.down, c.hidden, c.ffn),
            ] {
                l.expect_shape(&format!("layer {i}'s {name} projection"), out, input)?;
            }
            let norms = [
                ("attention", Some(&b.attn_norm), c.hidden),
                ("feed-forward", Some(&b.ffn_norm), c.hidden),
                ("post-attention", b.post_attn_norm.as_ref(), c.hidden),
                ("post-feed-forward", b.post_ffn_norm.as_ref(), c.hidden),
                ("q", b.q_norm.as_ref(), c.head_dim),
                ("k", b.k_norm.as_ref(), c.head_dim),
            ];
            for (name, n, len) in norms {
                if let Some(n) = n {
                    norm(format!("layer {i}'s {name} norm"), n, len)?;
                }
            }
        }
        Ok(())
    }
}

impl Model {
    fn assemble(p: Parts, opts: &LoadOptions, dtype: DType) -> Result<Self> {
        p.config.validate()?;
        p.check_shapes()?;
        let max_context = opts
            .max_context
            .unwrap_or(DEFAULT_MAX_CONTEXT)
            .min(p.config.context_length)
            .max(1);
        let rope = RopeTables::new(&p.config, max_context, dtype, &opts.device)?;
        #[cfg(feature = "cuda")]
        let fused = if !opts.fused {
            None
        } else {
            fused::Fused::build(
                &p.config,
                &p.blocks,
                &p.final_norm,
                max_context,
                dtype,
                &opts.device,
            )?
        };
        #[cfg(feature = "cuda")]
        let max_context = fused.as_ref().map_or(max_context, |f| f.capacity());
        Ok(Self {
            config: p.config,
            embedding: p.embedding,
            blocks: p.blocks,
            final_norm: p.final_norm,
            output: p.output,
            rope,
            max_context,
            dtype,
            device: opts.device.clone(),
            quantization: p.quantization,
            #[cfg(feature = "cuda")]
            fused,
            steps: StepQueue::new(MAX_STEP_BATCH, STEP_GATHER),
        })
    }

    /// Whether steps run on the fused CUDA path (graph-captured decode, batched across caches).
    pub fn is_fused(&self) -> bool {
        #[cfg(feature = "cuda")]
        return self.fused.is_some();
        #[cfg(not(feature = "cuda"))]
        false
    }

    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Positions one sequence may hold.
    pub fn max_context(&self) -> usize {
        self.max_context
    }

    /// The weights' storage type (e.g. `Q4_1`, `Q4_K`, `bf16`), as loaded from the file.
    pub fn quantization(&self) -> &str {
        &self.quantization
    }

    pub fn embedding(&self) -> &Embedding {
        &self.embedding
    }

    /// Bytes of weights read for one token: embedding row excluded, output projection included.
    pub fn weight_bytes_per_token(&self) -> usize {
        let per_block = |b: &Block| {
            [&b.q, &b.k, &b.v, &b.o, &b.gate, &b.up, &b.down]
                .iter()
                .map(|l| l.weight_bytes())
                .sum::<usize>()
        };
        self.blocks.iter().map(per_block).sum::<usize>() + self.output.weight_bytes()
    }

    /// A fresh cache for one sequence.
    pub fn new_cache(&self) -> KvCache {
        // The fused CUDA path writes one flat buffer per sequence; everything else grows per layer.
        let make = if self.is_fused() {
            KvCache::flat
        } else {
            KvCache::new
        };
        make(
            self.config.layers,
            self.config.kv_heads,
            self.config.head_dim,
            self.max_context,
            self.dtype,
            &self.device,
        )
    }

    /// `[n, hidden]`: the vectors layer 0 sees for these tokens (embedding scale applied).
    pub fn embed(&self, ids: &[u32]) -> Result<Tensor> {
        self.embedding.rows(ids)
    }

    /// Runs `input` at the cache's next positions and returns the final hidden state
    /// `[n, hidden]` (after the final norm). On error the cache is left as it was.
    pub fn forward(&self, input: Input, cache: &mut KvCache) -> Result<Tensor> {
        let x = self.input_rows(input)?;
        let n = x.dim(0)?;
        cache.reserve(n)?;
        #[cfg(feature = "cuda")]
        if let (Some(f), Some(buf)) = (&self.fused, cache.flat_buffer()) {
            let pos = cache.len();
            let base = crate::cuda::addr(buf)?;
            let h = if n == 1 {
                f.step(&x, fused::Row { cache: base, pos })?
            } else {
                let rows: Vec<fused::Row> = (pos..pos + n)
                    .map(|pos| fused::Row { cache: base, pos })
                    .collect();
                f.forward(&x, &rows)?
            };
            cache.advance(n);
            return Ok(h);
        }
        Ok(self.submit(x, cache, false)?.0)
    }

    /// Runs `x` for `cache` in a batch with whatever other sequences submit meanwhile.
    fn submit(&self, x: Tensor, cache: &mut KvCache, logits: bool) -> Result<Forwarded> {
        let rows = x.dim(0)?;
        let job = Job {
            x,
            cache: CachePtr(cache),
            logits,
        };
        self.steps.submit(job, rows, |jobs| self.run_jobs(&jobs))
    }

    /// Runs `x` through the blocks for several sequences at once: the linear layers see all
    /// rows (one read of each weight), attention runs per sequence over its own cache. Every
    /// per-row operation is independent of the other rows, so a sequence's rows come out the
    /// same alone or batched. Caches must have room (`reserve`); they advance only when all
    /// layers succeeded.
    fn forward_segments(&self, mut x: Tensor, segs: &mut [Segment]) -> Result<Tensor> {
        let pos: Vec<usize> = segs.iter().map(|s| s.cache.len()).collect();
        for (i, block) in self.blocks.iter().enumerate() {
            x = self.block_forward(i, block, &x, &pos, segs)?;
        }
        for s in segs.iter_mut() {
            s.cache.advance(s.rows);
        }
        self.final_norm.forward(&x)
    }

    /// One position of one sequence: its final hidden state and logits. Steps and forwards
    /// that other threads submit meanwhile (concurrent sessions' latent steps, commit tokens,
    /// prompt chunks, constrained decoding) run as one batched forward, so `b` sessions read
    /// the weights once per step instead of `b` times; a sequence's result does not depend on
    /// what it was batched with. On error the cache is left as it was.
    pub fn step(&self, input: Input, cache: &mut KvCache) -> Result<Stepped> {
        let x = self.input_rows(input)?;
        if x.dim(0)? != 1 {
            return Err(LmError::InvalidInput(format!(
                "a step feeds one position, got {}; use forward for several",
                x.dim(0)?
            )));
        }
        #[cfg(feature = "cuda")]
        if self.fused.is_some() {
            let hidden = self.forward(Input::Vectors(&x), cache)?;
            let logits = self.logits(&hidden)?;
            return Ok(Stepped { hidden, logits });
        }
        let (hidden, logits) = self.submit(x, cache, true)?;
        let logits =
            logits.ok_or_else(|| LmError::Layout("a step came back without logits".into()))?;
        Ok(Stepped { hidden, logits })
    }

    /// How many forwards ran through the batch queue, and in how many batches (the CPU queue;
    /// the fused path batches on its own).
    pub fn step_stats(&self) -> StepStats {
        self.steps.stats()
    }

    /// Runs queued forwards: room is reserved per cache (a full one fails alone), the rest go
    /// through one forward, and the steps' last rows through one output projection. Should
    /// the batch fail, each job runs alone so that each gets its own error.
    fn run_jobs(&self, jobs: &[Job]) -> Vec<Result<Forwarded>> {
        // SAFETY: `CachePtr`: each cache belongs to one waiting submitter, and `jobs` holds
        // distinct caches (a submitter has one step in flight).
        let cache = |i: usize| {
            let ptr: *mut KvCache = jobs[i].cache.0;
            unsafe { &mut *ptr }
        };
        let rows = |i: usize| jobs[i].x.dim(0).unwrap_or(0);
        let mut results: Vec<Option<Result<Forwarded>>> = (0..jobs.len()).map(|_| None).collect();
        let mut ready = Vec::with_capacity(jobs.len());
        for (i, r) in results.iter_mut().enumerate() {
            match cache(i).reserve(rows(i)) {
                Ok(()) => ready.push(i),
                Err(e) => *r = Some(Err(e)),
            }
        }
        let batch = |idx: &[usize]| -> Result<Vec<Result<Forwarded>>> {
            let xs: Vec<&Tensor> = idx.iter().map(|&i| &jobs[i].x).collect();
            let mut segs: Vec<Segment> = idx
                .iter()
                .map(|&i| Segment {
                    cache: cache(i),
                    rows: rows(i),
                })
                .collect();
            let hidden = self.forward_segments(Tensor::cat(&xs, 0)?, &mut segs)?;
            // Each job's rows, and the steps' last rows in one output projection.
            let mut starts = Vec::with_capacity(idx.len());
            let mut last_rows = Vec::new();
            let mut start = 0;
            for &i in idx {
                starts.push(start);
                start += rows(i);
                if jobs[i].logits {
                    last_rows.push(hidden.narrow(0, start - 1, 1)?);
                }
            }
            let logits = if last_rows.is_empty() {
                None
            } else {
                let l = self.output.forward(&Tensor::cat(&last_rows, 0)?)?;
                Some(l.to_dtype(DType::F32)?)
            };
            let mut k = 0;
            Ok(idx
                .iter()
                .zip(starts)
                .map(|(&i, start)| {
                    let h = hidden.narrow(0, start, rows(i))?;
                    if !jobs[i].logits {
                        return Ok((h, None));
                    }
                    let l = logits
                        .as_ref()
                        .expect("steps have logits")
                        .narrow(0, k, 1)?;
                    k += 1;
                    check_finite(&h.narrow(0, rows(i) - 1, 1)?)?;
                    check_finite(&l)?;
                    Ok((h, Some(l)))
                })
                .collect())
        };
        match batch(&ready) {
            Ok(rows) => {
                for (&i, r) in ready.iter().zip(rows) {
                    results[i] = Some(r);
                }
            }
            Err(e) if ready.len() == 1 => results[ready[0]] = Some(Err(e)),
            Err(_) => {
                for &i in &ready {
                    results[i] = Some(batch(&[i]).and_then(|mut r| r.remove(0)));
                }
            }
        }
        results
            .into_iter()
            .map(|r| r.expect("every step has a result"))
            .collect()
    }

    /// One position for each of several sequences: row `i` of `inputs [b, hidden]` goes to
    /// `caches[i]`; returns the final hidden states `[b, hidden]`, as one batched forward
    /// (ragged cache lengths). A cache may appear once. On error no cache has advanced.
    pub fn forward_batch(&self, inputs: &Tensor, caches: &mut [&mut KvCache]) -> Result<Tensor> {
        let x = self.input_rows(Input::Vectors(inputs))?;
        if x.dim(0)? != caches.len() {
            return Err(LmError::InvalidInput(format!(
                "forward_batch: {} input rows for {} caches",
                x.dim(0)?,
                caches.len()
            )));
        }
        for c in caches.iter_mut() {
            c.reserve(1)?;
        }
        #[cfg(feature = "cuda")]
        if let Some(f) = &self.fused {
            let rows = caches
                .iter()
                .map(|c| {
                    let buf = c.flat_buffer().ok_or_else(|| {
                        LmError::Layout("a cache from another model was passed".into())
                    })?;
                    Ok(fused::Row {
                        cache: crate::cuda::addr(buf)?,
                        pos: c.len(),
                    })
                })
                .collect::<Result<Vec<_>>>()?;
            let h = f.forward(&x, &rows)?;
            for c in caches.iter_mut() {
                c.advance(1);
            }
            return Ok(h);
        }
        let mut segs: Vec<Segment> = caches
            .iter_mut()
            .map(|c| Segment { cache: c, rows: 1 })
            .collect();
        self.forward_segments(x, &mut segs)
    }

    /// The `[n, hidden]` input-space rows for `input`, validated, on this model's device.
    fn input_rows(&self, input: Input) -> Result<Tensor> {
        Ok(match input {
            Input::Tokens(ids) => {
                if ids.is_empty() {
                    return Err(LmError::InvalidInput(
                        "forward needs at least one token".into(),
                    ));
                }
                self.embed(ids)?
            }
            Input::Vectors(v) => {
                let (n, h) = v.dims2().map_err(|_| {
                    LmError::InvalidInput(format!(
                        "input vectors must be [n, {}], got {:?}",
                        self.config.hidden,
                        v.dims()
                    ))
                })?;
                if n == 0 || h != self.config.hidden {
                    return Err(LmError::InvalidInput(format!(
                        "input vectors must be [n >= 1, {}], got [{n}, {h}]",
                        self.config.hidden
                    )));
                }
                v.to_device(&self.device)?.to_dtype(self.dtype)?
            }
        })
    }

    /// `[n, hidden] -> [n, vocab]` logits, f32.
    pub fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        // Both sides are checked: our quantized kernels turn a NaN activation into finite
        // garbage, so broken weights show in the hidden state before they would in the logits.
        check_finite(hidden)?;
        let logits = self.output.forward(hidden)?.to_dtype(DType::F32)?;
        check_finite(&logits)?;
        Ok(logits)
    }

    /// Logits of the last row of a hidden state, as a vector.
    pub fn last_logits(&self, hidden: &Tensor) -> Result<Vec<f32>> {
        let n = hidden.dim(0)?;
        Ok(self
            .logits(&hidden.narrow(0, n - 1, 1)?)?
            .squeeze(0)?
            .to_vec1()?)
    }

    /// One block over the rows of several sequences (`segs`, at positions `pos`).
    fn block_forward(
        &self,
        layer: usize,
        b: &Block,
        x: &Tensor,
        pos: &[usize],
        segs: &mut [Segment],
    ) -> Result<Tensor> {
        let c = &self.config;
        let n = x.dim(0)?;
        let h = b.attn_norm.forward(x)?;
        let [q, k, v]: [Tensor; 3] = forward_many(&[&b.q, &b.k, &b.v], &h)?
            .try_into()
            .expect("three outputs");
        let q = q.reshape((n, c.heads, c.head_dim))?;
        let k = k.reshape((n, c.kv_heads, c.head_dim))?;
        let v = v.reshape((n, c.kv_heads, c.head_dim))?;
        let (q, k) = match (&b.q_norm, &b.k_norm) {
            (Some(qn), Some(kn)) => (qn.forward(&q)?, kn.forward(&k)?),
            _ => (q, k),
        };
        let theta = c.rope_theta_of(layer);
        let mut attn = Vec::with_capacity(segs.len());
        let mut start = 0;
        for (s, &pos) in segs.iter_mut().zip(pos) {
            // [heads, rows, head_dim]
            let part = |t: &Tensor| -> Result<Tensor> {
                Ok(t.narrow(0, start, s.rows)?.transpose(0, 1)?.contiguous()?)
            };
            let q = self.rope.apply(&part(&q)?, pos, theta)?;
            let k = self.rope.apply(&part(&k)?, pos, theta)?;
            let (k_all, v_all) = s.cache.append(layer, &k, &part(&v)?)?;
            attn.push(self.attention(&q, &k_all, &v_all, pos, c.window_of(layer))?);
            start += s.rows;
        }
        let attn = if attn.len() == 1 {
            attn.pop().expect("one sequence")
        } else {
            Tensor::cat(&attn, 0)?
        };
        let mut out = b.o.forward(&attn)?;
        if let Some(norm) = &b.post_attn_norm {
            out = norm.forward(&out)?;
        }
        let x = (x + out)?;
        let h = b.ffn_norm.forward(&x)?;
        let [gate, up]: [Tensor; 2] = forward_many(&[&b.gate, &b.up], &h)?
            .try_into()
            .expect("two outputs");
        let gate = match c.activation {
            Activation::Silu => candle_nn::ops::silu(&gate)?,
            Activation::GeluTanh => gate.gelu()?,
        };
        let mut ff = b.down.forward(&(gate * up)?)?;
        if let Some(norm) = &b.post_ffn_norm {
            ff = norm.forward(&ff)?;
        }
        Ok((x + ff)?)
    }

    /// Causal (optionally sliding-window) attention of `q [heads, n, d]` at positions
    /// `pos..pos+n` over `k, v [kv_heads, pos+n, d]`; returns `[n, heads*d]`.
    /// Query heads are grouped per kv head by a reshape, so keys are never repeated.
    fn attention(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        pos: usize,
        window: Option<usize>,
    ) -> Result<Tensor> {
        if self.device.is_cpu() && q.dtype() == DType::F32 {
            return self.attention_rows(q, k, v, pos, window);
        }
        let c = &self.config;
        let (_, n, d) = q.dims3()?;
        let total = pos + n;
        // Keys older than the window of the first query are never needed.
        let first = window.map_or(0, |w| (pos + 1).saturating_sub(w));
        let (k, v) = if first > 0 {
            (
                k.narrow(1, first, total - first)?,
                v.narrow(1, first, total - first)?,
            )
        } else {
            (k.clone(), v.clone())
        };
        let keys = total - first;
        let group = c.heads / c.kv_heads;
        let q = q.reshape((c.kv_heads, group * n, d))?;
        let scores = (q.matmul(&k.t()?)? * c.attn_scale as f64)?;
        // A single query sees every key left after the window cut: no mask needed.
        let scores = if n > 1 {
            let mask = self.mask(n, pos, first, keys, window)?;
            scores
                .reshape((c.kv_heads, group, n, keys))?
                .broadcast_add(&mask)?
                .reshape((c.kv_heads, group * n, keys))?
        } else {
            scores
        };
        let probs = candle_nn::ops::softmax_last_dim(&scores)?;
        let out = probs.matmul(&v.contiguous()?)?; // [kv_heads, group*n, d]
        Ok(out
            .reshape((c.heads, n, d))?
            .transpose(0, 1)?
            .reshape((n, c.heads * d))?)
    }

    /// [`Self::attention`] on the CPU: our kernel, one query row at a time, so that a row's
    /// result does not depend on how many rows are evaluated with it (a prompt resumed from
    /// cached KV at any position equals a cold one, bit for bit). It reads the cache's buffers
    /// in place.
    fn attention_rows(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        pos: usize,
        window: Option<usize>,
    ) -> Result<Tensor> {
        let c = &self.config;
        let (heads, n, d) = q.dims3()?;
        let q = q.contiguous()?;
        let (k, v) = (head_rows(k, d)?, head_rows(v, d)?);
        let (kv_heads, len, _) = k.dims3()?;
        let head_stride = k.stride()[0] / d;
        if v.stride()[0] / d != head_stride {
            return Err(LmError::InvalidInput(
                "keys and values are laid out differently".into(),
            ));
        }
        let shape = AttentionShape {
            heads,
            kv_heads,
            head_dim: d,
            scale: c.attn_scale,
            window,
        };
        let mut out = vec![0f32; n * heads * d];
        {
            let (qs, ql) = q.storage_and_layout();
            let (ks, kl) = k.storage_and_layout();
            let (vs, vl) = v.storage_and_layout();
            let kv = KvView {
                k: &cpu_f32(&ks)?[kl.start_offset()..],
                v: &cpu_f32(&vs)?[vl.start_offset()..],
                head_stride,
                len,
            };
            let q = &cpu_f32(&qs)?[ql.start_offset()..][..heads * n * d];
            causal_attention(KernelPool::global(), &shape, q, n, pos, &kv, &mut out);
        }
        Ok(Tensor::from_vec(out, (n, heads * d), &self.device)?)
    }

    /// `[n, keys]` additive mask: query `i` (position `pos+i`) sees key `j` (position `first+j`)
    /// when `first+j <= pos+i` and, with a window `w`, `pos+i - (first+j) < w`.
    fn mask(
        &self,
        n: usize,
        pos: usize,
        first: usize,
        keys: usize,
        window: Option<usize>,
    ) -> Result<Tensor> {
        let mut m = vec![0f32; n * keys];
        for i in 0..n {
            let qp = pos + i;
            for j in 0..keys {
                let kp = first + j;
                let visible = kp <= qp && window.is_none_or(|w| qp - kp < w);
                if !visible {
                    m[i * keys + j] = f32::NEG_INFINITY;
                }
            }
        }
        Ok(Tensor::from_vec(m, (n, keys), &self.device)?.to_dtype(self.dtype)?)
    }
}

/// `t: [heads, positions, d]` as rows of `d` contiguous values, `stride[0]` apart per head (a
/// view of a cache buffer is; anything else is copied).
fn head_rows(t: &Tensor, d: usize) -> Result<Tensor> {
    let s = t.stride();
    if s[2] == 1 && s[1] == d && s[0].is_multiple_of(d) && s[0] / d >= t.dim(1)? {
        Ok(t.clone())
    } else {
        Ok(t.contiguous()?)
    }
}

/// The f32 values of a CPU tensor's storage.
fn cpu_f32(s: &candle_core::Storage) -> Result<&[f32]> {
    match s {
        candle_core::Storage::Cpu(c) => Ok(c.as_slice::<f32>()?),
        _ => Err(LmError::InvalidInput(
            "CPU attention was given a tensor on another device".into(),
        )),
    }
}

/// Fails on any NaN or infinity in `t`. One anywhere makes a sum non-finite; finite values
/// cannot overflow it (activations and logits are far below 1e30 over at most millions of
/// entries).
fn check_finite(t: &Tensor) -> Result<()> {
    let sum = t.to_dtype(DType::F32)?.sum_all()?.to_scalar::<f32>()?;
    if sum.is_finite() {
        Ok(())
    } else {
        Err(LmError::NonFiniteLogits)
    }
}
