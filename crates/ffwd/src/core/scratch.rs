//! Buffers that only grow: per-layer caches sized to the largest batch seen, and thread-local
//! scratch that a hot loop borrows instead of allocating.

use std::cell::RefCell;
use std::thread::LocalKey;

/// Grows `v` to at least `n` values (allocates only when `n` exceeds every earlier size).
pub(crate) fn grow(v: &mut Vec<f32>, n: usize) {
    if v.len() < n {
        v.resize(n, 0.0);
    }
}

/// Runs `f` with this thread's buffer `key` grown to `n` values. If the buffer is already in
/// use further up this thread's stack (a job that rayon ran on this thread while it waited
/// inside another user of the buffer), `f` gets a temporary buffer instead.
/// The buffer starts on a 64-byte boundary, so that vector loads of packed panels never
/// straddle two cache lines.
pub(crate) fn with_buffer<R>(key: &'static LocalKey<RefCell<Vec<f32>>>, n: usize, f: impl FnOnce(&mut [f32]) -> R) -> R {
    fn aligned(v: &mut Vec<f32>, n: usize) -> &mut [f32] {
        grow(v, n + 16);
        let off = v.as_ptr().align_offset(64).min(16);
        &mut v[off..off + n]
    }
    key.with(|cell| match cell.try_borrow_mut() {
        Ok(mut v) => f(aligned(&mut v, n)),
        Err(_) => f(aligned(&mut Vec::new(), n)),
    })
}
