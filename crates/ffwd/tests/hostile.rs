//! Hostile files: mutated and truncated IDX, CSV, checkpoints of every format tag, TOML
//! configurations and training text. Each input must load or be refused with a one-line error
//! naming the file; never a panic, and never an allocation larger than the file justifies
//! (a header's claimed size is checked against the file before anything is allocated).
//! A bounded number of cases here; `cargo bench --bench fuzz` runs 100,000 per format.

mod support {
    pub mod peak_alloc;
}

use ffwd::fuzz::{campaign, Format};
use support::peak_alloc::{allowed, take_peak, PeakAlloc};

#[global_allocator]
static GLOBAL: PeakAlloc = PeakAlloc;

#[test]
fn mutated_inputs_of_every_format_are_refused_cleanly() {
    let cases: usize = std::env::var("FFWD_FUZZ_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(2000);
    for format in Format::ALL {
        let mut worst = (0usize, 0usize);
        take_peak();
        let t = campaign(format, cases, 42, &mut |len| {
            let peak = take_peak();
            if peak > allowed(len) && peak > worst.0 {
                worst = (peak, len);
            }
        })
        .unwrap();
        assert!(t.bad_messages.is_empty(), "{format:?}: errors that are not one line naming the file: {:#?}", t.bad_messages);
        assert_eq!(t.loaded + t.refused, cases, "{format:?}");
        assert!(t.refused > 0, "{format:?}: no mutation was refused: the mutator does not reach the parser");
        assert!(worst.0 == 0, "{format:?}: an input of {} bytes made the loader allocate {} bytes at once", worst.1, worst.0);
        eprintln!("{format:?}: {cases} cases, {} loaded, {} refused", t.loaded, t.refused);
    }
}
