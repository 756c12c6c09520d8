//! Dynamic batching for classifiers and Forward-Forward nets: requests queue on a channel; a
//! worker thread takes the first, then everything already waiting (up to `max_batch` rows),
//! runs one model call and answers each request with its rows. There is no wait window: an
//! idle model answers a lone request at once, a busy one answers the queue as one batch, so
//! load raises the batch size instead of the latency.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::mpsc::{self, Receiver, Sender, TryRecvError};
use std::sync::Arc;

use tokio::sync::oneshot;

use ffwd::kernels::InferKernel;
use ffwd::models::Classifier;
use ffwd::train::forward_forward::FfNet;

use crate::metrics::Metrics;

/// What a classifier answers for a request's rows.
pub struct Prediction {
    /// Class of every row.
    pub classes: Vec<u32>,
    /// Class probabilities, `rows × classes` (`None` for Forward-Forward nets, which predict
    /// with their softmax head's argmax only).
    pub probabilities: Option<Vec<f32>>,
}

/// One request's rows and where to send its answer.
pub struct Job {
    /// Features, `rows × in_features`.
    pub x: Vec<f32>,
    /// Rows.
    pub rows: usize,
    /// The answer, or an internal error message.
    pub reply: oneshot::Sender<Result<Prediction, String>>,
}

/// The model a batch worker runs.
pub enum BatchModel {
    /// A classifier (its immutable inference kernel).
    Classifier(Box<Classifier>),
    /// A Forward-Forward net (its softmax head).
    Ff(Box<FfNet>),
}

impl BatchModel {
    /// Input width.
    pub fn in_features(&self) -> usize {
        match self {
            BatchModel::Classifier(m) => m.config().in_features,
            BatchModel::Ff(f) => f.in_features(),
        }
    }

    /// Number of classes.
    pub fn classes(&self) -> usize {
        match self {
            BatchModel::Classifier(m) => m.config().n_classes,
            BatchModel::Ff(f) => f.classes(),
        }
    }

    /// Kind name for `/v1/models`.
    pub fn kind(&self) -> String {
        match self {
            BatchModel::Classifier(m) => format!("classifier ({})", m.layer().kind()),
            BatchModel::Ff(_) => "classifier (forward-forward)".to_string(),
        }
    }

    fn run(&mut self, x: &[f32], rows: usize, usage: &mut Vec<u64>) -> ffwd::Result<(Prediction, Option<&'static str>)> {
        match self {
            BatchModel::Classifier(m) => {
                let kernel: &dyn InferKernel = m.kernel()?;
                let what = kernel.route_usage(x, rows, usage);
                let (classes, probabilities) = m.classify(x, rows)?;
                Ok((Prediction { classes, probabilities: Some(probabilities) }, what))
            }
            BatchModel::Ff(f) => {
                let mut classes = vec![0u32; rows];
                f.predict_softmax(x, rows, &mut classes);
                Ok((Prediction { classes, probabilities: None }, None))
            }
        }
    }
}

/// Starts the worker of one model; returns the queue to send jobs to. The worker runs on a
/// thread of its own compute pool, so the model's parallel kernels start without waking a
/// foreign pool (measured: a decoding step of the default LM takes 0.2 ms inside its pool,
/// 0.3 ms when it hands work to the global pool from outside).
pub fn spawn(name: String, mut model: BatchModel, max_batch: usize, threads: usize, metrics: Arc<Metrics>) -> std::io::Result<Sender<Job>> {
    let (tx, rx) = mpsc::channel::<Job>();
    let pool = crate::compute_pool(&name, threads)?;
    std::thread::Builder::new()
        .name(format!("ffwd-batch-{name}"))
        .spawn(move || pool.install(move || worker(&name, &mut model, max_batch.max(1), &rx, &metrics)))?;
    Ok(tx)
}

fn worker(name: &str, model: &mut BatchModel, max_batch: usize, rx: &Receiver<Job>, metrics: &Metrics) {
    let classes = model.classes();
    let mut x = Vec::new();
    let mut usage = Vec::new();
    // blocks until the first job; ends when every sender is gone (server shut down)
    while let Ok(first) = rx.recv() {
        let mut jobs = vec![first];
        let mut rows = jobs[0].rows;
        while rows < max_batch {
            match rx.try_recv() {
                Ok(job) => {
                    rows += job.rows;
                    jobs.push(job);
                }
                Err(TryRecvError::Empty | TryRecvError::Disconnected) => break,
            }
        }
        x.clear();
        for j in &jobs {
            x.extend_from_slice(&j.x);
        }
        usage.iter_mut().for_each(|c| *c = 0);
        // a panic inside the model answers this batch with an error; the worker keeps serving
        let out = catch_unwind(AssertUnwindSafe(|| model.run(&x, rows, &mut usage)));
        metrics.batch(name, rows);
        match out {
            Ok(Ok((p, what))) => {
                if let Some(what) = what {
                    metrics.usage(name, what, &usage);
                }
                let mut start = 0;
                for j in jobs {
                    let classes_part = p.classes[start..start + j.rows].to_vec();
                    let probs = p.probabilities.as_ref().map(|v| v[start * classes..(start + j.rows) * classes].to_vec());
                    start += j.rows;
                    let _ = j.reply.send(Ok(Prediction { classes: classes_part, probabilities: probs }));
                }
            }
            Ok(Err(e)) => jobs.into_iter().for_each(|j| drop(j.reply.send(Err(e.to_string())))),
            Err(_) => jobs.into_iter().for_each(|j| drop(j.reply.send(Err("internal error: the model panicked".to_string())))),
        }
    }
}
