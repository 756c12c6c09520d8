//! Block-structured FFNs of "Building on Efficient Foundations: Effectively Training LLMs with
//! Structured Feedforward Layers" (Wei et al. 2024, code CLAIRE-Labo/StructuredFFN): both FFN
//! matrices replaced by a structured map.
//!
//! * **BlockDense** (`in → out` through rank r): `y = lr · blockdiag(B_1 … B_nb) · x + b`,
//!   blocks `nb × (r/nb) × (in/nb)` (`{map}.blocks`), `lr` `out × r` (`{map}.lr`).
//! * **BlockShuffle** (Monarch-style, middle width m): `y = blockdiag₂ · shuffle ·
//!   blockdiag₁ · x + b`, `blockdiag₁` `nb × (m/nb) × (in/nb)` (`{map}.blocks`), `blockdiag₂`
//!   `nb × (out/nb) × (m/nb)` (`{map}.blocks2`). The shuffle is the reference's reshape
//!   `(k q) → (r l)` and transpose: block `l` of the second stage reads the middle values
//!   `l, l + nb, l + 2·nb, …` and writes the outputs `l, l + nb, …`.
//!
//! Every block product is a strided GEMM over the whole batch (no gathers). Blocks start
//! orthogonal (`U·Vᵀ` of each block's SVD, the reference's init); `lr` starts as PyTorch's
//! Linear. Parameters: `fc1.*` (in → width) and `fc2.*` (width → out), each with `bias`.

use serde::{Deserialize, Serialize};

use super::guided::{GuideConfig, Guides};
use super::{ensure_len, Compile, Input, Layer, LayerConfig, Trainable};
use crate::core::gemm::{add_row_bias, add_sum_rows, matmul, MatMut, MatRef};
use crate::core::svd::svd_truncated;
use crate::core::{Activation, Param, Rng};
use crate::error::{check_matrix, Error, Result};
use crate::kernels::lowrank::MapsMode;
use crate::kernels::{check_io, InferKernel, Workspace};

/// Which structured map replaces the FFN matrices.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BlockKind {
    /// Block-diagonal then a dense low-rank map.
    #[serde(rename = "blockdense")]
    BlockDense,
    /// Block-diagonal, shuffle, block-diagonal.
    #[serde(rename = "blockshuffle")]
    BlockShuffle,
}

/// Configuration of [`Structured`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StructuredConfig {
    /// Hidden units h.
    pub width: usize,
    /// BlockDense: the rank r; BlockShuffle: the middle width m (0: a quarter of each map's
    /// smaller side for BlockDense, the smaller side for BlockShuffle, rounded to the blocks).
    pub rank: usize,
    /// Blocks nb (must divide the widths they split).
    pub blocks: usize,
    /// Hidden nonlinearity.
    pub activation: Activation,
    /// Self-guided training (a dense guide per map, see [`super::guided`]); none: plain.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guide: Option<GuideConfig>,
}

impl Default for StructuredConfig {
    fn default() -> Self {
        StructuredConfig { width: 128, rank: 0, blocks: 4, activation: Activation::Relu, guide: None }
    }
}

impl StructuredConfig {
    /// The middle width of a map `i → o`.
    pub fn middle(&self, kind: BlockKind, i: usize, o: usize) -> usize {
        let nb = self.blocks.max(1);
        if self.rank > 0 {
            return self.rank;
        }
        let m = match kind {
            BlockKind::BlockDense => i.min(o) / 4,
            BlockKind::BlockShuffle => i.min(o),
        };
        (m / nb).max(1) * nb
    }

    /// Scalars of one map `i → o`.
    fn map_params(&self, kind: BlockKind, i: usize, o: usize) -> Option<usize> {
        let (nb, m) = (self.blocks.max(1), self.middle(kind, i, o));
        let first = m.checked_mul(i)? / nb;
        let second = match kind {
            BlockKind::BlockDense => o.checked_mul(m)?,
            BlockKind::BlockShuffle => o.checked_mul(m)? / nb,
        };
        first.checked_add(second)?.checked_add(o)
    }

    /// Scalars of a layer `in → out` (`None` on overflow).
    pub fn param_count(&self, kind: BlockKind, in_features: usize, out_features: usize) -> Option<usize> {
        self.map_params(kind, in_features, self.width)?.checked_add(self.map_params(kind, self.width, out_features)?)
    }
}

/// One structured map `in → out` with its bias.
#[derive(Clone, Debug)]
pub(crate) struct BlockMap {
    kind: BlockKind,
    nb: usize,
    inp: usize,
    mid: usize,
    out: usize,
    /// `nb × (mid/nb) × (in/nb)`.
    first: Param,
    /// BlockDense: `out × mid`; BlockShuffle: `nb × (out/nb) × (mid/nb)`.
    second: Param,
    bias: Param,
    /// Inference copies store every block (and BlockDense's `lr`) transposed, `in × out`, the
    /// layout the products read row by row (fast at tiny batches).
    transposed: bool,
}

/// A random `rows × cols` block made orthogonal (`U·Vᵀ` of its SVD).
fn orthogonal(rows: usize, cols: usize, rng: &mut Rng) -> Vec<f32> {
    let a: Vec<f32> = (0..rows * cols).map(|_| rng.normal()).collect();
    let r = rows.min(cols);
    let (u, _, vt) = svd_truncated(&a, rows, cols, r, rng);
    let mut out = vec![0.0f32; rows * cols];
    for i in 0..rows {
        for j in 0..cols {
            out[i * cols + j] = (0..r).map(|k| u[i * r + k] * vt[k * cols + j]).sum();
        }
    }
    out
}

impl BlockMap {
    fn new(prefix: &str, kind: BlockKind, nb: usize, inp: usize, mid: usize, out: usize, rng: &mut Rng) -> Result<Self> {
        let name = match kind {
            BlockKind::BlockDense => "blockdense",
            BlockKind::BlockShuffle => "blockshuffle",
        };
        let need = |what: &str, v: usize| {
            if v == 0 || !v.is_multiple_of(nb) {
                Err(Error::Config(format!("{name} {prefix}: {what} {v} is not a positive multiple of blocks = {nb}")))
            } else {
                Ok(())
            }
        };
        need("input width", inp)?;
        need(if kind == BlockKind::BlockDense { "rank" } else { "middle width" }, mid)?;
        if kind == BlockKind::BlockShuffle {
            need("output width", out)?;
        }
        let (p, q) = (inp / nb, mid / nb);
        let mut first = Param::zeros(&format!("{prefix}.blocks"), &[nb, q, p], true);
        for k in 0..nb {
            first.value[k * q * p..(k + 1) * q * p].copy_from_slice(&orthogonal(q, p, rng));
        }
        let second = match kind {
            BlockKind::BlockDense => Param::uniform(&format!("{prefix}.lr"), &[out, mid], 1.0 / (mid as f32).sqrt(), true, rng),
            BlockKind::BlockShuffle => {
                let s = out / nb;
                let mut w = Param::zeros(&format!("{prefix}.blocks2"), &[nb, s, q], true);
                for l in 0..nb {
                    w.value[l * s * q..(l + 1) * s * q].copy_from_slice(&orthogonal(s, q, rng));
                }
                w
            }
        };
        let bias = Param::uniform(&format!("{prefix}.bias"), &[out], 1.0 / (inp as f32).sqrt(), false, rng);
        Ok(BlockMap { kind, nb, inp, mid, out, first, second, bias, transposed: false })
    }

    /// The weight `rows × cols` stored at `w` as the right operand `cols × rows` (`Wᵀ`).
    fn wt<'a>(&self, w: &'a [f32], rows: usize, cols: usize) -> MatRef<'a> {
        if self.transposed {
            MatRef::new(w, cols, rows)
        } else {
            MatRef::new(w, rows, cols).t()
        }
    }

    /// A copy with every block stored transposed (for inference kernels).
    fn to_transposed(&self) -> Self {
        let mut m = self.clone();
        let tr = |p: &mut Param, blocks: usize, rows: usize, cols: usize| {
            for b in 0..blocks {
                let blk = &mut p.value[b * rows * cols..(b + 1) * rows * cols];
                let t = crate::kernels::dense::transpose(blk, rows, cols);
                blk.copy_from_slice(&t);
            }
        };
        let (p, q) = (self.inp / self.nb, self.mid / self.nb);
        tr(&mut m.first, self.nb, q, p);
        match self.kind {
            BlockKind::BlockDense => tr(&mut m.second, 1, self.out, self.mid),
            BlockKind::BlockShuffle => tr(&mut m.second, self.nb, self.out / self.nb, q),
        }
        m.transposed = true;
        m
    }

    /// `x` (`batch × in`) → `z` (`batch × mid`, the first stage) → `y` (`batch × out`).
    fn forward(&self, x: &[f32], batch: usize, z: &mut [f32], y: &mut [f32]) {
        let (nb, p, q) = (self.nb, self.inp / self.nb, self.mid / self.nb);
        for k in 0..nb {
            let a = MatRef::strided(&x[k * p..], batch, p, self.inp, 1);
            let w = self.wt(&self.first.value[k * q * p..(k + 1) * q * p], q, p);
            matmul(MatMut::strided(&mut z[k * q..], batch, q, self.mid, 1), a, w, false);
        }
        match self.kind {
            BlockKind::BlockDense => {
                matmul(MatMut::new(y, batch, self.out), MatRef::new(z, batch, self.mid), self.wt(&self.second.value, self.out, self.mid), false)
            }
            BlockKind::BlockShuffle => {
                let s = self.out / nb;
                for l in 0..nb {
                    let a = MatRef::strided(&z[l..], batch, q, self.mid, nb);
                    let w = self.wt(&self.second.value[l * s * q..(l + 1) * s * q], s, q);
                    matmul(MatMut::strided(&mut y[l..], batch, s, self.out, nb), a, w, false);
                }
            }
        }
        add_row_bias(y, &self.bias.value);
    }

    /// Adds the parameter gradients for upstream `dy`; writes `dx` if given. `z` is the first
    /// stage of the forward on `x`; `dz` is scratch (`batch × mid`).
    fn backward(&mut self, x: &[f32], z: &[f32], batch: usize, dy: &[f32], dz: &mut [f32], dx: Option<&mut [f32]>) {
        let (nb, p, q) = (self.nb, self.inp / self.nb, self.mid / self.nb);
        add_sum_rows(dy, self.out, &mut self.bias.grad);
        match self.kind {
            BlockKind::BlockDense => {
                matmul(MatMut::new(&mut self.second.grad, self.out, self.mid), MatRef::new(dy, batch, self.out).t(), MatRef::new(z, batch, self.mid), true);
                matmul(MatMut::new(dz, batch, self.mid), MatRef::new(dy, batch, self.out), MatRef::new(&self.second.value, self.out, self.mid), false);
            }
            BlockKind::BlockShuffle => {
                let s = self.out / nb;
                for l in 0..nb {
                    let dyl = MatRef::strided(&dy[l..], batch, s, self.out, nb);
                    let zl = MatRef::strided(&z[l..], batch, q, self.mid, nb);
                    matmul(MatMut::new(&mut self.second.grad[l * s * q..(l + 1) * s * q], s, q), dyl.t(), zl, true);
                    let w = MatRef::new(&self.second.value[l * s * q..(l + 1) * s * q], s, q);
                    matmul(MatMut::strided(&mut dz[l..], batch, q, self.mid, nb), dyl, w, false);
                }
            }
        }
        for k in 0..nb {
            let dzk = MatRef::strided(&dz[k * q..], batch, q, self.mid, 1);
            let xk = MatRef::strided(&x[k * p..], batch, p, self.inp, 1);
            matmul(MatMut::new(&mut self.first.grad[k * q * p..(k + 1) * q * p], q, p), dzk.t(), xk, true);
        }
        if let Some(dx) = dx {
            for k in 0..nb {
                let dzk = MatRef::strided(&dz[k * q..], batch, q, self.mid, 1);
                let w = MatRef::new(&self.first.value[k * q * p..(k + 1) * q * p], q, p);
                matmul(MatMut::strided(&mut dx[k * p..], batch, p, self.inp, 1), dzk, w, false);
            }
        }
    }

    fn params(&self) -> [&Param; 3] {
        [&self.first, &self.second, &self.bias]
    }

    fn visit(&mut self, f: &mut dyn FnMut(&mut Param)) {
        f(&mut self.first);
        f(&mut self.second);
        f(&mut self.bias);
    }

    /// The equivalent dense matrix (`out × in`), for tests and tiny-batch inference.
    pub(crate) fn dense(&self) -> Vec<f32> {
        let mut eye = vec![0.0f32; self.inp * self.inp];
        for i in 0..self.inp {
            eye[i * self.inp + i] = 1.0;
        }
        let (mut z, mut y) = (vec![0.0; self.inp * self.mid], vec![0.0; self.inp * self.out]);
        let mut m = self.clone();
        m.bias.value.iter_mut().for_each(|b| *b = 0.0);
        m.forward(&eye, self.inp, &mut z, &mut y);
        // y = I·Wᵀ: row i holds column i of W
        let mut w = vec![0.0; self.out * self.inp];
        for i in 0..self.inp {
            for o in 0..self.out {
                w[o * self.inp + i] = y[i * self.out + o];
            }
        }
        w
    }
}

/// A two-map structured FFN: `in → width → out` through BlockDense or BlockShuffle maps.
pub struct Structured {
    kind: BlockKind,
    cfg: StructuredConfig,
    fc1: BlockMap,
    fc2: BlockMap,
    z1: Vec<f32>,
    pre: Vec<f32>,
    h: Vec<f32>,
    z2: Vec<f32>,
    dz: Vec<f32>,
    dh: Vec<f32>,
    /// Dense guides of fc1 and fc2 while self-guided training lasts.
    guides: Guides,
}

impl Structured {
    /// A new layer `in_features → width → out_features`.
    pub fn new(kind: BlockKind, cfg: StructuredConfig, in_features: usize, out_features: usize, rng: &mut Rng) -> Result<Self> {
        if cfg.width == 0 || cfg.blocks == 0 {
            return Err(Error::Config("structured FFN: width and blocks must be positive".into()));
        }
        let nb = cfg.blocks;
        let fc1 = BlockMap::new("fc1", kind, nb, in_features, cfg.middle(kind, in_features, cfg.width), cfg.width, rng)?;
        let fc2 = BlockMap::new("fc2", kind, nb, cfg.width, cfg.middle(kind, cfg.width, out_features), out_features, rng)?;
        let guides = Guides::new(cfg.guide, || [&fc1, &fc2].map(|m| (m.dense(), m.out, m.inp)))?;
        Ok(Structured { kind, cfg, fc1, fc2, z1: Vec::new(), pre: Vec::new(), h: Vec::new(), z2: Vec::new(), dz: Vec::new(), dh: Vec::new(), guides })
    }

    /// The dense guides (self-guided training, until the guided phase ends).
    pub fn guides(&self) -> &Guides {
        &self.guides
    }

    /// The dense guides, mutably (tests set α with them).
    pub fn guides_mut(&mut self) -> &mut Guides {
        &mut self.guides
    }

    /// The two maps' equivalent dense matrices (`width × in`, `out × width`).
    pub fn dense_matrices(&self) -> (Vec<f32>, Vec<f32>) {
        (self.fc1.dense(), self.fc2.dense())
    }
}

impl Layer for Structured {
    fn kind(&self) -> &'static str {
        match self.kind {
            BlockKind::BlockDense => "blockdense",
            BlockKind::BlockShuffle => "blockshuffle",
        }
    }

    fn in_features(&self) -> usize {
        self.fc1.inp
    }

    fn out_features(&self) -> usize {
        self.fc2.out
    }

    fn config(&self) -> LayerConfig {
        match self.kind {
            BlockKind::BlockDense => LayerConfig::BlockDense(self.cfg.clone()),
            BlockKind::BlockShuffle => LayerConfig::BlockShuffle(self.cfg.clone()),
        }
    }
}

impl Trainable for Structured {
    fn forward_train(&mut self, input: Input<'_>, y: &mut [f32], rng: &mut Rng) -> Result<()> {
        let (x, batch) = (input.x, input.batch);
        check_matrix("structured FFN input x", x.len(), batch, self.in_features())?;
        check_matrix("structured FFN output y", y.len(), batch, self.out_features())?;
        let w = self.cfg.width;
        for (buf, n) in [(&mut self.z1, batch * self.fc1.mid), (&mut self.pre, batch * w), (&mut self.h, batch * w), (&mut self.z2, batch * self.fc2.mid)] {
            ensure_len(buf, n);
        }
        let (pre, h) = (&mut self.pre[..batch * w], &mut self.h[..batch * w]);
        self.fc1.forward(x, batch, &mut self.z1[..batch * self.fc1.mid], pre);
        if let Some(g) = self.guides.get_mut(0) {
            g.forward(x, batch, &self.fc1.bias.value, pre, rng);
        }
        self.cfg.activation.forward(pre, h);
        self.fc2.forward(h, batch, &mut self.z2[..batch * self.fc2.mid], y);
        if let Some(g) = self.guides.get_mut(1) {
            g.forward(h, batch, &self.fc2.bias.value, y, rng);
        }
        Ok(())
    }

    fn backward(&mut self, input: Input<'_>, dy: &[f32], dx: Option<&mut [f32]>) -> Result<()> {
        let (x, batch) = (input.x, input.batch);
        check_matrix("structured FFN input x", x.len(), batch, self.in_features())?;
        check_matrix("structured FFN output gradient dy", dy.len(), batch, self.out_features())?;
        let w = self.cfg.width;
        ensure_len(&mut self.dz, batch * self.fc1.mid.max(self.fc2.mid));
        ensure_len(&mut self.dh, batch * w);
        let dh = &mut self.dh[..batch * w];
        let h = &self.h[..batch * w];
        // with a guide, the structured branch sees (1 − α)·dy and the guide adds its share
        let mut g2 = self.guides.get_mut(1);
        let dy2 = g2.as_mut().map_or(dy, |g| g.structured_dy(dy));
        self.fc2.backward(h, &self.z2[..batch * self.fc2.mid], batch, dy2, &mut self.dz[..batch * self.fc2.mid], Some(&mut *dh));
        if let Some(g) = g2 {
            g.backward(h, batch, dy, &mut self.fc2.bias.grad, Some(&mut *dh));
        }
        self.cfg.activation.backward_inplace(&self.pre[..batch * w], dh);
        let mut dx = dx;
        let dh = &self.dh[..batch * w];
        let mut g1 = self.guides.get_mut(0);
        let d1 = g1.as_mut().map_or(dh, |g| g.structured_dy(dh));
        self.fc1.backward(x, &self.z1[..batch * self.fc1.mid], batch, d1, &mut self.dz[..batch * self.fc1.mid], dx.as_deref_mut());
        if let Some(g) = g1 {
            g.backward(x, batch, dh, &mut self.fc1.bias.grad, dx);
        }
        Ok(())
    }

    fn params(&self) -> Vec<&Param> {
        self.fc1.params().into_iter().chain(self.fc2.params()).chain(self.guides.params()).collect()
    }

    fn visit_params_mut(&mut self, f: &mut dyn FnMut(&mut Param)) {
        self.fc1.visit(f);
        self.fc2.visit(f);
        self.guides.visit(f);
    }

    fn set_progress(&mut self, step: usize, total: usize) -> Vec<String> {
        self.guides.set_progress(step, total)
    }

    fn drop_guides(&mut self) -> Vec<String> {
        self.guides.drop_all()
    }
}

impl Compile for Structured {
    fn kernel(&self) -> Box<dyn InferKernel> {
        let (f1, f2) = (&self.fc1, &self.fc2);
        let macs = [f1, f2].iter().map(|m| m.first.len() + m.second.len()).sum();
        let mode = MapsMode::new([(f1.out, f1.inp), (f2.out, f2.inp)], macs, &self.guides, || [f1, f2].map(|m| (m.dense(), &m.bias.value[..])));
        let (fc1, fc2) = (self.fc1.to_transposed(), self.fc2.to_transposed());
        Box::new(StructuredKernel { kind: self.kind(), fc1, fc2, width: self.cfg.width, activation: self.cfg.activation, mode, macs })
    }

    fn neurons_per_inference(&self) -> usize {
        self.cfg.width
    }
}

/// Inference: the same block products over the batch on a copy of the weights (pre-merged
/// dense maps for tiny batches and during self-guided training, see `MapsMode`).
pub struct StructuredKernel {
    kind: &'static str,
    fc1: BlockMap,
    fc2: BlockMap,
    width: usize,
    activation: Activation,
    mode: MapsMode,
    macs: usize,
}

impl InferKernel for StructuredKernel {
    fn kind(&self) -> &'static str {
        self.kind
    }

    fn in_features(&self) -> usize {
        self.fc1.inp
    }

    fn out_features(&self) -> usize {
        self.fc2.out
    }

    fn forward(&self, x: &[f32], batch: usize, y: &mut [f32], ws: &mut Workspace) -> Result<()> {
        check_io(self, x, batch, y)?;
        let w = self.width;
        let ([z1, h, z2], _) = ws.take([batch * self.fc1.mid, batch * w, batch * self.fc2.mid], [0; 0]);
        if let Some([m1, m2]) = self.mode.merged_for(batch) {
            m1.forward(x, batch, h);
            self.activation.apply_inplace(h);
            m2.forward(h, batch, y);
            return Ok(());
        }
        self.fc1.forward(x, batch, z1, h);
        self.activation.apply_inplace(h);
        self.fc2.forward(h, batch, z2, y);
        Ok(())
    }

    fn neurons_per_inference(&self) -> usize {
        self.width
    }

    fn macs_per_sample(&self) -> usize {
        match &self.mode {
            MapsMode::Merged([a, b]) => a.macs() + b.macs(),
            MapsMode::Factored { .. } => self.macs,
        }
    }
}
