//! Continuous batching for language models: one worker thread per model keeps the active
//! sequences and, at every step, advances all of them by one token in one batched pass
//! ([`ffwd::models::Decoder`]: the projections, the FFN kernel and the logits over all rows).
//! New requests join between steps (their prompt is fed first); a sequence leaves as soon as
//! it has its tokens or its client has gone.
//!
//! Each sequence samples exactly as `ffwd lm sample` does (same seed stream, same handling of
//! a full context), so a stream decoded alone equals the CLI's output; in a batch its logits
//! agree with the solo ones to rounding.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::mpsc::{self, Receiver, Sender, TryRecvError};
use std::sync::Arc;

use tokio::sync::mpsc::UnboundedSender;

use ffwd::core::Rng;
use ffwd::models::lm::sample;
use ffwd::models::{Sequence, Stream};
use ffwd::train::lm::LmCheckpoint;

use crate::metrics::Metrics;

/// What the worker sends a stream.
#[derive(Debug)]
pub enum Token {
    /// The next piece of text (one character).
    Text(String),
    /// The completion ended normally.
    Done,
    /// The completion failed (internal error message).
    Failed(String),
}

/// One completion request.
pub struct Job {
    /// Prompt token ids (at least one).
    pub prompt: Vec<u32>,
    /// Tokens to generate.
    pub max_tokens: usize,
    /// Sampling temperature (0 = greedy).
    pub temperature: f32,
    /// Sample among the k most likely (0 = all).
    pub top_k: usize,
    /// Seed of the sampler.
    pub seed: u64,
    /// Where the tokens go; a closed receiver (client gone) ends the sequence.
    pub out: UnboundedSender<Token>,
}

/// Starts the decoding worker of one model (on a thread of its own compute pool, as
/// [`crate::batcher::spawn`]); returns its request queue.
pub fn spawn(name: String, ck: Arc<LmCheckpoint>, max_batch: usize, threads: usize, metrics: Arc<Metrics>) -> std::io::Result<Sender<Job>> {
    let (tx, rx) = mpsc::channel::<Job>();
    let pool = crate::compute_pool(&name, threads)?;
    std::thread::Builder::new().name(format!("ffwd-decode-{name}")).spawn(move || {
        pool.install(move || {
            // a panic (a bug) fails the active streams; the loop then starts afresh
            loop {
                let mut active: Vec<Active> = Vec::new();
                let run = catch_unwind(AssertUnwindSafe(|| worker(&name, &ck, max_batch.max(1), &rx, &metrics, &mut active)));
                match run {
                    Ok(()) => return, // every sender gone: the server is shutting down
                    Err(_) => active.drain(..).for_each(|a| drop(a.job.out.send(Token::Failed("internal error: decoding panicked".into())))),
                }
            }
        })
    })?;
    Ok(tx)
}

/// A sequence being decoded.
struct Active {
    job: Job,
    seq: Sequence,
    stream: Stream,
    rng: Rng,
    made: usize,
}

fn worker(name: &str, ck: &LmCheckpoint, max_batch: usize, rx: &Receiver<Job>, metrics: &Metrics, active: &mut Vec<Active>) {
    let lm = &ck.lm;
    let v = lm.config().vocab;
    let mut dec = lm.decoder();
    loop {
        // wait for work when idle; otherwise take whatever has arrived, up to max_batch
        if active.is_empty() {
            match rx.recv() {
                Ok(job) => admit(job, lm, &mut dec, active),
                Err(_) => return,
            }
        }
        while active.len() < max_batch {
            match rx.try_recv() {
                Ok(job) => admit(job, lm, &mut dec, active),
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => {
                    if active.is_empty() {
                        return;
                    }
                    break;
                }
            }
        }
        // clients that left, and sequences that are complete or fail to restart a full cache,
        // leave the batch
        active.retain_mut(|a| {
            if a.job.out.is_closed() || a.made >= a.job.max_tokens {
                return false;
            }
            match a.stream.make_room(&mut dec, &mut a.seq) {
                Ok(()) => true,
                Err(e) => {
                    let _ = a.job.out.send(Token::Failed(e.to_string()));
                    false
                }
            }
        });
        if active.is_empty() {
            continue;
        }
        let tokens: Vec<u32> = active.iter().map(|a| a.stream.last()).collect();
        let mut seqs: Vec<&mut Sequence> = active.iter_mut().map(|a| &mut a.seq).collect();
        match dec.step(&mut seqs, &tokens) {
            Ok(logits) => {
                metrics.batch(name, tokens.len());
                for (a, row) in active.iter_mut().zip(logits.chunks(v)) {
                    let next = sample(row, a.job.temperature, a.job.top_k, &mut a.rng);
                    a.stream.push(next);
                    a.made += 1;
                    let _ = a.job.out.send(Token::Text(ck.tokenizer.decode(&[next])));
                    if a.made == a.job.max_tokens {
                        let _ = a.job.out.send(Token::Done);
                    }
                }
                metrics.tokens(name, tokens.len());
            }
            Err(e) => {
                for a in active.drain(..) {
                    let _ = a.job.out.send(Token::Failed(e.to_string()));
                }
            }
        }
    }
}

/// Starts a sequence on its prompt (as `Generator::generate` does, through [`Stream`]).
fn admit(job: Job, lm: &ffwd::models::Lm, dec: &mut ffwd::models::Decoder<'_>, active: &mut Vec<Active>) {
    if job.max_tokens == 0 || job.prompt.is_empty() {
        let _ = job.out.send(Token::Done);
        return;
    }
    let mut seq = lm.sequence();
    match Stream::start(dec, &mut seq, &job.prompt) {
        Ok(stream) => {
            let rng = Rng::new(job.seed);
            active.push(Active { job, seq, stream, rng, made: 0 });
        }
        Err(e) => drop(job.out.send(Token::Failed(e.to_string()))),
    }
}
