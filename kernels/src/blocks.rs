//! GGML block layouts (byte-compatible with GGUF / ggml `block_*` structs) and the portable
//! scalar reference code: weight quantizers (ggml `quantize_row_*_ref`), dequantizers,
//! activation quantizers and dot products.

use half::f16;

/// Elements per block of the legacy formats (Q4_0, Q4_1, Q5_0, Q8_0, Q8_1).
pub const QK: usize = 32;
/// Elements per super-block of the k-quants (Q4_K, Q6_K, Q8_K).
pub const QK_K: usize = 256;

/// ggml `block_q4_0`: `x = d * (q - 8)`, q in 0..16. Element j in the low nibble of `qs[j]`,
/// element j+16 in the high nibble.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BlockQ4_0 {
    pub d: f16,
    pub qs: [u8; QK / 2],
}

/// ggml `block_q4_1`: `x = d * q + m`, q in 0..16, nibble order as Q4_0.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BlockQ4_1 {
    pub d: f16,
    pub m: f16,
    pub qs: [u8; QK / 2],
}

/// ggml `block_q5_0`: `x = d * (q - 16)`, q in 0..32: low 4 bits as Q4_0, bit 4 of element j in
/// bit j of the little-endian u32 `qh`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BlockQ5_0 {
    pub d: f16,
    pub qh: [u8; 4],
    pub qs: [u8; QK / 2],
}

/// ggml `block_q8_0`: `x = d * q` (weights, and the activation format for Q4_0/Q5_0/Q8_0).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BlockQ8_0 {
    pub d: f16,
    pub qs: [i8; QK],
}

/// ggml `block_q8_1`: `x = d * q`, `s = d * sum(q)` (activation format for Q4_1).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BlockQ8_1 {
    pub d: f16,
    pub s: f16,
    pub qs: [i8; QK],
}

/// ggml `block_q4_K`: 8 sub-blocks of 32, `x = d * sc[j] * q - dmin * m[j]`, q in 0..16.
/// The 6-bit `sc[j]`, `m[j]` are packed in `scales` (see [`q4_k_scales_mins`]); each 64
/// elements share 32 bytes of `qs`: element l in the low nibble of byte l, element l+32 in
/// its high nibble.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BlockQ4K {
    pub d: f16,
    pub dmin: f16,
    pub scales: [u8; 12],
    pub qs: [u8; QK_K / 2],
}

/// ggml `block_q6_K`: 16 sub-blocks of 16, `x = d * scales[j] * (q - 32)`, q in 0..64. Each
/// 128 elements use 64 bytes of `ql` (low 4 bits: elements l, l+32 in the low nibbles of
/// `ql[l]`, `ql[l+32]`, elements l+64, l+96 in their high nibbles) and 32 bytes of `qh`
/// (bits 2k..2k+2 of `qh[l]` are the high 2 bits of element l + 32k).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BlockQ6K {
    pub ql: [u8; QK_K / 2],
    pub qh: [u8; QK_K / 4],
    pub scales: [i8; QK_K / 16],
    pub d: f16,
}

/// ggml `block_q8_K`: `x = d * q` with the sums of each 16 quants (activation format of the
/// k-quants: the sums carry the Q4_K minimums and the Q6_K offset of 32).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BlockQ8K {
    pub d: f32,
    pub qs: [i8; QK_K],
    pub bsums: [i16; QK_K / 16],
}

const _: () = assert!(std::mem::size_of::<BlockQ4_0>() == 18);
const _: () = assert!(std::mem::size_of::<BlockQ4_1>() == 20);
const _: () = assert!(std::mem::size_of::<BlockQ5_0>() == 22);
const _: () = assert!(std::mem::size_of::<BlockQ8_0>() == 34);
const _: () = assert!(std::mem::size_of::<BlockQ8_1>() == 36);
const _: () = assert!(std::mem::size_of::<BlockQ4K>() == 144);
const _: () = assert!(std::mem::size_of::<BlockQ6K>() == 210);
const _: () = assert!(std::mem::size_of::<BlockQ8K>() == 292);

impl Default for BlockQ8_0 {
    fn default() -> Self {
        Self {
            d: f16::ZERO,
            qs: [0; QK],
        }
    }
}
impl Default for BlockQ8K {
    fn default() -> Self {
        Self {
            d: 0.0,
            qs: [0; QK_K],
            bsums: [0; QK_K / 16],
        }
    }
}
impl Default for BlockQ8_1 {
    fn default() -> Self {
        Self {
            d: f16::ZERO,
            s: f16::ZERO,
            qs: [0; QK],
        }
    }
}

/// Block `b` of eight weight rows, interleaved for the x86 kernels: one 32-byte vector holds
/// four consecutive elements of each of the eight rows, so a byte dot product with four
/// activation bytes broadcast leaves row i's sum in i32 lane i, with no horizontal sums.
///
/// Q4_1 ([`NibblesX8`]): `qs[16g + j]`: low nibble = element `4g + j % 4` of row `j / 4`, high
/// nibble = the same element of row `4 + j / 4`. The scales and minimums stay f16, so the
/// copy is no larger than the GGUF rows (20 bytes per row and block; the decode streams it).
#[derive(Clone, Copy, Debug)]
#[repr(C)]
pub struct NibblesX8 {
    pub d: [f16; 8],
    pub m: [f16; 8],
    pub qs: [u8; 128],
}

/// Q5_0 and Q8_0 rows interleaved as [`NibblesX8`], one byte per element:
/// `qs[32g + 4i + k]` = element `4g + k` of row `i`, Q5_0's unsigned 5-bit value (the weight is
/// `d · (q − 16)`) or Q8_0's signed byte. The scales stay f16, so the copy is no larger than
/// the GGUF rows (34 bytes per row and block for both; the decode streams it).
#[derive(Clone, Copy, Debug)]
#[repr(C)]
pub struct BytesX8 {
    pub d: [f16; 8],
    pub qs: [u8; 256],
}

/// `q(i, e)` = element e's stored value in row i, over the 32 elements of eight rows, in the
/// interleaved order of [`BytesX8`] (and, two rows to a byte, of [`NibblesX8`]).
fn interleave(q: impl Fn(usize, usize) -> u8) -> [u8; 256] {
    std::array::from_fn(|at| {
        let (g, j) = (at / 32, at % 32);
        q(j / 4, 4 * g + j % 4)
    })
}

/// The 4-bit (or 5-bit with `qh`) value of element e of a 32-element block.
fn nibble(qs: &[u8; QK / 2], e: usize) -> u8 {
    if e < QK / 2 {
        qs[e] & 0x0F
    } else {
        qs[e - QK / 2] >> 4
    }
}

impl NibblesX8 {
    /// Block `b` of eight Q4_1 rows (`rows[i]` = row i's blocks).
    pub fn pack_q4_1(rows: [&[BlockQ4_1]; 8], b: usize) -> Self {
        let bytes = interleave(|i, e| nibble(&rows[i][b].qs, e));
        // Rows 0..4 of a group of four elements (16 bytes) in the low nibbles, rows 4..8 high.
        let qs = std::array::from_fn(|at| {
            let (g, j) = (at / 16, at % 16);
            bytes[32 * g + j] | (bytes[32 * g + 16 + j] << 4)
        });
        Self {
            d: std::array::from_fn(|i| rows[i][b].d),
            m: std::array::from_fn(|i| rows[i][b].m),
            qs,
        }
    }
}

impl BytesX8 {
    /// Block `b` of eight Q5_0 rows: the 5-bit values, unsigned.
    pub fn pack_q5_0(rows: [&[BlockQ5_0]; 8], b: usize) -> Self {
        Self {
            d: std::array::from_fn(|i| rows[i][b].d),
            qs: interleave(|i, e| {
                let blk = &rows[i][b];
                nibble(&blk.qs, e) | ((((u32::from_le_bytes(blk.qh) >> e) & 1) as u8) << 4)
            }),
        }
    }

    /// Block `b` of eight Q8_0 rows: the signed bytes as they are.
    pub fn pack_q8_0(rows: [&[BlockQ8_0]; 8], b: usize) -> Self {
        Self {
            d: std::array::from_fn(|i| rows[i][b].d),
            qs: interleave(|i, e| rows[i][b].qs[e] as u8),
        }
    }
}

/// Marker for plain-old-data block types: every bit pattern is valid. Weight blocks have
/// alignment 2 (GGUF bytes are cast to them); `BlockQ8K` (activations only) has 4.
///
/// # Safety
/// Implementors must be `repr(C)` structs of `f16`/`f32`/`u8`/`i8`/`i16` fields without
/// padding.
pub unsafe trait Pod: Copy + Send + Sync + 'static {}
unsafe impl Pod for BlockQ4_0 {}
unsafe impl Pod for BlockQ4_1 {}
unsafe impl Pod for BlockQ5_0 {}
unsafe impl Pod for BlockQ8_0 {}
unsafe impl Pod for BlockQ8_1 {}
unsafe impl Pod for BlockQ4K {}
unsafe impl Pod for BlockQ6K {}
unsafe impl Pod for BlockQ8K {}
unsafe impl Pod for NibblesX8 {}
unsafe impl Pod for BytesX8 {}

/// 32-element activation blocks: the scale `d`, and `s` (= d * sum(q)) where the format has
/// it, else 0.
pub trait ActBlock: Pod {
    fn d(&self) -> f32;
    fn s(&self) -> f32;
}
impl ActBlock for BlockQ8_0 {
    fn d(&self) -> f32 {
        self.d.to_f32()
    }
    fn s(&self) -> f32 {
        0.0
    }
}
impl ActBlock for BlockQ8_1 {
    fn d(&self) -> f32 {
        self.d.to_f32()
    }
    fn s(&self) -> f32 {
        self.s.to_f32()
    }
}

/// Reinterpret a byte slice as blocks. Panics unless the length is a multiple of the block size
/// and the pointer is 2-byte aligned.
pub fn cast_blocks<T: Pod>(bytes: &[u8]) -> &[T] {
    let sz = std::mem::size_of::<T>();
    assert_eq!(
        bytes.len() % sz,
        0,
        "byte length {} not a multiple of {sz}",
        bytes.len()
    );
    assert_eq!(
        bytes.as_ptr() as usize % std::mem::align_of::<T>(),
        0,
        "misaligned blocks"
    );
    // SAFETY: T is Pod (all bit patterns valid), length and alignment checked.
    unsafe { std::slice::from_raw_parts(bytes.as_ptr() as *const T, bytes.len() / sz) }
}

/// View blocks as bytes.
pub fn blocks_as_bytes<T: Pod>(blocks: &[T]) -> &[u8] {
    // SAFETY: Pod types have no padding.
    unsafe {
        std::slice::from_raw_parts(blocks.as_ptr() as *const u8, std::mem::size_of_val(blocks))
    }
}

// ---------------------------------------------------------------------------------------------
// Weight quantizers (ggml quantize_row_*_ref), used for tests, benches and requantization.
// ---------------------------------------------------------------------------------------------

pub fn quantize_row_q4_0(xs: &[f32], ys: &mut [BlockQ4_0]) {
    assert_eq!(xs.len(), ys.len() * QK);
    for (x, y) in xs.chunks_exact(QK).zip(ys.iter_mut()) {
        let (mut amax, mut max) = (0f32, 0f32);
        for &v in x {
            if amax < v.abs() {
                amax = v.abs();
                max = v;
            }
        }
        let d = max / -8.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        y.d = f16::from_f32(d);
        for j in 0..QK / 2 {
            let x0 = x[j] * id;
            let x1 = x[j + QK / 2] * id;
            let q0 = ((x0 + 8.5) as i8).min(15) as u8;
            let q1 = ((x1 + 8.5) as i8).min(15) as u8;
            y.qs[j] = q0 | (q1 << 4);
        }
    }
}

pub fn quantize_row_q4_1(xs: &[f32], ys: &mut [BlockQ4_1]) {
    assert_eq!(xs.len(), ys.len() * QK);
    for (x, y) in xs.chunks_exact(QK).zip(ys.iter_mut()) {
        let (mut min, mut max) = (f32::MAX, f32::MIN);
        for &v in x {
            min = min.min(v);
            max = max.max(v);
        }
        let d = (max - min) / 15.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        y.d = f16::from_f32(d);
        y.m = f16::from_f32(min);
        for j in 0..QK / 2 {
            let x0 = (x[j] - min) * id;
            let x1 = (x[j + QK / 2] - min) * id;
            let q0 = ((x0 + 0.5) as i8).min(15) as u8;
            let q1 = ((x1 + 0.5) as i8).min(15) as u8;
            y.qs[j] = q0 | (q1 << 4);
        }
    }
}

pub fn quantize_row_q5_0(xs: &[f32], ys: &mut [BlockQ5_0]) {
    assert_eq!(xs.len(), ys.len() * QK);
    for (x, y) in xs.chunks_exact(QK).zip(ys.iter_mut()) {
        let (mut amax, mut max) = (0f32, 0f32);
        for &v in x {
            if amax < v.abs() {
                amax = v.abs();
                max = v;
            }
        }
        let d = max / -16.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        y.d = f16::from_f32(d);
        let mut qh = 0u32;
        for j in 0..QK / 2 {
            let x0 = x[j] * id;
            let x1 = x[j + QK / 2] * id;
            let q0 = ((x0 + 16.5) as i8).min(31) as u8;
            let q1 = ((x1 + 16.5) as i8).min(31) as u8;
            y.qs[j] = (q0 & 0x0F) | ((q1 & 0x0F) << 4);
            qh |= ((q0 as u32 & 0x10) >> 4) << j;
            qh |= ((q1 as u32 & 0x10) >> 4) << (j + QK / 2);
        }
        y.qh = qh.to_le_bytes();
    }
}

/// ggml `quantize_row_q8_0_ref` (weights: `roundf`, ties away from zero).
pub fn quantize_row_q8_0_ref(xs: &[f32], ys: &mut [BlockQ8_0]) {
    assert_eq!(xs.len(), ys.len() * QK);
    for (x, y) in xs.chunks_exact(QK).zip(ys.iter_mut()) {
        let amax = x.iter().fold(0f32, |a, v| a.max(v.abs()));
        let d = amax / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        y.d = f16::from_f32(d);
        for (q, &v) in y.qs.iter_mut().zip(x) {
            *q = (v * id).round() as i8;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Activation quantizers, scalar. Bit-identical to the AVX2 versions (which follow ggml's x86
// quantize_row_q8_0 / q8_1: id = 127/amax, round half to even).
// ---------------------------------------------------------------------------------------------

#[inline]
fn q8_block_scalar(x: &[f32], qs: &mut [i8; QK]) -> (f32, i32) {
    let amax = x.iter().fold(0f32, |a, v| a.max(v.abs()));
    let d = amax / 127.0;
    let id = if amax != 0.0 { 127.0 / amax } else { 0.0 };
    let mut sum = 0i32;
    for (q, &v) in qs.iter_mut().zip(x) {
        let r = (v * id).round_ties_even() as i32;
        *q = r as i8;
        sum += r;
    }
    (d, sum)
}

pub fn quantize_row_q8_0_scalar(xs: &[f32], ys: &mut [BlockQ8_0]) {
    assert_eq!(xs.len(), ys.len() * QK);
    for (x, y) in xs.chunks_exact(QK).zip(ys.iter_mut()) {
        let (d, _) = q8_block_scalar(x, &mut y.qs);
        y.d = f16::from_f32(d);
    }
}

pub fn quantize_row_q8_1_scalar(xs: &[f32], ys: &mut [BlockQ8_1]) {
    assert_eq!(xs.len(), ys.len() * QK);
    for (x, y) in xs.chunks_exact(QK).zip(ys.iter_mut()) {
        let (d, sum) = q8_block_scalar(x, &mut y.qs);
        y.d = f16::from_f32(d);
        y.s = f16::from_f32(d * sum as f32);
    }
}

/// ggml `nearest_int`: round half to even through the f32 mantissa (|v| <= 2²²), without the
/// libm call `round_ties_even` becomes on baseline x86-64, and vectorizable.
#[inline]
fn nearest_int(v: f32) -> i32 {
    ((v + 12582912.0).to_bits() & 0x007f_ffff) as i32 - 0x0040_0000
}

/// ggml `quantize_row_q8_K_ref`: `iscale = -127 / max` with `max` the (signed) value of
/// largest magnitude, `q = min(127, nearest_int(iscale * x))`, `d = 1 / iscale`, and the
/// sums of each 16 quants. (ggml uses this scalar code on x86 too.) An all-zero block gets
/// `d = 0` and zero quants and sums.
pub fn quantize_row_q8_k(xs: &[f32], ys: &mut [BlockQ8K]) {
    assert_eq!(xs.len(), ys.len() * QK_K);
    for (x, y) in xs.chunks_exact(QK_K).zip(ys.iter_mut()) {
        let (mut amax, mut max) = (0f32, 0f32);
        for &v in x {
            if v.abs() > amax {
                amax = v.abs();
                max = v;
            }
        }
        if amax == 0.0 {
            *y = BlockQ8K::default();
            continue;
        }
        let iscale = -127.0 / max;
        for (q, &v) in y.qs.iter_mut().zip(x) {
            *q = nearest_int(iscale * v).min(127) as i8;
        }
        for (s, q) in y.bsums.iter_mut().zip(y.qs.chunks_exact(16)) {
            *s = q.iter().map(|&q| q as i16).sum();
        }
        y.d = 1.0 / iscale;
    }
}

// ---------------------------------------------------------------------------------------------
// Dequantizers.
// ---------------------------------------------------------------------------------------------

pub fn dequantize_row_q4_0(xs: &[BlockQ4_0], ys: &mut [f32]) {
    assert_eq!(ys.len(), xs.len() * QK);
    for (b, y) in xs.iter().zip(ys.chunks_exact_mut(QK)) {
        let d = b.d.to_f32();
        for j in 0..QK / 2 {
            y[j] = ((b.qs[j] & 0x0F) as i32 - 8) as f32 * d;
            y[j + QK / 2] = ((b.qs[j] >> 4) as i32 - 8) as f32 * d;
        }
    }
}

pub fn dequantize_row_q4_1(xs: &[BlockQ4_1], ys: &mut [f32]) {
    assert_eq!(ys.len(), xs.len() * QK);
    for (b, y) in xs.iter().zip(ys.chunks_exact_mut(QK)) {
        let (d, m) = (b.d.to_f32(), b.m.to_f32());
        for j in 0..QK / 2 {
            y[j] = (b.qs[j] & 0x0F) as f32 * d + m;
            y[j + QK / 2] = (b.qs[j] >> 4) as f32 * d + m;
        }
    }
}

pub fn dequantize_row_q5_0(xs: &[BlockQ5_0], ys: &mut [f32]) {
    assert_eq!(ys.len(), xs.len() * QK);
    for (b, y) in xs.iter().zip(ys.chunks_exact_mut(QK)) {
        let d = b.d.to_f32();
        let qh = u32::from_le_bytes(b.qh);
        for j in 0..QK / 2 {
            let h0 = ((qh >> j) << 4) & 0x10;
            let h1 = (qh >> (j + 12)) & 0x10;
            y[j] = (((b.qs[j] & 0x0F) as u32 | h0) as i32 - 16) as f32 * d;
            y[j + QK / 2] = (((b.qs[j] >> 4) as u32 | h1) as i32 - 16) as f32 * d;
        }
    }
}

pub fn dequantize_row_q8_0(xs: &[BlockQ8_0], ys: &mut [f32]) {
    assert_eq!(ys.len(), xs.len() * QK);
    for (b, y) in xs.iter().zip(ys.chunks_exact_mut(QK)) {
        let d = b.d.to_f32();
        for (o, &q) in y.iter_mut().zip(&b.qs) {
            *o = q as f32 * d;
        }
    }
}

/// The 8 six-bit scales and 8 six-bit minimums of a Q4_K block, `[sc0..sc7, m0..m7]` (ggml's
/// `utmp` shuffle, equal to `get_scale_min_k4(j)` for j < 8): bytes 0..4 hold sc0..3 and
/// their top 2 bits the high bits of sc4..7; bytes 4..8 likewise m0..3 and the high bits of
/// m4..7; bytes 8..12 hold the low 4 bits of sc4..7 (low nibble) and m4..7 (high nibble).
#[inline]
pub fn q4_k_scales_mins(scales: &[u8; 12]) -> [u8; 16] {
    const KMASK1: u32 = 0x3f3f3f3f;
    const KMASK2: u32 = 0x0f0f0f0f;
    const KMASK3: u32 = 0x03030303;
    let w = |i: usize| u32::from_le_bytes([scales[i], scales[i + 1], scales[i + 2], scales[i + 3]]);
    let (u0, u1, u2) = (w(0), w(4), w(8));
    let sc_lo = u0 & KMASK1;
    let sc_hi = (u2 & KMASK2) | (((u0 >> 6) & KMASK3) << 4);
    let m_lo = u1 & KMASK1;
    let m_hi = ((u2 >> 4) & KMASK2) | (((u1 >> 6) & KMASK3) << 4);
    let mut out = [0u8; 16];
    for (o, u) in out.chunks_exact_mut(4).zip([sc_lo, sc_hi, m_lo, m_hi]) {
        o.copy_from_slice(&u.to_le_bytes());
    }
    out
}

/// Q6_K quant `i` (0..256) of a block, in 0..64.
#[inline]
fn q6_k_quant(b: &BlockQ6K, i: usize) -> i32 {
    let (half, l) = (i / 128, i % 128);
    let (k, l) = (l / 32, l % 32);
    let lo = (b.ql[half * 64 + (k & 1) * 32 + l] >> (4 * (k >> 1))) & 0x0F;
    let hi = (b.qh[half * 32 + l] >> (2 * k)) & 3;
    (lo | (hi << 4)) as i32
}

pub fn dequantize_row_q4_k(xs: &[BlockQ4K], ys: &mut [f32]) {
    assert_eq!(ys.len(), xs.len() * QK_K);
    for (b, y) in xs.iter().zip(ys.chunks_exact_mut(QK_K)) {
        let (d, dmin) = (b.d.to_f32(), b.dmin.to_f32());
        let sm = q4_k_scales_mins(&b.scales);
        for (j, y) in y.chunks_exact_mut(32).enumerate() {
            let (d1, m1) = (d * sm[j] as f32, dmin * sm[8 + j] as f32);
            let q = &b.qs[(j / 2) * 32..][..32];
            for (o, &q) in y.iter_mut().zip(q) {
                *o = d1 * ((q >> (4 * (j & 1))) & 0x0F) as f32 - m1;
            }
        }
    }
}

pub fn dequantize_row_q6_k(xs: &[BlockQ6K], ys: &mut [f32]) {
    assert_eq!(ys.len(), xs.len() * QK_K);
    for (b, y) in xs.iter().zip(ys.chunks_exact_mut(QK_K)) {
        let d = b.d.to_f32();
        for (i, o) in y.iter_mut().enumerate() {
            *o = d * b.scales[i / 16] as f32 * (q6_k_quant(b, i) - 32) as f32;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Scalar dot products (ggml ggml_vec_dot_*_generic).
// ---------------------------------------------------------------------------------------------

pub fn vec_dot_q4_0_q8_0_scalar(x: &[BlockQ4_0], y: &[BlockQ8_0]) -> f32 {
    assert_eq!(x.len(), y.len());
    let mut sumf = 0f32;
    for (a, b) in x.iter().zip(y) {
        let mut sumi = 0i32;
        for j in 0..QK / 2 {
            let v0 = (a.qs[j] & 0x0F) as i32 - 8;
            let v1 = (a.qs[j] >> 4) as i32 - 8;
            sumi += v0 * b.qs[j] as i32 + v1 * b.qs[j + QK / 2] as i32;
        }
        sumf += sumi as f32 * (a.d.to_f32() * b.d.to_f32());
    }
    sumf
}

pub fn vec_dot_q4_1_q8_1_scalar(x: &[BlockQ4_1], y: &[BlockQ8_1]) -> f32 {
    assert_eq!(x.len(), y.len());
    let mut sumf = 0f32;
    for (a, b) in x.iter().zip(y) {
        let mut sumi = 0i32;
        for j in 0..QK / 2 {
            let v0 = (a.qs[j] & 0x0F) as i32;
            let v1 = (a.qs[j] >> 4) as i32;
            sumi += v0 * b.qs[j] as i32 + v1 * b.qs[j + QK / 2] as i32;
        }
        sumf += sumi as f32 * (a.d.to_f32() * b.d.to_f32()) + a.m.to_f32() * b.s.to_f32();
    }
    sumf
}

pub fn vec_dot_q5_0_q8_0_scalar(x: &[BlockQ5_0], y: &[BlockQ8_0]) -> f32 {
    assert_eq!(x.len(), y.len());
    let mut sumf = 0f32;
    for (a, b) in x.iter().zip(y) {
        let qh = u32::from_le_bytes(a.qh);
        let mut sumi = 0i32;
        for j in 0..QK / 2 {
            let h0 = ((qh >> j) << 4) & 0x10;
            let h1 = (qh >> (j + 12)) & 0x10;
            let v0 = ((a.qs[j] & 0x0F) as u32 | h0) as i32 - 16;
            let v1 = ((a.qs[j] >> 4) as u32 | h1) as i32 - 16;
            sumi += v0 * b.qs[j] as i32 + v1 * b.qs[j + QK / 2] as i32;
        }
        sumf += sumi as f32 * (a.d.to_f32() * b.d.to_f32());
    }
    sumf
}

pub fn vec_dot_q8_0_q8_0_scalar(x: &[BlockQ8_0], y: &[BlockQ8_0]) -> f32 {
    assert_eq!(x.len(), y.len());
    let mut sumf = 0f32;
    for (a, b) in x.iter().zip(y) {
        let sumi: i32 =
            a.qs.iter()
                .zip(&b.qs)
                .map(|(&p, &q)| p as i32 * q as i32)
                .sum();
        sumf += sumi as f32 * (a.d.to_f32() * b.d.to_f32());
    }
    sumf
}

/// ggml `ggml_vec_dot_q4_K_q8_K_generic`: exact integer sums per block, `d·dy·Σ sc·q·q8 −
/// dmin·dy·Σ m·bsums`.
pub fn vec_dot_q4_k_q8_k_scalar(x: &[BlockQ4K], y: &[BlockQ8K]) -> f32 {
    assert_eq!(x.len(), y.len());
    let mut sumf = 0f32;
    for (a, b) in x.iter().zip(y) {
        let sm = q4_k_scales_mins(&a.scales);
        let mut sumi = 0i32;
        for (j, (&sc, q8)) in sm[..8].iter().zip(b.qs.chunks_exact(32)).enumerate() {
            let q = &a.qs[(j / 2) * 32..][..32];
            let s: i32 = q
                .iter()
                .zip(q8)
                .map(|(&q, &y)| ((q >> (4 * (j & 1))) & 0x0F) as i32 * y as i32)
                .sum();
            sumi += sc as i32 * s;
        }
        let mins: i32 = (0..QK_K / 16)
            .map(|g| sm[8 + g / 2] as i32 * b.bsums[g] as i32)
            .sum();
        sumf += a.d.to_f32() * b.d * sumi as f32 - a.dmin.to_f32() * b.d * mins as f32;
    }
    sumf
}

/// ggml `ggml_vec_dot_q6_K_q8_K_generic`: exact integer sum per block, `d·dy·Σ sc·(q−32)·q8`.
pub fn vec_dot_q6_k_q8_k_scalar(x: &[BlockQ6K], y: &[BlockQ8K]) -> f32 {
    assert_eq!(x.len(), y.len());
    let mut sumf = 0f32;
    for (a, b) in x.iter().zip(y) {
        let mut sumi = 0i32;
        for g in 0..QK_K / 16 {
            let s: i32 = (g * 16..(g + 1) * 16)
                .map(|i| (q6_k_quant(a, i) - 32) * b.qs[i] as i32)
                .sum();
            sumi += a.scales[g] as i32 * s;
        }
        sumf += a.d.to_f32() * b.d * sumi as f32;
    }
    sumf
}
