//! Persistence in one place: a checkpoint is one `.safetensors` file holding parameters (f32,
//! little endian) under their names, optimizer state as `optim.{slot}.{name}`, and in the
//! metadata a format tag (`ffwd.format`: `classifier/1`, `ff/1`, `lm/1`, `forecaster/1`) and JSON documents
//! (the model configuration under `ffwd.config`, run options and state, a vocabulary), so
//! that a file loads with nothing else.
//!
//! This module knows the file layout, not the models: [`CheckpointWriter`] collects tensors
//! and metadata and writes them atomically (a temporary file in the same directory, synced,
//! then renamed: a crash or a kill leaves the previous file or the new one, never a partial
//! one); [`CheckpointReader`] opens a file, checks its tag, and reads tensors with their dtype
//! and shape checked. Each model saves and loads itself through them.
//!
//! Quantized checkpoints (`ffwd convert quantize`) store chosen weight matrices as ggml
//! Q8_0/Q4_0 blocks in `U8` tensors of shape `[rows, bytes per row]`, listed with their f32
//! shapes under `ffwd.quant` ([`QuantInfo`]); [`CheckpointReader::read_f32`] dequantizes them,
//! so every loader reads such a file, and the models then run the quantized kernels.
//!
//! Hostile files: everything a header claims is checked against the file before it is used.
//! The safetensors header must lie inside the file, tensor offsets inside the data, and a
//! model configuration is refused when it would need more parameters than the file stores
//! ([`CheckpointReader::check_claim`]) — before the model is allocated.

use std::collections::{BTreeMap, HashMap};
use std::io::{Read, Write};
use std::path::Path;

use safetensors::tensor::{Dtype, TensorView};
use safetensors::SafeTensors;
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::core::quant::{self, QFormat};
use crate::core::{Param, ParamVisitor};
use crate::error::{Error, Result};
use crate::optim::Optimizer;

/// Metadata key listing the block-quantized tensors ([`QuantInfo`]).
pub const QUANT_KEY: &str = "ffwd.quant";
/// Metadata key holding the conversions a checkpoint went through (a JSON array, oldest first).
pub const CONVERTED_KEY: &str = "ffwd.converted";

/// Which tensors of a checkpoint are stored block-quantized, and how.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QuantInfo {
    /// Block format.
    pub format: QFormat,
    /// Only expert/FFN weights were quantized (MoQE); routers, attention and embeddings kept.
    pub experts_only: bool,
    /// Quantized tensor → its f32 shape (blocks run along the last axis).
    pub tensors: BTreeMap<String, Vec<usize>>,
}

/// Metadata key holding the format tag.
pub const FORMAT_KEY: &str = "ffwd.format";
/// Metadata key holding the model configuration (JSON).
pub const CONFIG_KEY: &str = "ffwd.config";
/// Metadata key of the training options of the run that wrote the file (JSON).
pub const TRAIN_KEY: &str = "ffwd.train";
/// Metadata key of the state of that run (JSON: step, history, …).
pub const STATE_KEY: &str = "ffwd.state";
/// Metadata key of the optimizer's step count (present when optimizer state is stored).
pub const OPTIM_STEP_KEY: &str = "ffwd.optim.step";
/// Metadata key of the optimizer's kind (`adamw`, `sgd`).
pub const OPTIM_KIND_KEY: &str = "ffwd.optim.kind";
/// Metadata key of an LM's vocabulary (JSON array of characters).
pub const VOCAB_KEY: &str = "ffwd.vocab";
/// Format tag of classifier checkpoints.
pub const CLASSIFIER_FORMAT: &str = "classifier/1";
/// Format tag of Forward-Forward checkpoints.
pub const FF_FORMAT: &str = "ff/1";
/// Format tag of forecaster checkpoints.
pub const FORECASTER_FORMAT: &str = "forecaster/1";
/// Format tag of language-model checkpoints.
pub const LM_FORMAT: &str = "lm/1";

/// Writes `bytes` to `path` atomically (temporary sibling file, synced, then renamed).
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

fn to_json<T: Serialize + ?Sized>(v: &T) -> Result<String> {
    serde_json::to_string(v).map_err(|e| Error::Invalid(format!("serialising checkpoint metadata: {e}")))
}

/// Collects the tensors and metadata of one checkpoint, then writes it atomically.
///
/// ```
/// use ffwd::checkpoint::{CheckpointReader, CheckpointWriter};
///
/// let w = [1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0];
/// let mut ck = CheckpointWriter::new("example/1");
/// ck.tensor("w", &[2, 3], &w).meta("note", "two rows");
/// let bytes = ck.to_bytes()?;
/// let back = CheckpointReader::from_bytes(bytes, "memory")?;
/// back.expect_format("example/1")?;
/// assert!(back.expect_format("classifier/1").is_err()); // the tag is checked once, here
/// let st = back.tensors()?;
/// assert_eq!(back.read_f32(&st, "w", &[2, 3])?, w);
/// assert!(back.read_f32(&st, "w", &[3, 2]).is_err());   // shapes are checked
/// # Ok::<(), ffwd::Error>(())
/// ```
pub struct CheckpointWriter<'a> {
    tensors: Vec<(String, Vec<usize>, &'a [f32])>,
    /// Tensors stored as raw bytes (quantized blocks): name, shape, bytes.
    raw: Vec<(String, Vec<usize>, Vec<u8>)>,
    meta: HashMap<String, String>,
}

impl<'a> CheckpointWriter<'a> {
    /// An empty checkpoint of format `format` (also records the ffwd version).
    pub fn new(format: &str) -> Self {
        let mut meta = HashMap::new();
        meta.insert(FORMAT_KEY.to_string(), format.to_string());
        meta.insert("ffwd.version".to_string(), env!("CARGO_PKG_VERSION").to_string());
        CheckpointWriter { tensors: Vec::new(), raw: Vec::new(), meta }
    }

    /// Adds a tensor of `shape` (row-major f32 values).
    pub fn tensor(&mut self, name: impl Into<String>, shape: &[usize], values: &'a [f32]) -> &mut Self {
        self.tensors.push((name.into(), shape.to_vec(), values));
        self
    }

    /// Adds a `U8` tensor of `shape` (raw bytes, such as quantized blocks).
    pub fn bytes(&mut self, name: impl Into<String>, shape: &[usize], bytes: Vec<u8>) -> &mut Self {
        self.raw.push((name.into(), shape.to_vec(), bytes));
        self
    }

    /// Adds parameters under their given names.
    pub fn params(&mut self, named: &[(String, &'a Param)]) -> &mut Self {
        for (n, p) in named {
            self.tensor(n.clone(), &p.shape, &p.value);
        }
        self
    }

    /// Adds the optimizer's step count, kind and state (`optim.{slot}.{name}`, for the
    /// parameters `named` in visiting order). Nothing is stored before its first step.
    pub fn optimizer(&mut self, kind: &str, opt: &'a dyn Optimizer, named: &[(String, &'a Param)]) -> &mut Self {
        self.meta.insert(OPTIM_STEP_KEY.to_string(), opt.steps().to_string());
        self.meta.insert(OPTIM_KIND_KEY.to_string(), kind.to_string());
        for (slot, tensors) in opt.slot_names().iter().zip(opt.slots()) {
            if tensors.len() == named.len() {
                for ((n, p), t) in named.iter().zip(tensors) {
                    self.tensor(format!("optim.{slot}.{n}"), &p.shape, t);
                }
            }
        }
        self
    }

    /// Sets a metadata string.
    pub fn meta(&mut self, key: &str, value: impl Into<String>) -> &mut Self {
        self.meta.insert(key.to_string(), value.into());
        self
    }

    /// Sets a metadata entry to the JSON of `value`.
    pub fn json<T: Serialize + ?Sized>(&mut self, key: &str, value: &T) -> Result<&mut Self> {
        self.meta.insert(key.to_string(), to_json(value)?);
        Ok(self)
    }

    /// The safetensors bytes.
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        let bytes: Vec<Vec<u8>> = self.tensors.iter().map(|(_, _, v)| v.iter().flat_map(|x| x.to_le_bytes()).collect()).collect();
        let views = self
            .tensors
            .iter()
            .zip(&bytes)
            .map(|((name, shape, _), b)| (name, Dtype::F32, shape, b))
            .chain(self.raw.iter().map(|(name, shape, b)| (name, Dtype::U8, shape, b)))
            .map(|(name, dtype, shape, b)| {
                TensorView::new(dtype, shape.clone(), b).map(|v| (name.clone(), v)).map_err(|e| Error::Invalid(format!("tensor {name}: {e}")))
            })
            .collect::<Result<Vec<_>>>()?;
        safetensors::serialize(views, Some(self.meta.clone())).map_err(|e| Error::Invalid(format!("safetensors: {e}")))
    }

    /// Writes the checkpoint to `path` atomically.
    pub fn write(&self, path: &Path) -> Result<()> {
        write_atomic(path, &self.to_bytes()?)
    }
}

/// An opened checkpoint: its bytes, its metadata, and how many f32 values its tensors hold.
pub struct CheckpointReader {
    path: String,
    bytes: Vec<u8>,
    meta: HashMap<String, String>,
    stored: usize,
    quant: Option<QuantInfo>,
}

impl CheckpointReader {
    /// Reads `path` and parses its safetensors header (not the tensors yet).
    pub fn open(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        Self::from_bytes(bytes, &path.display().to_string())
    }

    /// Parses checkpoint bytes; `name` is used in error messages.
    pub fn from_bytes(bytes: Vec<u8>, name: &str) -> Result<Self> {
        let path = name.to_string();
        let (_, header) =
            SafeTensors::read_metadata(&bytes).map_err(|e| Error::Checkpoint { path: path.clone(), msg: format!("not a safetensors file ({e})") })?;
        let meta = header.metadata().clone().unwrap_or_default();
        let quant: Option<QuantInfo> = match meta.get(QUANT_KEY) {
            Some(s) => Some(serde_json::from_str(s).map_err(|e| Error::Checkpoint { path: path.clone(), msg: format!("bad `{QUANT_KEY}`: {e}") })?),
            None => None,
        };
        // a quantized tensor counts the values it decodes to
        let count = |name: &str, shape: &[usize]| match quant.as_ref().and_then(|q| q.tensors.get(name)) {
            Some(s) => s.iter().fold(1usize, |a, &d| a.saturating_mul(d)),
            None => shape.iter().fold(1usize, |a, &d| a.saturating_mul(d)),
        };
        let stored = header.tensors().iter().map(|(n, t)| count(n, &t.shape)).fold(0usize, usize::saturating_add);
        Ok(CheckpointReader { path, bytes, meta, stored, quant })
    }

    /// The file name, as errors show it.
    pub fn path(&self) -> &str {
        &self.path
    }

    /// An error about this file.
    pub fn error(&self, msg: impl Into<String>) -> Error {
        Error::Checkpoint { path: self.path.clone(), msg: msg.into() }
    }

    /// `r` with its error, if any, said about this file (errors of the model built from the
    /// file's configuration do not know where it came from).
    pub fn about<T>(&self, r: Result<T>) -> Result<T> {
        r.map_err(|e| match e {
            Error::Checkpoint { .. } => e,
            other => self.error(other.to_string()),
        })
    }

    /// The format tag (empty when absent).
    pub fn format(&self) -> &str {
        self.meta.get(FORMAT_KEY).map_or("", String::as_str)
    }

    /// Errors unless the format tag is `tag`.
    pub fn expect_format(&self, tag: &str) -> Result<()> {
        match self.format() {
            f if f == tag => Ok(()),
            "" => Err(self.error(format!("metadata has no `{FORMAT_KEY}` (not an ffwd checkpoint; expected `{tag}`)"))),
            f => Err(self.error(format!("metadata `{FORMAT_KEY}` is `{f}`, expected `{tag}`"))),
        }
    }

    /// Every metadata entry.
    pub fn metadata(&self) -> &HashMap<String, String> {
        &self.meta
    }

    /// Errors when the file is quantized: training continues from f32 weights only.
    pub fn refuse_quantized(&self, what: &str) -> Result<()> {
        match &self.quant {
            Some(q) => Err(self.error(format!("is quantized ({}): {what} needs the f32 checkpoint it was converted from", q.format.name()))),
            None => Ok(()),
        }
    }

    /// A metadata string.
    pub fn meta(&self, key: &str) -> Option<&str> {
        self.meta.get(key).map(String::as_str)
    }

    /// A required metadata entry parsed as JSON.
    pub fn json<T: DeserializeOwned>(&self, key: &str) -> Result<T> {
        self.json_opt(key)?.ok_or_else(|| self.error(format!("metadata has no `{key}`")))
    }

    /// An optional metadata entry parsed as JSON.
    pub fn json_opt<T: DeserializeOwned>(&self, key: &str) -> Result<Option<T>> {
        self.meta(key).map(|s| serde_json::from_str(s).map_err(|e| self.error(format!("bad `{key}`: {e}")))).transpose()
    }

    /// Errors unless the file stores at least `count` values: a configuration read from the
    /// metadata must not make the loader allocate more than the file holds (`None` = the
    /// count overflows).
    pub fn check_claim(&self, what: &str, count: Option<usize>) -> Result<()> {
        match count {
            Some(n) if n <= self.stored => Ok(()),
            Some(n) => Err(self.error(format!("the configuration of {what} needs {n} parameters, the file stores {}", self.stored))),
            None => Err(self.error(format!("the configuration of {what} overflows"))),
        }
    }

    /// The tensor table (validates every tensor's offsets against the data).
    pub fn tensors(&self) -> Result<SafeTensors<'_>> {
        SafeTensors::deserialize(&self.bytes).map_err(|e| self.error(e.to_string()))
    }

    /// Which tensors are stored quantized (`None` for an f32 checkpoint).
    pub fn quant(&self) -> Option<&QuantInfo> {
        self.quant.as_ref()
    }

    /// Reads tensor `name` as f32 values, checking dtype and shape (quantized tensors are
    /// dequantized).
    pub fn read_f32(&self, st: &SafeTensors<'_>, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        let t = st.tensor(name).map_err(|_| self.error(format!("missing tensor `{name}`")))?;
        if let Some((format, stored)) = self.quant.as_ref().and_then(|q| q.tensors.get(name).map(|s| (q.format, s))) {
            if stored.as_slice() != shape {
                return Err(self.error(format!("quantized tensor `{name}` has shape {stored:?}, expected {shape:?}")));
            }
            if t.dtype() != Dtype::U8 {
                return Err(self.error(format!("quantized tensor `{name}` has dtype {:?}, expected U8", t.dtype())));
            }
            let cols = shape.last().copied().unwrap_or(1);
            let rows = shape.iter().rev().skip(1).try_fold(1usize, |a, &d| a.checked_mul(d));
            let rows = rows.ok_or_else(|| self.error(format!("quantized tensor `{name}`: shape {shape:?} overflows")))?;
            return quant::unpack(format, t.data(), rows, cols).map_err(|e| self.error(format!("tensor `{name}`: {e}")));
        }
        if t.shape() != shape {
            return Err(self.error(format!("tensor `{name}` has shape {:?}, expected {shape:?}", t.shape())));
        }
        match t.dtype() {
            Dtype::F32 => Ok(t.data().chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect()),
            other => Err(self.error(format!("tensor `{name}` has dtype {other:?}, expected F32"))),
        }
    }

    /// Sets every visited parameter from the tensor `{prefix}{name}`, checking shapes; all
    /// are read before any is set, so a failed load changes nothing.
    pub fn fill_params(&self, st: &SafeTensors<'_>, prefix: &str, visit: &mut ParamVisitor<'_>) -> Result<()> {
        let mut wanted = Vec::new();
        visit(&mut |p: &mut Param| wanted.push((format!("{prefix}{}", p.name), p.shape.clone())));
        self.fill_named(st, &wanted, visit)
    }

    /// Sets the visited parameters, in order, from the tensors `named` (full names and
    /// shapes, one per parameter in visiting order); all are read before any is set.
    pub fn fill_named(&self, st: &SafeTensors<'_>, named: &[(String, Vec<usize>)], visit: &mut ParamVisitor<'_>) -> Result<()> {
        let values = named.iter().map(|(n, s)| self.read_f32(st, n, s)).collect::<Result<Vec<_>>>()?;
        let mut it = values.into_iter();
        visit(&mut |p: &mut Param| {
            if let Some(v) = it.next() {
                p.value = v;
            }
        });
        Ok(())
    }

    /// Whether the file stores optimizer state.
    pub fn has_optimizer(&self) -> bool {
        self.meta(OPTIM_STEP_KEY).is_some()
    }

    /// The stored optimizer kind (`adamw`, `sgd`), if any.
    pub fn optimizer_kind(&self) -> Option<&str> {
        self.meta(OPTIM_KIND_KEY)
    }

    /// Restores `opt` from the file's optimizer state for the parameters `named` (names and
    /// shapes, visiting order). A file without optimizer state leaves `opt` fresh.
    pub fn read_optimizer(&self, st: &SafeTensors<'_>, opt: &mut dyn Optimizer, named: &[(String, Vec<usize>)]) -> Result<()> {
        let Some(steps) = self.meta(OPTIM_STEP_KEY) else { return Ok(()) };
        let steps: u64 = steps.parse().map_err(|_| self.error(format!("bad `{OPTIM_STEP_KEY}`: `{steps}`")))?;
        if steps == 0 {
            return Ok(());
        }
        let slots = opt
            .slot_names()
            .iter()
            .map(|slot| named.iter().map(|(n, s)| self.read_f32(st, &format!("optim.{slot}.{n}"), s)).collect::<Result<Vec<_>>>())
            .collect::<Result<Vec<_>>>()?;
        self.about(opt.restore(steps, slots))
    }
}

/// The format tag of the checkpoint at `path`, reading only its header.
pub fn format_of(path: &Path) -> Result<String> {
    let file = path.display().to_string();
    let bad = |msg: String| Error::Checkpoint { path: file.clone(), msg };
    let mut f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let len = f.metadata().map_err(|e| Error::io(path, e))?.len();
    let mut n = [0u8; 8];
    f.read_exact(&mut n).map_err(|_| bad("not a safetensors file (shorter than its 8-byte header length)".into()))?;
    let n = u64::from_le_bytes(n);
    if n > len.saturating_sub(8) || n > 100_000_000 {
        return Err(bad(format!("not a safetensors file (header of {n} bytes in a file of {len})")));
    }
    let mut head = vec![0u8; 8 + n as usize];
    head[..8].copy_from_slice(&n.to_le_bytes());
    f.read_exact(&mut head[8..]).map_err(|e| Error::io(path, e))?;
    #[derive(serde::Deserialize)]
    struct Meta {
        #[serde(rename = "__metadata__", default)]
        metadata: HashMap<String, String>,
    }
    let meta: Meta = serde_json::from_slice(&head[8..]).map_err(|e| bad(format!("not a safetensors file ({e})")))?;
    meta.metadata.get(FORMAT_KEY).cloned().ok_or_else(|| bad(format!("metadata has no `{FORMAT_KEY}` (not an ffwd checkpoint)")))
}
