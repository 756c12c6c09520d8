//! Interop with reference implementations' checkpoints: `fastfeedforward`'s FFF and
//! UltraFastBERT's tree layers, from safetensors files or from in-memory state dicts (the
//! Python package hands over NumPy arrays).

pub mod fastfeedforward;
pub mod ultrafastbert;

use std::collections::BTreeMap;

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
