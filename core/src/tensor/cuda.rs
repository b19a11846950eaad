//! The CUDA side of the tensor: one [`CudaDev`] per device ordinal (context, one compute stream,
//! every kernel file compiled once with NVRTC for the device's architecture, a cuBLAS handle on
//! that stream, and the caching allocator), and [`CudaStorage`], a device buffer that returns to
//! the cache when the last tensor holding it is dropped.
//!
//! Device memory is handled as raw `CUdeviceptr`s (cudarc's result-level API) rather than
//! `CudaSlice`, because tensors are views at element offsets into shared buffers of several
//! dtypes, and because cudarc's per-slice event tracking is not needed when every kernel of a
//! device runs in order on one stream (the communication stream of NCCL synchronises with it
//! through explicit events in `dptrain-comm`).
//!
//! Only reached after `device::cuda_status()` found a device, so cudarc's loader never panics.

use super::cache::{size_class, CacheStats, SizeCache};
use super::DType;
use crate::error::{Error, Result};
use crate::kernels::cuda::{compile, SOURCES};
use cudarc::cublas::{result as blas, sys as blas_sys, CudaBlas};
use cudarc::driver::{result as drv, CudaContext, CudaFunction, CudaModule, CudaStream, DeviceRepr, LaunchConfig};
use cudarc::nvrtc::Ptx;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

pub(crate) fn derr(what: &str, e: impl std::fmt::Debug) -> Error {
    Error::Device(format!("{what}: {e:?}"))
}

/// A CUDA device as the engine uses it.
pub struct CudaDev {
    pub ordinal: usize,
    pub name: String,
    /// e.g. `sm_90`: what the kernels were compiled for.
    pub arch: String,
    pub ctx: Arc<CudaContext>,
    /// The compute stream: every kernel, copy and GEMM of this device, in order.
    pub stream: Arc<CudaStream>,
    modules: HashMap<&'static str, Arc<CudaModule>>,
    funcs: Mutex<HashMap<(&'static str, &'static str), CudaFunction>>,
    blas: CudaBlas,
    cache: Mutex<SizeCache<u64>>,
    /// A buffer of f32 ones for reductions done as GEMMs (grown on demand, never shrunk).
    ones: Mutex<Option<(DevBuf, usize)>>,
}

static DEVS: Mutex<Vec<Arc<CudaDev>>> = Mutex::new(Vec::new());

/// The engine's handle to device `ordinal`, created (and its kernels compiled) on first use.
pub fn dev(ordinal: usize) -> Result<Arc<CudaDev>> {
    let mut devs = DEVS.lock().map_err(|_| Error::Device("device table poisoned".into()))?;
    if let Some(d) = devs.iter().find(|d| d.ordinal == ordinal) {
        return Ok(d.clone());
    }
    match crate::device::cuda_status() {
        crate::device::CudaStatus::Devices(n) if ordinal < n => {}
        other => return Err(Error::Device(format!("cuda:{ordinal} is not available ({other:?})"))),
    }
    let d = Arc::new(CudaDev::open(ordinal)?);
    devs.push(d.clone());
    Ok(d)
}

impl CudaDev {
    fn open(ordinal: usize) -> Result<CudaDev> {
        let ctx = CudaContext::new(ordinal).map_err(|e| derr("creating the CUDA context", e))?;
        // SAFETY: event tracking only guards CudaSlice use across streams; the engine uses raw
        // pointers on one compute stream and synchronises the communication stream itself.
        unsafe { ctx.disable_event_tracking() };
        let (maj, min) = ctx.compute_capability().map_err(|e| derr("compute capability", e))?;
        let arch = format!("sm_{maj}{min}");
        let name = ctx.name().map_err(|e| derr("device name", e))?;
        let stream = ctx.new_stream().map_err(|e| derr("creating the compute stream", e))?;
        let mut modules = HashMap::new();
        for (file, src) in SOURCES {
            let c = compile(file, src, &arch).map_err(Error::Device)?;
            let m = ctx.load_module(Ptx::from_src(c.ptx)).map_err(|e| derr(&format!("loading kernels {file}"), e))?;
            modules.insert(*file, m);
        }
        if !unsafe { cudarc::cublas::sys::is_culib_present() } {
            return Err(Error::Device("cuBLAS (libcublas.so) was not found; put its directory on LD_LIBRARY_PATH".into()));
        }
        let blas = CudaBlas::new(stream.clone()).map_err(|e| derr("creating the cuBLAS handle", e))?;
        Ok(CudaDev {
            ordinal,
            name,
            arch,
            ctx,
            stream,
            modules,
            funcs: Mutex::new(HashMap::new()),
            blas,
            cache: Mutex::new(SizeCache::default()),
            ones: Mutex::new(None),
        })
    }

    /// Makes this device's context current on the calling thread (cheap when it already is).
    pub fn bind(&self) -> Result<()> {
        self.ctx.bind_to_thread().map_err(|e| derr("binding the CUDA context", e))
    }

    /// Kernel `name` from kernel file `file`.
    pub fn func(&self, file: &'static str, name: &'static str) -> Result<CudaFunction> {
        let mut f = self.funcs.lock().map_err(|_| Error::Device("kernel table poisoned".into()))?;
        if let Some(k) = f.get(&(file, name)) {
            return Ok(k.clone());
        }
        let m = self.modules.get(file).ok_or_else(|| Error::Device(format!("no kernel file {file}")))?;
        let k = m.load_function(name).map_err(|e| derr(&format!("kernel {file}.{name}"), e))?;
        f.insert((file, name), k.clone());
        Ok(k)
    }

    /// `bytes` of uninitialised device memory from the cache.
    pub fn alloc(self: &Arc<Self>, bytes: usize) -> Result<DevBuf> {
        self.bind()?;
        let class = size_class(bytes);
        let stream = self.stream.clone();
        let mut cache = self.cache.lock().map_err(|_| Error::Device("allocator poisoned".into()))?;
        let ptr = cache
            .take(
                class,
                // SAFETY: plain device allocation on the bound context.
                |c| unsafe { drv::malloc_sync(c) },
                |p, _| {
                    // SAFETY: cached blocks are unused once the stream has drained.
                    let _ = stream.synchronize();
                    let _ = unsafe { drv::free_sync(p) };
                },
            )
            .map_err(|e| {
                Error::Device(format!(
                    "out of memory on cuda:{} allocating {} MiB ({e:?}); lower the batch size",
                    self.ordinal,
                    bytes >> 20
                ))
            })?;
        Ok(DevBuf { ptr, class, dev: self.clone() })
    }

    /// `bytes` of zeroed device memory.
    pub fn alloc_zeros(self: &Arc<Self>, bytes: usize) -> Result<DevBuf> {
        let b = self.alloc(bytes)?;
        // SAFETY: the block holds at least `bytes` bytes; the memset is ordered on the stream.
        unsafe { drv::memset_d8_async(b.ptr, 0, bytes, self.stream.cu_stream()) }.map_err(|e| derr("memset", e))?;
        Ok(b)
    }

    pub fn cache_stats(&self) -> CacheStats {
        self.cache.lock().map(|c| c.stats()).unwrap_or_default()
    }

    /// Copies host data into a new device buffer.
    pub fn upload<T: DeviceRepr>(self: &Arc<Self>, src: &[T]) -> Result<DevBuf> {
        let b = self.alloc(std::mem::size_of_val(src))?;
        // SAFETY: the block holds the bytes of `src`; pageable sources are staged by the driver
        // before this returns, so `src` may be dropped afterwards.
        unsafe { drv::memcpy_htod_async(b.ptr, src, self.stream.cu_stream()) }.map_err(|e| derr("host-to-device copy", e))?;
        Ok(b)
    }

    /// Copies `n` elements at device address `ptr` to the host (waits for the stream).
    pub fn download<T: DeviceRepr + Default + Clone>(&self, ptr: u64, n: usize) -> Result<Vec<T>> {
        self.bind()?;
        let mut v = vec![T::default(); n];
        // SAFETY: the caller passes a pointer to at least n elements of T on this device.
        unsafe { drv::memcpy_dtoh_async(&mut v[..], ptr, self.stream.cu_stream()) }.map_err(|e| derr("device-to-host copy", e))?;
        self.sync()?;
        Ok(v)
    }

    pub fn copy(&self, dst: u64, src: u64, bytes: usize) -> Result<()> {
        // SAFETY: both ranges lie in live device buffers (callers' invariant).
        unsafe { drv::memcpy_dtod_async(dst, src, bytes, self.stream.cu_stream()) }.map_err(|e| derr("device copy", e))
    }

    /// Waits for everything queued on the compute stream; surfaces asynchronous kernel errors.
    pub fn sync(&self) -> Result<()> {
        self.stream.synchronize().map_err(|e| derr(&format!("cuda:{} (a kernel failed)", self.ordinal), e))
    }

    /// A device buffer of at least `n` f32 ones.
    pub fn ones(self: &Arc<Self>, n: usize) -> Result<u64> {
        let mut g = self.ones.lock().map_err(|_| Error::Device("ones poisoned".into()))?;
        if let Some((b, len)) = g.as_ref() {
            if *len >= n {
                return Ok(b.ptr);
            }
        }
        let len = n.next_power_of_two().max(1024);
        let b = self.alloc(len * 4)?;
        crate::kernels::cuda::ops::fill_raw(self, b.ptr, len, 1.0)?;
        let p = b.ptr;
        *g = Some((b, len));
        Ok(p)
    }

    /// Launches `file.name` with the arguments pushed by `args`.
    ///
    /// # Safety
    /// The arguments must match the kernel's parameter list in type and order, and every pointer
    /// must address enough live device memory for the kernel's indexing with these sizes.
    pub unsafe fn launch(
        &self,
        file: &'static str,
        name: &'static str,
        cfg: LaunchConfig,
        args: impl FnOnce(&mut cudarc::driver::LaunchArgs<'_>),
    ) -> Result<()> {
        let f = self.func(file, name)?;
        let mut b = self.stream.launch_builder(&f);
        args(&mut b);
        unsafe { b.launch(cfg) }.map(|_| ()).map_err(|e| derr(&format!("launching {file}.{name}"), e))
    }

    /// Row-major strided-batched GEMM `C[b] = alpha·A[b]·B[b] + beta·C[b]` with A `[m, k]`,
    /// B `[k, n]` described by [`MatArg`]s, C packed `[m, n]`; inputs f32 or bf16 (`in_dtype`),
    /// output f32, accumulation f32 (no TF32: results follow the CPU path within 1e-5).
    pub fn gemm(
        &self,
        m: usize,
        n: usize,
        k: usize,
        a: MatArg,
        b: MatArg,
        c: u64,
        batch: usize,
        alpha: f32,
        beta: f32,
        in_dtype: DType,
    ) -> Result<()> {
        use blas_sys::{cublasComputeType_t as Ct, cublasGemmAlgo_t as Algo, cublasOperation_t as Op, cudaDataType as Dt};
        self.bind()?;
        let dt = match in_dtype {
            DType::F32 => Dt::CUDA_R_32F,
            DType::BF16 => Dt::CUDA_R_16BF,
            DType::F64 => return Err(Error::Device("f64 GEMM is not supported on CUDA".into())),
        };
        let op = |t: bool| if t { Op::CUBLAS_OP_T } else { Op::CUBLAS_OP_N };
        let i = |x: usize| x as i32;
        // Column-major view: Cᵀ[n, m] = Bᵀ · Aᵀ (see MatArg for how a row-major operand maps).
        // SAFETY: pointers address live buffers of the sizes these dims and strides imply
        // (callers' invariant); alpha/beta are f32 as CUBLAS_COMPUTE_32F requires.
        unsafe {
            blas::gemm_strided_batched_ex(
                *self.blas.handle(),
                op(b.trans),
                op(a.trans),
                i(n),
                i(m),
                i(k),
                (&alpha) as *const f32 as *const _,
                b.ptr as *const _,
                dt,
                i(b.ld),
                b.batch_stride as i64,
                a.ptr as *const _,
                dt,
                i(a.ld),
                a.batch_stride as i64,
                (&beta) as *const f32 as *const _,
                c as *mut _,
                Dt::CUDA_R_32F,
                i(n),
                (m * n) as i64,
                i(batch),
                Ct::CUBLAS_COMPUTE_32F,
                Algo::CUBLAS_GEMM_DEFAULT,
            )
        }
        .map_err(|e| derr("cuBLAS GEMM", e))
    }
}

/// One GEMM operand: a row-major logical matrix at `ptr`, either stored row-major (`trans =
/// false`, leading dimension = row stride) or as the transpose of a row-major matrix (`trans =
/// true`, leading dimension = column stride). In cuBLAS's column-major terms the first is the
/// operand's transpose read with op N, the second the operand itself read with op T.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MatArg {
    pub ptr: u64,
    pub trans: bool,
    pub ld: usize,
    pub batch_stride: usize,
}

/// How a `[rows, cols]` view with element strides `(rs, cs)` can be handed to cuBLAS without a
/// copy: `Some((trans, ld))`, or `None` when it must be packed first.
pub fn mat_layout(rows: usize, cols: usize, rs: usize, cs: usize) -> Option<(bool, usize)> {
    if (cs == 1 || cols == 1) && rs >= cols.max(1) {
        Some((false, rs))
    } else if (rs == 1 || rows == 1) && cs >= rows.max(1) {
        Some((true, cs))
    } else if rows == 1 && cols == 1 {
        Some((false, 1))
    } else {
        None
    }
}

/// Dims of a view with size-1 dims dropped and neighbours merged where the outer stride is
/// the inner extent (`(size, stride)`, outermost first): the strided copy kernel walks at most
/// six, and GEMM batch dims must merge to one.
pub fn merge_dims(shape: &[usize], strides: &[usize]) -> Vec<(usize, usize)> {
    let mut dims: Vec<(usize, usize)> = shape.iter().zip(strides).filter(|(&n, _)| n != 1).map(|(&n, &s)| (n, s)).collect();
    let mut i = 1;
    while i < dims.len() {
        let ((n0, s0), (n1, s1)) = (dims[i - 1], dims[i]);
        if s0 == n1 * s1 {
            dims[i - 1] = (n0 * n1, s1);
            dims.remove(i);
        } else {
            i += 1;
        }
    }
    dims
}

/// Elements a GEMM operand of logical shape `[rows, cols]` reads from its pointer over `batch`
/// matrices: one past the largest offset.
pub fn operand_extent(rows: usize, cols: usize, m: &MatArg, batch: usize) -> usize {
    if rows == 0 || cols == 0 || batch == 0 {
        return 0;
    }
    let last = if m.trans { (rows - 1) + (cols - 1) * m.ld } else { (rows - 1) * m.ld + (cols - 1) };
    (batch - 1) * m.batch_stride + last + 1
}

/// A block of device memory from a device's cache; goes back to the cache on drop.
pub struct DevBuf {
    pub ptr: u64,
    class: usize,
    dev: Arc<CudaDev>,
}

impl Drop for DevBuf {
    fn drop(&mut self) {
        if let Ok(mut c) = self.dev.cache.lock() {
            c.give(self.class, self.ptr);
        }
    }
}

/// Element-typed device storage (f32 or bf16).
pub struct CudaStorage {
    pub buf: DevBuf,
    pub dtype: DType,
    pub len: usize,
}

impl CudaStorage {
    pub fn dev(&self) -> &Arc<CudaDev> {
        &self.buf.dev
    }
    /// Device address of element `i`.
    pub fn ptr_at(&self, i: usize) -> u64 {
        self.buf.ptr + (i * self.dtype.size_in_bytes()) as u64
    }
}

#[cfg(test)]
mod tests {
    use super::mat_layout;

    #[test]
    fn gemm_operand_layouts() {
        // Packed row-major [4, 3]: op N on its transpose, ld 3.
        assert_eq!(mat_layout(4, 3, 3, 1), Some((false, 3)));
        // Transposed view of a packed [3, 4] (strides (1, 4)): op T, ld 4.
        assert_eq!(mat_layout(4, 3, 1, 4), Some((true, 4)));
        // A narrowed view keeps its parent's row stride.
        assert_eq!(mat_layout(4, 3, 9, 1), Some((false, 9)));
        // Vectors: any stride of the unit dim is fine.
        assert_eq!(mat_layout(5, 1, 1, 0), Some((false, 1)));
        assert_eq!(mat_layout(1, 5, 0, 1), Some((true, 1)));
        // Neither dim unit-strided: must be packed.
        assert_eq!(mat_layout(4, 3, 6, 2), None);
    }

    /// The strided copy kernel's index walk over merged dims (a transcription of
    /// `strided_copy_f32` in elementwise.cu) gathers exactly what the CPU's strided copy does,
    /// for transposes, narrows, permutes and stride-0 broadcasts.
    #[test]
    fn merged_dims_address_the_same_elements() {
        use crate::tensor::Tensor;
        let base = Tensor::from_vec((0..720).map(|i| i as f32).collect::<Vec<f32>>(), &[4, 5, 6, 6]).unwrap();
        let views = [
            base.transpose(1, 3).unwrap(),
            base.narrow(2, 1, 3).unwrap().permute(&[3, 0, 2, 1]).unwrap(),
            base.narrow(0, 1, 2).unwrap(),
            base.reshape(&[20, 36]).unwrap().transpose(0, 1).unwrap(),
        ];
        for v in &views {
            let want = v.contiguous().to_vec::<f32>().unwrap();
            let dims = super::merge_dims(v.shape(), v.strides());
            assert!(dims.len() <= v.rank());
            let src = base.to_vec::<f32>().unwrap();
            let got: Vec<f32> = (0..v.numel())
                .map(|i| {
                    let (mut rem, mut at) = (i, v.offset());
                    for &(n, s) in dims.iter().rev() {
                        at += (rem % n) * s;
                        rem /= n;
                    }
                    src[at]
                })
                .collect();
            assert_eq!(got, want, "view {:?} strides {:?}", v.shape(), v.strides());
        }
        // Broadcast [3] -> [4, 3] (stride 0) and an all-unit shape.
        assert_eq!(super::merge_dims(&[4, 3], &[0, 1]), vec![(4, 0), (3, 1)]);
        assert_eq!(super::merge_dims(&[4, 5, 3], &[0, 0, 1]), vec![(20, 0), (3, 1)]);
        assert!(super::merge_dims(&[1, 1], &[7, 9]).is_empty());
        // Contiguous batch dims merge to one (a GEMM batch stride).
        assert_eq!(super::merge_dims(&[2, 3], &[3 * 20, 20]), vec![(6, 20)]);
    }

    #[test]
    fn operand_extent_covers_the_last_element() {
        use super::{operand_extent, MatArg};
        let m = |trans, ld, bs| MatArg { ptr: 0, trans, ld, batch_stride: bs };
        // packed [4, 3]: 12 elements; as a transposed view of packed [3, 4]: also 12.
        assert_eq!(operand_extent(4, 3, &m(false, 3, 0), 1), 12);
        assert_eq!(operand_extent(4, 3, &m(true, 4, 0), 1), 12);
        // a [4, 3] block at row stride 10 (a narrow): 3·10 + 3.
        assert_eq!(operand_extent(4, 3, &m(false, 10, 0), 1), 33);
        // 5 packed matrices of [4, 3].
        assert_eq!(operand_extent(4, 3, &m(false, 3, 12), 5), 60);
        // broadcast over the batch (stride 0): one matrix.
        assert_eq!(operand_extent(4, 3, &m(false, 3, 0), 5), 12);
    }
}
