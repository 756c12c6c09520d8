//! Checkpoints: one `.safetensors` file holding every parameter (f32, little endian) under its
//! name, and in the metadata the model configuration as JSON (`ffwd.config`), so that the file
//! loads with nothing else. Writes go to a temporary file in the same directory and are renamed
//! into place, so a failed save never leaves a partial checkpoint.

use std::collections::HashMap;
use std::io::Write;
use std::path::Path;

use safetensors::tensor::{Dtype, TensorView};
use safetensors::SafeTensors;

use crate::core::{Param, ParamVisitor};
use crate::error::{Error, Result};
use crate::models::{Classifier, ModelConfig};

/// Metadata key holding the format tag.
pub const FORMAT_KEY: &str = "ffwd.format";
/// Metadata key holding the model configuration (JSON).
pub const CONFIG_KEY: &str = "ffwd.config";
/// Format tag of classifier checkpoints.
pub const CLASSIFIER_FORMAT: &str = "classifier/1";

/// Writes `bytes` to `path` atomically (temporary sibling file, then rename).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let name = path.file_name().ok_or_else(|| Error::Invalid(format!("{}: not a file path", path.display())))?;
    let tmp = dir.join(format!(".{}.tmp-{}", name.to_string_lossy(), std::process::id()));
    let result = (|| {
        let mut f = std::fs::File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
        f.write_all(bytes).map_err(|e| Error::io(&tmp, e))?;
        f.sync_all().map_err(|e| Error::io(&tmp, e))?;
        std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Serialises named f32 tensors and metadata to safetensors bytes.
pub fn to_safetensors_bytes(tensors: &[(String, Vec<usize>, &[f32])], metadata: HashMap<String, String>) -> Result<Vec<u8>> {
    let bytes: Vec<Vec<u8>> = tensors.iter().map(|(_, _, v)| v.iter().flat_map(|x| x.to_le_bytes()).collect()).collect();
    let views = tensors
        .iter()
        .zip(&bytes)
        .map(|((name, shape, _), b)| {
            TensorView::new(Dtype::F32, shape.clone(), b).map(|v| (name.clone(), v)).map_err(|e| Error::Invalid(format!("tensor {name}: {e}")))
        })
        .collect::<Result<Vec<_>>>()?;
    safetensors::serialize(views, Some(metadata)).map_err(|e| Error::Invalid(format!("safetensors: {e}")))
}

/// Saves a classifier to `path`.
pub fn save_classifier(model: &Classifier, path: &Path) -> Result<()> {
    let named = model.named_params();
    let tensors: Vec<(String, Vec<usize>, &[f32])> = named.iter().map(|(n, p)| (n.clone(), p.shape.clone(), p.value.as_slice())).collect();
    let mut meta = HashMap::new();
    meta.insert(FORMAT_KEY.to_string(), CLASSIFIER_FORMAT.to_string());
    meta.insert(CONFIG_KEY.to_string(), serde_json::to_string(model.config()).map_err(|e| Error::Invalid(e.to_string()))?);
    meta.insert("ffwd.version".to_string(), env!("CARGO_PKG_VERSION").to_string());
    write_atomic(path, &to_safetensors_bytes(&tensors, meta)?)
}

/// Reads a tensor as f32 values, checking dtype and shape.
pub fn read_f32(st: &SafeTensors<'_>, name: &str, shape: &[usize], file: &str) -> Result<Vec<f32>> {
    let t = st.tensor(name).map_err(|_| Error::Checkpoint { path: file.to_string(), msg: format!("missing tensor `{name}`") })?;
    if t.shape() != shape {
        return Err(Error::Checkpoint { path: file.to_string(), msg: format!("tensor `{name}` has shape {:?}, expected {shape:?}", t.shape()) });
    }
    match t.dtype() {
        Dtype::F32 => Ok(t.data().chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect()),
        other => Err(Error::Checkpoint { path: file.to_string(), msg: format!("tensor `{name}` has dtype {other:?}, expected F32") }),
    }
}

/// Format tag of Forward-Forward checkpoints.
pub const FF_FORMAT: &str = "ff/1";

/// The format tag stored in a checkpoint's metadata (`classifier/1`, `ff/1`, …).
pub fn format_of(path: &Path) -> Result<String> {
    let file = path.display().to_string();
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let (_, meta) = SafeTensors::read_metadata(&bytes).map_err(|e| Error::Checkpoint { path: file.clone(), msg: format!("not a safetensors file ({e})") })?;
    let md = meta.metadata().clone().unwrap_or_default();
    md.get(FORMAT_KEY).cloned().ok_or(Error::Checkpoint { path: file, msg: format!("metadata has no `{FORMAT_KEY}`") })
}

/// Loads a classifier saved by [`save_classifier`].
pub fn load_classifier(path: &Path) -> Result<Classifier> {
    let file = path.display().to_string();
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let (_, meta) = SafeTensors::read_metadata(&bytes).map_err(|e| Error::Checkpoint { path: file.clone(), msg: format!("not a safetensors file ({e})") })?;
    let md = meta.metadata().clone().unwrap_or_default();
    let format = md.get(FORMAT_KEY).map(String::as_str).unwrap_or("");
    if format != CLASSIFIER_FORMAT {
        return Err(Error::Checkpoint { path: file, msg: format!("metadata `{FORMAT_KEY}` is `{format}`, expected `{CLASSIFIER_FORMAT}`") });
    }
    let cfg_json = md.get(CONFIG_KEY).ok_or_else(|| Error::Checkpoint { path: file.clone(), msg: format!("metadata has no `{CONFIG_KEY}`") })?;
    let cfg: ModelConfig = serde_json::from_str(cfg_json).map_err(|e| Error::Checkpoint { path: file.clone(), msg: format!("bad `{CONFIG_KEY}`: {e}") })?;
    let st = SafeTensors::deserialize(&bytes).map_err(|e| Error::Checkpoint { path: file.clone(), msg: e.to_string() })?;
    let mut model = Classifier::new(cfg, 0)?;
    fill_params(&mut |f| model.visit_params_mut(f), &st, crate::models::classifier::LAYER_PREFIX, &file)?;
    Ok(model)
}

/// Sets every visited parameter from the tensor `{prefix}{name}` of `st`, checking shapes.
pub fn fill_params(visit: &mut ParamVisitor<'_>, st: &SafeTensors<'_>, prefix: &str, file: &str) -> Result<()> {
    let mut err = None;
    visit(&mut |p: &mut Param| {
        if err.is_none() {
            match read_f32(st, &format!("{prefix}{}", p.name), &p.shape, file) {
                Ok(v) => p.value = v,
                Err(e) => err = Some(e),
            }
        }
    });
    err.map_or(Ok(()), Err)
}
