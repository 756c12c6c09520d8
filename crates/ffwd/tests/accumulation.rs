//! Gradient accumulation: `accum = k, batch = b` trains on exactly the windows of
//! `accum = 1, batch = k·b`, and for every FFN without batch-level statistics or training-time
//! randomness the two runs end with the same parameters (up to rounding) after 20 steps. Also
//! the layer contract underneath: `backward` adds into the gradients, `zero_grad` clears them,
//! for every layer kind, sparse ones included.

use ffwd::core::{Activation, Rng};
use ffwd::data::text::{tiny_shakespeare, CharTokenizer};
use ffwd::layers::{DenseConfig, FffConfig, HashConfig, Input, Layer, LayerConfig, MoeConfig, PkmConfig, SmoeConfig, UfffConfig};
use ffwd::models::{Lm, LmConfig};
use ffwd::optim::AdamW;
use ffwd::train::lm::{train_lm, LmTrainOptions, LmTrainState, Quiet, TextData};

fn kinds() -> Vec<LayerConfig> {
    let gelu = Activation::Gelu;
    vec![
        LayerConfig::Dense(DenseConfig { width: 24, layers: 2, activation: gelu }),
        LayerConfig::Dense(DenseConfig { width: 12, layers: 3, activation: gelu }),
        LayerConfig::Fff(FffConfig { depth: 2, leaf: 6, activation: gelu, hardening: 1.0, ..Default::default() }),
        LayerConfig::Ufff(UfffConfig { depth: 4, trees: 1, activation: gelu, sparse_update: true }),
        LayerConfig::Ufff(UfffConfig { depth: 3, trees: 2, activation: gelu, sparse_update: false }),
        LayerConfig::Hash(HashConfig { experts: 4, expert_width: 6, activation: gelu, ..Default::default() }),
        LayerConfig::Pkm(PkmConfig { n_keys: 6, heads: 2, k: 3, key_dim: 8, ..Default::default() }),
    ]
}

/// Parameters after `steps` steps of `accum × batch` windows.
fn run(ffn: &LayerConfig, data: &TextData, vocab: usize, batch: usize, accum: usize, steps: usize) -> Vec<(String, Vec<f32>)> {
    let cfg = LmConfig { vocab, context: 16, d_model: 16, heads: 2, layers: 2, parallel: false, ffn: ffn.clone(), first_ffn: None };
    let mut lm = Lm::new(cfg, 7).unwrap();
    let opts = LmTrainOptions { steps, batch, accum, seq_len: 16, lr: 3e-3, warmup: 2, eval_every: 1000, eval_batches: 1, seed: 11, ..Default::default() };
    let mut opt = AdamW::new(0.0);
    train_lm(&mut lm, data, &opts, &mut opt, &mut LmTrainState::default(), None, None, &mut Quiet).unwrap();
    lm.named_params().into_iter().map(|(n, p)| (n, p.value.clone())).collect()
}

fn text() -> (TextData, usize) {
    let text: String = tiny_shakespeare().unwrap().chars().take(20_000).collect();
    let tok = CharTokenizer::from_text(&text).unwrap();
    (TextData::split(tok.encode(&text).unwrap(), 0.1, 16).unwrap(), tok.len())
}

/// Largest relative difference `‖a − b‖ / ‖b‖` over the parameter tensors, and its name.
///
/// The key part of the attention's `qkv.bias` (entries `d..2d`) is left out: softmax is
/// invariant to adding one constant to every score of a query, so the true gradient of the
/// key bias is exactly zero and what backward computes there is rounding noise, which AdamW's
/// normalised update turns into steps of ±lr whatever its size. Everything else is compared.
fn worst(a: &[(String, Vec<f32>)], b: &[(String, Vec<f32>)]) -> (f64, String) {
    let mut w = (0.0f64, String::new());
    for ((name, x), (_, y)) in a.iter().zip(b) {
        let (x, y): (Vec<f32>, Vec<f32>) = if name.ends_with("attn.qkv.bias") {
            let d = x.len() / 3;
            x.iter().zip(y).enumerate().filter(|(i, _)| !(d..2 * d).contains(i)).map(|(_, (p, q))| (*p, *q)).unzip()
        } else {
            (x.clone(), y.clone())
        };
        let d: f64 = x.iter().zip(&y).map(|(p, q)| ((p - q) as f64).powi(2)).sum::<f64>().sqrt();
        let n: f64 = y.iter().map(|q| (*q as f64).powi(2)).sum::<f64>().sqrt().max(1e-12);
        if d / n > w.0 {
            w = (d / n, name.clone());
        }
    }
    w
}

#[test]
fn accumulated_micro_batches_equal_one_large_batch() {
    let (data, vocab) = text();
    for ffn in kinds() {
        let big = run(&ffn, &data, vocab, 8, 1, 20);
        let acc = run(&ffn, &data, vocab, 4, 2, 20);
        let acc4 = run(&ffn, &data, vocab, 2, 4, 20);
        for (other, k) in [(&acc, 2), (&acc4, 4)] {
            let (rel, name) = worst(other, &big);
            assert!(rel <= 1e-5, "{}: accum {k} differs from one batch by {rel:.2e} (relative) in `{name}`", ffn.kind());
        }
        // and the runs did train: parameters moved away from the initialisation
        let init = run(&ffn, &data, vocab, 8, 1, 1);
        assert!(worst(&big, &init).0 > 1e-3, "{}: 20 steps barely moved the parameters", ffn.kind());
    }
}

/// Every layer: backward adds into `grad`, so two backwards of one batch give twice one, and
/// `zero_grad` really clears (sparse layers included: stale rows of an earlier batch are gone).
#[test]
fn backward_accumulates_and_zero_grad_clears_for_every_layer() {
    let gelu = Activation::Gelu;
    let mut all = kinds();
    all.push(LayerConfig::Moe(MoeConfig { experts: 4, expert_width: 5, k: 2, activation: gelu, ..Default::default() }));
    all.push(LayerConfig::Smoe(SmoeConfig { experts: 4, expert_width: 5, k: 2, activation: gelu, ..Default::default() }));
    for cfg in all {
        let (ni, no, batch) = (10, 6, 5);
        let mut layer = cfg.build(ni, no, &mut Rng::new(3)).unwrap();
        let rng = Rng::new(4);
        let pass = |layer: &mut Box<dyn Layer>, seed: u64| {
            let mut r = Rng::new(seed);
            let x: Vec<f32> = (0..batch * ni).map(|_| r.normal()).collect();
            let dy: Vec<f32> = (0..batch * no).map(|_| r.normal()).collect();
            let ids: Vec<u32> = (0..batch as u32).map(|i| i * 7 + seed as u32).collect();
            let mut y = vec![0.0; batch * no];
            layer.forward_train(Input::new(&x, batch).with_ids(&ids), &mut y, &mut rng.fork(seed)).unwrap();
            layer.backward(Input::new(&x, batch), &dy, None).unwrap();
        };
        let grads = |layer: &dyn Layer| -> Vec<Vec<f32>> { layer.params().iter().map(|p| p.grad.clone()).collect() };
        // a different batch first, so that sparse layers hold rows the next batch does not touch
        pass(&mut layer, 1);
        layer.zero_grad();
        assert!(grads(layer.as_ref()).iter().flatten().all(|&g| g == 0.0), "{}: zero_grad left gradient", cfg.kind());
        pass(&mut layer, 2);
        let once = grads(layer.as_ref());
        assert!(once.iter().flatten().any(|&g| g != 0.0), "{}: no gradient", cfg.kind());
        pass(&mut layer, 2);
        for (p, (g2, g1)) in layer.params().iter().zip(grads(layer.as_ref()).iter().zip(&once)) {
            for (a, b) in g2.iter().zip(g1) {
                assert!((a - 2.0 * b).abs() <= 1e-5 * (1.0 + b.abs()), "{} {}: second backward gave {a}, expected 2 × {b}", cfg.kind(), p.name);
            }
        }
        layer.zero_grad();
        pass(&mut layer, 2);
        for (p, (g, g1)) in layer.params().iter().zip(grads(layer.as_ref()).iter().zip(&once)) {
            assert_eq!(g, g1, "{} {}: after zero_grad the gradient differs from a fresh one", cfg.kind(), p.name);
        }
    }
}
