//! Subcommands of the `ffwd` binary.

mod bench;
mod convert;
mod eval;
mod forecast;
mod inspect;
mod lm;
mod parallel;
mod predict;
mod report;
mod serve;
mod train;

use clap::{Parser, Subcommand};

/// The `ffwd` command line (its `--help` summary is the crate's description).
#[derive(Parser, Debug)]
#[command(name = "ffwd", version, about, long_about = None, args_override_self = true)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Train a classifier (default: dense FFN on the embedded UCI digits) and optionally save it.
    Train(Box<train::TrainArgs>),
    /// Evaluate a saved classifier on a data set (train and test accuracy).
    Eval(eval::EvalArgs),
    /// Predict classes for feature rows read from a file or stdin, one per line.
    Predict(predict::PredictArgs),
    /// Benchmark the inference kernels (fff, ufff, smoe, moe, pkm) against dense layers of
    /// equal width, or a trained checkpoint end to end (--model; classifiers and LMs).
    Bench(bench::BenchArgs),
    /// Character-level transformer language model with any FFN kind: train, sample.
    #[command(subcommand)]
    Lm(lm::LmCommand),
    /// Forecast a time series with AR-Net (sparse linear AR plus any FFN): train, predict.
    #[command(subcommand)]
    Forecast(forecast::ForecastCommand),
    /// One self-contained HTML page with inline SVG charts from training metrics, benchmark
    /// and inspection files.
    Report(report::ReportArgs),
    /// What a trained LM's FFN units respond to (top trigger contexts) and what they promote
    /// through the output embedding (Geva et al. 2021), as JSON.
    Inspect(inspect::InspectArgs),
    /// Serve classifiers and language models over HTTP (dynamic batching, streaming).
    Serve(serve::ServeArgs),
    /// Convert a trained checkpoint: quantize (Q8_0/Q4_0), MoEfy, low-rank, prune experts,
    /// import `fastfeedforward`.
    #[command(subcommand)]
    Convert(convert::ConvertCommand),
}

/// Parses the command line and runs the subcommand.
pub fn run() -> anyhow::Result<()> {
    let cli = Cli::parse();
    ffwd::core::cpu::check_env()?;
    #[cfg(feature = "mpi")]
    let _mpi = parallel::init()?;
    let result = dispatch(cli);
    #[cfg(feature = "mpi")]
    if let Err(e) = &result {
        parallel::fail(e);
    }
    result
}

fn dispatch(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Train(a) => train::run(*a),
        Command::Eval(a) => eval::run(a),
        Command::Predict(a) => predict::run(a),
        Command::Bench(a) => bench::run(a),
        Command::Lm(c) => lm::run(c),
        Command::Forecast(c) => forecast::run(c),
        Command::Report(a) => report::run(a),
        Command::Inspect(a) => inspect::run(a),
        Command::Serve(a) => serve::run(a),
        Command::Convert(c) => convert::run(c),
    }
}

/// Says once, on stderr, that bf16 weight rows are slow on this CPU: their widening kernels
/// are AVX-512 only, the portable fallback is slower than f32.
pub(crate) fn note_bf16_speed() {
    if !ffwd::core::cpu::avx512() {
        eprintln!("note: this CPU has no AVX-512, so bf16 weights run a portable path that is slower than f32 (accuracy is unaffected)");
    }
}

/// Sizes rayon's global pool (0 = one thread per core; under mpirun, the cores shared among
/// the host's ranks).
pub(crate) fn init_threads(threads: usize) -> anyhow::Result<usize> {
    let threads = if threads == 0 { parallel::default_threads() } else { threads };
    if threads > 0 {
        rayon::ThreadPoolBuilder::new().num_threads(threads).build_global()?;
    }
    Ok(rayon::current_num_threads())
}
