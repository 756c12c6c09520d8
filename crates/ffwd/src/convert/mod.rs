//! Conversions (`ffwd convert`): imports of reference implementations' checkpoints
//! (`fastfeedforward`'s FFF and UltraFastBERT's tree layers, from safetensors files or from
//! in-memory state dicts the Python package hands over), and conversions of trained models
//! into smaller or faster ones: [`quantize`] (Q8_0/Q4_0 blocks), [`moefy`] (MoEfication),
//! [`shrink`] (low-rank factorisation, expert pruning).

pub mod fastfeedforward;
pub mod moefy;
pub mod quantize;
pub mod shrink;
pub mod ultrafastbert;

use std::collections::BTreeMap;

use safetensors::SafeTensors;

use crate::checkpoint::CheckpointReader;
use crate::core::{Param, ParamVisitor};
use crate::error::{Error, Result};

/// A state dict held in memory: tensor name → (shape, f32 values in row-major order).
pub type StateDict = BTreeMap<String, (Vec<usize>, Vec<f32>)>;

/// Tensor `name` of `state`, which must have `shape`; errors name `what` and the tensor.
pub fn tensor<'a>(state: &'a StateDict, name: &str, shape: Option<&[usize]>, what: &str) -> Result<(&'a [usize], &'a [f32])> {
    let (s, v) = state.get(name).ok_or_else(|| Error::Invalid(format!("{what}: missing tensor `{name}`")))?;
    if s.iter().try_fold(1usize, |a, &d| a.checked_mul(d)) != Some(v.len()) {
        return Err(Error::Invalid(format!("{what}: tensor `{name}` has shape {s:?} but {} values", v.len())));
    }
    if let Some(want) = shape {
        if s.as_slice() != want {
            return Err(Error::Invalid(format!("{what}: tensor `{name}` has shape {s:?}, expected {want:?}")));
        }
    }
    Ok((s, v))
}

/// Reads the f32 tensors `names` of a safetensors file into a state dict (each at the shape
/// the file gives, checked against the file's bytes before it is read); a missing one is an
/// error naming it, followed by `hint`.
pub fn read_state(ck: &CheckpointReader, st: &SafeTensors<'_>, names: &[String], hint: &str) -> Result<StateDict> {
    let mut state = StateDict::new();
    for name in names {
        let t = st.tensor(name).map_err(|_| ck.error(format!("missing tensor `{name}` ({hint})")))?;
        let shape = t.shape().to_vec();
        let values = ck.read_f32(st, name, &shape)?;
        state.insert(name.clone(), (shape, values));
    }
    Ok(state)
}

/// Sets the visited parameters, in order, from `values` (already checked to have each one's
/// length).
fn fill(values: Vec<Vec<f32>>, visit: &mut ParamVisitor<'_>) {
    let mut it = values.into_iter();
    visit(&mut |p: &mut Param| {
        if let Some(v) = it.next() {
            p.value = v;
        }
    });
}
