//! GGML block layouts (byte-compatible with GGUF / ggml `block_*` structs) and the portable
//! scalar reference code: weight quantizers (ggml `quantize_row_*_ref`), dequantizers,
//! activation quantizers and dot products.

use half::f16;

/// Elements per block for every format handled here.
pub const QK: usize = 32;

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

const _: () = assert!(std::mem::size_of::<BlockQ4_0>() == 18);
const _: () = assert!(std::mem::size_of::<BlockQ4_1>() == 20);
const _: () = assert!(std::mem::size_of::<BlockQ5_0>() == 22);
const _: () = assert!(std::mem::size_of::<BlockQ8_0>() == 34);
const _: () = assert!(std::mem::size_of::<BlockQ8_1>() == 36);

impl Default for BlockQ8_0 {
    fn default() -> Self {
        Self {
            d: f16::ZERO,
            qs: [0; QK],
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

/// Marker for plain-old-data block types: every bit pattern is valid, alignment <= 2.
///
/// # Safety
/// Implementors must be `repr(C)` structs of `f16`/`u8`/`i8` fields without padding.
pub unsafe trait Pod: Copy + Send + Sync + 'static {}
unsafe impl Pod for BlockQ4_0 {}
unsafe impl Pod for BlockQ4_1 {}
unsafe impl Pod for BlockQ5_0 {}
unsafe impl Pod for BlockQ8_0 {}
unsafe impl Pod for BlockQ8_1 {}

/// Activation blocks: `s` (= d * sum(q)) where the format has it, else 0.
pub trait ActBlock: Pod {
    fn s(&self) -> f32;
}
impl ActBlock for BlockQ8_0 {
    fn s(&self) -> f32 {
        0.0
    }
}
impl ActBlock for BlockQ8_1 {
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
