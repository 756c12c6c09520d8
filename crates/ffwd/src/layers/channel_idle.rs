//! Channel-idle FFN (RePaViT, 2025, code Ackesnal/RePaViT): batch normalisation before each
//! linear map, and only the first `⌈(1 − θ)·H⌉` hidden channels pass the activation; the
//! other ("idle") channels stay linear:
//!
//! `a = BN1(x)`, `z = W1 a + b1`, `h = [act(z_active); z_idle]`, `y = W2 BN2(h) + b2`.
//!
//! At inference the batch norms (running estimates) fold into the maps, and the idle channels
//! collapse into one linear map: `y = W2'_a act(W1'_a x + b1'_a) + W_lin x + b_lin` with
//! `W_lin = W2'_idle W1'_idle` (`out × in`). At `H = 4C`, `θ = 0.75` a `C → C` block costs
//! `C·2C + C²` = 3C² multiply-adds instead of 8C² (in a residual block RePaViT also folds the
//! identity into `W_lin`; here the residual, if any, belongs to the model around the layer).
//!
//! Parameters: `bn1.*` (in), `fc1.weight` (`H × in`), `fc1.bias`, `bn2.*` (`H`), `fc2.weight`
//! (`out × H`), `fc2.bias`; each `bn*` is weight, bias, running_mean, running_var.

use serde::{Deserialize, Serialize};

use super::batch_norm::BatchNorm;
use super::{ensure_len, Compile, Input, Layer, LayerConfig, Linear, Trainable};
use crate::core::gemm::{matmul, MatMut, MatRef};
use crate::core::{Activation, Param, Rng};
use crate::error::{check_matrix, Error, Result};
use crate::kernels::{check_io, DenseKernel, InferKernel, Workspace};

/// Configuration of [`ChannelIdle`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ChannelIdleConfig {
    /// Hidden channels H.
    pub width: usize,
    /// Idle share θ: the last `H − ⌈(1 − θ)·H⌉` channels stay linear.
    pub theta: f32,
    /// Nonlinearity of the active channels.
    pub activation: Activation,
}

impl Default for ChannelIdleConfig {
    fn default() -> Self {
        ChannelIdleConfig { width: 512, theta: 0.75, activation: Activation::Gelu }
    }
}

impl ChannelIdleConfig {
    /// Active channels `⌈(1 − θ)·H⌉`.
    pub fn active(&self) -> usize {
        ((1.0 - self.theta as f64) * self.width as f64).ceil() as usize
    }

    /// Scalars of the parameters of a layer `i → o`.
    pub fn param_count(&self, i: usize, o: usize) -> Option<usize> {
        let h = self.width;
        let bn = |n: usize| n.checked_mul(4);
        bn(i)?.checked_add(h.checked_mul(i.checked_add(1)?)?)?.checked_add(bn(h)?)?.checked_add(o.checked_mul(h.checked_add(1)?)?)
    }
}

/// A channel-idle feedforward layer.
#[derive(Clone, Debug)]
pub struct ChannelIdle {
    cfg: ChannelIdleConfig,
    bn1: BatchNorm,
    fc1: Linear,
    bn2: BatchNorm,
    fc2: Linear,
    a: Vec<f32>,
    z: Vec<f32>,
    h: Vec<f32>,
    b: Vec<f32>,
    db: Vec<f32>,
    dh: Vec<f32>,
    da: Vec<f32>,
}

impl ChannelIdle {
    /// A new layer `in_features → width → out_features`.
    pub fn new(cfg: ChannelIdleConfig, in_features: usize, out_features: usize, rng: &mut Rng) -> Result<Self> {
        if cfg.width == 0 || !(0.0..1.0).contains(&cfg.theta) {
            return Err(Error::Config(format!("channelidle.width must be positive and theta in [0, 1), got {} and {}", cfg.width, cfg.theta)));
        }
        let mut bn1 = BatchNorm::new("bn1", in_features);
        let mut bn2 = BatchNorm::new("bn2", cfg.width);
        for bn in [&mut bn1, &mut bn2] {
            // running estimates: no gradient, no update, no noise (an empty sparse row set)
            bn.running_mean.track_rows();
            bn.running_var.track_rows();
        }
        let fc1 = Linear::new("fc1", in_features, cfg.width, rng);
        let fc2 = Linear::new("fc2", cfg.width, out_features, rng);
        Ok(ChannelIdle { cfg, bn1, fc1, bn2, fc2, a: vec![], z: vec![], h: vec![], b: vec![], db: vec![], dh: vec![], da: vec![] })
    }

    /// The inference form with every batch norm folded: the active channels' maps and the
    /// idle channels' single linear map.
    pub fn folded(&self) -> FoldedChannelIdle {
        let (i, h, o) = (self.in_features(), self.cfg.width, self.out_features());
        let k = self.cfg.active();
        let (s1, t1) = self.bn1.affine();
        let (s2, t2) = self.bn2.affine();
        let (w1f, b1f) = fold(&self.fc1, &s1, &t1);
        let (w2f, b2f) = fold(&self.fc2, &s2, &t2);
        // idle: W_lin = W2'[:, idle] W1'[idle, :], b_lin = W2'[:, idle] b1'[idle] (+ b2')
        let mut lin = vec![0.0f32; o * i];
        let mut lin_b = b2f.clone();
        for r in 0..o {
            for j in k..h {
                let w = w2f[r * h + j];
                lin_b[r] += w * b1f[j];
                for c in 0..i {
                    lin[r * i + c] += w * w1f[j * i + c];
                }
            }
        }
        let active1: Vec<f32> = w1f[..k * i].to_vec();
        let active2: Vec<f32> = (0..o).flat_map(|r| w2f[r * h..r * h + k].to_vec()).collect();
        FoldedChannelIdle { active1, active1_b: b1f[..k].to_vec(), active2, lin, lin_b, dims: (i, k, o), activation: self.cfg.activation }
    }
}

/// A linear map after an affine one, `W (s ⊙ x + t) + b`, as one map: `W diag(s)` and `W t + b`.
fn fold(l: &Linear, s: &[f32], t: &[f32]) -> (Vec<f32>, Vec<f32>) {
    let (i, o) = (l.in_features(), l.out_features());
    let w = &l.weight.value;
    let mut wf = vec![0.0f32; o * i];
    let mut bf = l.bias.value.clone();
    for r in 0..o {
        for c in 0..i {
            wf[r * i + c] = w[r * i + c] * s[c];
            bf[r] += w[r * i + c] * t[c];
        }
    }
    (wf, bf)
}

/// A channel-idle layer with its batch norms folded (see [`ChannelIdle::folded`]).
pub struct FoldedChannelIdle {
    /// `k × in`.
    pub active1: Vec<f32>,
    /// `k`.
    pub active1_b: Vec<f32>,
    /// `out × k`.
    pub active2: Vec<f32>,
    /// `out × in`.
    pub lin: Vec<f32>,
    /// `out` (includes the output bias).
    pub lin_b: Vec<f32>,
    /// `(in, k, out)`.
    pub dims: (usize, usize, usize),
    /// Activation of the active channels.
    pub activation: Activation,
}

impl Layer for ChannelIdle {
    fn kind(&self) -> &'static str {
        "channelidle"
    }

    fn in_features(&self) -> usize {
        self.fc1.in_features()
    }

    fn out_features(&self) -> usize {
        self.fc2.out_features()
    }

    fn config(&self) -> LayerConfig {
        LayerConfig::ChannelIdle(self.cfg.clone())
    }
}

impl Trainable for ChannelIdle {
    fn forward_train(&mut self, input: Input<'_>, y: &mut [f32], _rng: &mut Rng) -> Result<()> {
        let (x, batch) = (input.x, input.batch);
        let (i, h, o, k) = (self.in_features(), self.cfg.width, self.out_features(), self.cfg.active());
        check_matrix("channelidle input x", x.len(), batch, i)?;
        check_matrix("channelidle output y", y.len(), batch, o)?;
        for (buf, n) in [(&mut self.a, batch * i), (&mut self.z, batch * h), (&mut self.h, batch * h), (&mut self.b, batch * h)] {
            ensure_len(buf, n);
        }
        self.bn1.forward_train(x, batch, &mut self.a[..batch * i]);
        self.fc1.forward(&self.a[..batch * i], batch, &mut self.z[..batch * h]);
        for (zr, hr) in self.z[..batch * h].chunks_exact(h).zip(self.h[..batch * h].chunks_exact_mut(h)) {
            hr.copy_from_slice(zr);
            self.cfg.activation.apply_inplace(&mut hr[..k]);
        }
        self.bn2.forward_train(&self.h[..batch * h], batch, &mut self.b[..batch * h]);
        self.fc2.forward(&self.b[..batch * h], batch, &mut y[..batch * o]);
        Ok(())
    }

    fn backward(&mut self, input: Input<'_>, dy: &[f32], dx: Option<&mut [f32]>) -> Result<()> {
        let (x, batch) = (input.x, input.batch);
        let (i, h, o, k) = (self.in_features(), self.cfg.width, self.out_features(), self.cfg.active());
        check_matrix("channelidle input x", x.len(), batch, i)?;
        check_matrix("channelidle output gradient dy", dy.len(), batch, o)?;
        for (buf, n) in [(&mut self.db, batch * h), (&mut self.dh, batch * h), (&mut self.da, batch * i)] {
            ensure_len(buf, n);
        }
        self.fc2.backward(&self.b[..batch * h], batch, dy, Some(&mut self.db[..batch * h]), false);
        self.bn2.backward(&self.db[..batch * h], batch, &mut self.dh[..batch * h]);
        // through the activation of the active channels only
        for (zr, dr) in self.z[..batch * h].chunks_exact(h).zip(self.dh[..batch * h].chunks_exact_mut(h)) {
            self.cfg.activation.backward_inplace(&zr[..k], &mut dr[..k]);
        }
        self.fc1.backward(&self.a[..batch * i], batch, &self.dh[..batch * h], Some(&mut self.da[..batch * i]), false);
        match dx {
            Some(dx) => {
                check_matrix("channelidle input gradient dx", dx.len(), batch, i)?;
                self.bn1.backward(&self.da[..batch * i], batch, dx);
            }
            None => {
                // the batch norm's parameter gradients still need its backward
                let mut scratch = std::mem::take(&mut self.dh);
                ensure_len(&mut scratch, batch * i);
                self.bn1.backward(&self.da[..batch * i], batch, &mut scratch[..batch * i]);
                self.dh = scratch;
            }
        }
        Ok(())
    }

    fn params(&self) -> Vec<&Param> {
        let mut v: Vec<&Param> = self.bn1.params().to_vec();
        v.extend([&self.fc1.weight, &self.fc1.bias]);
        v.extend(self.bn2.params());
        v.extend([&self.fc2.weight, &self.fc2.bias]);
        v
    }

    fn visit_params_mut(&mut self, f: &mut dyn FnMut(&mut Param)) {
        self.bn1.visit_params_mut(f);
        f(&mut self.fc1.weight);
        f(&mut self.fc1.bias);
        self.bn2.visit_params_mut(f);
        f(&mut self.fc2.weight);
        f(&mut self.fc2.bias);
    }
}

impl Compile for ChannelIdle {
    fn kernel(&self) -> Box<dyn InferKernel> {
        Box::new(ChannelIdleKernel::new(self.folded()))
    }

    fn neurons_per_inference(&self) -> usize {
        self.cfg.active()
    }
}

/// Folded channel-idle inference: the active channels as a dense FFN, plus one `in → out`
/// product for the idle channels (and the output bias), accumulated into the same output.
pub struct ChannelIdleKernel {
    active: DenseKernel,
    /// `W_lin` transposed (`in × out`).
    lin_t: Vec<f32>,
    lin_b: Vec<f32>,
    dims: (usize, usize, usize),
}

impl ChannelIdleKernel {
    /// From a folded layer.
    pub fn new(f: FoldedChannelIdle) -> Self {
        let (i, k, o) = f.dims;
        let mut l1 = Linear::new("a1", i, k, &mut Rng::new(0));
        l1.weight.value = f.active1;
        l1.bias.value = f.active1_b;
        let mut l2 = Linear::new("a2", k, o, &mut Rng::new(0));
        l2.weight.value = f.active2;
        l2.bias.value = vec![0.0; o];
        let lin_t = crate::kernels::dense::transpose(&f.lin, o, i);
        ChannelIdleKernel { active: DenseKernel::new(&[l1, l2], f.activation), lin_t, lin_b: f.lin_b, dims: f.dims }
    }
}

impl InferKernel for ChannelIdleKernel {
    fn kind(&self) -> &'static str {
        "channelidle"
    }

    fn in_features(&self) -> usize {
        self.dims.0
    }

    fn out_features(&self) -> usize {
        self.dims.2
    }

    fn forward(&self, x: &[f32], batch: usize, y: &mut [f32], ws: &mut Workspace) -> Result<()> {
        check_io(self, x, batch, y)?;
        let (i, _, o) = self.dims;
        // at least one channel is active (θ < 1)
        self.active.forward(x, batch, y, ws)?;
        for row in y.chunks_exact_mut(o) {
            row.iter_mut().zip(&self.lin_b).for_each(|(v, b)| *v += b);
        }
        matmul(MatMut::new(y, batch, o), MatRef::new(x, batch, i), MatRef::new(&self.lin_t, i, o), true);
        Ok(())
    }

    fn neurons_per_inference(&self) -> usize {
        self.dims.1
    }

    fn macs_per_sample(&self) -> usize {
        let (i, k, o) = self.dims;
        k * (i + o) + i * o
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The training form in evaluation mode (running estimates), written out unfused.
    fn eval_unfused(l: &ChannelIdle, x: &[f32], batch: usize) -> Vec<f32> {
        let (i, h, o, k) = (l.in_features(), l.cfg.width, l.out_features(), l.cfg.active());
        let bn = |bn: &BatchNorm, v: &mut [f32], n: usize| {
            for row in v.chunks_exact_mut(n) {
                for (j, x) in row.iter_mut().enumerate() {
                    let (m, var) = (bn.running_mean.value[j], bn.running_var.value[j]);
                    *x = (*x - m) / (var + super::super::batch_norm::EPS).sqrt() * bn.gamma.value[j] + bn.beta.value[j];
                }
            }
        };
        let mut a = x.to_vec();
        bn(&l.bn1, &mut a, i);
        let mut z = vec![0.0; batch * h];
        l.fc1.forward(&a, batch, &mut z);
        for row in z.chunks_exact_mut(h) {
            l.cfg.activation.apply_inplace(&mut row[..k]);
        }
        bn(&l.bn2, &mut z, h);
        let mut y = vec![0.0; batch * o];
        l.fc2.forward(&z, batch, &mut y);
        y
    }

    #[test]
    fn folded_kernel_equals_the_training_form() {
        let (i, o) = (12, 5);
        for theta in [0.0, 0.5, 0.75, 0.9] {
            let cfg = ChannelIdleConfig { width: 16, theta, activation: Activation::Gelu };
            let mut l = ChannelIdle::new(cfg, i, o, &mut Rng::new(1)).unwrap();
            // a few training forwards move the running estimates away from 0 and 1
            let mut rng = Rng::new(2);
            for _ in 0..5 {
                let x: Vec<f32> = (0..32 * i).map(|_| 2.0 * rng.normal() + 0.5).collect();
                l.forward_train(Input::new(&x, 32), &mut vec![0.0; 32 * o], &mut rng).unwrap();
            }
            assert!(l.bn1.running_mean.value.iter().any(|&m| m.abs() > 0.05));
            let x: Vec<f32> = (0..9 * i).map(|_| rng.normal()).collect();
            let want = eval_unfused(&l, &x, 9);
            for batch in [1, 9] {
                let mut y = vec![0.0; batch * o];
                l.kernel().forward(&x[..batch * i], batch, &mut y, &mut Workspace::new()).unwrap();
                for (a, b) in y.iter().zip(&want) {
                    assert!((a - b).abs() <= 1e-5 * (1.0 + b.abs()), "theta {theta}: folded {a} vs {b}");
                }
            }
            assert_eq!(l.kernel().macs_per_sample(), cfg_macs(16, theta, i, o));
        }
    }

    fn cfg_macs(h: usize, theta: f32, i: usize, o: usize) -> usize {
        let k = ((1.0 - theta as f64) * h as f64).ceil() as usize;
        k * (i + o) + i * o
    }
}
