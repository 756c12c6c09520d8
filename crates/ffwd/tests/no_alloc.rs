//! A training step or a kernel call allocates nothing once its buffers are sized: counted with
//! a wrapping global allocator over many calls of every layer kind. The packing buffers the
//! `gemm` crate allocates inside each of its calls are counted apart (the library marks the
//! thread while it is inside such a call, `core::gemm::inside_gemm_library`), so that a single
//! allocation of ffwd's own per step fails these tests.
//! With more than one thread, rayon's work-stealing deques occasionally grow a block while
//! tasks are being shared (seen: 0–3 allocations per 50 steps), and even a one-thread pool's
//! deque is a crossbeam buffer that shrinks when mostly empty and grows again (seen: 0–1 per
//! 50 steps): a fixed slack of 2 (1 thread) or 10 (2 threads) per 50 steps covers them, far
//! below one per step. Only the threads doing the measured work are counted.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use ffwd::core::gemm::{gemm_calls, inside_gemm_library};
use ffwd::core::{Activation, Rng};
use ffwd::layers::{DenseConfig, FffConfig, LayerConfig, MoeConfig, PkmConfig, SmoeConfig, UfffConfig};
use ffwd::models::{Classifier, ModelConfig};
use ffwd::optim::{clip_factor, grad_norm, AdamW, Optimizer};

struct Counting;
static ALLOCS: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    /// Only threads doing the measured work count: the test harness spawns threads for the
    /// other tests of this file at any time, and those allocations are not ours.
    static TRACKED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Allocations of the GEMM library's own calls (reported, not limited).
static LIBRARY_ALLOCS: AtomicUsize = AtomicUsize::new(0);

fn count() {
    if TRACKED.with(|t| t.get()) {
        if inside_gemm_library() {
            LIBRARY_ALLOCS.fetch_add(1, Ordering::Relaxed);
        } else {
            ALLOCS.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Marks the calling thread and every worker of `pool` as measured.
fn track(pool: &rayon::ThreadPool) {
    TRACKED.with(|t| t.set(true));
    pool.broadcast(|_| TRACKED.with(|t| t.set(true)));
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        count();
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, n: usize) -> *mut u8 {
        count();
        unsafe { System.realloc(p, l, n) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// The counter is process-wide: tests in this file take turns.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// (allocations, GEMM calls) during 50 steps after 5 warm-up steps.
fn steps_allocate(layer: LayerConfig, threads: usize) -> (usize, usize) {
    let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
    track(&pool);
    pool.install(|| {
        let (batch, din, classes) = (64, 100, 10);
        let mut model = Classifier::new(ModelConfig { in_features: din, n_classes: classes, layer }, 0).unwrap();
        let mut rng = Rng::new(1);
        let x: Vec<f32> = (0..batch * din).map(|_| rng.normal()).collect();
        let y: Vec<u32> = (0..batch).map(|i| (i % classes) as u32).collect();
        let mut opt = AdamW::new(0.01);
        let mut step = |model: &mut Classifier, rng: &mut Rng| {
            model.zero_grad();
            model.forward_backward(&x, &y, rng).unwrap();
            let s = clip_factor(grad_norm(&mut |f| model.visit_params_mut(f)), 1.0);
            opt.step(&mut |f| model.visit_params_mut(f), 1e-3, s);
        };
        for _ in 0..5 {
            step(&mut model, &mut rng);
        }
        let (before, gemms) = (ALLOCS.load(Ordering::SeqCst), gemm_calls());
        for _ in 0..50 {
            step(&mut model, &mut rng);
        }
        (ALLOCS.load(Ordering::SeqCst) - before, gemm_calls() - gemms)
    })
}

#[test]
fn training_steps_do_not_allocate() {
    let _turn = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    for threads in [1, 2] {
        for layer in [
            LayerConfig::Dense(DenseConfig { width: 64, layers: 3, activation: Activation::Gelu }),
            LayerConfig::Fff(FffConfig { depth: 3, leaf: 8, region_leak: 0.1, dropout: 0.1, load_balance: 0.1, master_leaf: 4, ..Default::default() }),
            LayerConfig::Ufff(UfffConfig { depth: 6, ..Default::default() }),
            LayerConfig::Moe(MoeConfig { experts: 8, expert_width: 16, k: 2, capacity_factor: 1.0, ..Default::default() }),
            LayerConfig::Smoe(SmoeConfig { experts: 8, expert_width: 16, k: 2, expert_dropout: 0.1, ..Default::default() }),
            LayerConfig::Pkm(PkmConfig { n_keys: 8, heads: 2, k: 4, key_dim: 8, ..Default::default() }),
        ] {
            let (allocs, gemms) = steps_allocate(layer.clone(), threads);
            let scheduler = if threads == 1 { 2 } else { 10 };
            if matches!(layer, LayerConfig::Ufff(_)) {
                assert_eq!(gemms, 0, "a conditional tree step runs no GEMM");
            }
            assert!(allocs <= scheduler, "{allocs} allocations of ffwd's own (besides {gemms} GEMM calls) in 50 steps of {layer:?} with {threads} threads");
        }
    }
}

#[test]
fn inference_kernels_do_not_allocate_after_warm_up() {
    let _turn = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    use ffwd::kernels::Workspace;
    use ffwd::layers::{Dense, Fff, Moe, Pkm, Smoe, Ufff};
    let mut r = Rng::new(3);
    let (ni, no) = (48, 20);
    let layers: Vec<Box<dyn ffwd::layers::Layer>> = vec![
        Box::new(Fff::new(FffConfig { depth: 4, leaf: 8, master_leaf: 3, ..Default::default() }, ni, no, &mut r).unwrap()),
        Box::new(Ufff::new(UfffConfig { depth: 7, ..Default::default() }, ni, no, &mut r).unwrap()),
        Box::new(Dense::new(DenseConfig { width: 256, layers: 2, activation: Activation::Gelu }, ni, no, &mut r).unwrap()),
        Box::new(Moe::new(MoeConfig { experts: 8, expert_width: 16, k: 2, ..Default::default() }, ni, no, &mut r).unwrap()),
        Box::new(Smoe::new(SmoeConfig { experts: 8, expert_width: 16, k: 3, ..Default::default() }, ni, no, &mut r).unwrap()),
        Box::new(Pkm::new(PkmConfig { n_keys: 8, heads: 2, k: 4, key_dim: 8, ..Default::default() }, ni, no, &mut r).unwrap()),
    ];
    for threads in [1, 2] {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
        track(&pool);
        pool.install(|| {
            for layer in &layers {
                let k = layer.kernel();
                let mut ws = Workspace::new();
                for batch in [1usize, 64] {
                    let x: Vec<f32> = (0..batch * ni).map(|_| r.normal()).collect();
                    let mut y = vec![0.0; batch * no];
                    for _ in 0..3 {
                        k.forward(&x, batch, &mut y, &mut ws).unwrap();
                    }
                    let (before, gemms) = (ALLOCS.load(Ordering::SeqCst), gemm_calls());
                    for _ in 0..20 {
                        k.forward(&x, batch, &mut y, &mut ws).unwrap();
                    }
                    let (allocs, gemms) = (ALLOCS.load(Ordering::SeqCst) - before, gemm_calls() - gemms);
                    // trees never call the GEMM library; at batch 1 nothing does (routers and
                    // queries become dot products, expert segments the unpacked small kernel)
                    if matches!(k.kind(), "fff" | "ufff") || batch == 1 {
                        assert_eq!(gemms, 0, "{} batch {batch}", k.kind());
                    }
                    let scheduler = if threads == 1 { 2 } else { 4 };
                    assert!(
                        allocs <= scheduler,
                        "{} batch {batch} threads {threads}: {allocs} allocations of ffwd's own (besides {gemms} GEMM calls) in 20 calls",
                        k.kind()
                    );
                }
            }
        });
    }
}

#[test]
fn forward_forward_steps_do_not_allocate() {
    use ffwd::data::Dataset;
    use ffwd::train::forward_forward::{FfConfig, FfLayerStats, FfNet};
    let _turn = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let pool = rayon::ThreadPoolBuilder::new().num_threads(1).build().unwrap();
    track(&pool);
    pool.install(|| {
        let mut r = Rng::new(1);
        let (n, dim) = (200, 40);
        let data = Dataset { x: (0..n * dim).map(|_| r.uniform()).collect(), y: (0..n).map(|i| (i % 5) as u32).collect(), dim, n_classes: 5 };
        let mut net = FfNet::new(FfConfig { layers: vec![32, 32], ..Default::default() }, dim, 5).unwrap();
        let idx: Vec<usize> = (0..50).collect();
        let mut stats = vec![FfLayerStats::default(); 2];
        for _ in 0..3 {
            net.step(&data, &idx, 1.0, &mut r, &mut stats).unwrap();
        }
        let (before, gemms) = (ALLOCS.load(Ordering::SeqCst), gemm_calls());
        for _ in 0..20 {
            net.step(&data, &idx, 1.0, &mut r, &mut stats).unwrap();
        }
        let (allocs, gemms) = (ALLOCS.load(Ordering::SeqCst) - before, gemm_calls() - gemms);
        assert!(gemms > 0);
        assert!(allocs <= 2, "{allocs} allocations of ffwd's own (besides {gemms} GEMM calls) in 20 FF steps");
    });
}

#[test]
fn language_model_steps_do_not_allocate() {
    use ffwd::layers::HashConfig;
    use ffwd::models::{Lm, LmConfig};
    let _turn = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    for ffn in [
        LayerConfig::Dense(DenseConfig { width: 64, layers: 2, activation: Activation::Gelu }),
        LayerConfig::Hash(HashConfig { experts: 4, expert_width: 16, ..Default::default() }),
    ] {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
        track(&pool);
        let (allocs, gemms) = pool.install(|| {
            let cfg = LmConfig { vocab: 20, context: 32, d_model: 32, heads: 4, layers: 2, parallel: false, ffn: ffn.clone(), first_ffn: None };
            let mut lm = Lm::new(cfg, 0).unwrap();
            let mut r = Rng::new(2);
            let (b, t) = (4, 32);
            let x: Vec<u32> = (0..b * t).map(|_| r.below(20) as u32).collect();
            let y: Vec<u32> = (0..b * t).map(|_| r.below(20) as u32).collect();
            let mut opt = AdamW::new(0.1);
            let mut step = |lm: &mut Lm| {
                lm.zero_grad();
                lm.forward_backward(&x, &y, b, t, &mut Rng::new(0)).unwrap();
                let s = clip_factor(grad_norm(&mut |f| lm.visit_params_mut(f)), 1.0);
                opt.step(&mut |f| lm.visit_params_mut(f), 1e-3, s);
            };
            for _ in 0..3 {
                step(&mut lm);
            }
            let (before, g0) = (ALLOCS.load(Ordering::SeqCst), gemm_calls());
            for _ in 0..10 {
                step(&mut lm);
            }
            (ALLOCS.load(Ordering::SeqCst) - before, gemm_calls() - g0)
        });
        assert!(gemms > 0);
        assert!(allocs <= 10, "{allocs} allocations of ffwd's own (besides {gemms} GEMM calls) in 10 LM steps with {ffn:?}");
    }
}
