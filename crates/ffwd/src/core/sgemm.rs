//! ffwd's own f32 matrix product: packed, cache-blocked, register-blocked micro-kernels with
//! runtime dispatch (AVX-512F: 12 × 32 tiles in 24 zmm accumulators; AVX2 + FMA: 6 × 16 tiles
//! in 12 ymm accumulators, 77–97 GFLOP/s on one core on packed data as the clock moves,
//! `cargo bench --bench gemm -- --kernel`; portable: 4 × 16), an optional bias
//! epilogue (the tile starts from
//! the bias row, so a linear layer writes its output once), threads over row blocks, and
//! packing buffers that live in thread-local storage and only grow: after the first call at a
//! shape, a product allocates nothing.
//!
//! Blocking (BLIS order): for every `KC` slice of the inner dimension, `B` is packed into
//! `NR`-wide column panels once and shared by the threads; each thread packs an `MC × KC`
//! block of `A` into `MR`-tall row panels, and the micro-kernel runs every (A panel, B panel)
//! pair, B panel outer so that it stays in L1 while the A block streams from L2.
//!
//! Views are strided (`core::gemm::MatRef`), so transposed operands cost nothing beyond the
//! packing they need anyway.

use std::cell::RefCell;

use rayon::prelude::*;

use super::bf16::round_bits;
use super::cpu::{self, SimdLevel};
use super::scratch::with_buffer;

/// Most rows of `A` in one packed block (fewer when that leaves threads idle).
const MC_MAX: usize = 384;
/// Most values of a packed `A` block (384 KiB: half of a core's L2, the B panels' stream
/// takes the rest).
const A_BLOCK: usize = 96 * 1024;
/// `KC` of the portable kernel.
const KC_PORTABLE: usize = 256;

/// One ISA's tile shape and micro-kernel.
#[derive(Clone, Copy)]
struct Isa {
    mr: usize,
    nr: usize,
    /// Slice of the inner dimension per packed block (measured: the AVX2 kernel is 20–40 %
    /// faster at 1024 than at 256 on the LM's shapes, the B panel streaming from L2).
    kc: usize,
    /// `kernel(kc, a_panel, b_panel, b_ks, c, rs_c, init)`: `c[i·rs_c + j] (=|+=) Σ_p a[p·mr + i]·
    /// b[p·b_ks + j]` over a full `mr × nr` tile (`b_ks` is `nr` for a packed panel, B's row
    /// stride when the kernel reads B in place); `init` says how the tile starts.
    kernel: unsafe fn(usize, *const f32, *const f32, usize, *mut f32, usize, Init),
    /// Operands packed as bf16 pairs (two consecutive `k` values in one 32-bit slot), so a
    /// packed panel holds `⌈kc / 2⌉` slots per row or column.
    bf16: bool,
}

impl Isa {
    /// Columns per column block of a product with inner dimension `k` (BLIS's NC loop): a
    /// packed KC slice of B holds at most B_SLICE values, so that it stays in cache while the
    /// row blocks pass it (a 4095-wide layer would otherwise pack 16 MB per slice, written to
    /// memory and read back).
    fn column_block(&self, k: usize) -> usize {
        (B_SLICE / k.clamp(1, self.kc)).max(self.nr).next_multiple_of(self.nr)
    }

    /// Packed slots per row (A) or column (B) of a `kc`-deep block.
    fn depth(&self, kc: usize) -> usize {
        if self.bf16 {
            kc.div_ceil(2)
        } else {
            kc
        }
    }
}

/// How a tile's accumulators start.
#[derive(Clone, Copy)]
enum Init {
    /// From zero (the tile's first `KC` slice, no bias).
    Zero,
    /// From the current `C` (later slices, or accumulation into `C`).
    Load,
    /// From the bias row (`nr` values at the pointer) broadcast down the tile.
    Bias(*const f32),
}

/// Which x86 micro-kernel runs on AVX-512 CPUs: 0 not chosen yet, 1 by shape (the AVX-512
/// 12 × 32 kernel from [`AVX512_MIN_ROWS`] rows, the AVX2 6 × 16 one below), 2 always AVX2
/// (`FFWD_SGEMM_KERNEL=avx2`), 3 always AVX-512 (`FFWD_SGEMM_KERNEL=avx512`); see also
/// [`set_avx512_kernel`].
/// On the Zen 4 machines this was measured on (512-bit FMAs issued as two 256-bit halves, so
/// the same peak), the larger tile's gain comes from loading half as much per multiply-add:
/// 1024³ +7–9 %, the LM's 2048-row shapes ±10 % each, LM training +3–6 % tokens/s
/// (`cargo bench --bench gemm -- --kernels`; `FFWD_SGEMM_KERNEL=avx2 ffwd lm train` alternated
/// with the default).
static AVX512_KERNEL: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Forces the AVX-512 micro-kernel (`Some(true)`) or the AVX2 one (`Some(false)`) on AVX-512
/// CPUs at every shape, or restores the choice by shape (`None`): for benchmarks that compare
/// the two in one process.
#[doc(hidden)]
pub fn set_avx512_kernel(force: Option<bool>) {
    AVX512_KERNEL.store(
        match force {
            None => 1,
            Some(false) => 2,
            Some(true) => 3,
        },
        std::sync::atomic::Ordering::Relaxed,
    );
}

/// Whether a product of `m` rows runs the AVX-512 kernel (on an AVX-512 CPU).
#[cfg(target_arch = "x86_64")]
fn avx512_kernel(m: usize) -> bool {
    use std::sync::atomic::Ordering;
    let mode = match AVX512_KERNEL.load(Ordering::Relaxed) {
        0 => {
            let mode = match std::env::var("FFWD_SGEMM_KERNEL").as_deref() {
                Ok("avx2") => 2,
                Ok("avx512") => 3,
                _ => 1,
            };
            AVX512_KERNEL.store(mode, Ordering::Relaxed);
            mode
        }
        k => k,
    };
    mode == 3 || (mode == 1 && m >= AVX512_MIN_ROWS)
}

/// Products with fewer rows run the 6 × 16 kernel on AVX-512 CPUs too: the 128-row MLP step
/// ran 10 % faster on it (`cargo bench --bench mlp_step`, kernels alternated three times), where
/// a 12-row panel leaves more of its tile empty and each panel of B serves fewer rows; at 256
/// rows (the dense 768-4095-768 layer at batch 256) the two kernels were level or the 12 × 32
/// one ahead (1.00x and 1.11x, `cargo bench --bench gemm -- --kernels`).
const AVX512_MIN_ROWS: usize = 256;

/// The kernel for a product of `m` rows (`bf16`: bf16 operand pairs, when the CPU has them).
fn isa(bf16: bool, m: usize) -> Isa {
    #[cfg(target_arch = "x86_64")]
    if bf16 && bf16_supported() {
        return Isa { mr: 12, nr: 32, kc: 1024, kernel: x86_bf16::kernel_bf16, bf16: true };
    }
    match cpu::level() {
        #[cfg(target_arch = "x86_64")]
        SimdLevel::Avx512 if avx512_kernel(m) => Isa { mr: 12, nr: 32, kc: KC_AVX512, kernel: x86_512::kernel_avx512, bf16: false },
        #[cfg(target_arch = "x86_64")]
        SimdLevel::Avx512 | SimdLevel::Avx2 => Isa { mr: 6, nr: 16, kc: 1024, kernel: x86::kernel_avx2, bf16: false },
        _ => Isa { mr: 4, nr: 16, kc: KC_PORTABLE, kernel: kernel_portable, bf16: false },
    }
}

/// Whether bf16 products can run here: the CPU has AVX512_BF16 (`vdpbf16ps`) and the AVX-512
/// path is not switched off with `FFWD_SIMD`.
pub fn bf16_supported() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        use std::sync::OnceLock;
        static HAS: OnceLock<bool> = OnceLock::new();
        cpu::avx512() && *HAS.get_or_init(|| std::arch::is_x86_feature_detected!("avx512bf16"))
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// `KC` of the AVX-512 kernel.
const KC_AVX512: usize = 1024;

/// Largest tile of any kernel (`mr · nr`).
const MAX_TILE: usize = 12 * 32;

thread_local! {
    /// Packed `A` block of this thread (only grows).
    static PACK_A: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
    /// Packed `B` slices of the calling thread (only grows).
    static PACK_B: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
    /// Partial products of a split-k product (only grows).
    static PARTIAL: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// A strided read-only operand: element `(i, j)` at `ptr + i·rs + j·cs`.
#[derive(Clone, Copy)]
pub(crate) struct Operand {
    pub ptr: *const f32,
    pub rs: usize,
    pub cs: usize,
}

/// A strided output: row `i` starts at `ptr + i·rs`, columns are contiguous.
#[derive(Clone, Copy)]
pub(crate) struct Output {
    pub ptr: *mut f32,
    pub rs: usize,
}

impl Operand {
    /// The operand from column `j` on.
    fn offset_cols(self, j: usize) -> Self {
        Operand { ptr: self.ptr.wrapping_add(j * self.cs), ..self }
    }

    /// The operand from row `i` on.
    fn offset_rows(self, i: usize) -> Self {
        Operand { ptr: self.ptr.wrapping_add(i * self.rs), ..self }
    }
}

impl Output {
    /// Row `i`, `n` values.
    ///
    /// # Safety
    /// The row is valid for writes and nothing else touches it meanwhile.
    #[allow(clippy::mut_from_ref)]
    unsafe fn row(&self, i: usize, n: usize) -> &mut [f32] {
        unsafe { std::slice::from_raw_parts_mut(self.ptr.add(i * self.rs), n) }
    }
}

// SAFETY: the pointers are only dereferenced inside `gemm`, whose caller guarantees validity
// for the whole call; threads write disjoint row blocks of the output.
unsafe impl Send for Operand {}
unsafe impl Sync for Operand {}
unsafe impl Send for Output {}
unsafe impl Sync for Output {}

/// `C = A·B (+ bias row) (+ C if accumulate)`, `A`: `m × k`, `B`: `k × n`, `C`: `m × n` with
/// unit column stride.
///
/// # Safety
/// `a`, `b` valid for reads of every element of their `m × k` / `k × n` extents, `c` valid for
/// writes of `m` rows of `n` values at stride `c.rs`, not overlapping `a` or `b`; `bias`, when
/// given, has `n` values.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn gemm(m: usize, n: usize, k: usize, a: Operand, b: Operand, c: Output, bias: Option<&[f32]>, accumulate: bool, threads: bool, bf16: bool) {
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        for i in 0..m {
            // SAFETY: row i of C is valid for n writes.
            let row = unsafe { std::slice::from_raw_parts_mut(c.ptr.add(i * c.rs), n) };
            match (bias, accumulate) {
                (Some(bv), true) => row.iter_mut().zip(bv).for_each(|(v, b)| *v += b),
                (Some(bv), false) => row.copy_from_slice(&bv[..n]),
                (None, true) => {}
                (None, false) => row.fill(0.0),
            }
        }
        return;
    }
    // a few rows use each element of B only that many times: converting B to bf16 pairs would
    // cost more than the faster products save (f32 reads B in place there)
    let isa = isa(bf16 && m > DIRECT_B_MAX_ROWS, m);
    let (nr, kc_max) = (isa.nr, isa.kc);
    let nc = isa.column_block(k);
    if n > nc {
        let mut j0 = 0;
        while j0 < n {
            let w = (n - j0).min(nc);
            let bj = Operand { ptr: b.ptr.wrapping_add(j0 * b.cs), ..b };
            let cj = Output { ptr: c.ptr.wrapping_add(j0), ..c };
            // SAFETY: columns j0..j0+w of B and C, inside their extents.
            unsafe { gemm(m, w, k, a, bj, cj, bias.map(|bv| &bv[j0..j0 + w]), accumulate, threads, bf16) };
            j0 += w;
        }
        return;
    }
    let n_panels = n.div_ceil(nr);
    let nt = rayon::current_num_threads();
    let parallel = threads && nt > 1 && m * n * k >= super::gemm::PARALLEL_MIN_WORK;
    // a long inner dimension with a small output (a weight gradient over a whole batch): split
    // k over the threads, each into its own partial C, then add them up (measured 1.2–1.4x
    // on the LM's weight gradients against splitting rows and columns)
    if parallel && k >= 2 * SPLIT_K_MIN && m * n <= SPLIT_K_MAX_OUTPUT {
        let parts = nt.min(k / SPLIT_K_MIN);
        let per = k.div_ceil(parts);
        // SAFETY: as this function's contract; part 0 writes C, the others their own buffers.
        unsafe { split_k(m, n, k, a, b, c, bias, accumulate, parts, per, bf16) };
        return;
    }
    let plan = Plan::new(&isa, m, n, k, parallel);
    // few rows: every element of B is used only m times, so packing B would cost more than it
    // saves; the kernel reads B's full panels in place (only a partial last panel is packed)
    let direct = b.cs == 1 && m <= DIRECT_B_MAX_ROWS && !isa.bf16;
    let full = n / nr;
    let ks_max = isa.depth(k.min(kc_max));
    let b_buffer = if direct { (n_panels - full) * nr * ks_max } else { n_panels * nr * ks_max };
    with_buffer(&PACK_B, b_buffer, |pb| {
        let mut p0 = 0;
        while p0 < k {
            let kc = (k - p0).min(kc_max);
            let ks = isa.depth(kc);
            let panels = if direct {
                let tail = &mut pb[..(n_panels - full) * nr * kc];
                if !tail.is_empty() {
                    // SAFETY: reads inside B's extent.
                    unsafe { pack_b(tail, b, p0, kc, n, nr, full) };
                }
                BPanels::Direct { start: b.ptr.wrapping_add(p0 * b.rs), rs: b.rs, full, tail }
            } else {
                let packed_b = &mut pb[..n_panels * nr * ks];
                let pack = |s: usize, panel: &mut [f32]| {
                    // SAFETY: reads inside B's extent (rows p0..p0+kc, columns 0..n).
                    unsafe {
                        if isa.bf16 {
                            pack_b_bf16(panel, b, p0, kc, n, nr, s)
                        } else {
                            pack_b(panel, b, p0, kc, n, nr, s)
                        }
                    }
                };
                if parallel && n_panels > 1 {
                    packed_b.par_chunks_mut(nr * ks).enumerate().for_each(|(s, panel)| pack(s, panel));
                } else {
                    for (s, panel) in packed_b.chunks_mut(nr * ks).enumerate() {
                        pack(s, panel);
                    }
                }
                BPanels::Packed(packed_b)
            };
            // SAFETY: as this function's contract.
            unsafe { plan.run(&isa, m, n, a, panels, p0, kc, c, bias, accumulate) };
            p0 += kc;
        }
    });
}

/// How a product's rows and columns are cut into work items: row blocks of `mc` rows (a
/// packed A block of at most A_BLOCK values, which stays in L2 while every B panel passes
/// it; at least two blocks per thread when that still leaves blocks of a few panels), and,
/// when there are too few row blocks to keep every thread busy, column chunks of
/// `panels_per_chunk` panels (each chunk packs its own copy of the A block).
struct Plan {
    mc: usize,
    m_blocks: usize,
    n_chunks: usize,
    panels_per_chunk: usize,
    parallel: bool,
}

impl Plan {
    fn new(isa: &Isa, m: usize, n: usize, k: usize, parallel: bool) -> Self {
        let (mr, nr, nt) = (isa.mr, isa.nr, rayon::current_num_threads());
        let n_panels = n.div_ceil(nr);
        let mc_max = (A_BLOCK / k.min(isa.kc)).max(mr).next_multiple_of(mr).min(MC_MAX);
        let mc = if parallel { m.div_ceil(2 * nt).next_multiple_of(mr).clamp(4 * mr, mc_max.max(4 * mr)) } else { mc_max };
        let m_blocks = m.div_ceil(mc);
        let n_chunks = if parallel && m_blocks < 2 * nt { (2 * nt).div_ceil(m_blocks).min(n_panels) } else { 1 };
        let panels_per_chunk = n_panels.div_ceil(n_chunks);
        Plan { mc, m_blocks, n_chunks: n_panels.div_ceil(panels_per_chunk), panels_per_chunk, parallel }
    }

    /// Runs every work item over the `kc`-deep slice of the inner dimension from `p0`, whose
    /// B panels are `panels`: packs the item's A block, then the micro-kernel over its tiles.
    ///
    /// # Safety
    /// As [`gemm`], for the columns `0..n` of `c` and the panels' slice of B.
    #[allow(clippy::too_many_arguments)]
    unsafe fn run(
        &self,
        isa: &Isa,
        m: usize,
        n: usize,
        a: Operand,
        panels: BPanels<'_>,
        p0: usize,
        kc: usize,
        c: Output,
        bias: Option<&[f32]>,
        accumulate: bool,
    ) {
        let (mr, ks, n_panels) = (isa.mr, isa.depth(kc), n.div_ceil(isa.nr));
        let first = p0 == 0;
        let item = |w: usize| {
            let (ib, jc) = (w / self.n_chunks, w % self.n_chunks);
            let i0 = ib * self.mc;
            let mc = (m - i0).min(self.mc);
            let (s0, s1) = (jc * self.panels_per_chunk, ((jc + 1) * self.panels_per_chunk).min(n_panels));
            let len = mc.div_ceil(mr) * mr * ks;
            with_buffer(&PACK_A, len, |pa| {
                // SAFETY: reads inside A's extent; writes rows i0..i0+mc, columns of panels
                // s0..s1 of C, which no other item touches.
                unsafe {
                    if isa.bf16 {
                        pack_a_bf16(&mut pa[..len], a, i0, mc, p0, kc, mr);
                    } else {
                        pack_a(&mut pa[..len], a, i0, mc, p0, kc, mr);
                    }
                    macro_block(isa, &pa[..len], panels, s0, s1, mc, n, kc, c, i0, bias, first, accumulate);
                }
            });
        };
        if self.parallel {
            (0..self.m_blocks * self.n_chunks).into_par_iter().for_each(item);
        } else {
            (0..self.m_blocks * self.n_chunks).for_each(item);
        }
    }
}

/// A `k × n` right operand packed once into the bf16 pair panels of the AVX512_BF16 kernel,
/// for products that reuse it (the weights of an inference kernel): a product against it
/// ([`crate::core::gemm::matmul_packed`]) packs only its left operand. Column blocks and `KC`
/// slices as [`gemm`] cuts them.
pub struct PackedBf16 {
    data: Vec<f32>,
    k: usize,
    n: usize,
    nc: usize,
}

impl PackedBf16 {
    /// Inner dimension.
    pub fn k(&self) -> usize {
        self.k
    }

    /// Columns.
    pub fn n(&self) -> usize {
        self.n
    }

    /// Packs `b` (`k × n`, element `(p, j)` at `p·rs + j·cs`); `None` without AVX512_BF16.
    ///
    /// # Safety
    /// `b` valid for reads of its `k × n` extent.
    pub(crate) unsafe fn new(b: Operand, k: usize, n: usize) -> Option<Self> {
        if !bf16_supported() {
            return None;
        }
        let isa = isa(true, usize::MAX);
        let nc = isa.column_block(k);
        let mut data = vec![0.0; slices(&isa, k, n, nc).map(|s| s.len).sum()];
        for s in slices(&isa, k, n, nc) {
            let bj = Operand { ptr: b.ptr.wrapping_add(s.j0 * b.cs), ..b };
            data[s.off..s.off + s.len].par_chunks_mut(isa.nr * isa.depth(s.kc)).enumerate().for_each(|(panel_index, panel)| {
                // SAFETY: rows p0..p0+kc, columns j0..j0+w of B (the caller's contract).
                unsafe { pack_b_bf16(panel, bj, s.p0, s.kc, s.w, isa.nr, panel_index) }
            });
        }
        Some(PackedBf16 { data, k, n, nc })
    }
}

/// One packed slice of a [`PackedBf16`]: rows `p0..p0 + kc` of B's columns `j0..j0 + w`, at
/// `data[off..off + len]`.
#[derive(Clone, Copy)]
struct Slice {
    j0: usize,
    w: usize,
    p0: usize,
    kc: usize,
    off: usize,
    len: usize,
}

/// The slices of a packed `k × n` B in storage order: column blocks of `nc`, each cut into the
/// kernel's KC slices (the order [`gemm`] walks them).
fn slices(isa: &Isa, k: usize, n: usize, nc: usize) -> impl Iterator<Item = Slice> + '_ {
    let mut off = 0;
    (0..n).step_by(nc.max(1)).flat_map(move |j0| (0..k).step_by(isa.kc).map(move |p0| (j0, p0))).map(move |(j0, p0)| {
        let (w, kc) = ((n - j0).min(nc), (k - p0).min(isa.kc));
        let len = w.div_ceil(isa.nr) * isa.nr * isa.depth(kc);
        off += len;
        Slice { j0, w, p0, kc, off: off - len, len }
    })
}

/// `C = A·B (+ bias row)` with `B` packed by [`PackedBf16::new`]: [`gemm`] with bf16
/// operands at any number of rows, minus the packing of B.
///
/// # Safety
/// `a` valid for reads of its `m × k` extent, `c` for writes of `m` rows of `n` values at
/// stride `c.rs`, not overlapping `a`; `bias`, when given, has `n` values.
pub(crate) unsafe fn gemm_packed_bf16(m: usize, a: Operand, b: &PackedBf16, c: Output, bias: Option<&[f32]>, threads: bool) {
    let (k, n) = (b.k, b.n);
    if m == 0 || n == 0 || k == 0 {
        // SAFETY: as this function's contract (k = 0: C is the bias or zero).
        return unsafe { gemm(m, n, k, a, Operand { ptr: b.data.as_ptr(), rs: 0, cs: 0 }, c, bias, false, threads, false) };
    }
    let isa = isa(true, usize::MAX);
    let nt = rayon::current_num_threads();
    for s in slices(&isa, k, n, b.nc) {
        let parallel = threads && nt > 1 && m * s.w * k >= super::gemm::PARALLEL_MIN_WORK;
        let plan = Plan::new(&isa, m, s.w, k, parallel);
        let cj = Output { ptr: c.ptr.wrapping_add(s.j0), ..c };
        let bias_j = bias.map(|bv| &bv[s.j0..s.j0 + s.w]);
        // SAFETY: the caller's contract, for columns j0..j0+w.
        unsafe { plan.run(&isa, m, s.w, a, BPanels::Packed(&b.data[s.off..s.off + s.len]), s.p0, s.kc, cj, bias_j, false) };
    }
}

/// Most values of a packed KC slice of B (2 MiB).
const B_SLICE: usize = 512 * 1024;

/// Products with at most this many rows read B in place instead of packing it.
const DIRECT_B_MAX_ROWS: usize = 48;

/// Smallest slice of the inner dimension per thread in a split-k product.
const SPLIT_K_MIN: usize = 512;
/// Largest output (`m·n`) for which a product splits k instead of rows.
const SPLIT_K_MAX_OUTPUT: usize = 1 << 19;

/// `C (=|+=) A·B (+ bias)` with the inner dimension split in `parts` slices of `per`: slice 0
/// goes straight into C, the others into partial products (in a scratch buffer of the calling
/// thread) that are then added.
///
/// # Safety
/// As [`gemm`].
#[allow(clippy::too_many_arguments)]
unsafe fn split_k(
    m: usize,
    n: usize,
    k: usize,
    a: Operand,
    b: Operand,
    c: Output,
    bias: Option<&[f32]>,
    accumulate: bool,
    parts: usize,
    per: usize,
    bf16: bool,
) {
    with_buffer(&PARTIAL, (parts - 1) * m * n, |scratch| {
        let slice = |t: usize| (t * per, ((t + 1) * per).min(k));
        rayon::join(
            || {
                let (k0, k1) = slice(0);
                // SAFETY: columns k0..k1 of A, rows k0..k1 of B; C as the caller's contract.
                unsafe { gemm(m, n, k1 - k0, a.offset_cols(k0), b.offset_rows(k0), c, bias, accumulate, false, bf16) };
            },
            || {
                scratch.par_chunks_mut(m * n).enumerate().for_each(|(t, part)| {
                    let (k0, k1) = slice(t + 1);
                    // SAFETY: as above; the part holds m × n values.
                    unsafe { gemm(m, n, k1 - k0, a.offset_cols(k0), b.offset_rows(k0), Output { ptr: part.as_mut_ptr(), rs: n }, None, false, false, bf16) };
                });
            },
        );
        let scratch: &[f32] = scratch;
        (0..m).into_par_iter().with_min_len(16).for_each(|i| {
            // SAFETY: row i of C; tasks own disjoint rows.
            let row = unsafe { c.row(i, n) };
            for part in scratch.chunks_exact(m * n) {
                row.iter_mut().zip(&part[i * n..(i + 1) * n]).for_each(|(v, x)| *v += x);
            }
        });
    })
}

/// Runs the micro-kernel over one packed `mc × kc` block of A against all of packed B.
///
/// # Safety
/// As [`gemm`], for rows `i0..i0 + mc` of `c`.
#[allow(clippy::too_many_arguments)]
unsafe fn macro_block(
    isa: &Isa,
    pa: &[f32],
    panels: BPanels<'_>,
    s0: usize,
    s1: usize,
    mc: usize,
    n: usize,
    kc: usize,
    c: Output,
    i0: usize,
    bias: Option<&[f32]>,
    first: bool,
    accumulate: bool,
) {
    let (mr, nr) = (isa.mr, isa.nr);
    let ks = isa.depth(kc);
    let mut tile = [0.0f32; MAX_TILE];
    for s in s0..s1 {
        let (bp, b_ks) = panels.panel(s, ks, nr);
        let j0 = s * nr;
        let nw = (n - j0).min(nr);
        for (ip, ap) in pa.chunks_exact(mr * ks).enumerate() {
            let r0 = ip * mr;
            let mw = (mc - r0).min(mr);
            // SAFETY: the tile's rows and columns are inside C (checked widths), or go through
            // the local tile buffer.
            unsafe {
                let cptr = c.ptr.add((i0 + r0) * c.rs + j0);
                let init = match (first, accumulate, bias) {
                    (false, _, _) | (true, true, None) => Init::Load,
                    (true, false, None) => Init::Zero,
                    (true, _, Some(bv)) => Init::Bias(bv.as_ptr().add(j0)),
                };
                if mw == mr && nw == nr && !(first && accumulate && bias.is_some()) {
                    (isa.kernel)(kc, ap.as_ptr(), bp, b_ks, cptr, c.rs, init);
                } else {
                    // edge tile (or accumulate + bias): compute from zero, then combine
                    (isa.kernel)(kc, ap.as_ptr(), bp, b_ks, tile.as_mut_ptr(), nr, Init::Zero);
                    for i in 0..mw {
                        let row = std::slice::from_raw_parts_mut(cptr.add(i * c.rs), nw);
                        let t = &tile[i * nr..i * nr + nw];
                        match init {
                            Init::Zero => row.copy_from_slice(t),
                            Init::Load => row.iter_mut().zip(t).for_each(|(v, x)| *v += x),
                            Init::Bias(bp) => {
                                let bv = std::slice::from_raw_parts(bp, nw);
                                if first && accumulate {
                                    row.iter_mut().zip(t).zip(bv).for_each(|((v, x), b)| *v += x + b);
                                } else {
                                    row.iter_mut().zip(t).zip(bv).for_each(|((v, x), b)| *v = x + b);
                                }
                            }
                        }
                    }
                }
            }
        }
    }
}

/// Where the micro-kernel finds column panel `s` of the current `KC` slice of B.
#[derive(Clone, Copy)]
enum BPanels<'a> {
    /// All panels packed, `nr · kc` values each.
    Packed(&'a [f32]),
    /// Full panels read in place (B has unit column stride): row `p0` of B at `start`, rows
    /// `rs` apart; the partial last panel, if any, packed in `tail`.
    Direct { start: *const f32, rs: usize, full: usize, tail: &'a [f32] },
}

impl BPanels<'_> {
    /// `(pointer to the panel's first row, stride between its rows)`.
    fn panel(&self, s: usize, kc: usize, nr: usize) -> (*const f32, usize) {
        match *self {
            BPanels::Packed(pb) => (pb[s * nr * kc..].as_ptr(), nr),
            BPanels::Direct { start, rs, full, tail } => {
                if s < full {
                    (start.wrapping_add(s * nr), rs)
                } else {
                    (tail.as_ptr(), nr)
                }
            }
        }
    }
}

// SAFETY: the panels are only read, by the threads of one product, while the caller keeps B
// and the packed buffers alive.
unsafe impl Send for BPanels<'_> {}
unsafe impl Sync for BPanels<'_> {}

/// Packs panel `s` of rows `p0..p0+kc` of `B` (`k × n`): `panel[p·nr + j] = B[p0 + p, s·nr + j]`,
/// zero past column `n`.
///
/// # Safety
/// `b` valid for those reads.
unsafe fn pack_b(panel: &mut [f32], b: Operand, p0: usize, kc: usize, n: usize, nr: usize, s: usize) {
    let j0 = s * nr;
    let nw = (n - j0).min(nr);
    for (p, row) in panel[..kc * nr].chunks_exact_mut(nr).enumerate() {
        // SAFETY: (p0 + p, j0 + j) is inside B for j < nw.
        unsafe {
            let src = b.ptr.add((p0 + p) * b.rs + j0 * b.cs);
            if b.cs == 1 {
                if nw == 16 {
                    // a full panel row: a fixed-size copy (no call into memmove)
                    row[..16].copy_from_slice(&*(src as *const [f32; 16]));
                } else if nw == 32 {
                    row[..32].copy_from_slice(&*(src as *const [f32; 32]));
                } else {
                    std::ptr::copy_nonoverlapping(src, row.as_mut_ptr(), nw);
                }
            } else {
                for (j, v) in row[..nw].iter_mut().enumerate() {
                    *v = *src.add(j * b.cs);
                }
            }
        }
        row[nw..].fill(0.0);
    }
}

/// Packs rows `i0..i0+mc`, columns `p0..p0+kc` of `A` into `mr`-tall panels:
/// `out[(r·kc + p)·mr + i] = A[i0 + r·mr + i, p0 + p]`, zero past row `mc`.
///
/// # Safety
/// `a` valid for those reads.
unsafe fn pack_a(out: &mut [f32], a: Operand, i0: usize, mc: usize, p0: usize, kc: usize, mr: usize) {
    match mr {
        12 => unsafe { pack_a_n::<12>(out, a, i0, mc, p0, kc) },
        6 => unsafe { pack_a_n::<6>(out, a, i0, mc, p0, kc) },
        4 => unsafe { pack_a_n::<4>(out, a, i0, mc, p0, kc) },
        _ => unreachable!("no kernel has {mr} rows"),
    }
}

/// [`pack_a`] for panels of `MR` rows (fixed-size copies the compiler unrolls).
///
/// # Safety
/// As [`pack_a`].
unsafe fn pack_a_n<const MR: usize>(out: &mut [f32], a: Operand, i0: usize, mc: usize, p0: usize, kc: usize) {
    let m_panels = mc.div_ceil(MR);
    for (r, panel) in out[..m_panels * MR * kc].chunks_exact_mut(MR * kc).enumerate() {
        let mw = (mc - r * MR).min(MR);
        let base = i0 + r * MR;
        if a.rs == 1 && mw == MR {
            // column-major A (a transposed operand): column p of the panel is MR contiguous values
            for (p, dst) in panel.chunks_exact_mut(MR).enumerate() {
                // SAFETY: rows base..base+MR of column p0 + p are inside A.
                dst.copy_from_slice(unsafe { &*(a.ptr.add(base + (p0 + p) * a.cs) as *const [f32; MR]) });
            }
        } else if a.cs == 1 && mw == MR {
            // row-major A: MR row streams interleaved into the panel
            // SAFETY: rows base..base+MR, columns p0..p0+kc are inside A.
            let rows: [&[f32]; MR] = std::array::from_fn(|i| unsafe { std::slice::from_raw_parts(a.ptr.add((base + i) * a.rs + p0), kc) });
            for (p, dst) in panel.chunks_exact_mut(MR).enumerate() {
                for (d, row) in dst.iter_mut().zip(&rows) {
                    *d = row[p];
                }
            }
        } else {
            for (p, dst) in panel.chunks_exact_mut(MR).enumerate() {
                for (i, d) in dst.iter_mut().enumerate() {
                    // SAFETY: (base + i, p0 + p) is inside A for i < mw.
                    *d = if i < mw { unsafe { *a.ptr.add((base + i) * a.rs + (p0 + p) * a.cs) } } else { 0.0 };
                }
            }
        }
    }
}

/// Two k-consecutive values as one packed bf16 pair slot (`lo` in the low half).
#[inline(always)]
fn pair(lo: f32, hi: f32) -> f32 {
    f32::from_bits(round_bits(lo) as u32 | ((round_bits(hi) as u32) << 16))
}

/// [`pack_b`] for the bf16 kernel: `panel[q·nr + j]` = the pair (B[p0 + 2q, j0 + j],
/// B[p0 + 2q + 1, j0 + j]) as bf16, zero past column `n` and past row `p0 + kc`.
///
/// # Safety
/// `b` valid for those reads.
unsafe fn pack_b_bf16(panel: &mut [f32], b: Operand, p0: usize, kc: usize, n: usize, nr: usize, s: usize) {
    let j0 = s * nr;
    let nw = (n - j0).min(nr);
    for (q, row) in panel[..kc.div_ceil(2) * nr].chunks_exact_mut(nr).enumerate() {
        let (p, two) = (p0 + 2 * q, 2 * q + 1 < kc);
        // SAFETY: rows p (and p + 1 when `two`), columns j0..j0+nw are inside B.
        unsafe {
            let lo = b.ptr.add(p * b.rs + j0 * b.cs);
            let hi = b.ptr.add((p + usize::from(two)) * b.rs + j0 * b.cs);
            if b.cs == 1 {
                let (lo, hi) = (std::slice::from_raw_parts(lo, nw), std::slice::from_raw_parts(hi, nw));
                let scale = if two { 1.0 } else { 0.0 };
                for ((v, &l), &h) in row[..nw].iter_mut().zip(lo).zip(hi) {
                    *v = pair(l, h * scale);
                }
            } else {
                for (j, v) in row[..nw].iter_mut().enumerate() {
                    let h = if two { *hi.add(j * b.cs) } else { 0.0 };
                    *v = pair(*lo.add(j * b.cs), h);
                }
            }
        }
        row[nw..].fill(0.0);
    }
}

/// [`pack_a`] for the bf16 kernel: `out[(r·⌈kc/2⌉ + q)·mr + i]` = the pair (A[i0 + r·mr + i,
/// p0 + 2q], A[…, p0 + 2q + 1]) as bf16, zero past row `mc` and past column `p0 + kc`.
///
/// # Safety
/// `a` valid for those reads.
unsafe fn pack_a_bf16(out: &mut [f32], a: Operand, i0: usize, mc: usize, p0: usize, kc: usize, mr: usize) {
    let (m_panels, kq) = (mc.div_ceil(mr), kc.div_ceil(2));
    for (r, panel) in out[..m_panels * mr * kq].chunks_exact_mut(mr * kq).enumerate() {
        let mw = (mc - r * mr).min(mr);
        let base = i0 + r * mr;
        if a.rs == 1 {
            // column-major A (a transposed operand): two contiguous columns per pair
            for (q, dst) in panel.chunks_exact_mut(mr).enumerate() {
                let (p, two) = (p0 + 2 * q, 2 * q + 1 < kc);
                // SAFETY: rows base..base+mw of columns p (and p + 1 when `two`) are inside A.
                let lo = unsafe { std::slice::from_raw_parts(a.ptr.add(base + p * a.cs), mw) };
                let hi = unsafe { std::slice::from_raw_parts(a.ptr.add(base + (p + usize::from(two)) * a.cs), mw) };
                let scale = if two { 1.0 } else { 0.0 };
                for ((d, &l), &h) in dst.iter_mut().zip(lo).zip(hi) {
                    *d = pair(l, h * scale);
                }
                dst[mw..].fill(0.0);
            }
            continue;
        }
        for i in 0..mr {
            if i >= mw {
                for q in 0..kq {
                    panel[q * mr + i] = 0.0;
                }
                continue;
            }
            // SAFETY: row base + i, columns p0..p0+kc are inside A.
            let row = unsafe { a.ptr.add((base + i) * a.rs + p0 * a.cs) };
            if a.cs == 1 {
                // SAFETY: as above.
                let row = unsafe { std::slice::from_raw_parts(row, kc) };
                for (q, two) in row.chunks(2).enumerate() {
                    panel[q * mr + i] = pair(two[0], two.get(1).copied().unwrap_or(0.0));
                }
            } else {
                for q in 0..kq {
                    let at = |p: usize| if p < kc { unsafe { *row.add(p * a.cs) } } else { 0.0 };
                    panel[q * mr + i] = pair(at(2 * q), at(2 * q + 1));
                }
            }
        }
    }
}

/// Portable 4 × 16 micro-kernel.
///
/// # Safety
/// `a`: `kc·4` values, `b`: `kc` rows of 16 at stride `b_ks`, `c`: 4 rows of 16 at stride `rs`.
unsafe fn kernel_portable(kc: usize, a: *const f32, b: *const f32, b_ks: usize, c: *mut f32, rs: usize, init: Init) {
    const MR: usize = 4;
    const NR: usize = 16;
    let mut acc = [[0.0f32; NR]; MR];
    // SAFETY: per the contract.
    unsafe {
        match init {
            Init::Zero => {}
            Init::Load => {
                for (i, row) in acc.iter_mut().enumerate() {
                    row.copy_from_slice(std::slice::from_raw_parts(c.add(i * rs), NR));
                }
            }
            Init::Bias(bp) => {
                for row in acc.iter_mut() {
                    row.copy_from_slice(std::slice::from_raw_parts(bp, NR));
                }
            }
        }
        let a = std::slice::from_raw_parts(a, kc * MR);
        for p in 0..kc {
            let br = std::slice::from_raw_parts(b.add(p * b_ks), NR);
            for i in 0..MR {
                let av = a[p * MR + i];
                for j in 0..NR {
                    acc[i][j] += av * br[j];
                }
            }
        }
        for (i, row) in acc.iter().enumerate() {
            std::slice::from_raw_parts_mut(c.add(i * rs), NR).copy_from_slice(row);
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::Init;

    /// AVX2 + FMA 6 × 16 micro-kernel: 12 ymm accumulators.
    ///
    /// # Safety
    /// The CPU supports AVX2 and FMA; `a`: `kc·6` values, `b`: `kc` rows of 16 at stride
    /// `b_ks`, `c`: 6 rows of 16 at stride `rs`.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn kernel_avx2(kc: usize, a: *const f32, b: *const f32, b_ks: usize, c: *mut f32, rs: usize, init: Init) {
        unsafe {
            let mut acc = [[_mm256_setzero_ps(); 2]; 6];
            match init {
                Init::Zero => {}
                Init::Load => {
                    for (i, row) in acc.iter_mut().enumerate() {
                        for (j, v) in row.iter_mut().enumerate() {
                            *v = _mm256_loadu_ps(c.add(i * rs + 8 * j));
                        }
                    }
                }
                Init::Bias(bp) => {
                    let bv = [_mm256_loadu_ps(bp), _mm256_loadu_ps(bp.add(8))];
                    for row in acc.iter_mut() {
                        *row = bv;
                    }
                }
            }
            let (mut ap, mut bpp) = (a, b);
            let step = |ap: *const f32, bpp: *const f32, acc: &mut [[__m256; 2]; 6]| {
                let b0 = _mm256_loadu_ps(bpp);
                let b1 = _mm256_loadu_ps(bpp.add(8));
                for (i, row) in acc.iter_mut().enumerate() {
                    let av = _mm256_broadcast_ss(&*ap.add(i));
                    row[0] = _mm256_fmadd_ps(av, b0, row[0]);
                    row[1] = _mm256_fmadd_ps(av, b1, row[1]);
                }
            };
            // four steps per iteration, prefetching the B panel (the part that does not stay
            // in L1 for long inner dimensions) 16 steps ahead
            let mut p = 0;
            let ahead = 16 * b_ks;
            while p + 4 <= kc {
                _mm_prefetch::<_MM_HINT_T0>(bpp.wrapping_add(ahead) as *const i8);
                _mm_prefetch::<_MM_HINT_T0>(bpp.wrapping_add(ahead + b_ks) as *const i8);
                step(ap, bpp, &mut acc);
                step(ap.add(6), bpp.add(b_ks), &mut acc);
                _mm_prefetch::<_MM_HINT_T0>(bpp.wrapping_add(ahead + 2 * b_ks) as *const i8);
                _mm_prefetch::<_MM_HINT_T0>(bpp.wrapping_add(ahead + 3 * b_ks) as *const i8);
                step(ap.add(12), bpp.add(2 * b_ks), &mut acc);
                step(ap.add(18), bpp.add(3 * b_ks), &mut acc);
                ap = ap.add(24);
                bpp = bpp.add(4 * b_ks);
                p += 4;
            }
            while p < kc {
                step(ap, bpp, &mut acc);
                ap = ap.add(6);
                bpp = bpp.add(b_ks);
                p += 1;
            }
            for (i, row) in acc.iter().enumerate() {
                for (j, v) in row.iter().enumerate() {
                    _mm256_storeu_ps(c.add(i * rs + 8 * j), *v);
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86_512 {
    use std::arch::x86_64::*;

    use super::Init;

    /// A 12 × 32 tile of zmm accumulators as `init` says (zero, C at stride `rs`, or the bias
    /// row broadcast down the tile).
    ///
    /// # Safety
    /// Called from AVX-512F code; `c` (for `Load`) and the bias pointer are valid for the tile.
    #[inline(always)]
    pub(super) unsafe fn start(c: *const f32, rs: usize, init: Init) -> [[__m512; 2]; 12] {
        unsafe {
            let mut acc = [[_mm512_setzero_ps(); 2]; 12];
            match init {
                Init::Zero => {}
                Init::Load => {
                    for (i, row) in acc.iter_mut().enumerate() {
                        for (j, v) in row.iter_mut().enumerate() {
                            *v = _mm512_loadu_ps(c.add(i * rs + 16 * j));
                        }
                    }
                }
                Init::Bias(bp) => {
                    let bv = [_mm512_loadu_ps(bp), _mm512_loadu_ps(bp.add(16))];
                    for row in acc.iter_mut() {
                        *row = bv;
                    }
                }
            }
            acc
        }
    }

    /// Stores a 12 × 32 tile to `c` at stride `rs`.
    ///
    /// # Safety
    /// Called from AVX-512F code; `c` valid for the tile's writes.
    #[inline(always)]
    pub(super) unsafe fn finish(acc: &[[__m512; 2]; 12], c: *mut f32, rs: usize) {
        unsafe {
            for (i, row) in acc.iter().enumerate() {
                for (j, v) in row.iter().enumerate() {
                    _mm512_storeu_ps(c.add(i * rs + 16 * j), *v);
                }
            }
        }
    }

    /// AVX-512F 12 × 32 micro-kernel: 24 zmm accumulators, two B vectors and a broadcast per
    /// step (32 registers: (12 + 32) / (12 · 32) = 0.11 values loaded per multiply-add, against
    /// 0.23 for the 6 × 16 AVX2 tile).
    ///
    /// # Safety
    /// The CPU supports AVX-512F; `a`: `kc·12` values, `b`: `kc` rows of 32 at stride `b_ks`,
    /// `c`: 12 rows of 32 at stride `rs`.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn kernel_avx512(kc: usize, a: *const f32, b: *const f32, b_ks: usize, c: *mut f32, rs: usize, init: Init) {
        unsafe {
            let mut acc = start(c, rs, init);
            let step = |ap: *const f32, bpp: *const f32, acc: &mut [[__m512; 2]; 12]| {
                let b0 = _mm512_loadu_ps(bpp);
                let b1 = _mm512_loadu_ps(bpp.add(16));
                for (i, row) in acc.iter_mut().enumerate() {
                    let av = _mm512_set1_ps(*ap.add(i));
                    row[0] = _mm512_fmadd_ps(av, b0, row[0]);
                    row[1] = _mm512_fmadd_ps(av, b1, row[1]);
                }
            };
            let (mut ap, mut bpp) = (a, b);
            let ahead = 8 * b_ks;
            let mut p = 0;
            while p + 2 <= kc {
                _mm_prefetch::<_MM_HINT_T0>(bpp.wrapping_add(ahead) as *const i8);
                _mm_prefetch::<_MM_HINT_T0>(bpp.wrapping_add(ahead + 16) as *const i8);
                step(ap, bpp, &mut acc);
                _mm_prefetch::<_MM_HINT_T0>(bpp.wrapping_add(ahead + b_ks) as *const i8);
                _mm_prefetch::<_MM_HINT_T0>(bpp.wrapping_add(ahead + b_ks + 16) as *const i8);
                step(ap.add(12), bpp.add(b_ks), &mut acc);
                ap = ap.add(24);
                bpp = bpp.add(2 * b_ks);
                p += 2;
            }
            if p < kc {
                step(ap, bpp, &mut acc);
            }
            finish(&acc, c, rs);
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86_bf16 {
    use std::arch::x86_64::*;

    use super::x86_512::{finish, start};
    use super::Init;

    /// AVX512_BF16 12 × 32 micro-kernel: per pair of `k` steps, two `vdpbf16ps` per row
    /// (each lane adds two bf16 products to its f32 accumulator), so twice the multiply-adds
    /// of `vfmadd231ps` per instruction; accumulation stays f32.
    ///
    /// # Safety
    /// The CPU supports AVX-512F and AVX512_BF16; `a`: `⌈kc/2⌉·12` pair slots, `b`: `⌈kc/2⌉`
    /// rows of 32 pair slots at stride `b_ks`, `c`: 12 rows of 32 at stride `rs`.
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub unsafe fn kernel_bf16(kc: usize, a: *const f32, b: *const f32, b_ks: usize, c: *mut f32, rs: usize, init: Init) {
        unsafe {
            let mut acc = start(c, rs, init);
            let (mut ap, mut bpp) = (a as *const u32, b as *const u32);
            for _ in 0..kc.div_ceil(2) {
                _mm_prefetch::<_MM_HINT_T0>(bpp.wrapping_add(8 * b_ks) as *const i8);
                _mm_prefetch::<_MM_HINT_T0>(bpp.wrapping_add(8 * b_ks + 16) as *const i8);
                let b0: __m512bh = std::mem::transmute(_mm512_loadu_si512(bpp as *const _));
                let b1: __m512bh = std::mem::transmute(_mm512_loadu_si512(bpp.add(16) as *const _));
                for (i, row) in acc.iter_mut().enumerate() {
                    let av: __m512bh = std::mem::transmute(_mm512_set1_epi32(*ap.add(i) as i32));
                    row[0] = _mm512_dpbf16_ps(row[0], av, b0);
                    row[1] = _mm512_dpbf16_ps(row[1], av, b1);
                }
                ap = ap.add(12);
                bpp = bpp.add(b_ks);
            }
            finish(&acc, c, rs);
        }
    }
}

/// Throughput of the micro-kernel alone on packed data that stays in L1 (for tuning):
/// `(GFLOP/s, mr, nr)` on the calling thread.
#[doc(hidden)]
pub fn kernel_gflops(kc: usize, reps: usize) -> (f64, usize, usize) {
    let isa = isa(false, usize::MAX);
    let a = vec![1.0f32; kc * isa.mr];
    let b = vec![0.5f32; kc * isa.nr];
    let mut c = vec![0.0f32; isa.mr * isa.nr];
    let t = std::time::Instant::now();
    for _ in 0..reps {
        // SAFETY: buffers of the kernel's sizes.
        unsafe { (isa.kernel)(kc, a.as_ptr(), b.as_ptr(), isa.nr, c.as_mut_ptr(), isa.nr, Init::Load) };
    }
    let secs = t.elapsed().as_secs_f64();
    std::hint::black_box(&c);
    (2.0 * (kc * isa.mr * isa.nr * reps) as f64 / secs / 1e9, isa.mr, isa.nr)
}
