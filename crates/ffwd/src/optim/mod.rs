//! Optimizers (fused, in place, allocation-free after the first step), gradient clipping and
//! learning-rate schedules.

pub mod adamw;
pub mod noise;
pub mod schedule;
pub mod sgd;

pub use adamw::AdamW;
pub use noise::GradNoise;
pub use schedule::Schedule;
pub use sgd::Sgd;

use serde::{Deserialize, Serialize};

use crate::core::{Param, ParamVisitor};
use crate::error::{Error, Result};

/// Which optimizer to use, with its hyper-parameters.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OptimizerKind {
    /// AdamW (decoupled weight decay).
    Adamw,
    /// SGD with (heavy-ball) momentum.
    Sgd,
}

impl OptimizerKind {
    /// The lowercase name (`adamw`, `sgd`).
    pub fn name(self) -> &'static str {
        match self {
            OptimizerKind::Adamw => "adamw",
            OptimizerKind::Sgd => "sgd",
        }
    }
}

/// An optimizer that updates parameters from their gradients.
pub trait Optimizer: Send {
    /// One update with learning rate `lr`; gradients are first multiplied by `grad_scale`
    /// (the clipping factor), fused into the same pass. The step *consumes* the gradients:
    /// it leaves every one zero (sparse ones with an empty row set), ready for the next
    /// step's backward passes, without a separate `zero_grad` pass over memory.
    fn step(&mut self, params: &mut ParamVisitor<'_>, lr: f32, grad_scale: f32);
    /// Steps taken so far.
    fn steps(&self) -> u64;
    /// Names of the state slots (`m`, `v` for AdamW; `momentum` for SGD); checkpoints store
    /// slot `s` of parameter `p` as the tensor `optim.{s}.{p}`.
    fn slot_names(&self) -> &'static [&'static str];
    /// The state: for each slot in [`Optimizer::slot_names`] order, one tensor per parameter
    /// in visiting order (empty before the first step).
    fn slots(&self) -> Vec<&[Vec<f32>]>;
    /// Restores [`Optimizer::steps`] and [`Optimizer::slots`] (resuming a run); `slots` must
    /// have one entry per slot name, each with the same number of tensors.
    fn restore(&mut self, steps: u64, slots: Vec<Vec<Vec<f32>>>) -> Result<()>;
    /// Forgets the state of the parameters (in visiting order) whose `keep` entry is false:
    /// parameters a model dropped (self-guided training's dense guides when their phase ends).
    /// A one-off copy of the state; the others keep theirs.
    fn retain(&mut self, keep: &[bool]) {
        let slots: Vec<Vec<Vec<f32>>> = self
            .slots()
            .iter()
            .map(|s| s.iter().zip(keep.iter().chain(std::iter::repeat(&true))).filter(|(_, &k)| k).map(|(v, _)| v.clone()).collect())
            .collect();
        // the slots keep their shape (equally many tensors each): restore cannot fail
        let _ = self.restore(self.steps(), slots);
    }
}

/// Checks the shape of restored optimizer state: `names.len()` slots of equally many tensors.
pub(crate) fn check_slots(names: &[&str], slots: &[Vec<Vec<f32>>]) -> Result<()> {
    if slots.len() != names.len() || slots.windows(2).any(|w| w[0].len() != w[1].len()) {
        return Err(Error::Invalid(format!("optimizer state: expected slots {names:?} with one tensor per parameter each")));
    }
    Ok(())
}

/// Global L2 norm of all gradients (sum in f64, in parameter order: deterministic).
pub fn grad_norm(visit: &mut ParamVisitor<'_>) -> f32 {
    let mut s = 0.0f64;
    visit(&mut |p: &mut Param| {
        p.for_each_active_range(|r| s += p.grad[r].iter().map(|&g| (g as f64) * (g as f64)).sum::<f64>());
    });
    s.sqrt() as f32
}

/// The factor that scales gradients of norm `norm` down to at most `max_norm` (1 if off).
pub fn clip_factor(norm: f32, max_norm: f32) -> f32 {
    if max_norm > 0.0 && norm > max_norm {
        max_norm / norm
    } else {
        1.0
    }
}
