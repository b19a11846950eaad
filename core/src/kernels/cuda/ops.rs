//! Tensor-level CUDA ops: what each op in `crate::ops` calls when its inputs live on a GPU.
//! Same semantics and shapes as the CPU path, f32 compute (bf16 only as GEMM inputs, see
//! [`Prec`]); every launch goes on the device's one compute stream, so nothing here waits for
//! the GPU except the few functions that return host values (documented where they do).
//!
//! Reductions over rows or columns are GEMMs against a ones vector (cuBLAS beats a hand-written
//! column sum, and it needs no atomics), full reductions accumulate block partials in double.

use crate::error::{Error, Result};
use crate::kernels::cpu::broadcast_shape;
use crate::tensor::cuda::{dev, mat_layout, merge_dims, operand_extent, CudaDev, DevBuf, MatArg};
use crate::tensor::{DType, Device, Storage, Tensor};
use cudarc::driver::{DeviceRepr, LaunchConfig};
use std::sync::Arc;

const BLOCK: u32 = 256;

fn grid(n: usize) -> LaunchConfig {
    LaunchConfig { grid_dim: (n.div_ceil(BLOCK as usize).clamp(1, 65535) as u32, 1, 1), block_dim: (BLOCK, 1, 1), shared_mem_bytes: 0 }
}
fn per_row(rows: usize) -> LaunchConfig {
    LaunchConfig { grid_dim: (rows.clamp(1, 65535) as u32, 1, 1), block_dim: (BLOCK, 1, 1), shared_mem_bytes: 0 }
}

/// Launches `file.name` on `dev`'s stream with the listed arguments (evaluated first, kept alive
/// until the launch is queued).
macro_rules! launch {
    ($dev:expr, $file:literal, $name:expr, $cfg:expr; $($arg:expr),* $(,)?) => {{
        let d: &CudaDev = &$dev;
        let mut params: Vec<*mut std::ffi::c_void> = Vec::new();
        $( let a = $arg; params.push(&a as *const _ as *mut std::ffi::c_void); )*
        // SAFETY: each call site passes arguments matching the kernel's parameter list in the
        // .cu source (noted beside it; checked against the PTX by core/tests/nvrtc.rs), and
        // pointers to buffers sized for its indexing. The values live until the launch is queued.
        unsafe { d.launch_raw($file, $name, $cfg, &mut params) }
    }};
}

/// Shape and strides of a view, for the strided copy kernel (rank ≤ 6).
#[repr(C)]
#[derive(Clone, Copy)]
struct Strided6 {
    shape: [i64; 6],
    strides: [i64; 6],
    rank: i32,
}
// SAFETY: plain-old-data with the C layout of `struct Strided6` in elementwise.cu.
unsafe impl DeviceRepr for Strided6 {}

#[repr(C)]
#[derive(Clone, Copy)]
pub struct ConvGeom {
    pub c: i64,
    pub h: i64,
    pub w: i64,
    pub kh: i64,
    pub kw: i64,
    pub stride: i64,
    pub pad: i64,
    pub ho: i64,
    pub wo: i64,
}
// SAFETY: plain-old-data with the C layout of `struct ConvGeom` in conv.cu.
unsafe impl DeviceRepr for ConvGeom {}

/// GEMM input precision (see [`crate::tensor::Precision`]).
use crate::tensor::Precision as Prec;

pub fn is_cuda(t: &Tensor) -> bool {
    matches!(t.device(), Device::Cuda(_))
}

pub fn dev_of(t: &Tensor) -> Result<Arc<CudaDev>> {
    match t.storage() {
        Storage::Cuda(c) => Ok(c.dev().clone()),
        Storage::Cpu(_) => Err(Error::Device("expected a CUDA tensor, got a CPU one (mixing devices in one op)".into())),
    }
}

/// Device address of the tensor's first element.
pub fn ptr(t: &Tensor) -> Result<u64> {
    match t.storage() {
        Storage::Cuda(c) => Ok(c.ptr_at(t.offset())),
        Storage::Cpu(_) => Err(Error::Device("expected a CUDA tensor, got a CPU one (mixing devices in one op)".into())),
    }
}

fn f32_only(t: &Tensor, op: &'static str) -> Result<()> {
    if t.dtype() != DType::F32 {
        return Err(Error::DType { op, expected: "f32 on CUDA".into(), got: t.dtype().to_string() });
    }
    Ok(())
}

fn wrap(buf: DevBuf, dtype: DType, shape: &[usize]) -> Tensor {
    let len = shape.iter().product();
    Tensor::from_storage(Storage::Cuda(crate::tensor::cuda::CudaStorage { buf, dtype, len }), shape)
}

/// A new uninitialised f32 tensor on `d`.
pub(crate) fn empty(d: &Arc<CudaDev>, shape: &[usize]) -> Result<Tensor> {
    let n: usize = shape.iter().product();
    Ok(wrap(d.alloc(n * 4)?, DType::F32, shape))
}

pub(crate) fn zeros(d: &Arc<CudaDev>, shape: &[usize]) -> Result<Tensor> {
    let n: usize = shape.iter().product();
    Ok(wrap(d.alloc_zeros(n * 4)?, DType::F32, shape))
}

pub(crate) fn fill_raw(d: &CudaDev, p: u64, n: usize, v: f32) -> Result<()> {
    launch!(d, "elementwise", "fill_f32", grid(n); p, n as i64, v)
}

pub fn full(d: &Arc<CudaDev>, shape: &[usize], v: f32) -> Result<Tensor> {
    let t = empty(d, shape)?;
    fill_raw(d, ptr(&t)?, t.numel(), v)?;
    Ok(t)
}

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
fn strided(t: &Tensor, shape: &[usize], strides: &[usize]) -> Result<Tensor> {
    let d = dev_of(t)?;
    let dims = merge_dims(shape, strides);
    if dims.len() > 6 {
        return Err(Error::shape("contiguous", format!("a view of rank {} that does not merge to ≤ 6 dims on CUDA", dims.len())));
    }
    let mut s = Strided6 { shape: [1; 6], strides: [0; 6], rank: dims.len() as i32 };
    for (k, (n, st)) in dims.iter().enumerate() {
        s.shape[k] = *n as i64;
        s.strides[k] = *st as i64;
    }
    let out = empty(&d, shape)?;
    let n = out.numel();
    let base = match t.storage() {
        Storage::Cuda(c) => c.ptr_at(0),
        Storage::Cpu(_) => unreachable!("dev_of checked"),
    };
    // strided_copy_f32(const float* src, float* out, i64 n, i64 offset, Strided6 s)
    launch!(d, "elementwise", "strided_copy_f32", grid(n); base, ptr(&out)?, n as i64, t.offset() as i64, s)?;
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
fn expand_copy(b: &Tensor, shape: &[usize]) -> Result<Tensor> {
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
            // f32_to_bf16(const float* in, bf16_t* out, i64 n)
            launch!(d, "elementwise", "f32_to_bf16", grid(n); ptr(&c)?, ptr(&out)?, n as i64)?;
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
    if to_bf16 {
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

/// One operand of a broadcasting binary op: packed data and the period with which it repeats
/// in the output (its own size when it is a suffix of the output shape).
fn operand(x: &Tensor, out: &[usize]) -> Result<(Tensor, usize)> {
    let n: usize = out.iter().product();
    let stripped: Vec<usize> = x.shape().iter().copied().skip_while(|&d| d == 1).collect();
    if stripped.len() <= out.len() && out[out.len() - stripped.len()..] == stripped[..] {
        let c = contiguous(x)?;
        return Ok((c, x.numel().max(1)));
    }
    Ok((broadcast_to(x, out)?, n))
}

/// `a op b` with broadcasting; `name` is one of add_f32, sub_f32, mul_f32, div_f32.
pub fn binary(name: &'static str, a: &Tensor, b: &Tensor) -> Result<Tensor> {
    f32_only(a, name)?;
    f32_only(b, name)?;
    let d = dev_of(a)?;
    let shape = broadcast_shape(a.shape(), b.shape())?;
    let n: usize = shape.iter().product();
    let (pa, na) = operand(a, &shape)?;
    let (pb, nb) = operand(b, &shape)?;
    let out = empty(&d, &shape)?;
    // name(const float* a, const float* b, float* out, i64 n, i64 na, i64 nb)
    launch!(d, "elementwise", name, grid(n); ptr(&pa)?, ptr(&pb)?, ptr(&out)?, n as i64, na as i64, nb as i64)?;
    Ok(out)
}

/// A pointwise map; `name` is one of exp_f32, log_f32, tanh_f32, relu_f32, square_f32.
pub fn unary(name: &'static str, x: &Tensor) -> Result<Tensor> {
    f32_only(x, name)?;
    let d = dev_of(x)?;
    let c = contiguous(x)?;
    let out = empty(&d, x.shape())?;
    let n = out.numel();
    // name(const float* in, float* out, i64 n)
    launch!(d, "elementwise", name, grid(n); ptr(&c)?, ptr(&out)?, n as i64)?;
    Ok(out)
}

/// Dropout with mask `dr` (see `ops::dropout`); `out` may be `x` itself (in place).
pub(crate) fn dropout_raw(d: &CudaDev, x: u64, out: u64, n: usize, dr: crate::ops::dropout::Dropout) -> Result<()> {
    // dropout_f32(const float* in, float* out, i64 n, i64 key, i64 threshold, float scale); scale() is f32
    launch!(d, "elementwise", "dropout_f32", grid(n); x, out, n as i64, dr.key as i64, dr.threshold() as i64, dr.scale())
}

pub fn dropout(x: &Tensor, dr: crate::ops::dropout::Dropout) -> Result<Tensor> {
    f32_only(x, "dropout")?;
    let d = dev_of(x)?;
    let c = contiguous(x)?;
    let out = empty(&d, x.shape())?;
    dropout_raw(&d, ptr(&c)?, ptr(&out)?, out.numel(), dr)?;
    Ok(out)
}

pub fn affine(x: &Tensor, mul: f64, add: f64) -> Result<Tensor> {
    f32_only(x, "affine")?;
    let d = dev_of(x)?;
    let c = contiguous(x)?;
    let out = empty(&d, x.shape())?;
    let n = out.numel();
    // affine_f32(const float* in, float* out, i64 n, float mul, float add)
    launch!(d, "elementwise", "affine_f32", grid(n); ptr(&c)?, ptr(&out)?, n as i64, mul as f32, add as f32)?;
    Ok(out)
}

/// Backward of a pointwise map from the output gradient `g` and a saved tensor `s` (the output
/// for tanh/relu, the input for square); `name` is tanh_bwd_f32, relu_bwd_f32 or square_bwd_f32.
pub fn map_bwd(name: &'static str, g: &Tensor, s: &Tensor) -> Result<Tensor> {
    let d = dev_of(g)?;
    let (g, s) = (contiguous(g)?, contiguous(s)?);
    let out = empty(&d, g.shape())?;
    let n = out.numel();
    // name(const float* g, const float* y, float* out, i64 n)
    launch!(d, "elementwise", name, grid(n); ptr(&g)?, ptr(&s)?, ptr(&out)?, n as i64)?;
    Ok(out)
}

pub fn gelu(x: &Tensor, tanh: bool) -> Result<Tensor> {
    f32_only(x, "gelu")?;
    let d = dev_of(x)?;
    let c = contiguous(x)?;
    let out = empty(&d, x.shape())?;
    let n = out.numel();
    // gelu_f32(const float* in, float* out, i64 n, int use_tanh)
    launch!(d, "elementwise", "gelu_f32", grid(n); ptr(&c)?, ptr(&out)?, n as i64, tanh as i32)?;
    Ok(out)
}

pub fn gelu_bwd(g: &Tensor, x: &Tensor, tanh: bool) -> Result<Tensor> {
    let d = dev_of(g)?;
    let (g, x) = (contiguous(g)?, contiguous(x)?);
    let out = empty(&d, g.shape())?;
    let n = out.numel();
    // gelu_bwd_f32(const float* g, const float* in, float* out, i64 n, int use_tanh)
    launch!(d, "elementwise", "gelu_bwd_f32", grid(n); ptr(&g)?, ptr(&x)?, ptr(&out)?, n as i64, tanh as i32)?;
    Ok(out)
}

/// `dst[i] += src[i]` (`add = true`) or `dst[i] = src[i]` for `n` f32 elements at raw addresses.
pub(crate) fn accumulate_raw(d: &CudaDev, dst: u64, src: &Tensor, n: usize, add: bool) -> Result<()> {
    let s = contiguous(src)?;
    if add {
        // add_assign_f32(float* acc, const float* x, i64 n)
        launch!(d, "elementwise", "add_assign_f32", grid(n); dst, ptr(&s)?, n as i64)
    } else {
        d.copy(dst, ptr(&s)?, n * 4)
    }
}

/// `x *= s` in place at a raw address.
pub(crate) fn scale_raw(d: &CudaDev, p: u64, n: usize, s: f32) -> Result<()> {
    // scale_f32(float* x, i64 n, float s)
    launch!(d, "elementwise", "scale_f32", grid(n); p, n as i64, s)
}

/// Column sums of a packed `[rows, cols]` f32 matrix at `p`, written (or added, `beta = 1`) to
/// `out` — `onesᵀ·X` as a GEMM.
pub(crate) fn sum_rows_into(d: &Arc<CudaDev>, p: u64, rows: usize, cols: usize, out: u64, beta: f32) -> Result<()> {
    let ones = d.ones(rows)?;
    d.gemm(
        1,
        cols,
        rows,
        MatArg { ptr: ones, trans: false, ld: rows, batch_stride: 0 },
        MatArg { ptr: p, trans: false, ld: cols, batch_stride: 0 },
        out,
        1,
        1.0,
        beta,
        DType::F32,
    )
}

/// Sums over `dims`, keeping them as size 1.
pub fn sum_dims(x: &Tensor, dims: &[usize]) -> Result<Tensor> {
    f32_only(x, "sum")?;
    let d = dev_of(x)?;
    let r = x.rank();
    let kept_shape: Vec<usize> = (0..r).map(|i| if dims.contains(&i) { 1 } else { x.shape()[i] }).collect();
    // Reduced dims first, kept dims last, then a column-sum GEMM over the packed result.
    let perm: Vec<usize> = (0..r).filter(|i| dims.contains(i)).chain((0..r).filter(|i| !dims.contains(i))).collect();
    let p = contiguous(&x.permute(&perm)?)?;
    let rows: usize = dims.iter().map(|&i| x.shape()[i]).product();
    let cols = x.numel() / rows.max(1);
    let out = empty(&d, &kept_shape)?;
    if rows == 0 {
        fill_raw(&d, ptr(&out)?, cols, 0.0)?;
    } else {
        sum_rows_into(&d, ptr(&p)?, rows, cols, ptr(&out)?, 0.0)?;
    }
    Ok(out)
}

/// Reduces a broadcast result `g` back to `target` (broadcast backward).
pub fn sum_to_shape(g: &Tensor, target: &[usize]) -> Result<Tensor> {
    if g.shape() == target {
        return Ok(g.clone());
    }
    let r = g.rank();
    let lead = r.checked_sub(target.len()).ok_or_else(|| Error::shape("sum_to_shape", format!("{:?} -> {target:?}", g.shape())))?;
    let dims: Vec<usize> = (0..r).filter(|&i| i < lead || (target[i - lead] == 1 && g.shape()[i] != 1)).collect();
    sum_dims(g, &dims)?.reshape(target)
}

/// Σx² over all elements, returned to the host (waits for the device).
pub fn sum_squares_host(x: &Tensor) -> Result<f64> {
    f32_only(x, "sum_squares")?;
    let d = dev_of(x)?;
    let c = contiguous(x)?;
    let acc = d.alloc_zeros(8)?;
    let n = c.numel();
    let cfg = grid(n.min(BLOCK as usize * 1024));
    // sum_squares_f32(const float* x, double* out, i64 n)
    launch!(d, "reduce", "sum_squares_f32", cfg; ptr(&c)?, acc.ptr, n as i64)?;
    Ok(d.download::<f64>(acc.ptr, 1)?[0])
}

/// A GEMM operand for the logical `[.., rows, cols]` view `t` (its last two dims), packing it
/// when cuBLAS cannot read the strides, with the batch stride `bs`. Returns the tensor that
/// owns the data.
fn operand_2d(t: &Tensor, bs: usize) -> Result<(Tensor, MatArg)> {
    let r = t.rank();
    let (rows, cols, rs, cs) = (t.shape()[r - 2], t.shape()[r - 1], t.strides()[r - 2], t.strides()[r - 1]);
    if let Some((trans, ld)) = mat_layout(rows, cols, rs, cs) {
        return Ok((t.clone(), MatArg { ptr: ptr(t)?, trans, ld, batch_stride: bs }));
    }
    let c = contiguous(t)?;
    let bs = if bs == 0 { 0 } else { rows * cols };
    Ok((c.clone(), MatArg { ptr: ptr(&c)?, trans: false, ld: cols, batch_stride: bs }))
}

/// bf16 copy of the span a GEMM operand reads (`extent` elements from its pointer, layout
/// kept), for `Prec::Bf16`.
fn to_bf16_operand(owner: &Tensor, m: MatArg, extent: usize) -> Result<(Tensor, MatArg)> {
    let d = dev_of(owner)?;
    let n = extent;
    let out = wrap(d.alloc(n * 2)?, DType::BF16, &[n]);
    launch!(d, "elementwise", "f32_to_bf16", grid(n); m.ptr, ptr(&out)?, n as i64)?;
    let p = ptr(&out)?;
    Ok((out, MatArg { ptr: p, ..m }))
}

/// Batched product `[.., m, k] @ [.., k, n]` (or `@ [k, n]`) into a new packed f32 tensor.
pub fn matmul(a: &Tensor, b: &Tensor, prec: Prec) -> Result<Tensor> {
    f32_only(a, "matmul")?;
    f32_only(b, "matmul")?;
    let d = dev_of(a)?;
    let (ra, rb) = (a.rank(), b.rank());
    if ra < 2 || rb < 2 || a.shape()[ra - 1] != b.shape()[rb - 2] || (rb > 2 && a.shape()[..ra - 2] != b.shape()[..rb - 2]) {
        return Err(Error::shape("matmul", format!("{:?} @ {:?}", a.shape(), b.shape())));
    }
    let (m, k, n) = (a.shape()[ra - 2], a.shape()[ra - 1], b.shape()[rb - 1]);
    let batch: usize = a.shape()[..ra - 2].iter().product();
    // Batch dims must collapse to one stride; otherwise pack the operand.
    let collapse = |t: &Tensor| -> Result<Tensor> {
        let r = t.rank();
        if merge_dims(&t.shape()[..r - 2], &t.strides()[..r - 2]).len() <= 1 {
            Ok(t.clone())
        } else {
            contiguous(t)
        }
    };
    let (a, b) = (collapse(a)?, collapse(b)?);
    let bs = |t: &Tensor| {
        let r = t.rank();
        merge_dims(&t.shape()[..r - 2], &t.strides()[..r - 2]).first().map(|d| d.1).unwrap_or(0)
    };
    let (ao, am) = operand_2d(&a, bs(&a))?;
    let (bo, bm) = operand_2d(&b, bs(&b))?;
    let mut shape = a.shape()[..ra - 2].to_vec();
    shape.extend([m, n]);
    let out = empty(&d, &shape)?;
    gemm_prec(&d, m, n, k, (&ao, am), (&bo, bm), ptr(&out)?, batch.max(1), 1.0, 0.0, prec)?;
    Ok(out)
}

/// One GEMM with operands given as (owner, layout), casting them to bf16 first under
/// `Prec::Bf16`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm_prec(
    d: &Arc<CudaDev>,
    m: usize,
    n: usize,
    k: usize,
    a: (&Tensor, MatArg),
    b: (&Tensor, MatArg),
    c: u64,
    batch: usize,
    alpha: f32,
    beta: f32,
    prec: Prec,
) -> Result<()> {
    match prec {
        Prec::F32 => d.gemm(m, n, k, a.1, b.1, c, batch, alpha, beta, DType::F32),
        Prec::Bf16 => {
            let (_ka, a16) = to_bf16_operand(a.0, a.1, operand_extent(m, k, &a.1, batch))?;
            let (_kb, b16) = to_bf16_operand(b.0, b.1, operand_extent(k, n, &b.1, batch))?;
            d.gemm(m, n, k, a16, b16, c, batch, alpha, beta, DType::BF16)
        }
    }
}

fn packed(t: &Tensor) -> Result<(Tensor, MatArg)> {
    let c = contiguous(t)?;
    let cols = *c.shape().last().unwrap_or(&1);
    let p = ptr(&c)?;
    Ok((c, MatArg { ptr: p, trans: false, ld: cols.max(1), batch_stride: 0 }))
}

/// `y = x2 @ wᵀ (+ b)` for packed x2 `[rows, k]`, w `[n, k]`.
pub fn linear(x2: &Tensor, w: &Tensor, b: Option<&Tensor>, out_shape: &[usize], prec: Prec) -> Result<Tensor> {
    f32_only(x2, "linear")?;
    let d = dev_of(x2)?;
    let (rows, k, n) = (x2.shape()[0], x2.shape()[1], w.shape()[0]);
    let out = match b {
        Some(b) => expand_copy(b, &[rows, n])?.reshape(out_shape)?,
        None => empty(&d, out_shape)?,
    };
    let (xo, xm) = packed(x2)?;
    // wᵀ [k, n]: a transposed view of w (no copy).
    let (wo, wm) = operand_2d(&w.transpose(0, 1)?, 0)?;
    gemm_prec(&d, rows, n, k, (&xo, xm), (&wo, wm), ptr(&out)?, 1, 1.0, if b.is_some() { 1.0 } else { 0.0 }, prec)?;
    Ok(out)
}

/// `g @ w` for g `[rows, n]`, w `[n, k]` → `out_shape` (linear's input gradient).
pub fn linear_grad_input(g2: &Tensor, w: &Tensor, out_shape: &[usize], prec: Prec) -> Result<Tensor> {
    let d = dev_of(g2)?;
    let (rows, n, k) = (g2.shape()[0], g2.shape()[1], w.shape()[1]);
    let out = empty(&d, out_shape)?;
    let (go, gm) = packed(g2)?;
    let (wo, wm) = operand_2d(w, 0)?;
    gemm_prec(&d, rows, k, n, (&go, gm), (&wo, wm), ptr(&out)?, 1, 1.0, 0.0, prec)?;
    Ok(out)
}

/// `gᵀ @ x` for g `[rows, n]`, x `[rows, k]` → `[n, k]` (linear's weight gradient).
pub fn linear_grad_weight(g2: &Tensor, x2: &Tensor, prec: Prec) -> Result<Tensor> {
    let d = dev_of(g2)?;
    let (rows, n, k) = (g2.shape()[0], g2.shape()[1], x2.shape()[1]);
    let out = empty(&d, &[n, k])?;
    let (go, _) = packed(g2)?;
    let (xo, xm) = packed(x2)?;
    // gᵀ: the packed [rows, n] read transposed (strides (1, n)).
    let gt = MatArg { ptr: ptr(&go)?, trans: true, ld: n.max(1), batch_stride: 0 };
    gemm_prec(&d, n, k, rows, (&go, gt), (&xo, xm), ptr(&out)?, 1, 1.0, 0.0, prec)?;
    Ok(out)
}

/// Column sums of `g2 [rows, n]` → `[n]` (the bias gradient).
pub fn sum_rows(g2: &Tensor) -> Result<Tensor> {
    let d = dev_of(g2)?;
    let (rows, n) = (g2.shape()[0], g2.shape()[1]);
    let g = contiguous(g2)?;
    let out = empty(&d, &[n])?;
    sum_rows_into(&d, ptr(&g)?, rows, n, ptr(&out)?, 0.0)?;
    Ok(out)
}

fn upload_ids(d: &Arc<CudaDev>, ids: &[u32]) -> Result<DevBuf> {
    d.upload(ids)
}

/// Rows `ids` of `w [vocab, dim]`.
pub fn embedding(w: &Tensor, ids: &[u32], shape: &[usize]) -> Result<Tensor> {
    let d = dev_of(w)?;
    let w = contiguous(w)?;
    let dim = w.shape()[1];
    let idb = upload_ids(&d, ids)?;
    let out = empty(&d, shape)?;
    let n = ids.len();
    // embedding_fwd_f32(const float* w, const unsigned int* ids, float* out, i64 n, i64 dim)
    launch!(d, "embedding", "embedding_fwd_f32", grid(n * dim); ptr(&w)?, idb.ptr, ptr(&out)?, n as i64, dim as i64)?;
    Ok(out)
}

pub fn embedding_bwd(g: &Tensor, ids: &[u32], vocab: usize, dim: usize) -> Result<Tensor> {
    let d = dev_of(g)?;
    let g = contiguous(g)?;
    let idb = upload_ids(&d, ids)?;
    let out = zeros(&d, &[vocab, dim])?;
    let n = ids.len();
    // embedding_bwd_f32(const float* g, const unsigned int* ids, float* gw, i64 n, i64 dim)
    launch!(d, "embedding", "embedding_bwd_f32", grid(n * dim); ptr(&g)?, idb.ptr, ptr(&out)?, n as i64, dim as i64)?;
    Ok(out)
}

/// Layer norm over the last dim of packed `x [rows, c]`: (y, mean, rstd).
pub fn layer_norm(x: &Tensor, w: Option<&Tensor>, b: Option<&Tensor>, eps: f64) -> Result<(Tensor, Tensor, Tensor)> {
    f32_only(x, "layer_norm")?;
    let d = dev_of(x)?;
    let x = contiguous(x)?;
    let c = *x.shape().last().unwrap_or(&1);
    let rows = x.numel() / c.max(1);
    let (w, b) = (w.map(contiguous).transpose()?, b.map(contiguous).transpose()?);
    let opt = |t: &Option<Tensor>| t.as_ref().map(ptr).transpose().map(|p| p.unwrap_or(0));
    let y = empty(&d, x.shape())?;
    let (mean, rstd) = (empty(&d, &[rows])?, empty(&d, &[rows])?);
    // layer_norm_fwd_f32(x, w, b, y, mean, rstd, i64 rows, i64 c, float eps)
    launch!(d, "layer_norm", "layer_norm_fwd_f32", per_row(rows);
        ptr(&x)?, opt(&w)?, opt(&b)?, ptr(&y)?, ptr(&mean)?, ptr(&rstd)?, rows as i64, c as i64, eps as f32)?;
    Ok((y, mean, rstd))
}

/// Layer norm backward: (dx, dw, db) — dw, db only when `affine`.
pub fn layer_norm_bwd(
    x: &Tensor,
    g: &Tensor,
    w: Option<&Tensor>,
    mean: &Tensor,
    rstd: &Tensor,
    want_w: bool,
    want_b: bool,
) -> Result<(Tensor, Option<Tensor>, Option<Tensor>)> {
    let d = dev_of(x)?;
    let (x, g) = (contiguous(x)?, contiguous(g)?);
    let c = *x.shape().last().unwrap_or(&1);
    let rows = x.numel() / c.max(1);
    let w = w.map(contiguous).transpose()?;
    let gx = empty(&d, x.shape())?;
    let gxhat = if want_w { Some(empty(&d, &[rows, c])?) } else { None };
    let wp = w.as_ref().map(ptr).transpose()?.unwrap_or(0);
    let gxp = gxhat.as_ref().map(ptr).transpose()?.unwrap_or(0);
    // layer_norm_bwd_f32(x, g, w, mean, rstd, gx, gxhat, i64 rows, i64 c)
    launch!(d, "layer_norm", "layer_norm_bwd_f32", per_row(rows);
        ptr(&x)?, ptr(&g)?, wp, ptr(mean)?, ptr(rstd)?, ptr(&gx)?, gxp, rows as i64, c as i64)?;
    let gw = gxhat.map(|t| sum_rows(&t)).transpose()?;
    let gb = if want_b { Some(sum_rows(&g.reshape(&[rows, c])?)?) } else { None };
    Ok((gx, gw, gb))
}

/// What the attention forward keeps for backward.
pub struct AttnSaved {
    q: Tensor,
    k: Tensor,
    v: Tensor,
    p: Tensor,
}

/// The probabilities `p` with dropout `drop` applied, as a new tensor (`None` without dropout).
fn dropped_probs(d: &Arc<CudaDev>, p: &Tensor, drop: Option<crate::ops::dropout::Dropout>) -> Result<Option<Tensor>> {
    drop.map(|dr| {
        let pd = empty(d, p.shape())?;
        dropout_raw(d, ptr(p)?, ptr(&pd)?, p.numel(), dr)?;
        Ok(pd)
    })
    .transpose()
}

/// Causal attention over packed qkv `[b, t, 3c]`: (y `[b, t, c]`, saved, max logit).
/// Returns the max logit to the host (waits for the device).
/// `drop`: dropout on the probabilities before P·V (the mask regenerated in backward).
pub fn attention(
    qkv: &Tensor,
    b: usize,
    t: usize,
    h: usize,
    dh: usize,
    prec: Prec,
    drop: Option<crate::ops::dropout::Dropout>,
) -> Result<(Tensor, AttnSaved, f64)> {
    f32_only(qkv, "causal_attention")?;
    let d = dev_of(qkv)?;
    let qkv = contiguous(qkv)?;
    let bh = b * h;
    let (q, k, v) = (empty(&d, &[bh, t, dh])?, empty(&d, &[bh, t, dh])?, empty(&d, &[bh, t, dh])?);
    let n = b * t * h * dh;
    let (bi, ti, hi, di) = (b as i64, t as i64, h as i64, dh as i64);
    // split_heads_f32(const float* qkv, float* q, float* k, float* v, i64 b, i64 t, i64 h, i64 d)
    launch!(d, "attention", "split_heads_f32", grid(n); ptr(&qkv)?, ptr(&q)?, ptr(&k)?, ptr(&v)?, bi, ti, hi, di)?;
    let p = empty(&d, &[bh, t, t])?;
    let td = t * dh;
    let row = |x: &Tensor| -> Result<MatArg> { Ok(MatArg { ptr: ptr(x)?, trans: false, ld: dh, batch_stride: td }) };
    let tr = |x: &Tensor| -> Result<MatArg> { Ok(MatArg { ptr: ptr(x)?, trans: true, ld: dh, batch_stride: td }) };
    let scale = 1.0 / (dh as f64).sqrt();
    // S = Q·Kᵀ·scale
    gemm_prec(&d, t, t, dh, (&q, row(&q)?), (&k, tr(&k)?), ptr(&p)?, bh, scale as f32, 0.0, prec)?;
    let row_max = empty(&d, &[bh * t])?;
    // causal_softmax_fwd_f32(float* s, float* row_max, i64 rows, i64 t)
    launch!(d, "attention", "causal_softmax_fwd_f32", per_row(bh * t); ptr(&p)?, ptr(&row_max)?, (bh * t) as i64, ti)?;
    let o = empty(&d, &[bh, t, dh])?;
    // P·V reads the dropped probabilities; P itself is saved for the softmax backward.
    let pd = dropped_probs(&d, &p, drop)?;
    let pv = pd.as_ref().unwrap_or(&p);
    let pm = MatArg { ptr: ptr(pv)?, trans: false, ld: t, batch_stride: t * t };
    gemm_prec(&d, t, dh, t, (pv, pm), (&v, row(&v)?), ptr(&o)?, bh, 1.0, 0.0, prec)?;
    let y = empty(&d, &[b, t, h * dh])?;
    // merge_heads_f32(const float* o, float* y, i64 b, i64 t, i64 h, i64 d)
    launch!(d, "attention", "merge_heads_f32", grid(n); ptr(&o)?, ptr(&y)?, bi, ti, hi, di)?;
    let mx = d.download::<f32>(ptr(&row_max)?, bh * t)?.into_iter().fold(f32::NEG_INFINITY, f32::max) as f64;
    Ok((y, AttnSaved { q, k, v, p }, mx))
}

pub fn attention_bwd(
    g: &Tensor,
    s: &AttnSaved,
    b: usize,
    t: usize,
    h: usize,
    dh: usize,
    prec: Prec,
    drop: Option<crate::ops::dropout::Dropout>,
) -> Result<Tensor> {
    let d = dev_of(g)?;
    let g = contiguous(g)?;
    let bh = b * h;
    let n = b * t * h * dh;
    let (bi, ti, hi, di) = (b as i64, t as i64, h as i64, dh as i64);
    let go = empty(&d, &[bh, t, dh])?;
    // unmerge_heads_f32(const float* y, float* o, i64 b, i64 t, i64 h, i64 d)
    launch!(d, "attention", "unmerge_heads_f32", grid(n); ptr(&g)?, ptr(&go)?, bi, ti, hi, di)?;
    let td = t * dh;
    let row = |x: &Tensor| -> Result<MatArg> { Ok(MatArg { ptr: ptr(x)?, trans: false, ld: dh, batch_stride: td }) };
    let tr = |x: &Tensor| -> Result<MatArg> { Ok(MatArg { ptr: ptr(x)?, trans: true, ld: dh, batch_stride: td }) };
    let sq = |x: &Tensor, trans: bool| -> Result<MatArg> { Ok(MatArg { ptr: ptr(x)?, trans, ld: t, batch_stride: t * t }) };
    // dV = Pᵀ·dO, with the dropped P forward used (regenerated from the mask's key)
    let dv = empty(&d, &[bh, t, dh])?;
    let pd = dropped_probs(&d, &s.p, drop)?;
    let pv = pd.as_ref().unwrap_or(&s.p);
    gemm_prec(&d, t, dh, t, (pv, sq(pv, true)?), (&go, row(&go)?), ptr(&dv)?, bh, 1.0, 0.0, prec)?;
    std::mem::drop(pd);
    // dP = dO·Vᵀ (through the dropout mask), then dS = P ⊙ (dP − rowsum(dP ⊙ P)) · scale in place
    let dp = empty(&d, &[bh, t, t])?;
    gemm_prec(&d, t, t, dh, (&go, row(&go)?), (&s.v, tr(&s.v)?), ptr(&dp)?, bh, 1.0, 0.0, prec)?;
    if let Some(dr) = drop {
        dropout_raw(&d, ptr(&dp)?, ptr(&dp)?, bh * t * t, dr)?;
    }
    let scale = (1.0 / (dh as f64).sqrt()) as f32;
    // causal_softmax_bwd_f32(const float* p, float* dp, i64 rows, i64 t, float scale)
    launch!(d, "attention", "causal_softmax_bwd_f32", per_row(bh * t); ptr(&s.p)?, ptr(&dp)?, (bh * t) as i64, ti, scale)?;
    // dQ = dS·K, dK = dSᵀ·Q
    let (dq, dk) = (empty(&d, &[bh, t, dh])?, empty(&d, &[bh, t, dh])?);
    gemm_prec(&d, t, dh, t, (&dp, sq(&dp, false)?), (&s.k, row(&s.k)?), ptr(&dq)?, bh, 1.0, 0.0, prec)?;
    gemm_prec(&d, t, dh, t, (&dp, sq(&dp, true)?), (&s.q, row(&s.q)?), ptr(&dk)?, bh, 1.0, 0.0, prec)?;
    let gx = empty(&d, &[b, t, 3 * h * dh])?;
    // join_heads_f32(const float* dq, const float* dk, const float* dv, float* dqkv, i64 b, i64 t, i64 h, i64 d)
    launch!(d, "attention", "join_heads_f32", grid(n); ptr(&dq)?, ptr(&dk)?, ptr(&dv)?, ptr(&gx)?, bi, ti, hi, di)?;
    Ok(gx)
}

/// Host-side results of [`cross_entropy`] (means over rows).
pub struct CeStats {
    pub loss: f64,
    pub log_z_mean: f64,
    pub logit_mean: f64,
    pub z_loss: f64,
    pub accuracy: f64,
}

/// Cross-entropy rows over packed logits `[rows, v]`: lse per row and the targets on the
/// device, and the means on the host. Waits for the device.
pub fn cross_entropy(x: &Tensor, targets: &[u32], z: f64) -> Result<(Tensor, DevBuf, CeStats)> {
    f32_only(x, "cross_entropy")?;
    let d = dev_of(x)?;
    let x = contiguous(x)?;
    let v = *x.shape().last().unwrap_or(&1);
    let rows = targets.len();
    let tg = upload_ids(&d, targets)?;
    let (loss, lse, rsum, correct) = (empty(&d, &[rows])?, empty(&d, &[rows])?, empty(&d, &[rows])?, empty(&d, &[rows])?);
    // xent_fwd_f32(x, targets, loss, lse, row_sum, correct, i64 rows, i64 v, float z)
    launch!(d, "cross_entropy", "xent_fwd_f32", per_row(rows);
        ptr(&x)?, tg.ptr, ptr(&loss)?, ptr(&lse)?, ptr(&rsum)?, ptr(&correct)?, rows as i64, v as i64, z as f32)?;
    let get = |t: &Tensor| -> Result<Vec<f64>> { Ok(d.download::<f32>(ptr(t)?, rows)?.into_iter().map(f64::from).collect()) };
    let mean = |xs: &[f64]| xs.iter().sum::<f64>() / rows as f64;
    let lse_h = get(&lse)?;
    let st = CeStats {
        loss: mean(&get(&loss)?),
        log_z_mean: mean(&lse_h),
        logit_mean: mean(&get(&rsum)?) / v as f64,
        z_loss: z * lse_h.iter().map(|l| l * l).sum::<f64>() / rows as f64,
        accuracy: mean(&get(&correct)?),
    };
    Ok((lse, tg, st))
}

pub fn cross_entropy_bwd(x: &Tensor, targets: &DevBuf, lse: &Tensor, z: f64, scale: f64) -> Result<Tensor> {
    let d = dev_of(x)?;
    let x = contiguous(x)?;
    let v = *x.shape().last().unwrap_or(&1);
    let rows = lse.numel();
    let gx = empty(&d, x.shape())?;
    // xent_bwd_f32(x, targets, lse, gx, i64 rows, i64 v, float z, float scale)
    launch!(d, "cross_entropy", "xent_bwd_f32", per_row(rows);
        ptr(&x)?, targets.ptr, ptr(lse)?, ptr(&gx)?, rows as i64, v as i64, z as f32, scale as f32)?;
    Ok(gx)
}

/// Writes packed `src` into dim `dim` of the packed `out` at `start` (narrow backward, cat).
pub fn place(out: &Tensor, dim: usize, start: usize, src: &Tensor) -> Result<()> {
    let d = dev_of(out)?;
    let src = contiguous(src)?;
    let shape = out.shape();
    let outer: usize = shape[..dim].iter().product();
    let inner: usize = shape[dim + 1..].iter().product();
    let len = src.shape()[dim];
    // One strided 2-D copy: `outer` blocks of len·inner contiguous floats.
    let (o, s) = (ptr(out)?, ptr(&src)?);
    if outer == 1 {
        return d.copy(o + (start * inner * 4) as u64, s, len * inner * 4);
    }
    // view the destination as [outer, len·inner] with row stride shape[dim]·inner
    let dst_view = out.view_with(&[outer, len * inner], &[shape[dim] * inner, 1], out.offset() + start * inner);
    let src2 = src.reshape(&[outer, len * inner])?;
    scatter_rows(&d, &dst_view, &src2)
}

/// Copies packed `src [rows, cols]` into the strided view `dst` (row stride ≥ cols) with one
/// 2-D memcpy per row batch (a strided copy kernel with the roles of source and destination swapped
/// is not needed: rows are contiguous).
fn scatter_rows(d: &Arc<CudaDev>, dst: &Tensor, src: &Tensor) -> Result<()> {
    let (rows, cols) = (src.shape()[0], src.shape()[1]);
    let rs = dst.strides()[0];
    let (dp, sp) = (ptr(dst)?, ptr(src)?);
    for r in 0..rows {
        d.copy(dp + (r * rs * 4) as u64, sp + (r * cols * 4) as u64, cols * 4)?;
    }
    Ok(())
}

/// Zeros of `shape` on the device of `like`.
pub fn zeros_like_dev(like: &Tensor, shape: &[usize]) -> Result<Tensor> {
    zeros(&dev_of(like)?, shape)
}

/// Fused AdamW over flat buffers (same arithmetic as the CPU path).
#[allow(clippy::too_many_arguments)]
pub fn adamw(
    p: &Tensor,
    g: &Tensor,
    m: &Tensor,
    v: &Tensor,
    mask: &Tensor,
    b1: f32,
    b2: f32,
    eps: f32,
    step: f32,
    inv_sqrt_bc2: f32,
    decay: f32,
) -> Result<()> {
    let d = dev_of(p)?;
    let n = p.numel();
    // adamw_f32(p, g, m, v, mask, i64 n, b1, b2, eps, step, inv_sqrt_bc2, decay)
    launch!(d, "optim", "adamw_f32", grid(n);
        ptr(p)?, ptr(g)?, ptr(m)?, ptr(v)?, ptr(mask)?, n as i64, b1, b2, eps, step, inv_sqrt_bc2, decay)
}

/// Fused SGD (momentum, Nesterov, decay) over flat buffers.
#[allow(clippy::too_many_arguments)]
pub fn sgd(
    p: &Tensor,
    g: &Tensor,
    buf: &Tensor,
    mask: &Tensor,
    lr: f32,
    wd: f32,
    mu: f32,
    damp: f32,
    nesterov: bool,
    first: bool,
) -> Result<()> {
    let d = dev_of(p)?;
    let n = p.numel();
    // sgd_f32(p, g, buf, mask, i64 n, lr, wd, mu, damp, int nesterov, int first)
    launch!(d, "optim", "sgd_f32", grid(n);
        ptr(p)?, ptr(g)?, ptr(buf)?, ptr(mask)?, n as i64, lr, wd, mu, damp, nesterov as i32, first as i32)
}

/// Per-channel batch statistics of packed `x [n, c, s]`: (mean, biased var).
pub fn bn_stats(x: &Tensor, n: usize, c: usize, s: usize) -> Result<(Tensor, Tensor)> {
    let d = dev_of(x)?;
    let x = contiguous(x)?;
    let (mean, var) = (empty(&d, &[c])?, empty(&d, &[c])?);
    // bn_stats_f32(const float* x, float* mean, float* var, i64 n, i64 c, i64 s)
    launch!(d, "batch_norm", "bn_stats_f32", per_row(c); ptr(&x)?, ptr(&mean)?, ptr(&var)?, n as i64, c as i64, s as i64)?;
    Ok((mean, var))
}

/// `rm ← (1−mo)·rm + mo·mean`, `rv ← (1−mo)·rv + mo·var·unbias` in place on the device.
pub fn bn_running(rm: &Tensor, rv: &Tensor, mean: &Tensor, var: &Tensor, mo: f64, unbias: f64) -> Result<()> {
    let d = dev_of(mean)?;
    let c = mean.numel();
    // bn_running_f32(float* rm, float* rv, const float* mean, const float* var, i64 c, float mo, float unbias)
    launch!(d, "batch_norm", "bn_running_f32", grid(c); ptr(rm)?, ptr(rv)?, ptr(mean)?, ptr(var)?, c as i64, mo as f32, unbias as f32)
}

/// `1/sqrt(var + eps)`.
pub fn rsqrt_eps(var: &Tensor, eps: f64) -> Result<Tensor> {
    let d = dev_of(var)?;
    let var = contiguous(var)?;
    let out = empty(&d, var.shape())?;
    let c = var.numel();
    // rsqrt_eps_f32(const float* var, float* rstd, i64 c, float eps)
    launch!(d, "batch_norm", "rsqrt_eps_f32", grid(c); ptr(&var)?, ptr(&out)?, c as i64, eps as f32)?;
    Ok(out)
}

#[allow(clippy::too_many_arguments)]
pub fn bn_apply(x: &Tensor, mean: &Tensor, rstd: &Tensor, w: &Tensor, b: &Tensor, n: usize, c: usize, s: usize) -> Result<Tensor> {
    let d = dev_of(x)?;
    let (x, w, b) = (contiguous(x)?, contiguous(w)?, contiguous(b)?);
    let y = empty(&d, x.shape())?;
    // bn_apply_f32(x, mean, rstd, w, b, y, i64 n, i64 c, i64 s)
    launch!(d, "batch_norm", "bn_apply_f32", grid(n * c * s);
        ptr(&x)?, ptr(mean)?, ptr(rstd)?, ptr(&w)?, ptr(&b)?, ptr(&y)?, n as i64, c as i64, s as i64)?;
    Ok(y)
}

/// Batch norm backward: (dx, dw, db).
#[allow(clippy::too_many_arguments)]
pub fn bn_bwd(
    x: &Tensor,
    g: &Tensor,
    mean: &Tensor,
    rstd: &Tensor,
    w: &Tensor,
    n: usize,
    c: usize,
    s: usize,
    train: bool,
) -> Result<(Tensor, Tensor, Tensor)> {
    let d = dev_of(x)?;
    let (x, g, w) = (contiguous(x)?, contiguous(g)?, contiguous(w)?);
    let (gw, gb) = (empty(&d, &[c])?, empty(&d, &[c])?);
    // bn_grad_params_f32(x, g, mean, rstd, gw, gb, i64 n, i64 c, i64 s)
    launch!(d, "batch_norm", "bn_grad_params_f32", per_row(c);
        ptr(&x)?, ptr(&g)?, ptr(mean)?, ptr(rstd)?, ptr(&gw)?, ptr(&gb)?, n as i64, c as i64, s as i64)?;
    let gx = empty(&d, x.shape())?;
    // bn_bwd_input_f32(x, g, mean, rstd, w, gw, gb, gx, i64 n, i64 c, i64 s, int train)
    launch!(d, "batch_norm", "bn_bwd_input_f32", grid(n * c * s);
        ptr(&x)?, ptr(&g)?, ptr(mean)?, ptr(rstd)?, ptr(&w)?, ptr(&gw)?, ptr(&gb)?, ptr(&gx)?, n as i64, c as i64, s as i64, train as i32)?;
    Ok((gx, gw, gb))
}

/// 2-D convolution forward over packed x `[n, c, h, w]` and w `[o, c·kh·kw]` (+ bias `[o]`).
pub fn conv2d(x: &Tensor, w: &Tensor, b: Option<&Tensor>, g: ConvGeom, n: usize, o: usize) -> Result<Tensor> {
    let d = dev_of(x)?;
    let (x, w) = (contiguous(x)?, contiguous(w)?);
    let (ckk, hw) = ((g.c * g.kh * g.kw) as usize, (g.ho * g.wo) as usize);
    let out = match b {
        Some(b) => expand_copy(&b.reshape(&[1, o, 1])?, &[n, o, hw])?.reshape(&[n, o, g.ho as usize, g.wo as usize])?,
        None => empty(&d, &[n, o, g.ho as usize, g.wo as usize])?,
    };
    let cols = empty(&d, &[ckk, hw])?;
    let beta = if b.is_some() { 1.0 } else { 0.0 };
    for i in 0..n {
        im2col(&x, i, g, &cols)?;
        let wm = MatArg { ptr: ptr(&w)?, trans: false, ld: ckk, batch_stride: 0 };
        let cm = MatArg { ptr: ptr(&cols)?, trans: false, ld: hw, batch_stride: 0 };
        d.gemm(o, hw, ckk, wm, cm, ptr(&out)? + (i * o * hw * 4) as u64, 1, 1.0, beta, DType::F32)?;
    }
    Ok(out)
}

/// Convolution backward: (gx, gw `[o, c·kh·kw]`, gb).
pub fn conv2d_bwd(
    x: &Tensor,
    w: &Tensor,
    gout: &Tensor,
    g: ConvGeom,
    n: usize,
    o: usize,
    want_b: bool,
) -> Result<(Tensor, Tensor, Option<Tensor>)> {
    let d = dev_of(x)?;
    let (x, w, gout) = (contiguous(x)?, contiguous(w)?, contiguous(gout)?);
    let (ckk, hw) = ((g.c * g.kh * g.kw) as usize, (g.ho * g.wo) as usize);
    let gx = zeros(&d, x.shape())?;
    let gw = empty(&d, &[o, ckk])?;
    let (cols, gcols) = (empty(&d, &[ckk, hw])?, empty(&d, &[ckk, hw])?);
    for i in 0..n {
        let gi = MatArg { ptr: ptr(&gout)? + (i * o * hw * 4) as u64, trans: false, ld: hw, batch_stride: 0 };
        im2col(&x, i, g, &cols)?;
        // gW += g_i [o, hw] @ colsᵀ [hw, ckk]
        let ct = MatArg { ptr: ptr(&cols)?, trans: true, ld: hw, batch_stride: 0 };
        d.gemm(o, ckk, hw, gi, ct, ptr(&gw)?, 1, 1.0, if i > 0 { 1.0 } else { 0.0 }, DType::F32)?;
        // gcols = Wᵀ [ckk, o] @ g_i [o, hw]
        let wt = MatArg { ptr: ptr(&w)?, trans: true, ld: ckk, batch_stride: 0 };
        d.gemm(ckk, hw, o, wt, gi, ptr(&gcols)?, 1, 1.0, 0.0, DType::F32)?;
        col2im(&gcols, i, g, &gx)?;
    }
    let gb = if want_b { Some(sum_dims(&gout.reshape(&[n, o, hw])?, &[0, 2])?.reshape(&[o])?) } else { None };
    Ok((gx, gw, gb))
}

/// im2col of sample `i` of packed x `[n, c, h, w]` into `cols [c·kh·kw, ho·wo]`.
pub(crate) fn im2col(x: &Tensor, i: usize, g: ConvGeom, cols: &Tensor) -> Result<()> {
    let d = dev_of(x)?;
    let per = (g.c * g.h * g.w) as usize;
    let n = (g.c * g.kh * g.kw * g.ho * g.wo) as usize;
    // im2col_f32(const float* x, float* cols, ConvGeom g)
    launch!(d, "conv", "im2col_f32", grid(n); ptr(x)? + (i * per * 4) as u64, ptr(cols)?, g)
}

/// col2im (adds) of `cols` into sample `i` of packed gx `[n, c, h, w]`.
pub(crate) fn col2im(cols: &Tensor, i: usize, g: ConvGeom, gx: &Tensor) -> Result<()> {
    let d = dev_of(cols)?;
    let per = (g.c * g.h * g.w) as usize;
    // col2im_f32(const float* cols, float* x, ConvGeom g)
    launch!(d, "conv", "col2im_f32", grid(per); ptr(cols)?, ptr(gx)? + (i * per * 4) as u64, g)
}
