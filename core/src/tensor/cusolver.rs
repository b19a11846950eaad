//! cuSOLVER for the engine's dense linear algebra on a GPU (`ops::linalg`, which SOAP's basis
//! refreshes use): the symmetric eigendecomposition (`syevd`) and the Q of a QR factorisation
//! (`geqrf`, then `orgqr`), in f64 on column-major matrices, on the device's compute stream.
//! On the host the same refresh of GPT-124M's 99 factors takes minutes of one core's time
//! (README "SOAP"); cuSOLVER does it where the statistics already are.
//!
//! The handle is made on first use (most runs never factor a matrix) and asks for
//! deterministic results, so a refresh repeated on the same GPU and library gives the same
//! bases (replicated SOAP relies on every rank computing the same ones). Workspaces come from
//! the device's caching allocator and go back to it in stream order; `info` is left on the
//! device for the caller to read with whatever else it reads.

use super::cuda::{derr, CudaDev};
use crate::error::Result;
use cudarc::cusolver::{result as solver, sys};
use std::sync::Arc;

/// A cuSOLVER dense handle bound to one device's compute stream.
pub(crate) struct Solver {
    handle: sys::cusolverDnHandle_t,
    /// Keeps the context alive until the handle is destroyed.
    _stream: Arc<cudarc::driver::CudaStream>,
}

// SAFETY: the handle is only used under the device's lock (`CudaDev::solver`), one call at a time.
unsafe impl Send for Solver {}
unsafe impl Sync for Solver {}

impl Solver {
    /// A handle on `stream` (its context current on this thread); `None` when libcusolver
    /// cannot be loaded or the handle not made (the host then does the linear algebra).
    pub(crate) fn open(stream: &Arc<cudarc::driver::CudaStream>) -> Option<Solver> {
        // SAFETY: only tries to load the library.
        if !unsafe { sys::is_culib_present() } {
            tracing::warn!("libcusolver was not found: SOAP's eigenbases are computed on the host");
            return None;
        }
        let handle = solver::dn_create().map_err(|e| tracing::warn!("cuSOLVER handle: {e:?}; the host computes")).ok()?;
        let s = Solver { handle, _stream: stream.clone() };
        // SAFETY: a live handle and the device's live stream.
        if let Err(e) = unsafe { solver::dn_set_stream(handle, stream.cu_stream() as sys::cudaStream_t) } {
            tracing::warn!("cuSOLVER stream: {e:?}; the host computes");
            return None;
        }
        // Deterministic is cuSOLVER's default; asked for anyway, since replicas depend on it —
        // where the library has the call (CUDA 12.2 and later: cudarc panics on a missing symbol).
        // SAFETY: looks a symbol up in the loaded library.
        let has_mode = unsafe { sys::culib().get::<unsafe extern "C" fn()>(b"cusolverDnSetDeterministicMode\0") }.is_ok();
        let mode = sys::cusolverDeterministicMode_t::CUSOLVER_DETERMINISTIC_RESULTS;
        // SAFETY: a live handle.
        if let Some(Err(e)) = has_mode.then(|| unsafe { sys::cusolverDnSetDeterministicMode(handle, mode) }.result()) {
            tracing::warn!("cuSOLVER deterministic mode: {e:?}");
        }
        Some(s)
    }

    /// LAPACK's `dsyevd` with vectors: the column-major f64 `n × n` at `a` (its lower triangle
    /// read) becomes its eigenvectors by ascending eigenvalue, the eigenvalues go to `w` (`n`
    /// f64) and the status to the i32 at `info` (0, or the LAPACK failure).
    ///
    /// # Safety
    /// `a`, `w` and `info` address live device buffers of those sizes on `dev`.
    pub(crate) unsafe fn syevd(&self, dev: &Arc<CudaDev>, a: u64, n: usize, w: u64, info: u64) -> Result<()> {
        let (jobz, uplo) = (sys::cusolverEigMode_t::CUSOLVER_EIG_MODE_VECTOR, sys::cublasFillMode_t::CUBLAS_FILL_MODE_LOWER);
        let ni = dim(n)?;
        let mut lwork = 0i32;
        // SAFETY: a live handle; the sizes the caller guarantees.
        unsafe { sys::cusolverDnDsyevd_bufferSize(self.handle, jobz, uplo, ni, a as *const f64, ni, w as *const f64, &mut lwork) }
            .result()
            .map_err(|e| derr("cuSOLVER syevd workspace", e))?;
        let work = dev.alloc(lwork.max(1) as usize * 8)?;
        // SAFETY: as above, and a workspace of `lwork` f64 that outlives the call in stream order.
        unsafe {
            sys::cusolverDnDsyevd(
                self.handle,
                jobz,
                uplo,
                ni,
                a as *mut f64,
                ni,
                w as *mut f64,
                work.ptr as *mut f64,
                lwork,
                info as *mut i32,
            )
        }
        .result()
        .map_err(|e| derr("cuSOLVER syevd", e))
    }

    /// The Q of the QR factorisation of the column-major f64 `n × n` at `a`, in place: LAPACK's
    /// `dgeqrf` (Householder vectors below the diagonal, their scalars in `tau`, `n` f64), then
    /// `dorgqr` forming Q from them; the status to the i32 at `info`.
    ///
    /// # Safety
    /// `a`, `tau` and `info` address live device buffers of those sizes on `dev`.
    pub(crate) unsafe fn qr_q(&self, dev: &Arc<CudaDev>, a: u64, n: usize, tau: u64, info: u64) -> Result<()> {
        let ni = dim(n)?;
        let (mut lq, mut lo) = (0i32, 0i32);
        // SAFETY: a live handle; the sizes the caller guarantees.
        unsafe {
            sys::cusolverDnDgeqrf_bufferSize(self.handle, ni, ni, a as *mut f64, ni, &mut lq)
                .result()
                .map_err(|e| derr("cuSOLVER geqrf workspace", e))?;
            sys::cusolverDnDorgqr_bufferSize(self.handle, ni, ni, ni, a as *const f64, ni, tau as *const f64, &mut lo)
                .result()
                .map_err(|e| derr("cuSOLVER orgqr workspace", e))?;
        }
        let lwork = lq.max(lo).max(1);
        let work = dev.alloc(lwork as usize * 8)?;
        let (wp, taup, infop) = (work.ptr as *mut f64, tau as *mut f64, info as *mut i32);
        // SAFETY: as above, and a workspace of `lwork` f64 that outlives both calls in stream order.
        unsafe {
            sys::cusolverDnDgeqrf(self.handle, ni, ni, a as *mut f64, ni, taup, wp, lwork, infop)
                .result()
                .map_err(|e| derr("cuSOLVER geqrf", e))?;
            sys::cusolverDnDorgqr(self.handle, ni, ni, ni, a as *mut f64, ni, taup, wp, lwork, infop)
                .result()
                .map_err(|e| derr("cuSOLVER orgqr", e))
        }
    }
}

/// `n` as cuSOLVER's 32-bit dimension.
fn dim(n: usize) -> Result<i32> {
    i32::try_from(n).map_err(|_| crate::error::Error::Device(format!("a {n} × {n} matrix is too large for cuSOLVER's 32-bit API")))
}

impl Drop for Solver {
    fn drop(&mut self) {
        // SAFETY: made in `open`, unused after this.
        let _ = unsafe { solver::dn_destroy(self.handle) };
    }
}
