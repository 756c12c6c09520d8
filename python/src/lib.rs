//! `ffwd._ffwd`: the Python extension of ffwd. A thin shell: it converts NumPy arrays and
//! keyword options into library calls, releases the GIL while the library computes, and turns
//! every library error into a Python exception with the same one-line message. The Python
//! package (`python/ffwd/`) wraps these classes with docstrings and the PyTorch interop.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};

use numpy::{PyArray1, PyArrayDescrMethods, PyArrayDyn, PyArrayMethods, PyUntypedArray, PyUntypedArrayMethods};
use pyo3::exceptions::{PyFileNotFoundError, PyOSError, PyRuntimeError, PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyDict;

use ffwd::config::TrainConfig;
use ffwd::convert::StateDict;
use ffwd::core::Activation;
use ffwd::data::{Dataset, Split};
use ffwd::kernels::{InferKernel, Workspace};
use ffwd::models::Classifier as RsClassifier;
use ffwd::optim::AdamW;
use ffwd::train::lm::{train_lm as rs_train_lm, LmCheckpoint, LmEval, LmProgress, LmRunConfig, LmTrainState};
use ffwd::train::{EpochReport, Progress};

/// A library error as the matching Python exception, with the library's one-line message.
fn py_err(e: ffwd::Error) -> PyErr {
    let msg = e.to_string();
    match &e {
        ffwd::Error::Io { cause, .. } if cause.kind() == std::io::ErrorKind::NotFound => PyFileNotFoundError::new_err(msg),
        ffwd::Error::Io { .. } => PyOSError::new_err(msg),
        _ => PyValueError::new_err(msg),
    }
}

/// The thread pool compute runs on: `None` is rayon's global pool (one thread per core).
static POOL: RwLock<Option<Arc<rayon::ThreadPool>>> = RwLock::new(None);

/// Runs `f` without the GIL, on the pool [`set_threads`] chose.
fn compute<T: Send>(py: Python<'_>, f: impl FnOnce() -> T + Send) -> T {
    let pool = POOL.read().map(|p| p.clone()).unwrap_or(None);
    py.detach(move || match pool {
        Some(pool) => pool.install(f),
        None => f(),
    })
}

/// Sets the number of threads ffwd computes with (0 = one per core).
#[pyfunction]
fn set_threads(n: usize) -> PyResult<()> {
    let pool =
        if n == 0 { None } else { Some(Arc::new(rayon::ThreadPoolBuilder::new().num_threads(n).build().map_err(|e| PyRuntimeError::new_err(e.to_string()))?)) };
    *POOL.write().map_err(|_| PyRuntimeError::new_err("thread pool lock poisoned"))? = pool;
    Ok(())
}

/// The number of threads ffwd computes with.
#[pyfunction]
fn threads() -> usize {
    match POOL.read().ok().and_then(|p| p.clone()) {
        Some(pool) => pool.current_num_threads(),
        None => rayon::current_num_threads(),
    }
}

/// A float32 matrix argument: `batch × width` values of a C-contiguous array (a 1-D array is
/// one sample). Wrong type, dtype, rank, width, layout, and (with `finite`) NaN or infinity are
/// exceptions naming `what`.
struct Matrix<'py> {
    array: numpy::PyReadonlyArrayDyn<'py, f32>,
    batch: usize,
    one_row: bool,
}

impl<'py> Matrix<'py> {
    fn new(x: &Bound<'py, PyAny>, width: usize, what: &str, finite: bool) -> PyResult<Self> {
        let untyped =
            x.cast::<PyUntypedArray>().map_err(|_| PyTypeError::new_err(format!("{what} must be a numpy.ndarray of float32, got {}", type_name(x))))?;
        let dtype = untyped.dtype();
        if !dtype.is_equiv_to(&numpy::dtype::<f32>(x.py())) {
            return Err(PyTypeError::new_err(format!("{what} must have dtype float32, got {dtype} (use {what}.astype(numpy.float32))")));
        }
        let array = x
            .cast::<PyArrayDyn<f32>>()
            .map_err(|e| PyTypeError::new_err(e.to_string()))?
            .try_readonly()
            .map_err(|e| PyValueError::new_err(format!("{what}: {e}")))?;
        let shape = array.shape().to_vec();
        let (batch, cols, one_row) = match shape.as_slice() {
            [c] => (1, *c, true),
            [b, c] => (*b, *c, false),
            _ => return Err(PyValueError::new_err(format!("{what} must have 1 or 2 axes (batch × {width}), got shape {shape:?}"))),
        };
        if cols != width {
            return Err(PyValueError::new_err(format!("{what}: axis `features` expected {width}, got {cols} (shape {shape:?})")));
        }
        if batch == 0 {
            return Err(PyValueError::new_err(format!("{what}: empty batch (0 rows)")));
        }
        // (as_slice also accepts Fortran order, whose values are not in row-major order)
        let not_c = || PyValueError::new_err(format!("{what} must be C-contiguous (use numpy.ascontiguousarray({what}))"));
        if !untyped.is_c_contiguous() {
            return Err(not_c());
        }
        let values = array.as_slice().map_err(|_| not_c())?;
        if finite {
            if let Some(i) = values.iter().position(|v| !v.is_finite()) {
                return Err(PyValueError::new_err(format!("{what}: non-finite value at row {}, column {}", i / width, i % width)));
            }
        }
        Ok(Matrix { array, batch, one_row })
    }

    fn values(&self) -> &[f32] {
        self.array.as_slice().unwrap_or(&[])
    }
}

fn type_name(x: &Bound<'_, PyAny>) -> String {
    x.get_type().name().map(|n| n.to_string()).unwrap_or_else(|_| "an unknown type".into())
}

/// `values` (`batch × cols`) as a NumPy array: 2-D, or 1-D when the input was one sample.
fn out_array<'py>(py: Python<'py>, values: Vec<f32>, batch: usize, cols: usize, one_row: bool) -> PyResult<Bound<'py, PyAny>> {
    let flat = PyArray1::from_vec(py, values);
    if one_row {
        Ok(flat.into_any())
    } else {
        Ok(flat.reshape([batch, cols])?.into_any())
    }
}

/// Loose keyword options (a dict of Python values) as a JSON object, via the `json` module.
fn options_json(py: Python<'_>, options: Option<&Bound<'_, PyDict>>) -> PyResult<serde_json::Map<String, serde_json::Value>> {
    let Some(options) = options else { return Ok(serde_json::Map::new()) };
    let text: String = py.import("json")?.call_method1("dumps", (options,))?.extract()?;
    match serde_json::from_str(&text) {
        Ok(serde_json::Value::Object(m)) => Ok(m),
        _ => Err(PyTypeError::new_err("options must be keyword arguments with JSON-like values")),
    }
}

/// A JSON value as the Python object `json.loads` makes of it.
fn to_python<'py>(py: Python<'py>, value: &impl serde::Serialize) -> PyResult<Bound<'py, PyAny>> {
    let text = serde_json::to_string(value).map_err(|e| PyRuntimeError::new_err(e.to_string()))?;
    py.import("json")?.call_method1("loads", (text,))
}

/// A trained classifier (any ffwd layer between the input and the softmax).
#[pyclass(module = "ffwd._ffwd", frozen)]
struct Classifier {
    model: RsClassifier,
}

#[pymethods]
impl Classifier {
    /// Loads a checkpoint written by `save` or `ffwd train --save`; `bf16=True` runs
    /// inference on the layer's weight matrices rounded to bfloat16 (dense, ufff, fff leaves,
    /// moe/smoe/moefied experts; other layers raise).
    #[staticmethod]
    #[pyo3(signature = (path, bf16=false))]
    fn load(py: Python<'_>, path: PathBuf, bf16: bool) -> PyResult<Self> {
        let model = compute(py, || {
            let mut m = RsClassifier::load(&path)?;
            if bf16 {
                m.set_precision(ffwd::kernels::Precision::Bf16)?;
            }
            Ok(m)
        })
        .map_err(py_err)?;
        Ok(Classifier { model })
    }

    /// Saves the model (weights and configuration) as safetensors.
    fn save(&self, py: Python<'_>, path: PathBuf) -> PyResult<()> {
        compute(py, || self.model.save(&path)).map_err(py_err)
    }

    /// Predicted class of each row of `x` (float32, `batch × in_features`) as int64.
    fn predict<'py>(&self, py: Python<'py>, x: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyAny>> {
        let m = Matrix::new(x, self.model.config().in_features, "x", true)?;
        let values = m.values();
        let classes = compute(py, || self.model.predict(values, m.batch)).map_err(py_err)?;
        let classes: Vec<i64> = classes.into_iter().map(i64::from).collect();
        if m.one_row {
            return Ok(numpy::PyArray0::from_owned_array(py, numpy::ndarray::arr0(classes[0])).into_any());
        }
        Ok(PyArray1::from_vec(py, classes).into_any())
    }

    /// Class probabilities of each row of `x`: float32, `batch × n_classes`.
    fn predict_proba<'py>(&self, py: Python<'py>, x: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyAny>> {
        let m = Matrix::new(x, self.model.config().in_features, "x", true)?;
        let values = m.values();
        let p = compute(py, || self.model.predict_proba(values, m.batch)).map_err(py_err)?;
        out_array(py, p, m.batch, self.model.config().n_classes, m.one_row)
    }

    /// Inference logits of each row of `x`: float32, `batch × n_classes`.
    fn logits<'py>(&self, py: Python<'py>, x: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyAny>> {
        let m = Matrix::new(x, self.model.config().in_features, "x", true)?;
        let values = m.values();
        let p = compute(py, || self.model.logits(values, m.batch)).map_err(py_err)?;
        out_array(py, p, m.batch, self.model.config().n_classes, m.one_row)
    }

    /// Input width.
    #[getter]
    fn in_features(&self) -> usize {
        self.model.config().in_features
    }

    /// Number of classes.
    #[getter]
    fn n_classes(&self) -> usize {
        self.model.config().n_classes
    }

    /// The layer's kind (`dense`, `fff`, `ufff`, `moe`, `smoe`, `pkm`).
    #[getter]
    fn layer(&self) -> &'static str {
        self.model.layer().kind()
    }

    /// Scalars of the model's parameters.
    #[getter]
    fn param_count(&self) -> usize {
        self.model.param_count()
    }

    /// Hidden neurons one sample evaluates at inference.
    #[getter]
    fn neurons_per_inference(&self) -> usize {
        self.model.layer().neurons_per_inference()
    }

    /// The model's configuration (the layer's table included) as a dict.
    #[getter]
    fn config<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        to_python(py, self.model.config())
    }

    fn __repr__(&self) -> String {
        let c = self.model.config();
        format!(
            "Classifier(layer={:?}, in_features={}, n_classes={}, params={})",
            self.model.layer().kind(),
            c.in_features,
            c.n_classes,
            self.model.param_count()
        )
    }
}

/// Prints epoch lines on stderr when verbose.
struct EpochLines(bool);

impl Progress for EpochLines {
    fn epoch(&mut self, r: &EpochReport) {
        if self.0 {
            eprintln!("epoch {:>3}  loss {:.4}  test {:.4}  {:.1}s", r.epoch, r.train_loss, r.test_accuracy, r.seconds);
        }
    }
}

impl LmProgress for EpochLines {
    fn eval(&mut self, e: &LmEval) {
        if self.0 {
            eprintln!("step {:>6}  train {:.4}  val {:.4} nats ({:.3} bpc)  {:.0} tok/s", e.step, e.train_loss, e.val_loss, e.val_bpc, e.train_tokens_per_s);
        }
    }
}

/// Labels as u32: an integer array of `batch` non-negative values.
fn labels(y: &Bound<'_, PyAny>, batch: usize, what: &str) -> PyResult<Vec<u32>> {
    let np = y.py().import("numpy")?;
    let arr = np.call_method1("asarray", (y,))?;
    let kind: String = arr.getattr("dtype")?.getattr("kind")?.extract()?;
    if kind != "i" && kind != "u" {
        return Err(PyTypeError::new_err(format!("{what} must hold integer class labels, got dtype kind `{kind}`")));
    }
    let v: Vec<i64> = arr.call_method1("astype", ("int64",))?.call_method0("ravel")?.call_method0("tolist")?.extract()?;
    if v.len() != batch {
        return Err(PyValueError::new_err(format!("{what}: axis `rows` expected {batch}, got {}", v.len())));
    }
    v.into_iter().map(|l| u32::try_from(l).map_err(|_| PyValueError::new_err(format!("{what}: label {l} is not in 0..2^32")))).collect()
}

/// Reads features (`batch × width`, any width) from `x`.
fn features(x: &Bound<'_, PyAny>, what: &str) -> PyResult<(Vec<f32>, usize, usize)> {
    let width = match x.cast::<PyUntypedArray>() {
        Ok(a) if a.ndim() == 2 => a.shape()[1],
        Ok(a) => return Err(PyValueError::new_err(format!("{what} must have 2 axes (samples × features), got {}", a.ndim()))),
        Err(_) => return Err(PyTypeError::new_err(format!("{what} must be a numpy.ndarray of float32, got {}", type_name(x)))),
    };
    let m = Matrix::new(x, width, what, true)?;
    Ok((m.values().to_vec(), m.batch, width))
}

/// Trains a classifier on `x` (float32, samples × features) and `y` (integer labels); the
/// test set is `x_test`/`y_test`, or a seeded `holdout` share of `x`. `options` are
/// `ffwd train`'s configuration keys. Returns the model and the metrics as a dict.
#[pyfunction]
#[pyo3(signature = (x, y, x_test=None, y_test=None, verbose=false, **options))]
fn train_classifier<'py>(
    py: Python<'py>,
    x: &Bound<'py, PyAny>,
    y: &Bound<'py, PyAny>,
    x_test: Option<&Bound<'py, PyAny>>,
    y_test: Option<&Bound<'py, PyAny>>,
    verbose: bool,
    options: Option<&Bound<'py, PyDict>>,
) -> PyResult<(Classifier, Bound<'py, PyAny>)> {
    let opts = options_json(py, options)?;
    if opts.contains_key("data") || opts.contains_key("algo") {
        return Err(PyValueError::new_err("train_classifier takes the data as arrays (no `data`) and trains by backpropagation (no `algo`)"));
    }
    let cfg = TrainConfig::from_options(&TrainConfig::default(), &opts).map_err(py_err)?;
    let (xs, n, width) = features(x, "x")?;
    let train = Dataset::from_arrays(xs, labels(y, n, "y")?, width, "training data").map_err(py_err)?;
    let split = match (x_test, y_test) {
        (Some(xt), Some(yt)) => {
            let (xs, n, w) = features(xt, "x_test")?;
            let test = Dataset::from_arrays(xs, labels(yt, n, "y_test")?, w, "test data").map_err(py_err)?;
            Split::new(train, test)
        }
        (None, None) => train.holdout(cfg.holdout, cfg.seed).and_then(|(tr, te)| Split::new(tr, te)),
        _ => return Err(PyValueError::new_err("give both x_test and y_test, or neither")),
    }
    .map_err(py_err)?;
    let run = compute(py, || ffwd::spec::fit_classifier(&cfg, &split, &mut EpochLines(verbose))).map_err(py_err)?;
    let metrics = serde_json::json!({
        "test_accuracy": run.report.test_accuracy,
        "train_accuracy": run.report.train_accuracy,
        "train_seconds": run.report.train_seconds,
        "steps": run.report.steps,
        "params": run.model.param_count(),
        "neurons_per_inference": run.model.layer().neurons_per_inference(),
        "train_samples": split.train.len(),
        "test_samples": split.test.len(),
        "config": cfg,
        "history": run.report.history,
    });
    Ok((Classifier { model: run.model }, to_python(py, &metrics)?))
}

/// A character-level transformer language model with its vocabulary (and, after training,
/// its optimizer state, so that `save` writes a resumable checkpoint).
#[pyclass(module = "ffwd._ffwd", frozen, name = "LM")]
struct Lm {
    ck: LmCheckpoint,
}

#[pymethods]
impl Lm {
    /// Loads a checkpoint written by `save` or `ffwd lm train --save`; `bf16=True` runs the
    /// FFN blocks on bfloat16 weight matrices (attention and embeddings stay f32).
    #[staticmethod]
    #[pyo3(signature = (path, bf16=false))]
    fn load(py: Python<'_>, path: PathBuf, bf16: bool) -> PyResult<Self> {
        let ck = compute(py, || {
            let mut ck = LmCheckpoint::load(&path)?;
            if bf16 {
                ck.lm.set_precision(ffwd::kernels::Precision::Bf16)?;
            }
            Ok(ck)
        })
        .map_err(py_err)?;
        Ok(Lm { ck })
    }

    /// Saves the model, vocabulary, options and optimizer state.
    fn save(&self, py: Python<'_>, path: PathBuf) -> PyResult<()> {
        compute(py, || self.ck.save(&path)).map_err(py_err)
    }

    /// Continues `prompt` by `max_tokens` characters.
    #[pyo3(signature = (prompt, max_tokens=200, temperature=0.8, top_k=0, seed=0))]
    fn generate(&self, py: Python<'_>, prompt: &str, max_tokens: usize, temperature: f32, top_k: usize, seed: u64) -> PyResult<String> {
        compute(py, || self.ck.generate_text(prompt, max_tokens, temperature, top_k, seed)).map_err(py_err)
    }

    /// The characters the model knows, in id order.
    #[getter]
    fn vocab(&self) -> String {
        self.ck.tokenizer.chars().iter().collect()
    }

    /// Scalars of the model's parameters.
    #[getter]
    fn param_count(&self) -> usize {
        self.ck.lm.param_count()
    }

    /// The model's configuration as a dict.
    #[getter]
    fn config<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        to_python(py, self.ck.lm.config())
    }

    fn __repr__(&self) -> String {
        let c = self.ck.lm.config();
        format!(
            "LM(layers={}, d_model={}, heads={}, context={}, ffn={:?}, vocab={}, params={})",
            c.layers,
            c.d_model,
            c.heads,
            c.context,
            c.ffn.kind(),
            c.vocab,
            self.ck.lm.param_count()
        )
    }
}

/// Trains a language model on `text`; `options` are the keys of `ffwd lm train`'s `[model]`
/// and `[train]` tables and its FFN shorthands. Returns the model and the metrics as a dict.
#[pyfunction]
#[pyo3(signature = (text, verbose=false, **options))]
fn train_lm<'py>(py: Python<'py>, text: &str, verbose: bool, options: Option<&Bound<'py, PyDict>>) -> PyResult<(Lm, Bound<'py, PyAny>)> {
    let opts = options_json(py, options)?;
    let (mut run_cfg, shape) = ffwd::spec::lm_options(&LmRunConfig::default(), &opts).map_err(py_err)?;
    if !opts.contains_key("seq_len") {
        run_cfg.train.seq_len = 0; // the whole context
    }
    let (ck, history, seconds) = compute(py, || -> ffwd::Result<_> {
        let run = ffwd::spec::lm(&run_cfg, &shape, text)?;
        let (mut lm, mut opt, mut state) = (run.lm, AdamW::new(0.0), LmTrainState::default());
        rs_train_lm(&mut lm, &run.data, &run.options, &mut opt, &mut state, None, None, &mut EpochLines(verbose))?;
        let (history, seconds) = (state.history.clone(), state.seconds);
        Ok((LmCheckpoint { lm, tokenizer: run.tokenizer, options: run.options, state, optimizer: opt }, history, seconds))
    })
    .map_err(py_err)?;
    let last = history.last();
    let metrics = serde_json::json!({
        "val_loss": last.map(|e| e.val_loss),
        "val_bpc": last.map(|e| e.val_bpc),
        "train_loss": last.map(|e| e.train_loss),
        "steps": ck.state.step,
        "train_seconds": seconds,
        "params": ck.lm.param_count(),
        "model": ck.lm.config(),
        "train": ck.options,
        "history": history,
    });
    Ok((Lm { ck }, to_python(py, &metrics)?))
}

/// An AR-Net forecaster (linear AR with AR-Net's sparsity, plus an optional FFN).
#[pyclass(module = "ffwd._ffwd", frozen)]
struct Forecaster {
    model: ffwd::models::Forecaster,
}

#[pymethods]
impl Forecaster {
    /// Loads a checkpoint written by `save` or `ffwd forecast train --save`.
    #[staticmethod]
    fn load(py: Python<'_>, path: PathBuf) -> PyResult<Self> {
        Ok(Forecaster { model: compute(py, || ffwd::models::Forecaster::load(&path)).map_err(py_err)? })
    }

    /// Saves the model (with its standardisation).
    fn save(&self, py: Python<'_>, path: PathBuf) -> PyResult<()> {
        compute(py, || self.model.save(&path)).map_err(py_err)
    }

    /// The next `horizon` values after `history` (float32, 1-D; its last `lags` values are read).
    fn forecast<'py>(&self, py: Python<'py>, history: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyAny>> {
        let n = history.len()?;
        let m = Matrix::new(history, n, "history", true)?;
        if !m.one_row {
            return Err(PyValueError::new_err("history must be a 1-D array of the series' values"));
        }
        let values = m.values().to_vec();
        let next = compute(py, || self.model.forecast(&values)).map_err(py_err)?;
        Ok(PyArray1::from_vec(py, next).into_any())
    }

    /// The configuration (lags, horizon, FFN, standardisation, step) as a dict.
    #[getter]
    fn config<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        to_python(py, self.model.config())
    }

    fn __repr__(&self) -> String {
        let c = self.model.config();
        format!("Forecaster(lags={}, horizon={}, ffn={:?}, column={:?})", c.lags, c.horizon, c.layer.as_ref().map(|l| l.kind()), c.column)
    }
}

/// Trains a forecaster on a CSV series (`path`, with `column` and `fill`) or on `values` (a
/// 1-D float32 array, its positions as the time axis); `options` are `ffwd forecast train`'s
/// keys. Returns the model and the report as a dict.
#[pyfunction]
#[pyo3(signature = (path=None, values=None, column=None, fill="none", verbose=false, **options))]
fn train_forecaster<'py>(
    py: Python<'py>,
    path: Option<PathBuf>,
    values: Option<&Bound<'py, PyAny>>,
    column: Option<&str>,
    fill: &str,
    verbose: bool,
    options: Option<&Bound<'py, PyDict>>,
) -> PyResult<(Forecaster, Bound<'py, PyAny>)> {
    use ffwd::data::timeseries::{read_series, Fill, Frequency, Series, Stamp};
    let opts = ffwd::spec::forecast_options(&options_json(py, options)?).map_err(py_err)?;
    let fill: Fill = fill.parse().map_err(PyValueError::new_err)?;
    let series = match (path, values) {
        (Some(p), None) => compute(py, || read_series(&p, column, fill)).map_err(py_err)?,
        (None, Some(v)) => {
            let n = v.len()?;
            let m = Matrix::new(v, n, "values", true)?;
            if !m.one_row {
                return Err(PyValueError::new_err("values must be a 1-D array"));
            }
            let values = m.values().to_vec();
            Series { column: column.unwrap_or("values").to_string(), freq: Frequency::Yearly, times: (0..n as i64).map(Stamp).collect(), values, filled: 0 }
        }
        _ => return Err(PyValueError::new_err("give either path (a CSV file) or values (a 1-D array)")),
    };
    let (model, report) = compute(py, || {
        ffwd::train::forecast::fit_forecaster(&series, &opts, &mut |e| {
            if verbose {
                eprintln!("epoch {:>4}  train mse {:.4}  val mse {:.4}", e.epoch, e.train_mse, e.val_mse);
            }
        })
    })
    .map_err(py_err)?;
    Ok((Forecaster { model }, to_python(py, &serde_json::json!({ "options": opts, "report": report }))?))
}

/// An immutable inference kernel of one layer (built from converted weights).
#[pyclass(module = "ffwd._ffwd", frozen)]
struct Kernel {
    kernel: Box<dyn InferKernel>,
    /// `fff` or `ufff` and their shape, for `repr`.
    about: String,
}

#[pymethods]
impl Kernel {
    /// `x` (float32, `batch × in_features`, C-contiguous) → `batch × out_features`, through
    /// the conditional (hard-routing) kernel.
    fn forward<'py>(&self, py: Python<'py>, x: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyAny>> {
        let m = Matrix::new(x, self.kernel.in_features(), "x", false)?;
        let (values, batch, no) = (m.values(), m.batch, self.kernel.out_features());
        let y = compute(py, || -> ffwd::Result<Vec<f32>> {
            let mut y = vec![0.0f32; batch * no];
            self.kernel.forward(values, batch, &mut y, &mut Workspace::new())?;
            Ok(y)
        })
        .map_err(py_err)?;
        out_array(py, y, batch, no, m.one_row)
    }

    /// Input width.
    #[getter]
    fn in_features(&self) -> usize {
        self.kernel.in_features()
    }

    /// Output width.
    #[getter]
    fn out_features(&self) -> usize {
        self.kernel.out_features()
    }

    /// Hidden neurons one sample evaluates.
    #[getter]
    fn neurons_per_inference(&self) -> usize {
        self.kernel.neurons_per_inference()
    }

    fn __repr__(&self) -> String {
        self.about.clone()
    }
}

/// A dict of name → float32 array as the library's state dict (arrays are copied).
fn state_dict(state: &Bound<'_, PyDict>) -> PyResult<StateDict> {
    let mut out = BTreeMap::new();
    for (k, v) in state.iter() {
        let name: String = k.extract()?;
        let arr = v.cast::<PyUntypedArray>().map_err(|_| PyTypeError::new_err(format!("state[{name:?}] must be a numpy.ndarray, got {}", type_name(&v))))?;
        if !arr.dtype().is_equiv_to(&numpy::dtype::<f32>(v.py())) {
            continue; // e.g. fastfeedforward's int64 `depth`: not a weight
        }
        let shape = arr.shape().to_vec();
        let a = v.cast::<PyArrayDyn<f32>>()?.try_readonly().map_err(|e| PyValueError::new_err(e.to_string()))?;
        let values = match a.as_slice() {
            Ok(s) if arr.is_c_contiguous() => s.to_vec(),
            _ => a.as_array().iter().copied().collect(), // logical (row-major) order
        };
        out.insert(name, (shape, values));
    }
    Ok(out)
}

fn activation(name: &str) -> PyResult<Activation> {
    Activation::parse(name).ok_or_else(|| PyValueError::new_err(format!("unknown activation `{name}` (relu, gelu, silu)")))
}

/// A `fastfeedforward` FFF's state dict (float32 arrays `node_weights`, `node_biases`,
/// `w1s`, `b1s`, `w2s`, `b2s`) as a hard-routing inference kernel.
#[pyfunction]
#[pyo3(signature = (state, activation="relu"))]
fn fff_kernel(state: &Bound<'_, PyDict>, activation: &str) -> PyResult<Kernel> {
    let act = self::activation(activation)?;
    let fff = ffwd::convert::fastfeedforward::fff_from_state(&state_dict(state)?, act).map_err(py_err)?;
    use ffwd::layers::{Compile, Layer};
    let about = format!(
        "FFF(depth={}, leaf={}, in_features={}, out_features={}, activation={activation:?})",
        fff.cfg().depth,
        fff.cfg().leaf,
        fff.in_features(),
        fff.out_features()
    );
    Ok(Kernel { kernel: fff.kernel(), about })
}

/// Writes `path` with its weight matrices as ggml Q8_0/Q4_0 blocks (`ffwd convert quantize`);
/// returns the conversion report as JSON.
#[pyfunction]
#[pyo3(signature = (path, out, format="q8_0", experts_only=false))]
fn quantize(py: Python<'_>, path: PathBuf, out: PathBuf, format: &str, experts_only: bool) -> PyResult<String> {
    let format = ffwd::core::quant::QFormat::parse(format).map_err(py_err)?;
    compute(py, || -> ffwd::Result<String> {
        let ck = ffwd::checkpoint::CheckpointReader::open(&path)?;
        let (bytes, report) = ffwd::convert::quantize::quantize_checkpoint(&ck, format, experts_only)?;
        ffwd::checkpoint::write_atomic(&out, &bytes)?;
        serde_json::to_string(&report).map_err(|e| ffwd::Error::Invalid(e.to_string()))
    })
    .map_err(py_err)
}

/// UltraFastBERT tree weights (`{prefix}linear_in.weight`, `{prefix}linear_in.bias`,
/// `{prefix}linear_out.weight`, float32) with `trees` parallel trees as an inference kernel.
#[pyfunction]
#[pyo3(signature = (state, prefix="", trees=1, activation="gelu"))]
fn ufff_kernel(state: &Bound<'_, PyDict>, prefix: &str, trees: usize, activation: &str) -> PyResult<Kernel> {
    let act = self::activation(activation)?;
    let u = ffwd::convert::ultrafastbert::ufff_from_state(&state_dict(state)?, prefix, trees, act).map_err(py_err)?;
    use ffwd::layers::{Compile, Layer};
    let about = format!("UltraFastTree(trees={trees}, depth={}, in_features={}, out_features={})", u.levels() - 1, u.in_features(), u.out_features());
    Ok(Kernel { kernel: u.kernel(), about })
}

/// The extension module.
#[pymodule]
fn _ffwd(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<Classifier>()?;
    m.add_class::<Lm>()?;
    m.add_class::<Kernel>()?;
    m.add_class::<Forecaster>()?;
    m.add_function(wrap_pyfunction!(train_forecaster, m)?)?;
    m.add_function(wrap_pyfunction!(train_classifier, m)?)?;
    m.add_function(wrap_pyfunction!(train_lm, m)?)?;
    m.add_function(wrap_pyfunction!(fff_kernel, m)?)?;
    m.add_function(wrap_pyfunction!(ufff_kernel, m)?)?;
    m.add_function(wrap_pyfunction!(set_threads, m)?)?;
    m.add_function(wrap_pyfunction!(quantize, m)?)?;
    m.add_function(wrap_pyfunction!(threads, m)?)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
