//! Softmax cross-entropy, fused with its gradient.

/// Mean softmax cross-entropy over a batch, and its gradient.
///
/// Shapes: `logits` is `batch × classes` row-major, `labels` has `batch` entries `< classes`,
/// `dlogits` (written) is `batch × classes` and holds `d(mean loss)/d(logits)`.
/// Returns `(mean loss, number of rows whose argmax equals the label)`.
pub fn softmax_cross_entropy(logits: &[f32], labels: &[u32], classes: usize, dlogits: &mut [f32]) -> (f32, usize) {
    let batch = labels.len();
    let inv_b = 1.0 / batch as f32;
    let mut loss = 0.0f64;
    let mut correct = 0;
    for ((row, drow), &label) in logits.chunks_exact(classes).zip(dlogits.chunks_exact_mut(classes)).zip(labels) {
        let mut maxv = f32::NEG_INFINITY;
        let mut arg = 0;
        for (j, &v) in row.iter().enumerate() {
            if v > maxv {
                maxv = v;
                arg = j;
            }
        }
        if arg == label as usize {
            correct += 1;
        }
        let mut sum = 0.0f32;
        for (d, &v) in drow.iter_mut().zip(row) {
            let e = (v - maxv).exp();
            *d = e;
            sum += e;
        }
        let inv = 1.0 / sum;
        for d in drow.iter_mut() {
            *d *= inv * inv_b;
        }
        drow[label as usize] -= inv_b;
        loss += (sum.ln() + maxv - row[label as usize]) as f64;
    }
    ((loss / batch as f64) as f32, correct)
}

/// Index of the largest value in each row of a `rows × classes` matrix (first on ties).
pub fn argmax_rows(x: &[f32], classes: usize, out: &mut [u32]) {
    for (row, o) in x.chunks_exact(classes).zip(out.iter_mut()) {
        let mut best = 0;
        for (j, &v) in row.iter().enumerate() {
            if v > row[best] {
                best = j;
            }
        }
        *o = best as u32;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn literal_loss_and_gradient() {
        // uniform logits: loss = ln(3), grad = (1/3 - onehot) / batch
        let logits = [0.0, 0.0, 0.0, 1.0, 2.0, 3.0];
        let labels = [1, 2];
        let mut d = [0.0; 6];
        let (loss, correct) = softmax_cross_entropy(&logits, &labels, 3, &mut d);
        let l2 = (1f32.exp() + 2f32.exp() + 3f32.exp()).ln() - 3.0;
        assert!((loss - (3f32.ln() + l2) / 2.0).abs() < 1e-6);
        assert_eq!(correct, 1); // row 0 ties → argmax 0 ≠ 1; row 1 argmax 2 = label
        assert!((d[0] - 1.0 / 6.0).abs() < 1e-6 && (d[1] - (1.0 / 3.0 - 1.0) / 2.0).abs() < 1e-6);
        let rowsum: f32 = d[3..].iter().sum();
        assert!(rowsum.abs() < 1e-6);
    }

    #[test]
    fn gradient_matches_finite_differences() {
        let logits = [0.3f32, -1.2, 2.0, 0.5, 0.1, -0.4, 1.5, 0.0];
        let labels = [2u32, 0];
        let mut d = [0.0; 8];
        softmax_cross_entropy(&logits, &labels, 4, &mut d);
        let mut scratch = [0.0; 8];
        for i in 0..8 {
            let mut lp = logits;
            lp[i] += 1e-2;
            let mut lm = logits;
            lm[i] -= 1e-2;
            let num = (softmax_cross_entropy(&lp, &labels, 4, &mut scratch).0 - softmax_cross_entropy(&lm, &labels, 4, &mut scratch).0) / 2e-2;
            assert!((num - d[i]).abs() < 1e-3, "{i}: {num} vs {}", d[i]);
        }
    }
}
