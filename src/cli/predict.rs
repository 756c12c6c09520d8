//! `ffwd predict`.

use std::io::Read;
use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::Args;

use ffwd::checkpoint::load_classifier;

/// Options of `ffwd predict`.
#[derive(Args, Debug)]
pub struct PredictArgs {
    /// Checkpoint written by `ffwd train --save`.
    #[arg(long, value_name = "PATH")]
    model: PathBuf,
    /// File with one sample per line (features separated by commas or spaces, no label);
    /// reads stdin when absent.
    #[arg(long, value_name = "FILE")]
    input: Option<PathBuf>,
}

pub fn run(a: PredictArgs) -> anyhow::Result<()> {
    let model = load_classifier(&a.model)?;
    let (text, name) = match &a.input {
        Some(p) => (std::fs::read_to_string(p).with_context(|| p.display().to_string())?, p.display().to_string()),
        None => {
            let mut s = String::new();
            std::io::stdin().read_to_string(&mut s).context("reading stdin")?;
            (s, "<stdin>".to_string())
        }
    };
    let dim = model.config().in_features;
    let mut x = Vec::new();
    let mut rows = 0;
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let fields: Vec<&str> = if line.contains(',') { line.split(',').map(str::trim).collect() } else { line.split_whitespace().collect() };
        if fields.len() != dim {
            bail!("{name}: line {}: {} features, the model expects {dim}", i + 1, fields.len());
        }
        for (c, f) in fields.iter().enumerate() {
            let v: f32 = f.parse().map_err(|_| anyhow::anyhow!("{name}: line {}, column {}: `{f}` is not a number", i + 1, c + 1))?;
            if !v.is_finite() {
                bail!("{name}: line {}, column {}: non-finite value", i + 1, c + 1);
            }
            x.push(v);
        }
        rows += 1;
    }
    if rows == 0 {
        bail!("{name}: no samples");
    }
    let pred = model.predict(&x, rows)?;
    let mut out = String::with_capacity(rows * 3);
    for p in pred {
        out.push_str(&p.to_string());
        out.push('\n');
    }
    print!("{out}");
    Ok(())
}
