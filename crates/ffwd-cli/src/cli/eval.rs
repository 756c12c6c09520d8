//! `ffwd eval`.

use std::path::PathBuf;

use clap::Args;

use ffwd::checkpoint::{CheckpointReader, FF_FORMAT, TRAIN_KEY};
use ffwd::config::TrainConfig;
use ffwd::data::csv::LabelColumn;
use ffwd::data::DataSpec;
use ffwd::kernels::Precision;
use ffwd::models::Classifier;
use ffwd::train::forward_forward::FfNet;

/// Options of `ffwd eval`. The data options default to those of the run that saved the model
/// (stored in its checkpoint), so `ffwd eval --model m.safetensors` evaluates on the run's own
/// test split; `--config` takes them from a training config file instead, and flags override
/// both.
#[derive(Args, Debug)]
pub struct EvalArgs {
    /// Checkpoint written by `ffwd train --save`.
    #[arg(long, value_name = "PATH")]
    model: PathBuf,
    /// TOML run configuration whose data options (data, holdout, seed, csv_label) to use.
    #[arg(long, value_name = "FILE.toml")]
    config: Option<PathBuf>,
    /// Data: `digits`, `idx:DIR` or `csv:FILE` [default: the training run's].
    #[arg(long, value_name = "SPEC")]
    data: Option<String>,
    /// Held-out fraction of a CSV file [default: the training run's, else 0.2].
    #[arg(long)]
    holdout: Option<f32>,
    /// Seed of the CSV held-out split [default: the training run's, else 0].
    #[arg(long)]
    seed: Option<u64>,
    /// Which CSV column holds the label: first or last [default: the training run's, else first].
    #[arg(long, value_parser = parse_label)]
    csv_label: Option<LabelColumn>,
    /// Worker threads (0 = all cores).
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// Run inference with the layer's weight matrices rounded to bfloat16 (dense, ufff, fff
    /// leaves, moe/smoe/moefied experts): half the memory traffic, each weight kept to 8
    /// significant bits.
    #[arg(long)]
    bf16: bool,
}

pub(crate) fn parse_label(s: &str) -> Result<LabelColumn, String> {
    match s {
        "first" => Ok(LabelColumn::First),
        "last" => Ok(LabelColumn::Last),
        _ => Err(format!("unknown label column `{s}` (first, last)")),
    }
}

pub fn run(a: EvalArgs) -> anyhow::Result<()> {
    super::init_threads(a.threads)?;
    let ck = CheckpointReader::open(&a.model)?;
    // data options: flags > --config > the checkpoint's run > defaults
    let base = match &a.config {
        Some(p) => TrainConfig::from_toml_file(p)?,
        None => ck.json_opt::<TrainConfig>(TRAIN_KEY).ok().flatten().unwrap_or_default(),
    };
    let data = a.data.clone().unwrap_or(base.data);
    let spec: DataSpec = data.parse()?;
    let split = spec.load(a.holdout.unwrap_or(base.holdout), a.seed.unwrap_or(base.seed), a.csv_label.unwrap_or(base.csv_label))?;
    if ck.format() == FF_FORMAT {
        anyhow::ensure!(!a.bf16, "--bf16: Forward-Forward checkpoints run in f32 only");
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
    let mut model = Classifier::from_checkpoint(&ck)?;
    drop(ck);
    if a.bf16 {
        model.set_precision(Precision::Bf16)?;
        super::note_bf16_speed();
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
