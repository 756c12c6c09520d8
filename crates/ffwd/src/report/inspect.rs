//! What FFN units store ("Transformer Feed-Forward Layers Are Key-Value Memories", Geva et al.
//! 2021; "…Build Predictions by Promoting Concepts in the Vocabulary Space", Geva et al. 2022).
//!
//! A unit is a hidden neuron of a dense or gated FFN, or a node of an UltraFastBERT tree.
//! Its *key* side is what makes it fire: streaming a text through the model (the trunk on its
//! inference path), every position's FFN input gives the unit an activation, and a bounded
//! top-K list per unit keeps the strongest positions with the text up to them (the trigger
//! prefixes). Its *value* side is what it writes: the unit's output vector projected through
//! the tied output embedding gives the characters it promotes. `agreement` is the share of a
//! unit's top-K triggers whose next character is among its top-3 promoted characters, and
//! `fires` the share of positions where its activation is positive (dead units show as 0).

use std::fmt::Write;
use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::core::gemm::{matmul_bias, MatMut, MatRef};
use crate::core::Activation;
use crate::data::text::CharTokenizer;
use crate::error::{Error, Result};
use crate::layers::LayerConfig;
use crate::models::Lm;
use crate::report::svg::escape;

/// Options of [`inspect_lm`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct InspectOptions {
    /// Trigger positions kept per unit.
    pub top: usize,
    /// Characters of text shown before (and including) a trigger position.
    pub context: usize,
    /// Promoted characters listed per unit.
    pub promoted: usize,
    /// Windows per forward pass.
    pub batch: usize,
}

impl Default for InspectOptions {
    fn default() -> Self {
        InspectOptions { top: 5, context: 24, promoted: 5, batch: 16 }
    }
}

/// One strong activation of a unit.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Trigger {
    /// Character position in the text.
    pub position: usize,
    /// The unit's activation there.
    pub activation: f32,
    /// The text up to and including that position (at most `context` characters).
    pub prefix: String,
    /// The character that follows (empty at the end of the text).
    pub next: String,
}

/// One unit: its triggers, the characters its value vector promotes, how often it fires.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Unit {
    /// Index within the block's FFN (neuron, or node in tree order).
    pub unit: usize,
    /// Share of positions with a positive activation.
    pub fires: f32,
    /// Strongest positions, strongest first.
    pub triggers: Vec<Trigger>,
    /// Top characters of `embedding · value`, with their scores.
    pub promoted: Vec<(String, f32)>,
    /// Share of the triggers whose next character is among the top-3 promoted ones.
    pub agreement: f32,
}

/// One block's FFN.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BlockUnits {
    /// 0-based block.
    pub block: usize,
    /// FFN kind.
    pub ffn: String,
    /// What a unit is (`neuron`, `node`).
    pub unit_kind: String,
    /// Units that never fired on the text.
    pub dead: usize,
    /// Mean agreement over the units that fired.
    pub mean_agreement: f32,
    /// Every unit.
    pub units: Vec<Unit>,
}

/// The result of [`inspect_lm`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Inspection {
    /// Characters streamed.
    pub chars: usize,
    /// Seconds taken.
    pub seconds: f64,
    /// Per block.
    pub blocks: Vec<BlockUnits>,
}

/// The unit map of one block's FFN, read from its parameters.
enum Units {
    /// `a = act(W1 x + b1)` (dense) or `act(W1 x + b1) ⊙ (W3 x + b3)` (glu); values are
    /// the columns of `fc2.weight` (`d × w`).
    Hidden { w1: Vec<f32>, b1: Vec<f32>, w: usize, glu: bool, act: Activation, w2: Vec<f32> },
    /// UltraFastBERT trees: `a = act(z)` on the nodes of each tree's path; values are the rows
    /// of `out_weight` (`nodes × d`).
    Tree { w_in: Vec<f32>, b_in: Vec<f32>, w_out: Vec<f32>, depth: usize, trees: usize, act: Activation },
}

impl Units {
    fn of(lm: &Lm, block: usize) -> Result<(Units, String)> {
        let ffn = lm.ffn(block).ok_or_else(|| Error::Invalid(format!("no block {block}")))?;
        let p = |name: &str| {
            ffn.params()
                .into_iter()
                .find(|q| q.name == name)
                .map(|q| q.value.clone())
                .ok_or_else(|| Error::Invalid(format!("{} FFN has no parameter {name}", ffn.kind())))
        };
        Ok(match ffn.config() {
            LayerConfig::Dense(c) if c.layers == 2 => {
                (Units::Hidden { w1: p("fc1.weight")?, b1: p("fc1.bias")?, w: c.width, glu: false, act: c.activation, w2: p("fc2.weight")? }, "neuron".into())
            }
            LayerConfig::Glu(c) => {
                (Units::Hidden { w1: p("fc13.weight")?, b1: p("fc13.bias")?, w: c.width, glu: true, act: c.activation, w2: p("fc2.weight")? }, "neuron".into())
            }
            LayerConfig::Ufff(c) => (
                Units::Tree { w_in: p("in_weight")?, b_in: p("in_bias")?, w_out: p("out_weight")?, depth: c.depth, trees: c.trees, act: c.activation },
                "node".into(),
            ),
            other => {
                return Err(Error::Invalid(format!(
                    "inspect reads dense (two maps), glu and ufff FFNs; block {block}'s FFN is {}{}",
                    other.kind(),
                    if other.kind() == "dense" { " with more than two maps" } else { "" }
                )))
            }
        })
    }

    fn count(&self) -> usize {
        match self {
            Units::Hidden { w, .. } => *w,
            Units::Tree { b_in, .. } => b_in.len(),
        }
    }

    /// The value vector of unit `u` (`d`).
    fn value(&self, u: usize, d: usize) -> Vec<f32> {
        match self {
            Units::Hidden { w2, w, .. } => (0..d).map(|r| w2[r * w + u]).collect(),
            Units::Tree { w_out, .. } => w_out[u * d..(u + 1) * d].to_vec(),
        }
    }

    /// Calls `visit(row, unit, activation)` for every row of `x` (`rows × d`) and every
    /// unit with an activation (all units for hidden maps; the path nodes for trees).
    fn activations(&self, x: &[f32], rows: usize, d: usize, scratch: &mut Vec<f32>, visit: &mut dyn FnMut(usize, usize, f32)) {
        match self {
            Units::Hidden { w1, b1, w, glu, act, .. } => {
                let cols = if *glu { 2 * w } else { *w };
                scratch.resize(rows * cols, 0.0);
                matmul_bias(MatMut::new(&mut scratch[..rows * cols], rows, cols), MatRef::new(x, rows, d), MatRef::new(w1, cols, d).t(), b1);
                for r in 0..rows {
                    let z = &scratch[r * cols..(r + 1) * cols];
                    for u in 0..*w {
                        let a = act.apply(z[u]);
                        visit(r, u, if *glu { a * z[w + u] } else { a });
                    }
                }
            }
            Units::Tree { w_in, b_in, depth, trees, act, .. } => {
                let n = (1usize << (depth + 1)) - 1;
                for r in 0..rows {
                    let xr = &x[r * d..(r + 1) * d];
                    for t in 0..*trees {
                        let mut node = 0usize;
                        for _ in 0..=*depth {
                            let u = t * n + node;
                            let z = b_in[u] + w_in[u * d..(u + 1) * d].iter().zip(xr).map(|(a, b)| a * b).sum::<f32>();
                            visit(r, u, act.apply(z));
                            node = 2 * node + 1 + usize::from(z > 0.0);
                            if node >= n {
                                break;
                            }
                        }
                    }
                }
            }
        }
    }
}

/// A bounded list of the K strongest (activation, position) pairs.
#[derive(Clone)]
struct TopK {
    items: Vec<(f32, usize)>,
    min: usize,
}

impl TopK {
    fn push(&mut self, k: usize, a: f32, pos: usize) {
        if self.items.len() < k {
            self.items.push((a, pos));
            if self.items.len() == k {
                self.min = (0..k).min_by(|&i, &j| self.items[i].0.total_cmp(&self.items[j].0)).unwrap_or(0);
            }
        } else if a > self.items[self.min].0 {
            self.items[self.min] = (a, pos);
            self.min = (0..k).min_by(|&i, &j| self.items[i].0.total_cmp(&self.items[j].0)).unwrap_or(0);
        }
    }
}

/// Streams `text` through `lm` (windows of its context length) and reports every FFN unit of
/// every block. `progress(done, total)` is called after each batch of windows.
pub fn inspect_lm(lm: &mut Lm, tokenizer: &CharTokenizer, text: &str, opts: &InspectOptions, progress: &mut dyn FnMut(usize, usize)) -> Result<Inspection> {
    let started = Instant::now();
    if opts.top == 0 || opts.batch == 0 {
        return Err(Error::Config("inspect: top and batch must be at least 1".into()));
    }
    let tokens = tokenizer.encode(text)?;
    let chars: Vec<char> = text.chars().collect();
    let (t, d, blocks) = (lm.config().context, lm.config().d_model, lm.config().layers);
    if tokens.len() < 2 {
        return Err(Error::Invalid("inspect needs a text of at least 2 characters".into()));
    }
    let maps: Vec<(Units, String)> = (0..blocks).map(|b| Units::of(lm, b)).collect::<Result<_>>()?;
    let mut tops: Vec<Vec<TopK>> = maps.iter().map(|(u, _)| vec![TopK { items: Vec::with_capacity(opts.top), min: 0 }; u.count()]).collect();
    let mut fires: Vec<Vec<u64>> = maps.iter().map(|(u, _)| vec![0; u.count()]).collect();
    let windows = tokens.len() / t;
    // the tail shorter than a window runs as one shorter window
    let mut starts: Vec<(usize, usize)> = (0..windows).map(|w| (w * t, t)).collect();
    if tokens.len() % t > 0 {
        starts.push((windows * t, tokens.len() % t));
    }
    let mut scratch = Vec::new();
    let mut done = 0;
    for group in starts.chunk_by(|a, b| a.1 == b.1).flat_map(|g| g.chunks(opts.batch)) {
        let len = group[0].1;
        let batch_tokens: Vec<u32> = group.iter().flat_map(|&(s, l)| tokens[s..s + l].iter().copied()).collect();
        let inputs = lm.ffn_inputs(&batch_tokens, group.len(), len)?;
        let rows = group.len() * len;
        for (b, x) in inputs.iter().enumerate() {
            let (top, fire) = (&mut tops[b], &mut fires[b]);
            maps[b].0.activations(&x[..rows * d], rows, d, &mut scratch, &mut |r, u, a| {
                let pos = group[r / len].0 + r % len;
                if a > 0.0 {
                    fire[u] += 1;
                }
                top[u].push(opts.top, a, pos);
            });
        }
        done += group.len();
        progress(done, starts.len());
    }
    let emb = &lm.tok_emb.value;
    let vocab = lm.config().vocab;
    let total = tokens.len() as f32;
    let mut out = Vec::with_capacity(blocks);
    for (b, ((units, unit_kind), top)) in maps.iter().zip(tops).enumerate() {
        let mut list = Vec::with_capacity(units.count());
        for (u, mut tk) in top.into_iter().enumerate() {
            tk.items.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
            let value = units.value(u, d);
            let mut scores: Vec<(usize, f32)> = (0..vocab).map(|c| (c, emb[c * d..(c + 1) * d].iter().zip(&value).map(|(a, b)| a * b).sum())).collect();
            scores.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
            let promoted: Vec<(String, f32)> = scores.iter().take(opts.promoted.max(3)).map(|&(c, s)| (tokenizer.decode(&[c as u32]), s)).collect();
            let top3: Vec<u32> = scores.iter().take(3).map(|&(c, _)| c as u32).collect();
            let triggers: Vec<Trigger> = tk
                .items
                .iter()
                .map(|&(a, pos)| Trigger {
                    position: pos,
                    activation: a,
                    prefix: chars[(pos + 1).saturating_sub(opts.context)..=pos].iter().collect(),
                    next: chars.get(pos + 1).map(|c| c.to_string()).unwrap_or_default(),
                })
                .collect();
            let agree = tk.items.iter().filter(|&&(_, pos)| tokens.get(pos + 1).is_some_and(|n| top3.contains(n))).count();
            list.push(Unit {
                unit: u,
                fires: fires[b][u] as f32 / total,
                agreement: if tk.items.is_empty() { 0.0 } else { agree as f32 / tk.items.len() as f32 },
                triggers,
                promoted: promoted.into_iter().take(opts.promoted).collect(),
            });
        }
        let alive: Vec<&Unit> = list.iter().filter(|u| u.fires > 0.0).collect();
        let mean_agreement = if alive.is_empty() { 0.0 } else { alive.iter().map(|u| u.agreement).sum::<f32>() / alive.len() as f32 };
        out.push(BlockUnits {
            block: b,
            ffn: lm.ffn(b).map_or("?", |f| f.kind()).to_string(),
            unit_kind: unit_kind.clone(),
            dead: list.len() - alive.len(),
            mean_agreement,
            units: list,
        });
    }
    Ok(Inspection { chars: tokens.len(), seconds: started.elapsed().as_secs_f64(), blocks: out })
}

/// Units shown per block in the HTML table (the strongest by top activation).
const SHOWN: usize = 256;

/// Renders an inspection document (the JSON of [`Inspection`]) as searchable tables.
pub(crate) fn render_table(doc: &serde_json::Value, out: &mut String) {
    let Ok(ins) = serde_json::from_value::<Inspection>(doc.clone()) else {
        out.push_str("<p>The inspection file could not be read.</p>");
        return;
    };
    let _ = write!(
        out,
        "<h2>FFN units ({} characters)</h2>\n<p>Per block, the {SHOWN} units with the strongest activation: where they fire (the text up to the trigger, the trigger character in bold, then the next character), the characters their value vectors promote through the output embedding, and the share of triggers followed by one of the top 3 promoted characters (agreement). Type to filter the rows.</p>\n<input id=\"filter\" type=\"search\" placeholder=\"filter: text in a trigger or a promoted character\"/>\n",
        ins.chars
    );
    for b in &ins.blocks {
        let _ = write!(
            out,
            "<h3>Block {} ({} FFN): {} {}s, {} never fired, mean agreement {:.3}</h3>\n<table class=\"units\"><thead><tr><th>{}</th><th>fires</th><th>top triggers</th><th>promotes</th><th>agreement</th></tr></thead><tbody>\n",
            b.block,
            escape(&b.ffn),
            b.units.len(),
            escape(&b.unit_kind),
            b.dead,
            b.mean_agreement,
            escape(&b.unit_kind)
        );
        let mut order: Vec<&Unit> = b.units.iter().collect();
        order.sort_by(|x, y| {
            let a = |u: &Unit| u.triggers.first().map_or(f32::NEG_INFINITY, |t| t.activation);
            a(y).total_cmp(&a(x))
        });
        for u in order.into_iter().take(SHOWN) {
            let trig: Vec<String> = u
                .triggers
                .iter()
                .map(|t| {
                    let mut p: Vec<char> = t.prefix.chars().collect();
                    let last = p.pop().map(|c| c.to_string()).unwrap_or_default();
                    let before: String = p.into_iter().collect();
                    format!(
                        "<code>{}<b>{}</b>|{}</code> {:.2}",
                        escape(&before.replace('\n', "⏎")),
                        escape(&last.replace('\n', "⏎")),
                        escape(&t.next.replace('\n', "⏎")),
                        t.activation
                    )
                })
                .collect();
            let prom: Vec<String> = u.promoted.iter().map(|(c, s)| format!("<code>{}</code> {s:.2}", escape(&c.replace('\n', "⏎")))).collect();
            let _ = writeln!(
                out,
                "<tr><td>{}</td><td>{:.3}</td><td>{}</td><td>{}</td><td>{:.2}</td></tr>",
                u.unit,
                u.fires,
                trig.join("<br/>"),
                prom.join(" "),
                u.agreement
            );
        }
        out.push_str("</tbody></table>\n");
    }
    out.push_str("<script>document.getElementById('filter').addEventListener('input',function(e){var q=e.target.value.toLowerCase();document.querySelectorAll('table.units tbody tr').forEach(function(r){r.style.display=r.textContent.toLowerCase().indexOf(q)>=0?'':'none';});});</script>\n");
}
