//! Models built from layers.

pub mod classifier;
pub mod lm;

pub use classifier::{Classifier, ModelConfig, StepStats};
pub use lm::{Decoder, Generator, Lm, LmConfig, Sequence, Stream};
