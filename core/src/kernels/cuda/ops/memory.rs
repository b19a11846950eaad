//! Moving and reshaping device data: host ↔ device copies, strided copies and broadcasts, dtype casts, writing one tensor into a slice of another.

use super::*;

/// Shape and strides of a view, for the strided copy kernel (rank ≤ 6).
#[repr(C)]
#[derive(Clone, Copy)]
pub(super) struct Strided6 {
    shape: [i64; 6],
    strides: [i64; 6],
    rank: i32,
}

// SAFETY: plain-old-data with the C layout of `struct Strided6` in elementwise.cu.
unsafe impl DeviceRepr for Strided6 {}

/// Copies a tensor between the host and a device (or between devices, through the host).
pub fn to_device(t: &Tensor, to: Device) -> Result<Tensor> {
    match (t.device(), to) {
        (a, b) if a == b => Ok(t.clone()),
        (Device::Cpu, Device::Cuda(o)) => {
            let d = dev(o)?;
            let c = t.contiguous();
            let buf = match c.dtype() {
                DType::F32 => d.upload(c.data::<f32>()?)?,
                DType::BF16 => d.upload(&c.data::<half::bf16>()?.iter().map(|x| x.to_bits()).collect::<Vec<u16>>())?,
                DType::F64 => d.upload(&c.to_vec::<f32>()?)?,
            };
            let dt = if c.dtype() == DType::BF16 { DType::BF16 } else { DType::F32 };
            Ok(wrap(buf, dt, c.shape()))
        }
        (Device::Cuda(_), Device::Cpu) => {
            let c = contiguous(t)?;
            let d = dev_of(&c)?;
            match c.dtype() {
                DType::BF16 => {
                    Tensor::from_vec(d.download::<u16>(ptr(&c)?, c.numel())?.into_iter().map(half::bf16::from_bits).collect(), c.shape())
                }
                _ => Tensor::from_vec(d.download::<f32>(ptr(&c)?, c.numel())?, c.shape()),
            }
        }
        (Device::Cuda(_), Device::Cuda(_)) => to_device(&to_device(t, Device::Cpu)?, to),
        (Device::Cpu, Device::Cpu) => unreachable!("handled by the first arm"),
    }
}

/// A packed copy, or the tensor itself when already packed.
pub fn contiguous(t: &Tensor) -> Result<Tensor> {
    if t.is_contiguous() {
        return Ok(t.clone());
    }
    f32_only(t, "contiguous")?;
    strided(t, t.shape(), t.strides())
}

/// Packs the view (`shape`, `strides` at `t`'s offset) of `t`'s storage; a stride of 0
/// broadcasts. Dims of size 1 are dropped and adjacent mergeable dims merged so any rank fits
/// the kernel's six.
pub(super) fn strided(t: &Tensor, shape: &[usize], strides: &[usize]) -> Result<Tensor> {
    let d = dev_of(t)?;
    let dims = merge_dims(shape, strides);
    // A contiguous innermost dim of some length goes row by row (no division per element).
    let rows = match dims.last() {
        Some(&(cols, 1)) if cols >= 16 && dims.len() > 1 => Some(cols),
        _ => None,
    };
    let outer = if rows.is_some() { &dims[..dims.len() - 1] } else { &dims[..] };
    if outer.len() > 6 {
        return Err(Error::shape("contiguous", format!("a view of rank {} that does not merge to ≤ 6 dims on CUDA", dims.len())));
    }
    let mut s = Strided6 { shape: [1; 6], strides: [0; 6], rank: outer.len() as i32 };
    for (k, (n, st)) in outer.iter().enumerate() {
        s.shape[k] = *n as i64;
        s.strides[k] = *st as i64;
    }
    let out = empty(&d, shape)?;
    let n = out.numel();
    let base = match t.storage() {
        Storage::Cuda(c) => c.ptr_at(0),
        Storage::Cpu(_) => unreachable!("dev_of checked"),
    };
    match rows {
        Some(cols) => {
            let nrows = n / cols;
            // strided_rows_f32(const float* src, float* out, i64 rows, i64 cols, i64 offset, Strided6 s)
            launch!(d, "elementwise", "strided_rows_f32", per_row(nrows); base, ptr(&out)?, nrows as i64, cols as i64, t.offset() as i64, s)?
        }
        // strided_copy_f32(const float* src, float* out, i64 n, i64 offset, Strided6 s)
        None => launch!(d, "elementwise", "strided_copy_f32", grid(n); base, ptr(&out)?, n as i64, t.offset() as i64, s)?,
    }
    Ok(out)
}

/// `b` broadcast to `shape` (packed; may share `b`'s storage when no broadcast is needed).
pub fn broadcast_to(b: &Tensor, shape: &[usize]) -> Result<Tensor> {
    if b.shape() == shape {
        return contiguous(b);
    }
    expand_copy(b, shape)
}

/// `b` broadcast to `shape` in a new buffer of its own (a GEMM output to accumulate into, so
/// it must never alias the bias it was filled from).
pub(super) fn expand_copy(b: &Tensor, shape: &[usize]) -> Result<Tensor> {
    let r = shape.len();
    let lead = r.checked_sub(b.rank()).ok_or_else(|| Error::shape("broadcast_to", format!("{:?} -> {shape:?}", b.shape())))?;
    let mut st = vec![0usize; r];
    for i in 0..b.rank() {
        let (bd, od) = (b.shape()[i], shape[lead + i]);
        if bd == od {
            st[lead + i] = b.strides()[i];
        } else if bd != 1 {
            return Err(Error::shape("broadcast_to", format!("{:?} -> {shape:?}", b.shape())));
        }
    }
    strided(b, shape, &st)
}

pub fn cast(t: &Tensor, to: DType) -> Result<Tensor> {
    if t.dtype() == to {
        return Ok(t.clone());
    }
    let d = dev_of(t)?;
    let n = t.numel();
    match (t.dtype(), to) {
        (DType::F32, DType::BF16) => {
            let c = contiguous(t)?;
            let out = wrap(d.alloc(n * 2)?, DType::BF16, t.shape());
            cast_raw(&d, ptr(&c)?, ptr(&out)?, n, true)?;
            Ok(out)
        }
        (DType::BF16, DType::F32) => {
            if !t.is_contiguous() {
                return Err(Error::shape("cast", "strided bf16 view on CUDA"));
            }
            let out = empty(&d, t.shape())?;
            // bf16_to_f32(const bf16_t* in, float* out, i64 n)
            launch!(d, "elementwise", "bf16_to_f32", grid(n); ptr(t)?, ptr(&out)?, n as i64)?;
            Ok(out)
        }
        (a, b) => Err(Error::DType { op: "cast", expected: format!("f32 <-> bf16 on CUDA, not {a} -> {b}"), got: a.to_string() }),
    }
}

/// f32 ↔ bf16 conversion of `n` elements between raw device buffers on the compute stream (or
/// the emulator).
pub fn cast_raw(d: &CudaDev, src: u64, dst: u64, n: usize, to_bf16: bool) -> Result<()> {
    if to_bf16 && src.is_multiple_of(16) && dst.is_multiple_of(8) {
        // f32_to_bf16_x4(const float* in, bf16_t* out, i64 n)
        launch!(d, "elementwise", "f32_to_bf16_x4", grid(n.div_ceil(4)); src, dst, n as i64)
    } else if to_bf16 {
        // f32_to_bf16(const float* in, bf16_t* out, i64 n)
        launch!(d, "elementwise", "f32_to_bf16", grid(n); src, dst, n as i64)
    } else {
        // bf16_to_f32(const bf16_t* in, float* out, i64 n)
        launch!(d, "elementwise", "bf16_to_f32", grid(n); src, dst, n as i64)
    }
}

/// f32 ↔ bf16 conversion of `n` elements between raw device buffers, queued on `stream` (the
/// gradient reducer's communication stream, for `comm.dtype = "bf16"`).
pub fn cast_raw_on(d: &CudaDev, stream: &cudarc::driver::CudaStream, src: u64, dst: u64, n: usize, to_bf16: bool) -> Result<()> {
    use cudarc::driver::PushKernelArg;
    let f = d.func("elementwise", if to_bf16 { "f32_to_bf16" } else { "bf16_to_f32" })?;
    let mut b = stream.launch_builder(&f);
    let ni = n as i64;
    b.arg(&src).arg(&dst).arg(&ni);
    // SAFETY: f32_to_bf16 / bf16_to_f32(const T* in, U* out, i64 n); the caller passes buffers
    // of n elements of the right types.
    unsafe { b.launch(grid(n)) }.map(|_| ()).map_err(|e| crate::tensor::cuda::derr("launching a cast", e))
}

/// Writes packed `src` into dim `dim` of the packed `out` at `start` (narrow backward, cat), in
/// their element type (f32 or bf16: a bf16 activation's gradient is bf16).
pub fn place(out: &Tensor, dim: usize, start: usize, src: &Tensor) -> Result<()> {
    let d = dev_of(out)?;
    if src.dtype() != out.dtype() {
        return Err(Error::DType { op: "place", expected: format!("{:?}", out.dtype()), got: format!("{:?}", src.dtype()) });
    }
    let src = contiguous(src)?;
    let shape = out.shape();
    let outer: usize = shape[..dim].iter().product();
    let inner: usize = shape[dim + 1..].iter().product();
    let len = src.shape()[dim];
    let es = out.dtype().size_in_bytes();
    // One strided 2-D copy: `outer` blocks of len·inner contiguous elements.
    let (o, s) = (ptr(out)?, ptr(&src)?);
    if outer == 1 {
        return d.copy(o + (start * inner * es) as u64, s, len * inner * es);
    }
    // view the destination as [outer, len·inner] with row stride shape[dim]·inner
    let dst_view = out.view_with(&[outer, len * inner], &[shape[dim] * inner, 1], out.offset() + start * inner);
    let src2 = src.reshape(&[outer, len * inner])?;
    scatter_rows(&d, &dst_view, &src2)
}

/// Copies packed `src [rows, cols]` into the strided view `dst` (row stride ≥ cols) with one
/// 2-D memcpy per row batch (a strided copy kernel with the roles of source and destination swapped
/// is not needed: rows are contiguous).
pub(super) fn scatter_rows(d: &Arc<CudaDev>, dst: &Tensor, src: &Tensor) -> Result<()> {
    let (rows, cols) = (src.shape()[0], src.shape()[1]);
    let rs = dst.strides()[0];
    let es = dst.dtype().size_in_bytes();
    let (dp, sp) = (ptr(dst)?, ptr(src)?);
    for r in 0..rows {
        d.copy(dp + (r * rs * es) as u64, sp + (r * cols * es) as u64, cols * es)?;
    }
    Ok(())
}

/// Zeros of `shape` on the device of `like`, in its dtype.
pub fn zeros_like_dev(like: &Tensor, shape: &[usize]) -> Result<Tensor> {
    zeros_as(&dev_of(like)?, shape, like.dtype())
}
