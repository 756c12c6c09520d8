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

use super::{fill, read_state, tensor, StateDict};
use crate::checkpoint::CheckpointReader;
use crate::core::{Activation, Rng};
use crate::error::{Error, Result};
use crate::layers::{check_size, Fff, FffConfig, LayerConfig, Trainable};

/// Reads a `fastfeedforward` FFF state dict. The package does not store its activation, so
/// pass the one the model was built with (the package default is ReLU).
pub fn load_fff(path: &Path, activation: Activation) -> Result<Fff> {
    let ck = CheckpointReader::open(path)?;
    let st = ck.tensors()?;
    let names = ["node_weights", "node_biases", "w1s", "b1s", "w2s", "b2s"].map(String::from);
    let state = read_state(&ck, &st, &names, "not a fastfeedforward FFF state dict?")?;
    if let Ok(t) = st.tensor("depth") {
        let stored = match (t.dtype(), t.data().len()) {
            (Dtype::I64, 8) => i64::from_le_bytes(t.data().try_into().unwrap_or([0; 8])),
            _ => -1,
        };
        let leaves = state["w1s"].0.first().copied().unwrap_or(0);
        if !leaves.is_power_of_two() || stored != leaves.trailing_zeros() as i64 {
            return Err(ck.error(format!("`depth` is {stored} but w1s has {leaves} leaves")));
        }
    }
    ck.about(fff_from_state(&state, activation))
}

/// Builds the FFF from a state dict held in memory (`node_weights`, `node_biases`, `w1s`,
/// `b1s`, `w2s`, `b2s`; a `depth` entry, if any, is the caller's to check).
pub fn fff_from_state(state: &StateDict, activation: Activation) -> Result<Fff> {
    let what = "fastfeedforward state dict";
    let (w1, _) = tensor(state, "w1s", None, what)?;
    let (w2, _) = tensor(state, "w2s", None, what)?;
    if w1.len() != 3 || w2.len() != 3 {
        return Err(Error::Invalid(format!("{what}: w1s {w1:?} and w2s {w2:?} must have 3 axes")));
    }
    let (leaves, in_features, leaf, out_features) = (w1[0], w1[1], w1[2], w2[2]);
    if !leaves.is_power_of_two() {
        return Err(Error::Invalid(format!("{what}: w1s has {leaves} leaves, not a power of two")));
    }
    let depth = leaves.trailing_zeros() as usize;
    let cfg = FffConfig { depth, leaf, activation, hardening: 0.0, region_leak: 0.0, dropout: 0.0, load_balance: 0.0, master_leaf: 0 };
    check_size("fff", LayerConfig::Fff(cfg.clone()).param_count(in_features, out_features))?;
    let mut fff = Fff::new(cfg, in_features, out_features, &mut Rng::new(0))?;
    // the package's names and layouts are ours: take each parameter's tensor by name
    let mut wanted = Vec::new();
    fff.visit_params_mut(&mut |p| wanted.push((p.name.clone(), p.shape.clone())));
    let values = wanted.iter().map(|(n, s)| tensor(state, n, Some(s), what).map(|(_, v)| v.to_vec())).collect::<Result<Vec<_>>>()?;
    fill(values, &mut |f| fff.visit_params_mut(f));
    Ok(fff)
}
