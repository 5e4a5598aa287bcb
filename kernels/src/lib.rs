//! Quantized matrix-vector kernels for batch-1 decode (and small-batch prefill) on x86 AVX2,
//! with a portable scalar fallback.
//!
//! Candle's CPU backend has no SIMD path for Q4_1 / Q5_0 on x86 (scalar `vec_dot`), and its
//! k-quant kernels (Q4_K, Q6_K) run on its own thread pool; these kernels follow ggml-cpu's
//! AVX2 code (`arch/x86/quants.c`) on the ggml block layouts, so GGUF tensor bytes can be used
//! as they are, and every format runs on the one [`KernelPool`].
//!
//! ```ignore
//! let w = QWeight::new(QType::Q4_1, rows, cols, gguf_bytes)?;   // rows = output features
//! let pool = KernelPool::global();                               // or KernelPool::new(2)
//! let mut xq = QuantizedActivation::default();
//! xq.quantize(w.act_kind(), &x, 1, cols);                        // once per input vector
//! w.matvec(pool, &xq, &mut out);                                 // out.len() == rows
//! matmul_multi(pool, &[&wq, &wk, &wv], &xq, &mut [&mut q, &mut k, &mut v]); // one dispatch
//! w.matmul(pool, &xs, m, &mut out_m);                            // xs m×cols -> out m×rows
//! ```
//!
//! * Q4_1, Q5_0 and Q8_0 (x86): at load the rows are interleaved in groups of eight
//!   ([`NibblesX8`], [`BytesX8`], no larger than the GGUF rows), so one byte dot product
//!   against four broadcast activation bytes leaves each row's exact block sum in its own lane,
//!   and one float update per block serves eight rows. Every m runs the same kernel per row
//!   (tiles of 8 rows × 4 activations, then one activation at a time), so a row's bits never
//!   depend on the batch. On a Sapphire Rapids core with AVX-VNNI: ~57 GMAC/s at m = 1 and
//!   ~105 at m >= 4, against 28 and 39 for the per-row kernels below.
//! * Other formats, and the rows after the last group of eight: MV_R = 4 rows per kernel call
//!   share each activation block (m < 4); 2 rows × 4 activations tiles (m >= 4).
//! * AVX-VNNI (`vpdpbusd`) where the CPU has it, for the same exact integer sums as AVX2's
//!   `maddubs` + `madd`: the same bits on either (`LM_KERNELS_NO_VNNI=1` compares).
//! * `LM_KERNELS_SCALAR=1` forces the portable scalar path.

pub mod attention;
pub mod blocks;
mod exp;
mod pool;

#[cfg(target_arch = "x86_64")]
pub mod avx2;

pub use blocks::{
    BlockQ4K, BlockQ4_0, BlockQ4_1, BlockQ5_0, BlockQ6K, BlockQ8K, BlockQ8_0, BlockQ8_1, BytesX8,
    NibblesX8, QK, QK_K,
};
pub use exp::exp_moments;
pub use pool::{KernelPool, MAX_CHUNKS};

use blocks::{cast_blocks, Pod};
use std::sync::Arc;

/// `detect()` once per `cache` (0 unknown, 1 yes, 2 no): feature checks and the environment
/// are read on the first call only, since every product asks.
#[cfg(target_arch = "x86_64")]
#[inline]
fn cached(cache: &std::sync::atomic::AtomicU8, detect: impl FnOnce() -> bool) -> bool {
    use std::sync::atomic::Ordering;
    match cache.load(Ordering::Relaxed) {
        1 => true,
        2 => false,
        _ => {
            let ok = detect();
            cache.store(if ok { 1 } else { 2 }, Ordering::Relaxed);
            ok
        }
    }
}

/// True when the AVX2 + FMA + F16C kernels can be used on this CPU.
#[inline]
pub fn has_avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static CACHE: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(0);
        cached(&CACHE, || {
            std::is_x86_feature_detected!("avx2")
                && std::is_x86_feature_detected!("fma")
                && std::is_x86_feature_detected!("f16c")
                && std::env::var_os("LM_KERNELS_SCALAR").is_none()
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// AVX-512F beside AVX2, for the kernels whose results do not depend on the vector width
/// (element-wise sums such as attention's weighted values). `LM_KERNELS_NO_AVX512=1`
/// turns it off to compare.
pub fn has_avx512() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static CACHE: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(0);
        cached(&CACHE, || {
            has_avx2()
                && std::is_x86_feature_detected!("avx512f")
                && std::env::var_os("LM_KERNELS_NO_AVX512").is_none()
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// True when [`has_avx2`] holds and the CPU has AVX-VNNI, which the legacy formats' kernels
/// use for their byte products (same results, fewer instructions). `LM_KERNELS_NO_VNNI=1`
/// keeps plain AVX2, to compare the two on one machine.
#[inline]
pub fn has_avx_vnni() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static CACHE: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(0);
        cached(&CACHE, || {
            has_avx2()
                && std::is_x86_feature_detected!("avxvnni")
                && std::env::var_os("LM_KERNELS_NO_VNNI").is_none()
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Instruction set used by a call (tests force `Scalar` or `Avx2` to compare paths).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Isa {
    Scalar,
    #[cfg(target_arch = "x86_64")]
    Avx2,
    /// AVX2 with AVX-VNNI byte products where a format has them.
    #[cfg(target_arch = "x86_64")]
    AvxVnni,
}

impl Isa {
    #[inline]
    fn detect() -> Self {
        #[cfg(target_arch = "x86_64")]
        if has_avx_vnni() {
            return Isa::AvxVnni;
        }
        #[cfg(target_arch = "x86_64")]
        if has_avx2() {
            return Isa::Avx2;
        }
        Isa::Scalar
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KernelError {
    Unsupported(String),
    Shape(String),
}

impl std::fmt::Display for KernelError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            KernelError::Unsupported(s) => write!(f, "unsupported: {s}"),
            KernelError::Shape(s) => write!(f, "shape error: {s}"),
        }
    }
}
impl std::error::Error for KernelError {}

/// Weight formats with a kernel here. Discriminants are the ggml/GGUF type ids.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum QType {
    Q4_0 = 2,
    Q4_1 = 3,
    Q5_0 = 6,
    Q8_0 = 8,
    Q4K = 12,
    Q6K = 14,
}

/// Activation formats (the ggml `vec_dot_type` of each weight format).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ActKind {
    Q8_0,
    Q8_1,
    Q8K,
}

impl ActKind {
    /// Elements per block (activation rows must be a multiple).
    pub const fn block_size(self) -> usize {
        match self {
            ActKind::Q8K => QK_K,
            _ => QK,
        }
    }
}

impl QType {
    /// From a ggml/GGUF type id (`ggml_type`).
    pub fn from_ggml_id(id: u32) -> Option<Self> {
        Some(match id {
            2 => QType::Q4_0,
            3 => QType::Q4_1,
            6 => QType::Q5_0,
            8 => QType::Q8_0,
            12 => QType::Q4K,
            14 => QType::Q6K,
            _ => return None,
        })
    }
    /// Elements per block.
    pub const fn block_size(self) -> usize {
        self.act_kind().block_size()
    }
    /// Bytes per block.
    pub const fn type_size(self) -> usize {
        match self {
            QType::Q4_0 => 18,
            QType::Q4_1 => 20,
            QType::Q5_0 => 22,
            QType::Q8_0 => 34,
            QType::Q4K => 144,
            QType::Q6K => 210,
        }
    }
    /// The activation format its dot product consumes.
    pub const fn act_kind(self) -> ActKind {
        match self {
            QType::Q4_1 => ActKind::Q8_1,
            QType::Q4K | QType::Q6K => ActKind::Q8K,
            _ => ActKind::Q8_0,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Activations
// ---------------------------------------------------------------------------------------------

/// `m` activation rows of `cols` values quantized to Q8_0 or Q8_1 (`cols / 32` blocks each) or
/// Q8_K (`cols / 256`). Reuse one value across calls: `quantize` keeps the allocation.
#[derive(Clone, Debug)]
pub struct QuantizedActivation {
    kind: ActKind,
    m: usize,
    cols: usize,
    q8_0: Vec<BlockQ8_0>,
    /// Q8_0: each block's sum of quants (the interleaved kernels take an offset off with it).
    q8_0_sums: Vec<i32>,
    q8_1: Vec<BlockQ8_1>,
    q8_k: Vec<BlockQ8K>,
}

impl Default for QuantizedActivation {
    fn default() -> Self {
        Self {
            kind: ActKind::Q8_0,
            m: 0,
            cols: 0,
            q8_0: Vec::new(),
            q8_0_sums: Vec::new(),
            q8_1: Vec::new(),
            q8_k: Vec::new(),
        }
    }
}

impl QuantizedActivation {
    /// Quantize `xs` (`m × cols`, row-major; `cols` a multiple of `kind.block_size()`).
    pub fn new(kind: ActKind, xs: &[f32], m: usize, cols: usize) -> Self {
        let mut s = Self::default();
        s.quantize(kind, xs, m, cols);
        s
    }

    /// Re-quantize into this buffer (ggml `quantize_row_q8_0` / `q8_1` / `q8_K`).
    pub fn quantize(&mut self, kind: ActKind, xs: &[f32], m: usize, cols: usize) {
        self.quantize_isa(Isa::detect(), kind, xs, m, cols)
    }

    fn quantize_isa(&mut self, isa: Isa, kind: ActKind, xs: &[f32], m: usize, cols: usize) {
        let bs = kind.block_size();
        assert!(
            cols.is_multiple_of(bs),
            "cols {cols} not a multiple of {bs}"
        );
        assert_eq!(xs.len(), m * cols, "xs length {} != {m}×{cols}", xs.len());
        self.kind = kind;
        self.m = m;
        self.cols = cols;
        let nb = m * cols / bs;
        match kind {
            ActKind::Q8_0 => {
                self.q8_0.resize(nb, BlockQ8_0::default());
                quantize_q8_0(isa, xs, &mut self.q8_0);
                self.q8_0_sums.clear();
                self.q8_0_sums.extend(
                    self.q8_0
                        .iter()
                        .map(|b| b.qs.iter().map(|&q| q as i32).sum::<i32>()),
                );
            }
            ActKind::Q8_1 => {
                self.q8_1.resize(nb, BlockQ8_1::default());
                quantize_q8_1(isa, xs, &mut self.q8_1);
            }
            ActKind::Q8K => {
                // ggml quantizes Q8_K with scalar code on x86 too; it is O(cols), not O(rows·cols).
                self.q8_k.resize(nb, BlockQ8K::default());
                blocks::quantize_row_q8_k(xs, &mut self.q8_k);
            }
        }
    }

    pub fn kind(&self) -> ActKind {
        self.kind
    }
    pub fn m(&self) -> usize {
        self.m
    }
    pub fn cols(&self) -> usize {
        self.cols
    }
    /// The Q8_0 blocks (empty unless `kind() == Q8_0`).
    pub fn q8_0(&self) -> &[BlockQ8_0] {
        if self.kind == ActKind::Q8_0 {
            &self.q8_0[..self.m * self.cols / QK]
        } else {
            &[]
        }
    }
    /// Each Q8_0 block's sum of quants (empty unless `kind() == Q8_0`).
    pub fn q8_0_sums(&self) -> &[i32] {
        if self.kind == ActKind::Q8_0 {
            &self.q8_0_sums[..self.m * self.cols / QK]
        } else {
            &[]
        }
    }
    /// The Q8_1 blocks (empty unless `kind() == Q8_1`).
    pub fn q8_1(&self) -> &[BlockQ8_1] {
        if self.kind == ActKind::Q8_1 {
            &self.q8_1[..self.m * self.cols / QK]
        } else {
            &[]
        }
    }
    /// The Q8_K blocks (empty unless `kind() == Q8K`).
    pub fn q8_k(&self) -> &[BlockQ8K] {
        if self.kind == ActKind::Q8K {
            &self.q8_k[..self.m * self.cols / QK_K]
        } else {
            &[]
        }
    }
}

fn quantize_q8_0(isa: Isa, xs: &[f32], ys: &mut [BlockQ8_0]) {
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 | Isa::AvxVnni => unsafe { avx2::quantize_row_q8_0(xs, ys) },
        Isa::Scalar => blocks::quantize_row_q8_0_scalar(xs, ys),
    }
}

fn quantize_q8_1(isa: Isa, xs: &[f32], ys: &mut [BlockQ8_1]) {
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 | Isa::AvxVnni => unsafe { avx2::quantize_row_q8_1(xs, ys) },
        Isa::Scalar => blocks::quantize_row_q8_1_scalar(xs, ys),
    }
}

/// Quantize one f32 row to Q8_0 activation blocks (AVX2 when available).
pub fn quantize_row_q8_0(xs: &[f32], ys: &mut [BlockQ8_0]) {
    quantize_q8_0(Isa::detect(), xs, ys)
}

/// Quantize one f32 row to Q8_1 activation blocks (AVX2 when available).
pub fn quantize_row_q8_1(xs: &[f32], ys: &mut [BlockQ8_1]) {
    quantize_q8_1(Isa::detect(), xs, ys)
}

// ---------------------------------------------------------------------------------------------
// Dot products (dispatching)
// ---------------------------------------------------------------------------------------------

macro_rules! dispatch_dot {
    ($name:ident, $X:ty, $Y:ty, $scalar:path, $avx:ident) => {
        /// Dot product of one weight row with one activation row (same number of blocks).
        pub fn $name(x: &[$X], y: &[$Y]) -> f32 {
            assert_eq!(x.len(), y.len());
            #[cfg(target_arch = "x86_64")]
            if has_avx2() {
                return unsafe { avx2::$avx(x, y) };
            }
            $scalar(x, y)
        }
    };
}
dispatch_dot!(
    vec_dot_q4_0_q8_0,
    BlockQ4_0,
    BlockQ8_0,
    blocks::vec_dot_q4_0_q8_0_scalar,
    vec_dot_q4_0_q8_0
);
dispatch_dot!(
    vec_dot_q4_1_q8_1,
    BlockQ4_1,
    BlockQ8_1,
    blocks::vec_dot_q4_1_q8_1_scalar,
    vec_dot_q4_1_q8_1
);
dispatch_dot!(
    vec_dot_q5_0_q8_0,
    BlockQ5_0,
    BlockQ8_0,
    blocks::vec_dot_q5_0_q8_0_scalar,
    vec_dot_q5_0_q8_0
);
dispatch_dot!(
    vec_dot_q8_0_q8_0,
    BlockQ8_0,
    BlockQ8_0,
    blocks::vec_dot_q8_0_q8_0_scalar,
    vec_dot_q8_0_q8_0
);
dispatch_dot!(
    vec_dot_q4_k_q8_k,
    BlockQ4K,
    BlockQ8K,
    blocks::vec_dot_q4_k_q8_k_scalar,
    vec_dot_k
);
dispatch_dot!(
    vec_dot_q6_k_q8_k,
    BlockQ6K,
    BlockQ8K,
    blocks::vec_dot_q6_k_q8_k_scalar,
    vec_dot_k
);

/// A weight block format with its activation format and row kernels.
trait Format: Pod {
    type Act: Pod;
    /// ggml's generic dot product of one row (the scalar path).
    fn dot_scalar(x: &[Self], y: &[Self::Act]) -> f32;

    /// [`Format::rows`] on AVX2, with AVX-VNNI where `vnni` and the format has such kernels.
    ///
    /// # Safety
    /// As [`Format::rows`], and AVX2 + FMA + F16C (and AVX-VNNI if `vnni`) available.
    #[cfg(target_arch = "x86_64")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn rows_avx2(
        w: &[Self],
        nb: usize,
        rows: std::ops::Range<usize>,
        y: &[Self::Act],
        m: usize,
        out: *mut f32,
        out_stride: usize,
        vnni: bool,
    );

    /// `out[c * out_stride + r - rows.start] = dot(w row r, act row c)` for r in `rows`,
    /// c in `0..m`; `w` is the whole matrix (`nb` blocks per row), `y` is `m × nb` blocks.
    ///
    /// # Safety
    /// `out` must be valid for those writes; `isa` must be supported.
    #[allow(clippy::too_many_arguments)]
    unsafe fn rows(
        isa: Isa,
        w: &[Self],
        nb: usize,
        rows: std::ops::Range<usize>,
        y: &[Self::Act],
        m: usize,
        out: *mut f32,
        out_stride: usize,
    ) {
        match isa {
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => Self::rows_avx2(w, nb, rows, y, m, out, out_stride, false),
            #[cfg(target_arch = "x86_64")]
            Isa::AvxVnni => Self::rows_avx2(w, nb, rows, y, m, out, out_stride, true),
            Isa::Scalar => {
                for r in rows.clone() {
                    let wr = &w[r * nb..(r + 1) * nb];
                    for c in 0..m {
                        *out.add(c * out_stride + r - rows.start) =
                            Self::dot_scalar(wr, &y[c * nb..(c + 1) * nb]);
                    }
                }
            }
        }
    }
}

/// One format's AVX2 kernels bound to a weight matrix and an activation batch (absolute
/// row index `r`, activation index `c`).
#[cfg(target_arch = "x86_64")]
trait Avx2Kernels {
    /// `out[i] = dot(w row r + i, act c)`.
    unsafe fn rows<const R: usize>(&self, r: usize, c: usize, out: &mut [f32; R]);
    /// `out[j][i] = dot(w row r + i, act c + j)`.
    unsafe fn tile(&self, r: usize, c: usize, out: &mut [[f32; TILE_R]; TILE_C]);
}

/// The row blocking every format shares: for m < TILE_C, MV_R rows per kernel call (one
/// activation block load serves MV_R rows); otherwise TILE_R × TILE_C tiles, the activations
/// left over TILE_R rows at a time; then the rows left over one at a time.
/// `out[c * out_stride + r - rows.start] = dot(w row r, act c)`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn avx2_blocked<K: Avx2Kernels>(
    k: &K,
    rows: std::ops::Range<usize>,
    m: usize,
    out: *mut f32,
    out_stride: usize,
) {
    let put = |c: usize, r: usize, o: &[f32]| {
        let dst = out.add(c * out_stride + r - rows.start);
        std::ptr::copy_nonoverlapping(o.as_ptr(), dst, o.len());
    };
    let mut r = rows.start;
    if m < TILE_C {
        while r + MV_R <= rows.end {
            for c in 0..m {
                let mut o = [0f32; MV_R];
                k.rows::<MV_R>(r, c, &mut o);
                put(c, r, &o);
            }
            r += MV_R;
        }
    }
    while m >= TILE_C && r + TILE_R <= rows.end {
        let mut c = 0;
        while c + TILE_C <= m {
            let mut o = [[0f32; TILE_R]; TILE_C];
            k.tile(r, c, &mut o);
            for (j, oj) in o.iter().enumerate() {
                put(c + j, r, oj);
            }
            c += TILE_C;
        }
        while c < m {
            let mut o = [0f32; TILE_R];
            k.rows::<TILE_R>(r, c, &mut o);
            put(c, r, &o);
            c += 1;
        }
        r += TILE_R;
    }
    while r < rows.end {
        for c in 0..m {
            let mut o = [0f32; 1];
            k.rows::<1>(r, c, &mut o);
            put(c, r, &o);
        }
        r += 1;
    }
}

/// A legacy (32-element block) format's kernels: `yd`/`ys` hold the activations' f32 scales
/// for the tiles, `yd[c][b] = d`, `ys[b][c] = s` (zero padded to `ys_stride`).
#[cfg(target_arch = "x86_64")]
struct Legacy<X, Y> {
    w: *const X,
    y: *const Y,
    nb: usize,
    /// Run the AVX-VNNI twins of the kernels.
    vnni: bool,
    yd: Vec<f32>,
    ys: Vec<f32>,
    ys_stride: usize,
}

#[cfg(target_arch = "x86_64")]
impl<X, Y: blocks::ActBlock> Legacy<X, Y> {
    fn new(w: &[X], y: &[Y], nb: usize, m: usize, vnni: bool) -> Self {
        let (mut yd, mut ys) = (Vec::new(), Vec::new());
        let ys_stride = m + 8;
        if m >= TILE_C {
            yd = vec![0f32; m * nb];
            ys = vec![0f32; nb * ys_stride];
            for c in 0..m {
                for b in 0..nb {
                    let blk = &y[c * nb + b];
                    yd[c * nb + b] = blk.d();
                    ys[b * ys_stride + c] = blk.s();
                }
            }
        }
        Self {
            w: w.as_ptr(),
            y: y.as_ptr(),
            nb,
            vnni,
            yd,
            ys,
            ys_stride,
        }
    }
    unsafe fn row(&self, r: usize) -> *const X {
        self.w.add(r * self.nb)
    }
    unsafe fn act(&self, c: usize) -> *const Y {
        self.y.add(c * self.nb)
    }
}

macro_rules! impl_format {
    ($X:ty, $Y:ty, $scalar:path, $avx_rows:ident, $avx_tile:ident) => {
        #[cfg(target_arch = "x86_64")]
        impl Avx2Kernels for Legacy<$X, $Y> {
            #[inline]
            unsafe fn rows<const R: usize>(&self, r: usize, c: usize, out: &mut [f32; R]) {
                let xs = std::array::from_fn(|i| self.row(r + i));
                if self.vnni {
                    avx2::vnni::$avx_rows::<R>(xs, self.act(c), self.nb, out)
                } else {
                    avx2::$avx_rows::<R>(xs, self.act(c), self.nb, out)
                }
            }
            #[inline]
            unsafe fn tile(&self, r: usize, c: usize, out: &mut [[f32; TILE_R]; TILE_C]) {
                let x = std::array::from_fn(|i| self.row(r + i));
                let y = std::array::from_fn(|j| self.act(c + j));
                let yd = std::array::from_fn(|j| self.yd.as_ptr().add((c + j) * self.nb));
                let ys = self.ys.as_ptr().add(c);
                if self.vnni {
                    avx2::vnni::$avx_tile::<TILE_R, TILE_C>(
                        x,
                        y,
                        yd,
                        ys,
                        self.ys_stride,
                        self.nb,
                        out,
                    )
                } else {
                    avx2::$avx_tile::<TILE_R, TILE_C>(x, y, yd, ys, self.ys_stride, self.nb, out)
                }
            }
        }

        impl Format for $X {
            type Act = $Y;
            fn dot_scalar(x: &[Self], y: &[$Y]) -> f32 {
                $scalar(x, y)
            }
            #[cfg(target_arch = "x86_64")]
            unsafe fn rows_avx2(
                w: &[Self],
                nb: usize,
                rows: std::ops::Range<usize>,
                y: &[$Y],
                m: usize,
                out: *mut f32,
                out_stride: usize,
                vnni: bool,
            ) {
                avx2_blocked(&Legacy::new(w, y, nb, m, vnni), rows, m, out, out_stride)
            }
        }
    };
}
impl_format!(
    BlockQ4_0,
    BlockQ8_0,
    blocks::vec_dot_q4_0_q8_0_scalar,
    dot_rows_q4_0_q8_0,
    dot_tile_q4_0_q8_0
);
impl_format!(
    BlockQ4_1,
    BlockQ8_1,
    blocks::vec_dot_q4_1_q8_1_scalar,
    dot_rows_q4_1_q8_1,
    dot_tile_q4_1_q8_1
);
impl_format!(
    BlockQ5_0,
    BlockQ8_0,
    blocks::vec_dot_q5_0_q8_0_scalar,
    dot_rows_q5_0_q8_0,
    dot_tile_q5_0_q8_0
);
impl_format!(
    BlockQ8_0,
    BlockQ8_0,
    blocks::vec_dot_q8_0_q8_0_scalar,
    dot_rows_q8_0_q8_0,
    dot_tile_q8_0_q8_0
);

/// A k-quant format's kernels: one generic kernel ([`avx2::dot_tile_k`]) for rows and tiles.
#[cfg(target_arch = "x86_64")]
struct KQuants<X> {
    w: *const X,
    y: *const BlockQ8K,
    nb: usize,
}

#[cfg(target_arch = "x86_64")]
impl<X: avx2::KQuant> Avx2Kernels for KQuants<X> {
    #[inline]
    unsafe fn rows<const R: usize>(&self, r: usize, c: usize, out: &mut [f32; R]) {
        let mut o = [[0f32; R]; 1];
        self.tile_rc(r, c, &mut o);
        *out = o[0];
    }
    #[inline]
    unsafe fn tile(&self, r: usize, c: usize, out: &mut [[f32; TILE_R]; TILE_C]) {
        self.tile_rc(r, c, out)
    }
}

#[cfg(target_arch = "x86_64")]
impl<X: avx2::KQuant> KQuants<X> {
    #[inline]
    unsafe fn tile_rc<const R: usize, const C: usize>(
        &self,
        r: usize,
        c: usize,
        out: &mut [[f32; R]; C],
    ) {
        avx2::dot_tile_k::<X, R, C>(
            std::array::from_fn(|i| self.w.add((r + i) * self.nb)),
            std::array::from_fn(|j| self.y.add((c + j) * self.nb)),
            self.nb,
            out,
        )
    }
}

macro_rules! impl_format_k {
    ($X:ty, $scalar:path) => {
        impl Format for $X {
            type Act = BlockQ8K;
            fn dot_scalar(x: &[Self], y: &[BlockQ8K]) -> f32 {
                $scalar(x, y)
            }
            #[cfg(target_arch = "x86_64")]
            unsafe fn rows_avx2(
                w: &[Self],
                nb: usize,
                rows: std::ops::Range<usize>,
                y: &[BlockQ8K],
                m: usize,
                out: *mut f32,
                out_stride: usize,
                _vnni: bool,
            ) {
                // The k-quants scale i16 pair sums before widening: no VNNI form.
                let k = KQuants {
                    w: w.as_ptr(),
                    y: y.as_ptr(),
                    nb,
                };
                avx2_blocked(&k, rows, m, out, out_stride)
            }
        }
    };
}
impl_format_k!(BlockQ4K, blocks::vec_dot_q4_k_q8_k_scalar);
impl_format_k!(BlockQ6K, blocks::vec_dot_q6_k_q8_k_scalar);

/// Rows `rows` (below the last full group of eight) from the interleaved copy:
/// `out[c * out_stride + r - rows.start] = dot(w row r, act c)`. A group only partly in `rows`
/// is computed whole and the wanted rows copied, so every row always runs the same kernel.
///
/// # Safety
/// `out` valid for those writes; AVX2 (and AVX-VNNI if `vnni`) available; `x` checked.
#[cfg(target_arch = "x86_64")]
unsafe fn packed_rows(
    packed: &Packed,
    x: &QuantizedActivation,
    nb: usize,
    rows: std::ops::Range<usize>,
    out: *mut f32,
    out_stride: usize,
    vnni: bool,
) {
    /// Group `g`'s eight rows × activations `c..c + C`.
    unsafe fn group<const C: usize>(
        packed: &Packed,
        x: &QuantizedActivation,
        nb: usize,
        g: usize,
        c: usize,
        vnni: bool,
        o: &mut [[f32; PACK_ROWS]; C],
    ) {
        let at = |j: usize| (c + j) * nb;
        match packed {
            Packed::Q4_1(w) => {
                let (w, y) = (w.as_ptr().add(g * nb), x.q8_1().as_ptr());
                let y = std::array::from_fn(|j| y.add(at(j)));
                if vnni {
                    avx2::vnni::tile_q4_1x8::<C>(w, y, nb, o)
                } else {
                    avx2::tile_q4_1x8::<C>(w, y, nb, o)
                }
            }
            Packed::Q5_0(w) | Packed::Q8_0(w) => {
                let w = w.as_ptr().add(g * nb);
                let (y, s) = (x.q8_0().as_ptr(), x.q8_0_sums().as_ptr());
                let y = std::array::from_fn(|j| y.add(at(j)));
                let s = std::array::from_fn(|j| s.add(at(j)));
                match (matches!(packed, Packed::Q8_0(_)), vnni) {
                    (true, true) => avx2::vnni::tile_bytes_x8::<C, true, 0>(w, y, s, nb, o),
                    (true, false) => avx2::tile_bytes_x8::<C, true, 0>(w, y, s, nb, o),
                    (false, true) => avx2::vnni::tile_bytes_x8::<C, false, 16>(w, y, s, nb, o),
                    (false, false) => avx2::tile_bytes_x8::<C, false, 16>(w, y, s, nb, o),
                }
            }
        }
    }
    let put = |c: usize, g0: usize, o: &[f32; PACK_ROWS]| {
        for (i, v) in o.iter().enumerate() {
            let r = g0 + i;
            if rows.contains(&r) {
                *out.add(c * out_stride + r - rows.start) = *v;
            }
        }
    };
    let m = x.m();
    for g in rows.start / PACK_ROWS..rows.end.div_ceil(PACK_ROWS) {
        let mut c = 0;
        while c + TILE_C <= m {
            let mut o = [[0f32; PACK_ROWS]; TILE_C];
            group::<TILE_C>(packed, x, nb, g, c, vnni, &mut o);
            for (j, oj) in o.iter().enumerate() {
                put(c + j, g * PACK_ROWS, oj);
            }
            c += TILE_C;
        }
        while c < m {
            let mut o = [[0f32; PACK_ROWS]; 1];
            group::<1>(packed, x, nb, g, c, vnni, &mut o);
            put(c, g * PACK_ROWS, &o[0]);
            c += 1;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Weights
// ---------------------------------------------------------------------------------------------

/// A quantized weight matrix in ggml layout: `rows` output features, each `cols / block_size`
/// consecutive blocks (exactly a GGUF tensor of shape `[cols, rows]` in ggml order).
#[derive(Clone, Debug)]
pub struct QWeight {
    dtype: QType,
    rows: usize,
    cols: usize,
    bytes: Arc<[u8]>,
    /// On x86 with AVX2, Q4_1, Q5_0 and Q8_0 rows in groups of eight, interleaved
    /// ([`NibblesX8`], [`BytesX8`]), `rows / 8 × cols / 32` blocks; the rows after the last full group use
    /// `bytes`.
    packed: Option<Packed>,
}

/// A weight's interleaved copy, by format.
#[derive(Clone, Debug)]
enum Packed {
    Q4_1(Arc<[NibblesX8]>),
    Q5_0(Arc<[BytesX8]>),
    Q8_0(Arc<[BytesX8]>),
}

impl Packed {
    /// The interleaved copy of `rows × nb` blocks of `dtype`, where there is a kernel for it.
    fn new(dtype: QType, rows: usize, nb: usize, bytes: &[u8]) -> Option<Self> {
        fn groups<X: Pod, P>(
            w: &[X],
            rows: usize,
            nb: usize,
            pack: fn([&[X]; PACK_ROWS], usize) -> P,
        ) -> Arc<[P]> {
            (0..rows / PACK_ROWS)
                .flat_map(|g| {
                    let r = std::array::from_fn(|i| &w[(g * PACK_ROWS + i) * nb..][..nb]);
                    (0..nb).map(move |b| pack(r, b))
                })
                .collect()
        }
        if !has_avx2() || rows < PACK_ROWS {
            return None;
        }
        let w = bytes;
        Some(match dtype {
            QType::Q4_1 => Packed::Q4_1(groups(cast_blocks(w), rows, nb, NibblesX8::pack_q4_1)),
            QType::Q5_0 => Packed::Q5_0(groups(cast_blocks(w), rows, nb, BytesX8::pack_q5_0)),
            QType::Q8_0 => Packed::Q8_0(groups(cast_blocks(w), rows, nb, BytesX8::pack_q8_0)),
            _ => return None,
        })
    }
}

/// Weight rows per matvec kernel call (the activation block is loaded once per MV_R rows).
const MV_R: usize = 4;
/// Rows per interleaved group ([`BlockQ4_1x8`]); chunks of a product start at multiples of it.
const PACK_ROWS: usize = 8;
/// Matmul (m >= TILE_C) tile: TILE_R weight rows × TILE_C activation rows (measured on Zen 3:
/// 2×4 beats 4×2, 2×3, 3×3; 4×1 for m = 1).
const TILE_R: usize = 2;
const TILE_C: usize = 4;

/// Target number of chunks per thread for one product (dynamic claiming balances load and
/// absorbs a descheduled worker).
const CHUNKS_PER_THREAD: usize = 4;
/// Minimum work per chunk, in 32-element weight blocks (~1.5 µs on one core): bounds the claim
/// overhead.
const MIN_CHUNK_BLOCKS: usize = 1024;

struct SendPtr(*mut f32);
unsafe impl Sync for SendPtr {}
unsafe impl Send for SendPtr {}

impl QWeight {
    /// Wrap ggml-layout bytes. `bytes.len()` must be `rows * cols / block_size * type_size`.
    pub fn new(
        dtype: QType,
        rows: usize,
        cols: usize,
        bytes: impl Into<Arc<[u8]>>,
    ) -> Result<Self, KernelError> {
        let mut bytes: Arc<[u8]> = bytes.into();
        let bs = dtype.block_size();
        if !cols.is_multiple_of(bs) {
            return Err(KernelError::Shape(format!(
                "{dtype:?}: cols {cols} not a multiple of {bs}"
            )));
        }
        let want = rows * (cols / bs) * dtype.type_size();
        if bytes.len() != want {
            return Err(KernelError::Shape(format!(
                "{dtype:?} {rows}×{cols}: expected {want} bytes, got {}",
                bytes.len()
            )));
        }
        if !(bytes.as_ptr() as usize).is_multiple_of(2) {
            // Arc's data is always at least 8-aligned; a copy fixes a foreign allocation.
            bytes = Arc::from(&bytes[..]);
        }
        let packed = Packed::new(dtype, rows, cols / bs, &bytes);
        Ok(Self {
            dtype,
            rows,
            cols,
            bytes,
            packed,
        })
    }

    /// Quantize an f32 matrix (`rows × cols`, row-major) with ggml's reference quantizers (the
    /// legacy formats; k-quant weights come as GGUF bytes through [`QWeight::new`]).
    pub fn from_f32(
        dtype: QType,
        rows: usize,
        cols: usize,
        data: &[f32],
    ) -> Result<Self, KernelError> {
        if !cols.is_multiple_of(QK) || data.len() != rows * cols {
            return Err(KernelError::Shape(format!(
                "{rows}×{cols} with {} values",
                data.len()
            )));
        }
        let nb = rows * cols / QK;
        fn q<T: Pod>(nb: usize, zero: T, data: &[f32], f: fn(&[f32], &mut [T])) -> Arc<[u8]> {
            let mut v = vec![zero; nb];
            f(data, &mut v);
            Arc::from(blocks::blocks_as_bytes(&v))
        }
        let bytes = match dtype {
            QType::Q4_0 => q(
                nb,
                BlockQ4_0 {
                    d: half::f16::ZERO,
                    qs: [0; 16],
                },
                data,
                blocks::quantize_row_q4_0,
            ),
            QType::Q4_1 => q(
                nb,
                BlockQ4_1 {
                    d: half::f16::ZERO,
                    m: half::f16::ZERO,
                    qs: [0; 16],
                },
                data,
                blocks::quantize_row_q4_1,
            ),
            QType::Q5_0 => q(
                nb,
                BlockQ5_0 {
                    d: half::f16::ZERO,
                    qh: [0; 4],
                    qs: [0; 16],
                },
                data,
                blocks::quantize_row_q5_0,
            ),
            QType::Q8_0 => q(
                nb,
                BlockQ8_0::default(),
                data,
                blocks::quantize_row_q8_0_ref,
            ),
            QType::Q4K | QType::Q6K => {
                return Err(KernelError::Unsupported(format!(
                    "quantizing to {dtype:?} (wrap GGUF bytes with QWeight::new)"
                )))
            }
        };
        Self::new(dtype, rows, cols, bytes)
    }

    pub fn dtype(&self) -> QType {
        self.dtype
    }
    /// Output features.
    pub fn rows(&self) -> usize {
        self.rows
    }
    /// Input features.
    pub fn cols(&self) -> usize {
        self.cols
    }
    /// The activation format `matvec` expects.
    pub fn act_kind(&self) -> ActKind {
        self.dtype.act_kind()
    }
    /// Raw ggml bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }
    pub fn row_bytes(&self) -> usize {
        self.cols / self.dtype.block_size() * self.dtype.type_size()
    }

    /// Dequantize row `r` (e.g. an embedding lookup) into `out` (`cols` values).
    pub fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        assert!(r < self.rows, "row {r} out of range {}", self.rows);
        let rb = self.row_bytes();
        let b = &self.bytes[r * rb..(r + 1) * rb];
        match self.dtype {
            QType::Q4_0 => blocks::dequantize_row_q4_0(blocks::cast_blocks(b), out),
            QType::Q4_1 => blocks::dequantize_row_q4_1(blocks::cast_blocks(b), out),
            QType::Q5_0 => blocks::dequantize_row_q5_0(blocks::cast_blocks(b), out),
            QType::Q8_0 => blocks::dequantize_row_q8_0(blocks::cast_blocks(b), out),
            QType::Q4K => blocks::dequantize_row_q4_k(blocks::cast_blocks(b), out),
            QType::Q6K => blocks::dequantize_row_q6_k(blocks::cast_blocks(b), out),
        }
    }

    /// The whole matrix as f32, `rows × cols` row-major.
    pub fn dequantize(&self) -> Vec<f32> {
        let mut v = vec![0f32; self.rows * self.cols];
        for (r, o) in v
            .chunks_exact_mut(self.cols.max(1))
            .enumerate()
            .take(self.rows)
        {
            self.dequantize_row(r, o);
        }
        v
    }

    /// `out[r] = dot(row r, x)` for one quantized activation row (`x.m() == 1`).
    pub fn matvec(&self, pool: &KernelPool, x: &QuantizedActivation, out: &mut [f32]) {
        assert_eq!(x.m(), 1, "matvec takes one activation row; use matmul_q");
        self.matmul_q(pool, x, out)
    }

    /// `out[c * rows + r] = dot(row r, x row c)` for `c < x.m()` (`out`: `m × rows`).
    pub fn matmul_q(&self, pool: &KernelPool, x: &QuantizedActivation, out: &mut [f32]) {
        self.matmul_isa(Isa::detect(), pool, x, out)
    }

    /// `out (m × rows) = xs (m × cols) · Wᵀ`, quantizing `xs` internally (thread-local buffer).
    pub fn matmul(&self, pool: &KernelPool, xs: &[f32], m: usize, out: &mut [f32]) {
        thread_local! {
            static SCRATCH: std::cell::RefCell<QuantizedActivation> =
                std::cell::RefCell::new(QuantizedActivation::default());
        }
        SCRATCH.with(|s| {
            let mut s = s.borrow_mut();
            s.quantize(self.act_kind(), xs, m, self.cols);
            self.matmul_q(pool, &s, out);
        })
    }

    /// Single-threaded product over a row range: `out[i] = dot(row rows.start + i, x)`, for
    /// callers that parallelize (or fuse) themselves. `x.m() == 1`, `out.len() == rows.len()`.
    pub fn matvec_rows(
        &self,
        x: &QuantizedActivation,
        rows: std::ops::Range<usize>,
        out: &mut [f32],
    ) {
        assert_eq!(x.m(), 1, "matvec_rows takes one activation row");
        self.check(x);
        assert!(
            rows.start <= rows.end && rows.end <= self.rows,
            "rows {rows:?} out of 0..{}",
            self.rows
        );
        assert_eq!(
            out.len(),
            rows.len(),
            "out length {} != {}",
            out.len(),
            rows.len()
        );
        let n = rows.len();
        // SAFETY: out has exactly rows.len() elements; isa detected.
        unsafe { self.rows_dyn(Isa::detect(), x, rows, out.as_mut_ptr(), n) }
    }

    fn check(&self, x: &QuantizedActivation) {
        assert_eq!(
            x.kind(),
            self.act_kind(),
            "{:?} weight needs {:?} activations",
            self.dtype,
            self.act_kind()
        );
        assert_eq!(
            x.cols(),
            self.cols,
            "activation cols {} != weight cols {}",
            x.cols(),
            self.cols
        );
    }

    /// `out[c * out_stride + r - rows.start] = dot(row r, x row c)`.
    ///
    /// # Safety
    /// `x` checked with `check`, `rows` in range, `out` valid for those writes, `isa` supported.
    unsafe fn rows_dyn(
        &self,
        isa: Isa,
        x: &QuantizedActivation,
        rows: std::ops::Range<usize>,
        out: *mut f32,
        out_stride: usize,
    ) {
        let (nb, m, b) = (self.cols / self.dtype.block_size(), x.m(), &self.bytes[..]);
        #[cfg(target_arch = "x86_64")]
        if let (Some(packed), Isa::Avx2 | Isa::AvxVnni) = (&self.packed, isa) {
            let full = self.rows / PACK_ROWS * PACK_ROWS;
            if rows.start < full {
                let vnni = isa == Isa::AvxVnni;
                let part = rows.start..rows.end.min(full);
                packed_rows(packed, x, nb, part, out, out_stride, vnni);
                if rows.end <= full {
                    return;
                }
                let done = full - rows.start;
                return self.rows_dyn(isa, x, full..rows.end, out.add(done), out_stride);
            }
        }
        // Every format runs the same row loop over its own blocks and activation blocks.
        macro_rules! rows {
            ($block:ty, $acts:expr) => {
                <$block>::rows(
                    isa,
                    blocks::cast_blocks(b),
                    nb,
                    rows,
                    $acts,
                    m,
                    out,
                    out_stride,
                )
            };
        }
        match self.dtype {
            QType::Q4_0 => rows!(BlockQ4_0, x.q8_0()),
            QType::Q4_1 => rows!(BlockQ4_1, x.q8_1()),
            QType::Q5_0 => rows!(BlockQ5_0, x.q8_0()),
            QType::Q8_0 => rows!(BlockQ8_0, x.q8_0()),
            QType::Q4K => rows!(BlockQ4K, x.q8_k()),
            QType::Q6K => rows!(BlockQ6K, x.q8_k()),
        }
    }

    fn matmul_isa(&self, isa: Isa, pool: &KernelPool, x: &QuantizedActivation, out: &mut [f32]) {
        matmul_multi_isa(isa, pool, &[self], x, &mut [out]);
    }
}

/// Several weights applied to the same activations (Q/K/V, gate/up) in one pool dispatch:
/// `outs[i]` (`x.m() × ws[i].rows()`) `= x · ws[i]ᵀ`. All weights need the same activation
/// format and `cols` (e.g. Q4_1 and Q8_1, any of Q4_0/Q5_0/Q8_0 with Q8_0, Q4_K/Q6_K with Q8_K).
pub fn matmul_multi(
    pool: &KernelPool,
    ws: &[&QWeight],
    x: &QuantizedActivation,
    outs: &mut [&mut [f32]],
) {
    matmul_multi_isa(Isa::detect(), pool, ws, x, outs)
}

fn matmul_multi_isa(
    isa: Isa,
    pool: &KernelPool,
    ws: &[&QWeight],
    x: &QuantizedActivation,
    outs: &mut [&mut [f32]],
) {
    assert_eq!(
        ws.len(),
        outs.len(),
        "{} weights, {} outputs",
        ws.len(),
        outs.len()
    );
    let m = x.m();
    for (w, o) in ws.iter().zip(outs.iter()) {
        w.check(x);
        assert_eq!(
            o.len(),
            m * w.rows,
            "out length {} != {m}×{}",
            o.len(),
            w.rows
        );
    }
    // Work in 32-element weight blocks (the same unit for every format).
    let total_blocks: usize = ws.iter().map(|w| w.rows * (w.cols / QK) * m).sum();
    if total_blocks == 0 {
        return;
    }
    // Chunks: multiples of MV_R rows of one weight, about total / want blocks each.
    let want = if pool.n_threads() == 1 {
        1
    } else {
        (pool.n_threads() * CHUNKS_PER_THREAD)
            .min(total_blocks.div_ceil(MIN_CHUNK_BLOCKS))
            .max(1)
    };
    let target = total_blocks.div_ceil(want);
    // (weight index, first row, chunk rows) per weight; chunk i of weight k is i - first[k].
    let mut plan: [(usize, usize); 8] = [(0, 0); 8];
    let mut plan_vec = Vec::new();
    let plan: &mut [(usize, usize)] = if ws.len() <= 8 {
        &mut plan[..ws.len()]
    } else {
        plan_vec.resize(ws.len(), (0, 0));
        &mut plan_vec
    };
    let mut n_chunks = 0;
    for (k, w) in ws.iter().enumerate() {
        let per_row = (w.cols / QK * m).max(1);
        let chunk_rows = target
            .div_ceil(per_row)
            .next_multiple_of(PACK_ROWS)
            .max(PACK_ROWS);
        plan[k] = (n_chunks, chunk_rows);
        n_chunks += w.rows.div_ceil(chunk_rows);
    }
    let plan = &*plan;
    let ptrs: Vec<SendPtr> = outs.iter_mut().map(|o| SendPtr(o.as_mut_ptr())).collect();
    let ptrs = &ptrs;
    pool.run(n_chunks, move |i| {
        let k = plan.partition_point(|&(first, _)| first <= i) - 1;
        let (first, chunk_rows) = plan[k];
        let w = ws[k];
        let r0 = (i - first) * chunk_rows;
        let r1 = (r0 + chunk_rows).min(w.rows);
        // SAFETY: chunks write disjoint row ranges of each output; outputs outlive `run`;
        // shapes checked above; `isa` detected (or scalar).
        unsafe { w.rows_dyn(isa, x, r0..r1, ptrs[k].0.add(r0), w.rows) }
    });
}

#[cfg(test)]
mod tests;
