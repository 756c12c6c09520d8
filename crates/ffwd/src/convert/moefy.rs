//! `ffwd convert moefy`: a trained dense ReLU FFN split into a mixture of experts (MoEfication,
//! Zhang et al. 2022, reference code thunlp/MoEfication).
//!
//! 1. **Experts by balanced k-means**: the rows of `W1` (one per hidden neuron), L2-normalised,
//!    are clustered into `E` groups of exactly `h / E` neurons (each iteration assigns the
//!    (neuron, centroid) pairs greedily by cosine similarity, best first, into clusters that
//!    still have room; centroids are the means of their members). Expert `e` is the slice of
//!    the dense layer made of its neurons: with every expert selected the layer computes the
//!    dense output exactly.
//! 2. **Router**: `tanh(R1 x + c1)` then `R2 · + c2` with `R1` = the centroids, `R2` = I, trained
//!    with binary cross-entropy against each expert's share of activation mass on calibration
//!    inputs (`Σ_{i∈e} relu(a_i)`, divided by the largest expert's), Adam (lr 0.01), 30 epochs,
//!    90/10 split. Or the centroid router `R1 x` (nothing trained).
//! 3. **Report**: on the held-out calibration rows, the share of activation mass the top-K
//!    predicted experts hold (recall) next to the best possible top-K (oracle).

use serde::{Deserialize, Serialize};

use crate::core::gemm::{add_sum_rows, matmul, matmul_bt, MatMut, MatRef};
use crate::core::{Activation, Rng};
use crate::data::Dataset;
use crate::error::{check_matrix, Error, Result};
use crate::layers::{Layer, LayerConfig, Moefied, MoefiedConfig, MoefiedRouter};
use crate::models::{Classifier, Lm};
use crate::optim::{AdamW, Optimizer};

/// Options of [`moefy`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MoefyOptions {
    /// Neurons per expert (must divide the hidden width).
    pub expert_width: usize,
    /// Experts run per input (0 = a quarter of the experts).
    pub k: usize,
    /// Router kind.
    pub router: MoefiedRouter,
    /// k-means iterations.
    pub kmeans_iters: usize,
    /// Router training epochs.
    pub epochs: usize,
    /// Router learning rate (Adam).
    pub lr: f32,
    /// Router mini-batch.
    pub batch: usize,
    /// Calibration rows used (the first ones after a seeded shuffle).
    pub max_rows: usize,
    /// Accept a non-ReLU FFN: exact with every expert, approximate when experts are skipped.
    pub approximate: bool,
    /// Seed of the k-means start, the shuffle and the split.
    pub seed: u64,
    /// What the neurons are clustered by.
    pub split: Split,
}

/// How neurons are grouped into experts (both balanced k-means).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Split {
    /// By their input weights (rows of W1, L2-normalised): MoEfication's parameter clustering.
    Weights,
    /// By their activations on calibration inputs (L2-normalised): neurons that fire
    /// together share an expert (MoEfication's co-activation split, here as k-means).
    #[default]
    Coactivation,
}

impl Default for MoefyOptions {
    fn default() -> Self {
        MoefyOptions {
            expert_width: 32,
            k: 0,
            router: MoefiedRouter::Mlp,
            kmeans_iters: 20,
            epochs: 30,
            lr: 0.01,
            batch: 256,
            max_rows: 20_000,
            approximate: false,
            seed: 0,
            split: Split::Coactivation,
        }
    }
}

/// Activation-mass recall of the router at one K.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Recall {
    /// Experts run.
    pub k: usize,
    /// Share of the activation mass in the router's top-K (mean over held-out rows).
    pub router: f32,
    /// Share in the K experts of most mass (the best any router can do).
    pub oracle: f32,
}

/// What [`moefy`] did.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MoefyReport {
    /// Experts E.
    pub experts: usize,
    /// Neurons per expert.
    pub expert_width: usize,
    /// Experts run per input.
    pub k: usize,
    /// Router kind.
    pub router: MoefiedRouter,
    /// The FFN's activation (`relu` = skipping inactive experts is the only approximation).
    pub activation: Activation,
    /// Calibration rows used (train + held out).
    pub calib_rows: usize,
    /// What the neurons were clustered by.
    pub split: Split,
    /// Mean cosine similarity of the neurons to their expert's centroid (in the split's space).
    pub cohesion: f32,
    /// Router BCE on the held-out rows, first and last epoch (MLP router).
    pub router_bce: Option<(f32, f32)>,
    /// Recall at 10, 20, 25, 30, 50 % of the experts and at `k`.
    pub recall: Vec<Recall>,
}

/// Stage of a long conversion, for progress bars: `(stage, done, total)`.
pub type Progress<'a> = &'a mut dyn FnMut(&str, usize, usize);

/// Splits a dense two-map FFN (`layer`, `in → h → out`) into a [`Moefied`] layer of experts of
/// `opts.expert_width` neurons, its router fitted on `calib` (`rows × in`, inputs the layer
/// sees). Errors for other layers, a width that does not split evenly, a non-ReLU activation
/// without `opts.approximate`, or too few calibration rows.
pub fn moefy(layer: &dyn Layer, calib: &[f32], rows: usize, opts: &MoefyOptions, progress: Progress<'_>) -> Result<(Moefied, MoefyReport)> {
    let LayerConfig::Dense(dc) = layer.config() else {
        return Err(Error::Invalid(format!("moefy needs a dense FFN, this layer is {}", layer.kind())));
    };
    if dc.layers != 2 {
        return Err(Error::Invalid(format!("moefy needs a dense FFN of two maps (in → h → out), this one has {}", dc.layers)));
    }
    if dc.activation != Activation::Relu && !opts.approximate {
        return Err(Error::Invalid(format!(
            "moefy splits ReLU FFNs: this one uses {:?}, whose skipped neurons are not zero (pass --approximate to convert anyway)",
            dc.activation
        )));
    }
    let (d, h, o) = (layer.in_features(), dc.width, layer.out_features());
    let g = opts.expert_width;
    if g == 0 || !h.is_multiple_of(g) {
        return Err(Error::Invalid(format!("expert width {g} does not divide the hidden width {h}")));
    }
    let e = h / g;
    let k = if opts.k == 0 { (e / 4).max(1) } else { opts.k };
    if k > e {
        return Err(Error::Invalid(format!("k = {k} is more than the {e} experts")));
    }
    check_matrix("moefy calibration inputs", calib.len(), rows, d)?;
    if rows < 20 {
        return Err(Error::Invalid(format!("moefy needs at least 20 calibration rows, got {rows}")));
    }
    let p = layer.params();
    let (w1, b1, w2, b2) = (&p[0].value, &p[1].value, &p[2].value, &p[3].value);
    let mut rng = Rng::new(opts.seed).fork(0x30ef);

    // 1. balanced k-means of the neurons
    let unit = normalized_rows(w1, d);
    let (members, cohesion) = match opts.split {
        Split::Weights => {
            let (m, _, c) = balanced_kmeans(&unit, h, d, e, opts.kmeans_iters, &mut rng, progress);
            (m, c)
        }
        Split::Coactivation => {
            // each neuron's activations on (up to) 4096 calibration rows, as its feature row
            let nc = rows.min(4096);
            let mut a = vec![0.0f32; nc * h];
            matmul_bt(&mut a, &calib[..nc * d], nc, d, w1, h);
            let mut feats = vec![0.0f32; h * nc];
            for (r, ar) in a.chunks_exact(h).enumerate() {
                for (j, &v) in ar.iter().enumerate() {
                    feats[j * nc + r] = dc.activation.apply(v + b1[j]);
                }
            }
            let (m, _, c) = balanced_kmeans(&normalized_rows(&feats, nc), h, nc, e, opts.kmeans_iters, &mut rng, progress);
            (m, c)
        }
    };
    // router init: each expert's mean normalised input weights
    let mut centroids = vec![0.0f32; e * d];
    for (c, ms) in members.iter().enumerate() {
        for &i in ms {
            for (v, &u) in centroids[c * d..(c + 1) * d].iter_mut().zip(&unit[i * d..(i + 1) * d]) {
                *v += u / g as f32;
            }
        }
    }

    // 2. the experts, slices of the dense layer
    let cfg = MoefiedConfig { experts: e, expert_width: g, k, router: opts.router, activation: dc.activation };
    let mut m = Moefied::new(cfg, d, o, &mut rng)?;
    for (ei, neurons) in members.iter().enumerate() {
        for (j, &n) in neurons.iter().enumerate() {
            for i in 0..d {
                m.bank.w1.value[(ei * d + i) * g + j] = w1[n * d + i];
            }
            m.bank.b1.value[ei * g + j] = b1[n];
            for oi in 0..o {
                m.bank.w2.value[(ei * g + j) * o + oi] = w2[oi * h + n];
            }
        }
    }
    m.bank.b2.value.copy_from_slice(b2);
    m.router[0].value.copy_from_slice(&centroids);

    // 3. calibration targets: each expert's activation mass
    let n = rows.min(opts.max_rows.max(20));
    let mut order: Vec<usize> = (0..rows).collect();
    rng.shuffle(&mut order);
    let x: Vec<f32> = order[..n].iter().flat_map(|&r| calib[r * d..(r + 1) * d].iter().copied()).collect();
    let mut a = vec![0.0f32; n * h];
    matmul_bt(&mut a, &x, n, d, w1, h);
    let mut mass = vec![0.0f32; n * e];
    for (ar, mr) in a.chunks_exact(h).zip(mass.chunks_exact_mut(e)) {
        for (ei, neurons) in members.iter().enumerate() {
            mr[ei] = neurons.iter().map(|&j| dc.activation.apply(ar[j] + b1[j]).max(0.0)).sum();
        }
    }
    drop(a);
    let n_val = (n / 10).max(1);
    let n_train = n - n_val;
    let router_bce = if opts.router == MoefiedRouter::Mlp { Some(train_router(&mut m, &x, &mass, n_train, d, e, opts, progress)?) } else { None };

    // 4. recall of the router on the held-out rows
    let (xv, mv) = (&x[n_train * d..], &mass[n_train * e..]);
    let mut scores = vec![0.0f32; n_val * e];
    m.router_scores(xv, n_val, &mut Vec::new(), &mut scores);
    let mut ks: Vec<usize> = [0.1, 0.2, 0.25, 0.3, 0.5].iter().map(|f| ((e as f32 * f).round() as usize).clamp(1, e)).collect();
    ks.push(k);
    ks.sort_unstable();
    ks.dedup();
    let recall = ks.into_iter().map(|kk| Recall { k: kk, router: recall_at(&scores, mv, e, kk), oracle: recall_at(mv, mv, e, kk) }).collect();
    let report = MoefyReport {
        experts: e,
        expert_width: g,
        k,
        router: opts.router,
        activation: dc.activation,
        calib_rows: n,
        split: opts.split,
        cohesion,
        router_bce,
        recall,
    };
    Ok((m, report))
}

/// Rows of `m` (`· × d`) scaled to unit length.
fn normalized_rows(m: &[f32], d: usize) -> Vec<f32> {
    m.chunks_exact(d)
        .flat_map(|r| {
            let n = r.iter().map(|v| v * v).sum::<f32>().sqrt().max(1e-12);
            r.iter().map(move |v| v / n)
        })
        .collect()
}

/// Mean over rows (with any mass) of the share of `mass` in the top-`k` of `scores`.
fn recall_at(scores: &[f32], mass: &[f32], e: usize, k: usize) -> f32 {
    let (mut sum, mut rows) = (0.0f64, 0usize);
    let mut idx: Vec<usize> = (0..e).collect();
    for (s, m) in scores.chunks_exact(e).zip(mass.chunks_exact(e)) {
        let total: f32 = m.iter().sum();
        if total <= 0.0 {
            continue;
        }
        idx.sort_by(|&a, &b| s[b].total_cmp(&s[a]));
        sum += (idx[..k].iter().map(|&i| m[i]).sum::<f32>() / total) as f64;
        rows += 1;
    }
    if rows == 0 {
        1.0
    } else {
        (sum / rows as f64) as f32
    }
}

/// Balanced k-means of `h` unit rows (`h × d`) into `e` clusters of `h / e`: members of each
/// cluster, the centroids (`e × d`) and the mean cosine of the rows to their centroid.
fn balanced_kmeans(unit: &[f32], h: usize, d: usize, e: usize, iters: usize, rng: &mut Rng, progress: Progress<'_>) -> (Vec<Vec<usize>>, Vec<f32>, f32) {
    let cap = h / e;
    let mut start: Vec<usize> = (0..h).collect();
    rng.shuffle(&mut start);
    let mut centroids: Vec<f32> = start[..e].iter().flat_map(|&r| unit[r * d..(r + 1) * d].iter().copied()).collect();
    let mut members = vec![Vec::with_capacity(cap); e];
    let mut sim = vec![0.0f32; h * e];
    let mut pairs: Vec<(f32, u32, u32)> = Vec::with_capacity(h * e);
    for it in 0..iters.max(1) {
        progress("k-means", it, iters.max(1));
        matmul_bt(&mut sim, unit, h, d, &centroids, e);
        pairs.clear();
        pairs.extend(sim.chunks_exact(e).enumerate().flat_map(|(i, s)| s.iter().enumerate().map(move |(c, &v)| (v, i as u32, c as u32))));
        pairs.sort_unstable_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2)));
        let mut taken = vec![false; h];
        members.iter_mut().for_each(Vec::clear);
        for &(_, i, c) in &pairs {
            let (i, c) = (i as usize, c as usize);
            if !taken[i] && members[c].len() < cap {
                taken[i] = true;
                members[c].push(i);
            }
        }
        centroids.fill(0.0);
        for (c, ms) in members.iter().enumerate() {
            for &i in ms {
                for (v, &u) in centroids[c * d..(c + 1) * d].iter_mut().zip(&unit[i * d..(i + 1) * d]) {
                    *v += u / cap as f32;
                }
            }
        }
    }
    progress("k-means", iters.max(1), iters.max(1));
    for ms in &mut members {
        ms.sort_unstable();
    }
    let mut cohesion = 0.0f64;
    for (c, ms) in members.iter().enumerate() {
        let cen = &centroids[c * d..(c + 1) * d];
        let norm = cen.iter().map(|v| v * v).sum::<f32>().sqrt().max(1e-12);
        for &i in ms {
            cohesion += (unit[i * d..(i + 1) * d].iter().zip(cen).map(|(a, b)| a * b).sum::<f32>() / norm) as f64;
        }
    }
    (members, centroids, (cohesion / h as f64) as f32)
}

/// Fits the MLP router (`router` params of `m`) to the targets `mass / max(mass)` on the first
/// `n_train` rows; returns the held-out BCE before and after.
#[allow(clippy::too_many_arguments)]
fn train_router(
    m: &mut Moefied,
    x: &[f32],
    mass: &[f32],
    n_train: usize,
    d: usize,
    e: usize,
    opts: &MoefyOptions,
    progress: Progress<'_>,
) -> Result<(f32, f32)> {
    let n = mass.len() / e;
    let target: Vec<f32> = mass
        .chunks_exact(e)
        .flat_map(|r| {
            let mx = r.iter().fold(0.0f32, |a, &b| a.max(b));
            r.iter().map(move |&v| if mx > 0.0 { v / mx } else { 0.0 })
        })
        .collect();
    let bce = |m: &Moefied, rows: std::ops::Range<usize>| -> f32 {
        let nb = rows.len();
        let mut s = vec![0.0f32; nb * e];
        m.router_scores(&x[rows.start * d..rows.end * d], nb, &mut Vec::new(), &mut s);
        let t = &target[rows.start * e..rows.end * e];
        (s.iter().zip(t).map(|(&z, &y)| (z.max(0.0) - z * y + (-z.abs()).exp().ln_1p()) as f64).sum::<f64>() / (nb * e).max(1) as f64) as f32
    };
    let before = bce(m, n_train..n);
    // Adam with PyTorch's defaults, as the reference trains its router
    let mut opt = AdamW::new(0.0);
    let (mut g1, mut gc1, mut g2, mut gc2) = (vec![0.0f32; e * d], vec![0.0f32; e], vec![0.0f32; e * e], vec![0.0f32; e]);
    let bs = opts.batch.max(1);
    let (mut hid, mut z, mut dz, mut du) = (vec![0.0f32; bs * e], vec![0.0f32; bs * e], vec![0.0f32; bs * e], vec![0.0f32; bs * e]);
    let mut order: Vec<usize> = (0..n_train).collect();
    let mut rng = Rng::new(opts.seed).fork(0x7a1);
    let mut xb = vec![0.0f32; bs * d];
    for epoch in 0..opts.epochs {
        progress("router", epoch, opts.epochs);
        rng.shuffle(&mut order);
        for chunk in order.chunks(bs) {
            let nb = chunk.len();
            for (r, &i) in chunk.iter().enumerate() {
                xb[r * d..(r + 1) * d].copy_from_slice(&x[i * d..(i + 1) * d]);
            }
            let xr = &xb[..nb * d];
            // forward: u = tanh(x R1ᵀ + c1), z = u R2ᵀ + c2
            let (r1, c1, r2, c2) = (&m.router[0].value, &m.router[1].value, &m.router[2].value, &m.router[3].value);
            let u = &mut hid[..nb * e];
            matmul_bt(u, xr, nb, d, r1, e);
            for row in u.chunks_exact_mut(e) {
                row.iter_mut().zip(c1).for_each(|(v, &b)| *v = (*v + b).tanh());
            }
            let zz = &mut z[..nb * e];
            matmul_bt(zz, u, nb, e, r2, e);
            // dL/dz of the mean BCE
            let scale = 1.0 / (nb * e) as f32;
            for (r, &i) in chunk.iter().enumerate() {
                for c in 0..e {
                    let zv = zz[r * e + c] + c2[c];
                    dz[r * e + c] = (1.0 / (1.0 + (-zv).exp()) - target[i * e + c]) * scale;
                }
            }
            let dzr = &dz[..nb * e];
            matmul(MatMut::new(&mut g2, e, e), MatRef::new(dzr, nb, e).t(), MatRef::new(u, nb, e), false);
            gc2.fill(0.0);
            add_sum_rows(dzr, e, &mut gc2);
            let dur = &mut du[..nb * e];
            matmul(MatMut::new(dur, nb, e), MatRef::new(dzr, nb, e), MatRef::new(r2, e, e), false);
            for (dv, &uv) in dur.iter_mut().zip(u.iter()) {
                *dv *= 1.0 - uv * uv;
            }
            matmul(MatMut::new(&mut g1, e, d), MatRef::new(dur, nb, e).t(), MatRef::new(xr, nb, d), false);
            gc1.fill(0.0);
            add_sum_rows(dur, e, &mut gc1);
            for (p, g) in m.router.iter_mut().zip([&g1, &gc1, &g2, &gc2]) {
                p.grad.copy_from_slice(g);
            }
            opt.step(&mut |f| m.router.iter_mut().for_each(&mut *f), opts.lr, 1.0);
        }
    }
    progress("router", opts.epochs, opts.epochs);
    Ok((before, bce(m, n_train..n)))
}

/// [`moefy`] on a classifier's layer with its training inputs as calibration data; the
/// converted classifier.
pub fn moefy_classifier(model: &Classifier, calib: &Dataset, opts: &MoefyOptions, progress: Progress<'_>) -> Result<(Classifier, MoefyReport)> {
    crate::error::check_dim("calibration data", "features", model.config().in_features, calib.dim)?;
    let (layer, report) = moefy(model.layer(), &calib.x, calib.len(), opts, progress)?;
    Ok((Classifier::from_layer(Box::new(layer)), report))
}

/// A MoEfied classifier running `k` experts per input (same weights); an error for other layers.
pub fn classifier_with_k(model: &Classifier, k: usize) -> Result<Classifier> {
    match &model.config().layer {
        LayerConfig::Moefied(c) => {
            crate::layers::moe::check_mixture(c.experts, c.expert_width, k, "moefied")?;
            model.with_layer_config(LayerConfig::Moefied(MoefiedConfig { k, ..c.clone() }))
        }
        other => Err(Error::Invalid(format!("the model's layer is {}, not moefied", other.kind()))),
    }
}

/// [`moefy`] on every FFN of a language model, each calibrated on the inputs it sees over
/// `windows` evenly spaced windows of `tokens` (the training text); the FFNs are replaced in
/// place. One report per block.
pub fn moefy_lm(lm: &mut Lm, tokens: &[u32], seq_len: usize, windows: usize, opts: &MoefyOptions, progress: Progress<'_>) -> Result<Vec<MoefyReport>> {
    let t = seq_len.min(lm.config().context);
    if tokens.len() <= t || windows == 0 {
        return Err(Error::Invalid(format!("moefy: {} tokens for windows of {t}", tokens.len())));
    }
    let span = tokens.len() - t;
    let starts: Vec<usize> = (0..windows).map(|i| i * span / windows).collect();
    let blocks = lm.config().layers;
    let mut inputs = vec![Vec::new(); blocks];
    for (i, chunk) in starts.chunks(16).enumerate() {
        progress("calibration", i * 16, windows);
        let ids: Vec<u32> = chunk.iter().flat_map(|&s| tokens[s..s + t].iter().copied()).collect();
        for (all, x) in inputs.iter_mut().zip(lm.ffn_inputs(&ids, chunk.len(), t)?) {
            all.extend(x);
        }
    }
    let d = lm.config().d_model;
    let mut layers: Vec<Box<dyn Layer>> = Vec::with_capacity(blocks);
    let mut reports = Vec::with_capacity(blocks);
    for (l, x) in inputs.iter().enumerate() {
        let ffn = lm.ffn(l).ok_or_else(|| Error::Invalid(format!("lm has no block {l}")))?;
        let (m, r) = moefy(ffn, x, x.len() / d, opts, progress)?;
        layers.push(Box::new(m));
        reports.push(r);
    }
    let cfg = layers[0].config();
    lm.replace_ffns(cfg, layers)?;
    Ok(reports)
}

/// Sets the experts every MoEfied FFN of `lm` runs (same weights); an error for other FFNs.
pub fn lm_set_k(lm: &mut Lm, k: usize) -> Result<()> {
    let LayerConfig::Moefied(c) = lm.config().ffn.clone() else {
        return Err(Error::Invalid(format!("the model's FFN is {}, not moefied", lm.config().ffn.kind())));
    };
    crate::layers::moe::check_mixture(c.experts, c.expert_width, k, "moefied")?;
    let cfg = LayerConfig::Moefied(MoefiedConfig { k, ..c });
    let d = lm.config().d_model;
    let mut layers: Vec<Box<dyn Layer>> = Vec::new();
    for l in 0..lm.config().layers {
        let src = lm.ffn(l).ok_or_else(|| Error::Invalid(format!("lm has no block {l}")))?;
        let mut new = cfg.build(d, d, &mut Rng::new(0))?;
        crate::layers::copy_params(src, new.as_mut())?;
        layers.push(new);
    }
    lm.replace_ffns(cfg, layers)
}

/// Fine-tunes a converted classifier's experts (the router stays fixed) for `epochs` passes
/// over `split.train` with the original run's recipe (`run`) at a tenth of its learning rate
/// and no warmup: MoEfication's recovery step. Returns the test accuracy after.
pub fn finetune_classifier(model: &mut Classifier, split: &crate::data::Split, run: &crate::config::TrainConfig, epochs: usize) -> Result<f32> {
    let mut opts = run.train_options();
    opts.epochs = epochs;
    opts.lr *= 0.1;
    opts.warmup = 0;
    opts.save_every = 0;
    let report = crate::train::backprop::train(model, split, &opts, &mut crate::train::backprop::Silent)?;
    Ok(report.test_accuracy)
}
