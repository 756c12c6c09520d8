//! UltraFastBERT's tree layer (`training/cramming/architectures/fff.py`, class `FFF`) into a
//! [`Ufff`]: `linear_in` (`Linear(in, K·n)`, with bias) and `linear_out` (`Linear(K·n, out)`,
//! no bias), n = 2^(D+1) − 1 neurons per tree, K parallel trees stored tree by tree.
//!
//! `linear_in.weight` (K·n × in) is already ffwd's `in_weight` (one row per neuron);
//! `linear_out.weight` (out × K·n) is transposed into `out_weight` (K·n × out), so that a
//! neuron's output row is contiguous for the conditional kernel.

use std::path::Path;

use super::{fill, read_state, tensor, StateDict};
use crate::checkpoint::CheckpointReader;
use crate::core::{Activation, Rng};
use crate::error::{Error, Result};
use crate::layers::{LayerConfig, Trainable, Ufff, UfffConfig};

/// Builds the tree layer from `state`'s `{prefix}linear_in.weight`, `{prefix}linear_in.bias`
/// and `{prefix}linear_out.weight` with `trees` parallel trees (the depth follows from the
/// row count). UltraFastBERT uses exact GELU.
pub fn ufff_from_state(state: &StateDict, prefix: &str, trees: usize, activation: Activation) -> Result<Ufff> {
    let what = "UltraFastBERT state dict";
    let (w_in_name, b_in_name, w_out_name) = (format!("{prefix}linear_in.weight"), format!("{prefix}linear_in.bias"), format!("{prefix}linear_out.weight"));
    let (s_in, w_in) = tensor(state, &w_in_name, None, what)?;
    if s_in.len() != 2 {
        return Err(Error::Invalid(format!("{what}: `{w_in_name}` has shape {s_in:?}, expected (trees·nodes, in)")));
    }
    let (rows, in_features) = (s_in[0], s_in[1]);
    if trees == 0 || rows == 0 || !rows.is_multiple_of(trees) || !(rows / trees + 1).is_power_of_two() || rows / trees < 1 {
        return Err(Error::Invalid(format!("{what}: `{w_in_name}` has {rows} rows, not {trees} trees of 2^(depth+1) − 1 nodes")));
    }
    let depth = (rows / trees + 1).trailing_zeros() as usize - 1;
    let (_, b_in) = tensor(state, &b_in_name, Some(&[rows]), what)?;
    let (s_out, w_out) = tensor(state, &w_out_name, None, what)?;
    if s_out.len() != 2 || s_out[1] != rows {
        return Err(Error::Invalid(format!("{what}: `{w_out_name}` has shape {s_out:?}, expected (out, {rows})")));
    }
    let out_features = s_out[0];
    let cfg = UfffConfig { depth, trees, activation, sparse_update: false };
    crate::layers::check_size("ufff", LayerConfig::Ufff(cfg.clone()).param_count(in_features, out_features))?;
    let mut layer = Ufff::new(cfg, in_features, out_features, &mut Rng::new(0))?;
    // (out × rows) → (rows × out)
    let mut out_rows = vec![0.0f32; rows * out_features];
    for (o, row) in w_out.chunks(rows).enumerate() {
        for (n, &v) in row.iter().enumerate() {
            out_rows[n * out_features + o] = v;
        }
    }
    fill(vec![w_in.to_vec(), b_in.to_vec(), out_rows], &mut |f| layer.visit_params_mut(f));
    Ok(layer)
}

/// Reads an UltraFastBERT tree layer from a safetensors file (e.g. saved with
/// `safetensors.torch.save_file(module.state_dict(), path)`; `prefix` selects one layer of a
/// whole model's state dict, as `encoder.layer.0.intermediate.fff.`).
pub fn load_ultrafastbert(path: &Path, prefix: &str, trees: usize) -> Result<Ufff> {
    let ck = CheckpointReader::open(path)?;
    let st = ck.tensors()?;
    let names = ["linear_in.weight", "linear_in.bias", "linear_out.weight"].map(|n| format!("{prefix}{n}"));
    let state = read_state(&ck, &st, &names, "not an UltraFastBERT FFF layer?")?;
    ck.about(ufff_from_state(&state, prefix, trees, Activation::Gelu))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::Rng;
    use crate::layers::Compile;

    #[test]
    fn linear_out_is_transposed_into_rows_and_trees_follow_the_row_count() {
        // 2 trees of depth 1 (3 nodes each), in 4, out 5
        let (k, n, ni, no) = (2, 3, 4, 5);
        let mut r = Rng::new(1);
        let mut rand = |len: usize| (0..len).map(|_| r.normal()).collect::<Vec<f32>>();
        let mut state = StateDict::new();
        state.insert("fff.linear_in.weight".into(), (vec![k * n, ni], rand(k * n * ni)));
        state.insert("fff.linear_in.bias".into(), (vec![k * n], rand(k * n)));
        state.insert("fff.linear_out.weight".into(), (vec![no, k * n], rand(no * k * n)));
        let u = ufff_from_state(&state, "fff.", k, Activation::Gelu).unwrap();
        assert_eq!((u.levels(), u.n_neurons(), u.neurons_per_inference()), (2, 6, 4));
        let w_out = &state["fff.linear_out.weight"].1;
        let p = u.params();
        for node in 0..k * n {
            for o in 0..no {
                assert_eq!(p[2].value[node * no + o], w_out[o * k * n + node]);
            }
        }
        let e = ufff_from_state(&state, "fff.", 4, Activation::Gelu).unwrap_err().to_string();
        assert!(e.contains("not 4 trees"), "{e}");
        let e = ufff_from_state(&state, "", 2, Activation::Gelu).unwrap_err().to_string();
        assert!(e.contains("missing tensor `linear_in.weight`"), "{e}");
    }
}
