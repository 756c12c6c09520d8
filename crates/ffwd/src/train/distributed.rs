//! Data-parallel training: the collective operations the trainers need, and the fused
//! gradient all-reduce.
//!
//! The library does not depend on MPI: a shell that runs under `mpirun` (the `ffwd` binary
//! built with `--features mpi`) implements [`Collective`] on its communicator and installs it
//! once with [`init`], as MPI's own `MPI_COMM_WORLD` is process-wide. The trainers
//! ([`crate::train::backprop::train_from`], [`crate::train::lm::train_lm`]) then split each
//! step's globally defined work: rank r takes its share of the step's minibatch rows or
//! micro-batches, gradients are summed over the ranks in one fused buffer, and every rank
//! takes the identical optimizer step (noise, clipping and the update see the same summed
//! gradient). Without a group, or with one rank, nothing changes.

use std::sync::OnceLock;
use std::time::Instant;

use crate::core::{Param, ParamVisitor};
use crate::error::{Error, Result};

/// The collective operations of a group of processes (ranks).
pub trait Collective: Send + Sync {
    /// This process's rank, `0..size`.
    fn rank(&self) -> usize;
    /// Number of ranks.
    fn size(&self) -> usize;
    /// Element-wise sum over the ranks of `send` into `recv` (same length), on every rank.
    fn all_reduce_sum(&self, send: &[f32], recv: &mut [f32]);
    /// The same for f64 values (losses, counts, clocks).
    fn all_reduce_sum_f64(&self, send: &[f64], recv: &mut [f64]);
}

static GROUP: OnceLock<Box<dyn Collective>> = OnceLock::new();

/// Installs the process's group (once; a second call is an error).
pub fn init(group: Box<dyn Collective>) -> Result<()> {
    GROUP.set(group).map_err(|_| Error::Invalid("the data-parallel group is already set".into()))
}

/// The process's group when it has more than one rank.
pub fn group() -> Option<&'static dyn Collective> {
    GROUP.get().map(|g| g.as_ref()).filter(|g| g.size() > 1)
}

/// (rank, ranks): (0, 1) without a group.
pub fn rank_and_size() -> (usize, usize) {
    group().map_or((0, 1), |g| (g.rank(), g.size()))
}

/// Sums small f64 vectors over the ranks in place (identity without a group).
pub fn sum_f64(values: &mut [f64]) {
    if let Some(g) = group() {
        let send = values.to_vec();
        g.all_reduce_sum_f64(&send, values);
    }
}

/// Communication totals of a run.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct SyncStats {
    /// Gradient all-reduces.
    pub reduces: usize,
    /// Seconds inside them (waiting for slower ranks included).
    pub seconds: f64,
    /// Bytes of one fused buffer (gradients and sparse-row masks).
    pub bytes: usize,
}

static STATS: std::sync::Mutex<SyncStats> = std::sync::Mutex::new(SyncStats { reduces: 0, seconds: 0.0, bytes: 0 });

/// The communication totals of this process so far.
pub fn sync_stats() -> SyncStats {
    STATS.lock().map(|s| *s).unwrap_or_default()
}

/// The fused gradient all-reduce: packs every gradient (scaled by `scale`) and, for sparse
/// parameters, a mask of the rows this rank touched, into one buffer; sums it over the ranks;
/// unpacks the summed gradients and marks every row some rank touched (the union), so that
/// lazy optimizers update exactly the rows a single process would.
#[derive(Default)]
pub struct GradSync {
    send: Vec<f32>,
    recv: Vec<f32>,
}

impl GradSync {
    /// A new, empty buffer pair (grows on first use).
    pub fn new() -> Self {
        Self::default()
    }

    /// Sums the visited gradients over `group` (each first multiplied by `scale`).
    pub fn all_reduce(&mut self, group: &dyn Collective, scale: f32, visit: &mut ParamVisitor<'_>) {
        let mut n = 0;
        visit(&mut |p: &mut Param| n += p.len() + p.touched_rows.as_ref().map_or(0, |_| p.shape.first().copied().unwrap_or(0)));
        self.send.resize(n, 0.0);
        self.recv.resize(n, 0.0);
        let mut at = 0;
        let send = &mut self.send;
        visit(&mut |p: &mut Param| {
            for (s, g) in send[at..at + p.len()].iter_mut().zip(&p.grad) {
                *s = g * scale;
            }
            at += p.len();
            if let Some(set) = &p.touched_rows {
                let rows = p.shape.first().copied().unwrap_or(0);
                let mask = &mut send[at..at + rows];
                mask.iter_mut().for_each(|m| *m = 0.0);
                for &r in set.rows() {
                    mask[r as usize] = 1.0;
                }
                at += rows;
            }
        });
        let t0 = Instant::now();
        group.all_reduce_sum(&self.send, &mut self.recv);
        if let Ok(mut s) = STATS.lock() {
            s.reduces += 1;
            s.seconds += t0.elapsed().as_secs_f64();
            s.bytes = n * 4;
        }
        let mut at = 0;
        let recv = &self.recv;
        visit(&mut |p: &mut Param| {
            let len = p.len();
            p.grad.copy_from_slice(&recv[at..at + len]);
            at += len;
            let rows = p.shape.first().copied().unwrap_or(0);
            if let Some(set) = &mut p.touched_rows {
                for (r, &m) in recv[at..at + rows].iter().enumerate() {
                    if m > 0.0 {
                        set.insert(r as u32);
                    }
                }
                at += rows;
            }
        });
    }
}

/// A deterministic 64-bit hash (FNV-1a) of every parameter's values, for checking that the
/// ranks hold identical models.
pub fn params_hash(visit: &mut ParamVisitor<'_>) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    visit(&mut |p: &mut Param| {
        for v in &p.value {
            for b in v.to_le_bytes() {
                h = (h ^ b as u64).wrapping_mul(0x100_0000_01b3);
            }
        }
    });
    h
}

/// Checks that every rank holds the same parameters (by hash); the error names the ranks'
/// disagreement. Identity without a group.
pub fn check_identical(visit: &mut ParamVisitor<'_>) -> Result<u64> {
    let h = params_hash(visit);
    if let Some(g) = group() {
        // the hash in four 16-bit pieces x and their squares, summed over the ranks: all
        // ranks agree ⇔ n·Σx² = (Σx)² for every piece (exact in f64 for fewer than 2¹⁰ ranks)
        let mut mine = [0.0f64; 8];
        for i in 0..4 {
            let x = ((h >> (16 * i)) & 0xffff) as f64;
            (mine[i], mine[4 + i]) = (x, x * x);
        }
        let mut sum = [0.0f64; 8];
        g.all_reduce_sum_f64(&mine, &mut sum);
        let n = g.size() as f64;
        let same = (0..4).all(|i| n * sum[4 + i] == sum[i] * sum[i]);
        if !same {
            return Err(Error::Invalid(format!("data-parallel ranks hold different parameters after training (rank {} hash {h:016x})", g.rank())));
        }
    }
    Ok(h)
}

/// Refuses a step size the ranks cannot share: `work` units (minibatch rows, micro-batches)
/// split over the ranks.
pub fn check_divides(what: &str, work: usize) -> Result<()> {
    let (_, n) = rank_and_size();
    if n > 1 && !work.is_multiple_of(n) {
        return Err(Error::Config(format!("{what} ({work}) must be a multiple of the {n} data-parallel ranks")));
    }
    Ok(())
}
