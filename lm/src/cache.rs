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

    /// A deep copy of the first `n` positions (at most `len`), independent of this cache from
    /// then on.
    ///
    /// `Clone` shares the buffers, which `append` writes in place, so a clone is only a view of
    /// the same sequence; a fork is a new one (a prefix cache keeps a prompt's positions while
    /// sessions extend copies of them). Per layer the copy is exactly `n` positions wide and
    /// grows on the next append; the fused CUDA path's flat buffer is copied whole.
    pub fn fork_prefix(&self, n: usize) -> Result<Self> {
        self.fork_prefix_with_room(n, 0)
    }

    /// [`Self::fork_prefix`] with room for `more` positions after the prefix, so that the
    /// appends which follow (the rest of a prompt, a reply) do not grow it, copying it again.
    pub fn fork_prefix_with_room(&self, n: usize, more: usize) -> Result<Self> {
        let len = self.len.min(n);
        let room = (len + more).min(self.max_len).max(len);
        let copy = |l: &LayerKv| -> Result<LayerKv> {
            Ok(LayerKv {
                k: grow(&l.k, room, len)?,
                v: grow(&l.v, room, len)?,
            })
        };
        let layers = self
            .layers
            .iter()
            .map(|l| l.as_ref().filter(|_| len > 0).map(copy).transpose())
            .collect::<Result<_>>()?;
        let flat = self.flat.as_ref().map(Tensor::copy).transpose()?;
        let capacity = if self.flat_elems > 0 {
            self.capacity
        } else {
            room
        };
        Ok(Self {
            layers,
            len,
            capacity,
            device: self.device.clone(),
            flat,
            ..*self
        })
    }

    /// Checks that `n` more positions fit, before any layer is touched.
    pub fn reserve(&mut self, n: usize) -> Result<()> {
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

#[cfg(test)]
mod tests {
    use crate::model::{shape_named, Input, LoadOptions, Model};

    fn tiny() -> Model {
        Model::random(shape_named("tiny").unwrap(), 0, &LoadOptions::default()).unwrap()
    }

    /// Layer 0's keys at every held position, on the host.
    fn keys(c: &super::KvCache) -> Vec<f32> {
        let l = c.layers[0].as_ref().unwrap();
        let k = l.k.narrow(1, 0, c.len).unwrap();
        k.flatten_all().unwrap().to_vec1().unwrap()
    }

    #[test]
    fn a_fork_is_independent_of_its_source_where_a_clone_is_not() {
        let m = tiny();
        let mut source = m.new_cache();
        m.forward(Input::Tokens(&[1, 2, 3]), &mut source).unwrap();
        let mut fork = source.fork_prefix(3).unwrap();
        let shared = source.clone();
        let (before, fork_before) = (keys(&source), keys(&fork));
        assert_eq!(before, fork_before);
        assert_eq!(fork.memory_bytes(), source.bytes_for(3));

        // Rewrite position 2 of the source in place: the clone sees it, the fork does not.
        source.truncate(2);
        m.forward(Input::Tokens(&[7]), &mut source).unwrap();
        assert_ne!(keys(&source), before);
        assert_eq!(keys(&shared), keys(&source));
        assert_eq!(keys(&fork), before);

        // And the other way round: rewriting the fork in place leaves the source alone.
        let source_now = keys(&source);
        fork.truncate(1);
        m.forward(Input::Tokens(&[8, 9]), &mut fork).unwrap();
        assert_ne!(keys(&fork), before);
        assert_eq!(keys(&source), source_now);
    }

    #[test]
    fn a_fork_of_a_prefix_continues_like_that_prefix() {
        let m = tiny();
        let mut whole = m.new_cache();
        let want = m.forward(Input::Tokens(&[1, 2, 3, 4]), &mut whole).unwrap();
        let mut longer = m.new_cache();
        m.forward(Input::Tokens(&[1, 2, 3, 5, 6]), &mut longer)
            .unwrap();
        let mut fork = longer.fork_prefix(3).unwrap();
        assert_eq!(fork.memory_bytes(), longer.bytes_for(3));
        let got = m.forward(Input::Tokens(&[4]), &mut fork).unwrap();
        let d: f32 = (got - want.narrow(0, 3, 1).unwrap())
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar()
            .unwrap();
        assert!(d < 1e-5, "the fork's next step differs by {d}");
        assert_eq!(fork.len(), 4);
    }
}
