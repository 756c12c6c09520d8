//! The types most programs need: `use ffwd::prelude::*;`.

pub use crate::checkpoint::{CheckpointReader, CheckpointWriter};
pub use crate::config::{LayerKind, LayerShape, TrainConfig};
pub use crate::core::{Activation, Rng};
pub use crate::data::text::CharTokenizer;
pub use crate::data::{DataSpec, Dataset, Split};
pub use crate::error::{Error, Result};
pub use crate::kernels::{InferKernel, Precision, Workspace};
pub use crate::layers::{Compile, Input, Layer, LayerConfig, Trainable};
pub use crate::models::{Classifier, Generator, Lm, LmConfig, ModelConfig};
pub use crate::spec::{FfnKind, FfnShape};
pub use crate::train::forward_forward::FfNet;
pub use crate::train::lm::{LmCheckpoint, LmRunConfig, LmTrainOptions};
pub use crate::train::{TrainOptions, TrainReport};
