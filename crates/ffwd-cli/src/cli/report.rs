//! `ffwd report`: one self-contained HTML page with inline SVG charts from metrics, benchmark
//! and inspection files.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;

use ffwd::report::Report;

/// Options of `ffwd report`.
#[derive(Args, Debug)]
pub struct ReportArgs {
    /// Metrics files of training runs (`--metrics` of ffwd train, lm train, forecast train);
    /// runs of the same kind are overlaid in one chart per quantity.
    #[arg(value_name = "RUN.json")]
    runs: Vec<PathBuf>,
    /// Output of `ffwd bench --json` (speedup-vs-batch curves per layer).
    #[arg(long, value_name = "BENCH.json")]
    bench: Vec<PathBuf>,
    /// Output of `ffwd inspect` (a searchable table of FFN units).
    #[arg(long, value_name = "INSPECT.json")]
    inspect: Option<PathBuf>,
    /// Page title.
    #[arg(long, default_value = "ffwd report")]
    title: String,
    /// Where to write the HTML file.
    #[arg(long, value_name = "PATH")]
    out: PathBuf,
}

fn read_json(path: &PathBuf) -> anyhow::Result<serde_json::Value> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text).map_err(|e| anyhow::anyhow!("{}: not JSON ({e})", path.display()))
}

/// Runs `ffwd report`.
pub fn run(a: ReportArgs) -> anyhow::Result<()> {
    if a.runs.is_empty() && a.bench.is_empty() && a.inspect.is_none() {
        anyhow::bail!("nothing to report: give metrics files, --bench or --inspect");
    }
    let mut report = Report::new(&a.title);
    for path in &a.runs {
        let name = path.file_name().map_or_else(|| path.display().to_string(), |n| n.to_string_lossy().to_string());
        report.add_run(&name, read_json(path)?)?;
    }
    for path in &a.bench {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        report.add_bench(&path.display().to_string(), &text)?;
    }
    if let Some(path) = &a.inspect {
        report.add_inspect(&path.display().to_string(), read_json(path)?)?;
    }
    ffwd::checkpoint::write_atomic(&a.out, report.render().as_bytes())?;
    println!("wrote {}", a.out.display());
    Ok(())
}
