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
use ffwd::models::lm::{sample, Sequence};
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
    rng: Rng,
    /// Prompt and generated tokens so far.
    history: Vec<u32>,
    /// The token to feed at the next step.
    last: u32,
    made: usize,
}

fn worker(name: &str, ck: &LmCheckpoint, max_batch: usize, rx: &Receiver<Job>, metrics: &Metrics, active: &mut Vec<Active>) {
    let lm = &ck.lm;
    let ctx = lm.config().context;
    let mut dec = lm.decoder();
    loop {
        // wait for work when idle; otherwise take whatever has arrived, up to max_batch
        if active.is_empty() {
            match rx.recv() {
                Ok(job) => admit(job, lm, &mut dec, ctx, active),
                Err(_) => return,
            }
        }
        while active.len() < max_batch {
            match rx.try_recv() {
                Ok(job) => admit(job, lm, &mut dec, ctx, active),
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => {
                    if active.is_empty() {
                        return;
                    }
                    break;
                }
            }
        }
        // clients that left, and sequences that are complete, leave the batch
        active.retain(|a| !a.job.out.is_closed() && a.made < a.job.max_tokens);
        if active.is_empty() {
            continue;
        }
        // a full context restarts from its last half, as the CLI's generator does
        for a in active.iter_mut() {
            if a.seq.len() >= ctx {
                a.seq.reset();
                let from = a.history.len() - ctx / 2;
                let refeed: Vec<u32> = a.history[from..a.history.len() - 1].to_vec();
                if let Err(e) = feed(&mut dec, &mut a.seq, &refeed) {
                    let _ = a.job.out.send(Token::Failed(e.to_string()));
                    a.made = a.job.max_tokens;
                }
            }
        }
        active.retain(|a| a.made < a.job.max_tokens);
        if active.is_empty() {
            continue;
        }
        let tokens: Vec<u32> = active.iter().map(|a| a.last).collect();
        let mut seqs: Vec<&mut Sequence> = active.iter_mut().map(|a| &mut a.seq).collect();
        let v = lm.config().vocab;
        match dec.step(&mut seqs, &tokens) {
            Ok(logits) => {
                metrics.batch(name, tokens.len());
                for (a, row) in active.iter_mut().zip(logits.chunks(v)) {
                    let next = sample(row, a.job.temperature, a.job.top_k, &mut a.rng);
                    a.history.push(next);
                    a.last = next;
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

/// Feeds `tokens` to one sequence, one step each.
fn feed(dec: &mut ffwd::models::Decoder<'_>, seq: &mut Sequence, tokens: &[u32]) -> ffwd::Result<()> {
    for &t in tokens {
        dec.step(&mut [&mut *seq], &[t])?;
    }
    Ok(())
}

/// Starts a sequence: its prompt (all but the last token, which the next step feeds), as
/// `Generator::generate` does.
fn admit(job: Job, lm: &ffwd::models::Lm, dec: &mut ffwd::models::Decoder<'_>, ctx: usize, active: &mut Vec<Active>) {
    if job.max_tokens == 0 || job.prompt.is_empty() {
        let _ = job.out.send(Token::Done);
        return;
    }
    let mut seq = lm.sequence();
    let start = job.prompt.len().saturating_sub(ctx);
    let history = job.prompt.clone();
    let last = history[history.len() - 1];
    if let Err(e) = feed(dec, &mut seq, &history[start..history.len() - 1]) {
        let _ = job.out.send(Token::Failed(e.to_string()));
        return;
    }
    let rng = Rng::new(job.seed);
    active.push(Active { job, seq, rng, history, last, made: 0 });
}
