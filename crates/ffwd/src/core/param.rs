//! A trainable parameter: its safetensors key, shape, value and gradient.

use crate::core::Rng;

/// Something that visits parameters: called with a callback, it calls the callback once per
/// parameter, in a fixed order (models and layers implement it with `visit_params_mut`).
pub type ParamVisitor<'a> = dyn FnMut(&mut dyn FnMut(&mut Param)) + 'a;

/// One trainable tensor. `name` is its safetensors key inside the owning layer.
#[derive(Clone, Debug)]
pub struct Param {
    /// Key in checkpoints (the layer's prefix is added by the model).
    pub name: String,
    /// Shape as stored in checkpoints (row-major).
    pub shape: Vec<usize>,
    /// Values, row-major.
    pub value: Vec<f32>,
    /// Gradient of the loss, same layout as `value`. Backward passes *add* into it (so
    /// micro-batches accumulate); [`Param::zero_grad`] clears it before a step.
    pub grad: Vec<f32>,
    /// Whether decoupled weight decay applies (weights yes, biases and gates' biases no).
    pub decay: bool,
    /// Sparse gradient: when `Some`, only the rows (first axis) in this set have a non-zero
    /// gradient, and optimizers update only them (lazy update: other rows' moments and decay
    /// are left as they are). Conditional layers (`ufff`, `pkm`) switch it on at construction
    /// with [`Param::track_rows`] and insert every row their backward writes; the set is the
    /// union over all backwards since the last [`Param::zero_grad`].
    pub touched_rows: Option<RowSet>,
}

impl Param {
    /// A zero parameter.
    pub fn zeros(name: &str, shape: &[usize], decay: bool) -> Self {
        let n = shape.iter().product();
        Param { name: name.to_string(), shape: shape.to_vec(), value: vec![0.0; n], grad: vec![0.0; n], decay, touched_rows: None }
    }

    /// A parameter drawn uniformly from `[-bound, bound]`.
    pub fn uniform(name: &str, shape: &[usize], bound: f32, decay: bool, rng: &mut Rng) -> Self {
        let mut p = Param::zeros(name, shape, decay);
        for v in &mut p.value {
            *v = rng.uniform_range(-bound, bound);
        }
        p
    }

    /// Number of scalars.
    pub fn len(&self) -> usize {
        self.value.len()
    }

    /// True if the parameter holds no scalar.
    pub fn is_empty(&self) -> bool {
        self.value.is_empty()
    }

    /// Switches on sparse gradients (see [`Param::touched_rows`]): from now on only rows
    /// inserted into the set count. The gradient must be zero (it is after construction).
    pub fn track_rows(&mut self) {
        self.touched_rows = Some(RowSet::new(self.shape.first().copied().unwrap_or(0)));
    }

    /// Sets the gradient to zero: the touched rows only when the gradient is sparse (every
    /// other row is zero already), so the cost does not grow with the table.
    pub fn zero_grad(&mut self) {
        let w = self.row_len();
        match &mut self.touched_rows {
            None => self.grad.fill(0.0),
            Some(set) => {
                for &r in set.rows() {
                    self.grad[r as usize * w..(r as usize + 1) * w].fill(0.0);
                }
                set.clear();
            }
        }
    }

    /// Scalars per row (product of all axes but the first; 1 for a vector).
    pub fn row_len(&self) -> usize {
        self.shape.iter().skip(1).product()
    }

    /// The ranges of `value`/`grad` an optimizer must visit: the touched rows, or everything.
    pub fn for_each_active_range(&self, mut f: impl FnMut(std::ops::Range<usize>)) {
        match &self.touched_rows {
            None => f(0..self.value.len()),
            Some(set) => {
                let w = self.row_len();
                for &r in set.rows() {
                    let r = r as usize;
                    f(r * w..(r + 1) * w);
                }
            }
        }
    }
}

/// A set of row indices with O(1) insertion and membership, allocation-free after
/// construction (capacity for every row is reserved up front).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RowSet {
    rows: Vec<u32>,
    member: Vec<bool>,
}

impl RowSet {
    /// An empty set over rows `0..n`.
    pub fn new(n: usize) -> Self {
        RowSet { rows: Vec::with_capacity(n), member: vec![false; n] }
    }

    /// Adds row `r` (no effect if present). Panics if `r` is out of range.
    #[inline]
    pub fn insert(&mut self, r: u32) {
        let m = &mut self.member[r as usize];
        if !*m {
            *m = true;
            self.rows.push(r);
        }
    }

    /// Whether row `r` is in the set.
    pub fn contains(&self, r: u32) -> bool {
        self.member.get(r as usize).copied().unwrap_or(false)
    }

    /// The rows in insertion order.
    pub fn rows(&self) -> &[u32] {
        &self.rows
    }

    /// Number of rows in the set.
    pub fn len(&self) -> usize {
        self.rows.len()
    }

    /// True when no row is in the set.
    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// Empties the set (cost proportional to its size).
    pub fn clear(&mut self) {
        for &r in &self.rows {
            self.member[r as usize] = false;
        }
        self.rows.clear();
    }
}
