//! Data sets for classifiers: the embedded UCI digits, IDX (MNIST format) and CSV loaders,
//! and the `digits` / `idx:DIR` / `csv:FILE` spec the CLI takes.

pub mod csv;
pub mod digits;
pub mod idx;
pub mod spec;
pub mod text;
pub mod timeseries;

pub use spec::DataSpec;

use crate::core::Rng;
use crate::error::{Error, Result};

/// A labelled set of dense feature vectors.
#[derive(Clone, Debug)]
pub struct Dataset {
    /// Features, `len × dim` row-major.
    pub x: Vec<f32>,
    /// Labels, `len` entries in `0..n_classes`.
    pub y: Vec<u32>,
    /// Features per sample.
    pub dim: usize,
    /// Number of classes (max label + 1 over the whole split).
    pub n_classes: usize,
}

impl Dataset {
    /// A data set from row-major features `x` (`len × dim`) and labels `y` (`len`), as
    /// arrays from other programs give them: every value must be finite; `n_classes` is the
    /// largest label + 1. `what` names the data in errors.
    pub fn from_arrays(x: Vec<f32>, y: Vec<u32>, dim: usize, what: &str) -> Result<Self> {
        if dim == 0 {
            return Err(Error::Invalid(format!("{what}: features have width 0")));
        }
        crate::error::check_matrix(&format!("{what} features"), x.len(), y.len(), dim)?;
        if let Some(i) = x.iter().position(|v| !v.is_finite()) {
            return Err(Error::Invalid(format!("{what}: non-finite feature at row {}, column {}", i / dim, i % dim)));
        }
        let n_classes = y.iter().max().map_or(0, |&m| m as usize + 1);
        if n_classes < 2 {
            return Err(Error::Invalid(format!("{what}: labels must name at least two classes, got {n_classes}")));
        }
        Ok(Dataset { x, y, dim, n_classes })
    }

    /// Number of samples.
    pub fn len(&self) -> usize {
        self.y.len()
    }

    /// True if there is no sample.
    pub fn is_empty(&self) -> bool {
        self.y.is_empty()
    }

    /// Sample `i`'s features.
    pub fn row(&self, i: usize) -> &[f32] {
        &self.x[i * self.dim..(i + 1) * self.dim]
    }

    /// Copies the rows `idx` into `x_out` (`idx.len() × dim`) and their labels into `y_out`.
    pub fn gather(&self, idx: &[usize], x_out: &mut [f32], y_out: &mut [u32]) {
        for (k, &i) in idx.iter().enumerate() {
            x_out[k * self.dim..(k + 1) * self.dim].copy_from_slice(self.row(i));
            y_out[k] = self.y[i];
        }
    }

    /// A new data set made of the rows `idx` (in that order).
    pub fn subset(&self, idx: &[usize]) -> Dataset {
        let mut x = vec![0.0; idx.len() * self.dim];
        let mut y = vec![0; idx.len()];
        self.gather(idx, &mut x, &mut y);
        Dataset { x, y, dim: self.dim, n_classes: self.n_classes }
    }

    /// Splits off a seeded random `frac` of the rows as a held-out set: `(rest, held_out)`.
    pub fn holdout(self, frac: f32, seed: u64) -> Result<(Dataset, Dataset)> {
        if !(frac > 0.0 && frac < 1.0) {
            return Err(Error::Config(format!("holdout must be in (0, 1), got {frac}")));
        }
        let n = self.len();
        let n_test = ((n as f32 * frac).round() as usize).clamp(1, n.saturating_sub(1).max(1));
        if n < 2 {
            return Err(Error::Invalid(format!("cannot hold out a test split from {n} sample(s)")));
        }
        let mut order: Vec<usize> = (0..n).collect();
        Rng::new(seed).shuffle(&mut order);
        Ok((self.subset(&order[n_test..]), self.subset(&order[..n_test])))
    }
}

/// A train/test pair with the same feature width and class count.
#[derive(Clone, Debug)]
pub struct Split {
    /// Training samples.
    pub train: Dataset,
    /// Held-out test samples.
    pub test: Dataset,
}

impl Split {
    /// Builds a split, aligning the class counts and checking the widths agree.
    pub fn new(mut train: Dataset, mut test: Dataset) -> Result<Self> {
        crate::error::check_dim("test set", "features", train.dim, test.dim)?;
        let c = train.n_classes.max(test.n_classes);
        train.n_classes = c;
        test.n_classes = c;
        if train.is_empty() {
            return Err(Error::Invalid("training set is empty".into()));
        }
        Ok(Split { train, test })
    }
}
