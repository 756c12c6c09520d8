//! `ffwd convert quantize`: any checkpoint with its weight matrices stored as ggml Q8_0 or
//! Q4_0 blocks. Works on the file, not the model: every f32 tensor that is a weight matrix
//! (two or more axes, not a bias, rows [`worth_quantizing`])
//! is packed; with `experts_only` (Mixture of Quantized Experts, Kim et al. 2023) only the
//! FFN/expert weights are, and routers, attention and embeddings stay f32. Optimizer state
//! is dropped (a quantized model is for inference). Loaders dequantize on read and run the
//! quantized kernels of the layers that have them (`dense`, `ufff`).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::checkpoint::{CheckpointReader, CheckpointWriter, QuantInfo, CONVERTED_KEY, QUANT_KEY};
use crate::core::quant::{pack, worth_quantizing, QFormat};
use crate::error::Result;

/// What [`quantize_checkpoint`] did.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct QuantizeReport {
    /// Block format.
    pub format: QFormat,
    /// Only expert/FFN weights.
    pub experts_only: bool,
    /// Tensors stored quantized.
    pub quantized: Vec<String>,
    /// Tensors kept in f32.
    pub kept: Vec<String>,
    /// Optimizer tensors dropped.
    pub dropped: usize,
    /// Bytes of the model's tensors before (f32; optimizer state not counted).
    pub bytes_before: usize,
    /// Bytes of the model's tensors after.
    pub bytes_after: usize,
}

/// True for a parameter of an FFN layer (a classifier's `ffn.*`, a language model's
/// `blocks.N.ffn.*`).
fn in_ffn(name: &str) -> bool {
    name.starts_with("ffn.") || name.contains(".ffn.")
}

/// True for names of routers, keys and queries: the parts of a conditional layer that pick
/// experts rather than compute with them.
fn is_router(name: &str) -> bool {
    ["router", "query", "keys", "node_weights"].iter().any(|k| name.contains(k))
}

/// True for biases (`*.bias`, `b1`, `b2s`, `in_bias`, …).
fn is_bias(name: &str) -> bool {
    let last = name.rsplit('.').next().unwrap_or(name);
    last.contains("bias") || (last.starts_with('b') && last[1..].trim_end_matches('s').chars().all(|c| c.is_ascii_digit()) && last.len() > 1)
}

/// Whether tensor `name` of `shape` is stored quantized.
pub fn quantizable(name: &str, shape: &[usize], experts_only: bool) -> bool {
    let Some(&cols) = shape.last() else { return false };
    shape.len() >= 2 && !name.starts_with("optim.") && !is_bias(name) && worth_quantizing(cols) && (!experts_only || (in_ffn(name) && !is_router(name)))
}

/// The checkpoint in `ck` with its weight matrices block-quantized to `format`; an error for a
/// file that is quantized already.
pub fn quantize_checkpoint(ck: &CheckpointReader, format: QFormat, experts_only: bool) -> Result<(Vec<u8>, QuantizeReport)> {
    if let Some(q) = ck.quant() {
        return Err(ck.error(format!("is quantized already ({}); convert the f32 checkpoint", q.format.name())));
    }
    let st = ck.tensors()?;
    let mut names: Vec<(String, Vec<usize>)> = st.tensors().into_iter().map(|(n, t)| (n, t.shape().to_vec())).collect();
    names.sort();
    let mut report = QuantizeReport { format, experts_only, quantized: vec![], kept: vec![], dropped: 0, bytes_before: 0, bytes_after: 0 };
    let mut values = Vec::new();
    let mut packed = Vec::new();
    let mut tensors = BTreeMap::new();
    for (name, shape) in names {
        if name.starts_with("optim.") {
            report.dropped += 1;
            continue;
        }
        let v = ck.read_f32(&st, &name, &shape)?;
        report.bytes_before += 4 * v.len();
        if quantizable(&name, &shape, experts_only) {
            let cols = shape[shape.len() - 1];
            let rows = v.len() / cols;
            let bytes = pack(format, &v, rows, cols)?;
            report.bytes_after += bytes.len();
            packed.push((name.clone(), vec![rows, bytes.len() / rows.max(1)], bytes));
            tensors.insert(name.clone(), shape);
            report.quantized.push(name);
        } else {
            report.bytes_after += 4 * v.len();
            report.kept.push(name.clone());
            values.push((name, shape, v));
        }
    }
    let mut w = CheckpointWriter::new(ck.format());
    for (key, value) in ck.metadata() {
        if !key.starts_with("ffwd.optim") && key != "ffwd.format" && key != CONVERTED_KEY {
            w.meta(key, value.clone());
        }
    }
    for (name, shape, v) in &values {
        w.tensor(name.clone(), shape, v);
    }
    for (name, shape, bytes) in packed {
        w.bytes(name, &shape, bytes);
    }
    w.json(QUANT_KEY, &QuantInfo { format, experts_only, tensors })?;
    let mut history = converted(ck)?;
    history.push(serde_json::json!({
        "method": "quantize",
        "format": format.name(),
        "experts_only": experts_only,
        "tensors": report.quantized.len(),
        "bytes_before": report.bytes_before,
        "bytes_after": report.bytes_after,
    }));
    w.json(CONVERTED_KEY, &history)?;
    Ok((w.to_bytes()?, report))
}

/// The conversions recorded in a checkpoint (empty for one straight from training).
pub fn converted(ck: &CheckpointReader) -> Result<Vec<serde_json::Value>> {
    Ok(ck.json_opt(CONVERTED_KEY)?.unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selection() {
        assert!(quantizable("ffn.l0.weight", &[1024, 784], false));
        assert!(!quantizable("ffn.l0.bias", &[1024], false));
        assert!(!quantizable("ffn.l1.weight", &[10, 20], false), "rows shorter than a block");
        assert!(!quantizable("ffn.b2s", &[8, 64], false));
        assert!(!quantizable("ffn.b1", &[8, 64], false));
        assert!(quantizable("blocks.0.ffn.w1", &[8, 64, 64], true));
        assert!(!quantizable("blocks.0.ffn.router.weight", &[8, 64], true));
        assert!(quantizable("blocks.0.ffn.router.weight", &[8, 64], false));
        assert!(!quantizable("blocks.0.attn.qkv.weight", &[576, 192], true));
        assert!(quantizable("blocks.0.attn.qkv.weight", &[576, 192], false));
        assert!(!quantizable("ffn.l0.weight", &[10, 40], false), "40 → 64 pads by more than half");
        assert!(quantizable("ffn.w1", &[16, 192, 48], true));
        assert!(!quantizable("optim.m.ffn.l0.weight", &[1024, 784], false));
    }
}
