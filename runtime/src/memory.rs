//! Process-wide allocator settings for training loops.

/// Asks the C allocator to keep freed memory for reuse instead of handing large blocks back
/// to the operating system.
///
/// A training step allocates and frees the same tensors (up to tens of MiB) every step.
/// glibc's malloc serves blocks above its mmap threshold (128 KiB at first) with fresh
/// mappings and unmaps them on free, so every step pays page faults, page zeroing and TLB
/// shootdowns between threads: about a tenth of a step of the anchor model on 2 cores
/// (docs/perf.md). Raising the mmap and trim thresholds keeps those blocks in the heap, where
/// the next step reuses them. Call once at start-up; it changes no result, and it is a no-op
/// on other C libraries.
pub fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: `mallopt` only adjusts allocator parameters; any values are valid to pass, and
    // glibc rejects out-of-range ones by returning 0, which leaves the defaults in place.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
    }
}
