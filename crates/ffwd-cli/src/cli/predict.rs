//! `ffwd predict`.

use std::io::Read;
use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::Args;

use ffwd::checkpoint::{format_of, FF_FORMAT};
use ffwd::data::csv::parse_features;
use ffwd::kernels::Precision;
use ffwd::models::Classifier;
use ffwd::train::forward_forward::FfNet;

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
    /// Run inference with the layer's weight matrices rounded to bfloat16 (dense, ufff, fff
    /// leaves, moe/smoe/moefied experts).
    #[arg(long)]
    bf16: bool,
}

pub fn run(a: PredictArgs) -> anyhow::Result<()> {
    // a Forward-Forward checkpoint predicts with its softmax head (one neutral-label pass)
    let mut ff = if format_of(&a.model)? == FF_FORMAT { Some(FfNet::load(&a.model)?) } else { None };
    let mut model = if ff.is_none() { Some(Classifier::load(&a.model)?) } else { None };
    match (&mut model, a.bf16) {
        (Some(m), true) => m.set_precision(Precision::Bf16)?,
        (None, true) => bail!("--bf16: Forward-Forward checkpoints run in f32 only"),
        _ => {}
    }
    let (text, name) = match &a.input {
        Some(p) => (std::fs::read_to_string(p).with_context(|| p.display().to_string())?, p.display().to_string()),
        None => {
            let mut s = String::new();
            std::io::stdin().read_to_string(&mut s).context("reading stdin")?;
            (s, "<stdin>".to_string())
        }
    };
    let dim = match (&ff, &model) {
        (Some(f), _) => f.in_features(),
        (None, Some(m)) => m.config().in_features,
        (None, None) => unreachable!("one of the two loaded"),
    };
    let (x, rows) = parse_features(&text, dim, &name)?;
    let pred = match (&mut ff, &model) {
        (Some(f), _) => {
            let mut p = vec![0u32; rows];
            f.predict_softmax(&x, rows, &mut p);
            p
        }
        (None, Some(m)) => m.predict(&x, rows)?,
        (None, None) => unreachable!("one of the two loaded"),
    };
    let mut out = String::with_capacity(rows * 3);
    for p in pred {
        out.push_str(&p.to_string());
        out.push('\n');
    }
    print!("{out}");
    Ok(())
}
