//! `ffwd::report`: the HTML page parses as XML, has one SVG per chart whose plotted values are
//! the metrics' own; `inspect` finds the neuron wired to one character.

use ffwd::data::text::CharTokenizer;
use ffwd::layers::{DenseConfig, LayerConfig};
use ffwd::models::{Lm, LmConfig};
use ffwd::prelude::*;
use ffwd::report::inspect::{inspect_lm, InspectOptions};
use ffwd::report::Report;
use serde_json::json;

fn classifier_run(layer: LayerKind, epochs: usize) -> serde_json::Value {
    let cfg = TrainConfig { layer, epochs, ..Default::default() };
    let split = DataSpec::Digits.load(cfg.holdout, cfg.seed, cfg.csv_label).unwrap();
    let run = ffwd::spec::fit_classifier(&cfg, &split, &mut ffwd::train::backprop::Silent).unwrap();
    json!({"test_accuracy": run.report.test_accuracy, "train_accuracy": run.report.train_accuracy, "params": run.model.param_count(),
           "train_samples": split.train.len(), "layer": run.model.config().layer, "history": run.report.history, "command": "test"})
}

/// The `data-points` of the series named `name` in the chart titled `title`.
fn plotted(doc: &roxmltree::Document, title: &str, name: &str) -> Vec<(f64, f64)> {
    let svg = doc.descendants().find(|n| n.has_tag_name("svg") && n.attribute("aria-label") == Some(title)).unwrap_or_else(|| panic!("no chart {title}"));
    let s = svg.descendants().find(|n| n.attribute("data-series") == Some(name)).unwrap_or_else(|| panic!("no series {name} in {title}"));
    s.attribute("data-points")
        .unwrap()
        .split_whitespace()
        .map(|p| {
            let (x, y) = p.rsplit_once(':').unwrap();
            (x.parse().unwrap_or(f64::NAN), y.parse().unwrap())
        })
        .collect()
}

#[test]
fn report_of_two_runs_plots_their_values() {
    let (dense, moe) = (classifier_run(LayerKind::Dense, 3), classifier_run(LayerKind::Moe, 3));
    let fff = classifier_run(LayerKind::Fff, 2);
    let mut report = Report::new("two runs");
    for (name, doc) in [("dense.json", &dense), ("moe.json", &moe), ("fff.json", &fff)] {
        report.add_run(name, doc.clone()).unwrap();
    }
    let html = report.render();
    let doc = roxmltree::Document::parse_with_options(&html, roxmltree::ParsingOptions { allow_dtd: true, ..Default::default() })
        .expect("the page is well-formed XML");
    let svgs = doc.descendants().filter(|n| n.has_tag_name("svg")).count();
    let figures = doc.descendants().filter(|n| n.has_tag_name("figure")).count();
    assert_eq!(svgs, figures, "one SVG per chart");
    for (name, run) in [("dense.json", &dense), ("moe.json", &moe)] {
        let want: Vec<(f64, f64)> =
            run["history"].as_array().unwrap().iter().map(|h| (h["epoch"].as_f64().unwrap(), h["train_loss"].as_f64().unwrap())).collect();
        assert_eq!(plotted(&doc, "Training loss", name), want);
        let acc = plotted(&doc, "Test accuracy (inference routing)", name);
        assert_eq!(acc.last().unwrap().1, run["history"][2]["test_accuracy"].as_f64().unwrap());
    }
    // conditional-layer charts: expert balance and load bars for moe, leaf occupancy and decision entropy for fff
    let load: Vec<f64> = moe["history"][2]["expert_load"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
    let bars = plotted(&doc, "moe.json: expert load, last epoch", "moe.json: expert load, last epoch");
    assert_eq!(bars.iter().map(|b| b.1).collect::<Vec<_>>(), load);
    assert_eq!(plotted(&doc, "Mean tree-decision entropy (hardening)", "fff.json").len(), 2);
    assert!(html.contains("fff.json: leaf occupancy on the test set, last epoch"));
    // the summary table has a row per run
    let rows = doc.descendants().filter(|n| n.has_tag_name("tr") && n.ancestors().any(|a| a.attribute("class") == Some("summary"))).count();
    assert_eq!(rows, 1 + 3);
}

#[test]
fn bad_documents_are_one_line_errors() {
    let mut report = Report::new("x");
    for doc in [json!([]), json!({}), json!({"history": []}), json!({"history": [{"foo": 1}]})] {
        let e = report.add_run("bad.json", doc).unwrap_err().to_string();
        assert!(e.starts_with("bad.json: ") && !e.contains('\n'), "{e}");
    }
    assert!(report.add_bench("b.json", "").is_err());
    assert!(report.add_bench("b.json", "{\"layer\": \"fff\"}\nnot json").unwrap_err().to_string().contains("line 2"));
    assert!(report.add_inspect("i.json", json!({"x": 1})).is_err());
}

/// A one-block LM whose FFN neuron 0 fires exactly on `target` and writes `target`'s
/// embedding: attention and positions zeroed, one-hot token embeddings.
fn wired_lm(tok: &CharTokenizer, target: char) -> Lm {
    let v = tok.len();
    let d = 24;
    let ffn = LayerConfig::Dense(DenseConfig { width: 4, ..Default::default() });
    let mut lm = Lm::new(LmConfig { vocab: v, context: 16, d_model: d, heads: 2, layers: 1, parallel: false, ffn, first_ffn: None }, 0).unwrap();
    let t = tok.encode(&target.to_string()).unwrap()[0] as usize;
    let emb_name = lm.tok_emb.name.clone();
    lm.visit_params_mut(&mut |p| {
        p.value.iter_mut().for_each(|x| *x = 0.0);
        if p.name == emb_name {
            for c in 0..v {
                p.value[c * d + c] = 1.0;
            }
        } else if p.name.contains("ln") && p.name.ends_with("weight") {
            p.value.iter_mut().for_each(|x| *x = 1.0);
        } else if p.name == "fc1.weight" {
            p.value[t] = 1.0; // row 0, column t
        } else if p.name == "fc1.bias" {
            p.value.iter_mut().for_each(|x| *x = -1.0);
        } else if p.name == "fc2.weight" {
            p.value[t * 4] = 1.0; // row t, column 0
        }
    });
    lm
}

#[test]
fn inspect_finds_the_neuron_wired_to_one_character() {
    let text = "the cat sat on the mat, then the bat ate the hat; that is that.";
    let tok = CharTokenizer::from_text(text).unwrap();
    let mut lm = wired_lm(&tok, 'a');
    let opts = InspectOptions { top: 4, context: 6, ..Default::default() };
    let mut calls = 0;
    let ins = inspect_lm(&mut lm, &tok, text, &opts, &mut |_, _| calls += 1).unwrap();
    assert!(calls > 0);
    assert_eq!(ins.chars, text.chars().count());
    let b = &ins.blocks[0];
    assert_eq!((b.ffn.as_str(), b.unit_kind.as_str(), b.units.len(), b.dead), ("dense", "neuron", 4, 3));
    let u = &b.units[0];
    assert_eq!(u.triggers.len(), 4);
    for t in &u.triggers {
        assert!(t.prefix.ends_with('a') && t.activation > 0.5, "{t:?}");
        assert_eq!(text.chars().nth(t.position), Some('a'));
    }
    let count_a = text.chars().filter(|&c| c == 'a').count() as f32;
    assert!((u.fires - count_a / ins.chars as f32).abs() < 1e-6);
    assert_eq!(u.promoted[0].0, "a");
    // the page renders it as a table
    let mut report = Report::new("inspect");
    report.add_inspect("i.json", serde_json::to_value(&ins).unwrap()).unwrap();
    let html = report.render();
    assert!(roxmltree::Document::parse_with_options(&html, roxmltree::ParsingOptions { allow_dtd: true, ..Default::default() }).is_ok());
    assert!(html.contains("Block 0 (dense FFN): 4 neurons, 3 never fired"));
}

#[test]
fn inspect_refuses_ffn_kinds_it_cannot_read() {
    let text = "abcabc";
    let tok = CharTokenizer::from_text(text).unwrap();
    let ffn = LayerConfig::Moe(Default::default());
    let mut lm = Lm::new(LmConfig { vocab: tok.len(), context: 8, d_model: 8, heads: 2, layers: 1, parallel: false, ffn, first_ffn: None }, 0).unwrap();
    let e = inspect_lm(&mut lm, &tok, text, &InspectOptions::default(), &mut |_, _| {}).unwrap_err().to_string();
    assert!(e.contains("dense (two maps), glu and ufff") && e.contains("moe"), "{e}");
}
