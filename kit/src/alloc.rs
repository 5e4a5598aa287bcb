//! Keeping a service's resident memory flat under glibc's malloc.
//!
//! The services run model work on blocking threads (a muse session, a majordomo critique), and
//! glibc gives threads their own arenas (up to 8 per core) and returns freed pages lazily: the
//! soak (`deploy/bench/soak.py`, BENCHMARKS.md) showed RSS creeping up turn after turn. Two
//! arenas bound the fragmentation; trimming once a session's buffers are dropped hands the
//! freed pages back. Elsewhere (musl, macOS) both are no-ops.

/// Call first thing in a service's `main`, before any thread exists.
pub fn limit_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets an allocator parameter; it is called before other threads run.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
}

/// Returns freed heap pages to the OS; call after dropping a large unit of work.
pub fn give_back() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim is thread-safe and only releases memory malloc no longer uses.
    unsafe {
        libc::malloc_trim(0);
    }
}
