//! Train a small character-level transformer with an UltraFastBERT-tree FFN on the embedded
//! tiny-shakespeare for a few hundred steps, then sample from it.
//!
//! ```sh
//! cargo run --release --example tiny_lm            # 300 steps, a few seconds on 2 cores
//! cargo run --release --example tiny_lm -- 40      # fewer steps
//! ```

use ffwd::data::text::tiny_shakespeare;
use ffwd::prelude::*;
use ffwd::spec::{FfnKind, FfnShape};
use ffwd::train::lm::{train_lm, LmTrainState, Quiet};

fn main() -> Result<()> {
    let steps = match std::env::args().nth(1) {
        Some(s) => s.parse().map_err(|_| Error::Invalid(format!("steps `{s}` is not a number")))?,
        None => 300,
    };
    let mut run = LmRunConfig::default();
    (run.model.d_model, run.model.heads, run.model.layers, run.model.context) = (64, 4, 2, 64);
    (run.train.steps, run.train.seq_len, run.train.eval_every) = (steps, 0, steps);
    // two parallel trees of depth 5 (63 neurons each, 12 evaluated per token)
    let ffn = FfnShape { ffn: Some(FfnKind::Ufff), depth: Some(5), trees: Some(2), ..Default::default() };
    let text = tiny_shakespeare()?;
    let built = ffwd::spec::lm(&run, &ffn, &text)?;
    let (mut lm, mut opt, mut state) = (built.lm, ffwd::optim::AdamW::new(0.0), LmTrainState::default());
    train_lm(&mut lm, &built.data, &built.options, &mut opt, &mut state, None, None, &mut Quiet)?;
    if let Some(e) = state.history.last() {
        println!(
            "{} params; after {} steps: val loss {:.3} nats/char ({:.2} bpc), {:.0} s",
            lm.param_count(),
            state.step,
            e.val_loss,
            e.val_bpc,
            state.seconds
        );
    }
    let ck = LmCheckpoint { lm, tokenizer: built.tokenizer, options: built.options, state, optimizer: opt };
    println!("---\n{}", ck.generate_text("ROMEO:", 200, 0.8, 0, 1)?);
    Ok(())
}
