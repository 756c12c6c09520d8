//! Supervised Forward-Forward training (Hinton 2022, arXiv 2212.13345), following the official
//! Matlab code: each hidden layer of a ReLU MLP learns by itself to give high goodness
//! `G = Σ_j y_j²` to positive data (image with its true label) and low goodness to negative
//! data (image with a wrong label); no gradient crosses layers.
//!
//! * Input: the first `n_classes` features are overwritten by the one-hot label (× strength).
//! * Every layer's input is divided by its RMS ("length normalisation", no mean subtraction);
//!   goodness is measured on the unnormalised ReLU activities.
//! * Local loss per sample: `softplus(θ − G⁺) + softplus(G⁻ − θ)` (θ = layer width by default,
//!   temperature 1); [`FfNet::step`] applies its exact gradient. The official code ascends
//!   `(1 − p)·y` for positives and `−p·y` for negatives, which is half that gradient: its
//!   learning rate 0.01 is our 0.005.
//! * Peer normalisation (λ = 0.03): running means `m ← 0.9 m + 0.1 mean_batch(y)`; the term
//!   `λ (mean(m) − m_j)` is added to unit j's ascent direction, ungated by the ReLU.
//! * Negatives: "hard" (default, the official code) sample a wrong label from the softmax
//!   head's prediction with the true class suppressed; "random" draw a wrong label uniformly.
//!   Never the true label.
//! * Prediction: `goodness` runs one pass per label and picks the largest goodness summed over
//!   hidden layers after the first; `softmax` runs one pass with a neutral label (1/classes in
//!   every label slot) into a linear softmax head on the normalised activities of hidden
//!   layers 2..L, trained alongside (lr 0.1, weight cost 0.003).
//! * Collaborative FF (Lorberbom et al. 2023): each layer's probability uses
//!   `G_l + Σ_{k≠l} stopgrad(G_k) − Σ θ`, all layers trained together.
//! * Updates: gradient EMA `g ← 0.9 g + 0.1 ∇`, then `W ← W + lr·gain·(g − wc·W)`; gain is 1
//!   for the first half of the epochs, then falls linearly to 0.

use serde::{Deserialize, Serialize};

use crate::core::activation::sigmoid;
use crate::core::gemm::{matmul, sum_rows, MatMut, MatRef};
use crate::core::Rng;
use crate::data::{Dataset, Split};
use crate::error::{check_dim, Error, Result};

/// How negative labels are drawn.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Negatives {
    /// From the softmax head's prediction, true class suppressed (the official code).
    #[default]
    Hard,
    /// Uniformly among the wrong labels.
    Random,
}

/// Where a Forward-Forward input carries its label.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum LabelInput {
    /// One-hot (× strength) over the first `classes` features.
    #[default]
    Overlay,
    /// One-hot (× strength) as `classes` extra inputs after the features.
    Concat,
}

impl LabelInput {
    /// Extra input features the label adds.
    fn extra(self, classes: usize) -> usize {
        match self {
            LabelInput::Overlay => 0,
            LabelInput::Concat => classes,
        }
    }
}

/// Hyper-parameters of Forward-Forward training (defaults: the official recipe).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FfConfig {
    /// Hidden layer widths.
    pub layers: Vec<usize>,
    /// Epochs.
    pub epochs: usize,
    /// Minibatch size.
    pub batch: usize,
    /// Learning rate of the layers (of the exact loss gradient; the Matlab code's 0.01 = 0.005).
    pub lr: f32,
    /// Gradient EMA factor ("delay").
    pub momentum: f32,
    /// Weight cost of the layers.
    pub weight_cost: f32,
    /// Learning rate of the softmax head.
    pub head_lr: f32,
    /// Weight cost of the softmax head.
    pub head_weight_cost: f32,
    /// Peer-normalisation strength λ.
    pub peer: f32,
    /// Goodness threshold θ; `None` = the layer's width.
    pub theta: Option<f32>,
    /// Value written into the label slot.
    pub label_strength: f32,
    /// Where the label goes: `overlay` (over the first `classes` features, the paper's MNIST
    /// setting) or `concat` (a separate one-hot input after the features, the paper's
    /// section 3.4 alternative; every feature is kept).
    pub label_input: LabelInput,
    /// Negative labels.
    pub negatives: Negatives,
    /// Collaborative Forward-Forward.
    pub collaborative: bool,
    /// Gradient noise η on the layers' local gradients (variance η / (1 + t)^γ at step t of
    /// the mean gradient; 0 = off); the softmax head's gradients get none.
    pub grad_noise: f32,
    /// Gradient noise decay γ.
    pub grad_noise_gamma: f32,
    /// Seed.
    pub seed: u64,
}

impl Default for FfConfig {
    fn default() -> Self {
        FfConfig {
            layers: vec![1000, 1000, 1000],
            epochs: 60,
            batch: 100,
            lr: 0.005,
            momentum: 0.9,
            weight_cost: 0.001,
            head_lr: 0.1,
            head_weight_cost: 0.003,
            peer: 0.03,
            theta: None,
            label_strength: 1.0,
            label_input: LabelInput::Overlay,
            negatives: Negatives::Hard,
            collaborative: false,
            grad_noise: 0.0,
            grad_noise_gamma: 0.55,
            seed: 0,
        }
    }
}

/// One FF layer: weight (in × out: both GEMMs of a step then read row-major or transposed-
/// left operands, the fast cases of the `gemm` crate), bias, their gradient EMAs, unit means.
struct FfLayer {
    w: Vec<f32>,
    b: Vec<f32>,
    gw: Vec<f32>,
    gb: Vec<f32>,
    mean: Vec<f32>,
    n_in: usize,
    n_out: usize,
}

/// Per-layer statistics, summed over samples (divide by the sample count).
#[derive(Clone, Debug, Default, Serialize)]
pub struct FfLayerStats {
    /// Goodness of positive samples.
    pub pos_goodness: f64,
    /// Goodness of negative samples.
    pub neg_goodness: f64,
    /// Local loss.
    pub loss: f64,
    /// Samples on the right side of the threshold (positives above, negatives below).
    pub correct: f64,
    /// Samples counted (positives + negatives).
    pub count: f64,
}

/// A Forward-Forward network with its softmax head.
pub struct FfNet {
    cfg: FfConfig,
    n_in: usize,
    classes: usize,
    layers: Vec<FfLayer>,
    /// Head weights per hidden layer (width × classes); layer 0's stays unused (as the
    /// official code, which found the first hidden layer hurts the head).
    head: Vec<Vec<f32>>,
    head_g: Vec<Vec<f32>>,
    // buffers, all `rows × width`, grown once
    x: Vec<f32>,
    norm: Vec<Vec<f32>>,
    act: Vec<Vec<f32>>,
    dz: Vec<Vec<f32>>,
    good: Vec<Vec<f32>>,
    logits: Vec<f32>,
    scratch: Vec<f32>,
    col: Vec<f32>,
    neg: Vec<usize>,
    /// Training steps taken (the gradient-noise schedule's t).
    steps: usize,
}

/// Divides each row of `x` (`rows × cols`) by its RMS into `out`.
fn norm_rows(x: &[f32], cols: usize, out: &mut [f32]) {
    for (r, o) in x.chunks_exact(cols).zip(out.chunks_exact_mut(cols)) {
        let ms = r.iter().map(|v| v * v).sum::<f32>() / cols as f32;
        let inv = 1.0 / (ms.sqrt() + 1e-20);
        for (a, b) in o.iter_mut().zip(r) {
            *a = b * inv;
        }
    }
}

/// `ln(1 + eˣ)`, stable.
pub fn softplus(x: f32) -> f32 {
    if x > 20.0 {
        x
    } else {
        x.exp().ln_1p()
    }
}

fn grow(v: &mut Vec<f32>, n: usize) {
    if v.len() < n {
        v.resize(n, 0.0);
    }
}

impl FfNet {
    /// A new network for `n_in` features (with `overlay` the first `classes` carry the label;
    /// with `concat` the first layer reads `n_in + classes` inputs); weights N(0, 1/fan_in),
    /// biases 0, as the official code.
    pub fn new(cfg: FfConfig, n_in: usize, classes: usize) -> Result<Self> {
        if cfg.layers.is_empty() || cfg.layers.contains(&0) {
            return Err(Error::Config(format!("ff.layers must be non-empty positive widths, got {:?}", cfg.layers)));
        }
        crate::layers::check_size("ff network", Self::param_count(&cfg, n_in, classes))?;
        if classes < 2 || (cfg.label_input == LabelInput::Overlay && n_in <= classes) {
            return Err(Error::Config(format!(
                "ff needs more input features ({n_in}) than classes ({classes}) to overlay the label (or ff.label_input = \"concat\")"
            )));
        }
        let mut rng = Rng::new(cfg.seed).fork(0xff);
        let mut layers = Vec::new();
        let mut fan_in = n_in + cfg.label_input.extra(classes);
        for &w in &cfg.layers {
            let std = 1.0 / (fan_in as f32).sqrt();
            layers.push(FfLayer {
                w: (0..w * fan_in).map(|_| std * rng.normal()).collect(),
                b: vec![0.0; w],
                gw: vec![0.0; w * fan_in],
                gb: vec![0.0; w],
                mean: vec![0.5; w],
                n_in: fan_in,
                n_out: w,
            });
            fan_in = w;
        }
        let head = cfg.layers.iter().map(|&w| vec![0.0; w * classes]).collect();
        let head_g = cfg.layers.iter().map(|&w| vec![0.0; w * classes]).collect();
        let nl = cfg.layers.len();
        Ok(FfNet {
            cfg,
            n_in,
            classes,
            layers,
            head,
            head_g,
            x: Vec::new(),
            norm: vec![Vec::new(); nl + 1],
            act: vec![Vec::new(); nl],
            dz: vec![Vec::new(); nl],
            good: vec![Vec::new(); nl],
            logits: Vec::new(),
            scratch: Vec::new(),
            col: Vec::new(),
            neg: Vec::new(),
            steps: 0,
        })
    }

    /// Hidden layer widths.
    pub fn widths(&self) -> Vec<usize> {
        self.layers.iter().map(|l| l.n_out).collect()
    }

    /// Goodness threshold of layer `l`.
    pub fn theta(&self, l: usize) -> f32 {
        self.cfg.theta.unwrap_or(self.layers[l].n_out as f32)
    }

    /// Width of an input row with its label: the first layer's fan-in.
    fn row_width(&self) -> usize {
        self.n_in + self.cfg.label_input.extra(self.classes)
    }

    fn ensure(&mut self, rows: usize) {
        let width = self.row_width();
        grow(&mut self.x, rows * width);
        grow(&mut self.norm[0], rows * width);
        let mut maxw = 0;
        for l in 0..self.layers.len() {
            let w = self.layers[l].n_out;
            grow(&mut self.norm[l + 1], rows * w);
            grow(&mut self.act[l], rows * w);
            grow(&mut self.dz[l], rows * w);
            grow(&mut self.good[l], rows);
            maxw = maxw.max(w * self.layers[l].n_in).max(w * self.classes);
        }
        grow(&mut self.logits, rows * self.classes);
        grow(&mut self.scratch, maxw);
        let widest = self.layers.iter().map(|l| l.n_out).max().unwrap_or(0);
        grow(&mut self.col, widest);
        if self.neg.len() < rows {
            self.neg.resize(rows, 0);
        }
    }

    /// Writes `features` with `label` (one-hot × strength, or neutral when `None`) into row `row`.
    fn put(&mut self, row: usize, features: &[f32], label: Option<usize>) {
        let (n, c, s, w) = (self.n_in, self.classes, self.cfg.label_strength, self.row_width());
        let dst = &mut self.x[row * w..(row + 1) * w];
        dst[..n].copy_from_slice(features);
        let slot = match self.cfg.label_input {
            LabelInput::Overlay => 0..c,
            LabelInput::Concat => n..n + c,
        };
        for (k, v) in dst[slot].iter_mut().enumerate() {
            *v = match label {
                Some(l) if k == l => s,
                Some(_) => 0.0,
                None => s / c as f32,
            };
        }
    }

    /// Forward of rows `start..start + rows` of `self.x`: activities, normalised activities and
    /// goodness of every layer, in the same rows of the buffers.
    fn forward(&mut self, start: usize, rows: usize) {
        let n = self.row_width();
        let r = start..start + rows;
        norm_rows(&self.x[r.start * n..r.end * n], n, &mut self.norm[0][r.start * n..r.end * n]);
        for l in 0..self.layers.len() {
            let (ni, no) = (self.layers[l].n_in, self.layers[l].n_out);
            let (lower, upper) = self.norm.split_at_mut(l + 1);
            let input = &lower[l][r.start * ni..r.end * ni];
            let act = &mut self.act[l][r.start * no..r.end * no];
            act.fill(0.0);
            crate::core::gemm::add_row_bias(act, &self.layers[l].b);
            matmul(MatMut::new(act, rows, no), MatRef::new(input, rows, ni), MatRef::new(&self.layers[l].w, ni, no), true);
            for v in act.iter_mut() {
                *v = v.max(0.0);
            }
            for (g, row) in self.good[l][r.clone()].iter_mut().zip(act.chunks_exact(no)) {
                *g = row.iter().map(|v| v * v).sum();
            }
            norm_rows(act, no, &mut upper[0][r.start * no..r.end * no]);
        }
    }

    /// Softmax-head probabilities of rows `start..start + rows` of the last forward, into
    /// `self.logits[..rows × classes]`.
    fn head_probs(&mut self, start: usize, rows: usize) {
        let c = self.classes;
        let out = &mut self.logits[..rows * c];
        out.fill(0.0);
        for l in 1..self.layers.len() {
            let w = self.layers[l].n_out;
            let act = &self.norm[l + 1][start * w..(start + rows) * w];
            matmul(MatMut::new(out, rows, c), MatRef::new(act, rows, w), MatRef::new(&self.head[l], w, c), true);
        }
        for row in out.chunks_exact_mut(c) {
            let maxv = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
            let mut sum = 0.0;
            for v in row.iter_mut() {
                *v = (*v - maxv).exp();
                sum += *v;
            }
            row.iter_mut().for_each(|v| *v /= sum);
        }
    }

    /// Probability that row `row` is positive according to layer `l`.
    fn prob(&self, l: usize, row: usize) -> f32 {
        if self.cfg.collaborative {
            // own goodness plus the others' (no gradient flows through them)
            sigmoid((0..self.layers.len()).map(|k| self.good[k][row] - self.theta(k)).sum())
        } else {
            sigmoid(self.good[l][row] - self.theta(l))
        }
    }

    /// Gradient of the local loss w.r.t. the pre-activations of layer `l` for rows `rows`
    /// (positives when `positive`), into `self.dz[l]`, accumulating statistics.
    fn local_grad(&mut self, l: usize, rows: std::ops::Range<usize>, positive: bool, stats: &mut FfLayerStats) {
        let no = self.layers[l].n_out;
        let theta = self.theta(l);
        for r in rows {
            let p = self.prob(l, r);
            let g = self.good[l][r];
            // L⁺ = softplus(θ − G): dL/dG = −(1 − p); L⁻ = softplus(G − θ): dL/dG = p;
            // dG/dz = 2y (ReLU: y = 0 where z ≤ 0)
            let dldg = if positive { -(1.0 - p) } else { p };
            // confident samples give σ-tails like e^-100: flush them, since subnormal inputs
            // slow the GEMM of the update down by an order of magnitude
            let dldg = if dldg.abs() < 1e-12 { 0.0 } else { dldg };
            if positive {
                stats.pos_goodness += g as f64;
                stats.loss += softplus(theta - g) as f64;
                stats.correct += f64::from(u8::from(p > 0.5));
            } else {
                stats.neg_goodness += g as f64;
                stats.loss += softplus(g - theta) as f64;
                stats.correct += f64::from(u8::from(p <= 0.5));
            }
            stats.count += 1.0;
            let act = &self.act[l][r * no..(r + 1) * no];
            for (d, &y) in self.dz[l][r * no..(r + 1) * no].iter_mut().zip(act) {
                *d = dldg * 2.0 * y;
            }
        }
    }

    /// Gradients of the summed local loss over rows `0..rows` w.r.t. layer `l`'s weight
    /// (`in × out`) and bias, from `self.dz`.
    fn param_grads(&mut self, l: usize, rows: usize, gw: &mut [f32], gb: &mut [f32]) {
        let (ni, no) = (self.layers[l].n_in, self.layers[l].n_out);
        let dz = &self.dz[l][..rows * no];
        matmul(MatMut::new(gw, ni, no), MatRef::new(&self.norm[l][..rows * ni], rows, ni).t(), MatRef::new(dz, rows, no), false);
        sum_rows(dz, no, gb);
    }

    /// One training step on the samples `idx` of `data`: positives (rows 0..b), the softmax
    /// head on a neutral-label pass, negatives (rows b..2b), then the update of every layer
    /// with its own local gradient. `gain` scales the learning rates. Returns the head's loss.
    pub fn step(&mut self, data: &Dataset, idx: &[usize], gain: f32, rng: &mut Rng, stats: &mut [FfLayerStats]) -> Result<f32> {
        check_dim("ff data", "features", self.n_in, data.dim)?;
        let b = idx.len();
        let (c, nl) = (self.classes, self.layers.len());
        self.ensure(2 * b);
        for (r, &i) in idx.iter().enumerate() {
            self.put(r, data.row(i), Some(data.y[i] as usize));
        }
        self.forward(0, b);
        if stats.len() < nl {
            return Err(Error::Invalid(format!("ff step: {} stats slots for {nl} layers", stats.len())));
        }
        for (l, st) in stats.iter_mut().enumerate().take(nl) {
            // running unit means on positives, then the local gradient
            let no = self.layers[l].n_out;
            let col = &mut self.col[..no];
            sum_rows(&self.act[l][..b * no], no, col);
            for (m, s) in self.layers[l].mean.iter_mut().zip(col.iter()) {
                *m = 0.9 * *m + 0.1 * s / b as f32;
            }
            self.local_grad(l, 0..b, true, st);
            // peer normalisation: push each unit's mean towards the layer's, ungated
            let lam = self.cfg.peer;
            if lam > 0.0 {
                let mean = &self.layers[l].mean;
                let m_all = mean.iter().sum::<f32>() / no as f32;
                for row in self.dz[l][..b * no].chunks_exact_mut(no) {
                    for (d, m) in row.iter_mut().zip(mean) {
                        *d -= lam * (m_all - m);
                    }
                }
            }
        }
        // neutral-label pass in rows b..2b: train the head, pick negative labels
        for (r, &i) in idx.iter().enumerate() {
            self.put(b + r, data.row(i), None);
        }
        self.forward(b, b);
        self.head_probs(b, b);
        let mut head_loss = 0.0f32;
        for (r, &i) in idx.iter().enumerate() {
            let label = data.y[i] as usize;
            let row = &mut self.logits[r * c..(r + 1) * c];
            head_loss -= (row[label] + 1e-30).ln();
            self.neg[r] = match self.cfg.negatives {
                Negatives::Random => {
                    let k = rng.below(c - 1);
                    if k >= label {
                        k + 1
                    } else {
                        k
                    }
                }
                Negatives::Hard => {
                    // sample from the prediction with the true class removed
                    let others: f32 = row.iter().enumerate().filter(|(k, _)| *k != label).map(|(_, v)| v).sum();
                    let mut u = rng.uniform() * others;
                    let mut pick = usize::from(label == 0);
                    for (k, &v) in row.iter().enumerate() {
                        if k == label {
                            continue;
                        }
                        pick = k;
                        if u < v {
                            break;
                        }
                        u -= v;
                    }
                    pick
                }
            };
            row[label] -= 1.0; // now p − onehot: the softmax cross-entropy gradient
        }
        for l in 1..nl {
            let w = self.layers[l].n_out;
            let g = &mut self.scratch[..w * c];
            matmul(MatMut::new(g, w, c), MatRef::new(&self.norm[l + 1][b * w..2 * b * w], b, w).t(), MatRef::new(&self.logits[..b * c], b, c), false);
            let (mo, lr, wc) = (self.cfg.momentum, self.cfg.head_lr * gain, self.cfg.head_weight_cost);
            for ((wv, gv), d) in self.head[l].iter_mut().zip(self.head_g[l].iter_mut()).zip(g.iter()) {
                *gv = mo * *gv + (1.0 - mo) * d / b as f32;
                *wv -= lr * (*gv + wc * *wv);
            }
        }
        // negatives in rows b..2b
        for (r, &i) in idx.iter().enumerate() {
            let neg = self.neg[r];
            self.put(b + r, data.row(i), Some(neg));
        }
        self.forward(b, b);
        for (l, st) in stats.iter_mut().enumerate().take(nl) {
            self.local_grad(l, b..2 * b, false, st);
        }
        // update every layer from its positives and negatives (2b rows)
        let noise = crate::optim::GradNoise { eta: self.cfg.grad_noise, gamma: self.cfg.grad_noise_gamma };
        // the sums below are divided by b in the update: noise of b times the deviation
        let noise_std = noise.std(self.steps) * b as f32;
        let mut noise_rng = Rng::new(self.cfg.seed).fork(self.steps as u64 ^ 0x6e01_5e00_0000_0000);
        for l in 0..nl {
            let (ni, no) = (self.layers[l].n_in, self.layers[l].n_out);
            let mut gw = std::mem::take(&mut self.scratch);
            let mut gb = std::mem::take(&mut self.col);
            self.param_grads(l, 2 * b, &mut gw[..no * ni], &mut gb[..no]);
            if noise_std > 0.0 {
                gw[..no * ni].iter_mut().chain(gb[..no].iter_mut()).for_each(|g| *g += noise_std * noise_rng.normal());
            }
            let layer = &mut self.layers[l];
            let (mo, lr, wc, inv_b) = (self.cfg.momentum, self.cfg.lr * gain, self.cfg.weight_cost, 1.0 / b as f32);
            for ((wv, gv), d) in layer.w.iter_mut().zip(layer.gw.iter_mut()).zip(&gw[..no * ni]) {
                *gv = mo * *gv + (1.0 - mo) * d * inv_b;
                *wv -= lr * (*gv + wc * *wv);
            }
            for ((bv, gv), d) in layer.b.iter_mut().zip(layer.gb.iter_mut()).zip(&gb[..no]) {
                *gv = mo * *gv + (1.0 - mo) * d * inv_b;
                *bv -= lr * *gv;
            }
            self.scratch = gw;
            self.col = gb;
        }
        self.steps += 1;
        Ok(head_loss / b as f32)
    }

    /// Predicted class by goodness: one pass per label, goodness summed over hidden layers
    /// after the first (all layers if there is only one). `x`: `rows × n_in`.
    pub fn predict_goodness(&mut self, x: &[f32], rows: usize, out: &mut [u32]) {
        let (n, c, nl) = (self.n_in, self.classes, self.layers.len());
        self.ensure(rows);
        let first = usize::from(nl > 1);
        let mut best = vec![(f32::NEG_INFINITY, 0u32); rows];
        for label in 0..c {
            for r in 0..rows {
                self.put(r, &x[r * n..(r + 1) * n], Some(label));
            }
            self.forward(0, rows);
            for (r, b) in best.iter_mut().enumerate() {
                let g: f32 = (first..nl).map(|l| self.good[l][r]).sum();
                if g > b.0 {
                    *b = (g, label as u32);
                }
            }
        }
        for (o, b) in out.iter_mut().zip(best) {
            *o = b.1;
        }
    }

    /// Predicted class by the softmax head on one neutral-label pass. `x`: `rows × n_in`.
    pub fn predict_softmax(&mut self, x: &[f32], rows: usize, out: &mut [u32]) {
        let (n, c) = (self.n_in, self.classes);
        self.ensure(rows);
        for r in 0..rows {
            self.put(r, &x[r * n..(r + 1) * n], None);
        }
        self.forward(0, rows);
        self.head_probs(0, rows);
        crate::core::loss::argmax_rows(&self.logits[..rows * c], c, out);
    }

    /// Test accuracy of both predictors: `(softmax, goodness)`.
    pub fn accuracy(&mut self, data: &Dataset, goodness: bool) -> Result<(f32, Option<f32>)> {
        check_dim("ff data", "features", self.n_in, data.dim)?;
        const CHUNK: usize = 1000;
        let (mut cs, mut cg) = (0usize, 0usize);
        let mut pred = vec![0u32; CHUNK];
        for start in (0..data.len()).step_by(CHUNK) {
            let rows = (start + CHUNK).min(data.len()) - start;
            let x = &data.x[start * data.dim..(start + rows) * data.dim];
            let y = &data.y[start..start + rows];
            self.predict_softmax(x, rows, &mut pred[..rows]);
            cs += pred[..rows].iter().zip(y).filter(|(p, t)| p == t).count();
            if goodness {
                self.predict_goodness(x, rows, &mut pred[..rows]);
                cg += pred[..rows].iter().zip(y).filter(|(p, t)| p == t).count();
            }
        }
        let n = data.len() as f32;
        Ok((cs as f32 / n, goodness.then_some(cg as f32 / n)))
    }
}

/// Model description stored in a Forward-Forward checkpoint's metadata.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct FfMeta {
    n_in: usize,
    classes: usize,
    ff: FfConfig,
}

impl FfNet {
    /// Scalars stored for a network of `cfg` (weights, biases and the softmax head), without
    /// building it (`None` on overflow).
    pub fn param_count(cfg: &FfConfig, n_in: usize, classes: usize) -> Option<usize> {
        let mut fan_in = n_in.checked_add(cfg.label_input.extra(classes))?;
        let mut total = 0usize;
        for (l, &w) in cfg.layers.iter().enumerate() {
            let head = if l > 0 { w.checked_mul(classes)? } else { 0 };
            total = total.checked_add(w.checked_mul(fan_in.checked_add(1)?)?.checked_add(head)?)?;
            fan_in = w;
        }
        Some(total)
    }

    /// Input features.
    pub fn in_features(&self) -> usize {
        self.n_in
    }

    /// Number of classes.
    pub fn classes(&self) -> usize {
        self.classes
    }

    /// Saves weights (`layers.{l}.weight` as `in × out`, `layers.{l}.bias`), the softmax head
    /// (`head.{l}.weight`, `width × classes`, for hidden layers ≥ 1) and the configuration
    /// (metadata `ffwd.format = ff/1`, `ffwd.config`) to one safetensors file, atomically.
    pub fn save(&self, path: &std::path::Path) -> Result<()> {
        self.checkpoint()?.write(path)
    }

    /// The checkpoint [`FfNet::save`] writes, as a writer.
    pub fn checkpoint(&self) -> Result<crate::checkpoint::CheckpointWriter<'_>> {
        use crate::checkpoint::{CheckpointWriter, CONFIG_KEY, FF_FORMAT};
        let mut w = CheckpointWriter::new(FF_FORMAT);
        for (l, layer) in self.layers.iter().enumerate() {
            w.tensor(format!("layers.{l}.weight"), &[layer.n_in, layer.n_out], &layer.w);
            w.tensor(format!("layers.{l}.bias"), &[layer.n_out], &layer.b);
            if l > 0 {
                w.tensor(format!("head.{l}.weight"), &[layer.n_out, self.classes], &self.head[l]);
            }
        }
        w.json(CONFIG_KEY, &FfMeta { n_in: self.n_in, classes: self.classes, ff: self.cfg.clone() })?;
        Ok(w)
    }

    /// Loads a network saved by [`FfNet::save`].
    pub fn load(path: &std::path::Path) -> Result<Self> {
        Self::from_checkpoint(&crate::checkpoint::CheckpointReader::open(path)?)
    }

    /// The network stored in an opened checkpoint.
    pub fn from_checkpoint(ck: &crate::checkpoint::CheckpointReader) -> Result<Self> {
        ck.expect_format(crate::checkpoint::FF_FORMAT)?;
        let m: FfMeta = ck.json(crate::checkpoint::CONFIG_KEY)?;
        ck.check_claim("the network", Self::param_count(&m.ff, m.n_in, m.classes))?;
        let st = ck.tensors()?;
        let mut net = ck.about(FfNet::new(m.ff, m.n_in, m.classes))?;
        for l in 0..net.layers.len() {
            let (ni, no) = (net.layers[l].n_in, net.layers[l].n_out);
            net.layers[l].w = ck.read_f32(&st, &format!("layers.{l}.weight"), &[ni, no])?;
            net.layers[l].b = ck.read_f32(&st, &format!("layers.{l}.bias"), &[no])?;
            if l > 0 {
                net.head[l] = ck.read_f32(&st, &format!("head.{l}.weight"), &[no, m.classes])?;
            }
        }
        Ok(net)
    }
}

/// What a Forward-Forward run reports.
#[derive(Clone, Debug, Serialize)]
pub struct FfEpoch {
    /// 1-based epoch.
    pub epoch: usize,
    /// Per-layer mean positive goodness, negative goodness, loss and threshold accuracy.
    pub layers: Vec<FfLayerSummary>,
    /// Softmax head cross-entropy.
    pub head_loss: f32,
    /// Test accuracy of the softmax predictor.
    pub test_accuracy: f32,
    /// Test accuracy of the goodness predictor (when evaluated this epoch).
    pub test_accuracy_goodness: Option<f32>,
    /// Seconds of training this epoch.
    pub seconds: f64,
}

/// Per-layer means of an epoch.
#[derive(Clone, Debug, Serialize)]
pub struct FfLayerSummary {
    /// Mean positive goodness.
    pub pos_goodness: f32,
    /// Mean negative goodness.
    pub neg_goodness: f32,
    /// Mean local loss per sample.
    pub loss: f32,
    /// Fraction on the right side of θ.
    pub accuracy: f32,
}

/// Trains `net` on `split.train`; `on_epoch` sees every epoch's summary; goodness prediction
/// (10 passes) is evaluated every `goodness_every` epochs and at the end.
pub fn train_ff(net: &mut FfNet, split: &Split, goodness_every: usize, on_epoch: &mut dyn FnMut(&FfEpoch)) -> Result<Vec<FfEpoch>> {
    let data = &split.train;
    let (epochs, batch) = (net.cfg.epochs, net.cfg.batch.min(data.len()));
    if epochs == 0 || batch == 0 {
        return Err(Error::Config("ff epochs and batch must be positive".into()));
    }
    let mut rng = Rng::new(net.cfg.seed).fork(1);
    let mut order: Vec<usize> = (0..data.len()).collect();
    let mut history = Vec::new();
    for epoch in 1..=epochs {
        // constant for the first half, then linear decay (the official schedule)
        let gain = if 2 * epoch <= epochs { 1.0 } else { (1 + 2 * (epochs - epoch)) as f32 / epochs as f32 };
        rng.shuffle(&mut order);
        let t0 = std::time::Instant::now();
        let mut stats = vec![FfLayerStats::default(); net.layers.len()];
        let (mut head, mut steps) = (0.0f64, 0usize);
        for idx in order.chunks(batch) {
            head += net.step(data, idx, gain, &mut rng, &mut stats)? as f64;
            steps += 1;
        }
        let seconds = t0.elapsed().as_secs_f64();
        let eval_goodness = epoch == epochs || (goodness_every > 0 && epoch % goodness_every == 0);
        let (acc, accg) = net.accuracy(&split.test, eval_goodness)?;
        let layers = stats
            .iter()
            .map(|s| {
                let half = (s.count / 2.0).max(1.0);
                FfLayerSummary {
                    pos_goodness: (s.pos_goodness / half) as f32,
                    neg_goodness: (s.neg_goodness / half) as f32,
                    loss: (s.loss / s.count.max(1.0)) as f32,
                    accuracy: (s.correct / s.count.max(1.0)) as f32,
                }
            })
            .collect();
        let e = FfEpoch { epoch, layers, head_loss: (head / steps as f64) as f32, test_accuracy: acc, test_accuracy_goodness: accg, seconds };
        on_epoch(&e);
        history.push(e);
    }
    Ok(history)
}

#[cfg(test)]
#[allow(clippy::needless_range_loop)]
mod tests {
    use super::*;

    /// Weight `k` (or bias `k`) of layer `l`.
    fn param(net: &mut FfNet, l: usize, bias: bool, k: usize) -> &mut f32 {
        if bias {
            &mut net.layers[l].b[k]
        } else {
            &mut net.layers[l].w[k]
        }
    }

    /// The local loss of a layer on fixed inputs, for finite differences.
    fn local_loss(net: &mut FfNet, l: usize, rows: usize, positive: bool) -> f64 {
        net.forward(0, rows);
        let th = net.theta(l);
        (0..rows).map(|r| softplus(if positive { th - net.good[l][r] } else { net.good[l][r] - th }) as f64).sum()
    }

    #[test]
    fn local_gradient_matches_finite_differences() {
        let cfg = FfConfig { layers: vec![7, 5], theta: Some(4.0), peer: 0.0, ..Default::default() };
        let mut net = FfNet::new(cfg, 12, 3).unwrap();
        let mut rng = Rng::new(3);
        let rows = 6;
        net.ensure(rows);
        for r in 0..rows {
            let f: Vec<f32> = (0..12).map(|_| rng.normal()).collect();
            net.put(r, &f, Some(r % 3));
        }
        for positive in [true, false] {
            for l in 0..2 {
                net.forward(0, rows);
                let mut st = FfLayerStats::default();
                net.local_grad(l, 0..rows, positive, &mut st);
                let (ni, no) = (net.layers[l].n_in, net.layers[l].n_out);
                let mut gw = vec![0.0; no * ni];
                let mut gb = vec![0.0; no];
                net.param_grads(l, rows, &mut gw, &mut gb);
                // central difference of the local loss in one weight (bias when `bias`)
                let fd = |net: &mut FfNet, bias: bool, k: usize| {
                    let orig = *param(net, l, bias, k);
                    *param(net, l, bias, k) = orig + 1e-3;
                    let lp = local_loss(net, l, rows, positive);
                    *param(net, l, bias, k) = orig - 1e-3;
                    let lm = local_loss(net, l, rows, positive);
                    *param(net, l, bias, k) = orig;
                    (lp - lm) / 2e-3
                };
                for (bias, grads, step) in [(false, &gw, 5), (true, &gb, 1)] {
                    for k in (0..grads.len()).step_by(step) {
                        let num = fd(&mut net, bias, k);
                        assert!((num - grads[k] as f64).abs() < 2e-3 + 2e-2 * num.abs(), "layer {l} pos {positive} bias {bias} [{k}]: {} vs {num}", grads[k]);
                    }
                }
            }
        }
    }

    #[test]
    fn negatives_never_carry_the_true_label() {
        for negatives in [Negatives::Hard, Negatives::Random] {
            let cfg = FfConfig { layers: vec![8], negatives, ..Default::default() };
            let mut net = FfNet::new(cfg, 16, 4).unwrap();
            let mut rng = Rng::new(1);
            let n = 200;
            let data = Dataset { x: (0..n * 16).map(|_| rng.uniform()).collect(), y: (0..n).map(|i| (i % 4) as u32).collect(), dim: 16, n_classes: 4 };
            let idx: Vec<usize> = (0..n).collect();
            let mut stats = vec![FfLayerStats::default()];
            for _ in 0..5 {
                net.step(&data, &idx, 1.0, &mut rng, &mut stats).unwrap();
                let mut seen = [false; 4];
                for (r, &i) in idx.iter().enumerate() {
                    assert_ne!(net.neg[r], data.y[i] as usize, "{negatives:?}");
                    seen[net.neg[r]] = true;
                }
                assert!(seen.iter().all(|&s| s), "{negatives:?} should use every wrong label");
            }
        }
    }
}

#[cfg(test)]
mod toy_tests {
    use super::*;

    /// Four classes, each a fixed random pattern on 30 features plus noise.
    fn toy(n: usize, seed: u64) -> Dataset {
        let mut r = Rng::new(99);
        let patterns: Vec<Vec<f32>> = (0..4).map(|_| (0..30).map(|_| r.uniform()).collect()).collect();
        let mut r = Rng::new(seed);
        let mut x = Vec::new();
        let mut y = Vec::new();
        for i in 0..n {
            let c = i % 4;
            x.extend(patterns[c].iter().map(|v| v + 0.05 * r.normal()));
            y.push(c as u32);
        }
        Dataset { x, y, dim: 30, n_classes: 4 }
    }

    #[test]
    fn goodness_and_softmax_predictions_agree_on_a_separable_toy_set() {
        let split = Split::new(toy(400, 1), toy(200, 2)).unwrap();
        let cfg = FfConfig { layers: vec![40, 40], epochs: 20, batch: 20, lr: 0.02, ..Default::default() };
        let mut net = FfNet::new(cfg, 30, 4).unwrap();
        let h = train_ff(&mut net, &split, 0, &mut |_| {}).unwrap();
        let last = h.last().unwrap();
        assert!(last.test_accuracy > 0.95, "softmax {}", last.test_accuracy);
        assert!(last.test_accuracy_goodness.unwrap() > 0.95, "goodness {:?}", last.test_accuracy_goodness);
        let (mut a, mut b) = (vec![0u32; 200], vec![0u32; 200]);
        net.predict_softmax(&split.test.x, 200, &mut a);
        net.predict_goodness(&split.test.x, 200, &mut b);
        let agree = a.iter().zip(&b).filter(|(p, q)| p == q).count();
        assert!(agree >= 190, "the two predictors agree on {agree}/200");
        // same seed, same result
        let mut again = FfNet::new(FfConfig { layers: vec![40, 40], epochs: 20, batch: 20, lr: 0.02, ..Default::default() }, 30, 4).unwrap();
        let h2 = train_ff(&mut again, &split, 0, &mut |_| {}).unwrap();
        assert_eq!(h2.last().unwrap().test_accuracy, last.test_accuracy);
        assert_eq!(h2.last().unwrap().layers[0].pos_goodness, last.layers[0].pos_goodness);
        // collaborative FF and random negatives learn the toy set too
        for (collaborative, negatives) in [(true, Negatives::Hard), (false, Negatives::Random)] {
            let cfg = FfConfig { layers: vec![40, 40], epochs: 20, batch: 20, lr: 0.02, collaborative, negatives, ..Default::default() };
            let mut n = FfNet::new(cfg, 30, 4).unwrap();
            let h = train_ff(&mut n, &split, 0, &mut |_| {}).unwrap();
            let l = h.last().unwrap();
            assert!(
                l.test_accuracy > 0.9 && l.test_accuracy_goodness.unwrap() > 0.9,
                "{collaborative} {negatives:?}: {} {:?}",
                l.test_accuracy,
                l.test_accuracy_goodness
            );
        }
    }

    #[test]
    fn gradient_noise_is_seeded_and_changes_the_run() {
        let split = Split::new(toy(200, 1), toy(100, 2)).unwrap();
        let run = |grad_noise: f32| {
            let cfg = FfConfig { layers: vec![20], epochs: 3, batch: 20, lr: 0.02, grad_noise, ..Default::default() };
            let mut net = FfNet::new(cfg, 30, 4).unwrap();
            train_ff(&mut net, &split, 0, &mut |_| {}).unwrap();
            net.layers[0].w.clone()
        };
        let (a, b, none) = (run(0.01), run(0.01), run(0.0));
        assert_eq!(a, b, "the same seed gives the same noise");
        assert_ne!(a, none, "noise changes the weights");
        // small noise: the weights stay close to the noiseless run
        let diff = a.iter().zip(&none).map(|(x, y)| (x - y).abs()).fold(0.0f32, f32::max);
        assert!(diff < 0.5, "{diff}");
    }

    #[test]
    fn the_label_as_a_separate_input_keeps_every_feature_and_learns() {
        // the toy classes differ only in their first four features: overlaying the label
        // erases what tells them apart, a separate label input keeps it
        let only_first = |n: usize, seed: u64| {
            let mut d = toy(n, seed);
            for (i, row) in d.x.chunks_mut(30).enumerate() {
                let c = i % 4;
                row[4..].fill(0.5);
                row[..4].iter_mut().enumerate().for_each(|(k, v)| *v = if k == c { 1.0 } else { 0.0 });
            }
            d
        };
        let split = Split::new(only_first(400, 1), only_first(200, 2)).unwrap();
        let run = |label_input| {
            let cfg = FfConfig { layers: vec![40, 40], epochs: 20, batch: 20, lr: 0.02, label_input, ..Default::default() };
            let mut net = FfNet::new(cfg, 30, 4).unwrap();
            let h = train_ff(&mut net, &split, 0, &mut |_| {}).unwrap();
            (net, h.last().unwrap().test_accuracy)
        };
        let (net, concat) = run(LabelInput::Concat);
        let (_, overlay) = run(LabelInput::Overlay);
        assert!(concat > 0.95, "concat {concat}");
        assert!(overlay < 0.5, "overlay should lose the class features: {overlay}");
        // the first layer reads features + label; a checkpoint round trip keeps it
        assert_eq!(net.layers[0].n_in, 34);
        let bytes = net.checkpoint().unwrap().to_bytes().unwrap();
        let mut back = FfNet::from_checkpoint(&crate::checkpoint::CheckpointReader::from_bytes(bytes, "memory").unwrap()).unwrap();
        let (mut a, mut b) = (vec![0u32; 200], vec![0u32; 200]);
        let mut net = net;
        net.predict_softmax(&split.test.x, 200, &mut a);
        back.predict_softmax(&split.test.x, 200, &mut b);
        assert_eq!(a, b);
        // concat needs no spare features: 3 features, 4 classes
        assert!(FfNet::new(FfConfig { layers: vec![4], label_input: LabelInput::Concat, ..Default::default() }, 3, 4).is_ok());
        assert!(FfNet::new(FfConfig { layers: vec![4], ..Default::default() }, 3, 4).is_err());
    }
}
