//! Typed library errors. Every variant renders as one line that names the file,
//! field or axis at fault, so the binary can print it as is.

use std::path::PathBuf;

/// The error type of every fallible `ffwd` library call.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Reading or writing a file failed. The message already says why, so the I/O error is
    /// not also reported as this error's `source()` (that printed the cause twice in
    /// `error: {e:#}` chains).
    #[error("{path}: {cause}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// What the operating system said.
        cause: std::io::Error,
    },
    /// A file's content is not in the expected format (bad magic, truncated, unparsable).
    #[error("{path}: {msg}")]
    Format {
        /// The file (or a name such as `<stdin>`).
        path: String,
        /// What is wrong with it.
        msg: String,
    },
    /// A tensor or data set has the wrong size along one axis.
    #[error("shape mismatch in {what}: axis `{axis}` expected {expected}, got {got}")]
    Shape {
        /// The tensor or data set.
        what: String,
        /// The axis at fault (`rows`, `cols`, `batch`, …).
        axis: &'static str,
        /// The size that axis must have.
        expected: usize,
        /// The size it has.
        got: usize,
    },
    /// A data file holds NaN or infinity.
    #[error("{path}: non-finite value at row {row}, column {col}")]
    NonFinite {
        /// The file.
        path: String,
        /// 1-based row.
        row: usize,
        /// 1-based column.
        col: usize,
    },
    /// A configuration value or key is invalid.
    #[error("config: {0}")]
    Config(String),
    /// A checkpoint is missing a tensor, has one of the wrong shape, or lacks metadata.
    #[error("checkpoint {path}: {msg}")]
    Checkpoint {
        /// The checkpoint file.
        path: String,
        /// What is missing or wrong.
        msg: String,
    },
    /// Any other invalid argument (empty batch, unknown data spec, ...).
    #[error("{0}")]
    Invalid(String),
}

/// Result alias for the library.
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// Wraps an I/O error with the path it concerns.
    pub fn io(path: impl Into<PathBuf>, cause: std::io::Error) -> Self {
        Error::Io { path: path.into(), cause }
    }

    /// A format error for `path`.
    pub fn format(path: impl std::fmt::Display, msg: impl Into<String>) -> Self {
        Error::Format { path: path.to_string(), msg: msg.into() }
    }
}

/// Checks that `got == expected` along `axis` of `what`.
pub fn check_dim(what: &str, axis: &'static str, expected: usize, got: usize) -> Result<()> {
    if expected == got {
        Ok(())
    } else {
        Err(Error::Shape { what: what.to_string(), axis, expected, got })
    }
}

/// Checks that a row-major matrix slice holds `rows × cols` values; names the axis at fault.
pub fn check_matrix(what: &str, len: usize, rows: usize, cols: usize) -> Result<()> {
    if rows == 0 {
        return Err(Error::Invalid(format!("{what}: empty batch (0 rows)")));
    }
    if len == rows * cols {
        return Ok(());
    }
    if len.is_multiple_of(cols) {
        Err(Error::Shape { what: what.to_string(), axis: "rows", expected: rows, got: len / cols })
    } else {
        Err(Error::Shape { what: what.to_string(), axis: "cols", expected: cols, got: len / rows.max(1) })
    }
}
