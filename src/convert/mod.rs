//! Interop with reference implementations' checkpoints.

pub mod fastfeedforward;
