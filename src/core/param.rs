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
    /// Gradient of the loss, same layout as `value`; overwritten by each backward.
    pub grad: Vec<f32>,
    /// Whether decoupled weight decay applies (weights yes, biases and gates' biases no).
    pub decay: bool,
    /// Sparse gradient: when `Some`, only these rows (first axis) have a non-zero gradient and
    /// optimizers update only them (lazy update: other rows' moments and decay are left as
    /// they are). Set by conditional layers (`ufff`) after each backward.
    pub touched_rows: Option<Vec<u32>>,
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

    /// Sets the gradient to zero.
    pub fn zero_grad(&mut self) {
        self.grad.fill(0.0);
    }

    /// Scalars per row (product of all axes but the first; 1 for a vector).
    pub fn row_len(&self) -> usize {
        self.shape.iter().skip(1).product()
    }

    /// The ranges of `value`/`grad` an optimizer must visit: the touched rows, or everything.
    pub fn for_each_active_range(&self, mut f: impl FnMut(std::ops::Range<usize>)) {
        match &self.touched_rows {
            None => f(0..self.value.len()),
            Some(rows) => {
                let w = self.row_len();
                for &r in rows {
                    let r = r as usize;
                    f(r * w..(r + 1) * w);
                }
            }
        }
    }
}
