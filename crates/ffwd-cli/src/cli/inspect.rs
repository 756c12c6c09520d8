//! `ffwd inspect`: what the FFN units of a trained LM respond to and what they promote.

use std::path::PathBuf;

use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};

use ffwd::data::text::read_text;
use ffwd::report::inspect::{inspect_lm, InspectOptions};
use ffwd::train::lm::LmCheckpoint;

/// Options of `ffwd inspect`.
#[derive(Args, Debug)]
pub struct InspectArgs {
    /// LM checkpoint (`ffwd lm train --save`) with dense (two maps), glu or ufff FFNs.
    #[arg(long, value_name = "PATH")]
    model: PathBuf,
    /// UTF-8 text to stream through the model (characters outside its vocabulary are an error).
    #[arg(long, value_name = "FILE")]
    text: PathBuf,
    /// Only the last this fraction of the text (e.g. 0.1: the held-out tenth of the LM's run).
    #[arg(long, default_value_t = 1.0)]
    tail: f64,
    /// Trigger positions kept per unit.
    #[arg(long, default_value_t = 5)]
    top: usize,
    /// Characters of context shown per trigger.
    #[arg(long, default_value_t = 24)]
    context: usize,
    /// Where to write the JSON.
    #[arg(long, value_name = "PATH")]
    out: PathBuf,
    /// Worker threads (0 = all cores).
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// No progress bar.
    #[arg(long)]
    quiet: bool,
}

/// Runs `ffwd inspect`.
pub fn run(a: InspectArgs) -> anyhow::Result<()> {
    super::init_threads(a.threads)?;
    anyhow::ensure!(a.tail > 0.0 && a.tail <= 1.0, "--tail must be in (0, 1], got {}", a.tail);
    let mut ck = LmCheckpoint::load(&a.model)?;
    let text = read_text(&a.text)?;
    let n = text.chars().count();
    let skip = n - ((n as f64 * a.tail).round() as usize).min(n);
    let text: String = text.chars().skip(skip).collect();
    let opts = InspectOptions { top: a.top, context: a.context, ..Default::default() };
    let pb = if a.quiet { ProgressBar::hidden() } else { ProgressBar::new(0) };
    pb.set_style(ProgressStyle::with_template("{elapsed_precise} [{bar:30}] {pos}/{len} windows  ETA {eta}").expect("static template").progress_chars("=> "));
    let ins = inspect_lm(&mut ck.lm, &ck.tokenizer, &text, &opts, &mut |done, total| {
        pb.set_length(total as u64);
        pb.set_position(done as u64);
    })?;
    pb.finish_and_clear();
    ffwd::checkpoint::write_atomic(&a.out, serde_json::to_string(&ins)?.as_bytes())?;
    for b in &ins.blocks {
        println!("block {} ({} FFN): {} {}s, {} never fired, mean agreement {:.3}", b.block, b.ffn, b.units.len(), b.unit_kind, b.dead, b.mean_agreement);
    }
    println!("{} characters in {:.1} s; wrote {}", ins.chars, ins.seconds, a.out.display());
    Ok(())
}
