//! Per-sequence key/value cache with rewind.
//!
//! Buffers are preallocated and grow by doubling, so appending a position is a copy of that
//! position only. `truncate` is O(1): a rewind just forgets the tail. Sliding-window layers keep
//! their full history too, because a rewind may go back past the window.
//!
//! On the fused CUDA path a cache is one flat buffer of its full capacity instead
//! (`[layers][2][kv_heads][cap][head_dim]`), written by the kernels at each row's position.

use crate::error::{LmError, Result};
use candle_core::{DType, Device, Tensor};

#[derive(Debug, Clone)]
struct LayerKv {
    /// `[kv_heads, capacity, head_dim]`
    k: Tensor,
    v: Tensor,
}

#[derive(Debug, Clone)]
pub struct KvCache {
    layers: Vec<Option<LayerKv>>,
    len: usize,
    capacity: usize,
    max_len: usize,
    kv_heads: usize,
    head_dim: usize,
    dtype: DType,
    device: Device,
    /// The fused CUDA path's buffer (then `layers` stays empty), allocated on first use.
    flat: Option<Tensor>,
    /// Elements of `flat`; 0 for a per-layer cache.
    flat_elems: usize,
}

const INITIAL_CAPACITY: usize = 128;

impl KvCache {
    pub(crate) fn new(
        layers: usize,
        kv_heads: usize,
        head_dim: usize,
        max_len: usize,
        dtype: DType,
        device: &Device,
    ) -> Self {
        Self {
            layers: vec![None; layers],
            len: 0,
            capacity: 0,
            max_len,
            kv_heads,
            head_dim,
            dtype,
            device: device.clone(),
            flat: None,
            flat_elems: 0,
        }
    }

    /// A cache of the fused CUDA path: one buffer of all `max_len` positions, allocated on the
    /// first forward (so creating a cache cannot fail).
    pub(crate) fn flat(
        layers: usize,
        kv_heads: usize,
        head_dim: usize,
        max_len: usize,
        dtype: DType,
        device: &Device,
    ) -> Self {
        let mut c = Self::new(layers, kv_heads, head_dim, max_len, dtype, device);
        c.flat_elems = layers * 2 * kv_heads * max_len * head_dim;
        c
    }

    /// The flat buffer of the fused CUDA path, if this is such a cache.
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    pub(crate) fn flat_buffer(&self) -> Option<&Tensor> {
        self.flat.as_ref()
    }

    /// Positions held.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The most positions this cache may hold (the model's usable context).
    pub fn max_len(&self) -> usize {
        self.max_len
    }

    /// Forgets every position from `pos` on (rewind to a checkpoint).
    pub fn truncate(&mut self, pos: usize) {
        self.len = self.len.min(pos);
    }

    pub fn clear(&mut self) {
        self.len = 0;
    }

    /// Bytes held by the key/value buffers (allocated capacity, not just `len`).
    pub fn memory_bytes(&self) -> usize {
        if self.flat_elems > 0 {
            return self
                .flat
                .as_ref()
                .map_or(0, |_| self.flat_elems * self.dtype.size_in_bytes());
        }
        self.layers.iter().flatten().count()
            * 2
            * self.kv_heads
            * self.capacity
            * self.head_dim
            * self.dtype.size_in_bytes()
    }

    /// Bytes this cache would need at `positions` positions: for admission control.
    pub fn bytes_for(&self, positions: usize) -> usize {
        self.layers.len()
            * 2
            * self.kv_heads
            * positions
            * self.head_dim
            * self.dtype.size_in_bytes()
    }

    /// Checks that `n` more positions fit, before any layer is touched.
    pub(crate) fn reserve(&mut self, n: usize) -> Result<()> {
        let needed = self.len + n;
        if needed > self.max_len {
            return Err(LmError::ContextOverflow {
                needed,
                limit: self.max_len,
            });
        }
        if self.flat_elems > 0 {
            if self.flat.is_none() {
                self.flat = Some(Tensor::zeros(self.flat_elems, self.dtype, &self.device)?);
                self.capacity = self.max_len;
            }
            return Ok(());
        }
        if needed > self.capacity {
            let mut cap = self.capacity.max(INITIAL_CAPACITY);
            while cap < needed {
                cap *= 2;
            }
            let cap = cap.min(self.max_len);
            for layer in self.layers.iter_mut().flatten() {
                layer.k = grow(&layer.k, cap, self.len)?;
                layer.v = grow(&layer.v, cap, self.len)?;
            }
            self.capacity = cap;
        }
        Ok(())
    }

    /// Writes `k`, `v` (`[kv_heads, n, head_dim]`) at the current end for `layer` and returns
    /// views of all keys and values so far. `reserve(n)` must have been called for this step.
    pub(crate) fn append(
        &mut self,
        layer: usize,
        k: &Tensor,
        v: &Tensor,
    ) -> Result<(Tensor, Tensor)> {
        let n = k.dim(1)?;
        let shape = (self.kv_heads, self.capacity, self.head_dim);
        let entry = match &mut self.layers[layer] {
            Some(e) => e,
            slot => slot.insert(LayerKv {
                k: Tensor::zeros(shape, self.dtype, &self.device)?,
                v: Tensor::zeros(shape, self.dtype, &self.device)?,
            }),
        };
        entry.k.slice_set(&k.contiguous()?, 1, self.len)?;
        entry.v.slice_set(&v.contiguous()?, 1, self.len)?;
        let total = self.len + n;
        Ok((entry.k.narrow(1, 0, total)?, entry.v.narrow(1, 0, total)?))
    }

    /// Marks the `n` positions written by the last `append` to every layer as held.
    pub(crate) fn advance(&mut self, n: usize) {
        self.len += n;
    }
}

fn grow(t: &Tensor, cap: usize, len: usize) -> Result<Tensor> {
    let (h, _, d) = t.dims3()?;
    let bigger = Tensor::zeros((h, cap, d), t.dtype(), t.device())?;
    if len > 0 {
        bigger.slice_set(&t.narrow(1, 0, len)?.contiguous()?, 1, 0)?;
    }
    Ok(bigger)
}
