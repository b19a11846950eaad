//! `Tensor`: shape, strides, offset and a shared, device-tagged storage.
//!
//! Views (reshape of a contiguous tensor, transpose, permute, narrow) share storage and cost no
//! copy; kernels that need packed input call [`Tensor::contiguous`], which copies only when the
//! layout is not already packed. Matmul reads strided operands directly (transposes are folded
//! into gemm's strides). Tensors are immutable once built, except through [`Tensor::data_mut`],
//! which succeeds only when nobody else holds the storage — that is how the parameter store and
//! optimizers update flat buffers in place without locks.

pub mod cache;
#[cfg(feature = "cuda")]
mod cublaslt;
#[cfg(feature = "cuda")]
pub mod cuda;
#[cfg(feature = "cuda")]
mod cusolver;
pub mod pool;
pub mod storage;

use crate::error::{Error, Result};
pub use pool::PoolStats;
use std::sync::Arc;
pub use storage::{Buf, CpuStorage, Elem, Storage};

/// Input precision of matrix products (`train.precision`): `F32`, or `Bf16` — GEMM inputs
/// rounded to bf16, products accumulated and returned in f32 (tensor cores on a GPU; on the CPU
/// the same rounding followed by an f32 GEMM, so both paths compute the same numbers up to
/// summation order). Parameters, activations outside GEMMs, gradients and optimizer state stay
/// f32: the f32 master weights are rounded on the fly, never overwritten.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    #[default]
    F32,
    Bf16,
}

/// Element type of a tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum DType {
    F32,
    F64,
    BF16,
}

impl DType {
    pub fn size_in_bytes(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F64 => 8,
            DType::BF16 => 2,
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F64 => "f64",
            DType::BF16 => "bf16",
        }
    }
}

impl std::fmt::Display for DType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Where a tensor lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Device {
    Cpu,
    Cuda(usize),
}

/// Row-major (C-order) strides for a shape.
pub fn contiguous_strides(shape: &[usize]) -> Vec<usize> {
    let mut s = vec![1; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        s[i] = s[i + 1] * shape[i + 1];
    }
    s
}

#[derive(Clone)]
pub struct Tensor {
    storage: Arc<Storage>,
    shape: Vec<usize>,
    strides: Vec<usize>,
    offset: usize,
}

impl std::fmt::Debug for Tensor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Tensor({:?}, {})", self.shape, self.dtype())
    }
}

impl Tensor {
    /// Wraps a vector as a tensor of `shape`.
    pub fn from_vec<T: Elem>(v: Vec<T>, shape: &[usize]) -> Result<Tensor> {
        let n: usize = shape.iter().product();
        if n != v.len() {
            return Err(Error::shape("from_vec", format!("{} elements for shape {:?}", v.len(), shape)));
        }
        Ok(Self::from_storage(Storage::Cpu(T::wrap(v)), shape))
    }

    pub fn from_slice<T: Elem>(v: &[T], shape: &[usize]) -> Result<Tensor> {
        let mut b = T::pool().take(v.len());
        b.copy_from_slice(v);
        Self::from_vec(b, shape)
    }

    pub fn from_storage(storage: Storage, shape: &[usize]) -> Tensor {
        Tensor { storage: Arc::new(storage), shape: shape.to_vec(), strides: contiguous_strides(shape), offset: 0 }
    }

    /// An f32/f64 tensor whose contents are computed by `f(out)`; `f` must write every element.
    pub fn build<T: Elem>(shape: &[usize], f: impl FnOnce(&mut [T])) -> Tensor {
        let n: usize = shape.iter().product();
        let mut v = T::pool().take(n);
        f(&mut v);
        Self::from_storage(Storage::Cpu(T::wrap(v)), shape)
    }

    pub fn zeros(shape: &[usize], dtype: DType) -> Tensor {
        Self::full(shape, 0.0, dtype)
    }
    pub fn ones(shape: &[usize], dtype: DType) -> Tensor {
        Self::full(shape, 1.0, dtype)
    }
    pub fn full(shape: &[usize], value: f64, dtype: DType) -> Tensor {
        match dtype {
            DType::F32 => Self::build::<f32>(shape, |o| o.fill(value as f32)),
            DType::F64 => Self::build::<f64>(shape, |o| o.fill(value)),
            DType::BF16 => Self::build::<half::bf16>(shape, |o| o.fill(half::bf16::from_f64(value))),
        }
    }
    pub fn scalar(value: f64, dtype: DType) -> Tensor {
        Self::full(&[], value, dtype)
    }

    pub fn shape(&self) -> &[usize] {
        &self.shape
    }
    pub fn dims(&self) -> &[usize] {
        &self.shape
    }
    pub fn rank(&self) -> usize {
        self.shape.len()
    }
    pub fn strides(&self) -> &[usize] {
        &self.strides
    }
    pub fn offset(&self) -> usize {
        self.offset
    }
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
    pub fn dtype(&self) -> DType {
        self.storage.dtype()
    }
    pub fn device(&self) -> Device {
        match &*self.storage {
            Storage::Cpu(_) => Device::Cpu,
            #[cfg(feature = "cuda")]
            Storage::Cuda(c) => Device::Cuda(c.dev().ordinal),
        }
    }
    pub fn is_cuda(&self) -> bool {
        self.device() != Device::Cpu
    }

    /// A copy on `device` (the tensor itself when it is already there). CUDA tensors are f32
    /// or bf16; f64 is converted to f32 on the way to a GPU.
    pub fn to_device(&self, device: Device) -> Result<Tensor> {
        if device == self.device() {
            return Ok(self.clone());
        }
        #[cfg(feature = "cuda")]
        {
            crate::kernels::cuda::ops::to_device(self, device)
        }
        #[cfg(not(feature = "cuda"))]
        {
            Err(Error::Device("this dptrain was built without the `cuda` feature".into()))
        }
    }

    /// A step's f32 input (an image batch) as a tensor of `shape` on `device`. On a GPU it is
    /// uploaded with `CudaDev::upload_input`: inside a CUDA graph capture the device buffer is
    /// bound to `v`, which the graph uploads again before each replay (so `v` must live in the
    /// graph's inputs, as a `Batch`'s pixels do).
    pub fn input_f32(v: &[f32], shape: &[usize], device: Device) -> Result<Tensor> {
        if shape.iter().product::<usize>() != v.len() {
            return Err(Error::shape("input_f32", format!("{} values as {shape:?}", v.len())));
        }
        match device {
            Device::Cpu => Tensor::from_slice(v, shape),
            #[cfg(feature = "cuda")]
            Device::Cuda(o) => crate::kernels::cuda::ops::input_f32(&crate::tensor::cuda::dev(o)?, v, shape),
            #[cfg(not(feature = "cuda"))]
            Device::Cuda(_) => Err(Error::Device("this dptrain was built without the `cuda` feature".into())),
        }
    }

    /// Zeros of `shape` on `device` (f32 on CUDA).
    pub fn zeros_on(shape: &[usize], dtype: DType, device: Device) -> Result<Tensor> {
        match device {
            Device::Cpu => Ok(Self::zeros(shape, dtype)),
            #[cfg(feature = "cuda")]
            Device::Cuda(o) => crate::kernels::cuda::ops::full(&cuda::dev(o)?, shape, 0.0),
            #[cfg(not(feature = "cuda"))]
            Device::Cuda(_) => Err(Error::Device("this dptrain was built without the `cuda` feature".into())),
        }
    }

    /// True when no other tensor shares this one's storage (so it may be written in place).
    pub fn is_unique(&mut self) -> bool {
        Arc::get_mut(&mut self.storage).is_some()
    }

    /// A view of this tensor's storage with explicit shape, strides and offset (callers keep
    /// it inside the storage).
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    pub(crate) fn view_with(&self, shape: &[usize], strides: &[usize], offset: usize) -> Tensor {
        Tensor { storage: self.storage.clone(), shape: shape.to_vec(), strides: strides.to_vec(), offset }
    }
    pub fn storage(&self) -> &Storage {
        &self.storage
    }
    /// True when this tensor and `other` share the same storage allocation.
    pub fn same_storage(&self, other: &Tensor) -> bool {
        Arc::ptr_eq(&self.storage, &other.storage)
    }
    /// Size of dim `d`, negative counting from the end.
    pub fn dim(&self, d: isize) -> usize {
        let r = self.rank() as isize;
        self.shape[(if d < 0 { r + d } else { d }) as usize]
    }

    pub fn is_contiguous(&self) -> bool {
        let mut expect = 1;
        for i in (0..self.rank()).rev() {
            if self.shape[i] != 1 && self.strides[i] != expect {
                return false;
            }
            expect *= self.shape[i];
        }
        true
    }

    fn cpu(&self) -> Result<&CpuStorage> {
        match &*self.storage {
            Storage::Cpu(c) => Ok(c),
            #[cfg(feature = "cuda")]
            Storage::Cuda(_) => Err(on_gpu()),
        }
    }

    /// The packed elements of a contiguous tensor.
    pub fn data<T: Elem>(&self) -> Result<&[T]> {
        if !self.is_contiguous() {
            return Err(Error::shape("data", "tensor is not contiguous; call contiguous() first"));
        }
        let s = T::slice(self.cpu()?).ok_or_else(|| Error::DType {
            op: "data",
            expected: T::DTYPE.to_string(),
            got: self.dtype().to_string(),
        })?;
        Ok(&s[self.offset..self.offset + self.numel()])
    }

    /// The CPU storage, for writing: fails on a GPU tensor and unless this is the only handle.
    fn cpu_unique(&mut self) -> Result<&mut CpuStorage> {
        let st = Arc::get_mut(&mut self.storage)
            .ok_or_else(|| Error::Msg("tensor storage is shared (is an autograd tape still alive?)".into()))?;
        match st {
            Storage::Cpu(c) => Ok(c),
            #[cfg(feature = "cuda")]
            Storage::Cuda(_) => Err(on_gpu()),
        }
    }

    /// Mutable access to the packed elements; fails unless this is the only handle to the
    /// storage (an autograd tape still holding the tensor is the usual reason).
    pub fn data_mut<T: Elem>(&mut self) -> Result<&mut [T]> {
        if !self.is_contiguous() {
            return Err(Error::shape("data_mut", "tensor is not contiguous"));
        }
        let (off, n, dt) = (self.offset, self.numel(), self.dtype());
        let c = self.cpu_unique()?;
        let s = T::slice_mut(c).ok_or_else(|| Error::DType { op: "data_mut", expected: T::DTYPE.to_string(), got: dt.to_string() })?;
        Ok(&mut s[off..off + n])
    }

    /// Mutable access to elements `[start, start + len)` of a contiguous tensor's packed data,
    /// creating no reference to the rest of the buffer: other regions may meanwhile be read
    /// through pointers from [`Tensor::data_ptr`] (the gradient reducer does this).
    pub fn region_mut<T: Elem>(&mut self, start: usize, len: usize) -> Result<&mut [T]> {
        if !self.is_contiguous() || start + len > self.numel() {
            return Err(Error::shape("region_mut", format!("[{start}, {}) of {} elements", start + len, self.numel())));
        }
        let (off, dt) = (self.offset, self.dtype());
        let c = self.cpu_unique()?;
        let ptr = match (T::DTYPE, c) {
            (DType::F32, CpuStorage::F32(b)) => b.as_mut_ptr() as *mut T,
            (DType::F64, CpuStorage::F64(b)) => b.as_mut_ptr() as *mut T,
            (DType::BF16, CpuStorage::BF16(b)) => b.as_mut_ptr() as *mut T,
            _ => return Err(Error::DType { op: "region_mut", expected: T::DTYPE.to_string(), got: dt.to_string() }),
        };
        // SAFETY: the range was checked against the tensor's extent, which lies inside the
        // buffer; the element type matches (checked above); `&mut self` plus `Arc::get_mut`
        // guarantee no other handle to the storage exists, and only this region is borrowed.
        Ok(unsafe { std::slice::from_raw_parts_mut(ptr.add(off + start), len) })
    }

    /// Elements `[start, start + len)` of a contiguous device tensor, as a typed device region.
    #[cfg(feature = "cuda")]
    pub fn device_region(&self, start: usize, len: usize) -> Result<cuda::DevRegion> {
        if !self.is_contiguous() || start + len > self.numel() {
            return Err(Error::shape("device_region", format!("[{start}, {}) of {} elements", start + len, self.numel())));
        }
        match self.storage() {
            Storage::Cuda(c) => Ok(cuda::DevRegion { ptr: c.ptr_at(self.offset + start), len, dtype: c.dtype }),
            Storage::Cpu(_) => Err(Error::Device("expected a CUDA tensor, got a CPU one".into())),
        }
    }

    /// Pointer to the first packed element of a contiguous tensor (for reading regions that no
    /// one is writing, from another thread).
    pub fn data_ptr<T: Elem>(&self) -> Result<*const T> {
        if !self.is_contiguous() {
            return Err(Error::shape("data_ptr", "tensor is not contiguous"));
        }
        let ptr = match (T::DTYPE, self.cpu()?) {
            (DType::F32, CpuStorage::F32(b)) => b.as_ptr() as *const T,
            (DType::F64, CpuStorage::F64(b)) => b.as_ptr() as *const T,
            (DType::BF16, CpuStorage::BF16(b)) => b.as_ptr() as *const T,
            _ => return Err(Error::DType { op: "data_ptr", expected: T::DTYPE.to_string(), got: self.dtype().to_string() }),
        };
        // SAFETY: offset lies within the buffer (tensor invariant); no reference is created.
        Ok(unsafe { ptr.add(self.offset) })
    }

    /// Copies to a Vec in logical (row-major) order, converting to `T`.
    pub fn to_vec<T: Elem>(&self) -> Result<Vec<T>> {
        if self.is_cuda() {
            return self.to_device(Device::Cpu)?.to_vec();
        }
        let c = self.contiguous();
        match c.dtype() {
            DType::F32 => Ok(c.data::<f32>()?.iter().map(|&x| T::of(x as f64)).collect()),
            DType::F64 => Ok(c.data::<f64>()?.iter().map(|&x| T::of(x)).collect()),
            DType::BF16 => Ok(c.data::<half::bf16>()?.iter().map(|&x| T::of(x.to_f64())).collect()),
        }
    }

    /// The single value of a one-element tensor, as f64.
    pub fn item(&self) -> Result<f64> {
        if self.numel() != 1 {
            return Err(Error::shape("item", format!("tensor of shape {:?} is not a scalar", self.shape)));
        }
        Ok(self.to_vec::<f64>()?[0])
    }

    /// Converts the element type (copies).
    pub fn to_dtype(&self, dtype: DType) -> Tensor {
        if dtype == self.dtype() {
            return self.clone();
        }
        #[cfg(feature = "cuda")]
        if self.is_cuda() {
            return crate::kernels::cuda::ops::cast(self, dtype).unwrap_or_else(|e| panic!("to_dtype on CUDA: {e}"));
        }
        let c = self.contiguous();
        let shape = c.shape.clone();
        match dtype {
            DType::F32 => Self::build::<f32>(&shape, |o| o.copy_from_slice(&c.to_vec::<f32>().expect("contiguous"))),
            DType::F64 => Self::build::<f64>(&shape, |o| o.copy_from_slice(&c.to_vec::<f64>().expect("contiguous"))),
            DType::BF16 => {
                let v: Vec<half::bf16> = c.to_vec::<f32>().expect("contiguous").iter().map(|&x| half::bf16::from_f32(x)).collect();
                Self::from_vec(v, &shape).expect("shape")
            }
        }
    }

    /// A packed copy, or `self` when already packed. On a GPU a failed copy (out of memory)
    /// panics here; code that may run on a GPU calls [`Tensor::try_contiguous`].
    pub fn contiguous(&self) -> Tensor {
        self.try_contiguous().unwrap_or_else(|e| panic!("contiguous: {e}"))
    }

    /// A packed copy, or `self` when already packed.
    pub fn try_contiguous(&self) -> Result<Tensor> {
        if self.is_contiguous() {
            return Ok(self.clone());
        }
        #[cfg(feature = "cuda")]
        if self.is_cuda() {
            return crate::kernels::cuda::ops::contiguous(self);
        }
        Ok(self.cpu_packed())
    }

    fn cpu_packed(&self) -> Tensor {
        match self.dtype() {
            DType::F32 => self.gather::<f32>(),
            DType::F64 => self.gather::<f64>(),
            DType::BF16 => self.gather::<half::bf16>(),
        }
    }

    fn gather<T: Elem>(&self) -> Tensor {
        let src = T::slice(self.cpu().expect("CPU tensor")).expect("dtype checked by caller");
        let shape = self.shape.clone();
        let strides = self.strides.clone();
        let off = self.offset;
        Self::build::<T>(&shape, |out| strided_copy(src, off, &shape, &strides, out))
    }

    /// View with a new shape; copies first if the tensor is not contiguous. One dim may be
    /// `usize::MAX` to be inferred.
    pub fn reshape(&self, shape: &[usize]) -> Result<Tensor> {
        let n = self.numel();
        let mut shape = shape.to_vec();
        if let Some(p) = shape.iter().position(|&d| d == usize::MAX) {
            let rest: usize = shape.iter().filter(|&&d| d != usize::MAX).product();
            if rest == 0 || !n.is_multiple_of(rest) {
                return Err(Error::shape("reshape", format!("cannot infer dim for {:?} from {:?}", shape, self.shape)));
            }
            shape[p] = n / rest;
        }
        if shape.iter().product::<usize>() != n {
            return Err(Error::shape("reshape", format!("{:?} -> {:?}", self.shape, shape)));
        }
        let c = self.try_contiguous()?;
        Ok(Tensor { storage: c.storage, strides: contiguous_strides(&shape), shape, offset: c.offset })
    }

    /// Swaps two dims (a view).
    pub fn transpose(&self, d0: usize, d1: usize) -> Result<Tensor> {
        if d0 >= self.rank() || d1 >= self.rank() {
            return Err(Error::shape("transpose", format!("dims {d0},{d1} for rank {}", self.rank())));
        }
        let mut t = self.clone();
        t.shape.swap(d0, d1);
        t.strides.swap(d0, d1);
        Ok(t)
    }

    /// Reorders dims (a view): output dim i is input dim `perm[i]`.
    pub fn permute(&self, perm: &[usize]) -> Result<Tensor> {
        let mut seen = vec![false; self.rank()];
        if perm.len() != self.rank() || perm.iter().any(|&p| p >= self.rank() || std::mem::replace(&mut seen[p], true)) {
            return Err(Error::shape("permute", format!("{perm:?} for rank {}", self.rank())));
        }
        Ok(Tensor {
            storage: self.storage.clone(),
            shape: perm.iter().map(|&p| self.shape[p]).collect(),
            strides: perm.iter().map(|&p| self.strides[p]).collect(),
            offset: self.offset,
        })
    }

    /// `len` entries of dim `dim` starting at `start` (a view).
    pub fn narrow(&self, dim: usize, start: usize, len: usize) -> Result<Tensor> {
        if dim >= self.rank() || start + len > self.shape[dim] {
            return Err(Error::shape("narrow", format!("dim {dim} [{start}, {}) of {:?}", start + len, self.shape)));
        }
        let mut t = self.clone();
        t.offset += start * self.strides[dim];
        t.shape[dim] = len;
        Ok(t)
    }

    /// A view of a contiguous region of a 1-D (flat) tensor as `shape`; used by the parameter
    /// store to expose each parameter as a view of the flat buffer.
    pub fn view_at(&self, offset: usize, shape: &[usize]) -> Result<Tensor> {
        let n: usize = shape.iter().product();
        if !self.is_contiguous() || offset + n > self.numel() {
            return Err(Error::shape("view_at", format!("{n} elements at {offset} of {}", self.numel())));
        }
        Ok(Tensor {
            storage: self.storage.clone(),
            shape: shape.to_vec(),
            strides: contiguous_strides(shape),
            offset: self.offset + offset,
        })
    }
}

#[cfg(feature = "cuda")]
fn on_gpu() -> Error {
    Error::Device("the tensor is on a CUDA device; copy it to the CPU first (Tensor::to_device)".into())
}

/// Copies a strided view into packed row-major order.
pub(crate) fn strided_copy<T: Copy>(src: &[T], offset: usize, shape: &[usize], strides: &[usize], out: &mut [T]) {
    let r = shape.len();
    if r == 0 {
        out[0] = src[offset];
        return;
    }
    let inner = shape[r - 1];
    let inner_stride = strides[r - 1];
    let outer: usize = shape[..r - 1].iter().product();
    let mut idx = vec![0usize; r - 1];
    for o in 0..outer {
        let mut base = offset;
        for d in 0..r - 1 {
            base += idx[d] * strides[d];
        }
        let dst = &mut out[o * inner..(o + 1) * inner];
        if inner_stride == 1 {
            dst.copy_from_slice(&src[base..base + inner]);
        } else {
            for (j, x) in dst.iter_mut().enumerate() {
                *x = src[base + j * inner_stride];
            }
        }
        for d in (0..r - 1).rev() {
            idx[d] += 1;
            if idx[d] < shape[d] {
                break;
            }
            idx[d] = 0;
        }
    }
}

/// Pool counters for f32 buffers (the training dtype).
pub fn pool_stats() -> PoolStats {
    <f32 as Elem>::pool().stats()
}
