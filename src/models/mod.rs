//! Models built from layers.

pub mod classifier;

pub use classifier::{Classifier, ModelConfig, StepStats};
