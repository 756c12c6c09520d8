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
//! * [`FffKernel`]: fast feedforward networks. Level-wise grouped descent, then samples sorted
//!   by leaf and each leaf's MLP applied to its group with a register-blocked kernel.
//!
//! Shapes: `x` is `batch × in_features`, `y` is `batch × out_features`, row-major.

pub mod dense;
pub mod fff;
pub mod ufff;

pub use dense::DenseKernel;
pub use fff::FffKernel;
pub use ufff::UfffKernel;

use crate::error::{check_matrix, Result};

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
    f: [Vec<f32>; 4],
    u: [Vec<u32>; 4],
}

impl Workspace {
    /// An empty workspace.
    pub fn new() -> Self {
        Self::default()
    }

    /// Four f32 buffers of the sizes in `f` and four u32 buffers of the sizes in `u`,
    /// all disjoint (zero-sized ones are free).
    pub(crate) fn take(&mut self, f: [usize; 4], u: [usize; 4]) -> ([&mut [f32]; 4], [&mut [u32]; 4]) {
        let [f0, f1, f2, f3] = &mut self.f;
        let [u0, u1, u2, u3] = &mut self.u;
        for (v, n) in [&mut *f0, &mut *f1, &mut *f2, &mut *f3].into_iter().zip(f) {
            grow(v, n);
        }
        for (v, n) in [&mut *u0, &mut *u1, &mut *u2, &mut *u3].into_iter().zip(u) {
            grow(v, n);
        }
        (
            [&mut f0[..f[0]], &mut f1[..f[1]], &mut f2[..f[2]], &mut f3[..f[3]]],
            [&mut u0[..u[0]], &mut u1[..u[1]], &mut u2[..u[2]], &mut u3[..u[3]]],
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
