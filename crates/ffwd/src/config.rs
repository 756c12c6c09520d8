//! The run configuration of `ffwd train`: a TOML file (unknown keys are errors) whose values
//! the CLI flags override.
//!
//! ```toml
//! data = "idx:../shared/data/mnist"
//! layer = "fff"
//! epochs = 20
//! [fff]
//! depth = 4
//! leaf = 8
//! ```

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::core::Activation;
use crate::data::csv::LabelColumn;
use crate::error::{Error, Result};
use crate::layers::{
    ChannelIdleConfig, DenseConfig, DeqConfig, FffConfig, GluConfig, LayerConfig, LowRankConfig, MoeConfig, PkmConfig, SmoeConfig, StructuredConfig, UfffConfig,
};
use crate::optim::OptimizerKind;
use crate::train::forward_forward::FfConfig;
use crate::train::TrainOptions;

/// Which layer the classifier uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum LayerKind {
    /// Dense FFN.
    #[default]
    Dense,
    /// Deep-equilibrium FFN.
    Deq,
    /// Fast feedforward network.
    Fff,
    /// Gated FFN (SwiGLU, GEGLU, ReGLU by the activation).
    Glu,
    /// Low-rank FFN (U·V factors, SVD init).
    #[serde(rename = "lowrank")]
    LowRank,
    /// BlockDense FFN (block-diagonal then low-rank).
    #[serde(rename = "blockdense")]
    BlockDense,
    /// BlockShuffle FFN (block-diagonal, shuffle, block-diagonal).
    #[serde(rename = "blockshuffle")]
    BlockShuffle,
    /// Channel-idle FFN (RePaViT: batch norms, a share of the hidden channels linear).
    #[serde(rename = "channelidle")]
    ChannelIdle,
    /// UltraFastBERT tree.
    Ufff,
    /// Top-k softmax mixture of experts.
    Moe,
    /// σ-MoE.
    Smoe,
    /// Product-key memory.
    Pkm,
}

impl LayerKind {
    /// The name used in configs and flags.
    pub fn name(self) -> &'static str {
        match self {
            LayerKind::Dense => "dense",
            LayerKind::Deq => "deq",
            LayerKind::Fff => "fff",
            LayerKind::Glu => "glu",
            LayerKind::LowRank => "lowrank",
            LayerKind::BlockDense => "blockdense",
            LayerKind::BlockShuffle => "blockshuffle",
            LayerKind::ChannelIdle => "channelidle",
            LayerKind::Ufff => "ufff",
            LayerKind::Moe => "moe",
            LayerKind::Smoe => "smoe",
            LayerKind::Pkm => "pkm",
        }
    }
}

impl std::str::FromStr for LayerKind {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "dense" => Ok(LayerKind::Dense),
            "deq" => Ok(LayerKind::Deq),
            "fff" => Ok(LayerKind::Fff),
            "glu" => Ok(LayerKind::Glu),
            "lowrank" => Ok(LayerKind::LowRank),
            "blockdense" => Ok(LayerKind::BlockDense),
            "blockshuffle" => Ok(LayerKind::BlockShuffle),
            "channelidle" => Ok(LayerKind::ChannelIdle),
            "ufff" => Ok(LayerKind::Ufff),
            "moe" => Ok(LayerKind::Moe),
            "smoe" => Ok(LayerKind::Smoe),
            "pkm" => Ok(LayerKind::Pkm),
            _ => Err(Error::Config(format!(
                "unknown layer `{s}` (expected dense, deq, fff, glu, lowrank, blockdense, blockshuffle, channelidle, ufff, moe, smoe or pkm)"
            ))),
        }
    }
}

/// Training algorithm.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Algo {
    /// Backpropagation.
    #[default]
    Bp,
    /// Forward-Forward (dense ReLU MLP, layer-local objectives).
    Ff,
}

impl std::str::FromStr for Algo {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "bp" => Ok(Algo::Bp),
            "ff" => Ok(Algo::Ff),
            _ => Err(Error::Config(format!("unknown algorithm `{s}` (expected bp or ff)"))),
        }
    }
}

/// Everything `ffwd train` needs. Defaults train a dense classifier on the embedded digits.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainConfig {
    /// Data spec: `digits`, `idx:DIR` or `csv:FILE`.
    pub data: String,
    /// Fraction of a CSV file held out as the test set.
    pub holdout: f32,
    /// Which CSV column is the label.
    pub csv_label: LabelColumn,
    /// Training algorithm: `bp` (backpropagation) or `ff` (Forward-Forward, options in `[ff]`).
    pub algo: Algo,
    /// Layer kind; its options come from the table of the same name.
    pub layer: LayerKind,
    /// Options of the dense layer.
    pub dense: DenseConfig,
    /// Options of the deep-equilibrium layer.
    pub deq: DeqConfig,
    /// Options of the FFF layer.
    pub fff: FffConfig,
    /// Options of the gated FFN.
    pub glu: GluConfig,
    /// Options of the low-rank FFN.
    pub lowrank: LowRankConfig,
    /// Options of the BlockDense FFN.
    pub blockdense: StructuredConfig,
    /// Options of the BlockShuffle FFN.
    pub blockshuffle: StructuredConfig,
    /// Options of the channel-idle FFN.
    pub channelidle: ChannelIdleConfig,
    /// Options of the UltraFastBERT tree layer.
    pub ufff: UfffConfig,
    /// Options of the top-k mixture of experts.
    pub moe: MoeConfig,
    /// Options of the σ-MoE layer.
    pub smoe: SmoeConfig,
    /// Options of the product-key memory.
    pub pkm: PkmConfig,
    /// Options of Forward-Forward training (its own epochs, batch and learning rates).
    pub ff: FfConfig,
    /// Passes over the training set.
    pub epochs: usize,
    /// Minibatch size.
    pub batch: usize,
    /// Peak learning rate.
    pub lr: f32,
    /// Linear warmup steps.
    pub warmup: usize,
    /// Final LR as a fraction of the peak (cosine decay).
    pub min_lr_ratio: f32,
    /// Decoupled weight decay.
    pub weight_decay: f32,
    /// `adamw` or `sgd`.
    pub optimizer: OptimizerKind,
    /// SGD momentum.
    pub momentum: f32,
    /// Max global gradient norm (0 = off).
    pub clip: f32,
    /// Seed of initialisation, shuffling and stochastic layers.
    pub seed: u64,
    /// Inverted dropout on the input features during training (0 = off).
    pub input_dropout: f32,
    /// Worker threads (0 = all cores).
    pub threads: usize,
    /// Where to save the checkpoint (`.safetensors`).
    pub save: Option<String>,
    /// Where to write the metrics JSON.
    pub metrics: Option<String>,
    /// Also write the checkpoint (`save`) every this many steps, with the optimizer state, so
    /// that `--resume` can continue an interrupted run (0 = only at the end).
    pub save_every: usize,
    /// Gradient noise η: Gaussian noise of variance η / (1 + t)^γ added to the gradients
    /// before clipping (0 = off; Neelakantan et al. 2015).
    pub grad_noise: f32,
    /// Gradient noise decay γ.
    pub grad_noise_gamma: f32,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            data: "digits".into(),
            holdout: 0.2,
            csv_label: LabelColumn::First,
            algo: Algo::Bp,
            layer: LayerKind::Dense,
            dense: DenseConfig::default(),
            deq: DeqConfig::default(),
            blockdense: StructuredConfig::default(),
            blockshuffle: StructuredConfig { blocks: 2, ..Default::default() },
            channelidle: ChannelIdleConfig::default(),
            fff: FffConfig::default(),
            glu: GluConfig::default(),
            lowrank: LowRankConfig::default(),
            ufff: UfffConfig::default(),
            moe: MoeConfig::default(),
            smoe: SmoeConfig::default(),
            pkm: PkmConfig::default(),
            ff: FfConfig::default(),
            // 100 × 45 steps of 32 take under a second on digits; MNIST configs set their own.
            epochs: 100,
            batch: 32,
            lr: 2e-3,
            warmup: 100,
            min_lr_ratio: 0.01,
            weight_decay: 0.1,
            optimizer: OptimizerKind::Adamw,
            momentum: 0.9,
            clip: 0.0,
            seed: 0,
            input_dropout: 0.0,
            threads: 0,
            save: None,
            metrics: None,
            save_every: 0,
            grad_noise: 0.0,
            grad_noise_gamma: 0.55,
        }
    }
}

impl TrainConfig {
    /// Parses a TOML file; unknown keys and bad values are errors naming the file.
    pub fn from_toml_file(path: &Path) -> Result<Self> {
        read_toml(path)
    }

    /// Parses the bytes of a TOML file; errors name `name`.
    pub fn from_toml_bytes(bytes: &[u8], name: &str) -> Result<Self> {
        parse_toml(bytes, name)
    }

    /// Parses TOML text.
    pub fn from_toml_str(text: &str) -> Result<Self> {
        toml::from_str(text).map_err(|e| Error::Config(one_line(e.message()) + &span_hint(text, e.span())))
    }

    /// The selected layer's configuration.
    pub fn layer_config(&self) -> LayerConfig {
        match self.layer {
            LayerKind::Dense => LayerConfig::Dense(self.dense.clone()),
            LayerKind::Deq => LayerConfig::Deq(self.deq.clone()),
            LayerKind::Fff => LayerConfig::Fff(self.fff.clone()),
            LayerKind::Glu => LayerConfig::Glu(self.glu.clone()),
            LayerKind::LowRank => LayerConfig::LowRank(self.lowrank.clone()),
            LayerKind::BlockDense => LayerConfig::BlockDense(self.blockdense.clone()),
            LayerKind::BlockShuffle => LayerConfig::BlockShuffle(self.blockshuffle.clone()),
            LayerKind::ChannelIdle => LayerConfig::ChannelIdle(self.channelidle.clone()),
            LayerKind::Ufff => LayerConfig::Ufff(self.ufff.clone()),
            LayerKind::Moe => LayerConfig::Moe(self.moe.clone()),
            LayerKind::Smoe => LayerConfig::Smoe(self.smoe.clone()),
            LayerKind::Pkm => LayerConfig::Pkm(self.pkm.clone()),
        }
    }

    /// Sets the hidden width of the selected layer: dense and glu units; for `fff`, leaf = width / 2^depth;
    /// for `ufff`, depth such that 2^(depth+1) − 1 = width; for `moe`/`smoe`, expert_width =
    /// width / experts; for `pkm`, n_keys = √width (the number of memory values).
    pub fn set_width(&mut self, width: usize) -> Result<()> {
        match self.layer {
            LayerKind::Dense => self.dense.width = width,
            LayerKind::Deq => self.deq.width = width,
            LayerKind::Glu => self.glu.width = width,
            LayerKind::LowRank => self.lowrank.width = width,
            LayerKind::BlockDense => self.blockdense.width = width,
            LayerKind::BlockShuffle => self.blockshuffle.width = width,
            LayerKind::ChannelIdle => self.channelidle.width = width,
            LayerKind::Fff => {
                let leaves = 1usize << self.fff.depth;
                if width == 0 || !width.is_multiple_of(leaves) {
                    return Err(Error::Config(format!("fff width {width} is not a positive multiple of 2^depth = {leaves}")));
                }
                self.fff.leaf = width / leaves;
            }
            LayerKind::Ufff => {
                let levels = (width + 1).trailing_zeros() as usize;
                if width == 0 || (width + 1).count_ones() != 1 {
                    return Err(Error::Config(format!("ufff width {width} is not 2^(depth+1) − 1 (e.g. 255 for depth 7)")));
                }
                self.ufff.depth = levels - 1;
            }
            LayerKind::Moe | LayerKind::Smoe => {
                let (experts, w) = match self.layer {
                    LayerKind::Moe => (self.moe.experts, &mut self.moe.expert_width),
                    _ => (self.smoe.experts, &mut self.smoe.expert_width),
                };
                if width == 0 || !width.is_multiple_of(experts.max(1)) {
                    return Err(Error::Config(format!("mixture width {width} is not a positive multiple of experts = {experts}")));
                }
                *w = width / experts.max(1);
            }
            LayerKind::Pkm => {
                let n = (width as f64).sqrt().round() as usize;
                if width == 0 || n * n != width {
                    return Err(Error::Config(format!("pkm width {width} (memory values) is not a square n_keys² (e.g. 256)")));
                }
                self.pkm.n_keys = n;
            }
        }
        Ok(())
    }

    /// Applies the shorthands of `shape` to the selected layer's table (in a fixed order:
    /// experts, depth, trees, leaf, top-k, width, dense layers, activation, so that `width`
    /// divides by the final experts and depth). Shorthands that do not apply to the selected
    /// layer are errors naming it.
    pub fn apply_shape(&mut self, shape: &LayerShape) -> Result<()> {
        let kind = self.layer;
        let refuse = |what: &str, applies: &str| Error::Config(format!("{what} applies to {applies}, not the {} layer", kind.name()));
        if let Some(e) = shape.experts {
            match kind {
                LayerKind::Moe | LayerKind::Smoe => (self.moe.experts, self.smoe.experts) = (e, e),
                _ => return Err(refuse("experts", "moe or smoe")),
            }
        }
        if let Some(w) = shape.expert_width {
            match kind {
                LayerKind::Moe | LayerKind::Smoe => (self.moe.expert_width, self.smoe.expert_width) = (w, w),
                _ => return Err(refuse("expert_width", "moe or smoe")),
            }
        }
        if let Some(d) = shape.depth {
            match kind {
                LayerKind::Fff => self.fff.depth = d,
                LayerKind::Ufff => self.ufff.depth = d,
                _ => return Err(refuse("depth", "fff or ufff")),
            }
        }
        if let Some(r) = shape.rank {
            match kind {
                LayerKind::LowRank => self.lowrank.rank = r,
                LayerKind::BlockDense => self.blockdense.rank = r,
                LayerKind::BlockShuffle => self.blockshuffle.rank = r,
                _ => return Err(refuse("rank", "lowrank, blockdense or blockshuffle")),
            }
        }
        if let Some(b) = shape.blocks {
            match kind {
                LayerKind::BlockDense => self.blockdense.blocks = b,
                LayerKind::BlockShuffle => self.blockshuffle.blocks = b,
                _ => return Err(refuse("blocks", "blockdense or blockshuffle")),
            }
        }
        if let Some(t) = shape.trees {
            match kind {
                LayerKind::Ufff => self.ufff.trees = t,
                _ => return Err(refuse("trees", "ufff")),
            }
        }
        if let Some(l) = shape.leaf {
            match kind {
                LayerKind::Fff => self.fff.leaf = l,
                _ => return Err(refuse("leaf", "fff")),
            }
        }
        if let Some(k) = shape.top_k {
            match kind {
                LayerKind::Moe => self.moe.k = k,
                LayerKind::Smoe => self.smoe.k = k,
                LayerKind::Pkm => self.pkm.k = k,
                _ => return Err(refuse("top_k", "moe, smoe or pkm")),
            }
        }
        if let Some(w) = shape.width {
            self.set_width(w)?;
        }
        if let Some(n) = shape.dense_layers {
            match kind {
                LayerKind::Dense => self.dense.layers = n,
                _ => return Err(refuse("dense_layers", "dense")),
            }
        }
        if let Some(act) = shape.activation {
            match kind {
                LayerKind::Dense => self.dense.activation = act,
                LayerKind::Deq => self.deq.activation = act,
                LayerKind::Fff => self.fff.activation = act,
                LayerKind::Glu => self.glu.activation = act,
                LayerKind::LowRank => self.lowrank.activation = act,
                LayerKind::BlockDense => self.blockdense.activation = act,
                LayerKind::BlockShuffle => self.blockshuffle.activation = act,
                LayerKind::ChannelIdle => self.channelidle.activation = act,
                LayerKind::Ufff => self.ufff.activation = act,
                LayerKind::Moe => self.moe.activation = act,
                LayerKind::Smoe => self.smoe.activation = act,
                LayerKind::Pkm => return Err(Error::Config("activation does not apply to pkm (see its `scoring`)".into())),
            }
        }
        Ok(())
    }

    /// A run configuration from loose options, as the Python package's keyword arguments
    /// give them: any [`TrainConfig`] key (layer tables as nested objects) and any
    /// [`LayerShape`] shorthand, over `base`. Unknown keys are errors naming the key.
    pub fn from_options(base: &TrainConfig, options: &serde_json::Map<String, serde_json::Value>) -> Result<TrainConfig> {
        let shape_keys = field_names(&LayerShape::default())?;
        let (mut shape, mut rest) = (serde_json::Map::new(), to_object(base)?);
        for (k, v) in options {
            if shape_keys.contains(k) {
                shape.insert(k.clone(), v.clone());
                continue;
            }
            match (rest.get_mut(k), v) {
                // a partial layer table updates the base's table
                (Some(serde_json::Value::Object(table)), serde_json::Value::Object(update)) => table.extend(update.clone()),
                _ => {
                    rest.insert(k.clone(), v.clone());
                }
            }
        }
        let mut cfg: TrainConfig = serde_json::from_value(serde_json::Value::Object(rest)).map_err(|e| Error::Config(one_line(&e.to_string())))?;
        let shape: LayerShape = serde_json::from_value(serde_json::Value::Object(shape)).map_err(|e| Error::Config(one_line(&e.to_string())))?;
        cfg.apply_shape(&shape)?;
        Ok(cfg)
    }

    /// The training hyper-parameters.
    pub fn train_options(&self) -> TrainOptions {
        TrainOptions {
            epochs: self.epochs,
            batch: self.batch,
            lr: self.lr,
            warmup: self.warmup,
            min_lr_ratio: self.min_lr_ratio,
            weight_decay: self.weight_decay,
            optimizer: self.optimizer,
            momentum: self.momentum,
            clip: self.clip,
            seed: self.seed,
            input_dropout: self.input_dropout,
            save_every: self.save_every,
            grad_noise: self.grad_noise,
            grad_noise_gamma: self.grad_noise_gamma,
        }
    }
}

/// Shorthands for the selected layer's shape, as the CLI's flags and the Python keyword
/// arguments give them; [`TrainConfig::apply_shape`] maps each to the layer's own option.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LayerShape {
    /// Hidden width (see [`TrainConfig::set_width`]).
    pub width: Option<usize>,
    /// fff router levels (2^depth leaves); ufff depth D (D + 1 neurons per path).
    pub depth: Option<usize>,
    /// ufff parallel trees K.
    pub trees: Option<usize>,
    /// lowrank rank r; blockdense rank r; blockshuffle middle width m.
    pub rank: Option<usize>,
    /// blockdense/blockshuffle blocks nb.
    pub blocks: Option<usize>,
    /// fff leaf width.
    pub leaf: Option<usize>,
    /// moe/smoe experts.
    pub experts: Option<usize>,
    /// moe/smoe hidden units per expert.
    pub expert_width: Option<usize>,
    /// moe/smoe experts per token; pkm values per head.
    pub top_k: Option<usize>,
    /// Hidden activation.
    pub activation: Option<Activation>,
    /// Linear maps of the dense layer.
    pub dense_layers: Option<usize>,
}

/// A struct as a JSON object (for merging loose options into it).
pub(crate) fn to_object<T: Serialize>(value: &T) -> Result<serde_json::Map<String, serde_json::Value>> {
    match serde_json::to_value(value) {
        Ok(serde_json::Value::Object(m)) => Ok(m),
        _ => Err(Error::Config("internal: not a struct".into())),
    }
}

/// The keys a struct serialises to (its field names, for routing loose options).
pub(crate) fn field_names<T: Serialize>(value: &T) -> Result<Vec<String>> {
    Ok(to_object(value)?.keys().cloned().collect())
}

/// Reads a TOML file into `T`; errors name the file (see [`parse_toml`]).
pub fn read_toml<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    parse_toml(&bytes, &path.display().to_string())
}

/// Parses TOML file bytes into `T` (unknown keys are errors when `T` denies them); every
/// error is one line that names `name` and, where known, the line.
pub fn parse_toml<T: serde::de::DeserializeOwned>(bytes: &[u8], name: &str) -> Result<T> {
    let text = std::str::from_utf8(bytes).map_err(|e| Error::Config(format!("{name}: not UTF-8 text (byte {})", e.valid_up_to())))?;
    toml::from_str(text).map_err(|e| Error::Config(format!("{name}: {}{}", one_line(e.message()), span_hint(text, e.span()))))
}

pub(crate) fn one_line(msg: &str) -> String {
    msg.split_whitespace().collect::<Vec<_>>().join(" ")
}

fn span_hint(text: &str, span: Option<std::ops::Range<usize>>) -> String {
    match span {
        Some(r) => {
            // bytes, not a str slice: the span need not fall on a character boundary
            let line = text.as_bytes()[..r.start.min(text.len())].iter().filter(|&&b| b == b'\n').count() + 1;
            format!(" (line {line})")
        }
        None => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn toml_overrides_defaults_and_rejects_unknown_keys() {
        let c = TrainConfig::from_toml_str("layer = \"fff\"\nepochs = 3\n[fff]\ndepth = 2\nleaf = 4\n").unwrap();
        assert_eq!(c.layer, LayerKind::Fff);
        assert_eq!((c.fff.depth, c.fff.leaf, c.epochs, c.batch), (2, 4, 3, 32));
        let e = TrainConfig::from_toml_str("epochs = 3\nepoch = 4\n").unwrap_err().to_string();
        assert!(e.contains("unknown field `epoch`") && e.contains("line 2"), "{e}");
        let e = TrainConfig::from_toml_str("[fff]\ndepht = 4\n").unwrap_err().to_string();
        assert!(e.contains("unknown field `depht`"), "{e}");
    }

    #[test]
    fn width_maps_to_each_layer() {
        let mut c = TrainConfig { layer: LayerKind::Fff, ..Default::default() };
        c.set_width(128).unwrap();
        assert_eq!(c.fff.leaf, 8);
        assert!(c.set_width(100).is_err());
        c.layer = LayerKind::Ufff;
        c.set_width(255).unwrap();
        assert_eq!(c.ufff.depth, 7);
        assert!(c.set_width(256).is_err());
    }
}
