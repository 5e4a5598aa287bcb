//! Causal attention on the CPU, one query row at a time.
//!
//! Each row's result depends only on its own query and the keys and values it sees, computed
//! in a fixed order, never on how many rows are evaluated together. A prompt evaluated in any
//! split (a prefix from a cache, the rest in one forward or several) then gives the same bits
//! as a cold one; a multi-query gemm rounds differently for different row counts.

#[cfg(target_arch = "x86_64")]
use crate::exp::exp_avx2;
use crate::exp::NEGLIGIBLE;
use crate::KernelPool;
#[cfg(target_arch = "x86_64")]
use crate::{has_avx2, has_avx512};
use std::cell::RefCell;

/// The attention's shape, the same for every row.
#[derive(Debug, Clone, Copy)]
pub struct AttentionShape {
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    /// Multiplies each query-key dot product.
    pub scale: f32,
    /// A query sees at most this many latest positions, its own included (sliding window).
    pub window: Option<usize>,
}

/// Keys and values, `[kv_heads][head_stride][head_dim]` each, of which positions `0..len` are
/// valid (a cache whose buffers hold `head_stride` positions per head).
#[derive(Debug, Clone, Copy)]
pub struct KvView<'a> {
    pub k: &'a [f32],
    pub v: &'a [f32],
    pub head_stride: usize,
    pub len: usize,
}

/// Attention of `n` query rows at positions `pos..pos + n` over `kv` (which holds them):
/// `q` is `[heads][n][head_dim]`, `out` is `[n][heads * head_dim]`.
///
/// Panics on inconsistent lengths (a caller's bug, not input).
pub fn causal_attention(
    pool: &KernelPool,
    shape: &AttentionShape,
    q: &[f32],
    n: usize,
    pos: usize,
    kv: &KvView,
    out: &mut [f32],
) {
    let AttentionShape {
        heads,
        kv_heads,
        head_dim: d,
        ..
    } = *shape;
    assert!(
        heads > 0 && kv_heads > 0 && heads % kv_heads == 0,
        "{shape:?}"
    );
    assert_eq!(q.len(), heads * n * d, "q is [heads][n][head_dim]");
    assert_eq!(out.len(), n * heads * d, "out is [n][heads * head_dim]");
    assert!(
        pos + n <= kv.len && kv.len <= kv.head_stride,
        "{n} rows at {pos} over {kv:?}"
    );
    let kv_elems = kv_heads * kv.head_stride * d;
    assert!(
        kv.k.len() >= kv_elems && kv.v.len() >= kv_elems,
        "kv is too short"
    );
    let group = heads / kv_heads;
    #[cfg(target_arch = "x86_64")]
    let avx2 = has_avx2();
    let out_ptr = SyncPtr(out.as_mut_ptr());
    let row_blocks = n.div_ceil(ROWS_PER_TASK);
    // A task: one kv head's query heads over a few rows, so each key block is loaded once for
    // all of them. How rows are grouped never changes a row's arithmetic.
    let work = |task: usize| {
        let (g, rb) = (task / row_blocks, task % row_blocks);
        let k = &kv.k[g * kv.head_stride * d..][..kv.head_stride * d];
        let v = &kv.v[g * kv.head_stride * d..][..kv.head_stride * d];
        let queries: Vec<Query> = (rb * ROWS_PER_TASK..n.min((rb + 1) * ROWS_PER_TASK))
            .flat_map(|i| (g * group..(g + 1) * group).map(move |h| (i, h)))
            .map(|(i, h)| Query {
                q: &q[(h * n + i) * d..][..d],
                at: pos + i,
                // SAFETY: query (i, h) alone writes out[i][h*d .. (h+1)*d], inside `out`
                // (checked above); `out` outlives `run`, which returns after every task.
                out: unsafe {
                    std::slice::from_raw_parts_mut(out_ptr.get().add((i * heads + h) * d), d)
                },
            })
            .collect();
        SCORES.with(|s| {
            let s = &mut s.borrow_mut();
            #[cfg(target_arch = "x86_64")]
            if avx2 && d % 8 == 0 {
                // SAFETY: AVX2 and FMA were detected; d is a multiple of 8.
                return SUMS.with(|sums| unsafe {
                    queries_avx2(shape, queries, k, v, s, &mut sums.borrow_mut())
                });
            }
            for query in queries {
                row(shape, query.q, k, v, query.at, s, query.out);
            }
        });
    };
    pool.run(kv_heads * row_blocks, work);
}

/// Query rows per task: with a kv head's query heads, a dozen queries share each key block.
const ROWS_PER_TASK: usize = 4;

/// One query row: its vector, its position, where its result goes.
struct Query<'a> {
    q: &'a [f32],
    at: usize,
    out: &'a mut [f32],
}

thread_local! {
    static SCORES: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
    /// The AVX2 path's weighted-value sums, `[query][head_dim]`.
    static SUMS: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

struct SyncPtr(*mut f32);
// SAFETY: tasks write disjoint parts of the buffer (see `causal_attention`).
unsafe impl Sync for SyncPtr {}
impl SyncPtr {
    fn get(&self) -> *mut f32 {
        self.0
    }
}

/// Queries of one kv head with AVX2: scores eight keys at a time, each key block loaded once
/// for all the queries and each dot product reduced in the same order, then per query the
/// softmax and the weighted values. Key blocks sit at multiples of 8 whatever the queries, so
/// a key's score lands in the same lane, and a query's sum adds the same terms in the same
/// order, alone or with others.
///
/// # Safety
/// AVX2 and FMA must be available; `head_dim` must be a multiple of 8.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn queries_avx2(
    shape: &AttentionShape,
    queries: Vec<Query>,
    k: &[f32],
    v: &[f32],
    scratch: &mut Vec<f32>,
    sums: &mut Vec<f32>,
) {
    use std::arch::x86_64::*;
    let d = shape.head_dim;
    let first = |at: usize| shape.window.map_or(0, |w| (at + 1).saturating_sub(w));
    let (Some(lo), Some(hi)) = (
        queries.iter().map(|q| first(q.at) / 8 * 8).min(),
        queries.iter().map(|q| q.at).max(),
    ) else {
        return;
    };
    let span = (hi + 1 - lo).div_ceil(8) * 8;
    let wide = has_avx512();
    let pairs = if wide { queries.len() / 2 } else { 0 };
    scratch.clear();
    scratch.resize(queries.len() * span + 8 * d + pairs * 2 * d, 0.0);
    let (scores, rest) = scratch.split_at_mut(queries.len() * span);
    let (pad, interleaved) = rest.split_at_mut(8 * d);
    // With AVX-512, a pair of queries sits in one register: eight dimensions of the first,
    // then the same eight of the second.
    for (p, dst) in interleaved.chunks_exact_mut(2 * d).enumerate() {
        for (c, dst) in dst.chunks_exact_mut(16).enumerate() {
            dst[..8].copy_from_slice(&queries[2 * p].q[c * 8..][..8]);
            dst[8..].copy_from_slice(&queries[2 * p + 1].q[c * 8..][..8]);
        }
    }
    for b in (0..span).step_by(8) {
        let j0 = lo + b;
        // A block past the last key is read from zeros in `pad`: every key is computed alike.
        let rows: *const f32 = if j0 + 8 <= hi + 1 {
            k.as_ptr().add(j0 * d)
        } else {
            let n = hi + 1 - j0;
            pad[..n * d].copy_from_slice(&k[j0 * d..][..n * d]);
            pad[n * d..].fill(0.0);
            pad.as_ptr()
        };
        let out = scores.as_mut_ptr();
        let at = |i: usize, key: usize| out.add(i * span + b + key);
        for (p, pair) in interleaved.chunks_exact(2 * d).enumerate() {
            let [d0, d1] = dots8_pair_avx512(pair, rows, d);
            let scale = _mm256_set1_ps(shape.scale);
            _mm256_storeu_ps(at(2 * p, 0), _mm256_mul_ps(d0, scale));
            _mm256_storeu_ps(at(2 * p + 1, 0), _mm256_mul_ps(d1, scale));
        }
        // Without AVX-512, two queries at a time share each key load; a lone last query goes
        // by itself.
        let scale = _mm_set1_ps(shape.scale);
        let mut qi = 2 * pairs;
        while qi < queries.len() {
            let pair = qi + 1 < queries.len();
            for half in 0..2 {
                let keys = rows.add(half * 4 * d);
                if pair {
                    let [d0, d1] = dots4::<2>([queries[qi].q, queries[qi + 1].q], keys, d);
                    _mm_storeu_ps(at(qi, half * 4), _mm_mul_ps(d0, scale));
                    _mm_storeu_ps(at(qi + 1, half * 4), _mm_mul_ps(d1, scale));
                } else {
                    let [d0] = dots4::<1>([queries[qi].q], keys, d);
                    _mm_storeu_ps(at(qi, half * 4), _mm_mul_ps(d0, scale));
                }
            }
            qi += if pair { 2 } else { 1 };
        }
    }
    // Softmax weights per query, in place of its scores.
    let mut inv = Vec::with_capacity(queries.len());
    for (qi, query) in queries.iter().enumerate() {
        let first = first(query.at);
        let sc = &mut scores[qi * span..][..span];
        // Keys this query does not see get no weight: before its window, after itself.
        sc[..first - lo].fill(f32::NEG_INFINITY);
        sc[query.at + 1 - lo..].fill(f32::NEG_INFINITY);
        inv.push(1.0 / softmax_weights_avx2(sc));
    }
    // The weighted values, a block of keys at a time for all the queries, so a block of value
    // rows is read from memory once per task rather than once per query (all of a long
    // context's values per query ran at the cache's bandwidth, not the multiply-adds'). Each
    // output element still adds its terms one key after another from the first: the same
    // arithmetic, in the same order, as one query alone.
    sums.clear();
    sums.resize(queries.len() * d, 0.0);
    let wide = wide && d.is_multiple_of(64);
    for j0 in (lo..=hi).step_by(VALUE_BLOCK) {
        let range = |query: &Query| {
            (
                j0.max(first(query.at)),
                (j0 + VALUE_BLOCK).min(query.at + 1),
            )
        };
        let mut qi = 0;
        while qi < queries.len() {
            if wide && qi + 1 < queries.len() {
                // Two queries over the keys either sees: a key the other one does not see has
                // a zero weight in its scores, which adds nothing.
                let ((f0, t0), (f1, t1)) = (range(&queries[qi]), range(&queries[qi + 1]));
                let (from, to) = (f0.min(f1), t0.max(t1));
                if from < to {
                    let w0 = &scores[qi * span + from - lo..][..to - from];
                    let w1 = &scores[(qi + 1) * span + from - lo..][..to - from];
                    let acc = sums.as_mut_ptr().add(qi * d);
                    for c0 in (0..d).step_by(64) {
                        weighted_values_pair_avx512(
                            [w0, w1],
                            v.as_ptr().add(from * d + c0),
                            d,
                            [acc.add(c0), acc.add(d + c0)],
                        );
                    }
                }
                qi += 2;
                continue;
            }
            let (from, to) = range(&queries[qi]);
            if from < to {
                let weights = &scores[qi * span + from - lo..][..to - from];
                let vs = v.as_ptr().add(from * d);
                let acc = sums.as_mut_ptr().add(qi * d);
                for c0 in (0..d).step_by(64) {
                    let (vs, acc) = (vs.add(c0), acc.add(c0));
                    match (d - c0).min(64) / 8 {
                        8 => weighted_values::<8>(weights, vs, d, acc),
                        7 => weighted_values::<7>(weights, vs, d, acc),
                        6 => weighted_values::<6>(weights, vs, d, acc),
                        5 => weighted_values::<5>(weights, vs, d, acc),
                        4 => weighted_values::<4>(weights, vs, d, acc),
                        3 => weighted_values::<3>(weights, vs, d, acc),
                        2 => weighted_values::<2>(weights, vs, d, acc),
                        _ => weighted_values::<1>(weights, vs, d, acc),
                    }
                }
            }
            qi += 1;
        }
    }
    for ((query, inv), acc) in queries.into_iter().zip(inv).zip(sums.chunks_exact(d)) {
        for (o, a) in query.out.iter_mut().zip(acc) {
            *o = a * inv;
        }
    }
}

/// The dot products of `Q` queries with four keys (rows of `d` at `keys`): lane `l` of a
/// key's accumulator sums the dimensions `c ≡ l (mod 8)` in order, and the lanes are then
/// added as `((l0+l1)+(l2+l3)) + ((l4+l5)+(l6+l7))`, the same for every key and query.
///
/// # Safety
/// AVX2 and FMA available; `d` a multiple of 8; the queries and the four rows valid for `d`
/// floats.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn dots4<const Q: usize>(
    queries: [&[f32]; Q],
    keys: *const f32,
    d: usize,
) -> [std::arch::x86_64::__m128; Q] {
    use std::arch::x86_64::*;
    let mut acc = [[_mm256_setzero_ps(); 4]; Q];
    for c in (0..d).step_by(8) {
        let p = keys.add(c);
        let k = [
            _mm256_loadu_ps(p),
            _mm256_loadu_ps(p.add(d)),
            _mm256_loadu_ps(p.add(2 * d)),
            _mm256_loadu_ps(p.add(3 * d)),
        ];
        for i in 0..Q {
            let qv = _mm256_loadu_ps(queries[i].as_ptr().add(c));
            for r in 0..4 {
                acc[i][r] = _mm256_fmadd_ps(qv, k[r], acc[i][r]);
            }
        }
    }
    let mut out = [_mm_setzero_ps(); Q];
    for i in 0..Q {
        let [a0, a1, a2, a3] = acc[i];
        // [k0 l0..3, k1 l0..3, k2 l0..3, k3 l0..3 | the same of lanes 4..7]
        let t = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));
        out[i] = _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps::<1>(t));
    }
    out
}

/// [`dots4`] for two queries and eight keys with AVX-512: `pair` holds the queries
/// interleaved (eight dimensions of the first, the same eight of the second), and each key's
/// eight dimensions are broadcast to both halves, so one multiply-add serves both queries.
/// Each half's lanes sum the same terms in the same order as AVX2's, and are reduced as
/// [`dots4`] reduces them: the same bits.
///
/// # Safety
/// AVX2, FMA and AVX-512F available; `d` a multiple of 8; `pair` holds `2d` floats and
/// `keys` eight rows of `d`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,avx512f")]
unsafe fn dots8_pair_avx512(
    pair: &[f32],
    keys: *const f32,
    d: usize,
) -> [std::arch::x86_64::__m256; 2] {
    use std::arch::x86_64::*;
    let mut acc = [_mm512_setzero_ps(); 8];
    for c in (0..d).step_by(8) {
        let q = _mm512_loadu_ps(pair.as_ptr().add(2 * c));
        for (r, a) in acc.iter_mut().enumerate() {
            let k = _mm256_castps_pd(_mm256_loadu_ps(keys.add(r * d + c)));
            *a = _mm512_fmadd_ps(q, _mm512_castpd_ps(_mm512_broadcast_f64x4(k)), *a);
        }
    }
    let half = |x: __m512, upper: bool| -> __m256 {
        if upper {
            _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(x)))
        } else {
            _mm512_castps512_ps256(x)
        }
    };
    let reduce = |upper: bool| -> __m256 {
        let a: [__m256; 8] = [
            half(acc[0], upper),
            half(acc[1], upper),
            half(acc[2], upper),
            half(acc[3], upper),
            half(acc[4], upper),
            half(acc[5], upper),
            half(acc[6], upper),
            half(acc[7], upper),
        ];
        // Lane r of the result is key r's sum, reduced as `dots4` reduces it.
        let t0 = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
        let t1 = _mm256_hadd_ps(_mm256_hadd_ps(a[4], a[5]), _mm256_hadd_ps(a[6], a[7]));
        _mm256_add_ps(
            _mm256_permute2f128_ps::<0x20>(t0, t1),
            _mm256_permute2f128_ps::<0x31>(t0, t1),
        )
    };
    [reduce(false), reduce(true)]
}

/// Keys whose value rows the queries of a task go through together: 16 KiB of values at a
/// head dimension of 64, well inside the L1 cache beside the weights and the sums.
const VALUE_BLOCK: usize = 64;

/// `acc[..8W] += Σ_j weights[j] · v[j][..8W]` for the value rows `v[j]` at `vs + j·d`, the
/// terms added one after another. The width is a constant so the W accumulators stay in
/// registers (a slice of a fixed array kept them in memory: a load and a store around every
/// multiply-add).
///
/// # Safety
/// AVX2 and FMA available; `vs` valid for `weights.len()` rows of `d` floats from which `8W`
/// are read; `acc` valid for `8W` reads and writes.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn weighted_values<const W: usize>(
    weights: &[f32],
    vs: *const f32,
    d: usize,
    acc: *mut f32,
) {
    use std::arch::x86_64::*;
    let mut a: [__m256; W] = std::array::from_fn(|u| _mm256_loadu_ps(acc.add(u * 8)));
    // A weight that underflowed to zero adds nothing (`0·v + a = a` for a finite `v`): no
    // test and branch per key.
    for (j, &p) in weights.iter().enumerate() {
        let pv = _mm256_set1_ps(p);
        let vr = vs.add(j * d);
        for (u, a) in a.iter_mut().enumerate() {
            *a = _mm256_fmadd_ps(pv, _mm256_loadu_ps(vr.add(u * 8)), *a);
        }
    }
    for (u, a) in a.iter().enumerate() {
        _mm256_storeu_ps(acc.add(u * 8), *a);
    }
}

/// [`weighted_values`] for two queries and 64 dimensions with AVX-512: each value row is
/// loaded once for both, and eight independent sums keep both FMA units busy where one
/// query's four (or AVX2's eight, each waiting on its last multiply-add) cannot. Every
/// element adds the same terms in the same order as the AVX2 kernel, so the bits are the same.
///
/// # Safety
/// AVX-512F available; `vs` valid for `weights[0].len()` rows of `d` floats from which 64 are
/// read; both weight slices of the same length; each `acc` valid for 64 reads and writes.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn weighted_values_pair_avx512(
    weights: [&[f32]; 2],
    vs: *const f32,
    d: usize,
    acc: [*mut f32; 2],
) {
    use std::arch::x86_64::*;
    let [a, b] = acc;
    let (mut a0, mut a1, mut a2, mut a3) = (
        _mm512_loadu_ps(a),
        _mm512_loadu_ps(a.add(16)),
        _mm512_loadu_ps(a.add(32)),
        _mm512_loadu_ps(a.add(48)),
    );
    let (mut b0, mut b1, mut b2, mut b3) = (
        _mm512_loadu_ps(b),
        _mm512_loadu_ps(b.add(16)),
        _mm512_loadu_ps(b.add(32)),
        _mm512_loadu_ps(b.add(48)),
    );
    for (j, (&p, &q)) in weights[0].iter().zip(weights[1]).enumerate() {
        let vr = vs.add(j * d);
        let (v0, v1, v2, v3) = (
            _mm512_loadu_ps(vr),
            _mm512_loadu_ps(vr.add(16)),
            _mm512_loadu_ps(vr.add(32)),
            _mm512_loadu_ps(vr.add(48)),
        );
        let (p, q) = (_mm512_set1_ps(p), _mm512_set1_ps(q));
        a0 = _mm512_fmadd_ps(p, v0, a0);
        a1 = _mm512_fmadd_ps(p, v1, a1);
        a2 = _mm512_fmadd_ps(p, v2, a2);
        a3 = _mm512_fmadd_ps(p, v3, a3);
        b0 = _mm512_fmadd_ps(q, v0, b0);
        b1 = _mm512_fmadd_ps(q, v1, b1);
        b2 = _mm512_fmadd_ps(q, v2, b2);
        b3 = _mm512_fmadd_ps(q, v3, b3);
    }
    _mm512_storeu_ps(a, a0);
    _mm512_storeu_ps(a.add(16), a1);
    _mm512_storeu_ps(a.add(32), a2);
    _mm512_storeu_ps(a.add(48), a3);
    _mm512_storeu_ps(b, b0);
    _mm512_storeu_ps(b.add(16), b1);
    _mm512_storeu_ps(b.add(32), b2);
    _mm512_storeu_ps(b.add(48), b3);
}

/// [`softmax_weights`] eight scores at a time (`scores.len()` a multiple of 8), with a
/// polynomial `exp` (Cephes' `expf`, within 2 ulp): the same bits for a score wherever it
/// sits, and the sum in a fixed order for a given length.
///
/// # Safety
/// AVX2 and FMA must be available.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn softmax_weights_avx2(scores: &mut [f32]) -> f32 {
    use std::arch::x86_64::*;
    let p = scores.as_mut_ptr();
    let blocks = scores.len() / 8;
    let mut m = _mm256_set1_ps(f32::NEG_INFINITY);
    for b in 0..blocks {
        m = _mm256_max_ps(m, _mm256_loadu_ps(p.add(b * 8)));
    }
    let mut lanes = [0f32; 8];
    _mm256_storeu_ps(lanes.as_mut_ptr(), m);
    let max = lanes.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let (maxv, floor) = (_mm256_set1_ps(max), _mm256_set1_ps(NEGLIGIBLE));
    let mut sum = _mm256_setzero_ps();
    for b in 0..blocks {
        let x = _mm256_sub_ps(_mm256_loadu_ps(p.add(b * 8)), maxv);
        // Not below the floor: a NaN is kept, and reaches the output for the model's check.
        let keep = _mm256_cmp_ps::<_CMP_NLT_UQ>(x, floor);
        let e = _mm256_and_ps(exp_avx2(_mm256_max_ps(floor, x)), keep);
        _mm256_storeu_ps(p.add(b * 8), e);
        sum = _mm256_add_ps(sum, e);
    }
    _mm256_storeu_ps(lanes.as_mut_ptr(), sum);
    ((lanes[0] + lanes[4]) + (lanes[1] + lanes[5]))
        + ((lanes[2] + lanes[6]) + (lanes[3] + lanes[7]))
}

/// Turns scores into unnormalised softmax weights in place; returns their sum.
#[inline(always)]
fn softmax_weights(scores: &mut [f32]) -> f32 {
    let mut max = f32::NEG_INFINITY;
    for &s in scores.iter() {
        max = max.max(s);
    }
    let mut sum = 0f32;
    for s in scores.iter_mut() {
        // A key this far below the best weighs under 1e-26 of it: zero, not a subnormal
        // `exp`, whose products would run at a fraction of the speed.
        *s = if *s - max < NEGLIGIBLE {
            0.0
        } else {
            (*s - max).exp()
        };
        sum += *s;
    }
    sum
}

/// One query row at position `at` over one kv head's `k`, `v` (`[positions][head_dim]`),
/// portable.
fn row(
    shape: &AttentionShape,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    at: usize,
    scores: &mut Vec<f32>,
    out: &mut [f32],
) {
    let d = shape.head_dim;
    let first = shape.window.map_or(0, |w| (at + 1).saturating_sub(w));
    scores.clear();
    for j in first..=at {
        let krow = &k[j * d..][..d];
        let mut dot = 0f32;
        for c in 0..d {
            dot += q[c] * krow[c];
        }
        scores.push(dot * shape.scale);
    }
    let sum = softmax_weights(scores);
    out.fill(0.0);
    for (jj, &p) in scores.iter().enumerate() {
        let vrow = &v[(first + jj) * d..][..d];
        for c in 0..d {
            out[c] += p * vrow[c];
        }
    }
    let inv = 1.0 / sum;
    for o in out.iter_mut() {
        *o *= inv;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reference(shape: &AttentionShape, q: &[f32], n: usize, pos: usize, kv: &KvView) -> Vec<f32> {
        let (heads, d) = (shape.heads, shape.head_dim);
        let group = heads / shape.kv_heads;
        let mut out = vec![0f32; n * heads * d];
        for i in 0..n {
            for h in 0..heads {
                let at = pos + i;
                let first = shape.window.map_or(0, |w| (at + 1).saturating_sub(w));
                let base = (h / group) * kv.head_stride * d;
                let qrow = &q[(h * n + i) * d..][..d];
                let s: Vec<f64> = (first..=at)
                    .map(|j| {
                        let krow = &kv.k[base + j * d..][..d];
                        qrow.iter()
                            .zip(krow)
                            .map(|(a, b)| (*a as f64) * (*b as f64))
                            .sum::<f64>()
                            * shape.scale as f64
                    })
                    .collect();
                let m = s.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = s.iter().map(|x| (x - m).exp()).collect();
                let sum: f64 = e.iter().sum();
                for c in 0..d {
                    let o: f64 = e
                        .iter()
                        .zip(first..=at)
                        .map(|(p, j)| p * kv.v[base + j * d + c] as f64)
                        .sum();
                    out[(i * heads + h) * d + c] = (o / sum) as f32;
                }
            }
        }
        out
    }

    fn random(n: usize, seed: u64) -> Vec<f32> {
        let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
            })
            .collect()
    }

    /// Two queries' weighted values through AVX-512 have the bits of each through AVX2, zero
    /// weights (a key one of the pair does not see) included: a machine without AVX-512
    /// replays the same numbers.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn paired_wide_values_give_the_avx2_bits() {
        if !(crate::has_avx2() && crate::has_avx512()) {
            return;
        }
        let (d, keys) = (128, 37);
        let v = random(keys * d, 4);
        let mut w0 = random(keys, 5);
        let mut w1 = random(keys, 6);
        w0[..5].fill(0.0);
        w1[30..].fill(0.0);
        let start0 = random(d, 7);
        let start1 = random(d, 8);
        let (mut wide0, mut wide1) = (start0.clone(), start1.clone());
        let (mut narrow0, mut narrow1) = (start0, start1);
        for c0 in (0..d).step_by(64) {
            // SAFETY: AVX2, FMA and AVX-512F were detected; every pointer covers 64 floats of
            // `keys` rows of `d`.
            unsafe {
                let vs = v.as_ptr().add(c0);
                weighted_values_pair_avx512(
                    [&w0, &w1],
                    vs,
                    d,
                    [wide0.as_mut_ptr().add(c0), wide1.as_mut_ptr().add(c0)],
                );
                weighted_values::<8>(&w0, vs, d, narrow0.as_mut_ptr().add(c0));
                weighted_values::<8>(&w1, vs, d, narrow1.as_mut_ptr().add(c0));
            }
        }
        let bits = |x: &[f32]| x.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&wide0), bits(&narrow0));
        assert_eq!(bits(&wide1), bits(&narrow1));
    }

    /// Equal to f64 attention, and every row has the same bits whether it is evaluated alone
    /// or with others (the property a resumed prompt needs).
    #[test]
    fn rows_match_f64_attention_and_do_not_depend_on_the_row_count() {
        for (heads, kv_heads, d, window) in [(9, 3, 64, None), (4, 1, 80, Some(5)), (2, 2, 7, None)]
        {
            let shape = AttentionShape {
                heads,
                kv_heads,
                head_dim: d,
                scale: 1.0 / (d as f32).sqrt(),
                window,
            };
            let (stride, len, pos, n) = (340, 300, 288, 12);
            let k = random(kv_heads * stride * d, 1);
            let v = random(kv_heads * stride * d, 2);
            let kv = KvView {
                k: &k,
                v: &v,
                head_stride: stride,
                len,
            };
            let q = random(heads * n * d, 3);
            let pool = KernelPool::global();
            let mut all = vec![0f32; n * heads * d];
            causal_attention(pool, &shape, &q, n, pos, &kv, &mut all);
            let want = reference(&shape, &q, n, pos, &kv);
            for (a, b) in all.iter().zip(&want) {
                assert!((a - b).abs() < 1e-5, "{a} vs {b} ({shape:?})");
            }
            for i in 0..n {
                let q1: Vec<f32> = (0..heads)
                    .flat_map(|h| q[(h * n + i) * d..][..d].to_vec())
                    .collect();
                let mut one = vec![0f32; heads * d];
                causal_attention(pool, &shape, &q1, 1, pos + i, &kv, &mut one);
                assert_eq!(
                    one.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
                    all[i * heads * d..][..heads * d]
                        .iter()
                        .map(|x| x.to_bits())
                        .collect::<Vec<_>>(),
                    "row {i} alone differs ({shape:?})"
                );
            }
        }
    }
}
