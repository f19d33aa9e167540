//! A counting global allocator: the bytes the process has live on the heap, and their
//! high-water mark, so `kiln bench` can measure what a training step really holds.
//!
//! Every allocation and deallocation adds two relaxed atomic operations to the system
//! allocator's work; a training step allocates a few thousand buffers, so the cost is
//! unmeasurable beside the step. An allocation the system refuses ends the process with a
//! message and status 1, not an abort.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

/// The system allocator, counted.
pub struct Counting;

/// An allocation failed: say so and exit with status 1, rather than let the standard library
/// abort the process ("memory allocation of N bytes failed", status 134). Formats without
/// allocating: the heap has just refused.
fn out_of_memory(size: usize) -> ! {
    use std::io::Write;
    fn digits(mut n: usize, buf: &mut [u8; 24]) -> &[u8] {
        let mut i = buf.len();
        loop {
            i -= 1;
            buf[i] = b'0' + (n % 10) as u8;
            n /= 10;
            if n == 0 {
                break;
            }
        }
        &buf[i..]
    }
    let (mut a, mut b) = ([0u8; 24], [0u8; 24]);
    let mut err = std::io::stderr().lock();
    let _ = err.write_all(b"error: out of memory: an allocation of ");
    let _ = err.write_all(digits(size, &mut a));
    let _ = err.write_all(b" bytes failed with ");
    let _ = err.write_all(digits(live(), &mut b));
    let _ = err.write_all(
        b" bytes in use; shrink train.batch, train.seq_len or the model \
          (`kiln check` reports its memory)\n",
    );
    std::process::exit(1)
}

fn grew(by: usize) {
    let now = LIVE.fetch_add(by, Ordering::Relaxed) + by;
    PEAK.fetch_max(now, Ordering::Relaxed);
}

// SAFETY: every method forwards to `System` with the caller's arguments unchanged; the counters
// are plain atomics that never affect what is allocated. A refused allocation ends the process
// (`out_of_memory`) instead of returning null: nothing in kiln recovers from one.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded as received.
        let p = unsafe { System.alloc(layout) };
        if p.is_null() {
            out_of_memory(layout.size());
        }
        grew(layout.size());
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded as received.
        let p = unsafe { System.alloc_zeroed(layout) };
        if p.is_null() {
            out_of_memory(layout.size());
        }
        grew(layout.size());
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded as received.
        unsafe { System.dealloc(ptr, layout) };
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: forwarded as received.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if p.is_null() {
            out_of_memory(new_size);
        }
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        grew(new_size);
        p
    }
}

/// Bytes live on the heap now.
pub fn live() -> usize {
    LIVE.load(Ordering::Relaxed)
}

/// The most bytes live at once since the last [`reset_peak`] (or since start-up).
pub fn peak() -> usize {
    PEAK.load(Ordering::Relaxed)
}

/// Starts a new high-water mark from what is live now.
pub fn reset_peak() {
    PEAK.store(live(), Ordering::Relaxed);
}
