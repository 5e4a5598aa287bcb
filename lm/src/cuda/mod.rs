//! Our CUDA kernels (`kernels.cu`, compiled to PTX by `build.rs`) and the glue that launches
//! them on candle tensors.
//!
//! The kernels take raw device addresses so that a decode step can be captured once as a CUDA
//! graph and replayed: everything that changes between steps (positions, which sequence's cache
//! a row writes to) is read from device buffers, never baked into launch parameters.
//!
//! Public here: the dream loop's vocabulary-sized work — [`softmax_stats`] (log Z, entropy, KL to
//! the previous step) and an exact [`topk`] — so a latent step copies only `k` numbers to the host.

use crate::error::{LmError, Result};
use candle_core::cuda_backend::cudarc::driver::{DevicePtr, LaunchConfig, PushKernelArg};
use candle_core::op::BackpropOp;
use candle_core::{CudaDevice, CudaStorage, DType, Device, Shape, Storage, Tensor};

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/kernels.ptx"));
const MODULE: &str = "mm_lm_kernels";

/// Floats of shared memory the attention kernel may use for a row's query and scores (48 KiB,
/// the limit without opt-in): a cache holds at most this many positions minus the head size.
pub const ATTENTION_SCRATCH_FLOATS: usize = 12_288;

pub(crate) fn cuda_device(device: &Device) -> Result<&CudaDevice> {
    match device {
        Device::Cuda(d) => Ok(d),
        other => Err(LmError::Layout(format!(
            "a CUDA kernel was asked to run on {other:?}"
        ))),
    }
}

/// Device address of a contiguous CUDA tensor's first element.
pub(crate) fn addr(t: &Tensor) -> Result<u64> {
    if !t.is_contiguous() {
        return Err(LmError::Layout(
            "CUDA kernels take contiguous tensors".into(),
        ));
    }
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cuda(cs) = &*storage else {
        return Err(LmError::Layout("CUDA kernels take CUDA tensors".into()));
    };
    let stream = cs.device.cuda_stream();
    let base = match t.dtype() {
        DType::BF16 => cs.as_cuda_slice::<half::bf16>()?.device_ptr(&stream).0,
        DType::F16 => cs.as_cuda_slice::<half::f16>()?.device_ptr(&stream).0,
        DType::F32 => cs.as_cuda_slice::<f32>()?.device_ptr(&stream).0,
        DType::U32 => cs.as_cuda_slice::<u32>()?.device_ptr(&stream).0,
        DType::I64 => cs.as_cuda_slice::<i64>()?.device_ptr(&stream).0,
        other => {
            return Err(LmError::Layout(format!(
                "CUDA kernels do not take {other:?} tensors"
            )))
        }
    };
    Ok(base + (layout.start_offset() * t.dtype().size_in_bytes()) as u64)
}

/// A fresh, uninitialised CUDA tensor (every kernel here writes all of its output).
pub(crate) fn empty(shape: impl Into<Shape>, dtype: DType, dev: &CudaDevice) -> Result<Tensor> {
    let shape = shape.into();
    let n = shape.elem_count();
    // SAFETY: the memory is fully written by the kernel this tensor is made for before any read.
    let storage = unsafe {
        match dtype {
            DType::BF16 => CudaStorage::wrap_cuda_slice(dev.alloc::<half::bf16>(n)?, dev.clone()),
            DType::F32 => CudaStorage::wrap_cuda_slice(dev.alloc::<f32>(n)?, dev.clone()),
            DType::U32 => CudaStorage::wrap_cuda_slice(dev.alloc::<u32>(n)?, dev.clone()),
            other => {
                return Err(LmError::Layout(format!(
                    "no uninitialised {other:?} buffers"
                )))
            }
        }
    };
    Ok(Tensor::from_storage(
        Storage::Cuda(storage),
        shape,
        BackpropOp::none(),
        false,
    ))
}

/// One kernel argument.
#[derive(Clone, Copy)]
pub(crate) enum Arg {
    Ptr(u64),
    I32(i32),
    F32(f32),
}

/// The address of `t`, or a null pointer.
pub(crate) fn opt_ptr(t: Option<&Tensor>) -> Result<Arg> {
    Ok(Arg::Ptr(t.map(addr).transpose()?.unwrap_or(0)))
}

pub(crate) fn launch(
    dev: &CudaDevice,
    kernel: &str,
    grid: (u32, u32),
    block: u32,
    shared_bytes: u32,
    args: &[Arg],
) -> Result<()> {
    let func = dev.get_or_load_custom_func(kernel, MODULE, PTX)?;
    let mut b = func.builder();
    for a in args {
        match a {
            Arg::Ptr(p) => b.arg(p),
            Arg::I32(v) => b.arg(v),
            Arg::F32(v) => b.arg(v),
        };
    }
    let cfg = LaunchConfig {
        grid_dim: (grid.0, grid.1, 1),
        block_dim: (block, 1, 1),
        shared_mem_bytes: shared_bytes,
    };
    // SAFETY: every kernel in kernels.cu is launched from this module with the argument list
    // its signature declares; buffers are sized by the callers below.
    unsafe { b.launch(cfg) }.map_err(candle_core::Error::wrap)?;
    Ok(())
}

fn dims2(t: &Tensor, what: &str) -> Result<(usize, usize)> {
    t.dims2()
        .map_err(|_| LmError::Layout(format!("{what} must be 2-D, got {:?}", t.dims())))
}

/// Per row of f32 `logits [rows, n]` at temperature scale `inv_t`: `[rows, 3]` holding
/// `log Z`, the entropy, and `KL(p ‖ p_prev)` against `prev_logp` (0 without one). Also
/// returns this step's log-probabilities `[rows, n]` when `keep_logp`, for the next step's KL.
pub fn softmax_stats(
    logits: &Tensor,
    inv_t: f32,
    prev_logp: Option<&Tensor>,
    keep_logp: bool,
) -> Result<(Tensor, Option<Tensor>)> {
    let dev = cuda_device(logits.device())?;
    let logits = logits.to_dtype(DType::F32)?.contiguous()?;
    let (rows, n) = dims2(&logits, "logits")?;
    if let Some(p) = prev_logp {
        if p.dims() != logits.dims() {
            return Err(LmError::Layout(format!(
                "previous log-probabilities {:?} do not match logits {:?}",
                p.dims(),
                logits.dims()
            )));
        }
    }
    let stats = empty((rows, 3), DType::F32, dev)?;
    let logp = keep_logp
        .then(|| empty((rows, n), DType::F32, dev))
        .transpose()?;
    launch(
        dev,
        "softmax_stats",
        (rows as u32, 1),
        1024,
        0,
        &[
            Arg::Ptr(addr(&logits)?),
            Arg::I32(n as i32),
            Arg::F32(inv_t),
            opt_ptr(prev_logp)?,
            opt_ptr(logp.as_ref())?,
            Arg::Ptr(addr(&stats)?),
        ],
    )?;
    Ok((stats, logp))
}

/// The largest `k` (1..=1024) values of each row of `x [rows, n]` (f32) and their column
/// indices (u32), by value descending, ties by index ascending: exactly what a CPU sort gives.
pub fn topk(x: &Tensor, k: usize) -> Result<(Tensor, Tensor)> {
    let dev = cuda_device(x.device())?;
    let x = x.to_dtype(DType::F32)?.contiguous()?;
    let (rows, n) = dims2(&x, "top-k input")?;
    if k == 0 || k > 1024 || k > n {
        return Err(LmError::Layout(format!(
            "top-k needs 1 <= k <= min(1024, {n}), got {k}"
        )));
    }
    let vals = empty((rows, k), DType::F32, dev)?;
    let idx = empty((rows, k), DType::U32, dev)?;
    launch(
        dev,
        "topk",
        (rows as u32, 1),
        1024,
        0,
        &[
            Arg::Ptr(addr(&x)?),
            Arg::I32(n as i32),
            Arg::I32(k as i32),
            Arg::Ptr(addr(&vals)?),
            Arg::Ptr(addr(&idx)?),
        ],
    )?;
    Ok((vals, idx))
}

/// Copies `src` into the start of the contiguous CUDA tensor `dst`, on the device's stream.
pub(crate) fn upload<T: candle_core::cuda_backend::cudarc::driver::DeviceRepr>(
    dst: &Tensor,
    src: &[T],
) -> Result<()> {
    let dev = cuda_device(dst.device())?;
    if std::mem::size_of_val(src) > dst.elem_count() * dst.dtype().size_in_bytes() {
        return Err(LmError::Layout("upload larger than its buffer".into()));
    }
    let stream = dev.cuda_stream();
    // SAFETY: `dst` is a live allocation at least as large as `src` (checked above); the copy
    // is ordered on the stream every kernel of this crate runs on.
    unsafe {
        candle_core::cuda_backend::cudarc::driver::result::memcpy_htod_async(
            addr(dst)?,
            src,
            stream.cu_stream(),
        )
    }
    .map_err(candle_core::Error::wrap)?;
    Ok(())
}

/// Device-to-device copy bandwidth of `device` (bytes read + written per second), measured
/// with the driver's copy on two 1 GiB buffers: the yardstick of the bandwidth bound.
pub fn copy_bandwidth(device: &Device) -> Result<f64> {
    let dev = cuda_device(device)?;
    let n = 1usize << 30;
    let src = Tensor::zeros(n / 4, DType::F32, device)?;
    let dst = Tensor::zeros(n / 4, DType::F32, device)?;
    let (s, d) = (addr(&src)?, addr(&dst)?);
    let stream = dev.cuda_stream();
    let copy = || {
        // SAFETY: both buffers are live, n bytes long, and only touched on this stream.
        unsafe {
            candle_core::cuda_backend::cudarc::driver::result::memcpy_dtod_async(
                d,
                s,
                n,
                stream.cu_stream(),
            )
        }
        .map_err(candle_core::Error::wrap)
    };
    copy()?;
    stream.synchronize().map_err(candle_core::Error::wrap)?;
    let reps = 10;
    let t = std::time::Instant::now();
    for _ in 0..reps {
        copy()?;
    }
    stream.synchronize().map_err(candle_core::Error::wrap)?;
    Ok((2 * n * reps) as f64 / t.elapsed().as_secs_f64())
}

#[cfg(test)]
mod tests;
