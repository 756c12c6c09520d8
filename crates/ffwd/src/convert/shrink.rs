//! Conversions that shrink a trained layer: `lowrank` (truncated SVD of a dense FFN's maps
//! into the LowRank layer) and `prune-experts` (drop a mixture's least-used experts).

use serde::{Deserialize, Serialize};

use crate::core::svd::svd_truncated;
use crate::core::Rng;
use crate::data::Dataset;
use crate::error::{Error, Result};
use crate::layers::{Layer, LayerConfig, LowRankConfig};
use crate::models::{Classifier, Lm};

/// How the rank of a [`lowrank`] conversion is chosen.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RankChoice {
    /// This rank for both maps (clamped to each map's smaller side).
    Rank(usize),
    /// The smallest rank that keeps this fraction of each map's squared singular values
    /// (its energy); the layer uses the larger of the two maps' ranks.
    Energy(f32),
}

/// What a low-rank conversion did to one layer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LowRankReport {
    /// The rank used.
    pub rank: usize,
    /// Fraction of each map's energy kept (fc1, fc2).
    pub energy: [f32; 2],
    /// Relative Frobenius error of each map (fc1, fc2).
    pub rel_error: [f32; 2],
    /// Parameters before and after.
    pub params: [usize; 2],
}

/// A dense two-map FFN (`in → h → out`) as a LowRank layer: each map `W` replaced by its
/// truncated SVD `U_r √S_r · √S_r V_rᵀ` (the layer's own init rule, applied to the trained
/// weights), biases kept.
pub fn lowrank(layer: &dyn Layer, choice: RankChoice) -> Result<(Box<dyn Layer>, LowRankReport)> {
    let LayerConfig::Dense(dc) = layer.config() else {
        return Err(Error::Invalid(format!("lowrank converts dense FFNs, this layer is {}", layer.kind())));
    };
    if dc.layers != 2 {
        return Err(Error::Invalid(format!("lowrank converts dense FFNs of two maps, this one has {}", dc.layers)));
    }
    let (d, h, o) = (layer.in_features(), dc.width, layer.out_features());
    let p = layer.params();
    let maps = [(&p[0].value, h, d), (&p[2].value, o, h)];
    let mut rng = Rng::new(0x10e4);
    // full spectra (exact when r = min(m, n)) to pick the rank and report the energy kept
    let svds: Vec<_> = maps.iter().map(|&(w, m, n)| svd_truncated(w, m, n, m.min(n), &mut rng)).collect();
    let energy_rank = |s: &[f32], f: f32| {
        let total: f64 = s.iter().map(|&v| (v as f64).powi(2)).sum();
        let mut acc = 0.0f64;
        for (i, &v) in s.iter().enumerate() {
            acc += (v as f64).powi(2);
            if acc >= f as f64 * total {
                return i + 1;
            }
        }
        s.len()
    };
    let rank = match choice {
        RankChoice::Rank(r) if r > 0 => r,
        RankChoice::Rank(_) => return Err(Error::Invalid("lowrank: the rank must be positive".into())),
        RankChoice::Energy(f) if f > 0.0 && f <= 1.0 => svds.iter().map(|(_, s, _)| energy_rank(s, f)).max().unwrap_or(1),
        RankChoice::Energy(f) => return Err(Error::Invalid(format!("lowrank: the energy must be in (0, 1], got {f}"))),
    };
    let cfg = LowRankConfig { width: h, rank, activation: dc.activation, guide: None };
    let mut out = LayerConfig::LowRank(cfg.clone()).build(d, o, &mut rng)?;
    let mut energy = [0.0f32; 2];
    let mut rel_error = [0.0f32; 2];
    let mut values: Vec<Vec<f32>> = Vec::new();
    for (mi, ((u, s, vt), &(w, m, n))) in svds.iter().zip(&maps).enumerate() {
        let r = cfg.rank_of(m, n);
        let root: Vec<f32> = s[..r].iter().map(|v| v.sqrt()).collect();
        let full = s.len();
        let uu: Vec<f32> = (0..m * r).map(|i| u[(i / r) * full + i % r] * root[i % r]).collect();
        let vv: Vec<f32> = (0..r * n).map(|i| root[i / n] * vt[i]).collect();
        let total: f64 = s.iter().map(|&v| (v as f64).powi(2)).sum();
        let kept: f64 = s[..r].iter().map(|&v| (v as f64).powi(2)).sum();
        energy[mi] = (kept / total.max(1e-30)) as f32;
        // ‖W − U V‖ / ‖W‖
        let mut err = 0.0f64;
        for i in 0..m {
            for j in 0..n {
                let approx: f32 = (0..r).map(|c| uu[i * r + c] * vv[c * n + j]).sum();
                err += ((w[i * n + j] - approx) as f64).powi(2);
            }
        }
        let norm: f64 = w.iter().map(|&v| (v as f64).powi(2)).sum();
        rel_error[mi] = (err / norm.max(1e-30)).sqrt() as f32;
        // parameter order: v, u, bias
        values.push(vv);
        values.push(uu);
        values.push(p[2 * mi + 1].value.clone());
    }
    let mut it = values.into_iter();
    let mut shapes_ok = true;
    out.visit_params_mut(&mut |q| match it.next() {
        Some(v) if v.len() == q.value.len() => q.value = v,
        _ => shapes_ok = false,
    });
    if !shapes_ok {
        return Err(Error::Invalid("lowrank: factor shapes do not match the layer".into()));
    }
    let before = p.iter().map(|q| q.len()).sum();
    let after = out.params().iter().map(|q| q.len()).sum();
    Ok((out, LowRankReport { rank, energy, rel_error, params: [before, after] }))
}

/// [`lowrank`] on every FFN of a language model (one rank for all: the largest any block's
/// `choice` asks for); the FFNs are replaced in place.
pub fn lowrank_lm(lm: &mut Lm, choice: RankChoice) -> Result<Vec<LowRankReport>> {
    let blocks = lm.config().layers;
    fn ffn(lm: &Lm, l: usize) -> Result<&dyn Layer> {
        lm.ffn(l).ok_or_else(|| Error::Invalid(format!("lm has no block {l}")))
    }
    // with an energy target, find each block's rank first and use the largest for all
    let choice = match choice {
        RankChoice::Energy(_) => {
            let mut r = 0;
            for l in 0..blocks {
                r = r.max(lowrank(ffn(lm, l)?, choice)?.1.rank);
            }
            RankChoice::Rank(r)
        }
        c => c,
    };
    let mut layers = Vec::with_capacity(blocks);
    let mut reports = Vec::with_capacity(blocks);
    for l in 0..blocks {
        let (layer, report) = lowrank(ffn(lm, l)?, choice)?;
        layers.push(layer);
        reports.push(report);
    }
    let cfg = layers[0].config();
    lm.replace_ffns(cfg, layers)?;
    Ok(reports)
}

/// What [`prune_experts`] kept.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PruneReport {
    /// Inputs routed to each expert on the calibration data (each of an input's k experts
    /// counts), before pruning.
    pub counts: Vec<u64>,
    /// The experts kept, in their original order.
    pub kept: Vec<usize>,
    /// Share of the routed slots the kept experts received.
    pub kept_share: f32,
}

/// A mixture classifier (`moe`, `smoe`, `moefied` with the centroid router) with only the
/// `keep` experts its router sends most calibration inputs to (UNCURL-style task-specific
/// pruning). The router's rows of the dropped experts go with them, so a softmax router
/// renormalises over the kept ones; `k` is capped at `keep`.
pub fn prune_experts(model: &Classifier, calib: &Dataset, keep: usize) -> Result<(Classifier, PruneReport)> {
    let layer = &model.config().layer;
    let experts = match layer {
        LayerConfig::Moe(c) => c.experts,
        LayerConfig::Smoe(c) => c.experts,
        LayerConfig::Moefied(c) if c.router == crate::layers::MoefiedRouter::Centroid => c.experts,
        other => {
            return Err(Error::Invalid(format!(
                "prune-experts prunes moe, smoe and centroid-routed moefied layers, this one is {}{}",
                other.kind(),
                if other.kind() == "moefied" { " with the MLP router (its hidden units mix every expert's score)" } else { "" }
            )))
        }
    };
    if keep == 0 || keep > experts {
        return Err(Error::Invalid(format!("--keep must be in 1..={experts} (the experts), got {keep}")));
    }
    crate::error::check_dim("calibration data", "features", model.config().in_features, calib.dim)?;
    let mut counts = Vec::new();
    model.kernel()?.route_usage(&calib.x, calib.len(), &mut counts);
    counts.resize(experts, 0);
    let mut order: Vec<usize> = (0..experts).collect();
    order.sort_by(|&a, &b| counts[b].cmp(&counts[a]).then(a.cmp(&b)));
    let mut kept = order[..keep].to_vec();
    kept.sort_unstable();
    let total: u64 = counts.iter().sum();
    let kept_share = kept.iter().map(|&e| counts[e]).sum::<u64>() as f32 / total.max(1) as f32;
    let cfg = match layer.clone() {
        LayerConfig::Moe(c) => LayerConfig::Moe(crate::layers::MoeConfig { experts: keep, k: c.k.min(keep), ..c }),
        LayerConfig::Smoe(c) => LayerConfig::Smoe(crate::layers::SmoeConfig { experts: keep, k: c.k.min(keep), ..c }),
        LayerConfig::Moefied(c) => LayerConfig::Moefied(crate::layers::MoefiedConfig { experts: keep, k: c.k.min(keep), ..c }),
        other => other,
    };
    let mut pruned = Classifier::new(crate::models::ModelConfig { layer: cfg, ..model.config().clone() }, 0)?;
    // every parameter indexed by expert has the expert as its first axis; the shared output
    // bias `b2` is copied
    let src = model.layer().params();
    let mut it = src.iter();
    let mut ok = true;
    pruned.visit_params_mut(&mut |p| {
        let Some(s) = it.next() else {
            ok = false;
            return;
        };
        if s.name != "b2" && s.shape.first() == Some(&experts) && p.shape.first() == Some(&keep) {
            let row = s.row_len();
            p.value = kept.iter().flat_map(|&e| s.value[e * row..(e + 1) * row].iter().copied()).collect();
        } else if s.shape == p.shape {
            p.value.clone_from(&s.value);
        } else {
            ok = false;
        }
    });
    if !ok {
        return Err(Error::Invalid("prune-experts: parameter shapes do not line up".into()));
    }
    Ok((pruned, PruneReport { counts, kept, kept_share }))
}
