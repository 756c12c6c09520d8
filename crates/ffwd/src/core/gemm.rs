//! Strided f32 matrix multiply on top of the `gemm` crate (packed, SIMD micro-kernels,
//! rayon threads). Views carry row and column strides, so transposes cost nothing.

use std::sync::atomic::{AtomicUsize, Ordering};

use gemm::Parallelism;

/// A read-only strided matrix view: element `(i, j)` is `data[i * rs + j * cs]`.
#[derive(Clone, Copy, Debug)]
pub struct MatRef<'a> {
    data: &'a [f32],
    rows: usize,
    cols: usize,
    rs: usize,
    cs: usize,
}

/// A mutable strided matrix view: element `(i, j)` is `data[i * rs + j * cs]`.
#[derive(Debug)]
pub struct MatMut<'a> {
    data: &'a mut [f32],
    rows: usize,
    cols: usize,
    rs: usize,
    cs: usize,
}

fn span(rows: usize, cols: usize, rs: usize, cs: usize) -> usize {
    if rows == 0 || cols == 0 {
        0
    } else {
        (rows - 1) * rs + (cols - 1) * cs + 1
    }
}

impl<'a> MatRef<'a> {
    /// A contiguous row-major `rows × cols` matrix at the start of `data`.
    pub fn new(data: &'a [f32], rows: usize, cols: usize) -> Self {
        Self::strided(data, rows, cols, cols, 1)
    }

    /// A view with explicit strides; panics if it would read past `data`.
    pub fn strided(data: &'a [f32], rows: usize, cols: usize, rs: usize, cs: usize) -> Self {
        assert!(span(rows, cols, rs, cs) <= data.len(), "MatRef {rows}x{cols} (rs {rs}, cs {cs}) exceeds {} values", data.len());
        MatRef { data, rows, cols, rs, cs }
    }

    /// The transposed view (no copy).
    pub fn t(self) -> Self {
        MatRef { data: self.data, rows: self.cols, cols: self.rows, rs: self.cs, cs: self.rs }
    }

    /// Number of rows.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Number of columns.
    pub fn cols(&self) -> usize {
        self.cols
    }
}

impl<'a> MatMut<'a> {
    /// A contiguous row-major `rows × cols` matrix at the start of `data`.
    pub fn new(data: &'a mut [f32], rows: usize, cols: usize) -> Self {
        Self::strided(data, rows, cols, cols, 1)
    }

    /// A view with explicit strides; panics if it would write past `data`.
    /// Strides must not make two elements alias (not checked beyond the bound).
    pub fn strided(data: &'a mut [f32], rows: usize, cols: usize, rs: usize, cs: usize) -> Self {
        assert!(span(rows, cols, rs, cs) <= data.len(), "MatMut {rows}x{cols} (rs {rs}, cs {cs}) exceeds {} values", data.len());
        MatMut { data, rows, cols, rs, cs }
    }
}

/// Number of matrix products run so far, by ffwd's kernels or the `gemm` crate (for tests
/// and profiling: which paths run products at all).
static GEMM_CALLS: AtomicUsize = AtomicUsize::new(0);

/// How many products [`matmul`] and [`matmul_bias`] have run in this process.
pub fn gemm_calls() -> usize {
    GEMM_CALLS.load(Ordering::Relaxed)
}

thread_local! {
    static IN_LIBRARY: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Threaded GEMM library calls in progress (their workers allocate on rayon's threads).
static PARALLEL_LIBRARY_CALLS: AtomicUsize = AtomicUsize::new(0);

/// True while the calling thread is inside a call of the GEMM library, or while a threaded
/// library call is in progress (whose packing buffers are allocated on rayon's workers):
/// allocation tests count those allocations separately from ffwd's own.
pub fn inside_gemm_library() -> bool {
    IN_LIBRARY.with(|c| c.get()) || PARALLEL_LIBRARY_CALLS.load(Ordering::Relaxed) > 0
}

/// Marks a GEMM library call (on this thread, and process-wide when threaded) until dropped.
struct LibraryCall(bool);

impl LibraryCall {
    fn enter(threaded: bool) -> Self {
        IN_LIBRARY.with(|c| c.set(true));
        if threaded {
            PARALLEL_LIBRARY_CALLS.fetch_add(1, Ordering::Relaxed);
        }
        LibraryCall(threaded)
    }
}

impl Drop for LibraryCall {
    fn drop(&mut self) {
        IN_LIBRARY.with(|c| c.set(false));
        if self.0 {
            PARALLEL_LIBRARY_CALLS.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// The operands of a training step's matrix products.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProductPrecision {
    /// f32 operands (the default).
    #[default]
    F32,
    /// Operands rounded to bfloat16, f32 accumulation (AVX512_BF16 `vdpbf16ps`); the weights
    /// and the optimizer state stay f32 (mixed precision).
    Bf16,
}

impl ProductPrecision {
    /// Parses `f32` or `bf16`.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "f32" => Some(ProductPrecision::F32),
            "bf16" => Some(ProductPrecision::Bf16),
            _ => None,
        }
    }

    /// An error naming the CPU when bf16 products cannot run here.
    pub fn check(self) -> crate::error::Result<()> {
        if self == ProductPrecision::Bf16 && !super::sgemm::bf16_supported() {
            return Err(crate::error::Error::Config("precision bf16 needs AVX512_BF16 (vdpbf16ps): this CPU lacks it, or FFWD_SIMD keeps AVX-512 off".into()));
        }
        Ok(())
    }
}

thread_local! {
    static BF16_PRODUCTS: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `f` with the matrix products that start on this thread inside it (not on other
/// threads) computed from bf16-rounded operands with f32 accumulation (`vdpbf16ps`), when
/// `on`; restores the previous setting afterwards, also on panic. Products that ffwd's kernels
/// do not take (outputs narrower than 16 columns, `FFWD_GEMM=crate`) stay f32, and so do
/// products of at most 48 rows (B would be converted for too few uses of each element). Callers check
/// [`crate::core::sgemm::bf16_supported`] first: without AVX512_BF16 every product stays f32.
pub fn with_bf16_products<R>(on: bool, f: impl FnOnce() -> R) -> R {
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            BF16_PRODUCTS.with(|c| c.set(self.0));
        }
    }
    let _restore = Restore(BF16_PRODUCTS.with(|c| c.replace(on)));
    f()
}

/// Whether products started on this thread now use bf16 operands ([`with_bf16_products`]).
pub fn bf16_products() -> bool {
    BF16_PRODUCTS.with(|c| c.get())
}

/// 0: not chosen yet; 1: ffwd's own kernels; 2: the `gemm` crate.
static BACKEND: AtomicUsize = AtomicUsize::new(0);

/// Whether products run on ffwd's own kernels (`core::sgemm`) rather than the `gemm` crate
/// (`FFWD_GEMM=crate` selects the crate, for comparisons; see also [`use_gemm_crate`]).
fn use_own() -> bool {
    match BACKEND.load(Ordering::Relaxed) {
        0 => {
            let own = std::env::var("FFWD_GEMM").map_or(true, |v| v != "crate");
            BACKEND.store(if own { 1 } else { 2 }, Ordering::Relaxed);
            own
        }
        b => b == 1,
    }
}

/// Whether ffwd's kernels are the faster choice for a product of this shape (C `m × n`, inner
/// `k`), as measured with `cargo bench --bench gemm -- --ab` and `--bench ufff_train`: not
/// for outputs narrower than one 16-column panel or inner dimensions under 16 (a classifier's
/// 10 logits: every tile would be an edge tile), and not for a few rows against a very wide B,
/// whose rows the kernel would read in place one strided panel at a time.
fn own_suits(m: usize, n: usize, k: usize) -> bool {
    n >= 16 && k >= 16 && !(m <= 48 && n > 1024)
}

/// Routes products through the `gemm` crate (`true`) or ffwd's own kernels (`false`): for
/// benchmarks that compare the two in one process.
#[doc(hidden)]
pub fn use_gemm_crate(on: bool) {
    BACKEND.store(if on { 2 } else { 1 }, Ordering::Relaxed);
}

/// Products smaller than this many multiply-adds run on the calling thread.
pub(crate) const PARALLEL_MIN_WORK: usize = 1 << 18;

/// `c = a · b` (or `c += a · b` when `accumulate`).
///
/// Shapes: `a` is `m × k`, `b` is `k × n`, `c` is `m × n`; panics on mismatch (a programming
/// error: public layer APIs check user shapes before they reach here). Uses all threads of the
/// current rayon pool for large products and stays on the calling thread for small ones.
pub fn matmul(c: MatMut<'_>, a: MatRef<'_>, b: MatRef<'_>, accumulate: bool) {
    matmul_on(c, a, b, accumulate, true)
}

/// `b` (`k × n`) packed once for bf16 products against it ([`matmul_packed`]): the
/// weights of an inference kernel. `None` where the CPU lacks AVX512_BF16
/// ([`super::sgemm::bf16_supported`]).
pub fn pack_bf16(b: MatRef<'_>) -> Option<super::sgemm::PackedBf16> {
    // SAFETY: the view is inside its slice (checked when it was made).
    unsafe { super::sgemm::PackedBf16::new(super::sgemm::Operand { ptr: b.data.as_ptr(), rs: b.rs, cs: b.cs }, b.rows, b.cols) }
}

/// `c = a · b (+ bias)` with `b` packed by [`pack_bf16`]: bf16 operand pairs (`a` rounded to
/// nearest even while it is packed), f32 accumulation, at any number of rows. Shapes: `a`
/// `m × k`, `b` `k × n`, `c` `m × n` with unit column stride, `bias` `n`.
pub fn matmul_packed(c: MatMut<'_>, a: MatRef<'_>, b: &super::sgemm::PackedBf16, bias: Option<&[f32]>) {
    let (m, k, n) = (a.rows, a.cols, b.n());
    assert_eq!(b.k(), k, "matmul_packed: inner dimensions differ ({m}x{k} · {}x{n})", b.k());
    assert_eq!((c.rows, c.cols), (m, n), "matmul_packed: output is {}x{}, expected {m}x{n}", c.rows, c.cols);
    assert!(bias.is_none_or(|b| b.len() == n), "matmul_packed: bias of {:?} for {n} columns", bias.map(|b| b.len()));
    assert_eq!(c.cs, 1, "matmul_packed: output columns must be contiguous");
    GEMM_CALLS.fetch_add(1, Ordering::Relaxed);
    // SAFETY: the views are inside their slices (checked when made), c does not overlap a
    // (one is borrowed mutably), the bias has n values.
    unsafe {
        super::sgemm::gemm_packed_bf16(
            m,
            super::sgemm::Operand { ptr: a.data.as_ptr(), rs: a.rs, cs: a.cs },
            b,
            super::sgemm::Output { ptr: c.data.as_mut_ptr(), rs: c.rs },
            bias,
            true,
        )
    }
}

/// `c = a · b + bias` with `bias` (length `n`) added to every row: the tiles start from the
/// bias, so the output is written once (a linear layer's forward).
pub fn matmul_bias(c: MatMut<'_>, a: MatRef<'_>, b: MatRef<'_>, bias: &[f32]) {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    assert_eq!(b.rows, k, "matmul_bias: inner dimensions differ ({m}x{k} · {}x{n})", b.rows);
    assert_eq!((c.rows, c.cols), (m, n), "matmul_bias: output is {}x{}, expected {m}x{n}", c.rows, c.cols);
    assert_eq!(bias.len(), n, "matmul_bias: bias of {} for {n} columns", bias.len());
    if use_own() && c.cs == 1 && own_suits(m, n, k) {
        GEMM_CALLS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: as in `matmul_on`; the bias has n values (asserted).
        unsafe {
            super::sgemm::gemm(
                m,
                n,
                k,
                super::sgemm::Operand { ptr: a.data.as_ptr(), rs: a.rs, cs: a.cs },
                super::sgemm::Operand { ptr: b.data.as_ptr(), rs: b.rs, cs: b.cs },
                super::sgemm::Output { ptr: c.data.as_mut_ptr(), rs: c.rs },
                Some(bias),
                false,
                true, // the kernel stays on the calling thread for small products itself
                bf16_products(),
            )
        };
        return;
    }
    for i in 0..m {
        for (j, &bj) in bias.iter().enumerate() {
            c.data[i * c.rs + j * c.cs] = bj;
        }
    }
    matmul(c, a, b, true);
}

/// [`matmul`] that always stays on the calling thread: for the many small products of a
/// grouped (per-expert) dispatch that is itself spread over threads.
pub fn matmul_serial(c: MatMut<'_>, a: MatRef<'_>, b: MatRef<'_>, accumulate: bool) {
    matmul_on(c, a, b, accumulate, false)
}

fn matmul_on(c: MatMut<'_>, a: MatRef<'_>, b: MatRef<'_>, accumulate: bool, threads: bool) {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    assert_eq!(b.rows, k, "matmul: inner dimensions differ ({m}x{k} · {}x{n})", b.rows);
    assert_eq!((c.rows, c.cols), (m, n), "matmul: output is {}x{}, expected {m}x{n}", c.rows, c.cols);
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            for i in 0..m {
                for j in 0..n {
                    c.data[i * c.rs + j * c.cs] = 0.0;
                }
            }
        }
        return;
    }
    let par = if threads && m * n * k >= PARALLEL_MIN_WORK && rayon::current_num_threads() > 1 { Parallelism::Rayon(0) } else { Parallelism::None };
    GEMM_CALLS.fetch_add(1, Ordering::Relaxed);
    let own = if c.cs == 1 { own_suits(m, n, k) } else { c.rs == 1 && own_suits(n, m, k) };
    if use_own() && own {
        use super::sgemm::{gemm, Operand, Output};
        let (a_op, b_op) = (Operand { ptr: a.data.as_ptr(), rs: a.rs, cs: a.cs }, Operand { ptr: b.data.as_ptr(), rs: b.rs, cs: b.cs });
        // SAFETY: the views were bound-checked at construction; C is borrowed mutably, so it
        // cannot alias A or B. A column-major C is computed as Cᵀ = Bᵀ·Aᵀ.
        unsafe {
            if c.cs == 1 {
                gemm(m, n, k, a_op, b_op, Output { ptr: c.data.as_mut_ptr(), rs: c.rs }, None, accumulate, threads, bf16_products());
            } else {
                let (at, bt) = (Operand { ptr: a_op.ptr, rs: a.cs, cs: a.rs }, Operand { ptr: b_op.ptr, rs: b.cs, cs: b.rs });
                gemm(n, m, k, bt, at, Output { ptr: c.data.as_mut_ptr(), rs: c.cs }, None, accumulate, threads, bf16_products());
            }
        }
        return;
    }
    let _library = LibraryCall::enter(matches!(par, Parallelism::Rayon(_)));
    // SAFETY: the three views were bound-checked at construction against their slices, the
    // output is borrowed mutably (so it cannot alias the inputs), and dimensions agree.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.data.as_mut_ptr(),
            c.cs as isize,
            c.rs as isize,
            accumulate,
            a.data.as_ptr(),
            a.cs as isize,
            a.rs as isize,
            b.data.as_ptr(),
            b.cs as isize,
            b.rs as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            par,
        );
    }
}

pub use super::simd::{axpy, dot};

/// `y = x · wᵀ` (`x`: `rows × d`, `w`: `n × d`, `y`: `rows × n`, overwritten): a GEMM, or
/// plain dot products for up to four rows (a router or a query at batch 1 is a handful of dot
/// products, cheaper than a GEMM call and allocation-free).
pub fn matmul_bt(y: &mut [f32], x: &[f32], rows: usize, d: usize, w: &[f32], n: usize) {
    if rows <= 4 {
        for (xr, yr) in x.chunks_exact(d).zip(y.chunks_exact_mut(n)).take(rows) {
            for (v, wr) in yr.iter_mut().zip(w.chunks_exact(d)) {
                *v = dot(xr, wr);
            }
        }
    } else {
        matmul(MatMut::new(y, rows, n), MatRef::new(x, rows, d), MatRef::new(w, n, d).t(), false);
    }
}

/// Adds `bias` (length `cols`) to every row of the `rows × cols` matrix `y`.
pub fn add_row_bias(y: &mut [f32], bias: &[f32]) {
    if bias.is_empty() {
        return;
    }
    for row in y.chunks_exact_mut(bias.len()) {
        for (v, b) in row.iter_mut().zip(bias) {
            *v += b;
        }
    }
}

/// `out[j] = Σ_i x[i, j]` over the rows of a `rows × cols` matrix.
pub fn sum_rows(x: &[f32], cols: usize, out: &mut [f32]) {
    out.fill(0.0);
    add_sum_rows(x, cols, out);
}

/// `out[j] += Σ_i x[i, j]` over the rows of a `rows × cols` matrix (a bias gradient,
/// accumulated).
pub fn add_sum_rows(x: &[f32], cols: usize, out: &mut [f32]) {
    if cols == 0 {
        return;
    }
    for row in x.chunks_exact(cols) {
        for (o, v) in out.iter_mut().zip(row) {
            *o += v;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::Rng;

    fn naive(a: &[f32], b: &[f32], m: usize, k: usize, n: usize) -> Vec<f32> {
        let mut c = vec![0.0; m * n];
        for i in 0..m {
            for j in 0..n {
                c[i * n + j] = (0..k).map(|p| a[i * k + p] as f64 * b[p * n + j] as f64).sum::<f64>() as f32;
            }
        }
        c
    }

    /// `v` rounded to bf16 and widened back.
    fn bf16_rounded(v: &[f32]) -> Vec<f32> {
        v.iter().map(|&x| crate::core::bf16::Bf16::from_f32(x).to_f32()).collect()
    }

    /// Asserts that `got` (`m × n`) is a bf16 product: equal to `want` (the exact product of
    /// the rounded operands) plus `extra(i, j)` within f32 accumulation error, and further from
    /// `exact` (the f32 product) plus `extra` than f32 rounding could explain.
    fn assert_bf16_product(got: &[f32], want: &[f32], exact: &[f32], extra: &dyn Fn(usize, usize) -> f32, (m, k, n): (usize, usize, usize), what: &str) {
        let mut far = 0.0f32;
        for i in 0..m {
            for j in 0..n {
                let (g, w) = (got[i * n + j], want[i * n + j] + extra(i, j));
                assert!((g - w).abs() <= 1e-5 * (k as f32).sqrt() * (1.0 + w.abs()), "{what} {m}x{k}x{n} [{i},{j}]: {g} vs {w}");
                far = far.max((g - exact[i * n + j] - extra(i, j)).abs());
            }
        }
        assert!(far > 1e-3, "{what} {m}x{k}x{n}: within {far} of the f32 product, so not rounded to bf16");
    }

    #[test]
    fn literal_2x3_times_3x2() {
        let a = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0];
        let b = [7.0, 8.0, 9.0, 10.0, 11.0, 12.0];
        let mut c = [0.0; 4];
        matmul(MatMut::new(&mut c, 2, 2), MatRef::new(&a, 2, 3), MatRef::new(&b, 3, 2), false);
        assert_eq!(c, [58.0, 64.0, 139.0, 154.0]);
        // accumulate adds on top
        matmul(MatMut::new(&mut c, 2, 2), MatRef::new(&a, 2, 3), MatRef::new(&b, 3, 2), true);
        assert_eq!(c, [116.0, 128.0, 278.0, 308.0]);
    }

    #[test]
    fn transposed_and_strided_views_match_naive() {
        let mut rng = Rng::new(3);
        for &(m, k, n) in &[(1, 1, 1), (7, 13, 5), (64, 300, 33), (130, 70, 257)] {
            let a: Vec<f32> = (0..m * k).map(|_| rng.normal()).collect();
            let b: Vec<f32> = (0..k * n).map(|_| rng.normal()).collect();
            let want = naive(&a, &b, m, k, n);
            // a stored transposed (k × m), b stored transposed (n × k)
            let mut at = vec![0.0; m * k];
            for i in 0..m {
                for p in 0..k {
                    at[p * m + i] = a[i * k + p];
                }
            }
            let mut bt = vec![0.0; k * n];
            for p in 0..k {
                for j in 0..n {
                    bt[j * k + p] = b[p * n + j];
                }
            }
            let mut c = vec![0.0; m * n];
            matmul(MatMut::new(&mut c, m, n), MatRef::new(&at, k, m).t(), MatRef::new(&bt, n, k).t(), false);
            for (x, y) in c.iter().zip(&want) {
                assert!((x - y).abs() <= 1e-4 * (1.0 + y.abs()), "{m}x{k}x{n}: {x} vs {y}");
            }
            // write into the right half of a wider buffer (row stride 2n)
            let mut wide = vec![0.0; m * 2 * n];
            matmul(MatMut::strided(&mut wide[n..], m, n, 2 * n, 1), MatRef::new(&a, m, k), MatRef::new(&b, k, n), false);
            for i in 0..m {
                for j in 0..n {
                    assert_eq!(wide[i * 2 * n + j], 0.0);
                    let y = want[i * n + j];
                    assert!((wide[i * 2 * n + n + j] - y).abs() <= 1e-4 * (1.0 + y.abs()));
                }
            }
        }
    }

    /// ffwd's kernels against a naive product across block edges: m past several row blocks
    /// and not a multiple of the tile, k past a packed slice, n not a multiple of the panel;
    /// bias epilogue, accumulation, transposed operands, a column-major output; serial and
    /// threaded. (CI runs it once per SIMD path.)
    /// The products both kernel tests check, each handed to `check(result, expected extra,
    /// name)` against the test's `want` (= a·b): with a bias, accumulated onto that, and from
    /// transposed operands into a column-major C.
    #[allow(clippy::type_complexity)]
    fn three_products(
        a: &[f32],
        b: &[f32],
        bias: &[f32],
        want: &[f32],
        (m, k, n): (usize, usize, usize),
        check: &dyn Fn(&[f32], &dyn Fn(usize, usize) -> f32, &str),
    ) {
        let mut c = vec![0.0; m * n];
        matmul_bias(MatMut::new(&mut c, m, n), MatRef::new(a, m, k), MatRef::new(b, k, n), bias);
        check(&c, &|_, j| bias[j], "bias");
        matmul(MatMut::new(&mut c, m, n), MatRef::new(a, m, k), MatRef::new(b, k, n), true);
        check(&c, &|i, j| bias[j] + want[i * n + j], "accumulate");
        // a stored transposed (k × m), b stored transposed (n × k), C column-major
        let at: Vec<f32> = (0..k * m).map(|x| a[(x % m) * k + x / m]).collect();
        let bt: Vec<f32> = (0..n * k).map(|x| b[(x % k) * n + x / k]).collect();
        let mut ct = vec![0.0; m * n];
        matmul(MatMut::strided(&mut ct, m, n, 1, m), MatRef::new(&at, k, m).t(), MatRef::new(&bt, n, k).t(), false);
        let c2: Vec<f32> = (0..m * n).map(|x| ct[(x % n) * m + x / n]).collect();
        check(&c2, &|_, _| 0.0, "transposed");
    }

    /// bf16 products: equal to the exact product of the bf16-rounded operands up to f32
    /// accumulation error (bf16 × bf16 products are exact in f32), further from the f32
    /// product than f32 rounding could explain (the rounding really happened), across odd
    /// inner sizes (a half pair), more than one KC slice, edge tiles, transposed views, bias,
    /// accumulation and threads; the setting is scoped to the closure and the thread. (Every
    /// side above 48: products of fewer rows stay f32.)
    #[test]
    fn bf16_products_equal_the_product_of_rounded_operands() {
        if !crate::core::sgemm::bf16_supported() {
            // without AVX512_BF16 the setting changes nothing: products stay exact f32
            let (a, b) = (vec![1.0f32 + 1.0 / 512.0; 64 * 64], vec![1.0f32; 64 * 64]);
            let mut c = vec![0.0; 64 * 64];
            with_bf16_products(true, || matmul(MatMut::new(&mut c, 64, 64), MatRef::new(&a, 64, 64), MatRef::new(&b, 64, 64), false));
            assert!(c.iter().all(|&v| (v - 64.0 * (1.0 + 1.0 / 512.0)).abs() < 1e-4));
            return;
        }
        let mut rng = Rng::new(12);
        for &(m, k, n) in &[(61, 51, 70), (401, 1500, 50), (130, 1025, 49), (50, 768, 64), (2048, 192, 96)] {
            let a: Vec<f32> = (0..m * k).map(|_| rng.normal()).collect();
            let b: Vec<f32> = (0..k * n).map(|_| rng.normal()).collect();
            let bias: Vec<f32> = (0..n).map(|_| rng.normal()).collect();
            let (want, exact) = (naive(&bf16_rounded(&a), &bf16_rounded(&b), m, k, n), naive(&a, &b, m, k, n));
            let check = |got: &[f32], extra: &dyn Fn(usize, usize) -> f32, what: &str| assert_bf16_product(got, &want, &exact, extra, (m, k, n), what);
            let pool = |t: usize| rayon::ThreadPoolBuilder::new().num_threads(t).build().unwrap();
            for threads in [1, 2] {
                pool(threads).install(|| {
                    with_bf16_products(true, || {
                        assert!(bf16_products());
                        three_products(&a, &b, &bias, &want, (m, k, n), &check);
                    });
                    assert!(!bf16_products(), "the setting ends with the closure");
                });
            }
        }
    }

    /// Products against a pre-packed bf16 B (inference weights): as the bf16 products above at
    /// any number of rows (1 and 2 too), B given plainly or as a transposed view, several
    /// column blocks and KC slices, 1 and 2 threads; `None` without AVX512_BF16.
    #[test]
    fn packed_bf16_products_equal_the_product_of_rounded_operands() {
        let mut rng = Rng::new(13);
        let b0: Vec<f32> = (0..4 * 4).map(|_| rng.normal()).collect();
        if !crate::core::sgemm::bf16_supported() {
            assert!(pack_bf16(MatRef::new(&b0, 4, 4)).is_none());
            return;
        }
        for &(m, k, n) in &[(1, 40, 45), (2, 33, 70), (3, 1100, 600), (61, 51, 70), (130, 2100, 49), (300, 768, 1100)] {
            let a: Vec<f32> = (0..m * k).map(|_| rng.normal()).collect();
            let b: Vec<f32> = (0..k * n).map(|_| rng.normal()).collect();
            let bias: Vec<f32> = (0..n).map(|_| rng.normal()).collect();
            let (want, exact) = (naive(&bf16_rounded(&a), &bf16_rounded(&b), m, k, n), naive(&a, &b, m, k, n));
            let bt: Vec<f32> = (0..n * k).map(|x| b[(x % k) * n + x / k]).collect();
            for (packed, how) in [(pack_bf16(MatRef::new(&b, k, n)).unwrap(), "plain"), (pack_bf16(MatRef::new(&bt, n, k).t()).unwrap(), "transposed")] {
                for threads in [1, 2] {
                    let mut c = vec![f32::NAN; m * n];
                    let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
                    pool.install(|| matmul_packed(MatMut::new(&mut c, m, n), MatRef::new(&a, m, k), &packed, Some(&bias)));
                    assert_bf16_product(&c, &want, &exact, &|_, j| bias[j], (m, k, n), &format!("packed {how}"));
                }
            }
        }
    }

    #[test]
    fn own_kernels_match_naive_across_block_edges() {
        let mut rng = Rng::new(11);
        for &(m, k, n) in &[(401, 1500, 50), (7, 3, 33), (130, 1025, 17), (64, 2048, 96), (40, 1500, 50), (16, 768, 64)] {
            let a: Vec<f32> = (0..m * k).map(|_| rng.normal()).collect();
            let b: Vec<f32> = (0..k * n).map(|_| rng.normal()).collect();
            let bias: Vec<f32> = (0..n).map(|_| rng.normal()).collect();
            let want = naive(&a, &b, m, k, n);
            let close = |got: &[f32], extra: &dyn Fn(usize, usize) -> f32, what: &str| {
                for i in 0..m {
                    for j in 0..n {
                        let w = want[i * n + j] + extra(i, j);
                        let g = got[i * n + j];
                        assert!((g - w).abs() <= 1e-3 * (1.0 + w.abs()) * (k as f32).sqrt() / 8.0, "{what} {m}x{k}x{n} [{i},{j}]: {g} vs {w}");
                    }
                }
            };
            let pool = |t: usize| rayon::ThreadPoolBuilder::new().num_threads(t).build().unwrap();
            for threads in [1, 2] {
                pool(threads).install(|| {
                    three_products(&a, &b, &bias, &want, (m, k, n), &close);
                });
            }
        }
    }
}
