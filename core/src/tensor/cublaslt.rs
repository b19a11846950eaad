//! cuBLASLt GEMMs with a fused epilogue: a linear's bias added as the product is written, and
//! the bias gradient summed while the weight gradient is computed, so neither needs a pass over
//! the activations of its own (PyTorch's `addmm` and Transformer Engine do the same). Before,
//! the bias was broadcast into the output with a strided copy the GEMM then re-read with
//! beta = 1 — a fifth of a GPT-124M step on an H200 (`../shared/notes/gpu-measurements.md`).
//!
//! cudarc's safe `Matmul` wrapper is too narrow (fixed layouts, no bias gradient, a heuristic
//! query per call), so this uses its result-level API: a [`Plan`] per GEMM shape (matmul
//! descriptor, three matrix layouts and the algorithm the heuristic chose) is made once and
//! reused; only the bias pointer changes between calls. A shape cuBLASLt has no algorithm for
//! (an epilogue it does not support with these types, an operand too loosely aligned) is
//! remembered as such and the caller takes its unfused path, so the fused path is never a new
//! way to fail.

use super::cuda::derr;
use crate::error::Result;
use cudarc::cublas::sys::cublasOperation_t as Op;
use cudarc::cublaslt::{result as lt, sys};
use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::Mutex;

/// Workspace the heuristic may use (NVIDIA's recommendation for Hopper).
pub(crate) const WORKSPACE_BYTES: usize = 32 << 20;

/// What the epilogue does, in cuBLAS's column-major terms (D is `m × n`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum ColEpilogue {
    /// D += bias, bias of length m broadcast over D's columns (`CUBLASLT_EPILOGUE_BIAS`).
    Bias(u64),
    /// grad[j] = Σ_l op(B)[l, j] over the inner dimension, length n (`CUBLASLT_EPILOGUE_BGRADB`).
    GradB(u64),
    /// z = product (+ bias of length m); aux = z, D = GELU(z) (tanh form), both bf16, aux in D's
    /// layout (`CUBLASLT_EPILOGUE_GELU_AUX_BIAS`, or `_GELU_AUX` without a bias): a transformer
    /// MLP's pre-activation kept for backward and its activation, from one GEMM.
    GeluAux { bias: Option<u64>, aux: u64 },
    /// D = product ⊙ GELU'(aux) (`CUBLASLT_EPILOGUE_DGELU`): the gradient through GELU of its
    /// output's gradient, aux the pre-activation `GeluAux` kept, in D's layout.
    DGelu(u64),
    /// Nothing (`CUBLASLT_EPILOGUE_DEFAULT`): for a C read from another buffer than D.
    None,
}

impl ColEpilogue {
    /// The bias (or bias gradient) vector's address, when the epilogue has one.
    fn bias(self) -> Option<u64> {
        match self {
            ColEpilogue::Bias(p) | ColEpilogue::GradB(p) => Some(p),
            ColEpilogue::GeluAux { bias, .. } => bias,
            ColEpilogue::DGelu(_) | ColEpilogue::None => None,
        }
    }

    /// The auxiliary matrix's address (GELU's pre-activation), when the epilogue has one.
    fn aux(self) -> Option<u64> {
        match self {
            ColEpilogue::GeluAux { aux, .. } | ColEpilogue::DGelu(aux) => Some(aux),
            _ => None,
        }
    }

    fn lt(self) -> sys::cublasLtEpilogue_t {
        use sys::cublasLtEpilogue_t as E;
        match self {
            ColEpilogue::Bias(_) => E::CUBLASLT_EPILOGUE_BIAS,
            ColEpilogue::GradB(_) => E::CUBLASLT_EPILOGUE_BGRADB,
            ColEpilogue::GeluAux { bias: Some(_), .. } => E::CUBLASLT_EPILOGUE_GELU_AUX_BIAS,
            ColEpilogue::GeluAux { bias: None, .. } => E::CUBLASLT_EPILOGUE_GELU_AUX,
            ColEpilogue::DGelu(_) => E::CUBLASLT_EPILOGUE_DGELU,
            ColEpilogue::None => E::CUBLASLT_EPILOGUE_DEFAULT,
        }
    }
}

/// One column-major GEMM `D = alpha·op(A)·op(B) + beta·C`, D at `c` and C at `c_in` (the same
/// buffer, or another of the same layout: a residual added as the product is written), f32, or
/// bf16 with `out_bf16`, whose bias is then bf16 too — cuBLASLt's default bias type is D's.
#[derive(Debug, Clone, Copy)]
pub(crate) struct LtGemm {
    pub trans_a: bool,
    pub trans_b: bool,
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub a: u64,
    pub lda: usize,
    pub b: u64,
    pub ldb: usize,
    pub c: u64,
    pub c_in: u64,
    pub ldc: usize,
    pub alpha: f32,
    pub beta: f32,
    pub bf16: bool,
    pub out_bf16: bool,
}

/// What a plan depends on: the shape, the operand types, the epilogue kind, and how aligned the
/// operands are (the heuristic only offers algorithms that can read them at that alignment).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Key {
    trans: (bool, bool),
    mnk: (usize, usize, usize),
    ld: (usize, usize, usize),
    bf16: bool,
    out_bf16: bool,
    epilogue: sys::cublasLtEpilogue_t,
    /// A, B, C, D and the epilogue's auxiliary matrix (0 without one).
    align: (u32, u32, u32, u32, u32),
}

/// Largest power of two ≤ 256 dividing `p`: the alignment cuBLASLt may assume.
fn alignment(p: u64) -> u32 {
    (1u64 << p.trailing_zeros().min(8)) as u32
}

/// A ready GEMM: descriptors and the chosen algorithm.
struct Plan {
    desc: sys::cublasLtMatmulDesc_t,
    la: sys::cublasLtMatrixLayout_t,
    lb: sys::cublasLtMatrixLayout_t,
    lc: sys::cublasLtMatrixLayout_t,
    algo: sys::cublasLtMatmulAlgo_t,
}

impl Drop for Plan {
    fn drop(&mut self) {
        // SAFETY: created by this plan and not used after it.
        unsafe {
            let _ = lt::destroy_matrix_layout(self.la);
            let _ = lt::destroy_matrix_layout(self.lb);
            let _ = lt::destroy_matrix_layout(self.lc);
            let _ = lt::destroy_matmul_desc(self.desc);
        }
    }
}

/// Sets one descriptor attribute from a plain value.
///
/// # Safety
/// `desc` must be live and `T` the attribute's C type.
unsafe fn set_desc<T>(desc: sys::cublasLtMatmulDesc_t, attr: sys::cublasLtMatmulDescAttributes_t, v: &T) -> Result<()> {
    // SAFETY: forwarded contract; `v` is readable for its size.
    unsafe { lt::set_matmul_desc_attribute(desc, attr, v as *const T as *const c_void, std::mem::size_of::<T>()) }
        .map_err(|e| derr("cuBLASLt descriptor", e))
}

impl Plan {
    /// Descriptors for `g` with epilogue `ep`, and the heuristic's best algorithm (an error when
    /// it has none).
    fn new(handle: sys::cublasLtHandle_t, g: &LtGemm, ep: ColEpilogue, key: &Key) -> Result<Plan> {
        use sys::cublasLtMatmulDescAttributes_t as D;
        use sys::cublasLtMatmulPreferenceAttributes_t as P;
        let err = |what: &'static str| move |e| derr(what, e);
        let dt = if g.bf16 { sys::cudaDataType::CUDA_R_16BF } else { sys::cudaDataType::CUDA_R_32F };
        let op = |t: bool| (if t { Op::CUBLAS_OP_T } else { Op::CUBLAS_OP_N }) as i32;
        let desc = lt::create_matmul_desc(sys::cublasComputeType_t::CUBLAS_COMPUTE_32F, sys::cudaDataType::CUDA_R_32F)
            .map_err(err("cuBLASLt descriptor"))?;
        // Layouts describe the operands as stored (before op): A is m × k, or k × m when transposed.
        let layout = |t, rows: usize, cols: usize, ld: usize| lt::create_matrix_layout(t, rows as u64, cols as u64, ld as i64);
        let (ar, ac) = if g.trans_a { (g.k, g.m) } else { (g.m, g.k) };
        let (br, bc) = if g.trans_b { (g.n, g.k) } else { (g.k, g.n) };
        let mut plan = Plan {
            desc,
            la: layout(dt, ar, ac, g.lda).map_err(err("cuBLASLt layout"))?,
            lb: std::ptr::null_mut(),
            lc: std::ptr::null_mut(),
            // SAFETY: plain old data, overwritten by the heuristic's choice below.
            algo: unsafe { std::mem::zeroed() },
        };
        plan.lb = layout(dt, br, bc, g.ldb).map_err(err("cuBLASLt layout"))?;
        let ct = if g.out_bf16 { sys::cudaDataType::CUDA_R_16BF } else { sys::cudaDataType::CUDA_R_32F };
        plan.lc = layout(ct, g.m, g.n, g.ldc).map_err(err("cuBLASLt layout"))?;
        // SAFETY: the descriptor is live; each value has its attribute's C type (int32 ops,
        // uint32 epilogue).
        unsafe {
            set_desc(desc, D::CUBLASLT_MATMUL_DESC_TRANSA, &op(g.trans_a))?;
            set_desc(desc, D::CUBLASLT_MATMUL_DESC_TRANSB, &op(g.trans_b))?;
            set_desc(desc, D::CUBLASLT_MATMUL_DESC_EPILOGUE, &(ep.lt() as u32))?;
            if let Some(p) = ep.bias() {
                set_desc(desc, D::CUBLASLT_MATMUL_DESC_BIAS_POINTER, &p)?;
            }
            // The auxiliary matrix shares D's layout (its leading dimension a multiple of 8, which
            // the caller checked); the heuristic reads its pointer for the alignment it may assume.
            if let Some(p) = ep.aux() {
                set_desc(desc, D::CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_POINTER, &p)?;
                set_desc(desc, D::CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_LD, &(g.ldc as i64))?;
            }
        }
        let pref = lt::create_matmul_pref().map_err(err("cuBLASLt preference"))?;
        let set_pref = |attr: P, v: &dyn Fn() -> (*const c_void, usize)| {
            let (p, n) = v();
            // SAFETY: the preference is live and `p` points at `n` readable bytes of the
            // attribute's C type.
            unsafe { lt::set_matmul_pref_attribute(pref, attr, p, n) }.map_err(err("cuBLASLt preference"))
        };
        let ws = WORKSPACE_BYTES as u64;
        let (aa, ab, ac2, ad, _) = key.align;
        let chosen = (|| {
            set_pref(P::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &|| (&ws as *const u64 as *const c_void, 8))?;
            set_pref(P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, &|| (&aa as *const u32 as *const c_void, 4))?;
            set_pref(P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, &|| (&ab as *const u32 as *const c_void, 4))?;
            set_pref(P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, &|| (&ac2 as *const u32 as *const c_void, 4))?;
            set_pref(P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, &|| (&ad as *const u32 as *const c_void, 4))?;
            // SAFETY: every descriptor is live.
            unsafe { lt::get_matmul_algo_heuristic(handle, desc, plan.la, plan.lb, plan.lc, plan.lc, pref) }
                .map_err(err("cuBLASLt heuristic"))
        })();
        // SAFETY: created above, not used after this.
        let _ = unsafe { lt::destroy_matmul_pref(pref) };
        let h = chosen?;
        if h.workspaceSize > WORKSPACE_BYTES {
            return Err(crate::error::Error::Device(format!("cuBLASLt wants {} bytes of workspace", h.workspaceSize)));
        }
        plan.algo = h.algo;
        Ok(plan)
    }
}

/// A device's cuBLASLt handle, workspace and plans.
pub(crate) struct Lt {
    handle: sys::cublasLtHandle_t,
    workspace: u64,
    /// Plans by shape; `None` where cuBLASLt offered no algorithm (the caller's unfused path
    /// runs instead, without asking again).
    plans: Mutex<HashMap<Key, Option<Plan>>>,
}

// SAFETY: the handle is thread-safe per cuBLASLt's documentation, and plans are only used under
// the mutex; the workspace is used by one GEMM at a time (the plans' lock is held across it).
unsafe impl Send for Lt {}
unsafe impl Sync for Lt {}

impl Lt {
    /// The workspace's device address (cuBLAS shares it: see `CudaDev::open`).
    pub(crate) fn workspace(&self) -> u64 {
        self.workspace
    }

    /// The library's handle and a workspace on the current context; `None` when libcublasLt
    /// cannot be loaded (the unfused path then runs everywhere).
    pub(crate) fn open() -> Option<Lt> {
        // SAFETY: only tries to load the library.
        if !unsafe { sys::is_culib_present() } {
            tracing::warn!("libcublasLt was not found: linear layers add their bias in a pass of their own");
            return None;
        }
        let handle = lt::create_handle().map_err(|e| tracing::warn!("cuBLASLt handle: {e:?}")).ok()?;
        // SAFETY: a plain allocation on the context the caller bound.
        match unsafe { cudarc::driver::result::malloc_sync(WORKSPACE_BYTES) } {
            Ok(workspace) => Some(Lt { handle, workspace, plans: Mutex::new(HashMap::new()) }),
            Err(e) => {
                tracing::warn!("cuBLASLt workspace: {e:?}");
                // SAFETY: created above, unused.
                let _ = unsafe { lt::destroy_handle(handle) };
                None
            }
        }
    }

    /// Runs `g` with epilogue `ep` on `stream`. `Ok(false)` (nothing launched) when cuBLASLt has
    /// no algorithm for it; the refusal is remembered for the shape.
    pub(crate) fn run(&self, g: &LtGemm, ep: ColEpilogue, stream: sys::cudaStream_t) -> Result<bool> {
        let key = Key {
            trans: (g.trans_a, g.trans_b),
            mnk: (g.m, g.n, g.k),
            ld: (g.lda, g.ldb, g.ldc),
            bf16: g.bf16,
            out_bf16: g.out_bf16,
            epilogue: ep.lt(),
            align: (alignment(g.a), alignment(g.b), alignment(g.c_in), alignment(g.c), ep.aux().map_or(0, alignment)),
        };
        let mut plans = self.plans.lock().map_err(|_| crate::error::Error::Device("cuBLASLt plans poisoned".into()))?;
        let plan = plans.entry(key).or_insert_with(|| {
            Plan::new(self.handle, g, ep, &key)
                .map_err(|e| tracing::debug!("no fused cuBLASLt GEMM for {key:?}: {e}; the unfused path runs"))
                .ok()
        });
        let Some(p) = plan.as_ref() else { return Ok(false) };
        let (alpha, beta) = (g.alpha, g.beta);
        // SAFETY: the plan's descriptors are live; pointers address buffers of the sizes the
        // shape implies (callers' invariant); alpha/beta are f32 as the scale type says; the
        // workspace holds WORKSPACE_BYTES and only this call (under the lock) uses it.
        let r = unsafe {
            use sys::cublasLtMatmulDescAttributes_t as D;
            if let Some(b) = ep.bias() {
                set_desc(p.desc, D::CUBLASLT_MATMUL_DESC_BIAS_POINTER, &b)?;
            }
            if let Some(a) = ep.aux() {
                set_desc(p.desc, D::CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_POINTER, &a)?;
            }
            lt::matmul(
                self.handle,
                p.desc,
                &alpha as *const f32 as *const c_void,
                &beta as *const f32 as *const c_void,
                g.a as *const c_void,
                p.la,
                g.b as *const c_void,
                p.lb,
                g.c_in as *const c_void,
                p.lc,
                g.c as *mut c_void,
                p.lc,
                &p.algo,
                self.workspace as *mut c_void,
                WORKSPACE_BYTES,
                stream,
            )
        };
        match r {
            Ok(()) => Ok(true),
            // Rejected before launching (e.g. a configuration the heuristic allowed but the call
            // does not): fall back for this shape from now on.
            Err(e) => {
                tracing::debug!("cuBLASLt GEMM {key:?} refused ({e:?}); the unfused path runs");
                plans.insert(key, None);
                Ok(false)
            }
        }
    }
}

impl Drop for Lt {
    fn drop(&mut self) {
        if let Ok(mut p) = self.plans.lock() {
            p.clear();
        }
        // SAFETY: created in `open`, unused after this.
        unsafe {
            let _ = lt::destroy_handle(self.handle);
            let _ = cudarc::driver::result::free_sync(self.workspace);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::alignment;

    #[test]
    fn alignment_is_the_largest_power_of_two_up_to_256() {
        assert_eq!(alignment(0x1000), 256);
        assert_eq!(alignment(0x1004), 4);
        assert_eq!(alignment(0x1010), 16);
        assert_eq!(alignment(0x1080), 128);
        assert_eq!(alignment(0), 256);
    }
}
