//! A global allocator that records the largest single allocation since the last reset (for the
//! hostile-input tests: no header may make a loader allocate more than its file justifies).

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

pub struct PeakAlloc;

static PEAK: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for PeakAlloc {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        PEAK.fetch_max(l.size(), Ordering::Relaxed);
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        PEAK.fetch_max(l.size(), Ordering::Relaxed);
        unsafe { System.alloc_zeroed(l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, n: usize) -> *mut u8 {
        PEAK.fetch_max(n, Ordering::Relaxed);
        unsafe { System.realloc(p, l, n) }
    }
}

/// The largest allocation since the last call, and a reset.
pub fn take_peak() -> usize {
    PEAK.swap(0, Ordering::Relaxed)
}

/// Largest allocation a load of an `len`-byte file may make: the decoded values (an f32 per
/// IDX byte, a `char` per text byte), parameters and their gradients, plus fixed buffers.
pub fn allowed(len: usize) -> usize {
    8 * len + (1 << 20)
}
