//! IDX files (the MNIST / Fashion-MNIST format), raw or gzip-compressed.
//! Header: two zero bytes, a type byte (0x08 = unsigned byte), the number of axes, then each
//! axis size as a big-endian u32; then the values.

use std::io::Read;
use std::path::{Path, PathBuf};

use super::Dataset;
use crate::error::{Error, Result};

/// A parsed IDX array of unsigned bytes.
#[derive(Debug)]
pub struct IdxArray {
    /// Axis sizes.
    pub dims: Vec<usize>,
    /// Values, row-major.
    pub data: Vec<u8>,
}

/// Reads a file, transparently gunzipping it if it starts with the gzip magic.
pub fn read_maybe_gz(path: &Path) -> Result<Vec<u8>> {
    let raw = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    decode_maybe_gz(raw, &path.display().to_string())
}

/// Gunzips `raw` if it starts with the gzip magic, else returns it; `name` is used in errors.
/// (The output grows with the stream as it decodes, never by a size the stream claims.)
pub fn decode_maybe_gz(raw: Vec<u8>, name: &str) -> Result<Vec<u8>> {
    if raw.starts_with(&[0x1f, 0x8b]) {
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(&raw[..]).read_to_end(&mut out).map_err(|e| Error::format(name, format!("corrupt gzip stream: {e}")))?;
        Ok(out)
    } else {
        Ok(raw)
    }
}

/// Parses IDX bytes with `expected_axes` axes; `path` is only used in error messages.
pub fn parse_idx(bytes: &[u8], expected_axes: usize, path: &Path) -> Result<IdxArray> {
    let name = path.display();
    if bytes.len() < 4 {
        return Err(Error::format(&name, format!("truncated: {} bytes, an IDX header needs at least 4", bytes.len())));
    }
    let magic = u32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
    let expected_magic = 0x0800 + expected_axes as u32;
    if magic != expected_magic {
        return Err(Error::format(&name, format!("bad IDX magic 0x{magic:08x} (expected 0x{expected_magic:08x}: unsigned bytes, {expected_axes} axes)")));
    }
    let header = 4 + 4 * expected_axes;
    if bytes.len() < header {
        return Err(Error::format(&name, format!("truncated header: {} bytes, need {header}", bytes.len())));
    }
    let dims: Vec<usize> =
        (0..expected_axes).map(|a| u32::from_be_bytes([bytes[4 + 4 * a], bytes[5 + 4 * a], bytes[6 + 4 * a], bytes[7 + 4 * a]]) as usize).collect();
    let body = &bytes[header..];
    // the product of three u32 sizes can overflow: check it before it is used
    let n = dims.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d)).filter(|&n| n <= body.len());
    let Some(n) = n else {
        return Err(Error::format(&name, format!("truncated: header {dims:?} needs more values than the file's {}", body.len())));
    };
    if body.len() > n {
        return Err(Error::format(&name, format!("{} trailing bytes after the {n} values of header {dims:?}", body.len() - n)));
    }
    Ok(IdxArray { dims, data: body[..n].to_vec() })
}

/// Reads an image file (3 axes: count × rows × cols) and a label file (1 axis) into a data
/// set; pixels are scaled to [0, 1] by 1/255.
pub fn load_pair(images: &Path, labels: &Path) -> Result<Dataset> {
    let img = parse_idx(&read_maybe_gz(images)?, 3, images)?;
    let lab = parse_idx(&read_maybe_gz(labels)?, 1, labels)?;
    pair_to_dataset(&img, &lab, &images.display().to_string(), &labels.display().to_string())
}

/// Images (`count × rows × cols`) and labels (`count`) as a data set, pixels / 255.
pub fn pair_to_dataset(img: &IdxArray, lab: &IdxArray, images: &str, labels: &str) -> Result<Dataset> {
    if img.dims[0] != lab.dims[0] {
        return Err(Error::format(labels, format!("{} labels for {} images in {images}", lab.dims[0], img.dims[0])));
    }
    if img.dims[0] == 0 || img.dims[1] == 0 || img.dims[2] == 0 {
        return Err(Error::format(images, format!("no pixels: header {:?}", img.dims)));
    }
    // the product fits: parse_idx checked count·rows·cols against the file
    let dim = img.dims[1] * img.dims[2];
    let x = img.data.iter().map(|&v| v as f32 / 255.0).collect();
    let y: Vec<u32> = lab.data.iter().map(|&v| v as u32).collect();
    let n_classes = y.iter().copied().max().map_or(0, |m| m as usize + 1);
    Ok(Dataset { x, y, dim, n_classes })
}

/// Finds `{stem}` in `dir` as `stem.gz`, `stem`, or with MNIST's alternative `.`-separated name.
fn find(dir: &Path, stem: &str) -> Result<PathBuf> {
    let alt = stem.replacen("-idx", ".idx", 1);
    for name in [format!("{stem}.gz"), stem.to_string(), format!("{alt}.gz"), alt.clone()] {
        let p = dir.join(&name);
        if p.is_file() {
            return Ok(p);
        }
    }
    Err(Error::io(dir.join(format!("{stem}[.gz]")), std::io::Error::new(std::io::ErrorKind::NotFound, "IDX file not found")))
}

/// Loads the four standard files of an MNIST-format directory: `(train, test)`.
pub fn load_dir(dir: &Path) -> Result<(Dataset, Dataset)> {
    if !dir.is_dir() {
        return Err(Error::io(dir, std::io::Error::new(std::io::ErrorKind::NotFound, "no such directory")));
    }
    let train = load_pair(&find(dir, "train-images-idx3-ubyte")?, &find(dir, "train-labels-idx1-ubyte")?)?;
    let test = load_pair(&find(dir, "t10k-images-idx3-ubyte")?, &find(dir, "t10k-labels-idx1-ubyte")?)?;
    Ok((train, test))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(axes: &[u32]) -> Vec<u8> {
        let mut v = vec![0, 0, 8, axes.len() as u8];
        for a in axes {
            v.extend_from_slice(&a.to_be_bytes());
        }
        v
    }

    #[test]
    fn parses_a_literal_file() {
        let mut b = header(&[2, 1, 2]);
        b.extend_from_slice(&[0, 255, 51, 102]);
        let a = parse_idx(&b, 3, Path::new("t")).unwrap();
        assert_eq!(a.dims, vec![2, 1, 2]);
        assert_eq!(a.data, vec![0, 255, 51, 102]);
    }

    #[test]
    fn rejects_bad_magic_and_truncation() {
        let mut b = header(&[2, 1, 2]);
        b.extend_from_slice(&[0, 255, 51]);
        let e = parse_idx(&b, 3, Path::new("imgs")).unwrap_err().to_string();
        assert!(e.contains("imgs") && e.contains("truncated"), "{e}");
        let e = parse_idx(&header(&[3]), 3, Path::new("labels")).unwrap_err().to_string();
        assert!(e.contains("bad IDX magic 0x00000801"), "{e}");
    }
}
