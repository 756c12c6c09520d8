//! `ffwd eval`.

use std::path::PathBuf;

use clap::Args;

use ffwd::checkpoint::{format_of, load_classifier, FF_FORMAT};
use ffwd::data::csv::LabelColumn;
use ffwd::data::DataSpec;
use ffwd::kernels::Precision;
use ffwd::train::forward_forward::FfNet;

/// Options of `ffwd eval`.
#[derive(Args, Debug)]
pub struct EvalArgs {
    /// Checkpoint written by `ffwd train --save`.
    #[arg(long, value_name = "PATH")]
    model: PathBuf,
    /// Data: `digits`, `idx:DIR` or `csv:FILE`.
    #[arg(long, value_name = "SPEC", default_value = "digits")]
    data: String,
    /// Held-out fraction of a CSV file (use the training run's value to get its test split).
    #[arg(long, default_value_t = 0.2)]
    holdout: f32,
    /// Seed of the CSV held-out split (use the training run's seed).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Worker threads (0 = all cores).
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// Run inference with the layer's weights rounded to bfloat16 (ufff layers): half the
    /// memory traffic, each weight kept to 8 significant bits.
    #[arg(long)]
    bf16: bool,
}

pub fn run(a: EvalArgs) -> anyhow::Result<()> {
    super::init_threads(a.threads)?;
    let is_ff = format_of(&a.model)? == FF_FORMAT;
    let spec: DataSpec = a.data.parse()?;
    let split = spec.load(a.holdout, a.seed, LabelColumn::First)?;
    if is_ff {
        let mut net = FfNet::load(&a.model)?;
        let (test, test_g) = net.accuracy(&split.test, true)?;
        let (train, _) = net.accuracy(&split.train, false)?;
        println!(
            "test accuracy {test:.4} (softmax), {:.4} (goodness) ({} samples)  train accuracy {train:.4} ({} samples)",
            test_g.unwrap_or(0.0),
            split.test.len(),
            split.train.len()
        );
        return Ok(());
    }
    let mut model = load_classifier(&a.model)?;
    if a.bf16 {
        model.set_precision(Precision::Bf16)?;
    }
    let t0 = std::time::Instant::now();
    let test = model.accuracy(&split.test)?;
    let secs = t0.elapsed().as_secs_f64();
    let train = model.accuracy(&split.train)?;
    println!(
        "test accuracy {test:.4} ({} samples, {:.1} µs/sample)  train accuracy {train:.4} ({} samples)",
        split.test.len(),
        secs * 1e6 / split.test.len() as f64,
        split.train.len()
    );
    Ok(())
}
