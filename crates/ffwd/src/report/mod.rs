//! Reports a person can look at: one self-contained HTML page with inline SVG charts (no
//! network, no script needed to see them) from the metrics JSON of training runs
//! (`ffwd train`, `ffwd lm train`, `ffwd forecast train`), the JSON lines of `ffwd bench
//! --json`, and the unit table of `ffwd inspect` ([`inspect`]).
//!
//! ```
//! use ffwd::report::Report;
//!
//! let run = serde_json::json!({"params": 100, "test_accuracy": 0.9, "train_seconds": 1.0,
//!     "history": [{"epoch": 1, "train_loss": 1.0, "test_accuracy": 0.8, "lr": 0.01, "seconds": 0.5},
//!                 {"epoch": 2, "train_loss": 0.5, "test_accuracy": 0.9, "lr": 0.005, "seconds": 0.5}]});
//! let mut report = Report::new("example");
//! report.add_run("dense.json", run)?;
//! let html = report.render();
//! assert!(html.contains("<svg") && html.contains(r#"data-points="1:1 2:0.5""#));
//! # Ok::<(), ffwd::Error>(())
//! ```

pub mod inspect;
pub mod svg;

use std::fmt::Write;

use serde_json::Value;

use crate::error::{Error, Result};
use svg::{escape, BarChart, LineChart, Series};

/// What kind of run a metrics document describes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RunKind {
    /// `ffwd train` (backprop classifier).
    Classifier,
    /// `ffwd train --algo ff`.
    ForwardForward,
    /// `ffwd lm train`.
    Lm,
    /// `ffwd forecast train`.
    Forecast,
}

/// One benchmarked layer: its label, (batch, speedup over ffwd's dense layer) and (batch,
/// speedup over PyTorch's dense layer).
type BenchCurves = (String, Vec<(f64, f64)>, Vec<(f64, f64)>);

struct Run {
    name: String,
    kind: RunKind,
    doc: Value,
}

/// A report under construction: runs, benchmark records and an inspection table.
pub struct Report {
    title: String,
    runs: Vec<Run>,
    bench: Vec<Value>,
    inspect: Option<Value>,
}

fn num(v: &Value, key: &str) -> Option<f64> {
    v.get(key).and_then(Value::as_f64)
}

fn history(doc: &Value) -> &[Value] {
    doc.get("history").or_else(|| doc.get("report").and_then(|r| r.get("history"))).and_then(Value::as_array).map_or(&[], Vec::as_slice)
}

/// Classifies a metrics document by its keys.
pub fn run_kind(doc: &Value) -> Option<RunKind> {
    let first = history(doc).first()?;
    if doc.get("algo").and_then(Value::as_str) == Some("ff") {
        Some(RunKind::ForwardForward)
    } else if first.get("val_loss").is_some() && first.get("step").is_some() {
        Some(RunKind::Lm)
    } else if first.get("train_mse").is_some() {
        Some(RunKind::Forecast)
    } else if first.get("train_loss").is_some() && first.get("epoch").is_some() {
        Some(RunKind::Classifier)
    } else {
        None
    }
}

/// The coefficient of variation (std / mean) of non-negative shares.
fn cv(v: &[f64]) -> f64 {
    let n = v.len().max(1) as f64;
    let mean = v.iter().sum::<f64>() / n;
    if mean <= 0.0 {
        return 0.0;
    }
    (v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n).sqrt() / mean
}

/// A bar chart of each unit's share (bars labelled by index) with the uniform share as the
/// reference line.
fn share_bars(title: String, unit: &str, y_label: &str, shares: &[f64]) -> String {
    let bars = shares.iter().enumerate().map(|(i, v)| (i.to_string(), *v)).collect();
    let uniform = 1.0 / shares.len().max(1) as f64;
    BarChart { title, x_label: unit.into(), y_label: y_label.into(), bars, reference: Some(uniform) }.to_svg()
}

/// Normalised entropy (0 = all in one unit, 1 = uniform) of counts.
fn normalised_entropy(v: &[f64]) -> f64 {
    let total: f64 = v.iter().sum();
    if total <= 0.0 || v.len() < 2 {
        return 0.0;
    }
    -v.iter().filter(|c| **c > 0.0).map(|c| c / total * (c / total).ln()).sum::<f64>() / (v.len() as f64).ln()
}

fn floats(v: &Value) -> Option<Vec<f64>> {
    v.as_array()?.iter().map(Value::as_f64).collect()
}

impl Report {
    /// An empty report with a page title.
    pub fn new(title: &str) -> Self {
        Report { title: title.to_string(), runs: Vec::new(), bench: Vec::new(), inspect: None }
    }

    /// Adds a training run's metrics document (`name`: how the run is labelled, e.g. its
    /// file name). Errors name the run when the document is not a metrics file ffwd writes.
    pub fn add_run(&mut self, name: &str, doc: Value) -> Result<RunKind> {
        if !doc.is_object() {
            return Err(Error::format(name, "not a JSON object (expected the metrics file of ffwd train, lm train or forecast train)"));
        }
        let kind = run_kind(&doc)
            .ok_or_else(|| Error::format(name, "no per-epoch or per-step history: not a metrics file of ffwd train, lm train or forecast train"))?;
        self.runs.push(Run { name: name.to_string(), kind, doc });
        Ok(kind)
    }

    /// Adds the records of `ffwd bench --json` (one JSON object per line; lines that are not
    /// objects are refused with their number).
    pub fn add_bench(&mut self, name: &str, text: &str) -> Result<usize> {
        let mut n = 0;
        for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
            let v: Value = serde_json::from_str(line).map_err(|e| Error::format(name, format!("line {}: {e}", i + 1)))?;
            if !v.is_object() {
                return Err(Error::format(name, format!("line {}: not a JSON object", i + 1)));
            }
            self.bench.push(v);
            n += 1;
        }
        if n == 0 {
            return Err(Error::format(name, "no benchmark records (expected the output of ffwd bench --json)"));
        }
        Ok(n)
    }

    /// Adds the output of `ffwd inspect`.
    pub fn add_inspect(&mut self, name: &str, doc: Value) -> Result<()> {
        if doc.get("blocks").and_then(Value::as_array).is_none() {
            return Err(Error::format(name, "no `blocks` array: not the output of ffwd inspect"));
        }
        self.inspect = Some(doc);
        Ok(())
    }

    fn runs_of(&self, kind: RunKind) -> impl Iterator<Item = &Run> {
        self.runs.iter().filter(move |r| r.kind == kind)
    }

    /// One series per run of `kind`: (x key, y from the history item).
    fn series(&self, kind: RunKind, x: &str, y: &dyn Fn(&Run, &Value) -> Option<f64>, suffix: &str) -> Vec<Series> {
        self.runs
            .iter()
            .enumerate()
            .filter(|(_, r)| r.kind == kind)
            .map(|(i, r)| Series {
                name: format!("{}{suffix}", r.name),
                points: history(&r.doc).iter().filter_map(|h| Some((num(h, x)?, y(r, h)?))).collect(),
                colour: Some(i + if suffix.contains("valid") { self.runs.len() } else { 0 }),
            })
            .filter(|s| !s.points.is_empty())
            .collect()
    }

    /// The page.
    pub fn render(&self) -> String {
        let mut body = String::new();
        if !self.runs.is_empty() {
            self.summary(&mut body);
        }
        let mut charts: Vec<(String, String)> = Vec::new(); // (section, svg)
        let line = |title: &str, x: &str, y: &str, series: Vec<Series>, log_y: bool| -> Option<String> {
            (!series.is_empty()).then(|| LineChart { title: title.into(), x_label: x.into(), y_label: y.into(), series, log_x: false, log_y }.to_svg())
        };
        // classifiers
        let c = RunKind::Classifier;
        let get = |k: &'static str| move |_: &Run, h: &Value| num(h, k);
        let mut push = |section: &str, svg: Option<String>| {
            if let Some(s) = svg {
                charts.push((section.to_string(), s));
            }
        };
        push("Classifiers", line("Training loss", "epoch", "cross-entropy", self.series(c, "epoch", &get("train_loss"), ""), false));
        push("Classifiers", line("Test accuracy (inference routing)", "epoch", "accuracy", self.series(c, "epoch", &get("test_accuracy"), ""), false));
        push("Classifiers", line("Learning rate", "epoch", "lr", self.series(c, "epoch", &get("lr"), ""), false));
        let rate = |r: &Run, h: &Value| Some(num(&r.doc, "train_samples")? / num(h, "seconds")?.max(1e-9));
        push("Classifiers", line("Training throughput", "epoch", "samples/s", self.series(c, "epoch", &rate, ""), false));
        let load_cv = |_: &Run, h: &Value| Some(cv(&floats(h.get("expert_load")?)?));
        push(
            "Conditional layers",
            line("Expert load imbalance (CV; 0 = balanced)", "epoch", "CV of expert load", self.series(c, "epoch", &load_cv, ""), false),
        );
        let occ = |_: &Run, h: &Value| Some(normalised_entropy(&floats(h.get("route_usage")?.get("counts")?)?));
        push(
            "Conditional layers",
            line("Routing spread (occupancy entropy; 1 = uniform)", "epoch", "entropy / ln(units)", self.series(c, "epoch", &occ, ""), false),
        );
        let dec = |_: &Run, h: &Value| num(h, "decision_entropy");
        push("Conditional layers", line("Mean tree-decision entropy (hardening)", "epoch", "nats", self.series(c, "epoch", &dec, ""), false));
        let deq = |_: &Run, h: &Value| num(h.get("fixed_point")?, "forward_iterations");
        push("Conditional layers", line("Deep-equilibrium forward solver iterations", "epoch", "mean iterations", self.series(c, "epoch", &deq, ""), false));
        for r in self.runs_of(c) {
            let Some(last) = history(&r.doc).last() else { continue };
            if let Some(load) = last.get("expert_load").and_then(floats) {
                push("Conditional layers", Some(share_bars(format!("{}: expert load, last epoch", r.name), "expert", "share of routed slots", &load)));
            }
            let usage = last.get("route_usage");
            if let (Some(counts), Some(unit)) =
                (usage.and_then(|u| u.get("counts")).and_then(floats), usage.and_then(|u| u.get("unit")).and_then(Value::as_str))
            {
                let total: f64 = counts.iter().sum::<f64>().max(1.0);
                let shares: Vec<f64> = counts.iter().map(|v| v / total).collect();
                push(
                    "Conditional layers",
                    Some(share_bars(format!("{}: {unit} occupancy on the test set, last epoch", r.name), unit, "share of samples", &shares)),
                );
            }
        }
        // Forward-Forward
        let f = RunKind::ForwardForward;
        push("Forward-Forward", line("Test accuracy (softmax head)", "epoch", "accuracy", self.series(f, "epoch", &get("test_accuracy"), ""), false));
        // language models
        let l = RunKind::Lm;
        let mut lm_loss = self.series(l, "step", &get("train_loss"), ": train");
        lm_loss.extend(self.series(l, "step", &get("val_loss"), ": validation"));
        push("Language models", line("Loss", "step", "nats per character", lm_loss, false));
        push("Language models", line("Training throughput", "step", "tokens/s", self.series(l, "step", &get("train_tokens_per_s"), ""), false));
        // routed FFNs: one series per run and block
        let (mut spread, mut balance) = (Vec::new(), Vec::new());
        for r in self.runs_of(l) {
            let blocks = history(&r.doc).iter().filter_map(|h| h.get("route_usage").and_then(Value::as_array).map(Vec::len)).max().unwrap_or(0);
            for blk in 0..blocks {
                let counts = |h: &Value| h.get("route_usage")?.get(blk)?.get("counts").and_then(floats);
                let pts = |f: &dyn Fn(&[f64]) -> f64| history(&r.doc).iter().filter_map(|h| Some((num(h, "step")?, f(&counts(h)?)))).collect::<Vec<_>>();
                let name = format!("{} block {blk}", r.name);
                let colour = Some(spread.len());
                spread.push(Series { name: name.clone(), points: pts(&normalised_entropy), colour });
                // the coefficient of variation is scale-free: counts give the shares' value
                balance.push(Series { name, points: pts(&cv), colour });
            }
        }
        spread.retain(|s| !s.points.is_empty());
        balance.retain(|s| !s.points.is_empty());
        push("Language models", line("Routing spread per block (occupancy entropy; 1 = uniform)", "step", "entropy / ln(units)", spread, false));
        push("Language models", line("Load imbalance per block (CV of unit shares)", "step", "CV", balance, false));
        // forecasters
        let fc = RunKind::Forecast;
        let mut fl = self.series(fc, "epoch", &get("train_mse"), ": train");
        fl.extend(self.series(fc, "epoch", &get("val_mse"), ": validation"));
        push("Forecasters", line("Mean squared error (standardised)", "epoch", "MSE", fl, true));
        // benchmarks
        let mut by_layer: Vec<BenchCurves> = Vec::new();
        for b in &self.bench {
            let (Some(layer), Some(batch)) = (b.get("layer").and_then(Value::as_str), num(b, "batch")) else { continue };
            let label = match b.get("shape").and_then(Value::as_str) {
                Some(s) => format!("{layer} {s}"),
                None => layer.to_string(),
            };
            let i = match by_layer.iter().position(|e| e.0 == label) {
                Some(i) => i,
                None => {
                    by_layer.push((label, Vec::new(), Vec::new()));
                    by_layer.len() - 1
                }
            };
            if let Some(s) = num(b, "speedup_vs_dense") {
                by_layer[i].1.push((batch, s));
            }
            if let (Some(t), Some(m)) = (num(b, "torch_dense_us"), num(b, "median_us")) {
                by_layer[i].2.push((batch, t / m));
            }
        }
        let bench_chart = |title: &str, pick: &dyn Fn(&BenchCurves) -> Vec<(f64, f64)>| -> Option<String> {
            let series: Vec<Series> = by_layer
                .iter()
                .enumerate()
                .map(|(i, e)| Series { name: e.0.clone(), points: pick(e), colour: Some(i) })
                .filter(|s| !s.points.is_empty())
                .collect();
            (!series.is_empty())
                .then(|| LineChart { title: title.into(), x_label: "batch".into(), y_label: "speedup (x)".into(), series, log_x: true, log_y: true }.to_svg())
        };
        push("Benchmarks", bench_chart("Speedup over PyTorch's dense layer of equal width", &|e| e.2.clone()));
        push("Benchmarks", bench_chart("Speedup over ffwd's dense layer of equal width", &|e| e.1.clone()));
        let mut section = "";
        for (s, svg) in &charts {
            if s != section {
                let _ = writeln!(body, "<h2>{}</h2>", escape(s));
                section = s;
            }
            let _ = writeln!(body, "<figure>{svg}</figure>");
        }
        if let Some(doc) = &self.inspect {
            inspect::render_table(doc, &mut body);
        }
        format!(
            "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"/><title>{t}</title><style>{STYLE}</style></head><body><h1>{t}</h1>\n{body}<p class=\"foot\">Written by ffwd {v}. Charts are inline SVG: no network and no script needed.</p></body></html>\n",
            t = escape(&self.title),
            v = env!("CARGO_PKG_VERSION"),
        )
    }

    fn summary(&self, out: &mut String) {
        out.push_str("<h2>Runs</h2>\n<table class=\"summary\"><thead><tr><th>run</th><th>kind</th><th>model</th><th>params</th><th>neurons / inference</th><th>result</th><th>time</th><th>command</th></tr></thead><tbody>\n");
        for r in &self.runs {
            let d = &r.doc;
            let (kind, model, result) = match r.kind {
                RunKind::Classifier => (
                    "classifier",
                    d.get("layer").and_then(|l| l.get("kind")).and_then(Value::as_str).unwrap_or("?").to_string(),
                    format!(
                        "test accuracy {:.4}, train accuracy {:.4}",
                        num(d, "test_accuracy").unwrap_or(f64::NAN),
                        num(d, "train_accuracy").unwrap_or(f64::NAN)
                    ),
                ),
                RunKind::ForwardForward => (
                    "Forward-Forward",
                    // the hidden widths from the run's configuration
                    d.get("config")
                        .and_then(|c| c.get("ff"))
                        .and_then(|f| f.get("layers"))
                        .and_then(floats)
                        .map_or("?".into(), |w| format!("ReLU {}", w.iter().map(|v| format!("{v:.0}")).collect::<Vec<_>>().join("-"))),
                    format!("test accuracy {:.4} (softmax head)", num(d, "test_accuracy").unwrap_or(f64::NAN)),
                ),
                RunKind::Lm => (
                    "language model",
                    d.get("model").and_then(|m| m.get("ffn")).and_then(|f| f.get("kind")).and_then(Value::as_str).map_or("?".into(), |k| format!("{k} FFN")),
                    format!(
                        "validation {:.4} nats/char, {:.0} tokens/s",
                        num(d, "val_loss").unwrap_or(f64::NAN),
                        num(d, "train_tokens_per_s").unwrap_or(f64::NAN)
                    ),
                ),
                RunKind::Forecast => {
                    let rep = d.get("report").unwrap_or(&Value::Null);
                    let test =
                        rep.get("metrics").and_then(Value::as_array).and_then(|m| m.iter().find(|s| s.get("split").and_then(Value::as_str) == Some("test")));
                    let mase = test.and_then(|t| t.get("model")).and_then(|m| num(m, "mase")).unwrap_or(f64::NAN);
                    let naive = test.and_then(|t| t.get("seasonal_naive")).and_then(|m| num(m, "mase")).unwrap_or(f64::NAN);
                    ("forecaster", format!("AR-Net, lags {}", num(rep, "lags").unwrap_or(f64::NAN)), format!("test MASE {mase:.3} (seasonal-naive {naive:.3})"))
                }
            };
            let params = num(d, "params").or_else(|| d.get("report").and_then(|r| num(r, "params")));
            let secs = num(d, "train_seconds").or_else(|| d.get("report").and_then(|r| num(r, "train_seconds")));
            let _ = writeln!(
                out,
                "<tr><td>{}</td><td>{kind}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td><code>{}</code></td></tr>",
                escape(&r.name),
                escape(&model),
                params.map_or("–".into(), |p| format!("{p:.0}")),
                num(d, "neurons_per_inference").map_or("–".into(), |p| format!("{p:.0}")),
                escape(&result),
                secs.map_or("–".into(), |s| format!("{s:.1} s")),
                escape(d.get("command").and_then(Value::as_str).unwrap_or("–")),
            );
        }
        out.push_str("</tbody></table>\n");
    }
}

const STYLE: &str = "body{font-family:sans-serif;margin:24px;color:#222;max-width:1200px}h1{font-size:22px}h2{font-size:18px;margin-top:28px;border-bottom:1px solid #ccc}\
figure{display:inline-block;margin:8px}table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ccc;padding:3px 6px;text-align:left;vertical-align:top}\
code{font-size:12px}.foot{color:#777;font-size:12px;margin-top:24px}input{margin:8px 0;padding:4px;width:320px}";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn occupancy_statistics() {
        assert!((normalised_entropy(&[1.0, 1.0, 1.0, 1.0]) - 1.0).abs() < 1e-12);
        assert_eq!(normalised_entropy(&[5.0, 0.0, 0.0]), 0.0);
        assert_eq!(cv(&[0.25; 4]), 0.0);
        assert!((cv(&[0.5, 0.0]) - 1.0).abs() < 1e-12);
    }
}
