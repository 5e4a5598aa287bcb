//! AVX2 + FMA + F16C kernels (ggml-cpu `arch/x86/quants.c` logic).
//!
//! # Safety
//! Every public function here is `unsafe`: callers must have checked [`super::has_avx2`], and
//! pointer arguments must be valid for `nb` blocks (row pointers, activation pointers, `yd`).
#![allow(
    clippy::missing_safety_doc,
    clippy::too_many_arguments,
    clippy::needless_range_loop
)]

use super::blocks::*;
use std::arch::x86_64::*;
use std::ptr::{addr_of, read_unaligned};

/// Loop-invariant constants, hoisted by the caller.
#[derive(Clone, Copy)]
struct Consts {
    low4: __m256i,
    ones16: __m256i,
    eight: __m256i,
    hi_f0: __m256i,
}

impl Consts {
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn new() -> Self {
        Self {
            low4: _mm256_set1_epi8(0x0F),
            ones16: _mm256_set1_epi16(1),
            eight: _mm256_set1_epi8(8),
            hi_f0: _mm256_set1_epi8(0xF0u8 as i8),
        }
    }
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn hsum_f32_8(x: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_extractf128_ps::<1>(x), _mm256_castps256_ps128(x));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_movehdup_ps(s));
    _mm_cvtss_f32(s)
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn hsum_i32_8(x: __m256i) -> i32 {
    let s = _mm_add_epi32(_mm256_extracti128_si256::<1>(x), _mm256_castsi256_si128(x));
    let s = _mm_add_epi32(s, _mm_unpackhi_epi64(s, s));
    let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b01>(s));
    _mm_cvtsi128_si32(s)
}

/// Two consecutive f16 at `p` -> lanes 0,1 of an f32x4 (lanes 2,3 zero).
macro_rules! ld_f16x2 {
    ($p:expr) => {
        _mm_cvtph_ps(_mm_cvtsi32_si128(read_unaligned($p as *const i32)))
    };
}
/// One f16 at `p` -> lane 0 of an f32x4.
macro_rules! ld_f16 {
    ($p:expr) => {
        _mm_cvtph_ps(_mm_cvtsi32_si128(read_unaligned($p as *const u16) as i32))
    };
}
/// ggml bytes_from_nibbles_32: 16 bytes -> 32 bytes of 4-bit values (low nibbles first).
macro_rules! nibbles {
    ($p:expr, $c:expr) => {{
        let t = _mm_loadu_si128($p as *const __m128i);
        _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16::<4>(t), t), $c.low4)
    }};
}
/// ggml bytes_from_bits_32: bit j of the u32 at `p` -> byte j = 0xFF / 0x00.
macro_rules! bytes_from_bits {
    ($p:expr) => {{
        let x32 = read_unaligned($p as *const i32);
        let shuf = _mm256_set_epi64x(
            0x0303030303030303,
            0x0202020202020202,
            0x0101010101010101,
            0x0000000000000000,
        );
        let bytes = _mm256_shuffle_epi8(_mm256_set1_epi32(x32), shuf);
        let bytes = _mm256_or_si256(bytes, _mm256_set1_epi64x(0x7fbfdfeff7fbfdfe));
        _mm256_cmpeq_epi8(bytes, _mm256_set1_epi64x(-1))
    }};
}
/// unsigned x signed byte pairs -> 8 f32 partial sums (ggml mul_sum_us8_pairs_float).
macro_rules! mul_us8 {
    ($ax:expr, $sy:expr, $c:expr) => {
        _mm256_cvtepi32_ps(_mm256_madd_epi16(_mm256_maddubs_epi16($ax, $sy), $c.ones16))
    };
}
/// signed x signed byte pairs -> 8 f32 partial sums (ggml mul_sum_i8_pairs_float).
macro_rules! mul_i8 {
    ($x:expr, $y:expr, $c:expr) => {{
        let x = $x;
        mul_us8!(_mm256_sign_epi8(x, x), _mm256_sign_epi8($y, x), $c)
    }};
}

/// `acc` + the sums of four unsigned x signed byte products per i32 lane (exact: the pairs
/// stay far from `maddubs`' i16 saturation for 4-bit weights).
macro_rules! dot_u8i8 {
    ($acc:expr, $u:expr, $s:expr, $c:expr) => {
        _mm256_add_epi32(
            $acc,
            _mm256_madd_epi16(_mm256_maddubs_epi16($u, $s), $c.ones16),
        )
    };
}

/// `acc` + the sums of four signed x signed byte products per i32 lane, as ggml does it on
/// AVX2: |x| times y with x's sign (pairs of products stay below the i16 saturation).
macro_rules! dot_s8s8 {
    ($acc:expr, $x:expr, $y:expr, $c:expr) => {{
        let x = $x;
        dot_u8i8!($acc, _mm256_sign_epi8(x, x), _mm256_sign_epi8($y, x), $c)
    }};
}
/// What [`dot_s8s8`] adds to each lane per unit of `Σ y` (nothing: it is exact as it is).
const S8_OFFSET: i32 = 0;

// Per-format loaders: (quants as bytes, scale vector [d, m?, 0, 0]).
macro_rules! load_q4_0 {
    ($xb:expr, $c:expr) => {
        (
            _mm256_sub_epi8(nibbles!(addr_of!((*$xb).qs), $c), $c.eight),
            ld_f16!(addr_of!((*$xb).d)),
        )
    };
}
macro_rules! load_q4_1 {
    ($xb:expr, $c:expr) => {
        (
            nibbles!(addr_of!((*$xb).qs), $c),
            ld_f16x2!(addr_of!((*$xb).d)),
        )
    };
}
macro_rules! load_q5_0 {
    ($xb:expr, $c:expr) => {{
        let hi = _mm256_andnot_si256(bytes_from_bits!(addr_of!((*$xb).qh)), $c.hi_f0);
        (
            _mm256_or_si256(nibbles!(addr_of!((*$xb).qs), $c), hi),
            ld_f16!(addr_of!((*$xb).d)),
        )
    }};
}
macro_rules! load_q8_0 {
    ($xb:expr, $c:expr) => {
        (
            _mm256_loadu_si256(addr_of!((*$xb).qs) as *const __m256i),
            ld_f16!(addr_of!((*$xb).d)),
        )
    };
}
macro_rules! yscale_q8_0 {
    ($yb:expr) => {
        ld_f16!(addr_of!((*$yb).d))
    };
}
macro_rules! yscale_q8_1 {
    ($yb:expr) => {
        ld_f16x2!(addr_of!((*$yb).d))
    };
}

/// Software-prefetch distance (bytes) along the weight stream. A tile of R rows is one
/// contiguous byte range, so the matvec reads the matrix linearly; the hardware prefetchers
/// do not follow the R interleaved row streams well (measured: Q8_0 cold 4.7 -> 13 GB/s on
/// one thread, Zen 3).
pub const PF_DIST: usize = 4096;

/// Prefetches the `len` bytes at `offset + PF_DIST` of the weight stream starting at `base`,
/// one cache line at a time (a hint: addresses past the end are never dereferenced).
#[inline(always)]
unsafe fn prefetch_ahead(base: *const u8, offset: usize, len: usize) {
    if PF_DIST == 0 {
        return;
    }
    let p = base.wrapping_add(PF_DIST + offset);
    let mut k = 0;
    while k < len {
        _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(k) as *const i8);
        k += 64;
    }
}

/// Generates, per format pair:
/// * `$fn1(x, y) -> f32`: one row (ggml `ggml_vec_dot_*`),
/// * `$fnr::<R>(rows, y, nb, out)`: R weight rows against one activation row; the activation
///   block is loaded once per R rows and the R accumulator chains run in parallel,
/// * `$fnt::<R, C>(..)`: R weight rows × C activation rows (small-batch matmul).
///
/// With `$mterm`, lane 1 of `dx * dy` is `m * s` (Q4_1 x Q8_1) and is accumulated separately.
macro_rules! dot_kernel {
    ($tf:literal, $fn1:ident, $fnr:ident, $fnt:ident, $X:ty, $Y:ty, $load:ident, $yscale:ident, $mul:ident, $signed:literal, $mterm:literal) => {
        /// R weight rows × C activation rows (small-batch matmul): each weight block is
        /// unpacked once per C activations, each activation block loaded once per R rows.
        /// `yd[j]` = the f32 scales of activation j (nb values). With `$mterm`, `ys` points to
        /// `s` of activation 0 for block 0, stride `ys_stride` floats per block, at least 8
        /// readable floats per block (zero padded): `m·s` is accumulated with activations in lanes.
        #[target_feature(enable = $tf)]
        pub unsafe fn $fnt<const R: usize, const C: usize>(
            x: [*const $X; R],
            y: [*const $Y; C],
            yd: [*const f32; C],
            ys: *const f32,
            ys_stride: usize,
            nb: usize,
            out: &mut [[f32; R]; C],
        ) {
            let c = Consts::new();
            let mut acc = [[_mm256_setzero_ps(); R]; C];
            let mut accm = [_mm256_setzero_ps(); R];
            let pf = x[0] as *const u8;
            let step = R * std::mem::size_of::<$X>();
            let lane1 = _mm256_set1_epi32(1);
            for b in 0..nb {
                prefetch_ahead(pf, b * step, step);
                let mut ax = [_mm256_setzero_si256(); R];
                let mut sx = [_mm256_setzero_si256(); R];
                let mut dx = [_mm256_setzero_ps(); R];
                for r in 0..R {
                    let (q, d) = $load!(x[r].add(b), c);
                    if $signed {
                        ax[r] = _mm256_sign_epi8(q, q);
                        sx[r] = q;
                    } else {
                        ax[r] = q;
                    }
                    dx[r] = _mm256_broadcastss_ps(d);
                    if $mterm {
                        let m = _mm256_permutevar8x32_ps(_mm256_castps128_ps256(d), lane1);
                        accm[r] =
                            _mm256_fmadd_ps(m, _mm256_loadu_ps(ys.add(b * ys_stride)), accm[r]);
                    }
                }
                for j in 0..C {
                    let qy = _mm256_loadu_si256(addr_of!((*y[j].add(b)).qs) as *const __m256i);
                    let dy = _mm256_broadcast_ss(&*yd[j].add(b));
                    for r in 0..R {
                        let sy = if $signed {
                            _mm256_sign_epi8(qy, sx[r])
                        } else {
                            qy
                        };
                        let p = mul_us8!(ax[r], sy, c);
                        acc[j][r] = _mm256_fmadd_ps(_mm256_mul_ps(dx[r], dy), p, acc[j][r]);
                    }
                }
            }
            for r in 0..R {
                let mut ms = [0f32; 8];
                _mm256_storeu_ps(ms.as_mut_ptr(), accm[r]);
                for j in 0..C {
                    out[j][r] = hsum_f32_8(acc[j][r]) + if $mterm { ms[j] } else { 0.0 };
                }
            }
        }

        #[target_feature(enable = $tf)]
        pub unsafe fn $fn1(x: &[$X], y: &[$Y]) -> f32 {
            assert_eq!(x.len(), y.len());
            let mut out = [0f32; 1];
            $fnr::<1>([x.as_ptr()], y.as_ptr(), x.len(), &mut out);
            out[0]
        }

        #[target_feature(enable = $tf)]
        pub unsafe fn $fnr<const R: usize>(
            x: [*const $X; R],
            y: *const $Y,
            nb: usize,
            out: &mut [f32; R],
        ) {
            let c = Consts::new();
            let mut acc = [_mm256_setzero_ps(); R];
            let mut accm = [_mm_setzero_ps(); R];
            let pf = x[0] as *const u8;
            let step = R * std::mem::size_of::<$X>();
            for b in 0..nb {
                // Rows r..r+R are contiguous: prefetch the linear stream PF_DIST ahead.
                prefetch_ahead(pf, b * step, step);
                let yb = y.add(b);
                let qy = _mm256_loadu_si256(addr_of!((*yb).qs) as *const __m256i);
                let dy = $yscale!(yb);
                for r in 0..R {
                    let xb = x[r].add(b);
                    let (qx, dx) = $load!(xb, c);
                    let dd = _mm_mul_ps(dx, dy);
                    if $mterm {
                        accm[r] = _mm_add_ps(accm[r], dd);
                    }
                    let p = $mul!(qx, qy, c);
                    acc[r] = _mm256_fmadd_ps(_mm256_broadcastss_ps(dd), p, acc[r]);
                }
            }
            for r in 0..R {
                let mut s = hsum_f32_8(acc[r]);
                if $mterm {
                    s += _mm_cvtss_f32(_mm_movehdup_ps(accm[r]));
                }
                out[r] = s;
            }
        }
    };
}

/// The legacy formats' kernels, compiled for the target features `$tf`.
macro_rules! legacy_kernels {
    ($tf:literal) => {
        dot_kernel!(
            $tf,
            vec_dot_q4_0_q8_0,
            dot_rows_q4_0_q8_0,
            dot_tile_q4_0_q8_0,
            BlockQ4_0,
            BlockQ8_0,
            load_q4_0,
            yscale_q8_0,
            mul_i8,
            true,
            false
        );
        dot_kernel!(
            $tf,
            vec_dot_q4_1_q8_1,
            dot_rows_q4_1_q8_1,
            dot_tile_q4_1_q8_1,
            BlockQ4_1,
            BlockQ8_1,
            load_q4_1,
            yscale_q8_1,
            mul_us8,
            false,
            true
        );
        dot_kernel!(
            $tf,
            vec_dot_q5_0_q8_0,
            dot_rows_q5_0_q8_0,
            dot_tile_q5_0_q8_0,
            BlockQ5_0,
            BlockQ8_0,
            load_q5_0,
            yscale_q8_0,
            mul_i8,
            true,
            false
        );
        dot_kernel!(
            $tf,
            vec_dot_q8_0_q8_0,
            dot_rows_q8_0_q8_0,
            dot_tile_q8_0_q8_0,
            BlockQ8_0,
            BlockQ8_0,
            load_q8_0,
            yscale_q8_0,
            mul_i8,
            true,
            false
        );
        /// Eight interleaved Q4_1 rows ([`NibblesX8`]) × C Q8_1 activation rows:
        /// `out[j][i] = dot(row i, act j)`. Per block, each row's integer sum is exact in its
        /// i32 lane; then `acc += d·dy · sum` and `acc += m · s`, in that order, for every C,
        /// so a row's bits do not depend on the batch.
        #[target_feature(enable = $tf)]
        pub unsafe fn tile_q4_1x8<const C: usize>(
            w: *const NibblesX8,
            y: [*const BlockQ8_1; C],
            nb: usize,
            out: &mut [[f32; 8]; C],
        ) {
            let c = Consts::new();
            let mut acc = [_mm256_setzero_ps(); C];
            let step = std::mem::size_of::<NibblesX8>();
            for b in 0..nb {
                let wb = w.add(b);
                prefetch_ahead(w as *const u8, b * step, step);
                let mut sum = [_mm256_setzero_si256(); C];
                for g in 0..QK / 4 {
                    let t = _mm_loadu_si128(addr_of!((*wb).qs).cast::<u8>().add(16 * g).cast());
                    let q = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16::<4>(t), t), c.low4);
                    for j in 0..C {
                        let y4 = read_unaligned(
                            addr_of!((*y[j].add(b)).qs)
                                .cast::<u8>()
                                .add(4 * g)
                                .cast::<i32>(),
                        );
                        sum[j] = dot_u8i8!(sum[j], q, _mm256_set1_epi32(y4), c);
                    }
                }
                let d = _mm256_cvtph_ps(_mm_loadu_si128(addr_of!((*wb).d).cast()));
                let m = _mm256_cvtph_ps(_mm_loadu_si128(addr_of!((*wb).m).cast()));
                for j in 0..C {
                    let ds = _mm_cvtph_ps(_mm_cvtsi32_si128(read_unaligned(
                        addr_of!((*y[j].add(b)).d).cast::<i32>(),
                    )));
                    let dy = _mm256_broadcastss_ps(ds);
                    let sy =
                        _mm256_permutevar8x32_ps(_mm256_castps128_ps256(ds), _mm256_set1_epi32(1));
                    acc[j] =
                        _mm256_fmadd_ps(_mm256_mul_ps(d, dy), _mm256_cvtepi32_ps(sum[j]), acc[j]);
                    acc[j] = _mm256_fmadd_ps(m, sy, acc[j]);
                }
            }
            for j in 0..C {
                _mm256_storeu_ps(out[j].as_mut_ptr(), acc[j]);
            }
        }

        /// Eight interleaved byte rows ([`BytesX8`]: Q5_0 unsigned with `OFFSET` 16, Q8_0
        /// `SIGNED`) × C Q8_0 activation rows, `ysum[j]` holding activation j's per-block sums
        /// of quants: `out[j][i] = dot(row i, act j)`. Per block each row's integer sum is exact
        /// in its lane (an offset comes off as `offset · Σ y`), then `acc += d·dy · sum`.
        #[target_feature(enable = $tf)]
        pub unsafe fn tile_bytes_x8<const C: usize, const SIGNED: bool, const OFFSET: i32>(
            w: *const BytesX8,
            y: [*const BlockQ8_0; C],
            ysum: [*const i32; C],
            nb: usize,
            out: &mut [[f32; 8]; C],
        ) {
            let c = Consts::new();
            let mut acc = [_mm256_setzero_ps(); C];
            let step = std::mem::size_of::<BytesX8>();
            let offset = if SIGNED { S8_OFFSET } else { OFFSET };
            for b in 0..nb {
                let wb = w.add(b);
                prefetch_ahead(w as *const u8, b * step, step);
                let mut sum = [_mm256_setzero_si256(); C];
                for g in 0..QK / 4 {
                    let q = _mm256_loadu_si256(addr_of!((*wb).qs).cast::<u8>().add(32 * g).cast());
                    for j in 0..C {
                        let y4 = read_unaligned(
                            addr_of!((*y[j].add(b)).qs)
                                .cast::<u8>()
                                .add(4 * g)
                                .cast::<i32>(),
                        );
                        let yb = _mm256_set1_epi32(y4);
                        sum[j] = if SIGNED {
                            dot_s8s8!(sum[j], q, yb, c)
                        } else {
                            dot_u8i8!(sum[j], q, yb, c)
                        };
                    }
                }
                let d = _mm256_cvtph_ps(_mm_loadu_si128(addr_of!((*wb).d).cast()));
                for j in 0..C {
                    if offset != 0 {
                        sum[j] =
                            _mm256_sub_epi32(sum[j], _mm256_set1_epi32(offset * *ysum[j].add(b)));
                    }
                    let dy = _mm256_set1_ps(_mm_cvtss_f32(ld_f16!(addr_of!((*y[j].add(b)).d))));
                    acc[j] =
                        _mm256_fmadd_ps(_mm256_mul_ps(d, dy), _mm256_cvtepi32_ps(sum[j]), acc[j]);
                }
            }
            for j in 0..C {
                _mm256_storeu_ps(out[j].as_mut_ptr(), acc[j]);
            }
        }
    };
}
legacy_kernels!("avx2,fma,f16c");

/// The same kernels with AVX-VNNI (Intel Alder Lake / Sapphire Rapids and later, AMD Zen 5):
/// `vpdpbusd` does `maddubs` + `madd` in one instruction. The i32 lanes hold the same exact
/// sums as on AVX2 (no pair of byte products reaches the i16 saturation ggml's formats avoid),
/// so every result has the same bits.
pub mod vnni {
    use super::*;

    /// unsigned x signed byte quads -> 8 f32 partial sums (ggml mul_sum_us8_pairs_float, VNNI).
    macro_rules! dot_u8i8 {
        ($acc:expr, $u:expr, $s:expr, $c:expr) => {{
            let _ = &$c; // the AVX2 version's constants: not needed here
            _mm256_dpbusd_avx_epi32($acc, $u, $s)
        }};
    }

    /// Signed x signed through `vpdpbusd`: x + 128 is unsigned, so each lane gains
    /// `128 · Σ y` ([`S8_OFFSET`]), which the caller takes off the block's exact sum.
    macro_rules! dot_s8s8 {
        ($acc:expr, $x:expr, $y:expr, $c:expr) => {{
            let _ = &$c;
            _mm256_dpbusd_avx_epi32($acc, _mm256_xor_si256($x, _mm256_set1_epi8(-128)), $y)
        }};
    }
    /// See [`dot_s8s8`].
    const S8_OFFSET: i32 = 128;

    macro_rules! mul_us8 {
        ($ax:expr, $sy:expr, $c:expr) => {{
            let _ = $c; // the AVX2 version's constants: not needed here
            _mm256_cvtepi32_ps(_mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), $ax, $sy))
        }};
    }

    legacy_kernels!("avx2,fma,f16c,avxvnni");
}

/// One block of 32 floats -> 32 i8 (ggml x86 quantize_row_q8_0/q8_1). Returns (d, sum(q)).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q8_block(x: *const f32, qs: *mut i8) -> (f32, i32) {
    let v0 = _mm256_loadu_ps(x);
    let v1 = _mm256_loadu_ps(x.add(8));
    let v2 = _mm256_loadu_ps(x.add(16));
    let v3 = _mm256_loadu_ps(x.add(24));
    let sign = _mm256_set1_ps(-0.0);
    let mut ma = _mm256_andnot_ps(sign, v0);
    ma = _mm256_max_ps(ma, _mm256_andnot_ps(sign, v1));
    ma = _mm256_max_ps(ma, _mm256_andnot_ps(sign, v2));
    ma = _mm256_max_ps(ma, _mm256_andnot_ps(sign, v3));
    let mut m4 = _mm_max_ps(_mm256_extractf128_ps::<1>(ma), _mm256_castps256_ps128(ma));
    m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
    let amax = _mm_cvtss_f32(m4);
    let d = amax / 127.0;
    let id = _mm256_set1_ps(if amax != 0.0 { 127.0 / amax } else { 0.0 });
    const RN: i32 = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
    let i0 = _mm256_cvtps_epi32(_mm256_round_ps::<RN>(_mm256_mul_ps(v0, id)));
    let i1 = _mm256_cvtps_epi32(_mm256_round_ps::<RN>(_mm256_mul_ps(v1, id)));
    let i2 = _mm256_cvtps_epi32(_mm256_round_ps::<RN>(_mm256_mul_ps(v2, id)));
    let i3 = _mm256_cvtps_epi32(_mm256_round_ps::<RN>(_mm256_mul_ps(v3, id)));
    let sum = hsum_i32_8(_mm256_add_epi32(
        _mm256_add_epi32(i0, i1),
        _mm256_add_epi32(i2, i3),
    ));
    let a = _mm256_packs_epi32(i0, i1);
    let b = _mm256_packs_epi32(i2, i3);
    let q = _mm256_packs_epi16(a, b);
    let q = _mm256_permutevar8x32_epi32(q, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
    _mm256_storeu_si256(qs as *mut __m256i, q);
    (d, sum)
}

#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn quantize_row_q8_0(xs: &[f32], ys: &mut [BlockQ8_0]) {
    assert_eq!(xs.len(), ys.len() * QK);
    for (i, y) in ys.iter_mut().enumerate() {
        let (d, _) = q8_block(xs.as_ptr().add(i * QK), y.qs.as_mut_ptr());
        y.d = half::f16::from_f32(d);
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn quantize_row_q8_1(xs: &[f32], ys: &mut [BlockQ8_1]) {
    assert_eq!(xs.len(), ys.len() * QK);
    for (i, y) in ys.iter_mut().enumerate() {
        let (d, sum) = q8_block(xs.as_ptr().add(i * QK), y.qs.as_mut_ptr());
        y.d = half::f16::from_f32(d);
        y.s = half::f16::from_f32(d * sum as f32);
    }
}

// ---------------------------------------------------------------------------------------------
// k-quants × Q8_K (ggml `ggml_vec_dot_q4_K_q8_K` / `ggml_vec_dot_q6_K_q8_K`, AVX2).
// ---------------------------------------------------------------------------------------------

/// Per-block scales of a k-quant weight block, unpacked once per block and row.
#[derive(Clone, Copy)]
pub struct KScales {
    /// Format-specific packed sub-block scales (see [`KQuant::scale`]).
    packed: __m256i,
    /// i16 per 16-element group g: the offset subtracted as `Σ_g mins[g] · bsums[g]`.
    mins: __m256i,
    d: f32,
    dmin: f32,
}

/// A k-quant weight block in the form the Q8_K kernel consumes. With `q_k` the 32 unsigned
/// quants of elements 32k..32k+32 and `y_k` the activation quants,
/// `Σ w·y = d·dy·Σ_k madd(scale(k), maddubs(q_k, y_k)) − dmin·dy·madd(mins, bsums)`:
/// Q4_K's minimums and Q6_K's offset of 32 both ride on the activation's `bsums`, so the
/// quants stay unsigned for `maddubs` (at most 63·127·2 < 2¹⁵) and the inner loop is the same.
pub trait KQuant: Pod {
    /// The offset is scaled by `d` too (Q6_K), so it is subtracted from the exact integer
    /// sum (as ggml does) instead of being accumulated with its own `dmin` (Q4_K).
    const OFFSET_BY_D: bool;
    unsafe fn scales(b: *const Self) -> KScales;
    /// i16 factor for each lane of `maddubs(quants(b, k), y_k)` (lanes 0..8 cover elements
    /// 32k..32k+16, lanes 8..16 the next 16).
    unsafe fn scale(s: &KScales, k: usize) -> __m256i;
    unsafe fn quants(b: *const Self, k: usize) -> __m256i;
}

impl KQuant for BlockQ4K {
    const OFFSET_BY_D: bool = false;
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn scales(b: *const Self) -> KScales {
        let sm = q4_k_scales_mins(&(*b).scales);
        let sm = _mm_loadu_si128(sm.as_ptr() as *const __m128i);
        // m[g / 2] for the 16 groups of 16.
        let pairs = _mm_setr_epi8(8, 8, 9, 9, 10, 10, 11, 11, 12, 12, 13, 13, 14, 14, 15, 15);
        let d = ld_f16x2!(addr_of!((*b).d));
        KScales {
            packed: _mm256_broadcastsi128_si256(_mm_cvtepu8_epi16(sm)),
            mins: _mm256_cvtepu8_epi16(_mm_shuffle_epi8(sm, pairs)),
            d: _mm_cvtss_f32(d),
            dmin: _mm_cvtss_f32(_mm_movehdup_ps(d)),
        }
    }
    /// `packed` holds sc0..sc7 as i16 in both halves: broadcast word k.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn scale(s: &KScales, k: usize) -> __m256i {
        _mm256_shuffle_epi8(s.packed, _mm256_set1_epi16(0x0100 + 0x0202 * k as i16))
    }
    /// 32 bytes of `qs` per 64 elements: even k the low nibbles, odd k the high ones.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn quants(b: *const Self, k: usize) -> __m256i {
        let q = _mm256_loadu_si256(addr_of!((*b).qs).cast::<u8>().add(k / 2 * 32).cast());
        let q = _mm256_srl_epi16(q, _mm_cvtsi32_si128(4 * (k & 1) as i32));
        _mm256_and_si256(q, _mm256_set1_epi8(0x0F))
    }
}

impl KQuant for BlockQ6K {
    const OFFSET_BY_D: bool = true;
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn scales(b: *const Self) -> KScales {
        let sc = _mm_loadu_si128(addr_of!((*b).scales).cast());
        let d = _mm_cvtss_f32(ld_f16!(addr_of!((*b).d)));
        KScales {
            packed: _mm256_castsi128_si256(sc),
            mins: _mm256_slli_epi16::<5>(_mm256_cvtepi8_epi16(sc)),
            d,
            dmin: d,
        }
    }
    /// One scale per 16 elements: sc[2k] for lanes 0..8, sc[2k + 1] for lanes 8..16.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn scale(s: &KScales, k: usize) -> __m256i {
        let (a, b) = (2 * k as i64, 2 * k as i64 + 1);
        let ctrl = _mm_set_epi64x(b * 0x0101010101010101, a * 0x0101010101010101);
        _mm256_cvtepi8_epi16(_mm_shuffle_epi8(_mm256_castsi256_si128(s.packed), ctrl))
    }
    /// Element 128h + 32j + l: low 4 bits in `ql[64h + 32(j & 1) + l]` (nibble j / 2), high
    /// 2 bits in bits 2j.. of `qh[32h + l]`.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn quants(b: *const Self, k: usize) -> __m256i {
        let (h, j) = (k / 4, k % 4);
        let ql = addr_of!((*b).ql).cast::<u8>().add(64 * h + 32 * (j & 1));
        let qh = addr_of!((*b).qh).cast::<u8>().add(32 * h);
        let lo = _mm256_srl_epi16(
            _mm256_loadu_si256(ql.cast()),
            _mm_cvtsi32_si128(4 * (j >> 1) as i32),
        );
        let hi = _mm256_srl_epi16(
            _mm256_loadu_si256(qh.cast()),
            _mm_cvtsi32_si128(2 * j as i32),
        );
        _mm256_or_si256(
            _mm256_and_si256(lo, _mm256_set1_epi8(0x0F)),
            _mm256_slli_epi16::<4>(_mm256_and_si256(hi, _mm256_set1_epi8(3))),
        )
    }
}

/// R weight rows × C Q8_K activation rows (C = 1: the matvec): each weight sub-block is
/// unpacked once per C activations, each activation sub-block loaded once per R rows; sums
/// stay exact in i32 per block, then `d·dy` scales them into f32 accumulators.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn dot_tile_k<X: KQuant, const R: usize, const C: usize>(
    x: [*const X; R],
    y: [*const BlockQ8K; C],
    nb: usize,
    out: &mut [[f32; R]; C],
) {
    let mut acc = [[_mm256_setzero_ps(); R]; C];
    let pf = x[0] as *const u8;
    let step = R * std::mem::size_of::<X>();
    for b in 0..nb {
        // Rows r..r+R are contiguous: prefetch the linear stream PF_DIST ahead.
        prefetch_ahead(pf, b * step, step);
        let mut s = [KScales {
            packed: _mm256_setzero_si256(),
            mins: _mm256_setzero_si256(),
            d: 0.0,
            dmin: 0.0,
        }; R];
        for r in 0..R {
            s[r] = X::scales(x[r].add(b));
        }
        let mut sumi = [[_mm256_setzero_si256(); R]; C];
        for k in 0..QK_K / 32 {
            let mut q = [_mm256_setzero_si256(); R];
            let mut sc = [_mm256_setzero_si256(); R];
            for r in 0..R {
                q[r] = X::quants(x[r].add(b), k);
                sc[r] = X::scale(&s[r], k);
            }
            for j in 0..C {
                let qy = _mm256_loadu_si256(addr_of!((*y[j].add(b)).qs[32 * k]).cast());
                for r in 0..R {
                    let p = _mm256_madd_epi16(sc[r], _mm256_maddubs_epi16(q[r], qy));
                    sumi[j][r] = _mm256_add_epi32(sumi[j][r], p);
                }
            }
        }
        for j in 0..C {
            let yb = y[j].add(b);
            let bsums = _mm256_loadu_si256(addr_of!((*yb).bsums).cast());
            let dy = (*yb).d;
            for r in 0..R {
                let offs = _mm256_madd_epi16(s[r].mins, bsums);
                let a = &mut acc[j][r];
                if X::OFFSET_BY_D {
                    let si = _mm256_sub_epi32(sumi[j][r], offs);
                    *a = _mm256_fmadd_ps(_mm256_set1_ps(s[r].d * dy), _mm256_cvtepi32_ps(si), *a);
                } else {
                    let si = _mm256_cvtepi32_ps(sumi[j][r]);
                    *a = _mm256_fmadd_ps(_mm256_set1_ps(s[r].d * dy), si, *a);
                    let m = _mm256_set1_ps(-s[r].dmin * dy);
                    *a = _mm256_fmadd_ps(m, _mm256_cvtepi32_ps(offs), *a);
                }
            }
        }
    }
    for j in 0..C {
        for r in 0..R {
            out[j][r] = hsum_f32_8(acc[j][r]);
        }
    }
}

/// One k-quant row · one Q8_K row.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn vec_dot_k<X: KQuant>(x: &[X], y: &[BlockQ8K]) -> f32 {
    assert_eq!(x.len(), y.len());
    let mut out = [[0f32; 1]; 1];
    dot_tile_k::<X, 1, 1>([x.as_ptr()], [y.as_ptr()], x.len(), &mut out);
    out[0][0]
}
