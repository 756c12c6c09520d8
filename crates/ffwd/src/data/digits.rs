//! The UCI optical recognition of handwritten digits set (1797 samples of 8×8 pixels with
//! values 0–16, ten classes; CC BY 4.0, via scikit-learn's `digits.csv.gz`), compiled into
//! the binary. See `assets/digits.rst` for its description and attribution.
//!
//! Fixed split: every fifth row (rows 4, 9, 14, … counting from 0) is test, the others train:
//! 1438 train / 359 test, with every writer group on both sides. (Holding out the file's last
//! rows instead tests on unseen writers only and costs dense models about 7 points.)
//! Pixels are scaled to [0, 1] by 1/16.

use std::io::Read;

use super::csv::{parse_csv, LabelColumn};
use super::{Dataset, Split};
use crate::error::{Error, Result};

static DIGITS_CSV_GZ: &[u8] = include_bytes!("../../assets/digits.csv.gz");

/// Row `i` of the file is a test sample iff `i % TEST_EVERY == TEST_EVERY - 1`.
pub const TEST_EVERY: usize = 5;

/// All 1797 samples, in file order.
pub fn all() -> Result<Dataset> {
    let mut text = String::new();
    flate2::read::GzDecoder::new(DIGITS_CSV_GZ).read_to_string(&mut text).map_err(|e| Error::format("<embedded digits>", e.to_string()))?;
    parse_csv(&text, LabelColumn::Last, 1.0 / 16.0, "<embedded digits>")
}

/// The fixed train/test split (1438 / 359).
pub fn split() -> Result<Split> {
    let d = all()?;
    let (test_idx, train_idx): (Vec<usize>, Vec<usize>) = (0..d.len()).partition(|i| i % TEST_EVERY == TEST_EVERY - 1);
    Split::new(d.subset(&train_idx), d.subset(&test_idx))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_digits_have_the_documented_shape() {
        let s = split().unwrap();
        assert_eq!((s.train.len(), s.test.len(), s.train.dim, s.train.n_classes), (1438, 359, 64, 10));
        assert!(s.train.x.iter().all(|&v| (0.0..=1.0).contains(&v)));
        let mut counts = [0; 10];
        for &l in s.train.y.iter().chain(&s.test.y) {
            counts[l as usize] += 1;
        }
        // per-class counts of the UCI digits set
        assert_eq!(counts, [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]);
    }
}
