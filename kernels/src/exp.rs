//! `exp` for softmaxes: eight lanes at a time on AVX2, and the moments of a softmax over a
//! whole vocabulary ([`exp_moments`]), which a latent step needs at every step.

/// Values this far (nats) below the maximum get no weight: `exp` would give under 1e-26 of the
/// best, or a subnormal whose products run at a fraction of the speed.
pub(crate) const NEGLIGIBLE: f32 = -60.0;

/// `exp(x)` for `x` in `[NEGLIGIBLE, 0]`: `2^n · e^r` with `n = round(x / ln 2)`, `r` reduced
/// in two steps and `e^r` by Cephes' degree-7 polynomial.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(crate) unsafe fn exp_avx2(x: std::arch::x86_64::__m256) -> std::arch::x86_64::__m256 {
    use std::arch::x86_64::*;
    let n = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm256_mul_ps(
        x,
        _mm256_set1_ps(std::f32::consts::LOG2_E),
    ));
    let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693_359_4), x);
    let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.121_944_4e-4), r);
    let mut y = _mm256_set1_ps(1.987_569_1e-4);
    for c in [
        1.398_199_9e-3,
        8.333_452e-3,
        4.166_579_6e-2,
        1.666_666_5e-1,
        0.5,
    ] {
        y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(c));
    }
    let y = _mm256_fmadd_ps(
        y,
        _mm256_mul_ps(r, r),
        _mm256_add_ps(r, _mm256_set1_ps(1.0)),
    );
    let pow2 = _mm256_slli_epi32::<23>(_mm256_add_epi32(
        _mm256_cvtps_epi32(n),
        _mm256_set1_epi32(127),
    ));
    _mm256_mul_ps(y, _mm256_castsi256_ps(pow2))
}

/// With `e_i = exp(z_i − max)` (zero below [`NEGLIGIBLE`]): `(Σ e_i, Σ e_i·z_i,
/// Σ e_i·(z_i − prev_i))`, the last zero without `prev`. Entropy and the KL to a previous step
/// follow from them. The products and sums are in f64, eight lanes at a time on AVX2, summed
/// in a fixed order (the same bits for the same input).
///
/// Panics if `prev` is not as long as `z`.
pub fn exp_moments(z: &[f32], max: f32, prev: Option<&[f32]>) -> (f64, f64, f64) {
    if let Some(p) = prev {
        assert_eq!(
            p.len(),
            z.len(),
            "prev has {} values for {}",
            p.len(),
            z.len()
        );
    }
    #[cfg(target_arch = "x86_64")]
    if crate::has_avx2() {
        // SAFETY: AVX2 and FMA were detected; lengths checked above.
        return unsafe { moments_avx2(z, max, prev) };
    }
    let mut m = (0f64, 0f64, 0f64);
    for (i, &x) in z.iter().enumerate() {
        let d = x - max;
        let e = if d < NEGLIGIBLE { 0.0 } else { d.exp() as f64 };
        m.0 += e;
        m.1 += e * x as f64;
        if let Some(p) = prev {
            m.2 += e * (x - p[i]) as f64;
        }
    }
    m
}

/// [`exp_moments`] on AVX2: the tail past the last multiple of 8 is padded with values that
/// weigh nothing.
///
/// # Safety
/// AVX2 and FMA available; `prev`, if given, as long as `z`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn moments_avx2(z: &[f32], max: f32, prev: Option<&[f32]>) -> (f64, f64, f64) {
    use std::arch::x86_64::*;
    let (maxv, floor) = (_mm256_set1_ps(max), _mm256_set1_ps(NEGLIGIBLE));
    let mut acc = [_mm256_setzero_pd(); 6];
    let mut step = |x: __m256, q: __m256| {
        let d = _mm256_sub_ps(x, maxv);
        let keep = _mm256_cmp_ps::<_CMP_NLT_UQ>(d, floor);
        let e = _mm256_and_ps(exp_avx2(_mm256_max_ps(floor, d)), keep);
        let diff = _mm256_sub_ps(x, q);
        for (h, (e, (x, diff))) in [
            (
                _mm256_castps256_ps128(e),
                (_mm256_castps256_ps128(x), _mm256_castps256_ps128(diff)),
            ),
            (
                _mm256_extractf128_ps::<1>(e),
                (
                    _mm256_extractf128_ps::<1>(x),
                    _mm256_extractf128_ps::<1>(diff),
                ),
            ),
        ]
        .into_iter()
        .enumerate()
        {
            let e = _mm256_cvtps_pd(e);
            acc[3 * h] = _mm256_add_pd(acc[3 * h], e);
            acc[3 * h + 1] = _mm256_fmadd_pd(e, _mm256_cvtps_pd(x), acc[3 * h + 1]);
            acc[3 * h + 2] = _mm256_fmadd_pd(e, _mm256_cvtps_pd(diff), acc[3 * h + 2]);
        }
    };
    let n = z.len() / 8 * 8;
    for i in (0..n).step_by(8) {
        let x = _mm256_loadu_ps(z.as_ptr().add(i));
        let q = prev.map_or(x, |p| _mm256_loadu_ps(p.as_ptr().add(i)));
        step(x, q);
    }
    if n < z.len() {
        let (mut x, mut q) = ([f32::NEG_INFINITY; 8], [0f32; 8]);
        x[..z.len() - n].copy_from_slice(&z[n..]);
        match prev {
            Some(p) => q[..z.len() - n].copy_from_slice(&p[n..]),
            None => q = x,
        }
        // Padding weighs nothing: its lanes add e = 0 times a finite value.
        for (qi, xi) in q.iter_mut().zip(&mut x) {
            if *xi == f32::NEG_INFINITY {
                (*xi, *qi) = (max + 2.0 * NEGLIGIBLE, max + 2.0 * NEGLIGIBLE);
            }
        }
        step(_mm256_loadu_ps(x.as_ptr()), _mm256_loadu_ps(q.as_ptr()));
    }
    let total = |a: __m256d, b: __m256d| {
        let mut l = [0f64; 8];
        _mm256_storeu_pd(l.as_mut_ptr(), a);
        _mm256_storeu_pd(l.as_mut_ptr().add(4), b);
        ((l[0] + l[4]) + (l[1] + l[5])) + ((l[2] + l[6]) + (l[3] + l[7]))
    };
    (
        total(acc[0], acc[3]),
        total(acc[1], acc[4]),
        total(acc[2], acc[5]),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The AVX2 moments agree with f64 arithmetic on libm's `exp`, with and without a previous
    /// step, whatever the tail past a multiple of 8; values below the floor weigh nothing.
    #[test]
    fn moments_match_f64() {
        let mut s = 7u64;
        let mut r = || {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 30.0 - 20.0
        };
        for len in [1, 7, 8, 9, 100, 49_157] {
            let z: Vec<f32> = (0..len).map(|_| r()).collect();
            let p: Vec<f32> = (0..len).map(|_| r()).collect();
            let max = z.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            for prev in [None, Some(&p[..])] {
                let (mut a, mut b, mut c) = (0f64, 0f64, 0f64);
                for i in 0..len {
                    let e = ((z[i] - max) as f64).exp();
                    a += e;
                    b += e * z[i] as f64;
                    c += prev.map_or(0.0, |p| e * (z[i] - p[i]) as f64);
                }
                let got = exp_moments(&z, max, prev);
                let close = |x: f64, y: f64, scale: f64| (x - y).abs() <= 1e-6 * scale;
                assert!(close(got.0, a, a), "len {len}: Σe {} vs {a}", got.0);
                assert!(
                    close(got.1, b, a * 20.0),
                    "len {len}: Σe·z {} vs {b}",
                    got.1
                );
                assert!(
                    close(got.2, c, a * 40.0),
                    "len {len}: Σe·Δ {} vs {c}",
                    got.2
                );
            }
        }
        let (sum, _, _) = exp_moments(&[0.0, -70.0, f32::NEG_INFINITY], 0.0, None);
        assert_eq!(sum, 1.0, "only the maximum weighs");
    }

    /// A previous step of another length is a caller's bug, named as such.
    #[test]
    #[should_panic(expected = "prev has 2 values for 3")]
    fn moments_refuse_a_previous_step_of_another_length() {
        exp_moments(&[0.0, 1.0, 2.0], 2.0, Some(&[0.0, 1.0]));
    }
}
