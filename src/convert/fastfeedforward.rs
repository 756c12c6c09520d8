//! Loads the state dict of the PyTorch package `fastfeedforward` 0.2.1 (class `FFF`), saved
//! with `safetensors.torch.save_file(model.state_dict(), path)`, into an [`Fff`] layer.
//!
//! Keys and layouts are the package's own (`node_weights`, `node_biases`, `w1s`, `b1s`, `w2s`,
//! `b2s`, and `depth` as an int64 scalar), so the values are used as stored. Our training-mode
//! forward reproduces the package's `training_forward`; our hard inference is the paper's
//! (leaf output bias included), which is the package's `eval_forward` plus `b2s[leaf]`:
//! 0.2.1's `eval_forward` drops `b2s` (fixed upstream after that release).

use std::path::Path;

use safetensors::tensor::Dtype;

use crate::checkpoint::CheckpointReader;
use crate::core::{Activation, Rng};
use crate::error::Result;
use crate::layers::{Fff, FffConfig, Layer, LayerConfig};

/// Reads a `fastfeedforward` FFF state dict. The package does not store its activation, so
/// pass the one the model was built with (the package default is ReLU).
pub fn load_fff(path: &Path, activation: Activation) -> Result<Fff> {
    let ck = CheckpointReader::open(path)?;
    let st = ck.tensors()?;
    let shape_of = |name: &str| {
        st.tensor(name).map(|t| t.shape().to_vec()).map_err(|_| ck.error(format!("missing tensor `{name}` (not a fastfeedforward FFF state dict?)")))
    };
    let (w1, w2) = (shape_of("w1s")?, shape_of("w2s")?);
    if w1.len() != 3 || w2.len() != 3 {
        return Err(ck.error(format!("w1s {w1:?} and w2s {w2:?} must have 3 axes")));
    }
    let (leaves, in_features, leaf, out_features) = (w1[0], w1[1], w1[2], w2[2]);
    if !leaves.is_power_of_two() {
        return Err(ck.error(format!("w1s has {leaves} leaves, not a power of two")));
    }
    let depth = leaves.trailing_zeros() as usize;
    if let Ok(t) = st.tensor("depth") {
        let stored = match (t.dtype(), t.data().len()) {
            (Dtype::I64, 8) => i64::from_le_bytes(t.data().try_into().unwrap_or([0; 8])),
            _ => -1,
        };
        if stored != depth as i64 {
            return Err(ck.error(format!("`depth` is {stored} but w1s has {leaves} leaves (depth {depth})")));
        }
    }
    let cfg = FffConfig { depth, leaf, activation, hardening: 0.0, region_leak: 0.0, dropout: 0.0, load_balance: 0.0, master_leaf: 0 };
    ck.check_claim("the FFF", LayerConfig::Fff(cfg.clone()).param_count(in_features, out_features))?;
    let mut fff = ck.about(Fff::new(cfg, in_features, out_features, &mut Rng::new(0)))?;
    ck.fill_params(&st, "", &mut |f| fff.visit_params_mut(f))?;
    Ok(fff)
}
