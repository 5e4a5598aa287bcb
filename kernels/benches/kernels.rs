//! Matrix-vector micro-benchmark for the SmolLM2-135M / Gemma-3-270M shapes.
//!
//!   cargo bench -p mm-kernels --bench kernels                 # candle at its default thread count
//!   CANDLE_NUM_THREADS=1 cargo bench -p mm-kernels --bench kernels
//!   BENCH_FILTER=kq cargo bench -p mm-kernels --bench kernels # only the k-quant table
//!
//! "hot": one weight matrix, resident in L2/L3. "cold": rotating over enough copies to exceed
//! the L3 (as in a real decode step, where the whole model streams from DRAM each token).
//! Times include quantizing the f32 activation (as candle's forward does). GB/s = weight bytes
//! / time. Candle's thread count is fixed per process (CANDLE_NUM_THREADS / RAYON_NUM_THREADS).
//! Optional: BENCH_FILTER=substring, BENCH_COLD_MB (default 160).

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{Device, Module, Tensor};
use mm_kernels::{matmul_multi, ActKind, KernelPool, QType, QWeight, QuantizedActivation};
use rayon::prelude::*;
use std::hint::black_box;
use std::time::{Duration, Instant};

struct Rng(u64);
impl Rng {
    fn f32(&mut self) -> f32 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        let v = self.0.wrapping_mul(0x2545F4914F6CDD1D);
        ((v >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
    fn vec(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.f32()).collect()
    }
}

/// Best-of-5 mean time per call of `f(i)` (i = call counter, for rotating copies).
fn time<F: FnMut(usize)>(mut f: F) -> Duration {
    let mut i = 0usize;
    // warm up & calibrate to ~40 ms per batch
    let t = Instant::now();
    let mut n = 0;
    while t.elapsed() < Duration::from_millis(40) {
        f(i);
        i += 1;
        n += 1;
    }
    let mut best = Duration::MAX;
    for _ in 0..5 {
        let t = Instant::now();
        for _ in 0..n {
            f(i);
            i += 1;
        }
        best = best.min(t.elapsed() / n as u32);
    }
    best
}

fn fmt(d: Duration, bytes: usize) -> String {
    let us = d.as_secs_f64() * 1e6;
    format!(
        "{:>8.1} µs {:>6.1} GB/s",
        us,
        bytes as f64 / d.as_secs_f64() / 1e9
    )
}

fn cpu_ticks() -> u64 {
    // utime + stime of this process, in clock ticks (Linux).
    std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|s| {
            let rest = &s[s.rfind(')')? + 2..];
            let f: Vec<&str> = rest.split_whitespace().collect();
            Some(f[11].parse::<u64>().ok()? + f[12].parse::<u64>().ok()?)
        })
        .unwrap_or(0)
}

fn candle_dtype(dtype: QType) -> GgmlDType {
    match dtype {
        QType::Q4_0 => GgmlDType::Q4_0,
        QType::Q4_1 => GgmlDType::Q4_1,
        QType::Q5_0 => GgmlDType::Q5_0,
        QType::Q8_0 => GgmlDType::Q8_0,
        QType::Q4K => GgmlDType::Q4K,
        QType::Q6K => GgmlDType::Q6K,
    }
}

/// Q4_K / Q6_K products (decode m = 1 and prefill batches) against candle's `QMatMul` on the
/// same bytes (candle-quantized random weights), weights hot. Shapes: the k-quant tensors of
/// Gemma-3-270M Q4_K_M (attn_output 1024→640 Q4_K; ffn_down 2048→640, half Q4_K, half Q6_K)
/// and of Gemma-3-1B (ffn_down 6912→1152, attn_output 1024→1152; its 1152-wide inputs are not
/// a multiple of 256, so those tensors are never k-quants).
fn kquant_products(p1: &KernelPool, p2: &KernelPool, rng: &mut Rng) {
    let dev = Device::Cpu;
    let shapes: &[(&str, QType, usize, usize)] = &[
        ("270m attn_output 1024→640", QType::Q4K, 1024, 640),
        ("270m ffn_down 2048→640", QType::Q4K, 2048, 640),
        ("270m ffn_down 2048→640", QType::Q6K, 2048, 640),
        ("1b attn_output 1024→1152", QType::Q4K, 1024, 1152),
        ("1b ffn_down 6912→1152", QType::Q4K, 6912, 1152),
        ("1b ffn_down 6912→1152", QType::Q6K, 6912, 1152),
    ];
    println!(
        "\nk-quants, hot, µs per call (candle {} threads):",
        candle_core::utils::get_num_threads()
    );
    println!(
        "{:<26} {:>4} {:>4} | {:>9} | {:>9} | {:>9} | {:>8}",
        "shape", "type", "m", "ours 2T", "ours 1T", "candle", "candle/2T"
    );
    for &(label, dtype, cols, rows) in shapes {
        let t = Tensor::from_vec(rng.vec(rows * cols), (rows, cols), &dev).unwrap();
        let cq = QTensor::quantize(&t, candle_dtype(dtype)).unwrap();
        let w = QWeight::new(dtype, rows, cols, cq.data().unwrap().to_vec()).unwrap();
        let cmm = QMatMul::from_qtensor(cq).unwrap();
        for m in [1usize, 8, 64] {
            let xs = rng.vec(m * cols);
            let xt = Tensor::from_vec(xs.clone(), (m, cols), &dev).unwrap();
            let mut out = vec![0f32; m * rows];
            let t2 = time(|_| w.matmul(p2, black_box(&xs), m, &mut out));
            let t1 = time(|_| w.matmul(p1, black_box(&xs), m, &mut out));
            let tc = time(|_| {
                black_box(cmm.forward(&xt).unwrap());
            });
            let us = |d: Duration| d.as_secs_f64() * 1e6;
            println!(
                "{:<26} {:>4} {:>4} | {:>9.1} | {:>9.1} | {:>9.1} | {:>7.2}×",
                label,
                format!("{dtype:?}"),
                m,
                us(t2),
                us(t1),
                us(tc),
                us(tc) / us(t2)
            );
        }
    }
}

fn rayon_matvec(
    pool: &rayon::ThreadPool,
    w: &QWeight,
    xq: &QuantizedActivation,
    out: &mut [f32],
    chunks: usize,
) {
    let chunk = w.rows().div_ceil(chunks).next_multiple_of(4);
    pool.install(|| {
        out.par_chunks_mut(chunk).enumerate().for_each(|(i, o)| {
            let r0 = i * chunk;
            w.matvec_rows(xq, r0..r0 + o.len(), o)
        })
    })
}

fn main() {
    let filter = std::env::var("BENCH_FILTER").unwrap_or_default();
    let cold_mb: usize = std::env::var("BENCH_COLD_MB")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(160);
    let candle_threads = candle_core::utils::get_num_threads();
    println!(
        "avx2 kernels: {} | candle threads: {} (CANDLE_NUM_THREADS={:?})",
        mm_kernels::has_avx2(),
        candle_threads,
        std::env::var("CANDLE_NUM_THREADS").ok()
    );
    let p1 = KernelPool::new(1);
    let p2 = KernelPool::new(2);
    let rayon2 = rayon::ThreadPoolBuilder::new()
        .num_threads(2)
        .build()
        .unwrap();
    let dev = Device::Cpu;
    let mut rng = Rng(0x1234_5678_9abc_def1);

    // (label, dtype, in=cols, out=rows)
    let shapes: &[(&str, QType, usize, usize)] = &[
        ("smol q/o 576→576", QType::Q4_1, 576, 576),
        ("smol k/v 576→192", QType::Q4_1, 576, 192),
        ("smol gate/up 576→1536", QType::Q4_1, 576, 1536),
        ("smol down 1536→576", QType::Q4_1, 1536, 576),
        ("smol lm_head 576→49152", QType::Q4_1, 576, 49152),
        ("smol lm_head 576→49152 Q8_0", QType::Q8_0, 576, 49152),
        ("gate/up 576→1536 Q8_0", QType::Q8_0, 576, 1536),
        ("gemma gate/up 640→2048 Q5_0", QType::Q5_0, 640, 2048),
        ("gemma down 2048→640 Q5_0", QType::Q5_0, 2048, 640),
    ];

    if filter.is_empty() || filter == "membw" {
        // Raw read bandwidth: sum a 256 MiB buffer, 1 and 2 threads.
        let buf: Vec<u64> = (0..(256usize << 20) / 8).map(|i| i as u64).collect();
        let sum = |s: &[u64]| s.iter().fold(0u64, |a, &b| a.wrapping_add(b));
        let t1 = time(|_| {
            black_box(sum(black_box(&buf)));
        });
        let t2 = time(|_| {
            let (a, b) = buf.split_at(buf.len() / 2);
            std::thread::scope(|s| {
                let h = s.spawn(|| sum(a));
                black_box(sum(b));
                black_box(h.join().unwrap());
            });
        });
        println!(
            "DRAM read bandwidth (sum 256 MiB): 1T {}, 2T {}",
            fmt(t1, 256 << 20),
            fmt(t2, 256 << 20)
        );
        if filter == "membw" {
            return;
        }
    }

    let any_shape = shapes.iter().any(|s| s.0.contains(filter.as_str()));
    if any_shape {
        println!(
            "\n{:<30} {:>5} | {:>23} | {:>23} | {:>23} | {:>23} | {:>23}",
            "shape",
            "cache",
            "ours 1T",
            "ours 2T (KernelPool)",
            "ours 2T (rayon)",
            "candle same dtype",
            "candle Q8_0"
        );
    }
    for &(label, dtype, cols, rows) in shapes {
        if !label.contains(filter.as_str()) {
            continue;
        }
        let wf = rng.vec(rows * cols);
        let w = QWeight::from_f32(dtype, rows, cols, &wf).unwrap();
        let bytes = w.bytes().len();
        let gd = candle_dtype(dtype);
        // candle on the very same bytes
        let cq = QTensor::new(
            candle_core::quantized::QStorage::from_data(
                std::borrow::Cow::Borrowed(w.bytes()),
                &dev,
                gd,
            )
            .unwrap(),
            (rows, cols),
        )
        .unwrap();
        // requantized to Q8_0 from the dequantized weights (what "requantize to Q8_0" does)
        let deq = cq.dequantize(&dev).unwrap();
        let c8 = QTensor::quantize(&deq, GgmlDType::Q8_0).unwrap();
        let c8_bytes = c8.storage_size_in_bytes();
        let cmm = QMatMul::from_qtensor(cq).unwrap();
        let c8mm = QMatMul::from_qtensor(c8).unwrap();

        let xs = rng.vec(cols);
        let xt = Tensor::from_vec(xs.clone(), (1, cols), &dev).unwrap();
        let mut out = vec![0f32; rows];
        let mut xq = QuantizedActivation::default();

        // hot
        let t1 = time(|_| w.matmul(&p1, black_box(&xs), 1, &mut out));
        let t2 = time(|_| w.matmul(&p2, black_box(&xs), 1, &mut out));
        let tr = time(|_| {
            xq.quantize(w.act_kind(), black_box(&xs), 1, cols);
            rayon_matvec(&rayon2, &w, &xq, &mut out, 8);
        });
        let tc = time(|_| {
            black_box(cmm.forward(&xt).unwrap());
        });
        let tc8 = time(|_| {
            black_box(c8mm.forward(&xt).unwrap());
        });
        println!(
            "{:<30} {:>5} | {} | {} | {} | {} | {}",
            label,
            "hot",
            fmt(t1, bytes),
            fmt(t2, bytes),
            fmt(tr, bytes),
            fmt(tc, bytes),
            fmt(tc8, c8_bytes)
        );

        // cold: rotate over copies (distinct allocations) totalling > L3
        let copies = (cold_mb << 20).div_ceil(bytes).clamp(2, 64);
        let ws: Vec<QWeight> = (0..copies)
            .map(|_| QWeight::new(dtype, rows, cols, w.bytes().to_vec()).unwrap())
            .collect();
        let cms: Vec<QMatMul> = (0..copies)
            .map(|_| {
                let s = candle_core::quantized::QStorage::from_data(
                    std::borrow::Cow::Borrowed(w.bytes()),
                    &dev,
                    gd,
                )
                .unwrap();
                QMatMul::from_qtensor(QTensor::new(s, (rows, cols)).unwrap()).unwrap()
            })
            .collect();
        let c8s: Vec<QMatMul> = (0..copies)
            .map(|_| {
                QMatMul::from_qtensor(QTensor::quantize(&deq, GgmlDType::Q8_0).unwrap()).unwrap()
            })
            .collect();
        let t1 = time(|i| ws[i % copies].matmul(&p1, black_box(&xs), 1, &mut out));
        let t2 = time(|i| ws[i % copies].matmul(&p2, black_box(&xs), 1, &mut out));
        let tr = time(|i| {
            xq.quantize(w.act_kind(), black_box(&xs), 1, cols);
            rayon_matvec(&rayon2, &ws[i % copies], &xq, &mut out, 8);
        });
        let tc = time(|i| {
            black_box(cms[i % copies].forward(&xt).unwrap());
        });
        let tc8 = time(|i| {
            black_box(c8s[i % copies].forward(&xt).unwrap());
        });
        println!(
            "{:<30} {:>5} | {} | {} | {} | {} | {}",
            "",
            "cold",
            fmt(t1, bytes),
            fmt(t2, bytes),
            fmt(tr, bytes),
            fmt(tc, bytes),
            fmt(tc8, c8_bytes)
        );
    }

    if filter.is_empty() || filter == "model" {
        model_sim(&p1, &p2, &mut rng);
    }

    if filter.is_empty() || filter == "kq" {
        kquant_products(&p1, &p2, &mut rng);
    }

    if filter.is_empty() || filter == "attention" {
        attention(&p1, &p2, &mut rng);
    }

    if !filter.is_empty() && !"pool".contains(filter.as_str()) {
        return;
    }

    // Small batches (prefill): ours vs candle on Q4_1 576→1536, per token.
    println!("\nsmall-m matmul, Q4_1 576→1536 (µs per call / per row):");
    let (cols, rows) = (576, 1536);
    let w = QWeight::from_f32(QType::Q4_1, rows, cols, &rng.vec(rows * cols)).unwrap();
    let cq = QTensor::new(
        candle_core::quantized::QStorage::from_data(
            std::borrow::Cow::Borrowed(w.bytes()),
            &dev,
            GgmlDType::Q4_1,
        )
        .unwrap(),
        (rows, cols),
    )
    .unwrap();
    let wdeq = cq.dequantize(&dev).unwrap();
    let wdeq_t = wdeq.t().unwrap().contiguous().unwrap();
    let cmm = QMatMul::from_qtensor(cq).unwrap();
    let c8mm = QMatMul::from_qtensor(QTensor::quantize(&wdeq, GgmlDType::Q8_0).unwrap()).unwrap();
    println!(
        "{:>5} | {:>20} | {:>20} | {:>20} | {:>20} | {:>20}",
        "m", "ours 2T", "ours 1T", "candle Q4_1", "candle Q8_0", "candle f32 matmul"
    );
    for m in [1usize, 2, 4, 8, 16, 32, 64, 128, 512] {
        let xs = rng.vec(m * cols);
        let xt = Tensor::from_vec(xs.clone(), (m, cols), &dev).unwrap();
        let mut out = vec![0f32; m * rows];
        let t2 = time(|_| w.matmul(&p2, black_box(&xs), m, &mut out));
        let t1 = time(|_| w.matmul(&p1, black_box(&xs), m, &mut out));
        let tc = time(|_| {
            black_box(cmm.forward(&xt).unwrap());
        });
        let tc8 = time(|_| {
            black_box(c8mm.forward(&xt).unwrap());
        });
        let tf = time(|_| {
            black_box(xt.matmul(&wdeq_t).unwrap());
        });
        let f = |d: Duration| {
            format!(
                "{:>9.1} / {:>7.2}",
                d.as_secs_f64() * 1e6,
                d.as_secs_f64() * 1e6 / m as f64
            )
        };
        println!(
            "{:>5} | {} | {} | {} | {} | {}",
            m,
            f(t2),
            f(t1),
            f(tc),
            f(tc8),
            f(tf)
        );
    }

    // Pool overhead, wake-up, idle CPU, oversubscription.
    println!("\npool:");
    let noop = time(|_| p2.run(2, |_| {}));
    let rnoop = time(|_| rayon2.install(|| (0..2).into_par_iter().for_each(|_| {})));
    println!(
        "  empty 2-chunk job, workers spinning: KernelPool {:.2} µs, rayon {:.2} µs",
        noop.as_secs_f64() * 1e6,
        rnoop.as_secs_f64() * 1e6
    );
    let mut worst = Duration::ZERO;
    let mut sum = Duration::ZERO;
    for _ in 0..20 {
        std::thread::sleep(Duration::from_millis(3)); // workers park
        let t = Instant::now();
        p2.run(2, |_| {});
        let e = t.elapsed();
        worst = worst.max(e);
        sum += e;
    }
    println!(
        "  empty job after workers parked: mean {:.1} µs, worst {:.1} µs",
        sum.as_secs_f64() * 1e6 / 20.0,
        worst.as_secs_f64() * 1e6
    );
    let c0 = cpu_ticks();
    std::thread::sleep(Duration::from_millis(500));
    let c1 = cpu_ticks();
    println!(
        "  CPU used by the whole process while idle for 500 ms: {} ticks (1 tick = 10 ms)",
        c1 - c0
    );

    // Oversubscribed: one busy thread competing for the 2 cores.
    let (cols, rows) = (576, 1536);
    let w = QWeight::from_f32(QType::Q4_1, rows, cols, &rng.vec(rows * cols)).unwrap();
    let xs = rng.vec(cols);
    let mut out = vec![0f32; rows];
    let mut xq = QuantizedActivation::new(ActKind::Q8_1, &xs, 1, cols);
    let stop = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|s| {
        s.spawn(|| {
            let mut x = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                x = black_box(x.wrapping_mul(31).wrapping_add(1));
            }
        });
        std::thread::sleep(Duration::from_millis(20));
        let t1 = time(|_| w.matmul(&p1, black_box(&xs), 1, &mut out));
        let t2 = time(|_| w.matmul(&p2, black_box(&xs), 1, &mut out));
        let tr = time(|_| {
            xq.quantize(ActKind::Q8_1, black_box(&xs), 1, cols);
            rayon_matvec(&rayon2, &w, &xq, &mut out, 8);
        });
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        println!(
            "  oversubscribed (1 busy thread), Q4_1 576→1536 hot: ours 1T {:.1} µs, KernelPool 2T {:.1} µs, rayon 2T {:.1} µs",
            t1.as_secs_f64() * 1e6,
            t2.as_secs_f64() * 1e6,
            tr.as_secs_f64() * 1e6
        );
    });
}

/// All matrix-vector products of one SmolLM2-135M decode step (30 layers × q,k,v,o,gate,up,down
/// Q4_1 + the tied Q8_0 lm_head), weights distinct (96 MB, streamed from DRAM like a real step).
/// Causal attention in SmolLM2-135M's shape (9 query heads over 3 kv heads of 64): a turn's
/// prime (87 new rows after 895 cached positions, as turn 12 of `muse bench --turns 12`), and a
/// decode step at that length. GFLOP/s counts the two products (q·k and p·v), 2 flops a term.
fn attention(p1: &KernelPool, p2: &KernelPool, rng: &mut Rng) {
    use mm_kernels::attention::{causal_attention, AttentionShape, KvView};
    let shape = AttentionShape {
        heads: 9,
        kv_heads: 3,
        head_dim: 64,
        scale: 0.125,
        window: None,
    };
    let (stride, len) = (1024, 982);
    let k = rng.vec(shape.kv_heads * stride * shape.head_dim);
    let v = rng.vec(shape.kv_heads * stride * shape.head_dim);
    let kv = KvView {
        k: &k,
        v: &v,
        head_stride: stride,
        len,
    };
    println!("\nattention (SmolLM2 shape, {len} positions)      1 thread      2 threads");
    for (label, n) in [("prime, 87 rows", 87), ("step, 1 row", 1)] {
        let pos = len - n;
        let q = rng.vec(shape.heads * n * shape.head_dim);
        let mut out = vec![0f32; n * shape.heads * shape.head_dim];
        // Keys each row sees, times heads, times the two products.
        let flops: usize =
            (pos..len).map(|at| at + 1).sum::<usize>() * shape.heads * shape.head_dim * 4;
        let mut run = |pool: &KernelPool| {
            time(|_| causal_attention(pool, &shape, black_box(&q), n, pos, &kv, &mut out))
        };
        let (t1, t2) = (run(p1), run(p2));
        let gf = |t: Duration| flops as f64 / t.as_secs_f64() / 1e9;
        println!(
            "  {label:<36} {:>7.3} ms {:>5.1} GF/s {:>7.3} ms {:>5.1} GF/s",
            t1.as_secs_f64() * 1e3,
            gf(t1),
            t2.as_secs_f64() * 1e3,
            gf(t2)
        );
    }
}

fn model_sim(p1: &KernelPool, p2: &KernelPool, rng: &mut Rng) {
    let dev = Device::Cpu;
    let (h, f, kv, vocab, layers) = (576usize, 1536usize, 192usize, 49152usize, 30usize);
    // (rows, cols) per layer: q, k, v, o, gate, up, down
    let shapes = [(h, h), (kv, h), (kv, h), (h, h), (f, h), (f, h), (h, f)];
    let base: Vec<QWeight> = shapes
        .iter()
        .map(|&(r, c)| QWeight::from_f32(QType::Q4_1, r, c, &rng.vec(r * c)).unwrap())
        .collect();
    let ours: Vec<Vec<QWeight>> = (0..layers)
        .map(|_| {
            base.iter()
                .map(|w| QWeight::new(QType::Q4_1, w.rows(), w.cols(), w.bytes().to_vec()).unwrap())
                .collect()
        })
        .collect();
    let head = QWeight::from_f32(QType::Q8_0, vocab, h, &rng.vec(vocab * h)).unwrap();
    let to_candle = |w: &QWeight, gd: GgmlDType| {
        let s = candle_core::quantized::QStorage::from_data(
            std::borrow::Cow::Borrowed(w.bytes()),
            &dev,
            gd,
        )
        .unwrap();
        QTensor::new(s, (w.rows(), w.cols())).unwrap()
    };
    let cand: Vec<Vec<QMatMul>> = ours
        .iter()
        .map(|l| {
            l.iter()
                .map(|w| QMatMul::from_qtensor(to_candle(w, GgmlDType::Q4_1)).unwrap())
                .collect()
        })
        .collect();
    let cand8: Vec<Vec<QMatMul>> = ours
        .iter()
        .map(|l| {
            l.iter()
                .map(|w| {
                    let d = to_candle(w, GgmlDType::Q4_1).dequantize(&dev).unwrap();
                    QMatMul::from_qtensor(QTensor::quantize(&d, GgmlDType::Q8_0).unwrap()).unwrap()
                })
                .collect()
        })
        .collect();
    let chead = QMatMul::from_qtensor(to_candle(&head, GgmlDType::Q8_0)).unwrap();
    let bytes: usize = ours
        .iter()
        .flatten()
        .map(|w| w.bytes().len())
        .sum::<usize>()
        + head.bytes().len();

    let xs = rng.vec(f);
    let (xh, xf) = (&xs[..h], &xs[..f]);
    let mut outs: Vec<Vec<f32>> = shapes.iter().map(|&(r, _)| vec![0f32; r]).collect();
    let mut logits = vec![0f32; vocab];
    let mut xq = QuantizedActivation::default();
    let mut xq2 = QuantizedActivation::default();

    let mut step_sep = |pool: &KernelPool| {
        for l in &ours {
            xq.quantize(ActKind::Q8_1, xh, 1, h);
            for (k, w) in l.iter().enumerate().take(6) {
                w.matvec(pool, &xq, &mut outs[k]);
            }
            xq2.quantize(ActKind::Q8_1, xf, 1, f);
            l[6].matvec(pool, &xq2, &mut outs[6]);
        }
        xq.quantize(ActKind::Q8_0, xh, 1, h);
        head.matvec(pool, &xq, &mut logits);
    };
    let t1 = time(|_| step_sep(p1));
    let t2 = time(|_| step_sep(p2));
    let mut step_multi = |pool: &KernelPool| {
        for l in &ours {
            xq.quantize(ActKind::Q8_1, xh, 1, h);
            let (a, rest) = outs.split_at_mut(3);
            let (o, rest) = rest.split_at_mut(1);
            let (gu, down) = rest.split_at_mut(2);
            let [q, k, v] = a else { unreachable!() };
            matmul_multi(pool, &[&l[0], &l[1], &l[2]], &xq, &mut [q, k, v]);
            l[3].matvec(pool, &xq, &mut o[0]);
            let [g, u] = gu else { unreachable!() };
            matmul_multi(pool, &[&l[4], &l[5]], &xq, &mut [g, u]);
            xq2.quantize(ActKind::Q8_1, xf, 1, f);
            l[6].matvec(pool, &xq2, &mut down[0]);
        }
        xq.quantize(ActKind::Q8_0, xh, 1, h);
        head.matvec(pool, &xq, &mut logits);
    };
    let t2m = time(|_| step_multi(p2));
    let xth = Tensor::from_vec(xh.to_vec(), (1, h), &dev).unwrap();
    let xtf = Tensor::from_vec(xf.to_vec(), (1, f), &dev).unwrap();
    let candle_step = |layers: &Vec<Vec<QMatMul>>| {
        for l in layers {
            for mm in l.iter().take(6) {
                black_box(mm.forward(&xth).unwrap());
            }
            black_box(l[6].forward(&xtf).unwrap());
        }
        black_box(chead.forward(&xth).unwrap());
    };
    // Interleaved with candle work (as in a real layer: norms, rope, attention between the
    // products): does the spinning worker slow candle down? A small candle matmul (attention-
    // like, 9×64 · 64×256) and a few element-wise ops per product group.
    let q = Tensor::from_vec(rng.vec(9 * 64), (9, 64), &dev).unwrap();
    let kt = Tensor::from_vec(rng.vec(64 * 256), (64, 256), &dev).unwrap();
    let candle_ops = || {
        let a = q.matmul(&kt).unwrap();
        let a = candle_core::Tensor::exp(&a).unwrap();
        let n = a.sum_keepdim(1).unwrap();
        black_box(a.broadcast_div(&n).unwrap());
        black_box(xth.sqr().unwrap().mean_keepdim(1).unwrap().sqrt().unwrap());
    };
    let p2_nospin = KernelPool::with_spin(2, Duration::ZERO);
    let mut step_mixed = |pool: Option<&KernelPool>| {
        for l in &ours {
            candle_ops();
            if let Some(pool) = pool {
                xq.quantize(ActKind::Q8_1, xh, 1, h);
                let (a, rest) = outs.split_at_mut(3);
                let (o, rest) = rest.split_at_mut(1);
                let (gu, down) = rest.split_at_mut(2);
                let [q, k, v] = a else { unreachable!() };
                matmul_multi(pool, &[&l[0], &l[1], &l[2]], &xq, &mut [q, k, v]);
                candle_ops();
                l[3].matvec(pool, &xq, &mut o[0]);
                candle_ops();
                let [g, u] = gu else { unreachable!() };
                matmul_multi(pool, &[&l[4], &l[5]], &xq, &mut [g, u]);
                xq2.quantize(ActKind::Q8_1, xf, 1, f);
                l[6].matvec(pool, &xq2, &mut down[0]);
            } else {
                candle_ops();
                candle_ops();
            }
        }
    };
    let t_ops = time(|_| step_mixed(None));
    let t_mix1 = time(|_| step_mixed(Some(p1)));
    let t_mix2 = time(|_| step_mixed(Some(p2)));
    let t_mix2n = time(|_| step_mixed(Some(&p2_nospin)));
    let tc = time(|_| candle_step(&cand));
    let tc8 = time(|_| candle_step(&cand8));
    let line = |name: &str, t: Duration| {
        println!(
            "  {name:<44} {:>8.2} ms/token  {:>6.1} tok/s (matvec only)  {:>5.1} GB/s",
            t.as_secs_f64() * 1e3,
            1.0 / t.as_secs_f64(),
            bytes as f64 / t.as_secs_f64() / 1e9
        );
    };
    println!(
        "\nSmolLM2-135M decode step, all 211 matvecs ({:.1} MB of weights):",
        bytes as f64 / 1e6
    );
    line("ours 1T", t1);
    line("ours 2T", t2);
    line("ours 2T, q/k/v and gate/up fused (matmul_multi)", t2m);
    line("candle QMatMul Q4_1 (layers), Q8_0 head", tc);
    let ms = |t: Duration| t.as_secs_f64() * 1e3;
    println!(
        "  layers interleaved with candle ops (90 small candle op groups; candle {} threads):\n    \
         candle ops alone {:.2} ms; + our products: 1T {:.2} ms, 2T {:.2} ms, 2T without spinning {:.2} ms",
        candle_core::utils::get_num_threads(),
        ms(t_ops),
        ms(t_mix1),
        ms(t_mix2),
        ms(t_mix2n)
    );
    line("candle QMatMul Q8_0 (requantized layers + head)", tc8);
}
