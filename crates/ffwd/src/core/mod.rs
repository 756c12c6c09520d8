//! The compute core: tensors and parameters, GEMM, element-wise kernels, bf16 weight kernels,
//! the loss, and the RNG.
//! Everything here works on row-major `f32` slices and never allocates on its own (except the
//! SVD, which initialises factored layers).

pub mod activation;
pub mod attention;
pub mod bf16;
pub mod cpu;
pub mod fixed_point;
pub mod gemm;
pub mod loss;
pub mod param;
pub mod profile;
pub mod quant;
pub mod rng;
pub(crate) mod scratch;
pub mod sgemm;
pub mod simd;
pub mod svd;
pub mod tensor;
pub(crate) mod vmath;

pub use activation::Activation;
pub use param::{Param, ParamVisitor, RowSet};
pub use rng::Rng;
pub use tensor::Tensor;
