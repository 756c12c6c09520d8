//! Models built from layers.

pub mod classifier;
pub mod forecast_baselines;
pub mod forecaster;
pub mod lm;

pub use classifier::{Classifier, ModelConfig, StepStats};
pub use forecaster::{ForecastConfig, Forecaster};
pub use lm::{Decoder, Generator, Lm, LmConfig, Sequence, Stream};
