//! A training step allocates nothing once its buffers are sized, apart from the packing
//! buffers the `gemm` crate allocates inside each of its calls (at most two per call):
//! counted with a wrapping global allocator over many steps of every layer kind.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use ffwd::core::gemm::gemm_calls;
use ffwd::core::{Activation, Rng};
use ffwd::layers::{DenseConfig, FffConfig, LayerConfig, UfffConfig};
use ffwd::models::{Classifier, ModelConfig};
use ffwd::optim::{clip_factor, grad_norm, AdamW, Optimizer};

struct Counting;
static ALLOCS: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, n: usize) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        unsafe { System.realloc(p, l, n) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// (allocations, GEMM calls) during 50 steps after 5 warm-up steps.
fn steps_allocate(layer: LayerConfig, threads: usize) -> (usize, usize) {
    let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
    pool.install(|| {
        let (batch, din, classes) = (64, 100, 10);
        let mut model = Classifier::new(ModelConfig { in_features: din, n_classes: classes, layer }, 0).unwrap();
        let mut rng = Rng::new(1);
        let x: Vec<f32> = (0..batch * din).map(|_| rng.normal()).collect();
        let y: Vec<u32> = (0..batch).map(|i| (i % classes) as u32).collect();
        let mut opt = AdamW::new(0.01);
        let mut step = |model: &mut Classifier, rng: &mut Rng| {
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
    for threads in [1, 2] {
        for layer in [
            LayerConfig::Dense(DenseConfig { width: 64, layers: 3, activation: Activation::Gelu }),
            LayerConfig::Fff(FffConfig { depth: 3, leaf: 8, region_leak: 0.1, dropout: 0.1, load_balance: 0.1, master_leaf: 4, ..Default::default() }),
            LayerConfig::Ufff(UfffConfig { depth: 6, ..Default::default() }),
        ] {
            let (allocs, gemms) = steps_allocate(layer.clone(), threads);
            assert!(allocs <= 2 * gemms, "{allocs} allocations for {gemms} GEMM calls in 50 steps of {layer:?} with {threads} threads");
            if matches!(layer, LayerConfig::Ufff(_)) {
                // no GEMM in a conditional tree step: nothing may allocate
                assert_eq!((allocs, gemms), (0, 0), "{layer:?} with {threads} threads");
            }
        }
    }
}
