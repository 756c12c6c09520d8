//! # ffwd
//!
//! Feedforward networks and their conditional-computation variants on CPUs: dense FFNs,
//! Fast Feedforward Networks (FFF) and UltraFastBERT trees, with explicit forward and backward
//! passes on our own compute core (row-major f32, the `gemm` crate, rayon).
//!
//! Layout: [`core`] (tensors, GEMM, kernels, fixed-point solvers, RNG), [`kernels`] (immutable
//! inference kernels), [`layers`], [`models`] (classifier, language model, forecaster),
//! [`optim`], [`train`] (training algorithms, data parallelism), [`data`], [`checkpoint`]
//! (persistence), [`convert`] (interop), [`config`] (run configurations), [`spec`] (the
//! builders from a configuration to a model) and [`report`] (HTML reports, FFN inspection).
//! [`prelude`] imports the common types.
//!
//! The `ffwd` binary (crate `ffwd-cli`), the Python package (`python/`) and the server are
//! shells over this library: they parse, call and print.
//!
//! ```
//! use ffwd::prelude::*;
//!
//! // a dense classifier on the embedded UCI digits, trained for a few epochs
//! let cfg = TrainConfig { epochs: 5, ..Default::default() };
//! let split = DataSpec::Digits.load(cfg.holdout, cfg.seed, cfg.csv_label)?;
//! let run = ffwd::spec::fit_classifier(&cfg, &split, &mut ffwd::train::backprop::Silent)?;
//! let classes = run.model.predict(&split.test.x, split.test.len())?;
//! assert_eq!(classes.len(), split.test.len());
//! assert!(run.report.test_accuracy > 0.8);
//! # Ok::<(), ffwd::Error>(())
//! ```
#![warn(missing_docs)]

pub mod checkpoint;
pub mod config;
pub mod convert;
pub mod core;
pub mod data;
pub mod error;
pub mod fuzz;
pub mod kernels;
pub mod layers;
pub mod models;
pub mod optim;
pub mod prelude;
pub mod report;
pub mod spec;
pub mod train;

pub use error::{Error, Result};
