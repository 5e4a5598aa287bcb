//! CPU thread count. candle sizes its pools from the environment on first use
//! (`CANDLE_NUM_THREADS` for quantized matmuls, `RAYON_NUM_THREADS` for f32 gemm), so this
//! must run before any tensor work: call it at the very start of `main`.

/// Spins a candle pool worker makes before it parks (candle's default: 25,000). Our kernels
/// run on our own pool; candle's workers only serve its small ops (norms, softmax, rope)
/// between them, and at 8 concurrent sessions on 2 cores their spinning took ~6% of the CPU.
const CANDLE_SPIN_LIMIT: &str = "500";

/// Sets the CPU threads used by model kernels. Call once, before loading a model. Always
/// call it: without the variables candle re-reads `/proc/cpuinfo` (`num_cpus::get_physical`)
/// for every parallel op, which cost ~2% of the CPU at 8 concurrent sessions.
pub fn set_cpu_threads(n: usize) {
    let n = n.max(1).to_string();
    std::env::set_var("CANDLE_NUM_THREADS", &n);
    std::env::set_var("RAYON_NUM_THREADS", &n);
    if std::env::var_os("CANDLE_BARRIER_POOL_SPIN_LIMIT").is_none() {
        std::env::set_var("CANDLE_BARRIER_POOL_SPIN_LIMIT", CANDLE_SPIN_LIMIT);
    }
}

/// The thread count in effect (what `set_cpu_threads` set, or the core count).
pub fn cpu_threads() -> usize {
    std::env::var("CANDLE_NUM_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}
