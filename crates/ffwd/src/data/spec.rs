//! The data spec of the CLI: `digits` (embedded), `idx:DIR` (MNIST-format directory) or
//! `csv:FILE` (label column + features; a seeded held-out split becomes the test set).

use std::path::PathBuf;
use std::str::FromStr;

use super::csv::LabelColumn;
use super::{digits, idx, Split};
use crate::error::{Error, Result};

/// Where the data comes from.
#[derive(Clone, Debug, PartialEq)]
pub enum DataSpec {
    /// The embedded UCI digits set with its fixed split.
    Digits,
    /// A directory with `train-images-idx3-ubyte[.gz]`, `train-labels-idx1-ubyte[.gz]`,
    /// `t10k-images-idx3-ubyte[.gz]`, `t10k-labels-idx1-ubyte[.gz]`.
    Idx(PathBuf),
    /// A CSV file.
    Csv(PathBuf),
}

impl FromStr for DataSpec {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        if s == "digits" {
            Ok(DataSpec::Digits)
        } else if let Some(p) = s.strip_prefix("idx:") {
            Ok(DataSpec::Idx(PathBuf::from(p)))
        } else if let Some(p) = s.strip_prefix("csv:") {
            Ok(DataSpec::Csv(PathBuf::from(p)))
        } else {
            Err(Error::Config(format!("unknown data spec `{s}` (expected `digits`, `idx:DIR` or `csv:FILE`)")))
        }
    }
}

impl DataSpec {
    /// Loads the train/test split. `holdout` and `seed` choose the test rows of a CSV file;
    /// `label` says which CSV column is the label.
    pub fn load(&self, holdout: f32, seed: u64, label: LabelColumn) -> Result<Split> {
        let split = match self {
            DataSpec::Digits => digits::split()?,
            DataSpec::Idx(dir) => {
                let (train, test) = idx::load_dir(dir)?;
                Split::new(train, test)?
            }
            DataSpec::Csv(path) => {
                let all = super::csv::load(path, label)?;
                let (train, test) = all.holdout(holdout, seed)?;
                Split::new(train, test)?
            }
        };
        Ok(split)
    }
}
