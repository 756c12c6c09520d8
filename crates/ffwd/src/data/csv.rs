//! CSV data: one sample per line, a label column (integer ≥ 0) and numeric features,
//! separated by commas (or whitespace). A first line that does not parse as numbers is taken
//! as a header. Gzip-compressed files are read transparently.

use std::path::Path;

use serde::{Deserialize, Serialize};

use super::Dataset;
use crate::error::{Error, Result};

/// Which column holds the label.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum LabelColumn {
    /// The first column (default).
    #[default]
    First,
    /// The last column (as the UCI digits file).
    Last,
}

/// Splits a line into fields at commas (trimmed), or at whitespace when there is no comma.
pub fn split_fields(line: &str) -> Vec<&str> {
    if line.contains(',') {
        line.split(',').map(str::trim).collect()
    } else {
        line.split_whitespace().collect()
    }
}

/// Parses unlabelled feature rows, one sample per line (fields separated by commas or
/// spaces; blank lines skipped), each of `dim` finite numbers, as `ffwd predict` reads them.
/// Returns the `rows × dim` values and `rows`; errors name `name`, the line and the column.
pub fn parse_features(text: &str, dim: usize, name: &str) -> Result<(Vec<f32>, usize)> {
    let (mut x, mut rows) = (Vec::new(), 0);
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let fields = split_fields(line);
        if fields.len() != dim {
            return Err(Error::format(name, format!("line {}: {} features, the model expects {dim}", i + 1, fields.len())));
        }
        for (c, f) in fields.iter().enumerate() {
            let v: f32 = f.parse().map_err(|_| Error::format(name, format!("line {}, column {}: `{f}` is not a number", i + 1, c + 1)))?;
            if !v.is_finite() {
                return Err(Error::NonFinite { path: name.to_string(), row: i + 1, col: c + 1 });
            }
            x.push(v);
        }
        rows += 1;
    }
    if rows == 0 {
        return Err(Error::format(name, "no samples"));
    }
    Ok((x, rows))
}

/// Parses CSV text; `name` is used in error messages. Features are multiplied by `scale`.
pub fn parse_csv(text: &str, label: LabelColumn, scale: f32, name: &str) -> Result<Dataset> {
    let mut x = Vec::new();
    let mut y = Vec::new();
    let mut dim = None;
    for (lineno, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let fields = split_fields(line);
        let numeric = fields.iter().all(|f| f.parse::<f64>().is_ok());
        if !numeric {
            if dim.is_none() && y.is_empty() {
                continue; // header
            }
            let bad = fields.iter().find(|f| f.parse::<f64>().is_err()).copied().unwrap_or("");
            return Err(Error::format(name, format!("line {}: `{bad}` is not a number", lineno + 1)));
        }
        if fields.len() < 2 {
            return Err(Error::format(name, format!("line {}: need a label and at least one feature", lineno + 1)));
        }
        let d = fields.len() - 1;
        match dim {
            None => dim = Some(d),
            Some(prev) if prev != d => {
                return Err(Error::format(name, format!("line {}: {} columns, expected {}", lineno + 1, fields.len(), prev + 1)));
            }
            _ => {}
        }
        let (label_field, feats): (&str, Vec<&str>) = match label {
            LabelColumn::First => (fields[0], fields[1..].to_vec()),
            LabelColumn::Last => (fields[d], fields[..d].to_vec()),
        };
        let lv: f64 = label_field.parse().unwrap_or(f64::NAN);
        if !(lv >= 0.0 && lv.fract() == 0.0 && lv < u32::MAX as f64) {
            return Err(Error::format(name, format!("line {}: label `{label_field}` is not a non-negative integer", lineno + 1)));
        }
        y.push(lv as u32);
        for (c, f) in feats.iter().enumerate() {
            let v: f32 = f.parse().unwrap_or(f32::NAN);
            if !v.is_finite() {
                let col = if label == LabelColumn::First { c + 2 } else { c + 1 };
                return Err(Error::NonFinite { path: name.to_string(), row: lineno + 1, col });
            }
            x.push(v * scale);
        }
    }
    let dim = dim.ok_or_else(|| Error::format(name, "no data rows"))?;
    let n_classes = y.iter().copied().max().map_or(0, |m| m as usize + 1);
    Ok(Dataset { x, y, dim, n_classes })
}

/// Reads and parses a CSV file (optionally gzip-compressed).
pub fn load(path: &Path, label: LabelColumn) -> Result<Dataset> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    parse_csv_bytes(bytes, label, &path.display().to_string())
}

/// Parses the bytes of a CSV file (optionally gzip-compressed); `name` is used in errors.
pub fn parse_csv_bytes(bytes: Vec<u8>, label: LabelColumn, name: &str) -> Result<Dataset> {
    let bytes = super::idx::decode_maybe_gz(bytes, name)?;
    let text = String::from_utf8(bytes).map_err(|e| Error::format(name, format!("not UTF-8 text (byte {})", e.utf8_error().valid_up_to())))?;
    parse_csv(&text, label, 1.0, name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_is_optional_and_labels_first_or_last() {
        let d = parse_csv("label,a,b\n1,0.5,2\n0,1,-1\n", LabelColumn::First, 1.0, "t").unwrap();
        assert_eq!((d.dim, d.len(), d.n_classes), (2, 2, 2));
        assert_eq!(d.x, vec![0.5, 2.0, 1.0, -1.0]);
        assert_eq!(d.y, vec![1, 0]);
        let d = parse_csv("0.5 2 3\n1 -1 0\n", LabelColumn::Last, 2.0, "t").unwrap();
        assert_eq!(d.y, vec![3, 0]);
        assert_eq!(d.x, vec![1.0, 4.0, 2.0, -2.0]);
    }

    #[test]
    fn errors_name_the_line_and_column() {
        let e = parse_csv("1,2,3\n0,nan,1\n", LabelColumn::First, 1.0, "f.csv").unwrap_err().to_string();
        assert_eq!(e, "f.csv: non-finite value at row 2, column 2");
        let e = parse_csv("1,2,3\n0,1\n", LabelColumn::First, 1.0, "f.csv").unwrap_err().to_string();
        assert!(e.contains("line 2: 2 columns, expected 3"), "{e}");
        let e = parse_csv("1,2\n1.5,1\n", LabelColumn::First, 1.0, "f.csv").unwrap_err().to_string();
        assert!(e.contains("label `1.5`"), "{e}");
        let e = parse_csv("1,2\nx,1\n", LabelColumn::First, 1.0, "f.csv").unwrap_err().to_string();
        assert!(e.contains("`x` is not a number"), "{e}");
    }
}
