//! Product-key memory (Lample et al. 2019, "Large Memory Layers with Product Keys", in the
//! feedforward framing of Csordás et al. 2023): a query per head, two sub-key tables of `n`
//! keys, top-k over the Cartesian product, and a shared table of `n²` values. The lookup is in
//! [`crate::kernels::pkm`]. Lample's query BatchNorm is not included.
//!
//! Gradients reach only the selected values (their rows are recorded in `touched_rows`, so the
//! optimizer updates them lazily), the selected sub-keys, the query map and the input.
//!
//! Parameters: `query.weight` (`heads·key_dim × in`), `query.bias`, `keys1`, `keys2`
//! (`heads × n × key_dim/2`), `values` (`n² × out`), `bias` (`out`).

use serde::{Deserialize, Serialize};

use super::{ensure_len, Compile, Input, Layer, LayerConfig, Trainable};
use crate::core::gemm::{add_sum_rows, matmul, MatMut, MatRef};
use crate::core::simd::{axpy, dot};
use crate::core::{Param, Rng};
use crate::error::{check_matrix, Error, Result};
use crate::kernels::pkm::{queries_and_scores, select, PkmScoring, PkmShape, MAX_K};
use crate::kernels::{InferKernel, PkmKernel};

/// Configuration of [`Pkm`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PkmConfig {
    /// Sub-keys per half `n` (the memory holds `n²` values).
    pub n_keys: usize,
    /// Query heads sharing the value table.
    pub heads: usize,
    /// Values read per head.
    pub k: usize,
    /// Query width per head (even).
    pub key_dim: usize,
    /// ReLU (Csordás) or softmax (Lample) weights.
    pub scoring: PkmScoring,
}

impl Default for PkmConfig {
    fn default() -> Self {
        // 16² = 256 values, 2 heads × 8 reads = 16 values per sample (the FFF/MoE budget scale)
        PkmConfig { n_keys: 16, heads: 2, k: 8, key_dim: 32, scoring: PkmScoring::Relu }
    }
}

/// A product-key memory layer.
#[derive(Clone, Debug)]
pub struct Pkm {
    cfg: PkmConfig,
    shape: PkmShape,
    /// `heads·key_dim × in`.
    pub query_w: Param,
    /// `heads·key_dim`.
    pub query_b: Param,
    /// `heads × n × key_dim/2`.
    pub keys1: Param,
    /// `heads × n × key_dim/2`.
    pub keys2: Param,
    /// `n² × out`.
    pub values: Param,
    /// `out`.
    pub bias: Param,
    q: Vec<f32>,
    s: Vec<f32>,
    ds: Vec<f32>,
    dq: Vec<f32>,
    fs: Vec<f32>,
    /// Per (row, head, slot): value index, sub-key indices, score, weight.
    idx: Vec<u32>,
    sub1: Vec<u32>,
    sub2: Vec<u32>,
    score: Vec<f32>,
    weight: Vec<f32>,
}

impl Pkm {
    /// A new memory `in_features → out_features`.
    pub fn new(cfg: PkmConfig, in_features: usize, out_features: usize, rng: &mut Rng) -> Result<Self> {
        if cfg.n_keys == 0 || cfg.heads == 0 {
            return Err(Error::Config(format!("pkm.n_keys and pkm.heads must be positive, got {} and {}", cfg.n_keys, cfg.heads)));
        }
        if cfg.k == 0 || cfg.k > cfg.n_keys || cfg.k > MAX_K {
            return Err(Error::Config(format!("pkm.k must be in 1..={} (n_keys, at most {MAX_K}), got {}", cfg.n_keys.min(MAX_K), cfg.k)));
        }
        if cfg.key_dim < 2 || !cfg.key_dim.is_multiple_of(2) {
            return Err(Error::Config(format!("pkm.key_dim must be even and ≥ 2, got {}", cfg.key_dim)));
        }
        let shape = PkmShape { in_features, out_features, heads: cfg.heads, key_dim: cfg.key_dim, n_keys: cfg.n_keys, k: cfg.k };
        let (hd, half, n) = (cfg.heads * cfg.key_dim, cfg.key_dim / 2, cfg.n_keys);
        let qb = 1.0 / (in_features as f32).sqrt();
        let kb = 1.0 / (half as f32).sqrt();
        let mut values = Param::zeros("values", &[n * n, out_features], true);
        for v in &mut values.value {
            *v = rng.normal() / (out_features as f32).sqrt();
        }
        values.track_rows();
        Ok(Pkm {
            shape,
            query_w: Param::uniform("query.weight", &[hd, in_features], qb, true, rng),
            query_b: Param::uniform("query.bias", &[hd], qb, false, rng),
            keys1: Param::uniform("keys1", &[cfg.heads, n, half], kb, false, rng),
            keys2: Param::uniform("keys2", &[cfg.heads, n, half], kb, false, rng),
            values,
            bias: Param::zeros("bias", &[out_features], false),
            cfg,
            q: Vec::new(),
            s: Vec::new(),
            ds: Vec::new(),
            dq: Vec::new(),
            fs: Vec::new(),
            idx: Vec::new(),
            sub1: Vec::new(),
            sub2: Vec::new(),
            score: Vec::new(),
            weight: Vec::new(),
        })
    }

    /// The discrete lookup of every row: per head, both sub-key rankings and the selected value
    /// rows in score order (for tests that must know whether a perturbation changed them).
    pub fn routing(&self, x: &[f32], batch: usize) -> Result<Vec<u32>> {
        let PkmShape { in_features: d, heads, key_dim, n_keys: n, k, .. } = self.shape;
        check_matrix("pkm input x", x.len(), batch, d)?;
        let (hd, sw) = (heads * key_dim, self.shape.scores_per_row());
        let (mut q, mut s) = (vec![0.0; batch * hd], vec![0.0; batch * sw]);
        queries_and_scores(&self.shape, x, batch, &self.query_w.value, &self.query_b.value, &self.keys1.value, &self.keys2.value, &mut q, &mut s);
        let (mut idx, mut s1, mut s2, mut sc, mut w) = (vec![0u32; k], vec![0u32; k], vec![0u32; k], vec![0.0; k], vec![0.0; k]);
        let mut out = super::experts::rank_rows(&s, n);
        for b in 0..batch {
            for h in 0..heads {
                let row = &s[b * sw + 2 * h * n..b * sw + (2 * h + 2) * n];
                select(&row[..n], &row[n..], k, self.cfg.scoring, &mut idx, &mut s1, &mut s2, &mut sc, &mut w);
                out.extend_from_slice(&idx);
            }
        }
        Ok(out)
    }

    /// Value rows that hold gradient: read by a training forward since the last
    /// [`Param::zero_grad`] (unique, in first-use order).
    pub fn touched(&self) -> &[u32] {
        self.values.touched_rows.as_ref().map_or(&[], |s| s.rows())
    }
}

impl Layer for Pkm {
    fn kind(&self) -> &'static str {
        "pkm"
    }

    fn in_features(&self) -> usize {
        self.shape.in_features
    }

    fn out_features(&self) -> usize {
        self.shape.out_features
    }

    fn config(&self) -> LayerConfig {
        LayerConfig::Pkm(self.cfg.clone())
    }
}

impl Trainable for Pkm {
    fn forward_train(&mut self, input: Input<'_>, y: &mut [f32], _rng: &mut Rng) -> Result<()> {
        let (x, batch) = (input.x, input.batch);
        let PkmShape { in_features: d, out_features: o, heads, key_dim, n_keys: n, k } = self.shape;
        check_matrix("pkm input x", x.len(), batch, d)?;
        check_matrix("pkm output y", y.len(), batch, o)?;
        let (hd, sw) = (heads * key_dim, self.shape.scores_per_row());
        ensure_len(&mut self.q, batch * hd);
        ensure_len(&mut self.s, batch * sw);
        ensure_len(&mut self.fs, k);
        let slots = batch * heads * k;
        for v in [&mut self.idx, &mut self.sub1, &mut self.sub2] {
            if v.len() < slots {
                v.resize(slots, 0);
            }
        }
        ensure_len(&mut self.score, slots);
        ensure_len(&mut self.weight, slots);
        let (qw, qb, k1, k2) = (&self.query_w.value, &self.query_b.value, &self.keys1.value, &self.keys2.value);
        queries_and_scores(&self.shape, x, batch, qw, qb, k1, k2, &mut self.q, &mut self.s);
        for (b, yb) in y.chunks_exact_mut(o).enumerate() {
            yb.copy_from_slice(&self.bias.value);
            for h in 0..heads {
                let row = &self.s[b * sw + 2 * h * n..b * sw + (2 * h + 2) * n];
                let t = (b * heads + h) * k..(b * heads + h + 1) * k;
                select(
                    &row[..n],
                    &row[n..],
                    k,
                    self.cfg.scoring,
                    &mut self.idx[t.clone()],
                    &mut self.sub1[t.clone()],
                    &mut self.sub2[t.clone()],
                    &mut self.score[t.clone()],
                    &mut self.weight[t.clone()],
                );
                for s in t {
                    if self.weight[s] != 0.0 {
                        let r = self.idx[s] as usize;
                        axpy(self.weight[s], &self.values.value[r * o..(r + 1) * o], yb);
                    }
                }
            }
        }
        Ok(())
    }

    fn backward(&mut self, input: Input<'_>, dy: &[f32], dx: Option<&mut [f32]>) -> Result<()> {
        let (x, batch) = (input.x, input.batch);
        let PkmShape { in_features: d, out_features: o, heads, key_dim, n_keys: n, k } = self.shape;
        check_matrix("pkm input x", x.len(), batch, d)?;
        check_matrix("pkm output gradient dy", dy.len(), batch, o)?;
        if let Some(dx) = dx.as_deref() {
            check_matrix("pkm input gradient dx", dx.len(), batch, d)?;
        }
        let (hd, sw, half) = (heads * key_dim, self.shape.scores_per_row(), key_dim / 2);
        add_sum_rows(&dy[..batch * o], o, &mut self.bias.grad);
        // values: only the selected rows get gradient, and they join the parameter's row set
        let rows = self.values.touched_rows.get_or_insert_with(|| crate::core::RowSet::new(n * n));
        ensure_len(&mut self.ds, batch * sw);
        let ds = &mut self.ds[..batch * sw];
        ds.fill(0.0);
        for b in 0..batch {
            let dyb = &dy[b * o..(b + 1) * o];
            for h in 0..heads {
                let t = (b * heads + h) * k..(b * heads + h + 1) * k;
                // dL/dweight per slot (kept in fs, k floats)
                let dw = &mut self.fs[..k];
                for (j, s) in t.clone().enumerate() {
                    let r = self.idx[s] as usize;
                    dw[j] = dot(dyb, &self.values.value[r * o..(r + 1) * o]);
                    if self.weight[s] != 0.0 {
                        axpy(self.weight[s], dyb, &mut self.values.grad[r * o..(r + 1) * o]);
                    }
                    rows.insert(r as u32);
                }
                let w = &self.weight[t.clone()];
                let wdw: f32 = w.iter().zip(dw.iter()).map(|(a, b)| a * b).sum();
                for (j, s) in t.enumerate() {
                    let dscore = match self.cfg.scoring {
                        PkmScoring::Relu => {
                            if self.score[s] > 0.0 {
                                dw[j]
                            } else {
                                0.0
                            }
                        }
                        PkmScoring::Softmax => w[j] * (dw[j] - wdw),
                    };
                    let base = b * sw + 2 * h * n;
                    ds[base + self.sub1[s] as usize] += dscore;
                    ds[base + n + self.sub2[s] as usize] += dscore;
                }
            }
        }
        // sub-keys and queries: dK_a = dS_aᵀ Q_a, dQ_a = dS_a K_a
        ensure_len(&mut self.dq, batch * hd);
        let dq = &mut self.dq[..batch * hd];
        for h in 0..heads {
            for (a, (keys, grad)) in [(&self.keys1.value, &mut self.keys1.grad), (&self.keys2.value, &mut self.keys2.grad)].into_iter().enumerate() {
                let dsa = MatRef::strided(&ds[(2 * h + a) * n..], batch, n, sw, 1);
                let qa = MatRef::strided(&self.q[h * key_dim + a * half..], batch, half, hd, 1);
                matmul(MatMut::new(&mut grad[h * n * half..(h + 1) * n * half], n, half), dsa.t(), qa, true);
                let ka = MatRef::new(&keys[h * n * half..(h + 1) * n * half], n, half);
                matmul(MatMut::strided(&mut dq[h * key_dim + a * half..], batch, half, hd, 1), dsa, ka, false);
            }
        }
        matmul(MatMut::new(&mut self.query_w.grad, hd, d), MatRef::new(dq, batch, hd).t(), MatRef::new(x, batch, d), true);
        add_sum_rows(dq, hd, &mut self.query_b.grad);
        if let Some(dx) = dx {
            matmul(MatMut::new(dx, batch, d), MatRef::new(dq, batch, hd), MatRef::new(&self.query_w.value, hd, d), false);
        }
        Ok(())
    }

    fn params(&self) -> Vec<&Param> {
        vec![&self.query_w, &self.query_b, &self.keys1, &self.keys2, &self.values, &self.bias]
    }

    fn visit_params_mut(&mut self, f: &mut dyn FnMut(&mut Param)) {
        f(&mut self.query_w);
        f(&mut self.query_b);
        f(&mut self.keys1);
        f(&mut self.keys2);
        f(&mut self.values);
        f(&mut self.bias);
    }
}

impl Compile for Pkm {
    fn kernel(&self) -> Box<dyn InferKernel> {
        Box::new(PkmKernel::new(
            self.shape,
            self.cfg.scoring,
            &self.query_w.value,
            &self.query_b.value,
            &self.keys1.value,
            &self.keys2.value,
            &self.values.value,
            &self.bias.value,
        ))
    }

    fn neurons_per_inference(&self) -> usize {
        self.cfg.heads * self.cfg.k
    }
}
