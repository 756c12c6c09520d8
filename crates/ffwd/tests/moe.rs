//! The mixture family against independent references: σ-MoE with K = E is a dense FFN with
//! concatenated weights and per-expert gates; a one-expert top-k MoE is a dense FFN; the
//! Switch loss and the entropy regulariser at uniform routing; hash routing determinism and
//! balance; capacity dropping; and every inference kernel against a naive per-token loop.

use ffwd::core::{Activation, Rng};
use ffwd::kernels::grouped::DROPPED;
use ffwd::kernels::moe::splitmix64;
use ffwd::kernels::pkm::PkmScoring;
use ffwd::kernels::Workspace;
use ffwd::layers::experts::apply_capacity;
use ffwd::layers::hash::balanced_table;
use ffwd::layers::{Compile, Dense, DenseConfig, Hash, HashConfig, Input, Moe, MoeConfig, Pkm, PkmConfig, Smoe, SmoeConfig, Trainable};

fn randn(rng: &mut Rng, n: usize) -> Vec<f32> {
    (0..n).map(|_| rng.normal()).collect()
}

fn close(a: &[f32], b: &[f32], tol: f32) {
    assert_eq!(a.len(), b.len());
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        assert!((x - y).abs() <= tol * (1.0 + x.abs().max(y.abs())), "index {i}: {x} vs {y}");
    }
}

/// Naive reference of one two-layer expert `e` of a bank on one row.
#[allow(clippy::too_many_arguments)]
fn expert_ref(w1: &[f32], b1: &[f32], w2: &[f32], e: usize, d: usize, g: usize, o: usize, act: Activation, x: &[f32]) -> Vec<f32> {
    let mut h = vec![0.0f32; g];
    for (j, hj) in h.iter_mut().enumerate() {
        let mut s = b1[e * g + j] as f64;
        for i in 0..d {
            s += x[i] as f64 * w1[(e * d + i) * g + j] as f64;
        }
        *hj = act.apply(s as f32);
    }
    (0..o).map(|c| (0..g).map(|j| h[j] as f64 * w2[(e * g + j) * o + c] as f64).sum::<f64>() as f32).collect()
}

fn logits_ref(router: &[f32], e: usize, d: usize, x: &[f32]) -> Vec<f32> {
    (0..e).map(|i| (0..d).map(|j| router[i * d + j] as f64 * x[j] as f64).sum::<f64>() as f32).collect()
}

/// Top-k indices by value, ties to the lower index.
fn topk_ref(v: &[f32], k: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..v.len()).collect();
    idx.sort_by(|&a, &b| v[b].total_cmp(&v[a]).then(a.cmp(&b)));
    idx.truncate(k);
    idx
}

#[test]
fn smoe_with_k_equal_experts_is_a_gated_dense_ffn_with_concatenated_weights() {
    let (d, o, e, g, batch) = (7, 5, 4, 3, 6);
    let cfg = SmoeConfig { experts: e, expert_width: g, k: e, entropy: 0.0, expert_dropout: 0.0, activation: Activation::Gelu };
    let mut rng = Rng::new(1);
    let mut m = Smoe::new(cfg, d, o, &mut rng).unwrap();
    for v in m.bank.b1.value.iter_mut().chain(m.bank.b2.value.iter_mut()) {
        *v = rng.normal();
    }
    let x = randn(&mut rng, batch * d);
    // dense FFN with the experts' weights concatenated along the hidden axis
    let dense = Dense::new(DenseConfig { width: e * g, layers: 2, activation: Activation::Gelu }, d, o, &mut rng).unwrap();
    let mut lin = dense.linears().to_vec();
    for ei in 0..e {
        for j in 0..g {
            let u = ei * g + j;
            for i in 0..d {
                lin[0].weight.value[u * d + i] = m.bank.w1.value[(ei * d + i) * g + j];
            }
            lin[0].bias.value[u] = m.bank.b1.value[ei * g + j];
            for c in 0..o {
                lin[1].weight.value[c * e * g + u] = m.bank.w2.value[(ei * g + j) * o + c];
            }
        }
    }
    lin[1].bias.value.copy_from_slice(&m.bank.b2.value);
    // hidden units of expert e scaled by its gate σ(router_e · x)
    let mut reference = vec![0.0; batch * o];
    for b in 0..batch {
        let xb = &x[b * d..(b + 1) * d];
        let mut pre = vec![0.0; e * g];
        lin[0].forward(xb, 1, &mut pre);
        let gates: Vec<f32> = logits_ref(&m.router.value, e, d, xb).iter().map(|&l| 1.0 / (1.0 + (-l).exp())).collect();
        let h: Vec<f32> = pre.iter().enumerate().map(|(u, &p)| gates[u / g] * Activation::Gelu.apply(p)).collect();
        lin[1].forward(&h, 1, &mut reference[b * o..(b + 1) * o]);
    }
    let mut y = vec![0.0; batch * o];
    m.forward_train(Input::new(&x, batch), &mut y, &mut Rng::new(0)).unwrap();
    close(&y, &reference, 1e-4);
    let mut yk = vec![0.0; batch * o];
    m.infer(&x, batch, &mut yk).unwrap();
    close(&yk, &reference, 1e-4);
    // and with the router at zero every gate is ½: exactly the dense block with W2 halved
    m.router.value.fill(0.0);
    for v in &mut lin[1].weight.value {
        *v *= 0.5;
    }
    let mut h = vec![0.0; batch * e * g];
    lin[0].forward(&x, batch, &mut h);
    for v in &mut h {
        *v = Activation::Gelu.apply(*v);
    }
    let mut half = vec![0.0; batch * o];
    lin[1].forward(&h, batch, &mut half);
    m.forward_train(Input::new(&x, batch), &mut y, &mut Rng::new(0)).unwrap();
    close(&y, &half, 1e-4);
}

#[test]
fn one_expert_topk_moe_equals_dense_forward_and_backward() {
    let (d, o, g, batch) = (6, 4, 5, 7);
    for renormalize in [false, true] {
        let cfg = MoeConfig { experts: 1, expert_width: g, k: 1, renormalize, balance: 0.01, z_loss: 0.0, capacity_factor: 0.0, activation: Activation::Relu };
        let mut rng = Rng::new(2);
        let mut m = Moe::new(cfg, d, o, &mut rng).unwrap();
        let mut dense = Dense::new(DenseConfig { width: g, layers: 2, activation: Activation::Relu }, d, o, &mut rng).unwrap();
        // copy dense weights into the expert (W1 is in × G, fc1.weight is G × in)
        let lin = dense.linears().to_vec();
        for j in 0..g {
            for i in 0..d {
                m.bank.w1.value[i * g + j] = lin[0].weight.value[j * d + i];
            }
            m.bank.b1.value[j] = lin[0].bias.value[j];
            for c in 0..o {
                m.bank.w2.value[j * o + c] = lin[1].weight.value[c * g + j];
            }
        }
        m.bank.b2.value.copy_from_slice(&lin[1].bias.value);
        let x = randn(&mut rng, batch * d);
        let dy = randn(&mut rng, batch * o);
        let (mut ym, mut yd) = (vec![0.0; batch * o], vec![0.0; batch * o]);
        m.forward_train(Input::new(&x, batch), &mut ym, &mut Rng::new(0)).unwrap();
        dense.forward_train(Input::new(&x, batch), &mut yd, &mut Rng::new(0)).unwrap();
        close(&ym, &yd, 1e-5);
        // Switch loss with one expert: α · 1 · f · P = α
        assert!((m.aux_loss() - 0.01).abs() < 1e-7);
        let (mut dxm, mut dxd) = (vec![0.0; batch * d], vec![0.0; batch * d]);
        m.backward(Input::new(&x, batch), &dy, Some(&mut dxm)).unwrap();
        dense.backward(Input::new(&x, batch), &dy, Some(&mut dxd)).unwrap();
        close(&dxm, &dxd, 1e-5);
        assert!(m.router.grad.iter().all(|&v| v.abs() < 1e-6), "a single expert's router gets no gradient");
        let dl = dense.linears();
        for j in 0..g {
            for i in 0..d {
                assert!((m.bank.w1.grad[i * g + j] - dl[0].weight.grad[j * d + i]).abs() < 1e-5);
            }
        }
        close(&m.bank.b2.grad, &dl[1].bias.grad, 1e-5);
        let mut yk = vec![0.0; batch * o];
        m.infer(&x, batch, &mut yk).unwrap();
        close(&yk, &yd, 1e-5);
    }
}

#[test]
fn switch_loss_is_alpha_at_uniform_routing_and_matches_its_definition() {
    let (d, o, e, batch, alpha) = (5, 3, 4, 16, 0.01);
    let cfg =
        MoeConfig { experts: e, expert_width: 2, k: 1, renormalize: false, balance: alpha, z_loss: 0.0, capacity_factor: 0.0, activation: Activation::Relu };
    let mut rng = Rng::new(3);
    let mut m = Moe::new(cfg.clone(), d, o, &mut rng).unwrap();
    let x = randn(&mut rng, batch * d);
    let mut y = vec![0.0; batch * o];
    // uniform router probabilities: P_i = 1/E, so α·E·Σ f_i/E = α whatever f is
    m.router.value.fill(0.0);
    m.forward_train(Input::new(&x, batch), &mut y, &mut Rng::new(0)).unwrap();
    assert!((m.aux_loss() - alpha).abs() < 1e-8, "{}", m.aux_loss());
    // a random router: compare with f and P computed here from the logits
    let mut m = Moe::new(cfg, d, o, &mut Rng::new(4)).unwrap();
    for v in &mut m.router.value {
        *v *= 10.0;
    }
    m.forward_train(Input::new(&x, batch), &mut y, &mut Rng::new(0)).unwrap();
    let (mut f, mut p) = (vec![0.0f64; e], vec![0.0f64; e]);
    for b in 0..batch {
        let l = logits_ref(&m.router.value, e, d, &x[b * d..(b + 1) * d]);
        f[topk_ref(&l, 1)[0]] += 1.0 / batch as f64;
        let z: f64 = l.iter().map(|&v| (v as f64).exp()).sum();
        for i in 0..e {
            p[i] += (l[i] as f64).exp() / z / batch as f64;
        }
    }
    let expected = alpha as f64 * e as f64 * (0..e).map(|i| f[i] * p[i]).sum::<f64>();
    assert!((m.aux_loss() as f64 - expected).abs() < 1e-6, "{} vs {expected}", m.aux_loss());
    assert!(expected > alpha as f64, "unbalanced routing must cost more than α");
}

#[test]
fn entropy_regulariser_equals_its_closed_form_at_uniform_routing() {
    let (d, o, e, gamma) = (4, 2, 8, 1e-3f32);
    let cfg = SmoeConfig { experts: e, expert_width: 2, k: 2, entropy: gamma, expert_dropout: 0.0, activation: Activation::Relu };
    let mut m = Smoe::new(cfg, d, o, &mut Rng::new(5)).unwrap();
    m.router.value.fill(0.0);
    let x = randn(&mut Rng::new(6), 10 * d);
    let mut y = vec![0.0; 10 * o];
    m.forward_train(Input::new(&x, 10), &mut y, &mut Rng::new(0)).unwrap();
    let closed = -gamma * (e as f32).ln();
    assert!((m.aux_loss() - closed).abs() < 1e-7, "{} vs {closed}", m.aux_loss());
    assert!((Smoe::entropy_loss(gamma, &[1.0, 0.0, 0.0]) - 0.0).abs() < 1e-9, "a collapsed router has zero entropy");
}

#[test]
fn hash_routing_is_deterministic_and_balanced() {
    let experts = 16;
    let cfg = HashConfig { experts, expert_width: 2, seed: 42, ..Default::default() };
    let a = Hash::new(cfg.clone(), 3, 2, &mut Rng::new(0)).unwrap();
    let b = Hash::new(cfg, 3, 2, &mut Rng::new(99)).unwrap();
    let mut rng = Rng::new(7);
    let n = 100_000;
    let mut counts = vec![0usize; experts];
    for _ in 0..n {
        let id = rng.next_u64() as u32; // 10^5 random ids (distinct with high probability)
        let e = a.expert_of(id);
        assert_eq!(e, b.expert_of(id), "same seed, same expert (weights' seed must not matter)");
        counts[e as usize] += 1;
    }
    let mean = n as f64 / experts as f64;
    for (e, &c) in counts.iter().enumerate() {
        assert!((c as f64 - mean).abs() <= 0.05 * mean, "expert {e} got {c}, mean {mean}");
    }
    // another seed gives another map
    let other = Hash::new(HashConfig { experts, expert_width: 2, seed: 43, ..Default::default() }, 3, 2, &mut Rng::new(0)).unwrap();
    assert!((0..1000).any(|id| other.expert_of(id) != a.expert_of(id)));
    // the hash is SplitMix64 (reference value of its first output from state 0)
    assert_eq!(splitmix64(0), 0xE220_A839_7B1D_CDAF);
}

#[test]
fn balanced_hash_spreads_zipf_frequencies() {
    // Zipf-like token counts over 1000 ids
    let freqs: Vec<u64> = (1..=1000u64).map(|r| 100_000 / r).collect();
    let experts = 8;
    let table = balanced_table(&freqs, experts);
    let mut load = vec![0u64; experts];
    for (id, &e) in table.iter().enumerate() {
        load[e as usize] += freqs[id];
    }
    // the most frequent token alone is 13% of the mass (> 1/8): its bucket takes nothing else
    // big; the other buckets are within 5% of each other
    let total: u64 = freqs.iter().sum();
    assert_eq!(table[0], 0);
    let rest: Vec<u64> = (0..experts).filter(|&e| e != 0).map(|e| load[e]).collect();
    let (lo, hi) = (*rest.iter().min().unwrap() as f64, *rest.iter().max().unwrap() as f64);
    assert!(hi / lo < 1.05, "loads {load:?} of {total}");
    let cfg = HashConfig { experts, expert_width: 2, table: table.clone(), ..Default::default() };
    let h = Hash::new(cfg, 3, 2, &mut Rng::new(0)).unwrap();
    assert_eq!(h.expert_of(5), table[5]);
}

#[test]
fn capacity_drops_exactly_the_excess() {
    let mut rng = Rng::new(8);
    for trial in 0..50 {
        let experts = 1 + rng.below(6);
        let slots = rng.below(40);
        let capacity = rng.below(8);
        let mut assign: Vec<u32> = (0..slots).map(|_| rng.below(experts) as u32).collect();
        let orig = assign.clone();
        let mut scratch = Vec::new();
        let dropped = apply_capacity(&mut assign, experts, capacity, &mut scratch);
        let mut excess = 0;
        for e in 0..experts as u32 {
            let count = orig.iter().filter(|&&a| a == e).count();
            let kept = assign.iter().filter(|&&a| a == e).count();
            assert_eq!(kept, count.min(capacity), "trial {trial}, expert {e}");
            excess += count.saturating_sub(capacity);
        }
        assert_eq!(dropped, excess);
        // only later slots are dropped (token order), and kept ones are unchanged
        for (a, o) in assign.iter().zip(&orig) {
            assert!(*a == *o || *a == DROPPED);
        }
    }
    // through the layer: 8 tokens, k = 2, 4 experts, factor 0.5 → capacity 2 per expert
    let cfg = MoeConfig { experts: 4, expert_width: 2, k: 2, capacity_factor: 0.5, ..Default::default() };
    let mut m = Moe::new(cfg, 3, 2, &mut Rng::new(9)).unwrap();
    assert_eq!(m.capacity(8), 2);
    let x = randn(&mut rng, 8 * 3);
    let mut y = vec![0.0; 16];
    m.forward_train(Input::new(&x, 8), &mut y, &mut Rng::new(0)).unwrap();
    let ranks = m.routing(&x, 8).unwrap();
    let mut counts = [0usize; 4];
    for b in 0..8 {
        for j in 0..2 {
            counts[ranks[b * 4 + j] as usize] += 1;
        }
    }
    assert_eq!(m.dropped(), counts.iter().map(|c| c.saturating_sub(2)).sum::<usize>());
}

/// Naive per-token reference of a softmax or sigmoid mixture.
fn mixture_ref(m_router: &[f32], bank: &ffwd::layers::experts::ExpertBank, k: usize, sigmoid: bool, renormalize: bool, x: &[f32], batch: usize) -> Vec<f32> {
    let s = bank.shape;
    let (d, o) = (s.in_features, s.out_features);
    let mut y = vec![0.0; batch * o];
    for b in 0..batch {
        let xb = &x[b * d..(b + 1) * d];
        let l = logits_ref(m_router, s.experts, d, xb);
        let top = topk_ref(&l, k);
        let mut gates: Vec<f32> = if sigmoid {
            top.iter().map(|&i| 1.0 / (1.0 + (-l[i]).exp())).collect()
        } else {
            let z: f32 = l.iter().map(|&v| v.exp()).sum();
            top.iter().map(|&i| l[i].exp() / z).collect()
        };
        if renormalize {
            let t: f32 = gates.iter().sum();
            gates.iter_mut().for_each(|g| *g /= t);
        }
        let yb = &mut y[b * o..(b + 1) * o];
        yb.copy_from_slice(&bank.b2.value);
        for (&e, &gt) in top.iter().zip(&gates) {
            let r = expert_ref(&bank.w1.value, &bank.b1.value, &bank.w2.value, e, d, s.width, o, bank.act, xb);
            for (v, rv) in yb.iter_mut().zip(r) {
                *v += gt * rv;
            }
        }
    }
    y
}

#[test]
fn mixture_kernels_equal_a_naive_per_token_loop() {
    let mut rng = Rng::new(10);
    let mut ws = Workspace::new();
    for trial in 0..24 {
        let d = 1 + rng.below(40);
        let o = 1 + rng.below(20);
        let e = 1 + rng.below(12);
        let k = 1 + rng.below(e.min(4));
        let g = 1 + rng.below(24);
        // include batch 1, odd sizes, and batches large enough for the threaded paths
        let batch = [1, 3, 17, 64, 130][trial % 5];
        let x = randn(&mut rng, batch * d);
        let act = [Activation::Relu, Activation::Gelu, Activation::Silu][trial % 3];
        let renormalize = trial % 2 == 0;
        let mut moe = Moe::new(MoeConfig { experts: e, expert_width: g, k, renormalize, activation: act, ..Default::default() }, d, o, &mut rng).unwrap();
        for v in moe.router.value.iter_mut().chain(moe.bank.b1.value.iter_mut()).chain(moe.bank.b2.value.iter_mut()) {
            *v = rng.normal();
        }
        let want = mixture_ref(&moe.router.value, &moe.bank, k, false, renormalize, &x, batch);
        let mut y = vec![0.0; batch * o];
        moe.kernel().forward(&x, batch, &mut y, &mut ws).unwrap();
        close(&y, &want, 1e-4);
        moe.forward_train(Input::new(&x, batch), &mut y, &mut Rng::new(0)).unwrap();
        close(&y, &want, 1e-4);

        let mut smoe = Smoe::new(SmoeConfig { experts: e, expert_width: g, k, activation: act, ..Default::default() }, d, o, &mut rng).unwrap();
        let want = mixture_ref(&smoe.router.value, &smoe.bank, k, true, false, &x, batch);
        smoe.kernel().forward(&x, batch, &mut y, &mut ws).unwrap();
        close(&y, &want, 1e-4);
        smoe.forward_train(Input::new(&x, batch), &mut y, &mut Rng::new(0)).unwrap();
        close(&y, &want, 1e-4);

        let mut hash =
            Hash::new(HashConfig { experts: e, expert_width: g, seed: trial as u64, activation: act, ..Default::default() }, d, o, &mut rng).unwrap();
        let ids: Vec<u32> = (0..batch).map(|_| rng.below(1000) as u32).collect();
        let mut want = vec![0.0; batch * o];
        for b in 0..batch {
            let r = expert_ref(
                &hash.bank.w1.value,
                &hash.bank.b1.value,
                &hash.bank.w2.value,
                hash.expert_of(ids[b]) as usize,
                d,
                g,
                o,
                act,
                &x[b * d..(b + 1) * d],
            );
            want[b * o..(b + 1) * o].copy_from_slice(&r);
        }
        hash.kernel().forward_tokens(&x, &ids, batch, &mut y, &mut ws).unwrap();
        close(&y, &want, 1e-4);
        hash.forward_train(Input::new(&x, batch).with_ids(&ids), &mut y, &mut Rng::new(0)).unwrap();
        close(&y, &want, 1e-4);
        assert!(hash.kernel().forward(&x, batch, &mut y, &mut ws).is_err(), "hash inference without ids must be an error");
    }
}

#[test]
fn pkm_kernel_equals_a_naive_lookup_and_training_forward() {
    let mut rng = Rng::new(11);
    let mut ws = Workspace::new();
    for trial in 0..12 {
        let d = 1 + rng.below(20);
        let o = 1 + rng.below(10);
        let n = 2 + rng.below(8);
        let k = 1 + rng.below(n);
        let heads = 1 + rng.below(3);
        let key_dim = 2 * (1 + rng.below(4));
        let scoring = if trial % 2 == 0 { PkmScoring::Relu } else { PkmScoring::Softmax };
        let batch = [1, 2, 9, 33][trial % 4];
        let mut p = Pkm::new(PkmConfig { n_keys: n, heads, k, key_dim, scoring }, d, o, &mut rng).unwrap();
        for v in &mut p.bias.value {
            *v = rng.normal();
        }
        let x = randn(&mut rng, batch * d);
        // naive: all n² candidates scored, top-k of them
        let half = key_dim / 2;
        let mut want = vec![0.0f32; batch * o];
        for b in 0..batch {
            let xb = &x[b * d..(b + 1) * d];
            let yb = &mut want[b * o..(b + 1) * o];
            yb.copy_from_slice(&p.bias.value);
            for h in 0..heads {
                let q: Vec<f32> = (0..key_dim)
                    .map(|c| {
                        let r = h * key_dim + c;
                        p.query_b.value[r] + (0..d).map(|i| p.query_w.value[r * d + i] * xb[i]).sum::<f32>()
                    })
                    .collect();
                let sub = |keys: &[f32], a: usize, i: usize| -> f32 { (0..half).map(|c| keys[(h * n + i) * half + c] * q[a * half + c]).sum() };
                let all: Vec<f32> = (0..n * n).map(|v| sub(&p.keys1.value, 0, v / n) + sub(&p.keys2.value, 1, v % n)).collect();
                let top = topk_ref(&all, k);
                let scores: Vec<f32> = top.iter().map(|&v| all[v]).collect();
                let w: Vec<f32> = match scoring {
                    PkmScoring::Relu => scores.iter().map(|s| s.max(0.0)).collect(),
                    PkmScoring::Softmax => {
                        let z: f32 = scores.iter().map(|s| (s - scores[0]).exp()).sum();
                        scores.iter().map(|s| (s - scores[0]).exp() / z).collect()
                    }
                };
                for (&v, &wv) in top.iter().zip(&w) {
                    for (yc, &vc) in yb.iter_mut().zip(&p.values.value[v * o..(v + 1) * o]) {
                        *yc += wv * vc;
                    }
                }
            }
        }
        let mut y = vec![0.0; batch * o];
        p.kernel().forward(&x, batch, &mut y, &mut ws).unwrap();
        close(&y, &want, 1e-4);
        p.forward_train(Input::new(&x, batch), &mut y, &mut Rng::new(0)).unwrap();
        close(&y, &want, 1e-4);
    }
}

#[test]
fn mixture_errors_are_typed_not_panics() {
    let mut rng = Rng::new(12);
    assert!(Moe::new(MoeConfig { experts: 4, k: 5, ..Default::default() }, 3, 2, &mut rng).is_err());
    assert!(Moe::new(MoeConfig { experts: 0, ..Default::default() }, 3, 2, &mut rng).is_err());
    assert!(Smoe::new(SmoeConfig { expert_dropout: 1.0, ..Default::default() }, 3, 2, &mut rng).is_err());
    assert!(Pkm::new(PkmConfig { key_dim: 3, ..Default::default() }, 3, 2, &mut rng).is_err());
    assert!(Pkm::new(PkmConfig { n_keys: 4, k: 5, ..Default::default() }, 3, 2, &mut rng).is_err());
    assert!(Hash::new(HashConfig { experts: 2, table: vec![0, 2], ..Default::default() }, 3, 2, &mut rng).is_err());
    let m = Moe::new(MoeConfig::default(), 3, 2, &mut rng).unwrap();
    let k = m.kernel();
    let mut ws = Workspace::new();
    let err = k.forward(&[], 0, &mut [], &mut ws).unwrap_err().to_string();
    assert!(err.contains("empty batch"), "{err}");
    let err = k.forward(&[0.0; 8], 2, &mut [0.0; 4], &mut ws).unwrap_err().to_string();
    assert!(err.contains("cols") && err.contains('3'), "{err}");
    let mut h = Hash::new(HashConfig::default(), 3, 2, &mut rng).unwrap();
    let err = h.forward_train(Input::new(&[0.0; 6], 2), &mut [0.0; 4], &mut rng).unwrap_err().to_string();
    assert!(err.contains("token ids"), "{err}");
    assert!(h.forward_train(Input::new(&[0.0; 6], 2).with_ids(&[1, 2, 3]), &mut [0.0; 4], &mut rng).is_err());
}

/// The grouped kernels are safe functions over caller-supplied segment tables: bad tables are
/// errors, never out-of-bounds writes (they used to build slices from raw pointers unchecked).
#[test]
fn grouped_kernels_refuse_bad_segment_tables() {
    use ffwd::kernels::grouped::{experts_backward, experts_forward, ExpertGrads, ExpertShape, ExpertWeights};
    let shape = ExpertShape { experts: 2, in_features: 3, width: 4, out_features: 2 };
    let (w1, b1, w2) = (vec![0.1; 2 * 3 * 4], vec![0.0; 2 * 4], vec![0.1; 2 * 4 * 2]);
    let w = ExpertWeights { shape, w1: &w1, b1: &b1, w2: &w2, act: Activation::Relu };
    let x = vec![1.0; 2 * 3];
    let order = [0u32, 1];
    let (mut xs, mut h, mut ys) = (vec![0.0; 2 * 3], vec![0.0; 2 * 4], vec![0.0; 2 * 2]);
    // valid: two rows, one per expert
    experts_forward(&w, &x, 1, &order, &[0, 1, 2], &mut xs, None, &mut h, &mut ys).unwrap();
    for (offsets, what) in [
        (vec![0u32, 2, 1], "decrease"),
        (vec![0, 1, 50], "`xs` holds"),
        (vec![0, 1], "offsets for 2 experts"),
        (vec![1, 1, 2], "offsets[0]"),
        (vec![0, 1, u32::MAX], "`xs` holds"),
    ] {
        let e = experts_forward(&w, &x, 1, &order, &offsets, &mut xs, None, &mut h, &mut ys).unwrap_err().to_string();
        assert!(e.contains(what), "{offsets:?}: {e}");
    }
    let e = experts_forward(&w, &x, 1, &[0, 7], &[0, 1, 2], &mut xs, None, &mut h, &mut ys).unwrap_err().to_string();
    assert!(e.contains("slot 7"), "{e}");
    let short = ExpertWeights { w1: &w1[..5], ..w };
    assert!(experts_forward(&short, &x, 1, &order, &[0, 1, 2], &mut xs, None, &mut h, &mut ys).is_err());
    let (mut g1, mut gb, mut g2) = (vec![0.0; 2 * 3 * 4], vec![0.0; 2 * 4], vec![0.0; 2 * 4 * 2]);
    let (pre, dys, mut dh, mut dxs) = (vec![0.0; 8], vec![1.0; 4], vec![0.0; 8], vec![0.0; 6]);
    experts_backward(&w, ExpertGrads { w1: &mut g1, b1: &mut gb, w2: &mut g2 }, &[0, 1, 2], &xs, &pre, &h, &dys, &mut dh, &mut dxs).unwrap();
    let e = experts_backward(&w, ExpertGrads { w1: &mut g1, b1: &mut gb, w2: &mut g2 }, &[0, 2, 9], &xs, &pre, &h, &dys, &mut dh, &mut dxs)
        .unwrap_err()
        .to_string();
    assert!(e.contains("holds"), "{e}");
    let mut short_grad = vec![0.0; 3];
    let e = experts_backward(&w, ExpertGrads { w1: &mut short_grad, b1: &mut gb, w2: &mut g2 }, &[0, 1, 2], &xs, &pre, &h, &dys, &mut dh, &mut dxs)
        .unwrap_err()
        .to_string();
    assert!(e.contains("w1"), "{e}");
}

#[test]
fn route_usage_counts_every_chosen_expert() {
    // the monitoring pass of the kernels (the server's usage counters) against the layers' own
    // routing: each row adds one count to each of its k experts
    let mut r = Rng::new(31);
    let (batch, ni) = (50, 7);
    let x: Vec<f32> = (0..batch * ni).map(|_| r.normal()).collect();
    let moe = Moe::new(MoeConfig { experts: 6, expert_width: 3, k: 2, ..Default::default() }, ni, 4, &mut r).unwrap();
    let smoe = Smoe::new(SmoeConfig { experts: 5, expert_width: 3, k: 3, ..Default::default() }, ni, 4, &mut r).unwrap();
    for (kernel, ranking, experts, k) in [(moe.kernel(), moe.routing(&x, batch).unwrap(), 6, 2), (smoe.kernel(), smoe.routing(&x, batch).unwrap(), 5, 3)] {
        let mut counts = Vec::new();
        assert_eq!(kernel.route_usage(&x, batch, &mut counts), Some("expert"));
        let mut want = vec![0u64; experts];
        for row in ranking.chunks(ranking.len() / batch) {
            for &e in &row[..k] {
                want[e as usize] += 1;
            }
        }
        assert_eq!(counts, want, "{}", kernel.kind());
        assert_eq!(counts.iter().sum::<u64>(), (batch * k) as u64);
    }
    let hash = Hash::new(HashConfig::default(), ni, 4, &mut r).unwrap();
    assert_eq!(hash.kernel().route_usage(&x, batch, &mut Vec::new()), None, "hash layers route by token id");
}
