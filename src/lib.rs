//! # ffwd
//!
//! Feedforward networks and their conditional-computation variants on CPUs: dense FFNs,
//! Fast Feedforward Networks (FFF) and UltraFastBERT trees, with explicit forward and backward
//! passes on our own compute core (row-major f32, the `gemm` crate, rayon).
//!
//! Layout: [`core`] (tensors, GEMM, kernels, RNG), [`layers`], [`models`], [`optim`],
//! [`train`] (training algorithms), [`data`], [`checkpoint`], [`convert`] (interop), [`config`].

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
pub mod train;

pub use error::{Error, Result};
