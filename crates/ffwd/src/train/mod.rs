//! Training algorithms. [`backprop`]: minibatch gradient descent with explicit backward;
//! [`forward_forward`]: Hinton's Forward-Forward, layer-local objectives without backprop.

pub mod backprop;
pub mod distributed;
pub mod forecast;
pub mod forward_forward;
pub mod lm;

pub use backprop::{
    load_run, new_optimizer, save_run, train, train_from, EpochReport, EpochSums, Progress, RouteUsage, SavedRun, SolverEpoch, TrainOptions, TrainReport,
    TrainState,
};
