//! Training algorithms. [`backprop`]: minibatch gradient descent with explicit backward.

pub mod backprop;

pub use backprop::{train, EpochReport, Progress, TrainOptions, TrainReport};
