//! The long hostile-input campaign: `cargo bench --bench fuzz [-- CASES]` (default 100,000
//! mutated inputs per format). Prints, per format, how many inputs loaded, how many were refused
//! with a one-line error naming the file, and how many broke the contract (a panic, a message
//! that is not one line naming the file, or an allocation larger than the file justifies).
//! Exits non-zero if any did.

#[path = "../tests/support/peak_alloc.rs"]
mod peak_alloc;

use std::panic::AssertUnwindSafe;

use ffwd::core::Rng;
use ffwd::fuzz::{load, mutate, seeds, Format};
use peak_alloc::{allowed, take_peak, PeakAlloc};

#[global_allocator]
static GLOBAL: PeakAlloc = PeakAlloc;

fn main() {
    let cases: usize = std::env::args().skip(1).find_map(|a| a.parse().ok()).unwrap_or(100_000);
    std::panic::set_hook(Box::new(|_| {}));
    let mut failed = false;
    println!("{:<24} {:>9} {:>9} {:>9} {:>7} {:>9} {:>10} {:>8}", "format", "cases", "loaded", "refused", "panics", "bad msgs", "over-alloc", "seconds");
    for format in Format::ALL {
        let seeds = seeds(format).expect("seed inputs");
        let mut rng = Rng::new(2026).fork(format as u64);
        let textual = matches!(format, Format::Csv | Format::TrainToml | Format::LmToml | Format::Text);
        let (mut loaded, mut refused, mut panics, mut bad, mut over) = (0, 0, 0, 0, 0);
        let t0 = std::time::Instant::now();
        for i in 0..cases {
            let input = mutate(&seeds[i % seeds.len()], textual, &mut rng);
            let len = input.len();
            take_peak();
            match std::panic::catch_unwind(AssertUnwindSafe(|| load(format, input, format.name()))) {
                Ok(Ok(())) => loaded += 1,
                Ok(Err(e)) => {
                    let msg = e.to_string();
                    if msg.contains('\n') || !msg.contains(format.name()) {
                        bad += 1;
                        if bad <= 3 {
                            eprintln!("{format:?}: bad message: {msg}");
                        }
                    } else {
                        refused += 1;
                    }
                }
                Err(_) => panics += 1,
            }
            if take_peak() > allowed(len) {
                over += 1;
            }
        }
        failed |= panics + bad + over > 0;
        println!("{:<24} {cases:>9} {loaded:>9} {refused:>9} {panics:>7} {bad:>9} {over:>10} {:>8.1}", format.name(), t0.elapsed().as_secs_f64());
    }
    if failed {
        std::process::exit(1);
    }
}
