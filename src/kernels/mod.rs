//! Inference kernels: the conditional-execution paths that turn skipped FLOPs into wall-clock
//! speed. Each kernel holds its own copy of the weights in the layout it reads fastest and
//! reuses a caller-owned [`Workspace`], so a call allocates nothing after warm-up.
//!
//! * [`DenseKernel`]: the baseline. Batch 1 is a threaded SIMD GEMV; larger batches use the
//!   best GEMM we have (`core::gemm`).
//! * [`UfffKernel`]: UltraFastBERT trees. Each sample walks its path with fused dot →
//!   activation → axpy, threads over samples. A level-major variant that sorts samples by node
//!   at every level (the "conditional matrix multiplication") is kept as
//!   [`ufff::TreeStrategy::Grouped`]; on this machine it is slower (see `UfffKernel::forward`).
//! * [`FffKernel`]: fast feedforward networks. Each sample descends on its own, then samples
//!   are counting-sorted by leaf (`grouped::dispatch`) and each leaf's MLP runs once over its
//!   group, gathering rows of `x` and scattering rows of `y` inside the register-blocked kernel.
//!
//! Shapes: `x` is `batch × in_features`, `y` is `batch × out_features`, row-major.

pub mod dense;
pub mod fff;
pub mod grouped;
pub mod moe;
pub mod pkm;
pub mod ufff;

pub use dense::DenseKernel;
pub use fff::FffKernel;
pub use moe::{MoeKernel, Router};
pub use pkm::PkmKernel;
pub use ufff::UfffKernel;

use crate::error::{check_matrix, Result};

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

/// Sorts `items` (indices into `keys`) by key with a counting sort into `out`; `counts` must
/// have `n_keys + 1` entries. Stable, O(items + n_keys). Returns nothing; group `g` occupies
/// `out[counts[g]..counts[g + 1]]` afterwards.
pub(crate) fn counting_sort(keys: &[u32], key_base: u32, n_keys: usize, counts: &mut [u32], out: &mut [u32]) {
    let counts = &mut counts[..n_keys + 1];
    counts.fill(0);
    for &k in keys {
        counts[(k - key_base) as usize + 1] += 1;
    }
    for g in 0..n_keys {
        counts[g + 1] += counts[g];
    }
    // place, using counts[g] as the cursor, then shift back
    for (s, &k) in keys.iter().enumerate() {
        let g = (k - key_base) as usize;
        out[counts[g] as usize] = s as u32;
        counts[g] += 1;
    }
    for g in (1..=n_keys).rev() {
        counts[g] = counts[g - 1];
    }
    counts[0] = 0;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counting_sort_groups_stably() {
        let keys = [5u32, 3, 5, 4, 3, 3];
        let mut counts = [0u32; 4];
        let mut out = [0u32; 6];
        counting_sort(&keys, 3, 3, &mut counts, &mut out);
        assert_eq!(out, [1, 4, 5, 3, 0, 2]);
        assert_eq!(counts, [0, 3, 4, 6]);
    }
}
