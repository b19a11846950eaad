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

/// Whether every address is 16-byte aligned, as the kernels that read and write 16 bytes per
/// access need (`dpt_ld16` in common.cuh).
fn aligned16(ptrs: &[u64]) -> bool {
    ptrs.iter().all(|p| p.is_multiple_of(16))
}

/// Launches `file.name` on `dev`'s stream with the listed arguments (evaluated first, kept alive
/// until the launch is queued).
macro_rules! launch {
    ($dev:expr, $file:literal, $name:expr, $cfg:expr; $($arg:expr),* $(,)?) => {{
        let d: &CudaDev = &$dev;
        let mut params: Vec<*mut std::ffi::c_void> = Vec::new();
        $( let a = $arg; params.push(&a as *const _ as *mut std::ffi::c_void); )*
        // SAFETY: each call site passes arguments matching the kernel's parameter list in the
        // .cu source (noted beside it; checked against the PTX by kernels/cuda/nvrtc_tests.rs), and
        // pointers to buffers sized for its indexing. The values live until the launch is queued.
        unsafe { d.launch_raw($file, $name, $cfg, &mut params) }
    }};
}

/// GEMM input precision (see [`crate::tensor::Precision`]).
use crate::tensor::Precision as Prec;

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

/// f32 step input (a batch's pixels) on `d`, uploaded through `CudaDev::upload_input` (bound to
/// `v` inside a CUDA graph capture).
pub fn input_f32(d: &Arc<CudaDev>, v: &[f32], shape: &[usize]) -> Result<Tensor> {
    Ok(wrap(d.upload_input(v)?, DType::F32, shape))
}

/// A new uninitialised f32 tensor on `d`.
pub(crate) fn empty(d: &Arc<CudaDev>, shape: &[usize]) -> Result<Tensor> {
    let n: usize = shape.iter().product();
    Ok(wrap(d.alloc(n * 4)?, DType::F32, shape))
}

/// A new uninitialised tensor of dtype `dt` (f32 or bf16) on `d`.
pub(crate) fn empty_as(d: &Arc<CudaDev>, shape: &[usize], dt: DType) -> Result<Tensor> {
    let n: usize = shape.iter().product();
    Ok(wrap(d.alloc(n * dt.size_in_bytes())?, dt, shape))
}

/// Where a weight-gradient GEMM writes: the parameter's slot in the flat gradient buffer when
/// the tape offered it (beta 1 adds to what is there), else a new `[n, k]` tensor (returned).
pub(super) fn weight_grad_dest(
    d: &Arc<CudaDev>,
    sink: Option<crate::autograd::GradSink>,
    n: usize,
    k: usize,
) -> Result<(Option<Tensor>, u64, f32)> {
    match sink {
        Some(sk) if sk.len != n * k => Err(Error::shape("weight gradient", format!("a slot of {} elements for [{n}, {k}]", sk.len))),
        Some(sk) => Ok((None, sk.ptr, if sk.accumulate { 1.0 } else { 0.0 })),
        None => {
            let t = empty(d, &[n, k])?;
            let p = ptr(&t)?;
            Ok((Some(t), p, 0.0))
        }
    }
}

pub(crate) fn zeros(d: &Arc<CudaDev>, shape: &[usize]) -> Result<Tensor> {
    zeros_as(d, shape, DType::F32)
}

pub(crate) fn zeros_as(d: &Arc<CudaDev>, shape: &[usize], dt: DType) -> Result<Tensor> {
    let n: usize = shape.iter().product();
    Ok(wrap(d.alloc_zeros(n * dt.size_in_bytes())?, dt, shape))
}

pub(crate) fn fill_raw(d: &CudaDev, p: u64, n: usize, v: f32) -> Result<()> {
    launch!(d, "elementwise", "fill_f32", grid(n); p, n as i64, v)
}

pub fn full(d: &Arc<CudaDev>, shape: &[usize], v: f32) -> Result<Tensor> {
    let t = empty(d, shape)?;
    fill_raw(d, ptr(&t)?, t.numel(), v)?;
    Ok(t)
}

mod attention;
mod batch_norm;
mod conv;
mod cross_entropy;
mod dropout;
mod elementwise;
mod embedding;
mod gelu;
mod layer_norm;
mod linalg;
mod matmul;
mod memory;
mod optim;
mod probe;
mod reduce;

pub use attention::*;
pub use batch_norm::*;
pub use conv::*;
pub use cross_entropy::*;
pub use dropout::*;
pub use elementwise::*;
pub use embedding::*;
pub use gelu::*;
pub use layer_norm::*;
pub use linalg::*;
pub use matmul::*;
pub use memory::*;
pub use optim::*;
pub use probe::*;
pub use reduce::*;
