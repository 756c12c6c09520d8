//! `ffwd forecast train` and `ffwd forecast predict`: AR-Net forecasting of one series.

use std::io::Write;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;

use ffwd::config::{LayerKind, LayerShape};
use ffwd::core::Activation;
use ffwd::data::timeseries::{read_series, Fill};
use ffwd::models::Forecaster;
use ffwd::train::forecast::{fit_forecaster, ForecastOptions, ForecastReport};

use super::train::{flag_names, parse_activation};

/// `ffwd forecast …`.
#[derive(Subcommand, Debug)]
pub enum ForecastCommand {
    /// Train an AR-Net forecaster (linear AR with a sparsity regulariser, plus any FFN) on one
    /// column of a CSV series; reports MAE, RMSE and MASE against seasonal-naive and a
    /// least-squares AR.
    Train(Box<ForecastTrainArgs>),
    /// Forecast the next --horizon values after the end of a series with a trained model
    /// (CSV: step, time, forecast).
    Predict(ForecastPredictArgs),
}

/// Options of `ffwd forecast train`.
#[derive(Args, Debug)]
pub struct ForecastTrainArgs {
    /// CSV file with a header: a timestamp column first (YYYY, YYYYMMDD, YYYY-MM-DD, YYYY-MM or
    /// Mon-D-YYYY), then value columns.
    #[arg(long, value_name = "FILE.csv")]
    data: PathBuf,
    /// Value column to forecast [default: the last column].
    #[arg(long, value_name = "NAME")]
    column: Option<String>,
    /// Missing values (skipped timestamps, empty or NA cells): none = refuse the file, linear =
    /// interpolate.
    #[arg(long, default_value = "none")]
    fill: Fill,
    /// Past values the model reads (p); with --sparsity, give more than needed.
    #[arg(long, default_value_t = 12)]
    lags: usize,
    /// Steps ahead predicted directly (h).
    #[arg(long, default_value_t = 1)]
    horizon: usize,
    /// FFN added to the linear AR map: none (linear AR-Net), dense, glu, lowrank, blockdense,
    /// blockshuffle, deq, fff, ufff, moe, smoe or pkm [default: none].
    #[arg(long, value_name = "KIND")]
    ffn: Option<String>,
    /// FFN hidden width (as `ffwd train --width`).
    #[arg(long)]
    width: Option<usize>,
    /// fff/ufff depth.
    #[arg(long)]
    depth: Option<usize>,
    /// ufff parallel trees.
    #[arg(long)]
    trees: Option<usize>,
    /// lowrank rank.
    #[arg(long)]
    rank: Option<usize>,
    /// fff leaf width.
    #[arg(long)]
    leaf: Option<usize>,
    /// moe/smoe experts.
    #[arg(long)]
    experts: Option<usize>,
    /// moe/smoe experts per input; pkm values per head.
    #[arg(long)]
    top_k: Option<usize>,
    /// FFN activation: relu, gelu or silu.
    #[arg(long, value_parser = parse_activation)]
    activation: Option<Activation>,
    /// AR-Net sparsity regulariser weight λ on the AR weights (0 = off).
    #[arg(long, default_value_t = 0.0)]
    sparsity: f32,
    /// Passes over the training windows.
    #[arg(long, default_value_t = 200)]
    epochs: usize,
    /// Windows per minibatch.
    #[arg(long, default_value_t = 32)]
    batch: usize,
    /// Peak learning rate (AdamW, cosine decay).
    #[arg(long, default_value_t = 0.01)]
    lr: f32,
    /// Weight decay of the FFN's weights.
    #[arg(long, default_value_t = 0.0)]
    weight_decay: f32,
    /// Global gradient-norm clip (0 = off).
    #[arg(long, default_value_t = 0.0)]
    clip: f32,
    /// Fraction of the series (after the training part) for validation.
    #[arg(long, default_value_t = 0.15)]
    val_fraction: f32,
    /// Fraction of the series (the end) for testing.
    #[arg(long, default_value_t = 0.15)]
    test_fraction: f32,
    /// Seasonal period in steps for seasonal-naive and MASE [default: 12 monthly, 52 weekly, 7
    /// daily, else 1].
    #[arg(long)]
    season: Option<usize>,
    /// A lag counts as used when its AR weight reaches this magnitude (standardised units).
    #[arg(long, default_value_t = 0.05)]
    lag_threshold: f32,
    /// Keep the weights of the epoch with the lowest validation error (default: the last epoch's).
    #[arg(long)]
    keep_best: bool,
    /// Seed of initialisation and shuffling.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Gradient noise η (0 = off).
    #[arg(long, default_value_t = 0.0, value_name = "ETA")]
    grad_noise: f32,
    /// Gradient noise decay γ.
    #[arg(long, default_value_t = 0.55, value_name = "GAMMA")]
    grad_noise_gamma: f32,
    /// Save the trained model (`.safetensors`).
    #[arg(long, value_name = "PATH")]
    save: Option<PathBuf>,
    /// Write the report (per-split metrics, AR weights, history) as JSON here.
    #[arg(long, value_name = "PATH")]
    metrics: Option<PathBuf>,
    /// Worker threads (0 = all cores).
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// No progress bar.
    #[arg(long)]
    quiet: bool,
}

/// Options of `ffwd forecast predict`.
#[derive(Args, Debug)]
pub struct ForecastPredictArgs {
    /// Checkpoint written by `ffwd forecast train --save`.
    #[arg(long, value_name = "PATH")]
    model: PathBuf,
    /// CSV series whose end the forecast starts from (as in training).
    #[arg(long, value_name = "FILE.csv")]
    data: PathBuf,
    /// Value column [default: the model's column].
    #[arg(long, value_name = "NAME")]
    column: Option<String>,
    /// Missing values: none or linear.
    #[arg(long, default_value = "none")]
    fill: Fill,
    /// Write the CSV here [default: stdout].
    #[arg(long, value_name = "PATH")]
    out: Option<PathBuf>,
}

/// Runs `ffwd forecast …`.
pub fn run(cmd: ForecastCommand) -> anyhow::Result<()> {
    match cmd {
        ForecastCommand::Train(a) => train(*a),
        ForecastCommand::Predict(a) => predict(a),
    }
}

fn train(a: ForecastTrainArgs) -> anyhow::Result<()> {
    let threads = super::init_threads(a.threads)?;
    let series = read_series(&a.data, a.column.as_deref(), a.fill)?;
    let shape = LayerShape {
        width: a.width,
        depth: a.depth,
        trees: a.trees,
        rank: a.rank,
        leaf: a.leaf,
        experts: a.experts,
        top_k: a.top_k,
        activation: a.activation,
        ..Default::default()
    };
    let layer = match a.ffn.as_deref() {
        None | Some("none") => {
            if shape != LayerShape::default() {
                anyhow::bail!("--width, --depth, --trees, --rank, --leaf, --experts, --top-k and --activation shape the FFN: give --ffn too");
            }
            None
        }
        Some(k) => {
            let kind: LayerKind = k.parse().map_err(|e: ffwd::Error| anyhow::anyhow!("--ffn: {}", e.to_string().trim_start_matches("config: ")))?;
            Some(ffwd::spec::layer(kind, &shape).map_err(|e| anyhow::anyhow!("{}", flag_names(&e.to_string())))?)
        }
    };
    let opts = ForecastOptions {
        lags: a.lags,
        horizon: a.horizon,
        layer,
        sparsity: a.sparsity,
        epochs: a.epochs,
        batch: a.batch,
        lr: a.lr,
        weight_decay: a.weight_decay,
        clip: a.clip,
        val_fraction: a.val_fraction,
        test_fraction: a.test_fraction,
        season: a.season,
        lag_threshold: a.lag_threshold,
        keep_best: a.keep_best,
        seed: a.seed,
        grad_noise: a.grad_noise,
        grad_noise_gamma: a.grad_noise_gamma,
    };
    eprintln!(
        "series {} column `{}`: {} {} values ({} filled) | lags {} horizon {} | {} | {threads} threads",
        a.data.display(),
        series.column,
        series.len(),
        series.freq.name(),
        series.filled,
        a.lags,
        a.horizon,
        opts.layer.as_ref().map_or("linear AR-Net".to_string(), |l| format!("AR-Net + {} FFN", l.kind())),
    );
    let pb = if a.quiet { ProgressBar::hidden() } else { ProgressBar::new(opts.epochs as u64) };
    pb.set_style(
        ProgressStyle::with_template("{elapsed_precise} [{bar:30}] {pos}/{len} epochs  {msg}  ETA {eta}").expect("static template").progress_chars("=> "),
    );
    let (model, report) = fit_forecaster(&series, &opts, &mut |e| {
        pb.set_message(format!("train mse {:.4}  val mse {:.4}", e.train_mse, e.val_mse));
        pb.inc(1);
    })?;
    pb.finish_and_clear();
    print_report(&report);
    if let Some(path) = &a.save {
        model.save(path)?;
        println!("saved {}", path.display());
    }
    if let Some(path) = &a.metrics {
        let doc = json!({
            "command": std::env::args().collect::<Vec<_>>().join(" "),
            "data": a.data.display().to_string(),
            "options": opts,
            "report": report,
        });
        let text = serde_json::to_string_pretty(&doc)?;
        std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

fn print_report(r: &ForecastReport) {
    println!(
        "params {} | weights of epoch {} of {} (best validation epoch {}) | {:.3} s training",
        r.params,
        r.kept_epoch,
        r.history.len(),
        r.best_epoch,
        r.train_seconds
    );
    println!("{:<6} {:>7}  {:>22}  {:>22}  {:>22}", "split", "windows", "model MAE/RMSE/MASE", "seasonal-naive", "least-squares AR");
    let f = |m: &ffwd::train::forecast::Metrics| format!("{:.3}/{:.3}/{:.3}", m.mae, m.rmse, m.mase);
    for s in &r.metrics {
        println!("{:<6} {:>7}  {:>22}  {:>22}  {:>22}", s.split, s.windows, f(&s.model), f(&s.seasonal_naive), f(&s.ar_least_squares));
    }
    println!("season {} | lags used (|w| ≥ threshold): {:?} | least-squares AR order by AIC {}, by BIC {}", r.season, r.active_lags, r.aic_order, r.bic_order);
}

fn predict(a: ForecastPredictArgs) -> anyhow::Result<()> {
    let model = Forecaster::load(&a.model)?;
    let cfg = model.config();
    let column = a.column.clone().unwrap_or_else(|| cfg.column.clone());
    let series = read_series(&a.data, Some(&column), a.fill)?;
    if series.freq != cfg.freq {
        anyhow::bail!("{}: the series is {}, the model was trained on {} data", a.data.display(), series.freq.name(), cfg.freq.name());
    }
    let next = model.forecast(&series.values)?;
    let last = *series.times.last().context("empty series")?;
    let mut out = String::from("step,time,forecast\n");
    for (k, v) in next.iter().enumerate() {
        out.push_str(&format!("{},{},{}\n", k + 1, last.advance(cfg.freq, k as i64 + 1).format(cfg.freq), v));
    }
    match &a.out {
        Some(path) => std::fs::write(path, out).with_context(|| format!("writing {}", path.display()))?,
        None => std::io::stdout().write_all(out.as_bytes())?,
    }
    Ok(())
}
