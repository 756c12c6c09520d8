//! Hostile-input harness: valid seed files of every format ffwd reads, a mutator (bit flips,
//! byte overwrites with boundary values, truncation, insertion, deletion, duplication, and
//! rewritten numbers in text and in headers), and for each format the loader the CLI uses.
//! `tests/hostile.rs` runs a bounded number of cases in `cargo test`; `cargo bench --bench
//! hostile` runs a long campaign. The contract checked: every input gives a model or a
//! one-line error that names the file, never a panic, and (checked by those binaries'
//! allocators) no allocation larger than the file justifies.

use crate::checkpoint::CheckpointReader;
use crate::config::TrainConfig;
use crate::core::{Activation, Rng};
use crate::data::csv::{parse_csv_bytes, LabelColumn};
use crate::data::idx::{decode_maybe_gz, pair_to_dataset, parse_idx, IdxArray};
use crate::data::text::{text_from_bytes, CharTokenizer};
use crate::data::timeseries::{parse_series, Fill, Frequency};
use crate::error::Result;
use crate::layers::{check_size, DenseConfig, FffConfig, LayerConfig, PkmConfig, UfffConfig};
use crate::models::{Classifier, ForecastConfig, Forecaster, Lm, LmConfig, ModelConfig};
use crate::optim::AdamW;
use crate::train::forward_forward::{FfConfig, FfNet};
use crate::train::lm::{lm_checkpoint, LmCheckpoint, LmRunConfig, LmTrainOptions, LmTrainState};

/// A file format ffwd reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// IDX image file (3 axes).
    IdxImages,
    /// IDX label file (1 axis).
    IdxLabels,
    /// CSV data.
    Csv,
    /// `classifier/1` checkpoint.
    Classifier,
    /// `ff/1` checkpoint.
    Ff,
    /// `lm/1` checkpoint.
    Lm,
    /// `ffwd train` TOML configuration.
    TrainToml,
    /// `ffwd lm train` TOML configuration.
    LmToml,
    /// Training text for the LM.
    Text,
    /// `forecaster/1` checkpoint.
    Forecaster,
    /// A time-series CSV (`ffwd forecast --data`).
    Series,
}

impl Format {
    /// Every format.
    pub const ALL: [Format; 11] = [
        Format::IdxImages,
        Format::IdxLabels,
        Format::Csv,
        Format::Classifier,
        Format::Ff,
        Format::Lm,
        Format::TrainToml,
        Format::LmToml,
        Format::Text,
        Format::Forecaster,
        Format::Series,
    ];

    /// A short name (also the file name used in errors).
    pub fn name(self) -> &'static str {
        match self {
            Format::IdxImages => "images.idx3",
            Format::IdxLabels => "labels.idx1",
            Format::Csv => "data.csv",
            Format::Classifier => "classifier.safetensors",
            Format::Ff => "ff.safetensors",
            Format::Lm => "lm.safetensors",
            Format::TrainToml => "train.toml",
            Format::LmToml => "lm.toml",
            Format::Text => "text.txt",
            Format::Forecaster => "forecaster.safetensors",
            Format::Series => "series.csv",
        }
    }

    fn textual(self) -> bool {
        matches!(self, Format::Csv | Format::TrainToml | Format::LmToml | Format::Text | Format::Series)
    }
}

fn idx_bytes(dims: &[u32], data: &[u8]) -> Vec<u8> {
    let mut v = vec![0, 0, 8, dims.len() as u8];
    for d in dims {
        v.extend_from_slice(&d.to_be_bytes());
    }
    v.extend_from_slice(data);
    v
}

/// Valid inputs of `format` to start mutating from.
pub fn seeds(format: Format) -> Result<Vec<Vec<u8>>> {
    let mut rng = Rng::new(1);
    Ok(match format {
        Format::IdxImages => {
            let px: Vec<u8> = (0..6 * 4 * 4).map(|_| rng.below(256) as u8).collect();
            vec![idx_bytes(&[6, 4, 4], &px), idx_bytes(&[1, 2, 3], &px[..6])]
        }
        Format::IdxLabels => vec![idx_bytes(&[6], &[0, 1, 2, 3, 4, 5]), idx_bytes(&[6], &[9; 6])],
        Format::Csv => vec![
            b"label,a,b,c\n1,0.5,2,3\n0,1,-1,0\n2,3,4,5\n1,0,0,1\n".to_vec(),
            b"0.5 2 3 1\n1 -1 0 0\n0 0 1 2\n4 4 4 1\n".to_vec(),
        ],
        Format::Classifier => {
            let mut out = Vec::new();
            for layer in [
                LayerConfig::Dense(DenseConfig { width: 5, layers: 2, activation: Activation::Relu }),
                LayerConfig::Fff(FffConfig { depth: 2, leaf: 3, master_leaf: 2, ..Default::default() }),
                LayerConfig::Ufff(UfffConfig { depth: 2, ..Default::default() }),
                LayerConfig::Pkm(PkmConfig { n_keys: 3, heads: 1, k: 2, key_dim: 4, ..Default::default() }),
                LayerConfig::Deq(crate::layers::DeqConfig { state: 4, width: 5, ..Default::default() }),
                LayerConfig::BlockDense(crate::layers::StructuredConfig { width: 4, rank: 4, blocks: 2, activation: Activation::Gelu, guide: None }),
                LayerConfig::ChannelIdle(crate::layers::ChannelIdleConfig { width: 8, theta: 0.75, activation: Activation::Relu }),
            ] {
                let m = Classifier::new(ModelConfig { in_features: 6, n_classes: 3, layer }, 2)?;
                out.push(m.checkpoint()?.to_bytes()?);
            }
            // quantized: Q4_0 blocks of a dense layer wide enough to be packed, and a moefied
            // layer's Q8_0 experts
            for (layer, format) in [
                (LayerConfig::Dense(DenseConfig { width: 40, layers: 2, activation: Activation::Relu }), crate::core::quant::QFormat::Q4_0),
                (LayerConfig::Moefied(crate::layers::MoefiedConfig { experts: 2, expert_width: 32, k: 1, ..Default::default() }), crate::core::quant::QFormat::Q8_0),
            ] {
                let m = Classifier::new(ModelConfig { in_features: 36, n_classes: 3, layer }, 2)?;
                let ck = CheckpointReader::from_bytes(m.checkpoint()?.to_bytes()?, "seed")?;
                out.push(crate::convert::quantize::quantize_checkpoint(&ck, format, false)?.0);
            }
            out
        }
        Format::Ff => {
            let net = FfNet::new(FfConfig { layers: vec![5, 4], ..Default::default() }, 8, 3)?;
            vec![net.checkpoint()?.to_bytes()?]
        }
        Format::Lm => {
            let tok = CharTokenizer::from_text("abcdefg")?;
            let cfg = LmConfig { vocab: tok.len(), context: 6, d_model: 8, heads: 2, layers: 1, parallel: false, ffn: LayerConfig::Dense(DenseConfig { width: 8, layers: 2, activation: Activation::Gelu }), first_ffn: None };
            let lm = Lm::new(cfg, 3)?;
            let opt = AdamW::new(0.0);
            vec![lm_checkpoint(&lm, &tok, &LmTrainOptions::default(), &LmTrainState::default(), &opt)?.to_bytes()?]
        }
        Format::TrainToml => vec![
            b"data = \"digits\"\nlayer = \"fff\"\nepochs = 20\nbatch = 64\n[fff]\ndepth = 4\nleaf = 8\nhardening = 10.0\n".to_vec(),
            b"layer = \"pkm\"\n[pkm]\nn_keys = 16\nheads = 2\nk = 8\nkey_dim = 32\n".to_vec(),
            b"layer = \"moe\"\nlr = 0.004\n[moe]\nexperts = 16\nexpert_width = 8\nk = 2\nbalance = 0.1\n".to_vec(),
        ],
        Format::LmToml => vec![
            b"[model]\ncontext = 128\nd_model = 192\nheads = 6\nlayers = 4\n[model.ffn]\nkind = \"dense\"\nwidth = 768\nlayers = 2\nactivation = \"gelu\"\n[train]\nsteps = 3000\nbatch = 16\n".to_vec(),
            b"[model]\nparallel = true\n[model.ffn]\nkind = \"ufff\"\ndepth = 9\n[train]\nlr = 0.002\n".to_vec(),
        ],
        Format::Text => vec!["ROMEO:\nBut soft, what light through yonder window breaks?\n".as_bytes().to_vec(), "naïve café — ünïcödé ✓\n".as_bytes().to_vec()],
        Format::Forecaster => {
            let mut out = Vec::new();
            for layer in [None, Some(LayerConfig::Dense(DenseConfig { width: 4, layers: 2, activation: Activation::Relu }))] {
                let cfg = ForecastConfig { lags: 3, horizon: 2, layer, mean: 1.5, std: 2.0, freq: Frequency::Monthly, column: "v".into() };
                out.push(Forecaster::new(cfg, 1)?.checkpoint()?.to_bytes()?);
            }
            out
        }
        Format::Series => vec![
            b"\"YEAR\",\"SUNACTIVITY\"\n1700,5\n1701,11\n1702,16\n1703,23\n1704,36\n".to_vec(),
            b"date,co2\n19580329,316.1\n19580405,317.3\n19580412,\n19580426,315.6\n".to_vec(),
            b"DATE,v\nJan-1-1995,66.19\nFeb-1-1995,65.15\nMar-1-1995,74.48\n".to_vec(),
        ],
    })
}

const INTERESTING: [u8; 8] = [0, 1, 0x7f, 0x80, 0xff, b'9', b'-', b'"'];
const NUMBERS: [&str; 12] = ["0", "1", "-1", "3", "65535", "4294967295", "4294967296", "18446744073709551615", "99999999999999999999", "1e30", "nan", "-0.5"];

/// Rewrites one ASCII number in `v` (if it has one) to a boundary value.
fn rewrite_number(v: &mut Vec<u8>, rng: &mut Rng) {
    let digits: Vec<usize> = (0..v.len()).filter(|&i| v[i].is_ascii_digit()).collect();
    if digits.is_empty() {
        return;
    }
    let mut i = digits[rng.below(digits.len())];
    let mut j = i;
    while i > 0 && v[i - 1].is_ascii_digit() {
        i -= 1;
    }
    while j < v.len() && v[j].is_ascii_digit() {
        j += 1;
    }
    let num = NUMBERS[rng.below(NUMBERS.len())].as_bytes().to_vec();
    v.splice(i..j, num);
}

/// For a safetensors file: rewrites a number in its JSON header (a tensor shape or offset,
/// a size in the model configuration) and fixes the header length, so that the change
/// reaches the loaders instead of the length check.
fn rewrite_header_number(v: &mut Vec<u8>, rng: &mut Rng) -> bool {
    if v.len() < 8 {
        return false;
    }
    let n = u64::from_le_bytes(v[..8].try_into().unwrap_or([0; 8]));
    let Some(end) = usize::try_from(n).ok().and_then(|n| n.checked_add(8)).filter(|&e| e <= v.len()) else { return false };
    let mut header = v[8..end].to_vec();
    rewrite_number(&mut header, rng);
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&header);
    out.extend_from_slice(&v[end..]);
    *v = out;
    true
}

/// A mutated copy of `input`: one to four random operations.
pub fn mutate(input: &[u8], textual: bool, rng: &mut Rng) -> Vec<u8> {
    let mut v = input.to_vec();
    for _ in 0..1 + rng.below(4) {
        let n = v.len();
        match rng.below(if textual { 9 } else { 10 }) {
            0 if n > 0 => {
                let i = rng.below(n);
                v[i] ^= 1 << rng.below(8);
            }
            1 if n > 0 => {
                let i = rng.below(n);
                v[i] = INTERESTING[rng.below(INTERESTING.len())];
            }
            2 => v.truncate(rng.below(n + 1)),
            3 => {
                let i = rng.below(n + 1);
                let k = 1 + rng.below(8);
                let bytes: Vec<u8> = (0..k).map(|_| rng.below(256) as u8).collect();
                v.splice(i..i, bytes);
            }
            4 if n > 0 => {
                let i = rng.below(n);
                let k = (1 + rng.below(16)).min(n - i);
                v.drain(i..i + k);
            }
            5 if n > 0 => {
                let i = rng.below(n);
                let k = (1 + rng.below(64)).min(n - i);
                let chunk = v[i..i + k].to_vec();
                let j = rng.below(v.len() + 1);
                v.splice(j..j, chunk);
            }
            6 if n >= 8 => {
                // a 4- or 8-byte length or size field (IDX dims, safetensors header length)
                let w = if rng.below(2) == 0 { 4 } else { 8 };
                let i = if w == 8 && rng.below(2) == 0 { 0 } else { rng.below(n - w + 1) };
                let val: u64 = [0, 1, u32::MAX as u64, u64::MAX, 1 << 40, rng.next_u64()][rng.below(6)];
                v[i..i + w].copy_from_slice(&val.to_le_bytes()[..w]);
            }
            7 | 8 if !textual => {
                if !rewrite_header_number(&mut v, rng) {
                    rewrite_number(&mut v, rng);
                }
            }
            // rewrite a number in text (TOML, CSV)
            _ => rewrite_number(&mut v, rng),
        }
    }
    v
}

/// Runs the loader of `format` on `bytes` as the CLI would (and, for models, one inference
/// call), naming the input `name` in errors.
pub fn load(format: Format, bytes: Vec<u8>, name: &str) -> Result<()> {
    match format {
        Format::IdxImages | Format::IdxLabels => {
            let axes = if format == Format::IdxImages { 3 } else { 1 };
            let arr = parse_idx(&decode_maybe_gz(bytes, name)?, axes, std::path::Path::new(name))?;
            // the partner file, as long as this one can justify (a real one would be as large)
            let n = arr.dims[0].min(arr.data.len().max(16));
            let other = if axes == 3 { IdxArray { dims: vec![n], data: vec![1; n] } } else { IdxArray { dims: vec![n, 1, 2], data: vec![7; 2 * n] } };
            let (img, lab) = if axes == 3 { (&arr, &other) } else { (&other, &arr) };
            pair_to_dataset(img, lab, name, name).map(drop)
        }
        Format::Csv => {
            let d = parse_csv_bytes(bytes, LabelColumn::First, name)?;
            if d.len() >= 2 {
                d.holdout(0.25, 1)?;
            }
            Ok(())
        }
        Format::Classifier => {
            let m = Classifier::from_checkpoint(&CheckpointReader::from_bytes(bytes, name)?)?;
            m.predict(&vec![0.5; m.config().in_features], 1).map(drop)
        }
        Format::Ff => {
            let mut net = FfNet::from_checkpoint(&CheckpointReader::from_bytes(bytes, name)?)?;
            let mut out = [0u32];
            net.predict_softmax(&vec![0.5; net.in_features()], 1, &mut out);
            Ok(())
        }
        Format::Lm => {
            let mut ck = LmCheckpoint::from_checkpoint(&CheckpointReader::from_bytes(bytes, name)?)?;
            ck.lm.logits(&[0], 1, 1)?;
            ck.lm.generator().step(0).map(drop)
        }
        Format::TrainToml => {
            let c = TrainConfig::from_toml_bytes(&bytes, name)?;
            check_size(name, c.layer_config().param_count(64, 10)).map(drop)
        }
        Format::LmToml => {
            let c: LmRunConfig = crate::config::parse_toml(&bytes, name)?;
            let mut m = c.model;
            m.vocab = 65;
            check_size(name, m.param_count()).map(drop)
        }
        Format::Text => {
            let text = text_from_bytes(bytes, name)?;
            let tok = CharTokenizer::from_text(&text)?;
            tok.encode(&text).map(drop)
        }
        Format::Forecaster => {
            let m = Forecaster::from_checkpoint(&CheckpointReader::from_bytes(bytes, name)?)?;
            m.forecast(&vec![1.0; m.config().lags]).map(drop)
        }
        Format::Series => {
            let text = String::from_utf8(bytes).map_err(|_| crate::Error::format(name, "not UTF-8"))?;
            parse_series(&text, name, None, Fill::Linear).map(drop)
        }
    }
}

/// What a campaign saw.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Tally {
    /// Inputs tried.
    pub cases: usize,
    /// Inputs that loaded.
    pub loaded: usize,
    /// Inputs refused with a proper error.
    pub refused: usize,
    /// Errors that were not one line naming the file (the first few kept).
    pub bad_messages: Vec<String>,
}

/// Runs `cases` mutated inputs of `format` (seeded by `seed`), calling `after` with each
/// input's length after its load (the binaries check their allocation peak there).
pub fn campaign(format: Format, cases: usize, seed: u64, after: &mut dyn FnMut(usize)) -> Result<Tally> {
    let seeds = seeds(format)?;
    let mut rng = Rng::new(seed).fork(format as u64);
    let mut t = Tally::default();
    for i in 0..cases {
        let base = &seeds[i % seeds.len()];
        let input = mutate(base, format.textual(), &mut rng);
        let len = input.len();
        match load(format, input, format.name()) {
            Ok(()) => t.loaded += 1,
            Err(e) => {
                let msg = e.to_string();
                if msg.contains('\n') || !msg.contains(format.name()) {
                    if t.bad_messages.len() < 10 {
                        t.bad_messages.push(msg);
                    }
                } else {
                    t.refused += 1;
                }
            }
        }
        after(len);
        t.cases += 1;
    }
    Ok(t)
}
