//! A minimal owned row-major `f32` tensor for the public API. Kernels take slices.

use crate::error::{Error, Result};

/// An owned, row-major, contiguous `f32` tensor.
#[derive(Clone, Debug, PartialEq)]
pub struct Tensor {
    data: Vec<f32>,
    shape: Vec<usize>,
}

impl Tensor {
    /// A tensor of zeros with the given shape.
    pub fn zeros(shape: &[usize]) -> Self {
        Tensor { data: vec![0.0; shape.iter().product()], shape: shape.to_vec() }
    }

    /// Wraps `data` as a tensor of `shape`; errors if the element count differs.
    pub fn from_vec(data: Vec<f32>, shape: &[usize]) -> Result<Self> {
        let n: usize = shape.iter().product();
        if n != data.len() {
            return Err(Error::Invalid(format!("tensor of shape {shape:?} needs {n} values, got {}", data.len())));
        }
        Ok(Tensor { data, shape: shape.to_vec() })
    }

    /// The shape.
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// The values, row-major.
    pub fn data(&self) -> &[f32] {
        &self.data
    }

    /// The values, row-major, mutable.
    pub fn data_mut(&mut self) -> &mut [f32] {
        &mut self.data
    }

    /// Consumes the tensor, returning its values.
    pub fn into_vec(self) -> Vec<f32> {
        self.data
    }

    /// Number of rows when viewed as a matrix (product of all axes but the last).
    pub fn rows(&self) -> usize {
        match self.shape.split_last() {
            Some((_, rest)) => rest.iter().product(),
            None => 1,
        }
    }

    /// Size of the last axis (1 for a scalar).
    pub fn cols(&self) -> usize {
        self.shape.last().copied().unwrap_or(1)
    }
}
