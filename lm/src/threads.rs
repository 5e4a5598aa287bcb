//! CPU thread count. candle sizes its pools from the environment on first use
//! (`CANDLE_NUM_THREADS` for quantized matmuls, `RAYON_NUM_THREADS` for f32 gemm), so this
//! must run before any tensor work: call it at the very start of `main`.

/// Sets the CPU threads used by model kernels. Call once, before loading a model.
pub fn set_cpu_threads(n: usize) {
    let n = n.max(1).to_string();
    std::env::set_var("CANDLE_NUM_THREADS", &n);
    std::env::set_var("RAYON_NUM_THREADS", &n);
}

/// The thread count in effect (what `set_cpu_threads` set, or the core count).
pub fn cpu_threads() -> usize {
    std::env::var("CANDLE_NUM_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}
