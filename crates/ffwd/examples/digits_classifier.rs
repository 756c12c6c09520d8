//! Train an FFF classifier on the embedded UCI digits, save it, load it back and predict.
//!
//! ```sh
//! cargo run --release --example digits_classifier
//! ```

use ffwd::prelude::*;
use ffwd::train::backprop::Silent;

fn main() -> Result<()> {
    // the run configuration: what `ffwd train --layer fff --depth 3 --width 64 --epochs 40` uses
    let mut cfg = TrainConfig { layer: LayerKind::Fff, epochs: 40, ..Default::default() };
    cfg.apply_shape(&LayerShape { depth: Some(3), width: Some(64), ..Default::default() })?;
    let split = DataSpec::Digits.load(cfg.holdout, cfg.seed, cfg.csv_label)?;
    let run = ffwd::spec::fit_classifier(&cfg, &split, &mut Silent)?;
    println!(
        "fff depth 3, {} params, {} neurons per inference: test accuracy {:.4} after {} steps ({:.2} s)",
        run.model.param_count(),
        run.model.layer().neurons_per_inference(),
        run.report.test_accuracy,
        run.report.steps,
        run.report.train_seconds
    );

    let path = std::env::temp_dir().join("ffwd-example-digits.safetensors");
    run.model.save(&path)?;
    let model = Classifier::load(&path)?;
    let first = split.test.row(0);
    let proba = model.predict_proba(first, 1)?;
    let class = model.predict(first, 1)?[0];
    println!("reloaded from {}: first test sample → class {class} (p = {:.3}), label {}", path.display(), proba[class as usize], split.test.y[0]);
    std::fs::remove_file(&path).ok();
    Ok(())
}
