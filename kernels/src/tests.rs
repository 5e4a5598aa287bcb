use super::blocks::*;
use super::*;
use half::f16;

/// Every format the kernels run.
const ALL_TYPES: [QType; 6] = [
    QType::Q4_0,
    QType::Q4_1,
    QType::Q5_0,
    QType::Q8_0,
    QType::Q4K,
    QType::Q6K,
];

/// xorshift64* — no dependency needed.
struct Rng(u64);
impl Rng {
    fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9E3779B97F4A7C15) | 1)
    }
    fn u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545F4914F6CDD1D)
    }
    fn u8(&mut self) -> u8 {
        (self.u64() >> 56) as u8
    }
    /// Uniform in [-1, 1).
    fn f32(&mut self) -> f32 {
        ((self.u64() >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
    fn vec(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.f32()).collect()
    }
    fn scale(&mut self) -> f16 {
        f16::from_f32(self.f32() * 0.05)
    }
    fn bytes<const N: usize>(&mut self) -> [u8; N] {
        std::array::from_fn(|_| self.u8())
    }
    fn q4_0(&mut self) -> BlockQ4_0 {
        BlockQ4_0 {
            d: self.scale(),
            qs: self.bytes(),
        }
    }
    fn q4_1(&mut self) -> BlockQ4_1 {
        BlockQ4_1 {
            d: self.scale(),
            m: self.scale(),
            qs: self.bytes(),
        }
    }
    fn q5_0(&mut self) -> BlockQ5_0 {
        BlockQ5_0 {
            d: self.scale(),
            qh: self.bytes(),
            qs: self.bytes(),
        }
    }
    /// Activation-like Q8_0: qs in -127..=127 as the quantizers produce (-128 would saturate
    /// maddubs in the Q8_0 x Q8_0 kernel, exactly as in ggml).
    fn q8_0(&mut self) -> BlockQ8_0 {
        BlockQ8_0 {
            d: self.scale(),
            qs: std::array::from_fn(|_| ((self.u8() % 255) as i16 - 127) as i8),
        }
    }
    /// Random k-quant blocks: every scale byte and quant bit random, f16 `d`/`dmin` in ±0.05.
    fn q4_k(&mut self) -> BlockQ4K {
        BlockQ4K {
            d: self.scale(),
            dmin: self.scale(),
            scales: self.bytes(),
            qs: self.bytes(),
        }
    }
    fn q6_k(&mut self) -> BlockQ6K {
        BlockQ6K {
            ql: self.bytes(),
            qh: self.bytes(),
            scales: self.bytes::<16>().map(|b| b as i8),
            d: self.scale(),
        }
    }
    fn q8_1(&mut self) -> BlockQ8_1 {
        let b = self.q8_0();
        let sum: i32 = b.qs.iter().map(|&q| q as i32).sum();
        BlockQ8_1 {
            d: b.d,
            s: f16::from_f32(b.d.to_f32() * sum as f32),
            qs: b.qs,
        }
    }
}

/// |a - b| <= rel * scale + 1e-6, where `scale` bounds the magnitude of the summed terms.
fn close(a: f32, b: f32, scale: f32, rel: f32) -> bool {
    (a - b).abs() <= rel * scale + 1e-6
}

fn abs_dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| (x * y).abs()).sum()
}

fn deq_act_q8_0(y: &[BlockQ8_0]) -> Vec<f32> {
    let mut v = vec![0f32; y.len() * QK];
    dequantize_row_q8_0(y, &mut v);
    v
}

fn deq_act_q8_1(y: &[BlockQ8_1]) -> Vec<f32> {
    let mut v = vec![0f32; y.len() * QK];
    for (b, o) in y.iter().zip(v.chunks_exact_mut(QK)) {
        for (o, &q) in o.iter_mut().zip(&b.qs) {
            *o = q as f32 * b.d.to_f32();
        }
    }
    v
}

#[test]
fn block_sizes_match_ggml() {
    assert_eq!(std::mem::size_of::<BlockQ4_0>(), 18);
    assert_eq!(std::mem::size_of::<BlockQ4_1>(), 20);
    assert_eq!(std::mem::size_of::<BlockQ5_0>(), 22);
    assert_eq!(std::mem::size_of::<BlockQ8_0>(), 34);
    assert_eq!(std::mem::size_of::<BlockQ8_1>(), 36);
    assert_eq!(std::mem::size_of::<BlockQ4K>(), 144);
    assert_eq!(std::mem::size_of::<BlockQ6K>(), 210);
    assert_eq!(std::mem::size_of::<BlockQ8K>(), 292);
    for t in ALL_TYPES {
        assert_eq!(QType::from_ggml_id(t as u32), Some(t));
        assert_eq!(t.block_size(), t.act_kind().block_size());
    }
    assert_eq!((QType::Q4K as u32, QType::Q6K as u32), (12, 14));
}

#[test]
fn quantize_activation_avx2_matches_scalar() {
    if !has_avx2() {
        return;
    }
    let mut rng = Rng::new(1);
    for n_blocks in [1usize, 2, 18, 48] {
        let mut xs = rng.vec(n_blocks * QK);
        // an all-zero block, a block with ties (x*id = k + 0.5), a large-magnitude block
        xs[..QK].iter_mut().for_each(|x| *x = 0.0);
        if n_blocks > 1 {
            for (j, x) in xs[QK..2 * QK].iter_mut().enumerate() {
                *x = (j as f32 - 16.0) + 0.5;
            }
            xs[QK] = 127.0;
        }
        xs.iter_mut()
            .skip(2 * QK)
            .step_by(7)
            .for_each(|x| *x *= 1000.0);
        let mut a0 = vec![BlockQ8_0::default(); n_blocks];
        let mut b0 = a0.clone();
        let mut a1 = vec![BlockQ8_1::default(); n_blocks];
        let mut b1 = a1.clone();
        quantize_q8_0(Isa::Avx2, &xs, &mut a0);
        quantize_q8_0(Isa::Scalar, &xs, &mut b0);
        quantize_q8_1(Isa::Avx2, &xs, &mut a1);
        quantize_q8_1(Isa::Scalar, &xs, &mut b1);
        assert_eq!(a0, b0);
        assert_eq!(a1, b1);
        // and the quantization is accurate
        let deq = deq_act_q8_1(&a1);
        for (i, (x, y)) in xs.iter().zip(&deq).enumerate() {
            let d = a1[i / QK].d.to_f32();
            assert!(
                (x - y).abs() <= 0.5 * d * 1.01 + 1e-3 * x.abs(),
                "{i}: {x} vs {y}"
            );
        }
    }
}

#[test]
fn dots_avx2_match_scalar() {
    if !has_avx2() {
        return;
    }
    let mut rng = Rng::new(2);
    for nb in [1usize, 2, 3, 18, 48, 64] {
        for _ in 0..50 {
            let x40: Vec<_> = (0..nb).map(|_| rng.q4_0()).collect();
            let x41: Vec<_> = (0..nb).map(|_| rng.q4_1()).collect();
            let x50: Vec<_> = (0..nb).map(|_| rng.q5_0()).collect();
            let x80: Vec<_> = (0..nb).map(|_| rng.q8_0()).collect();
            let y0: Vec<_> = (0..nb).map(|_| rng.q8_0()).collect();
            let y1: Vec<_> = (0..nb).map(|_| rng.q8_1()).collect();
            let yd0 = deq_act_q8_0(&y0);
            let yd1 = deq_act_q8_1(&y1);
            let mut w = vec![0f32; nb * QK];

            let check = |name: &str, a: f32, b: f32, wd: &[f32], yd: &[f32], extra: f32| {
                let scale = abs_dot(wd, yd) + extra;
                assert!(
                    close(a, b, scale, 1e-3),
                    "{name} nb={nb}: avx {a} scalar {b} (scale {scale})"
                );
            };
            unsafe {
                dequantize_row_q4_0(&x40, &mut w);
                check(
                    "q4_0",
                    avx2::vec_dot_q4_0_q8_0(&x40, &y0),
                    vec_dot_q4_0_q8_0_scalar(&x40, &y0),
                    &w,
                    &yd0,
                    0.0,
                );
                dequantize_row_q4_1(&x41, &mut w);
                let ms: f32 = x41
                    .iter()
                    .zip(&y1)
                    .map(|(a, b)| (a.m.to_f32() * b.s.to_f32()).abs())
                    .sum();
                check(
                    "q4_1",
                    avx2::vec_dot_q4_1_q8_1(&x41, &y1),
                    vec_dot_q4_1_q8_1_scalar(&x41, &y1),
                    &w,
                    &yd1,
                    ms,
                );
                dequantize_row_q5_0(&x50, &mut w);
                check(
                    "q5_0",
                    avx2::vec_dot_q5_0_q8_0(&x50, &y0),
                    vec_dot_q5_0_q8_0_scalar(&x50, &y0),
                    &w,
                    &yd0,
                    0.0,
                );
                dequantize_row_q8_0(&x80, &mut w);
                check(
                    "q8_0",
                    avx2::vec_dot_q8_0_q8_0(&x80, &y0),
                    vec_dot_q8_0_q8_0_scalar(&x80, &y0),
                    &w,
                    &yd0,
                    0.0,
                );
            }
        }
    }
}

#[test]
fn scalar_dots_match_dequantized() {
    // The scalar references against dequantize-then-f32-dot (validates the layouts' bit logic).
    let mut rng = Rng::new(3);
    let nb = 8;
    for _ in 0..20 {
        let y0: Vec<_> = (0..nb).map(|_| rng.q8_0()).collect();
        let y1: Vec<_> = (0..nb).map(|_| rng.q8_1()).collect();
        let (yd0, yd1) = (deq_act_q8_0(&y0), deq_act_q8_1(&y1));
        let mut w = vec![0f32; nb * QK];
        let f32dot = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f32>();

        let x: Vec<_> = (0..nb).map(|_| rng.q4_0()).collect();
        dequantize_row_q4_0(&x, &mut w);
        assert!(close(
            vec_dot_q4_0_q8_0_scalar(&x, &y0),
            f32dot(&w, &yd0),
            abs_dot(&w, &yd0),
            1e-4
        ));
        let x: Vec<_> = (0..nb).map(|_| rng.q5_0()).collect();
        dequantize_row_q5_0(&x, &mut w);
        assert!(close(
            vec_dot_q5_0_q8_0_scalar(&x, &y0),
            f32dot(&w, &yd0),
            abs_dot(&w, &yd0),
            1e-4
        ));
        let x: Vec<_> = (0..nb).map(|_| rng.q8_0()).collect();
        dequantize_row_q8_0(&x, &mut w);
        assert!(close(
            vec_dot_q8_0_q8_0_scalar(&x, &y0),
            f32dot(&w, &yd0),
            abs_dot(&w, &yd0),
            1e-4
        ));
        let x: Vec<_> = (0..nb).map(|_| rng.q4_1()).collect();
        dequantize_row_q4_1(&x, &mut w);
        // s is rounded to f16 (as in ggml): allow 1e-3 of the m*s term
        let ms: f32 = x
            .iter()
            .zip(&y1)
            .map(|(a, b)| (a.m.to_f32() * b.s.to_f32()).abs())
            .sum();
        assert!(close(
            vec_dot_q4_1_q8_1_scalar(&x, &y1),
            f32dot(&w, &yd1),
            abs_dot(&w, &yd1) + ms * 10.0,
            1e-4
        ));
    }
}

#[test]
fn multi_row_kernels_match_single_row() {
    if !has_avx2() {
        return;
    }
    let mut rng = Rng::new(4);
    let nb = 18;
    let x: Vec<_> = (0..4 * nb).map(|_| rng.q4_1()).collect();
    let y: Vec<_> = (0..nb).map(|_| rng.q8_1()).collect();
    let mut o = [0f32; 4];
    unsafe {
        avx2::dot_rows_q4_1_q8_1::<4>(
            std::array::from_fn(|r| x[r * nb..].as_ptr()),
            y.as_ptr(),
            nb,
            &mut o,
        );
        for r in 0..4 {
            let one = avx2::vec_dot_q4_1_q8_1(&x[r * nb..(r + 1) * nb], &y);
            assert_eq!(o[r], one, "row {r}");
        }
    }
}

/// `xs` (`m × cols`) quantized, and `w`'s product with it on the detected ISA and on the scalar
/// path. Checks on the way that `matmul` (quantizing internally) gives the same bits, and for
/// m = 1 that `matvec_rows` over a sub-range does.
fn products_all_paths(
    w: &QWeight,
    xs: &[f32],
    m: usize,
    pool: &KernelPool,
) -> (QuantizedActivation, Vec<f32>, Vec<f32>) {
    let rows = w.rows();
    let xq = QuantizedActivation::new(w.act_kind(), xs, m, w.cols());
    let mut out = vec![f32::NAN; m * rows];
    w.matmul_q(pool, &xq, &mut out);
    let mut out_s = vec![f32::NAN; m * rows];
    w.matmul_isa(Isa::Scalar, pool, &xq, &mut out_s);
    let mut out_f = vec![f32::NAN; m * rows];
    w.matmul(pool, xs, m, &mut out_f);
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    assert_eq!(
        bits(&out),
        bits(&out_f),
        "{:?} matmul(f32) vs matmul_q",
        w.dtype()
    );
    if m == 1 {
        let part = rows / 3..rows;
        let mut o = vec![f32::NAN; part.len()];
        w.matvec_rows(&xq, part.clone(), &mut o);
        assert_eq!(bits(&o), bits(&out[part]), "{:?} matvec_rows", w.dtype());
    }
    (xq, out, out_s)
}

fn check_weight(dtype: QType, rows: usize, cols: usize, m: usize, pool: &KernelPool, seed: u64) {
    let mut rng = Rng::new(seed);
    let wf = rng.vec(rows * cols);
    let w = QWeight::from_f32(dtype, rows, cols, &wf).unwrap();
    let wd = w.dequantize();
    let xs = rng.vec(m * cols);
    let (xq, out, out_s) = products_all_paths(&w, &xs, m, pool);
    let xd = match xq.kind() {
        ActKind::Q8_0 => deq_act_q8_0(xq.q8_0()),
        ActKind::Q8_1 => deq_act_q8_1(xq.q8_1()),
        ActKind::Q8K => deq_act_q8_k(xq.q8_k()),
    };
    for c in 0..m {
        let x = &xd[c * cols..(c + 1) * cols];
        let xt = &xs[c * cols..(c + 1) * cols];
        for r in 0..rows {
            let wr = &wd[r * cols..(r + 1) * cols];
            let reference: f32 = wr.iter().zip(x).map(|(a, b)| a * b).sum();
            let scale = abs_dot(wr, x);
            let got = out[c * rows + r];
            let ctx = format!(
                "{dtype:?} {rows}x{cols} m={m} t={} row {r} act {c}",
                pool.n_threads()
            );
            // vs dequantized weight · dequantized activation: only f16 rounding of s + order
            assert!(
                close(got, reference, scale, 2e-3),
                "{ctx}: {got} vs {reference}"
            );
            assert!(
                close(got, out_s[c * rows + r], scale, 1e-3),
                "{ctx}: scalar {}",
                out_s[c * rows + r]
            );
            // vs the true f32 activation: activation quantization error (~1/254 per element)
            let exact: f32 = wr.iter().zip(xt).map(|(a, b)| a * b).sum();
            assert!(
                close(got, exact, abs_dot(wr, xt), 2e-2),
                "{ctx}: {got} vs exact {exact}"
            );
        }
    }
}

#[test]
fn matvec_matches_dequantized_reference() {
    for threads in [1, 2, 3] {
        let pool = KernelPool::new(threads);
        let mut seed = 10;
        for dtype in [QType::Q4_0, QType::Q4_1, QType::Q5_0, QType::Q8_0] {
            for (rows, cols) in [
                (1, 32),
                (3, 64),
                (5, 576),
                (7, 96),
                (13, 576),
                (67, 160),
                (192, 576),
                (301, 1536),
            ] {
                seed += 1;
                check_weight(dtype, rows, cols, 1, &pool, seed);
            }
        }
    }
}

#[test]
fn matmul_small_batches() {
    for threads in [1, 2] {
        let pool = KernelPool::new(threads);
        for m in [2, 3, 5, 8] {
            for dtype in [QType::Q4_1, QType::Q5_0, QType::Q8_0] {
                check_weight(dtype, 37, 128, m, &pool, 100 + m as u64);
            }
        }
    }
}

/// A row's product does not depend on the batch it is in (the tile kernels for m >= 4, the
/// row kernels below): what makes a batched step of several sequences equal to each
/// sequence's step alone.
#[test]
fn a_rows_product_has_the_same_bits_at_every_batch_size() {
    let pool = KernelPool::new(2);
    for dtype in ALL_TYPES {
        let mut rng = Rng::new(40);
        let (rows, cols) = (37, 512);
        let w = match dtype {
            QType::Q4K | QType::Q6K => random_k_weight(dtype, rows, cols, &mut rng).0,
            _ => QWeight::from_f32(dtype, rows, cols, &rng.vec(rows * cols)).unwrap(),
        };
        let xs = rng.vec(70 * cols);
        let mut alone = vec![0f32; 70 * rows];
        for c in 0..70 {
            w.matmul(
                &pool,
                &xs[c * cols..(c + 1) * cols],
                1,
                &mut alone[c * rows..(c + 1) * rows],
            );
        }
        for m in [2, 4, 5, 8, 9, 13, 57, 70] {
            let mut out = vec![0f32; m * rows];
            w.matmul(&pool, &xs[..m * cols], m, &mut out);
            for (i, (a, b)) in out.iter().zip(&alone).enumerate() {
                assert_eq!(a.to_bits(), b.to_bits(), "{dtype:?} m={m} element {i}");
            }
        }
    }
}

#[test]
fn threads_give_identical_results() {
    let mut rng = Rng::new(7);
    let (rows, cols) = (1536, 576);
    let w = QWeight::from_f32(QType::Q4_1, rows, cols, &rng.vec(rows * cols)).unwrap();
    let xq = QuantizedActivation::new(ActKind::Q8_1, &rng.vec(cols), 1, cols);
    let mut a = vec![0f32; rows];
    let mut b = vec![0f32; rows];
    w.matvec(&KernelPool::new(1), &xq, &mut a);
    let p2 = KernelPool::new(2);
    for _ in 0..100 {
        w.matvec(&p2, &xq, &mut b);
        assert_eq!(a, b);
    }
}

#[test]
fn weight_from_bytes_validates() {
    assert!(QWeight::new(QType::Q4_1, 2, 64, vec![0u8; 80]).is_ok());
    assert!(QWeight::new(QType::Q4_1, 2, 64, vec![0u8; 81]).is_err());
    assert!(QWeight::new(QType::Q4_1, 2, 60, vec![0u8; 80]).is_err());
}

/// Our blocks read candle's (= ggml's) bytes: same dequantization, same products.
#[test]
fn layout_matches_candle() {
    use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
    use candle_core::{Device, Module, Tensor};
    let mut rng = Rng::new(8);
    let (rows, cols) = (24, 256);
    let wf = rng.vec(rows * cols);
    let xs = rng.vec(cols);
    let t = Tensor::from_vec(wf, (rows, cols), &Device::Cpu).unwrap();
    let x = Tensor::from_vec(xs.clone(), (1, cols), &Device::Cpu).unwrap();
    let pool = KernelPool::new(2);
    for (dt, qt) in [
        (GgmlDType::Q4_0, QType::Q4_0),
        (GgmlDType::Q4_1, QType::Q4_1),
        (GgmlDType::Q5_0, QType::Q5_0),
        (GgmlDType::Q8_0, QType::Q8_0),
        (GgmlDType::Q4K, QType::Q4K),
        (GgmlDType::Q6K, QType::Q6K),
    ] {
        let q = QTensor::quantize(&t, dt).unwrap();
        let w = QWeight::new(qt, rows, cols, q.data().unwrap().to_vec()).unwrap();
        let deq: Vec<f32> = q
            .dequantize(&Device::Cpu)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(w.dequantize(), deq, "{qt:?} dequantize");
        let theirs: Vec<f32> = QMatMul::from_qtensor(q)
            .unwrap()
            .forward(&x)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let mut ours = vec![0f32; rows];
        w.matmul(&pool, &xs, 1, &mut ours);
        for r in 0..rows {
            let scale = abs_dot(&deq[r * cols..(r + 1) * cols], &xs);
            assert!(
                close(ours[r], theirs[r], scale, 2e-3),
                "{qt:?} row {r}: {} vs candle {}",
                ours[r],
                theirs[r]
            );
        }
    }
}

#[test]
fn pool_runs_every_chunk_once() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    for threads in [1, 2, 4] {
        let pool = KernelPool::new(threads);
        for n in [1usize, 2, 3, 17, 1000] {
            let hits: Vec<AtomicUsize> = (0..n).map(|_| AtomicUsize::new(0)).collect();
            for _ in 0..20 {
                pool.run(n, |i| {
                    hits[i].fetch_add(1, Ordering::Relaxed);
                });
            }
            assert!(hits.iter().all(|h| h.load(Ordering::Relaxed) == 20));
        }
        // after the workers parked
        std::thread::sleep(std::time::Duration::from_millis(5));
        let total = AtomicUsize::new(0);
        pool.run(64, |i| {
            total.fetch_add(i, Ordering::Relaxed);
        });
        assert_eq!(total.load(Ordering::Relaxed), 64 * 63 / 2);
    }
}

#[test]
fn pool_nested_and_concurrent_calls() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let pool = KernelPool::new(2);
    let total = AtomicUsize::new(0);
    pool.run(8, |_| {
        pool.run(4, |_| {
            total.fetch_add(1, Ordering::Relaxed);
        });
    });
    assert_eq!(total.load(Ordering::Relaxed), 32);
    let total = AtomicUsize::new(0);
    std::thread::scope(|s| {
        for _ in 0..3 {
            s.spawn(|| {
                for _ in 0..200 {
                    pool.run(5, |i| {
                        total.fetch_add(i, Ordering::Relaxed);
                    });
                }
            });
        }
    });
    assert_eq!(total.load(Ordering::Relaxed), 3 * 200 * 10);
}

#[test]
fn pool_propagates_panics() {
    let pool = KernelPool::new(2);
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        pool.run(16, |i| {
            if i == 11 {
                panic!("boom");
            }
        })
    }));
    assert!(r.is_err());
    // still usable
    let n = std::sync::atomic::AtomicUsize::new(0);
    pool.run(16, |_| {
        n.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    });
    assert_eq!(n.into_inner(), 16);
}

#[test]
fn matmul_multi_matches_separate_products() {
    let mut rng = Rng::new(9);
    for threads in [1, 2, 3] {
        let pool = KernelPool::new(threads);
        for m in [1usize, 2, 5] {
            // Q/K/V-like Q4_1; mixed Q5_0 + Q8_0 (both take Q8_0 activations); mixed k-quants
            for (cols, dtypes) in [
                (576, [QType::Q4_1, QType::Q4_1, QType::Q4_1]),
                (576, [QType::Q5_0, QType::Q8_0, QType::Q4_0]),
                (512, [QType::Q4K, QType::Q6K, QType::Q4K]),
            ] {
                let ws: Vec<QWeight> = [576usize, 192, 67]
                    .iter()
                    .zip(dtypes)
                    .map(|(&rows, dt)| match dt {
                        QType::Q4K | QType::Q6K => random_k_weight(dt, rows, cols, &mut rng).0,
                        _ => QWeight::from_f32(dt, rows, cols, &rng.vec(rows * cols)).unwrap(),
                    })
                    .collect();
                let xq = QuantizedActivation::new(ws[0].act_kind(), &rng.vec(m * cols), m, cols);
                let mut outs: Vec<Vec<f32>> =
                    ws.iter().map(|w| vec![f32::NAN; m * w.rows()]).collect();
                {
                    let mut refs: Vec<&mut [f32]> =
                        outs.iter_mut().map(|o| o.as_mut_slice()).collect();
                    let wr: Vec<&QWeight> = ws.iter().collect();
                    matmul_multi(&pool, &wr, &xq, &mut refs);
                }
                for (w, o) in ws.iter().zip(&outs) {
                    let mut single = vec![0f32; m * w.rows()];
                    w.matmul_q(&pool, &xq, &mut single);
                    assert_eq!(o, &single, "{:?} m={m} t={threads}", w.dtype());
                    if m == 1 {
                        let mut part = vec![0f32; 50];
                        w.matvec_rows(&xq, 13..63, &mut part);
                        assert_eq!(&part[..], &single[13..63]);
                    }
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// k-quants
// ---------------------------------------------------------------------------------------------

/// ggml `get_scale_min_k4`: scale and min of sub-block j (0..8) of a Q4_K block.
fn get_scale_min_k4(j: usize, q: &[u8; 12]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

/// ggml `dequantize_row_q4_K`, written out as ggml has it (independent of the library's
/// scale unpacking). Also returns each weight's magnitude `|d·sc·q| + |dmin·m|`: the kernels
/// sum the two terms separately, so their float error scales with it.
fn ref_dequantize_q4_k(x: &[BlockQ4K]) -> (Vec<f32>, Vec<f32>) {
    let (mut y, mut mag) = (Vec::new(), Vec::new());
    for b in x {
        let (d, min) = (b.d.to_f32(), b.dmin.to_f32());
        for (n, q) in b.qs.chunks_exact(32).enumerate() {
            let (sc, m) = get_scale_min_k4(2 * n, &b.scales);
            let (d1, m1) = (d * sc as f32, min * m as f32);
            let (sc, m) = get_scale_min_k4(2 * n + 1, &b.scales);
            let (d2, m2) = (d * sc as f32, min * m as f32);
            for (dd, mm, shift) in [(d1, m1, 0), (d2, m2, 4)] {
                for &ql in q {
                    let v = dd * ((ql >> shift) & 0xF) as f32;
                    y.push(v - mm);
                    mag.push(v.abs() + mm.abs());
                }
            }
        }
    }
    (y, mag)
}

/// ggml `dequantize_row_q6_K`, written out as ggml has it.
fn ref_dequantize_q6_k(x: &[BlockQ6K]) -> Vec<f32> {
    let mut out = Vec::new();
    for b in x {
        let d = b.d.to_f32();
        let mut y = [0f32; QK_K];
        for n in 0..2 {
            let (ql, qh, sc) = (&b.ql[64 * n..], &b.qh[32 * n..], &b.scales[8 * n..]);
            let y = &mut y[128 * n..];
            for l in 0..32 {
                let is = l / 16;
                let q1 = ((ql[l] & 0xF) | ((qh[l] & 3) << 4)) as i32 - 32;
                let q2 = ((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
                let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
                let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
                y[l] = d * sc[is] as f32 * q1 as f32;
                y[l + 32] = d * sc[is + 2] as f32 * q2 as f32;
                y[l + 64] = d * sc[is + 4] as f32 * q3 as f32;
                y[l + 96] = d * sc[is + 6] as f32 * q4 as f32;
            }
        }
        out.extend_from_slice(&y);
    }
    out
}

fn deq_act_q8_k(y: &[BlockQ8K]) -> Vec<f32> {
    y.iter()
        .flat_map(|b| b.qs.iter().map(move |&q| b.d * q as f32))
        .collect()
}

/// Hand-packed blocks with known values: catches a scale/quant unpacking slip that random
/// blocks under a loose tolerance could hide.
#[test]
fn k_quants_dequantize_known_blocks() {
    // Q4_K: d = 0.5, dmin = 0.25, sc = [1, 2, 3, 4, 33, 46, 59, 63], m = [5, 6, 7, 8, 17, 30,
    // 41, 62]: bytes 0..4 = sc0..3 | (sc4..7 >> 4) << 6, bytes 4..8 = m0..3 | (m4..7 >> 4) << 6,
    // bytes 8..12 = (sc4..7 & 15) | (m4..7 & 15) << 4.
    let b = BlockQ4K {
        d: f16::from_f32(0.5),
        dmin: f16::from_f32(0.25),
        scales: [129, 130, 195, 196, 69, 70, 135, 200, 17, 238, 155, 239],
        qs: std::array::from_fn(|i| (i % 16) as u8 | ((((i / 8) % 16) as u8) << 4)),
    };
    assert_eq!(
        q4_k_scales_mins(&b.scales),
        [1, 2, 3, 4, 33, 46, 59, 63, 5, 6, 7, 8, 17, 30, 41, 62]
    );
    let mut y = vec![0f32; QK_K];
    dequantize_row_q4_k(&[b], &mut y);
    // element 255: sub-block 7 (high nibbles of qs[96..128]), qs[127] >> 4 = 15:
    // 0.5·63·15 − 0.25·62 = 457; element 200: sub-block 6, low nibble of qs[104] = 8:
    // 0.5·59·8 − 0.25·41 = 225.75.
    for (e, want) in [
        (0, -1.25),
        (1, -0.75),
        (33, -1.5),
        (100, 6.0),
        (200, 225.75),
        (255, 457.0),
    ] {
        assert_eq!(y[e], want, "Q4_K element {e}");
    }
    assert_eq!(y, ref_dequantize_q4_k(&[b]).0);

    // Q6_K: d = 0.5, alternating-sign scales with the extreme -128 last.
    let b = BlockQ6K {
        ql: std::array::from_fn(|i| (i * 7) as u8),
        qh: std::array::from_fn(|i| (i * 37) as u8),
        scales: [
            1, -2, 3, -4, 5, -6, 7, -8, 9, -10, 11, -12, 13, -14, 15, -128,
        ],
        d: f16::from_f32(0.5),
    };
    dequantize_row_q6_k(&[b], &mut y);
    // element 255: ql[127] = 121 → high nibble 7, qh[63] = 27 → bits 6..8 = 0: q = 7,
    // 0.5·(−128)·(7 − 32) = 1600; element 130: ql[66] = 206 → low nibble 14, qh[34] = 170 →
    // bits 0..2 = 2: q = 46, 0.5·9·(46 − 32) = 63.
    for (e, want) in [
        (0, -16.0),
        (17, 9.0),
        (40, 12.0),
        (70, -35.0),
        (101, 0.0),
        (130, 63.0),
        (200, -110.5),
        (255, 1600.0),
    ] {
        assert_eq!(y[e], want, "Q6_K element {e}");
    }
    assert_eq!(y, ref_dequantize_q6_k(&[b]));
}

#[test]
fn k_quants_dequantize_match_ggml_reference() {
    let mut rng = Rng::new(20);
    let x4: Vec<_> = (0..64).map(|_| rng.q4_k()).collect();
    let x6: Vec<_> = (0..64).map(|_| rng.q6_k()).collect();
    let mut y = vec![0f32; 64 * QK_K];
    dequantize_row_q4_k(&x4, &mut y);
    assert_eq!(y, ref_dequantize_q4_k(&x4).0);
    dequantize_row_q6_k(&x6, &mut y);
    assert_eq!(y, ref_dequantize_q6_k(&x6));
}

#[test]
fn quantize_q8_k_matches_ggml() {
    // max = x[0] = −1 (largest magnitude, negative): iscale = −127/max = 127, d = 1/127.
    let xs: Vec<f32> = (0..QK_K).map(|j| (j as f32 - 128.0) / 128.0).collect();
    let mut y = [BlockQ8K::default()];
    quantize_row_q8_k(&xs, &mut y);
    assert_eq!(y[0].d, 1.0 / 127.0);
    // 127·(−0.5) = −63.5 rounds half to even (ggml nearest_int): −64.
    assert_eq!(
        [y[0].qs[0], y[0].qs[64], y[0].qs[128], y[0].qs[255]],
        [-127, -64, 0, 126]
    );
    for (g, &s) in y[0].bsums.iter().enumerate() {
        let want: i32 = y[0].qs[16 * g..16 * (g + 1)]
            .iter()
            .map(|&q| q as i32)
            .sum();
        assert_eq!(s as i32, want, "bsums[{g}]");
    }
    // Positive max: d is negative (ggml's sign convention), the max maps to −127.
    let mut rng = Rng::new(21);
    let mut xs: Vec<f32> = rng.vec(2 * QK_K).iter().map(|v| v.abs()).collect();
    xs[7] = 2.0;
    xs[QK_K..].iter_mut().for_each(|x| *x = 0.0);
    let mut y = [BlockQ8K::default(), BlockQ8K::default()];
    quantize_row_q8_k(&xs, &mut y);
    assert_eq!((y[0].d, y[0].qs[7]), (-2.0 / 127.0, -127));
    for (x, q) in xs.iter().zip(deq_act_q8_k(&y)) {
        assert!((x - q).abs() <= 0.5 * 2.0 / 127.0 * 1.0001, "{x} vs {q}");
    }
    assert_eq!(y[1], BlockQ8K::default(), "all-zero block");
}

#[test]
#[should_panic(expected = "not a multiple of 256")]
fn q8_k_activation_refuses_partial_blocks() {
    QuantizedActivation::new(ActKind::Q8K, &[0.0; 288], 1, 288);
}

#[test]
fn k_quant_weight_from_bytes_validates() {
    assert!(QWeight::new(QType::Q4K, 2, 512, vec![0u8; 4 * 144]).is_ok());
    assert!(QWeight::new(QType::Q6K, 2, 512, vec![0u8; 4 * 210]).is_ok());
    assert!(QWeight::new(QType::Q6K, 2, 512, vec![0u8; 4 * 210 + 1]).is_err());
    assert!(QWeight::new(QType::Q4K, 9, 32, vec![0u8; 144]).is_err());
    assert!(matches!(
        QWeight::from_f32(QType::Q4K, 1, 256, &[0.0; 256]),
        Err(KernelError::Unsupported(_))
    ));
}

/// A random k-quant matrix: its ggml bytes, the reference dequantization and the per-weight
/// magnitude of the terms the kernels sum.
fn random_k_weight(
    dtype: QType,
    rows: usize,
    cols: usize,
    rng: &mut Rng,
) -> (QWeight, Vec<f32>, Vec<f32>) {
    let nb = rows * cols / QK_K;
    let (bytes, wd, mag) = match dtype {
        QType::Q4K => {
            let x: Vec<_> = (0..nb).map(|_| rng.q4_k()).collect();
            let (wd, mag) = ref_dequantize_q4_k(&x);
            (blocks_as_bytes(&x).to_vec(), wd, mag)
        }
        QType::Q6K => {
            let x: Vec<_> = (0..nb).map(|_| rng.q6_k()).collect();
            let wd = ref_dequantize_q6_k(&x);
            let mag = wd.iter().map(|v| v.abs()).collect();
            (blocks_as_bytes(&x).to_vec(), wd, mag)
        }
        _ => unreachable!("{dtype:?} is not a k-quant"),
    };
    (QWeight::new(dtype, rows, cols, bytes).unwrap(), wd, mag)
}

/// Every k-quant product path against dequantize-then-multiply:
/// * vs dequantized weights × dequantized Q8_K activations (f64): only float rounding, within
///   1e-5 of Σ magnitude·|x̂| (the kernels' integer sums are exact; each block adds a few f32
///   roundings);
/// * vs dequantized weights × the f32 activations: Q8_K rounds each activation to within
///   |d_y|/2 of its block, so the error is at most Σ_blocks |d_y|/2 · Σ|w| (plus the above).
fn check_k_weight(dtype: QType, rows: usize, cols: usize, m: usize, pool: &KernelPool, seed: u64) {
    let mut rng = Rng::new(seed);
    let (w, wd, mag) = random_k_weight(dtype, rows, cols, &mut rng);
    let mut xs = rng.vec(m * cols);
    // per-block scales differ widely; one all-zero block
    xs.iter_mut().step_by(97).for_each(|x| *x *= 50.0);
    xs[..QK_K].iter_mut().for_each(|x| *x = 0.0);
    let (xq, out, out_s) = products_all_paths(&w, &xs, m, pool);
    let xd = deq_act_q8_k(xq.q8_k());
    let nb = cols / QK_K;
    for c in 0..m {
        let (xr, xdr) = (&xs[c * cols..][..cols], &xd[c * cols..][..cols]);
        let yb = &xq.q8_k()[c * nb..][..nb];
        for r in 0..rows {
            let (wr, mr) = (&wd[r * cols..][..cols], &mag[r * cols..][..cols]);
            let dot64 =
                |x: &[f32]| -> f64 { wr.iter().zip(x).map(|(&a, &b)| a as f64 * b as f64).sum() };
            let float_tol = 1e-5 * mr.iter().zip(xdr).map(|(a, b)| a * b.abs()).sum::<f32>() + 1e-6;
            let act_tol: f32 = yb
                .iter()
                .zip(wr.chunks_exact(QK_K))
                .map(|(y, w)| 0.5 * y.d.abs() * w.iter().map(|v| v.abs()).sum::<f32>())
                .sum();
            let (exact_q, exact) = (dot64(xdr), dot64(xr));
            let ctx = format!(
                "{dtype:?} {rows}x{cols} m={m} t={} row {r} act {c}",
                pool.n_threads()
            );
            for (path, got) in [
                ("kernel", out[c * rows + r]),
                ("scalar", out_s[c * rows + r]),
            ] {
                let got = got as f64;
                assert!(
                    (got - exact_q).abs() <= float_tol as f64,
                    "{ctx} {path}: {got} vs deq·deq {exact_q} (tol {float_tol})"
                );
                assert!(
                    (got - exact).abs() <= (act_tol * 1.0001 + float_tol) as f64,
                    "{ctx} {path}: {got} vs deq·x {exact} (tol {act_tol})"
                );
            }
        }
    }
    if m == 1 {
        let one = match dtype {
            QType::Q4K => vec_dot_q4_k_q8_k(cast_blocks(&w.bytes()[..w.row_bytes()]), xq.q8_k()),
            _ => vec_dot_q6_k_q8_k(cast_blocks(&w.bytes()[..w.row_bytes()]), xq.q8_k()),
        };
        assert_eq!(one, out[0], "{dtype:?} vec_dot vs matvec row 0");
    }
}

#[test]
fn k_quant_products_match_dequantized() {
    for threads in [1, 2] {
        let pool = KernelPool::new(threads);
        let mut seed = 200;
        for dtype in [QType::Q4K, QType::Q6K] {
            for (rows, cols) in [
                (1, 256),
                (3, 512),
                (5, 256),
                (7, 768),
                (13, 1280),
                (67, 512),
                (130, 2048),
            ] {
                for m in [1, 3, 4, 7] {
                    seed += 1;
                    check_k_weight(dtype, rows, cols, m, &pool, seed);
                }
            }
        }
    }
}

/// Where the CPU has AVX-VNNI, the legacy formats' VNNI kernels and the AVX2 ones both run
/// here and give the same bits: `vpdpbusd` sums the same exact byte products as `maddubs` +
/// `madd`, so a machine with VNNI replays a seed like one without.
#[test]
fn vnni_kernels_give_the_avx2_bits() {
    if !has_avx_vnni() {
        eprintln!("skipped: this CPU has no AVX-VNNI");
        return;
    }
    let pool = KernelPool::new(2);
    let mut rng = Rng::new(512);
    for dtype in [QType::Q4_0, QType::Q4_1, QType::Q5_0, QType::Q8_0] {
        for (rows, cols) in [(37, 96), (64, 576), (13, 1536)] {
            let w = QWeight::from_f32(dtype, rows, cols, &rng.vec(rows * cols)).unwrap();
            for m in [1, 3, 4, 9] {
                let xq = QuantizedActivation::new(w.act_kind(), &rng.vec(m * cols), m, cols);
                let run = |isa| {
                    let mut out = vec![f32::NAN; m * rows];
                    w.matmul_isa(isa, &pool, &xq, &mut out);
                    out.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
                };
                assert_eq!(
                    run(Isa::AvxVnni),
                    run(Isa::Avx2),
                    "{dtype:?} {rows}x{cols} m={m}"
                );
            }
        }
    }
}

/// The interleaved copies hold each row's elements where their docs say: element `4g + k` of
/// row `i` at byte `32g + 4i + k` (Q4_1: rows 0–3 low nibbles of bytes `16g + 4i + k`, rows
/// 4–7 the high ones), with each row's own scales.
#[test]
fn interleaved_groups_hold_each_rows_elements() {
    let mut rng = Rng::new(88);
    let nb = 3;
    let q41: Vec<BlockQ4_1> = (0..8 * nb).map(|_| rng.q4_1()).collect();
    let q50: Vec<BlockQ5_0> = (0..8 * nb).map(|_| rng.q5_0()).collect();
    let q80: Vec<BlockQ8_0> = (0..8 * nb).map(|_| rng.q8_0()).collect();
    let rows = |i: usize| i * nb..(i + 1) * nb;
    for b in 0..nb {
        let p41 = NibblesX8::pack_q4_1(std::array::from_fn(|i| &q41[rows(i)]), b);
        let p50 = BytesX8::pack_q5_0(std::array::from_fn(|i| &q50[rows(i)]), b);
        let p80 = BytesX8::pack_q8_0(std::array::from_fn(|i| &q80[rows(i)]), b);
        for i in 0..8 {
            let mut w41 = [0f32; QK];
            blocks::dequantize_row_q4_1(&q41[i * nb + b..][..1], &mut w41);
            let mut w50 = [0f32; QK];
            blocks::dequantize_row_q5_0(&q50[i * nb + b..][..1], &mut w50);
            let mut w80 = [0f32; QK];
            blocks::dequantize_row_q8_0(&q80[i * nb + b..][..1], &mut w80);
            for e in 0..QK {
                let (g, k) = (e / 4, e % 4);
                let byte = p41.qs[16 * g + 4 * (i % 4) + k];
                let n41 = if i < 4 { byte & 0x0F } else { byte >> 4 };
                let got41 = n41 as f32 * p41.d[i].to_f32() + p41.m[i].to_f32();
                assert_eq!(got41, w41[e], "Q4_1 row {i} element {e}");
                let got50 = (p50.qs[32 * g + 4 * i + k] as f32 - 16.0) * p50.d[i].to_f32();
                assert_eq!(got50, w50[e], "Q5_0 row {i} element {e}");
                let got80 = p80.qs[32 * g + 4 * i + k] as i8 as f32 * p80.d[i].to_f32();
                assert_eq!(got80, w80[e], "Q8_0 row {i} element {e}");
            }
        }
    }
}
