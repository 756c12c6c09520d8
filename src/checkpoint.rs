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

/// Format tag of language-model checkpoints.
pub const LM_FORMAT: &str = "lm/1";
/// Metadata key of the LM vocabulary (JSON array of characters).
pub const VOCAB_KEY: &str = "ffwd.vocab";
/// Metadata key of the LM training options (JSON).
pub const TRAIN_KEY: &str = "ffwd.train";
/// Metadata key of the LM training state (JSON: step, seconds, history).
pub const STATE_KEY: &str = "ffwd.state";
/// Metadata key of the AdamW step count.
pub const OPTIM_STEP_KEY: &str = "ffwd.optim.step";

/// A language model with everything needed to sample from it or resume its training.
pub struct LmCheckpoint {
    /// The model.
    pub lm: crate::models::Lm,
    /// Its vocabulary.
    pub tokenizer: crate::data::text::CharTokenizer,
    /// The options of the run that produced it.
    pub options: crate::train::lm::LmTrainOptions,
    /// Where that run stood.
    pub state: crate::train::lm::LmTrainState,
    /// AdamW with its moments (fresh when the file has none).
    pub optimizer: crate::optim::AdamW,
}

fn json<T: serde::Serialize>(v: &T) -> Result<String> {
    serde_json::to_string(v).map_err(|e| Error::Invalid(e.to_string()))
}

/// Saves a language model, its vocabulary, the run's options and state, and AdamW's moments
/// (`optim.m.<name>`, `optim.v.<name>`) so that training can resume exactly.
pub fn save_lm(ck: &LmCheckpoint, path: &Path) -> Result<()> {
    save_lm_run(&ck.lm, &ck.tokenizer, &ck.options, &ck.state, &ck.optimizer, path)
}

/// [`save_lm`] from borrowed parts (a checkpoint in the middle of a run).
pub fn save_lm_run(
    lm: &crate::models::Lm,
    tokenizer: &crate::data::text::CharTokenizer,
    options: &crate::train::lm::LmTrainOptions,
    state: &crate::train::lm::LmTrainState,
    optimizer: &crate::optim::AdamW,
    path: &Path,
) -> Result<()> {
    let named = lm.named_params();
    let mut tensors: Vec<(String, Vec<usize>, &[f32])> = named.iter().map(|(n, p)| (n.clone(), p.shape.clone(), p.value.as_slice())).collect();
    let (m, v) = optimizer.moments();
    if m.len() == named.len() {
        for (((n, p), mi), vi) in named.iter().zip(m).zip(v) {
            tensors.push((format!("optim.m.{n}"), p.shape.clone(), mi.as_slice()));
            tensors.push((format!("optim.v.{n}"), p.shape.clone(), vi.as_slice()));
        }
    }
    let mut meta = HashMap::new();
    meta.insert(FORMAT_KEY.to_string(), LM_FORMAT.to_string());
    meta.insert(CONFIG_KEY.to_string(), json(lm.config())?);
    meta.insert(VOCAB_KEY.to_string(), json(tokenizer)?);
    meta.insert(TRAIN_KEY.to_string(), json(options)?);
    meta.insert(STATE_KEY.to_string(), json(state)?);
    meta.insert(OPTIM_STEP_KEY.to_string(), optimizer.steps().to_string());
    meta.insert("ffwd.version".to_string(), env!("CARGO_PKG_VERSION").to_string());
    write_atomic(path, &to_safetensors_bytes(&tensors, meta)?)
}

/// Loads a checkpoint written by [`save_lm`].
pub fn load_lm(path: &Path) -> Result<LmCheckpoint> {
    let file = path.display().to_string();
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let (_, meta) = SafeTensors::read_metadata(&bytes).map_err(|e| Error::Checkpoint { path: file.clone(), msg: format!("not a safetensors file ({e})") })?;
    let md = meta.metadata().clone().unwrap_or_default();
    let format = md.get(FORMAT_KEY).map(String::as_str).unwrap_or("");
    if format != LM_FORMAT {
        return Err(Error::Checkpoint { path: file, msg: format!("metadata `{FORMAT_KEY}` is `{format}`, expected `{LM_FORMAT}` (a language model)") });
    }
    let get = |key: &str| md.get(key).ok_or_else(|| Error::Checkpoint { path: file.clone(), msg: format!("metadata has no `{key}`") });
    let bad = |key: &str, e: serde_json::Error| Error::Checkpoint { path: file.clone(), msg: format!("bad `{key}`: {e}") };
    let cfg: crate::models::LmConfig = serde_json::from_str(get(CONFIG_KEY)?).map_err(|e| bad(CONFIG_KEY, e))?;
    let tokenizer: crate::data::text::CharTokenizer = serde_json::from_str(get(VOCAB_KEY)?).map_err(|e| bad(VOCAB_KEY, e))?;
    let options = serde_json::from_str(get(TRAIN_KEY)?).map_err(|e| bad(TRAIN_KEY, e))?;
    let state = serde_json::from_str(get(STATE_KEY)?).map_err(|e| bad(STATE_KEY, e))?;
    let steps: u64 = get(OPTIM_STEP_KEY)?.parse().map_err(|_| Error::Checkpoint { path: file.clone(), msg: format!("bad `{OPTIM_STEP_KEY}`") })?;
    if tokenizer.len() != cfg.vocab {
        return Err(Error::Checkpoint { path: file, msg: format!("vocabulary has {} characters, config says {}", tokenizer.len(), cfg.vocab) });
    }
    let st = SafeTensors::deserialize(&bytes).map_err(|e| Error::Checkpoint { path: file.clone(), msg: e.to_string() })?;
    let mut lm = crate::models::Lm::new(cfg, 0)?;
    // parameters are stored under their full names (Lm::named_params)
    let names: Vec<(String, Vec<usize>)> = lm.named_params().into_iter().map(|(n, p)| (n, p.shape.clone())).collect();
    let mut values = Vec::with_capacity(names.len());
    let (mut m, mut v) = (Vec::new(), Vec::new());
    for (n, shape) in &names {
        values.push(read_f32(&st, n, shape, &file)?);
        if steps > 0 {
            m.push(read_f32(&st, &format!("optim.m.{n}"), shape, &file)?);
            v.push(read_f32(&st, &format!("optim.v.{n}"), shape, &file)?);
        }
    }
    let mut it = values.into_iter();
    lm.visit_params_mut(&mut |p| {
        if let Some(val) = it.next() {
            p.value = val;
        }
    });
    let mut optimizer = crate::optim::AdamW::new(0.0);
    if steps > 0 {
        optimizer.restore(steps, m, v);
    }
    Ok(LmCheckpoint { lm, tokenizer, options, state, optimizer })
}
