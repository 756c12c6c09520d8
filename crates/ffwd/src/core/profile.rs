//! A coarse wall-clock profiler for the training step: named regions (`span("attn.core")`)
//! accumulate their time into a process-wide table when profiling is switched on
//! ([`enable`], `ffwd lm train --profile`), and cost one relaxed atomic load when it is off.
//! Regions are opened on the calling thread around whole operations (each of which may use all
//! threads) and may nest (a linear map inside the FFN): a region records its own time only,
//! without the regions opened inside it, so the shares add up to the step's wall time.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Instant;

static ON: AtomicBool = AtomicBool::new(false);
static TABLE: Mutex<Vec<(&'static str, f64, u64)>> = Mutex::new(Vec::new());

thread_local! {
    /// Time spent in the regions nested inside each open region of this thread (innermost
    /// last).
    static NESTED: std::cell::RefCell<Vec<f64>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Switches profiling on or off (and clears the table when switching on).
pub fn enable(on: bool) {
    if on {
        TABLE.lock().unwrap_or_else(|e| e.into_inner()).clear();
    }
    ON.store(on, Ordering::Relaxed);
}

/// Switches profiling back on without clearing the table.
pub fn enable_keep() {
    ON.store(true, Ordering::Relaxed);
}

/// Whether regions are being recorded.
#[inline]
pub fn enabled() -> bool {
    ON.load(Ordering::Relaxed)
}

/// An open region: its time is added to `name` when dropped.
pub struct Span(Option<(&'static str, Instant)>);

/// Opens region `name` (a no-op when profiling is off).
#[inline]
pub fn span(name: &'static str) -> Span {
    let on = enabled();
    if on {
        NESTED.with(|n| n.borrow_mut().push(0.0));
    }
    Span(on.then(|| (name, Instant::now())))
}

impl Drop for Span {
    fn drop(&mut self) {
        if let Some((name, t0)) = self.0.take() {
            let total = t0.elapsed().as_secs_f64();
            let nested = NESTED.with(|n| {
                let mut n = n.borrow_mut();
                let inner = n.pop().unwrap_or(0.0);
                if let Some(outer) = n.last_mut() {
                    *outer += total;
                }
                inner
            });
            let dt = (total - nested).max(0.0);
            let mut t = TABLE.lock().unwrap_or_else(|e| e.into_inner());
            match t.iter_mut().find(|(n, _, _)| *n == name) {
                Some(e) => {
                    e.1 += dt;
                    e.2 += 1;
                }
                None => t.push((name, dt, 1)),
            }
        }
    }
}

/// The recorded regions, `(name, seconds, calls)`, largest first.
pub fn report() -> Vec<(&'static str, f64, u64)> {
    let mut t = TABLE.lock().unwrap_or_else(|e| e.into_inner()).clone();
    t.sort_by(|a, b| b.1.total_cmp(&a.1));
    t
}
