//! Load a trained `fastfeedforward` FFF (its state dict as safetensors) and run it through
//! ffwd's conditional inference kernel.
//!
//! ```sh
//! # in Python: safetensors.torch.save_file(fff.state_dict(), "fff.safetensors")
//! cargo run --release --example fastfeedforward_interop -- fff.safetensors
//! ```
//!
//! Without an argument it loads the depth-3 fixture of the interop tests.

use std::path::PathBuf;
use std::time::Instant;

use ffwd::convert::fastfeedforward::load_fff;
use ffwd::prelude::*;

fn main() -> Result<()> {
    let path = std::env::args_os()
        .nth(1)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/fff_d3_state.safetensors"));
    // the package does not store its activation: pass the one the module was built with
    let fff = load_fff(&path, Activation::Relu)?;
    let (ni, no) = (fff.in_features(), fff.out_features());
    println!("{}: depth {}, leaf {}, {ni} → {no}", path.display(), fff.cfg().depth, fff.cfg().leaf);

    let kernel = fff.kernel(); // immutable: build once, call many times
    let batch = 256;
    let mut rng = Rng::new(0);
    let x: Vec<f32> = (0..batch * ni).map(|_| rng.normal()).collect();
    let mut y = vec![0.0f32; batch * no];
    let mut ws = Workspace::new();
    kernel.forward(&x, batch, &mut y, &mut ws)?;
    let rounds = 200;
    let t0 = Instant::now();
    for _ in 0..rounds {
        kernel.forward(&x, batch, &mut y, &mut ws)?;
    }
    let us = t0.elapsed().as_secs_f64() * 1e6 / rounds as f64;
    println!("batch {batch}: {us:.1} µs per call, {} neurons per sample; y[0] = {:?}", kernel.neurons_per_inference(), &y[..no.min(4)]);
    Ok(())
}
