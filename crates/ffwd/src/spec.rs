//! Builders: from a serde configuration (and the data it will see) to a model ready to train.
//! The one place that turns a run configuration into a classifier, a Forward-Forward net or a
//! language model, and that maps an LM's FFN shorthand (kind, width, depth, experts) to a layer
//! configuration. The CLI, the Python package and the server call these and nothing else.
//!
//! ```
//! use ffwd::prelude::*;
//!
//! // a UFFF classifier (two trees of depth 5) on the embedded digits
//! let mut cfg = TrainConfig { layer: LayerKind::Ufff, epochs: 20, ..Default::default() };
//! cfg.apply_shape(&LayerShape { depth: Some(5), trees: Some(2), ..Default::default() })?;
//! let split = DataSpec::Digits.load(cfg.holdout, cfg.seed, cfg.csv_label)?;
//! let run = ffwd::spec::fit_classifier(&cfg, &split, &mut ffwd::train::backprop::Silent)?;
//! assert!(run.report.test_accuracy > 0.6, "{}", run.report.test_accuracy);
//! assert_eq!(run.model.predict(split.test.row(0), 1)?.len(), 1);
//! # Ok::<(), ffwd::Error>(())
//! ```

use serde::{Deserialize, Serialize};

use crate::config::{field_names, one_line, to_object, TrainConfig};
use crate::core::Activation;
use crate::data::text::CharTokenizer;
use crate::data::{Dataset, Split};
use crate::error::{Error, Result};
use crate::layers::guided::GuideConfig;
use crate::layers::hash::balanced_table;
use crate::layers::{
    ChannelIdleConfig, DenseConfig, FffConfig, GluConfig, HashConfig, LayerConfig, LowRankConfig, MoeConfig, PkmConfig, SmoeConfig, StructuredConfig,
    UfffConfig,
};
use crate::models::{Classifier, Lm, ModelConfig};
use crate::optim::Optimizer;
use crate::train::forward_forward::FfNet;
use crate::train::lm::{LmRunConfig, LmTrainOptions, TextData};
use crate::train::{new_optimizer, train_from, Progress, TrainReport, TrainState};

/// A new classifier for `cfg`'s layer, sized for `data` (its width and classes), initialised
/// from `cfg.seed`.
pub fn classifier(cfg: &TrainConfig, data: &Dataset) -> Result<Classifier> {
    Classifier::new(ModelConfig { in_features: data.dim, n_classes: data.n_classes, layer: cfg.layer_config() }, cfg.seed)
}

/// The configuration of a layer of `kind` with the shape shorthands `shape` over that kind's
/// defaults (the FFN of a forecaster, or any layer built outside a [`TrainConfig`]).
pub fn layer(kind: crate::config::LayerKind, shape: &crate::config::LayerShape) -> Result<LayerConfig> {
    let mut cfg = TrainConfig { layer: kind, ..Default::default() };
    cfg.apply_shape(shape)?;
    Ok(cfg.layer_config())
}

/// Forecasting options from loose keys, as the Python package's keyword arguments give them:
/// any [`crate::train::forecast::ForecastOptions`] key, `ffn` (a layer kind for the FFN next
/// to the AR map; absent or `"none"`: linear AR-Net) and the [`crate::config::LayerShape`] shorthands that
/// shape it. Unknown keys are errors naming the key.
pub fn forecast_options(options: &serde_json::Map<String, serde_json::Value>) -> Result<crate::train::forecast::ForecastOptions> {
    let shape_keys = field_names(&crate::config::LayerShape::default())?;
    let (mut shape, mut rest, mut kind) = (serde_json::Map::new(), serde_json::Map::new(), None);
    for (k, v) in options {
        if k == "ffn" {
            match v {
                serde_json::Value::Null => {}
                serde_json::Value::String(s) if s == "none" => {}
                serde_json::Value::String(s) => kind = Some(s.parse::<crate::config::LayerKind>()?),
                _ => return Err(Error::Config(format!("ffn must be a layer kind name, got {v}"))),
            }
        } else if shape_keys.contains(k) {
            shape.insert(k.clone(), v.clone());
        } else {
            rest.insert(k.clone(), v.clone());
        }
    }
    let mut opts: crate::train::forecast::ForecastOptions =
        serde_json::from_value(serde_json::Value::Object(rest)).map_err(|e| Error::Config(one_line(&e.to_string())))?;
    let shape: crate::config::LayerShape = serde_json::from_value(serde_json::Value::Object(shape)).map_err(|e| Error::Config(one_line(&e.to_string())))?;
    match kind {
        Some(k) => opts.layer = Some(layer(k, &shape)?),
        None if shape != crate::config::LayerShape::default() => {
            return Err(Error::Config("the layer shorthands (width, depth, …) shape the FFN: give ffn too".into()))
        }
        None => {}
    }
    Ok(opts)
}

/// A new Forward-Forward net for `cfg.ff`, sized for `data` (the run's `grad_noise`, when set,
/// overrides `ff.grad_noise`).
pub fn ff_net(cfg: &TrainConfig, data: &Dataset) -> Result<FfNet> {
    // the run's gradient noise, when set, applies to Forward-Forward's local gradients too
    let mut ff = cfg.ff.clone();
    if cfg.grad_noise != 0.0 {
        (ff.grad_noise, ff.grad_noise_gamma) = (cfg.grad_noise, cfg.grad_noise_gamma);
    }
    FfNet::new(ff, data.dim, data.n_classes)
}

/// A trained classifier with what resuming or saving its run needs.
pub struct ClassifierRun {
    /// The model.
    pub model: Classifier,
    /// The optimizer with its state after the last step.
    pub optimizer: Box<dyn Optimizer>,
    /// Where the run stands (step, epoch, sums).
    pub state: TrainState,
    /// Per-epoch history and final accuracies.
    pub report: TrainReport,
}

/// Builds a classifier for `cfg` and trains it on `split` by backpropagation.
pub fn fit_classifier(cfg: &TrainConfig, split: &Split, progress: &mut dyn Progress) -> Result<ClassifierRun> {
    let mut model = classifier(cfg, &split.train)?;
    let opts = cfg.train_options();
    let mut optimizer = new_optimizer(&opts);
    let mut state = TrainState::default();
    let report = train_from(&mut model, split, &opts, optimizer.as_mut(), &mut state, progress)?;
    Ok(ClassifierRun { model, optimizer, state, report })
}

/// Kind of feedforward block in every transformer block of an LM.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FfnKind {
    /// Linear → GELU → Linear.
    Dense,
    /// Three Linear maps with GELU between (same width).
    Dense3,
    /// Gated FFN with SiLU (width default ⅔ · 4d: a dense FFN's parameters).
    Swiglu,
    /// Gated FFN with GELU.
    Geglu,
    /// Gated FFN with ReLU.
    Reglu,
    /// Low-rank FFN (width 4d, GELU; `rank` r, default d/4).
    #[serde(rename = "lowrank")]
    LowRank,
    /// BlockDense FFN (width 4d, GELU; `rank` r default d/4, `blocks` default 4).
    #[serde(rename = "blockdense")]
    BlockDense,
    /// BlockShuffle FFN (width 4d, GELU; `rank` = middle width m default d, `blocks` default 2).
    #[serde(rename = "blockshuffle")]
    BlockShuffle,
    /// Fast feedforward network (leaf = width / 2^depth).
    Fff,
    /// UltraFastBERT tree (width = 2^(depth+1) − 1 neurons per tree).
    Ufff,
    /// Top-k softmax mixture (expert_width = width / experts).
    Moe,
    /// σ-MoE.
    Smoe,
    /// Hash layer routed by the input character.
    Hash,
    /// Product-key memory (width = n_keys² values).
    Pkm,
    /// Channel-idle FFN (RePaViT; width 4d, GELU on a quarter of the channels, BatchNorm
    /// before each map; folded at inference).
    #[serde(rename = "channelidle")]
    ChannelIdle,
}

impl FfnKind {
    /// Every kind, in the order of `--help`.
    pub const ALL: [FfnKind; 15] = [
        FfnKind::Dense,
        FfnKind::Dense3,
        FfnKind::Swiglu,
        FfnKind::Geglu,
        FfnKind::Reglu,
        FfnKind::LowRank,
        FfnKind::BlockDense,
        FfnKind::BlockShuffle,
        FfnKind::Fff,
        FfnKind::Ufff,
        FfnKind::Moe,
        FfnKind::Smoe,
        FfnKind::Hash,
        FfnKind::Pkm,
        FfnKind::ChannelIdle,
    ];

    /// The name used in flags and options.
    pub fn name(self) -> &'static str {
        match self {
            FfnKind::Dense => "dense",
            FfnKind::Dense3 => "dense3",
            FfnKind::Swiglu => "swiglu",
            FfnKind::Geglu => "geglu",
            FfnKind::Reglu => "reglu",
            FfnKind::LowRank => "lowrank",
            FfnKind::BlockDense => "blockdense",
            FfnKind::BlockShuffle => "blockshuffle",
            FfnKind::Fff => "fff",
            FfnKind::Ufff => "ufff",
            FfnKind::Moe => "moe",
            FfnKind::Smoe => "smoe",
            FfnKind::Hash => "hash",
            FfnKind::Pkm => "pkm",
            FfnKind::ChannelIdle => "channelidle",
        }
    }
}

impl std::str::FromStr for FfnKind {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        FfnKind::ALL.into_iter().find(|k| k.name() == s).ok_or_else(|| {
            let names: Vec<&str> = FfnKind::ALL.iter().map(|k| k.name()).collect();
            Error::Config(format!("unknown ffn `{s}` (expected {})", names.join(", ")))
        })
    }
}

/// The LM's FFN as a shorthand: a kind and its size, mapped by [`FfnShape::layer_config`] to
/// the layer's full configuration (GELU everywhere, the layer's defaults otherwise).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FfnShape {
    /// The kind (none: keep the run file's `[model.ffn]`).
    pub ffn: Option<FfnKind>,
    /// Hidden size: dense units; glu gated units; fff total leaf width; ufff neurons per tree
    /// (2^(depth+1)−1); moe/smoe/hash experts × expert width; pkm values [default: 4·d_model;
    /// ⅔ · 4·d_model rounded up to a multiple of 8 for the glu kinds; 1023 for ufff].
    pub ffn_width: Option<usize>,
    /// fff/ufff depth [default: 3 for fff, 9 for ufff].
    pub depth: Option<usize>,
    /// ufff parallel trees [default: 1].
    pub trees: Option<usize>,
    /// lowrank rank [default: d_model / 4]; blockdense rank [default d_model / 4];
    /// blockshuffle middle width [default d_model].
    pub rank: Option<usize>,
    /// blockdense/blockshuffle blocks [default: 4 / 2].
    pub blocks: Option<usize>,
    /// moe/smoe/hash experts [default: 16].
    pub experts: Option<usize>,
    /// moe/smoe experts per token; pkm values per head [default: 2; 8 for pkm].
    pub top_k: Option<usize>,
    /// hash: a balanced table from the training text's character frequencies (else random).
    pub balanced_hash: bool,
    /// Keep the first block's FFN a dense GELU FFN of width `4·d_model` (the structured-FFN
    /// paper's choice), whatever the kind of the others.
    pub first_dense: bool,
    /// lowrank/blockdense/blockshuffle: self-guided training, α decaying 1 → 0 over this share
    /// of the steps (the paper's default 0.5).
    pub guided: Option<f32>,
    /// With `guided`: run the dense branch only with probability α per forward.
    pub reduce_flop: bool,
}

impl FfnShape {
    /// No kind given: the default dense FFN (GELU, `4·d_model` wide unless `ffn_width` says
    /// otherwise), so that its width follows the model's width instead of staying at the
    /// default model's 768.
    pub fn with_default_kind(mut self) -> Self {
        self.ffn.get_or_insert(FfnKind::Dense);
        self
    }

    /// The layer configuration for a model of width `d_model`; `freqs` gives the training
    /// text's token counts (called only for a balanced hash table). `None` when no kind is
    /// set (then no other option may be).
    pub fn layer_config(&self, d_model: usize, freqs: &dyn Fn() -> Vec<u64>) -> Result<Option<LayerConfig>> {
        let Some(kind) = self.ffn else {
            let any = [self.ffn_width, self.depth, self.trees, self.rank, self.blocks, self.experts, self.top_k].iter().any(Option::is_some);
            if any || self.balanced_hash || self.guided.is_some() || self.reduce_flop {
                return Err(Error::Config("ffn_width, depth, trees, rank, experts, top_k, balanced_hash, guided and reduce_flop need an ffn kind".into()));
            }
            return Ok(None);
        };
        let only = |set: bool, what: &str, kinds: &str| {
            if set {
                Err(Error::Config(format!("{what} applies to ffn {kinds}, not {}", kind.name())))
            } else {
                Ok(())
            }
        };
        let tree = matches!(kind, FfnKind::Fff | FfnKind::Ufff);
        let mixture = matches!(kind, FfnKind::Moe | FfnKind::Smoe | FfnKind::Hash);
        only(self.depth.is_some() && !tree, "depth", "fff or ufff")?;
        only(self.trees.is_some() && kind != FfnKind::Ufff, "trees", "ufff")?;
        let structured = matches!(kind, FfnKind::BlockDense | FfnKind::BlockShuffle);
        only(self.rank.is_some() && kind != FfnKind::LowRank && !structured, "rank", "lowrank, blockdense or blockshuffle")?;
        only(self.blocks.is_some() && !structured, "blocks", "blockdense or blockshuffle")?;
        only(self.experts.is_some() && !mixture, "experts", "moe, smoe or hash")?;
        only(self.top_k.is_some() && !matches!(kind, FfnKind::Moe | FfnKind::Smoe | FfnKind::Pkm), "top_k", "moe, smoe or pkm")?;
        only(self.balanced_hash && kind != FfnKind::Hash, "balanced_hash", "hash")?;
        only(self.guided.is_some() && kind != FfnKind::LowRank && !structured, "guided", "lowrank, blockdense or blockshuffle")?;
        if self.reduce_flop && self.guided.is_none() {
            return Err(Error::Config("reduce_flop needs guided (self-guided training)".into()));
        }
        let guide = self.guided.map(|fraction| GuideConfig { fraction, reduce_flop: self.reduce_flop });
        if let Some(g) = &guide {
            g.validate()?;
        }
        let gelu = Activation::Gelu;
        let experts = self.experts.unwrap_or(16);
        let per = |w: usize| -> Result<usize> {
            if w > 0 && experts > 0 && w.is_multiple_of(experts) {
                Ok(w / experts)
            } else {
                Err(Error::Config(format!("ffn_width {w} is not a positive multiple of experts {experts}")))
            }
        };
        let width = self.ffn_width.unwrap_or(4 * d_model);
        Ok(Some(match kind {
            FfnKind::Dense => LayerConfig::Dense(DenseConfig { width, layers: 2, activation: gelu }),
            FfnKind::Dense3 => LayerConfig::Dense(DenseConfig { width, layers: 3, activation: gelu }),
            FfnKind::LowRank => LayerConfig::LowRank(LowRankConfig { width, rank: self.rank.unwrap_or((d_model / 4).max(1)), activation: gelu, guide }),
            FfnKind::Swiglu | FfnKind::Geglu | FfnKind::Reglu => {
                let activation = match kind {
                    FfnKind::Swiglu => Activation::Silu,
                    FfnKind::Geglu => Activation::Gelu,
                    _ => Activation::Relu,
                };
                // three matrices of d × h hold a dense FFN's 2 · d · 4d parameters at h = ⅔ · 4d
                let width = self.ffn_width.unwrap_or((8 * d_model).div_ceil(3).next_multiple_of(8));
                LayerConfig::Glu(GluConfig { width, activation })
            }
            FfnKind::BlockDense => LayerConfig::BlockDense(StructuredConfig {
                width,
                rank: self.rank.unwrap_or((d_model / 4).max(1)),
                blocks: self.blocks.unwrap_or(4),
                activation: gelu,
                guide,
            }),
            FfnKind::BlockShuffle => LayerConfig::BlockShuffle(StructuredConfig {
                width,
                rank: self.rank.unwrap_or(d_model),
                blocks: self.blocks.unwrap_or(2),
                activation: gelu,
                guide,
            }),
            FfnKind::Fff => {
                let depth = self.depth.unwrap_or(3);
                let leaves = 1usize.checked_shl(depth as u32).filter(|_| depth < 32).ok_or_else(|| Error::Config(format!("fff depth {depth} is too large")))?;
                if width == 0 || !width.is_multiple_of(leaves) {
                    return Err(Error::Config(format!("ffn_width {width} is not a positive multiple of 2^depth = {leaves}")));
                }
                LayerConfig::Fff(FffConfig { depth, leaf: width / leaves, activation: gelu, ..Default::default() })
            }
            FfnKind::Ufff => {
                let depth = match (self.depth, self.ffn_width) {
                    (Some(dp), _) => dp,
                    (None, Some(w)) => {
                        if w == 0 || !(w + 1).is_power_of_two() {
                            return Err(Error::Config(format!("ufff ffn_width {w} is not 2^(depth+1) − 1 neurons per tree")));
                        }
                        (w + 1).trailing_zeros() as usize - 1
                    }
                    (None, None) => 9,
                };
                LayerConfig::Ufff(UfffConfig { depth, trees: self.trees.unwrap_or(1), activation: gelu, ..Default::default() })
            }
            FfnKind::Moe => {
                LayerConfig::Moe(MoeConfig { experts, expert_width: per(width)?, k: self.top_k.unwrap_or(2), activation: gelu, ..Default::default() })
            }
            FfnKind::Smoe => {
                LayerConfig::Smoe(SmoeConfig { experts, expert_width: per(width)?, k: self.top_k.unwrap_or(2), activation: gelu, ..Default::default() })
            }
            FfnKind::Hash => {
                let table = if self.balanced_hash { balanced_table(&freqs(), experts) } else { Vec::new() };
                LayerConfig::Hash(HashConfig { experts, expert_width: per(width)?, table, activation: gelu, ..Default::default() })
            }
            FfnKind::ChannelIdle => LayerConfig::ChannelIdle(ChannelIdleConfig { width, activation: gelu, ..Default::default() }),
            FfnKind::Pkm => {
                let n = (width as f64).sqrt().round() as usize;
                if width == 0 || n * n != width {
                    return Err(Error::Config(format!("pkm ffn_width {width} (memory values) is not a square")));
                }
                LayerConfig::Pkm(PkmConfig { n_keys: n, k: self.top_k.unwrap_or(8).min(n), ..Default::default() })
            }
        }))
    }
}

/// An LM run ready to train: the model, its vocabulary, the resolved options and the text
/// split into training head and held-out tail.
pub struct LmRun {
    /// The freshly initialised model.
    pub lm: Lm,
    /// The character vocabulary of the text.
    pub tokenizer: CharTokenizer,
    /// The options, with `seq_len` resolved.
    pub options: LmTrainOptions,
    /// The encoded text.
    pub data: TextData,
}

/// Builds a language model for `run` (its `[model]` with the vocabulary of `text`, and the FFN
/// of `ffn` when it names a kind) and splits `text` for training. A `seq_len` of 0 means the
/// model's context.
pub fn lm(run: &LmRunConfig, ffn: &FfnShape, text: &str) -> Result<LmRun> {
    let tokenizer = CharTokenizer::from_text(text)?;
    let mut cfg = run.model.clone();
    cfg.vocab = tokenizer.len();
    let freqs = || {
        let mut f = vec![0u64; tokenizer.len()];
        for c in text.chars() {
            if let Ok(i) = tokenizer.chars().binary_search(&c) {
                f[i] += 1;
            }
        }
        f
    };
    if let Some(layer) = ffn.layer_config(cfg.d_model, &freqs)? {
        cfg.ffn = layer;
    }
    if ffn.first_dense {
        cfg.first_ffn = Some(LayerConfig::Dense(DenseConfig { width: 4 * cfg.d_model, layers: 2, activation: Activation::Gelu }));
    }
    let mut options = run.train.clone();
    if options.seq_len == 0 {
        options.seq_len = cfg.context;
    }
    let lm = Lm::new(cfg, options.seed)?;
    let data = lm_data(&lm, &tokenizer, text, &options)?;
    Ok(LmRun { lm, tokenizer, options, data })
}

/// Encodes `text` with a model's vocabulary and splits it as `options` say (a resumed run
/// reads its text again this way). `options.seq_len` must be in `1..=` the model's context.
pub fn lm_data(lm: &Lm, tokenizer: &CharTokenizer, text: &str, options: &LmTrainOptions) -> Result<TextData> {
    let context = lm.config().context;
    if options.seq_len == 0 || options.seq_len > context {
        return Err(Error::Config(format!("seq_len {} must be in 1..={context} (the model's context)", options.seq_len)));
    }
    if tokenizer.len() != lm.config().vocab {
        return Err(Error::Config(format!("the tokenizer has {} characters, the model's vocabulary {}", tokenizer.len(), lm.config().vocab)));
    }
    TextData::split(tokenizer.encode(text)?, options.val_fraction, options.seq_len)
}

/// An LM run configuration and FFN shorthand from loose options, as the Python package's
/// keyword arguments give them: keys of `[model]` (context, d_model, heads, layers, parallel),
/// of `[train]` (steps, batch, lr, …) and of [`FfnShape`] (ffn, ffn_width, depth, trees,
/// experts, top_k, balanced_hash), over `base`. Unknown keys are errors naming the key.
pub fn lm_options(base: &LmRunConfig, options: &serde_json::Map<String, serde_json::Value>) -> Result<(LmRunConfig, FfnShape)> {
    let (mut model, mut train, mut shape) = (to_object(&base.model)?, to_object(&base.train)?, serde_json::Map::new());
    let (model_keys, train_keys) = (field_names(&base.model)?, field_names(&base.train)?);
    let shape_keys = field_names(&FfnShape::default())?;
    for (k, v) in options {
        if shape_keys.contains(k) {
            shape.insert(k.clone(), v.clone());
        } else if model_keys.contains(k) && k != "vocab" && k != "ffn" {
            model.insert(k.clone(), v.clone());
        } else if train_keys.contains(k) {
            train.insert(k.clone(), v.clone());
        } else {
            return Err(Error::Config(format!(
                "unknown option `{k}` (model: context, d_model, heads, layers, parallel; train: {}; ffn: {})",
                train_keys.join(", "),
                shape_keys.join(", ")
            )));
        }
    }
    let parse = |m: serde_json::Map<String, serde_json::Value>| serde_json::Value::Object(m);
    let err = |e: serde_json::Error| Error::Config(one_line(&e.to_string()));
    let run = LmRunConfig { model: serde_json::from_value(parse(model)).map_err(err)?, train: serde_json::from_value(parse(train)).map_err(err)? };
    let mut shape: FfnShape = serde_json::from_value(parse(shape)).map_err(err)?;
    if base.model.ffn == crate::models::LmConfig::default().ffn {
        shape = shape.with_default_kind();
    }
    Ok((run, shape))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ffn_shorthands_map_to_layers_and_refuse_what_does_not_apply() {
        let no_freqs = || Vec::new();
        let shape = |kind, width| FfnShape { ffn: Some(kind), ffn_width: width, ..Default::default() };
        let fff = shape(FfnKind::Fff, Some(256)).layer_config(64, &no_freqs).unwrap();
        assert!(matches!(fff, Some(LayerConfig::Fff(ref c)) if c.depth == 3 && c.leaf == 32), "{fff:?}");
        let ufff = FfnShape { trees: Some(4), ..shape(FfnKind::Ufff, Some(15)) }.layer_config(64, &no_freqs).unwrap();
        assert!(matches!(ufff, Some(LayerConfig::Ufff(ref c)) if c.depth == 3 && c.trees == 4), "{ufff:?}");
        let e = FfnShape { trees: Some(2), ..shape(FfnKind::Dense, None) }.layer_config(64, &no_freqs).unwrap_err().to_string();
        assert!(e.contains("trees applies to ffn ufff, not dense"), "{e}");
        let e = FfnShape { depth: Some(2), ..Default::default() }.layer_config(64, &no_freqs).unwrap_err().to_string();
        assert!(e.contains("need an ffn kind"), "{e}");
        assert!(shape(FfnKind::Moe, Some(100)).layer_config(64, &no_freqs).is_err());
        assert_eq!(FfnShape::default().layer_config(64, &no_freqs).unwrap(), None);
    }

    #[test]
    fn loose_options_route_to_their_tables() {
        let opts = serde_json::json!({"d_model": 32, "steps": 7, "ffn": "ufff", "depth": 2, "trees": 3});
        let (run, shape) = lm_options(&LmRunConfig::default(), opts.as_object().unwrap()).unwrap();
        assert_eq!((run.model.d_model, run.train.steps, shape.ffn, shape.trees), (32, 7, Some(FfnKind::Ufff), Some(3)));
        let bad = serde_json::json!({"stpes": 7});
        let e = lm_options(&LmRunConfig::default(), bad.as_object().unwrap()).unwrap_err().to_string();
        assert!(e.contains("unknown option `stpes`"), "{e}");
        let bad = serde_json::json!({"steps": "many"});
        assert!(lm_options(&LmRunConfig::default(), bad.as_object().unwrap()).is_err());

        let opts = serde_json::json!({"layer": "fff", "depth": 2, "width": 32, "epochs": 3, "fff": {"hardening": 0.5}});
        let c = TrainConfig::from_options(&TrainConfig::default(), opts.as_object().unwrap()).unwrap();
        assert_eq!((c.fff.depth, c.fff.leaf, c.epochs, c.fff.hardening), (2, 8, 3, 0.5));
        let bad = serde_json::json!({"layer": "dense", "depth": 2});
        let e = TrainConfig::from_options(&TrainConfig::default(), bad.as_object().unwrap()).unwrap_err().to_string();
        assert!(e.contains("depth applies to fff or ufff, not the dense layer"), "{e}");
        let bad = serde_json::json!({"epoch": 2});
        let e = TrainConfig::from_options(&TrainConfig::default(), bad.as_object().unwrap()).unwrap_err().to_string();
        assert!(e.contains("unknown field `epoch`"), "{e}");
    }

    #[test]
    fn lm_builder_resolves_vocabulary_ffn_and_seq_len() {
        let mut run = LmRunConfig::default();
        (run.model.d_model, run.model.heads, run.model.layers, run.model.context, run.train.seq_len) = (16, 2, 1, 8, 0);
        let text = "abcabcabdabcabcabcabcabdabcabcabcabc".repeat(4);
        let shape = FfnShape { ffn: Some(FfnKind::Hash), ffn_width: Some(32), experts: Some(4), balanced_hash: true, ..Default::default() };
        let built = lm(&run, &shape, &text).unwrap();
        assert_eq!((built.lm.config().vocab, built.options.seq_len), (4, 8));
        assert!(matches!(&built.lm.config().ffn, LayerConfig::Hash(c) if c.table.len() == 4 && c.expert_width == 8));
        run.train.seq_len = 9;
        let e = lm(&run, &shape, &text).err().expect("seq_len beyond the context").to_string();
        assert!(e.contains("seq_len 9"), "{e}");
    }
}
