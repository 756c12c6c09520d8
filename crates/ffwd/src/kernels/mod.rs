//! Inference kernels: the conditional-execution paths that turn skipped FLOPs into wall-clock
//! speed. Each kernel holds its own copy of the weights in the layout it reads fastest and
//! reuses a caller-owned [`Workspace`], so a call allocates nothing after warm-up.
//!
//! * [`DenseKernel`]: the baseline. Batch 1 is a threaded SIMD GEMV; larger batches use the
//!   best GEMM we have (`core::gemm`).
//! * [`UfffKernel`]: UltraFastBERT trees. Each sample walks its path (four in lockstep): the
//!   path's dot products first, then its output as one weighted sum of the path's output rows;
//!   threads over samples; weight rows in f32 or bf16 ([`Precision`]). A level-major variant
//!   that sorts samples by node at every level (the "conditional matrix multiplication") is
//!   kept as [`ufff::TreeStrategy::Grouped`]; on this machine it is slower (see
//!   `UfffKernel::forward`).
//! * [`FffKernel`]: fast feedforward networks. Each sample descends on its own, then samples
//!   are counting-sorted by leaf (`grouped::dispatch`) and each leaf's MLP runs once over its
//!   group, gathering rows of `x` and scattering rows of `y` inside the register-blocked kernel.
//!
//! Shapes: `x` is `batch × in_features`, `y` is `batch × out_features`, row-major.

pub mod dense;
pub mod fff;
pub mod glu;
pub mod grouped;
pub mod lowrank;
pub mod moe;
pub mod pkm;
pub mod ufff;

pub use dense::DenseKernel;
pub use fff::FffKernel;
pub use glu::GluKernel;
pub use lowrank::LowRankKernel;
pub use moe::{MoeKernel, Router};
pub use pkm::PkmKernel;
pub use ufff::UfffKernel;

use crate::error::{check_matrix, Result};

/// Inference-time routing counts of a routed layer ([`InferKernel::route_usage`]), as the
/// training metrics record them.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct RouteUsage {
    /// What a unit is (`leaf`, `expert`).
    pub unit: String,
    /// Samples per unit.
    pub counts: Vec<u64>,
}

/// How an inference kernel stores its weights.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Precision {
    /// As trained.
    #[default]
    F32,
    /// bfloat16 weight rows (biases stay f32), widened on load, f32 arithmetic: half the
    /// bytes for memory-bound kernels (tree layers at batch), each weight rounded to 8
    /// significant bits.
    Bf16,
    /// ggml Q8_0 weight blocks (32 `i8` and an f16 scale), activations quantized on the fly
    /// to 8 bits, integer dot products (`core::quant`).
    Q8_0,
    /// ggml Q4_0 weight blocks (32 nibbles and an f16 scale), activations as for Q8_0.
    Q4_0,
}

impl Precision {
    /// The block format of the quantized precisions.
    pub fn quant(self) -> Option<crate::core::quant::QFormat> {
        use crate::core::quant::QFormat;
        match self {
            Precision::Q8_0 => Some(QFormat::Q8_0),
            Precision::Q4_0 => Some(QFormat::Q4_0),
            Precision::F32 | Precision::Bf16 => None,
        }
    }

    /// The precision of a block format.
    pub fn of(format: crate::core::quant::QFormat) -> Self {
        match format {
            crate::core::quant::QFormat::Q8_0 => Precision::Q8_0,
            crate::core::quant::QFormat::Q4_0 => Precision::Q4_0,
        }
    }

    /// A weight matrix (`rows × cols`, row-major) as a kernel that widens rows to f32 per use
    /// stores it in this precision: f32 as is, bf16 rounded, Q8_0/Q4_0 blocks along the rows
    /// (rows too short for blocks stay f32).
    pub fn store(self, data: Vec<f32>, rows: usize, cols: usize) -> Result<crate::core::quant::MaybeQuant> {
        use crate::core::quant::MaybeQuant;
        match (self, self.quant()) {
            (_, Some(format)) => MaybeQuant::new(format, data, rows, cols),
            (Precision::Bf16, _) => MaybeQuant::bf16(&data, rows, cols),
            _ => {
                check_matrix("matrix", data.len(), rows, cols)?;
                Ok(MaybeQuant::F32 { data, cols })
            }
        }
    }

    /// Name (`f32`, `bf16`, `q8_0`, `q4_0`).
    pub fn name(self) -> &'static str {
        match self {
            Precision::F32 => "f32",
            Precision::Bf16 => "bf16",
            Precision::Q8_0 => "q8_0",
            Precision::Q4_0 => "q4_0",
        }
    }
}

/// A ready-to-run inference path of one layer.
pub trait InferKernel: Send + Sync {
    /// Kind name of the layer (`dense`, `fff`, `ufff`).
    fn kind(&self) -> &'static str;
    /// Input width.
    fn in_features(&self) -> usize;
    /// Output width.
    fn out_features(&self) -> usize;
    /// `x`: `batch × in` → `y`: `batch × out`, using (and growing once) `ws`.
    fn forward(&self, x: &[f32], batch: usize, y: &mut [f32], ws: &mut Workspace) -> Result<()>;
    /// [`InferKernel::forward`] for layers routed by the input token (hash layers): `ids` holds
    /// one token id per row. Other kernels ignore the ids.
    fn forward_tokens(&self, x: &[f32], ids: &[u32], batch: usize, y: &mut [f32], ws: &mut Workspace) -> Result<()> {
        let _ = ids;
        self.forward(x, batch, y, ws)
    }
    /// Routing statistics for monitoring: adds, for every row of `x` (`batch × in`), one
    /// count to the unit it is routed to (`counts` is resized to the number of units) and
    /// returns the unit's name (`leaf` for trees, `expert` for softmax and sigmoid mixtures:
    /// each of a row's k experts counts); `None` for kernels without routing and for hash
    /// layers (they route by token id). Costs a routing pass, not a forward.
    fn route_usage(&self, x: &[f32], batch: usize, counts: &mut Vec<u64>) -> Option<&'static str> {
        let _ = (x, batch, counts);
        None
    }
    /// Hidden neurons one sample evaluates.
    fn neurons_per_inference(&self) -> usize;
    /// Multiply-adds one sample costs (the FLOP count is twice this).
    fn macs_per_sample(&self) -> usize;
}

/// Checks the shapes of a kernel call.
pub(crate) fn check_io(k: &dyn InferKernel, x: &[f32], batch: usize, y: &[f32]) -> Result<()> {
    // format the names only on failure: the happy path must not allocate
    if batch == 0 || x.len() != batch * k.in_features() {
        check_matrix(&format!("{} kernel input x", k.kind()), x.len(), batch, k.in_features())?;
    }
    if y.len() != batch * k.out_features() {
        check_matrix(&format!("{} kernel output y", k.kind()), y.len(), batch, k.out_features())?;
    }
    Ok(())
}

/// Scratch buffers reused across kernel calls; they only grow.
#[derive(Default, Debug)]
pub struct Workspace {
    f: [Vec<f32>; 8],
    u: [Vec<u32>; 8],
    /// Quantized activations of the Q8_0/Q4_0 kernels.
    pub(crate) q: crate::core::quant::QAct,
}

impl Workspace {
    /// An empty workspace.
    pub fn new() -> Self {
        Self::default()
    }

    /// `F ≤ 8` f32 buffers of the sizes in `f` and `U ≤ 8` u32 buffers of the sizes in `u`,
    /// all disjoint (zero-sized ones are free).
    pub(crate) fn take<const F: usize, const U: usize>(&mut self, f: [usize; F], u: [usize; U]) -> ([&mut [f32]; F], [&mut [u32]; U]) {
        const { assert!(F <= 8 && U <= 8) };
        let mut fs = self.f.iter_mut();
        let mut us = self.u.iter_mut();
        (
            std::array::from_fn(|i| {
                let v = fs.next().expect("F <= 8 checked at compile time");
                grow(v, f[i]);
                &mut v[..f[i]]
            }),
            std::array::from_fn(|i| {
                let v = us.next().expect("U <= 8 checked at compile time");
                grow(v, u[i]);
                &mut v[..u[i]]
            }),
        )
    }
}

fn grow<T: Default + Clone>(v: &mut Vec<T>, n: usize) {
    if v.len() < n {
        v.resize(n, T::default());
    }
}

/// A raw pointer that may cross threads; users guarantee disjoint access.
#[derive(Clone, Copy)]
pub(crate) struct SyncPtr<T>(pub *mut T);
// SAFETY: only used to hand disjoint rows of one buffer to different rayon tasks.
unsafe impl<T> Send for SyncPtr<T> {}
unsafe impl<T> Sync for SyncPtr<T> {}

impl<T> SyncPtr<T> {
    /// The pointer (a method, so closures capture the whole `SyncPtr`, not its raw field).
    pub(crate) fn ptr(&self) -> *mut T {
        self.0
    }

    /// The mutable slice `[offset, offset + len)`.
    ///
    /// # Safety
    /// The range must be in bounds and no other live reference may overlap it.
    #[allow(clippy::mut_from_ref)]
    pub(crate) unsafe fn slice(&self, offset: usize, len: usize) -> &mut [T] {
        unsafe { std::slice::from_raw_parts_mut(self.0.add(offset), len) }
    }
}

/// The four rows of a `4 × n` block.
pub(crate) fn rows4(x: &[f32], n: usize) -> [&[f32]; 4] {
    std::array::from_fn(|k| &x[k * n..(k + 1) * n])
}

/// The four rows of a `4 × n` block, mutable.
pub(crate) fn rows4_mut(y: &mut [f32], n: usize) -> [&mut [f32]; 4] {
    let (a, rest) = y.split_at_mut(n);
    let (b, rest) = rest.split_at_mut(n);
    let (c, d) = rest.split_at_mut(n);
    [a, b, c, &mut d[..n]]
}
