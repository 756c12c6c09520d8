//! `ffwd convert`: quantized checkpoints (storage, loading, the integer kernels against
//! dequantize-then-f32) and MoEfication (the split is exact with every expert, the router
//! learns, mismatched inputs are errors).

use ffwd::checkpoint::{CheckpointReader, QuantInfo};
use ffwd::convert::moefy::{classifier_with_k, moefy, moefy_classifier, MoefyOptions, Split};
use ffwd::convert::quantize::quantize_checkpoint;
use ffwd::core::quant::QFormat;
use ffwd::core::{Activation, Rng};
use ffwd::data::Dataset;
use ffwd::kernels::{Precision, Workspace};
use ffwd::layers::{DenseConfig, FffConfig, Layer, LayerConfig, MoeConfig, MoefiedRouter, SmoeConfig, UfffConfig};
use ffwd::models::{Classifier, ModelConfig};

fn normal(n: usize, seed: u64) -> Vec<f32> {
    let mut rng = Rng::new(seed);
    (0..n).map(|_| rng.normal()).collect()
}

/// A copy of `layer` (same configuration and parameters) with `change` applied to each
/// parameter.
fn rebuilt(layer: &dyn Layer, mut change: impl FnMut(&mut ffwd::core::Param)) -> Box<dyn Layer> {
    let mut out = layer.config().build(layer.in_features(), layer.out_features(), &mut Rng::new(0)).unwrap();
    let src = layer.params();
    let mut it = src.iter();
    out.visit_params_mut(&mut |p| {
        p.value.clone_from(&it.next().unwrap().value);
        change(p);
    });
    out
}

/// A layer whose weight matrices are replaced by their `format` round trip (what a quantized
/// checkpoint loads as), routers and tree nodes kept (the kernels route in f32).
fn dequantized(layer: &dyn Layer, format: QFormat) -> Box<dyn Layer> {
    rebuilt(layer, |p| {
        let cols = *p.shape.last().unwrap();
        // the tensors `convert quantize --experts-only` packs (a classifier's names)
        if ffwd::convert::quantize::quantizable(&format!("ffn.{}", p.name), &p.shape, true) {
            let rows = p.value.len() / cols;
            let bytes = ffwd::core::quant::pack(format, &p.value, rows, cols).unwrap();
            p.value = ffwd::core::quant::unpack(format, &bytes, rows, cols).unwrap();
        }
    })
}

fn infer(k: &dyn ffwd::kernels::InferKernel, x: &[f32], batch: usize) -> Vec<f32> {
    let mut y = vec![0.0; batch * k.out_features()];
    k.forward(x, batch, &mut y, &mut Workspace::new()).unwrap();
    y
}

#[test]
fn quantized_dense_and_mixture_kernels_match_dequantized_f32() {
    let (d, o) = (96, 40);
    for format in [QFormat::Q8_0, QFormat::Q4_0] {
        let cfgs = [
            LayerConfig::Dense(DenseConfig { width: 128, layers: 3, activation: Activation::Gelu }),
            LayerConfig::Moe(MoeConfig { experts: 4, expert_width: 32, k: 2, ..Default::default() }),
            LayerConfig::Smoe(SmoeConfig { experts: 4, expert_width: 32, k: 2, ..Default::default() }),
            LayerConfig::Fff(FffConfig { depth: 3, leaf: 32, ..Default::default() }),
        ];
        for cfg in cfgs {
            let layer = cfg.build(d, o, &mut Rng::new(1)).unwrap();
            let reference = dequantized(layer.as_ref(), format).kernel();
            let q = layer.kernel_with(Precision::of(format)).unwrap();
            for batch in [1, 7, 64] {
                let x = normal(batch * d, batch as u64);
                let (want, got) = (infer(reference.as_ref(), &x, batch), infer(q.as_ref(), &x, batch));
                let scale = want.iter().fold(0.0f32, |m, v| m.max(v.abs()));
                // dense quantizes its activations too (≤ half a step of amax/127 each): a few
                // tenths of a percent of the output's range; mixtures compute in f32
                let tol = if cfg.kind() == "dense" { 0.02 } else { 1e-4 } * scale;
                for (a, b) in got.iter().zip(&want) {
                    assert!((a - b).abs() <= tol, "{} {format:?} batch {batch}: {a} vs {b} (tol {tol})", cfg.kind());
                }
            }
        }
    }
}

/// A layer whose weight matrices (not biases, routers, tree nodes or the fff master leaf) are
/// rounded to bf16: what a bf16 kernel multiplies with.
fn bf16_rounded(layer: &dyn Layer) -> Box<dyn Layer> {
    rebuilt(layer, |p| {
        let routes = ["router", "query", "keys", "node", "master"].iter().any(|k| p.name.contains(k));
        let last = p.name.rsplit('.').next().unwrap_or("");
        let bias = last.contains("bias") || matches!(last, "b1" | "b2" | "b1s" | "b2s");
        if p.shape.len() >= 2 && !routes && !bias {
            p.value.iter_mut().for_each(|v| *v = ffwd::core::bf16::Bf16::from_f32(*v).to_f32());
        }
    })
}

#[test]
fn bf16_kernels_multiply_with_the_rounded_weights() {
    let (d, o) = (70, 45);
    let cfgs = [
        LayerConfig::Dense(DenseConfig { width: 130, layers: 3, activation: Activation::Gelu }),
        // two column chunks of the in-place path, the second partial
        LayerConfig::Dense(DenseConfig { width: 600, layers: 2, activation: Activation::Relu }),
        LayerConfig::Moe(MoeConfig { experts: 4, expert_width: 24, k: 2, ..Default::default() }),
        LayerConfig::Smoe(SmoeConfig { experts: 4, expert_width: 24, k: 2, ..Default::default() }),
        LayerConfig::Fff(FffConfig { depth: 3, leaf: 20, ..Default::default() }),
        LayerConfig::Fff(FffConfig { depth: 2, leaf: 8, master_leaf: 16, ..Default::default() }),
    ];
    for cfg in cfgs {
        let layer = cfg.build(d, o, &mut Rng::new(4)).unwrap();
        let (exact, rounded) = (layer.kernel(), bf16_rounded(layer.as_ref()).kernel());
        let k = layer.kernel_with(Precision::Bf16).unwrap();
        // batches on both sides of the dense kernel's in-place bf16 paths (≤ 2 rows with
        // AVX512_BF16, ≤ 48 without)
        for batch in [1, 2, 3, 5, 48, 49, 130] {
            let x = normal(batch * d, batch as u64);
            let (want, got, f32_out) = (infer(rounded.as_ref(), &x, batch), infer(k.as_ref(), &x, batch), infer(exact.as_ref(), &x, batch));
            let scale = want.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            // with AVX512_BF16 the mixtures' products, and the dense kernel's from 3 rows, round
            // their activations to bf16 too: a few parts in a thousand of the output's range
            let products16 = ffwd::core::sgemm::bf16_supported() && (cfg.kind() == "moe" || cfg.kind() == "smoe" || (cfg.kind() == "dense" && batch > 2));
            let tol = if products16 { 0.01 } else { 1e-5 } * scale;
            for (a, b) in got.iter().zip(&want) {
                assert!((a - b).abs() <= tol, "{} bf16 batch {batch}: {a} vs {b} (tol {tol})", cfg.kind());
            }
            // the rounding shows: the bf16 kernel is not the f32 one
            assert!(got.iter().zip(&f32_out).any(|(a, b)| a != b), "{} bf16 batch {batch} equals f32", cfg.kind());
        }
    }
}

#[test]
fn quantized_ufff_walks_the_dequantized_tree() {
    let (d, o, batch) = (64, 64, 50);
    let layer = LayerConfig::Ufff(UfffConfig { depth: 5, activation: Activation::Gelu, ..Default::default() }).build(d, o, &mut Rng::new(2)).unwrap();
    for format in [QFormat::Q8_0, QFormat::Q4_0] {
        let reference = dequantized(layer.as_ref(), format).kernel();
        let q = layer.kernel_with(Precision::of(format)).unwrap();
        let x = normal(batch * d, 3);
        let (want, got) = (infer(reference.as_ref(), &x, batch), infer(q.as_ref(), &x, batch));
        // a logit within the activation rounding of zero may take the other branch: most rows
        // must agree closely
        let close = want
            .chunks(o)
            .zip(got.chunks(o))
            .filter(|(a, b)| {
                let s = a.iter().fold(0.0f32, |m, v| m.max(v.abs()));
                a.iter().zip(b.iter()).all(|(p, q)| (p - q).abs() <= 0.02 * s + 1e-5)
            })
            .count();
        assert!(close >= batch * 9 / 10, "{format:?}: {close} of {batch} rows agree");
        // batch 1 and batch n give the same rows
        let one = infer(q.as_ref(), &x[..d], 1);
        assert_eq!(one, got[..o].to_vec());
    }
}

fn digits_like(n: usize, d: usize, classes: usize, seed: u64) -> Dataset {
    // class c: a bump over features c·d/classes.., plus noise
    let mut rng = Rng::new(seed);
    let mut x = Vec::with_capacity(n * d);
    let mut y = Vec::with_capacity(n);
    for i in 0..n {
        let c = i % classes;
        for j in 0..d {
            let on = j * classes / d == c;
            x.push(if on { 1.0 } else { 0.0 } + 0.3 * rng.normal());
        }
        y.push(c as u32);
    }
    Dataset { x, y, dim: d, n_classes: classes }
}

fn trained_dense(act: Activation) -> (Classifier, Dataset) {
    let data = digits_like(600, 48, 4, 5);
    let cfg = ModelConfig { in_features: 48, n_classes: 4, layer: LayerConfig::Dense(DenseConfig { width: 64, layers: 2, activation: act }) };
    let mut model = Classifier::new(cfg, 0).unwrap();
    let mut opt = ffwd::optim::AdamW::new(0.0);
    use ffwd::optim::Optimizer;
    let mut rng = Rng::new(0);
    for step in 0..60 {
        let s = (step * 50) % 550;
        model.zero_grad();
        model.forward_backward(&data.x[s * 48..(s + 50) * 48], &data.y[s..s + 50], &mut rng).unwrap();
        opt.step(&mut |f| model.visit_params_mut(f), 3e-3, 1.0 / 50.0);
    }
    (model, data)
}

#[test]
fn moefied_with_every_expert_is_the_dense_layer() {
    let (model, data) = trained_dense(Activation::Relu);
    for split in [Split::Coactivation, Split::Weights] {
        for router in [MoefiedRouter::Mlp, MoefiedRouter::Centroid] {
            let opts = MoefyOptions { expert_width: 8, router, split, epochs: 5, ..Default::default() };
            let (m, report) = moefy_classifier(&model, &data, &opts, &mut |_, _, _| {}).unwrap();
            assert_eq!((report.experts, report.k), (8, 2));
            let all = classifier_with_k(&m, 8).unwrap();
            let x = &data.x[..20 * 48];
            let (want, got) = (model.logits(x, 20).unwrap(), all.logits(x, 20).unwrap());
            for (a, b) in got.iter().zip(&want) {
                assert!((a - b).abs() <= 1e-4 * (1.0 + b.abs()), "{split:?} {router:?}: {a} vs {b}");
            }
            // recall grows with K and never beats the oracle
            for w in report.recall.windows(2) {
                assert!(w[1].router >= w[0].router - 1e-6 && w[1].oracle >= w[0].oracle - 1e-6);
            }
            for r in &report.recall {
                assert!(r.router <= r.oracle + 1e-6, "{r:?}");
            }
            if router == MoefiedRouter::Mlp {
                let (before, after) = report.router_bce.unwrap();
                assert!(after < before, "router BCE {before} -> {after}");
            }
            // the training side runs the same routed computation as the kernel
            let mut layer = m.layer().config().build(48, 4, &mut Rng::new(0)).unwrap();
            let src = m.layer().params();
            let mut it = src.iter();
            layer.visit_params_mut(&mut |p| p.value.clone_from(&it.next().unwrap().value));
            let mut y = vec![0.0; 20 * 4];
            layer.forward_train(ffwd::layers::Input::new(x, 20), &mut y, &mut Rng::new(0)).unwrap();
            let k = layer.kernel();
            for (a, b) in y.iter().zip(&infer(k.as_ref(), x, 20)) {
                assert!((a - b).abs() <= 1e-5 * (1.0 + b.abs()));
            }
        }
    }
}

#[test]
fn moefy_refuses_what_it_cannot_split() {
    let (gelu, data) = trained_dense(Activation::Gelu);
    let err = moefy(gelu.layer(), &data.x, data.len(), &MoefyOptions::default(), &mut |_, _, _| {}).unwrap_err().to_string();
    assert!(err.contains("ReLU") && err.contains("--approximate"), "{err}");
    // --approximate converts it, exact with every expert
    let opts = MoefyOptions { expert_width: 16, approximate: true, ..Default::default() };
    assert!(moefy(gelu.layer(), &data.x, data.len(), &opts, &mut |_, _, _| {}).is_ok());
    let (relu, _) = trained_dense(Activation::Relu);
    let err = moefy(relu.layer(), &data.x, data.len(), &MoefyOptions { expert_width: 24, ..Default::default() }, &mut |_, _, _| {}).unwrap_err().to_string();
    assert!(err.contains("does not divide"), "{err}");
    let moe = LayerConfig::Moe(MoeConfig::default()).build(48, 4, &mut Rng::new(0)).unwrap();
    let err = moefy(moe.as_ref(), &data.x, data.len(), &MoefyOptions::default(), &mut |_, _, _| {}).unwrap_err().to_string();
    assert!(err.contains("dense"), "{err}");
    assert!(moefy(relu.layer(), &data.x[..5 * 48], 5, &MoefyOptions::default(), &mut |_, _, _| {}).is_err(), "too few rows");
}

#[test]
fn quantized_checkpoints_store_blocks_and_load_as_their_values() {
    let dir = tempfile::tempdir().unwrap();
    let (model, data) = trained_dense(Activation::Relu);
    let path = dir.path().join("m.safetensors");
    model.save(&path).unwrap();
    for format in [QFormat::Q8_0, QFormat::Q4_0] {
        let ck = CheckpointReader::open(&path).unwrap();
        let (bytes, report) = quantize_checkpoint(&ck, format, false).unwrap();
        assert_eq!(report.quantized, vec!["ffn.fc1.weight".to_string(), "ffn.fc2.weight".to_string()], "{report:?}");
        assert_eq!(report.kept, vec!["ffn.fc1.bias".to_string(), "ffn.fc2.bias".to_string()]);
        let q = CheckpointReader::from_bytes(bytes.clone(), "q").unwrap();
        let info: &QuantInfo = q.quant().unwrap();
        assert_eq!(info.format, format);
        let st = q.tensors().unwrap();
        let t = st.tensor("ffn.fc1.weight").unwrap();
        assert_eq!((t.dtype(), t.shape()), (safetensors::Dtype::U8, &[64usize, 2 * format.block_bytes()][..]));
        // loads as the dequantized values, runs the quantized kernel
        let loaded = Classifier::from_checkpoint(&q).unwrap();
        assert_eq!(loaded.precision(), Precision::of(format));
        let acc = (model.accuracy(&data).unwrap(), loaded.accuracy(&data).unwrap());
        assert!((acc.0 - acc.1).abs() <= 0.02, "{format:?}: accuracy {acc:?}");
        // quantizing twice is refused, and so is training on
        assert!(quantize_checkpoint(&q, format, false).unwrap_err().to_string().contains("quantized already"));
        let qpath = dir.path().join("q.safetensors");
        std::fs::write(&qpath, &bytes).unwrap();
        let err = ffwd::train::backprop::load_run::<ffwd::config::TrainConfig>(&qpath, |_| Box::new(ffwd::optim::AdamW::new(0.0))).err().unwrap().to_string();
        assert!(err.contains("quantized"), "{err}");
        // a truncated block table is an error naming the tensor, not a panic
        let mut info2 = info.clone();
        info2.tensors.insert("ffn.fc1.weight".into(), vec![64, 49]);
        let biases: Vec<(String, Vec<usize>, Vec<f32>)> = ["ffn.fc1.bias", "ffn.fc2.bias"]
            .iter()
            .map(|&n| (n.to_string(), vec![if n.contains("fc1") { 64 } else { 4 }], q.read_f32(&st, n, &[if n.contains("fc1") { 64 } else { 4 }]).unwrap()))
            .collect();
        let mut w = ffwd::checkpoint::CheckpointWriter::new("classifier/1");
        for (k, v) in q.metadata() {
            w.meta(k, v.clone());
        }
        w.json(ffwd::checkpoint::QUANT_KEY, &info2).unwrap();
        for name in ["ffn.fc1.weight", "ffn.fc2.weight"] {
            let tv = st.tensor(name).unwrap();
            w.bytes(name, tv.shape(), tv.data().to_vec());
        }
        for (n, shape, v) in &biases {
            w.tensor(n.clone(), shape, v);
        }
        let bad = CheckpointReader::from_bytes(w.to_bytes().unwrap(), "bad").unwrap();
        let err = Classifier::from_checkpoint(&bad).err().unwrap().to_string();
        assert!(err.contains("ffn.fc1.weight"), "{err}");
        // the untouched tensors of the same file load
        let mut ok = ffwd::checkpoint::CheckpointWriter::new("classifier/1");
        for (k, v) in q.metadata() {
            ok.meta(k, v.clone());
        }
        for name in ["ffn.fc1.weight", "ffn.fc2.weight"] {
            let tv = st.tensor(name).unwrap();
            ok.bytes(name, tv.shape(), tv.data().to_vec());
        }
        for (n, shape, v) in &biases {
            ok.tensor(n.clone(), shape, v);
        }
        assert!(Classifier::from_checkpoint(&CheckpointReader::from_bytes(ok.to_bytes().unwrap(), "ok").unwrap()).is_ok());
    }
}
