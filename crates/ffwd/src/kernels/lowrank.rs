//! Low-rank FFN inference (see `layers::lowrank`): four thin products over weights stored
//! transposed (`in × r`, `r × out`), the layout the products read row-major.
//!
//! Pre-merged maps (`Merged`, shared with the block-structured kernels): during self-guided
//! training the kernel runs each map's mixed matrix `α·W + (1 − α)·U V` as one dense product;
//! after it, batches below `merge_below` rows run a pre-merged dense copy when that is
//! faster (the factored products' per-call cost dominates tiny batches; the paper pre-merges
//! under ~16 tokens).

use super::{check_io, InferKernel, Workspace};
use crate::core::gemm::{matmul, matmul_bias, MatMut, MatRef};
use crate::core::{Activation, Param};
use crate::error::Result;
use crate::layers::guided::Guides;
use crate::layers::lowrank::Factored;

/// A map's dense matrix, transposed (`in × out`), with its bias: one product per call.
pub(crate) struct Merged {
    wt: Vec<f32>,
    bias: Vec<f32>,
    inp: usize,
    out: usize,
}

impl Merged {
    /// From a dense matrix `w` (`out × in`) and the bias.
    pub(crate) fn new(w: &[f32], out: usize, inp: usize, bias: &[f32]) -> Self {
        Merged { wt: super::dense::transpose(w, out, inp), bias: bias.to_vec(), inp, out }
    }

    /// `y = x Wᵀ + b` (`batch × in` → `batch × out`).
    pub(crate) fn forward(&self, x: &[f32], batch: usize, y: &mut [f32]) {
        matmul_bias(
            MatMut::new(&mut y[..batch * self.out], batch, self.out),
            MatRef::new(&x[..batch * self.inp], batch, self.inp),
            MatRef::new(&self.wt, self.inp, self.out),
            &self.bias,
        );
    }

    /// Multiply-adds per sample.
    pub(crate) fn macs(&self) -> usize {
        self.inp * self.out
    }
}

/// How a structured kernel runs its two maps.
pub(crate) enum MapsMode {
    /// Always the merged matrices (self-guided phase: the mix has no factored form).
    Merged([Merged; 2]),
    /// The factored products; batches below `below` rows the merged copies.
    Factored { merged: Option<[Merged; 2]>, below: usize },
}

impl MapsMode {
    /// The merged maps to run for `batch` rows, if any.
    pub(crate) fn merged_for(&self, batch: usize) -> Option<&[Merged; 2]> {
        match self {
            MapsMode::Merged(m) => Some(m),
            MapsMode::Factored { merged: Some(m), below } if batch < *below => Some(m),
            MapsMode::Factored { .. } => None,
        }
    }

    /// The mode for a structured FFN whose maps (`[fc1, fc2]`) are `shapes` (`(out, in)`
    /// each) and whose factored products cost `factored_macs` per sample, with `guides` mixing
    /// in their dense guides. `dense` gives the maps' own matrices (`out × in`) with their
    /// biases; it is called only when the kernel keeps merged maps.
    pub(crate) fn new<'a>(shapes: [(usize, usize); 2], factored_macs: usize, guides: &Guides, dense: impl FnOnce() -> [(Vec<f32>, &'a [f32]); 2]) -> Self {
        let mixing = guides.mixing();
        let below = if mixing { 0 } else { merge_below(shapes.iter().map(|(o, i)| o * i).sum(), factored_macs) };
        if !mixing && below == 0 {
            return MapsMode::Factored { merged: None, below };
        }
        let merge = |i: usize, (w, bias): (Vec<f32>, &[f32])| {
            let w = match guides.get(i) {
                Some(g) if mixing => g.merged(&w),
                _ => w,
            };
            Merged::new(&w, shapes[i].0, shapes[i].1, bias)
        };
        let [a, b] = dense();
        let maps = [merge(0, a), merge(1, b)];
        if mixing {
            MapsMode::Merged(maps)
        } else {
            MapsMode::Factored { merged: Some(maps), below }
        }
    }
}

/// Batches below this many rows run the pre-merged dense maps, when the merged product costs
/// at most [`MERGE_COST`] times the factored multiply-adds; `FFWD_MERGE_BELOW` overrides (0 =
/// never merge). Measured on this CPU class (`cargo bench --bench structured_ffn -- --tiny`,
/// d 192 / 512, width 4d, batch 1, 4, 16): with every factor stored in the layout the products
/// read row by row, the factored kernels at 63 % and 32 % of the parameters are as fast as or
/// faster than the merged dense maps at batch 1 and 4 (merging costs 1.1–3.2x), because at these
/// batches the products are bound by the bytes of weights read, and the factors have fewer. So
/// merging only pays when it does not add multiply-adds (a full-rank factorisation); the
/// paper's pre-merge under ~16 tokens answers GPU launch overhead, which a CPU call does not have.
pub(crate) fn merge_below(merged_macs: usize, factored_macs: usize) -> usize {
    if let Some(n) = std::env::var("FFWD_MERGE_BELOW").ok().and_then(|v| v.parse().ok()) {
        return n;
    }
    if (merged_macs as f64) <= MERGE_COST * factored_macs as f64 {
        MERGE_ROWS
    } else {
        0
    }
}

/// See [`merge_below`].
const MERGE_COST: f64 = 1.0;
/// See [`merge_below`].
const MERGE_ROWS: usize = 16;

/// A matrix parameter transposed.
fn transpose(p: &Param) -> Vec<f32> {
    super::dense::transpose(&p.value, p.shape[0], p.shape[1])
}

/// One factored map: `Vᵀ` (`in × r`), `Uᵀ` (`r × out`), bias.
struct Map {
    vt: Vec<f32>,
    ut: Vec<f32>,
    bias: Vec<f32>,
    dims: (usize, usize, usize),
}

impl Map {
    fn new(f: &Factored) -> Self {
        let dims = (f.v.shape[1], f.v.shape[0], f.u.shape[0]);
        Map { vt: transpose(&f.v), ut: transpose(&f.u), bias: f.bias.value.clone(), dims }
    }

    fn macs(&self) -> usize {
        self.dims.1 * (self.dims.0 + self.dims.2)
    }

    fn forward(&self, x: &[f32], batch: usize, t: &mut [f32], y: &mut [f32]) {
        let (i, r, o) = self.dims;
        matmul(MatMut::new(&mut t[..batch * r], batch, r), MatRef::new(x, batch, i), MatRef::new(&self.vt, i, r), false);
        matmul_bias(MatMut::new(&mut y[..batch * o], batch, o), MatRef::new(&t[..batch * r], batch, r), MatRef::new(&self.ut, r, o), &self.bias);
    }
}

/// Inference copy of a [`crate::layers::LowRank`].
pub struct LowRankKernel {
    fc1: Map,
    fc2: Map,
    activation: Activation,
    mode: MapsMode,
}

impl LowRankKernel {
    /// From the layer's two factored maps and its dense guides (mixed in while α > 0).
    pub fn new(fc1: &Factored, fc2: &Factored, activation: Activation, guides: &Guides) -> Self {
        let (m1, m2) = (Map::new(fc1), Map::new(fc2));
        let shapes = [(m1.dims.2, m1.dims.0), (m2.dims.2, m2.dims.0)];
        let mode = MapsMode::new(shapes, m1.macs() + m2.macs(), guides, || [fc1, fc2].map(|f| (f.dense(), &f.bias.value[..])));
        LowRankKernel { fc1: m1, fc2: m2, activation, mode }
    }
}

impl InferKernel for LowRankKernel {
    fn kind(&self) -> &'static str {
        "lowrank"
    }

    fn in_features(&self) -> usize {
        self.fc1.dims.0
    }

    fn out_features(&self) -> usize {
        self.fc2.dims.2
    }

    fn forward(&self, x: &[f32], batch: usize, y: &mut [f32], ws: &mut Workspace) -> Result<()> {
        check_io(self, x, batch, y)?;
        let (h, r) = (self.fc1.dims.2, self.fc1.dims.1.max(self.fc2.dims.1));
        let ([t, a, _, _], _) = ws.take([batch * r, batch * h, 0, 0], [0; 4]);
        if let Some([m1, m2]) = self.mode.merged_for(batch) {
            m1.forward(x, batch, a);
            self.activation.apply_inplace(a);
            m2.forward(a, batch, y);
            return Ok(());
        }
        self.fc1.forward(x, batch, t, a);
        self.activation.apply_inplace(a);
        self.fc2.forward(a, batch, t, y);
        Ok(())
    }

    fn neurons_per_inference(&self) -> usize {
        self.fc1.dims.2
    }

    fn macs_per_sample(&self) -> usize {
        match &self.mode {
            MapsMode::Merged([a, b]) => a.macs() + b.macs(),
            MapsMode::Factored { .. } => self.fc1.macs() + self.fc2.macs(),
        }
    }
}
