//! The optimizers' fused update kernels over flat buffers.

use super::*;

// SAFETY: plain-old-data with the C layouts of `struct AdamWStep` / `struct SgdStep` in optim.cu.
unsafe impl DeviceRepr for crate::ops::flat::AdamWStep {}

unsafe impl DeviceRepr for crate::ops::flat::SgdStep {}

/// `p16`, the parameters' bf16 copy an update writes in its pass, must be one of `n` elements.
fn half_copy(op: &'static str, p16: Option<&Tensor>, n: usize) -> Result<u64> {
    if let Some(h) = p16.filter(|h| h.dtype() != DType::BF16 || h.numel() != n || !h.is_contiguous()) {
        return Err(Error::shape(op, format!("a bf16 copy {:?} ({}) of {n} parameters", h.shape(), h.dtype())));
    }
    ptr_or_null(p16)
}

/// Launches a one-thread gate kernel (a step decided on the device).
fn one_thread() -> LaunchConfig {
    LaunchConfig { grid_dim: (1, 1, 1), block_dim: (1, 1, 1), shared_mem_bytes: 0 }
}

/// A device pointer, or null for an absent optional buffer.
pub(super) fn ptr_or_null(t: Option<&Tensor>) -> Result<u64> {
    t.map_or(Ok(0), ptr)
}

/// Fused AdamW over flat buffers; with `gate`, decided on the device: the gate kernel reads the
/// record's Σg² (the non-finite check, clipping, `t` — an i64 on the device — and the bias
/// corrections), then the update runs or does nothing (see optim.cu). `p16`: the parameters'
/// bf16 copy, written in the same pass.
#[allow(clippy::too_many_arguments)]
pub fn adamw(
    p: &Tensor,
    g: &Tensor,
    m: &Tensor,
    v: &Tensor,
    t: &DevTable,
    s: crate::ops::flat::AdamWStep,
    gate: Option<(&StepRecord, crate::ops::flat::AdamWGate, &DevCounter, &crate::tensor::cuda::HostScalars)>,
    p16: Option<&Tensor>,
) -> Result<()> {
    let d = dev_of(p)?;
    let n = p.numel();
    half_copy("adamw", p16, n)?;
    // The learning rate and decay go up from the cell the optimizer staged them in (a CUDA
    // graph of the step uploads its values again before each replay); the buffer lives until
    // the kernels below have run (stream order).
    let mut lrs = None;
    let rec = match gate {
        Some((rec, gate, t, cell)) => {
            let b = d.upload_scalars(cell)?;
            // adamw_gate(float* rec, double max_norm, const double* lrs, double beta1, double beta2, i64* t)
            launch!(d, "optim", "adamw_gate", one_thread(); rec.ptr(), gate.max_norm, b.ptr, gate.beta1, gate.beta2, t.ptr())?;
            lrs = Some(b);
            rec.ptr()
        }
        None => 0,
    };
    let lrs_ptr = lrs.as_ref().map_or(0, |b| b.ptr);
    let scales = t.scales("adamw")?;
    // adamw_f32(p, g, m, v, const float* seg_scale, const i64* table, i64 nchunks, AdamWStep s, const float* rec, bf16_t* p16,
    //           const double* lrs)
    launch!(d, "optim", "adamw_f32", per_row(t.nchunks);
        ptr(p)?, ptr(g)?, ptr(m)?, ptr(v)?, scales, t.buf.ptr, t.nchunks as i64, s, rec, ptr_or_null(p16)?, lrs_ptr)
}

/// Fused SGD (momentum, Nesterov, decay) over flat buffers; with `gate` (the record, the
/// clipping norm, the applied-step count, the learning-rate cell), decided on the device as
/// AdamW's step is (see optim.cu). `p16` as [`adamw`]'s.
pub fn sgd(
    p: &Tensor,
    g: &Tensor,
    buf: &Tensor,
    t: &DevTable,
    s: crate::ops::flat::SgdStep,
    gate: Option<(&StepRecord, f64, &DevCounter, &crate::tensor::cuda::HostScalars)>,
    p16: Option<&Tensor>,
) -> Result<()> {
    let d = dev_of(p)?;
    let n = p.numel();
    let p16 = half_copy("sgd", p16, n)?;
    // The learning rate goes up from the optimizer's cell (a CUDA graph uploads it again before
    // each replay); the buffer lives until the kernels below have run (stream order).
    let mut lrs = None;
    let rec = match gate {
        Some((rec, max_norm, t, cell)) => {
            let b = d.upload_scalars(cell)?;
            // sgd_gate(float* rec, double max_norm, i64* t)
            launch!(d, "optim", "sgd_gate", one_thread(); rec.ptr(), max_norm, t.ptr())?;
            lrs = Some(b);
            rec.ptr()
        }
        None => 0,
    };
    let lrs_ptr = lrs.as_ref().map_or(0, |b| b.ptr);
    let scales = t.scales("sgd")?;
    // sgd_f32(p, g, buf, const float* seg_scale, const i64* table, i64 nchunks, SgdStep s, const float* rec, const double* lrs,
    //         bf16_t* p16)
    launch!(d, "optim", "sgd_f32", per_row(t.nchunks);
        ptr(p)?, ptr(g)?, ptr(buf)?, scales, t.buf.ptr, t.nchunks as i64, s, rec, lrs_ptr, p16)
}

/// SOAP's gate for a step decided on the device (see optim.cu): the record's non-finite check,
/// clipping factor, the count `t` and the step size for the base rate in `cell` (its first
/// value; the others, each parameter's decay factor, are for [`soap_apply`]); then the flat
/// gradient `g` clipped in place by that factor, as the host path clips it. Returns the cell's
/// values on the device, which the step's updates read: the caller keeps them until those
/// have been queued.
#[allow(clippy::too_many_arguments)]
pub fn soap_gate(
    g: &Tensor,
    rec: &StepRecord,
    max_norm: f64,
    cell: &crate::tensor::cuda::HostScalars,
    beta1: f64,
    beta2: f64,
    correct_bias: bool,
    t: &DevCounter,
) -> Result<DevBuf> {
    let d = dev_of(g)?;
    f32_only(g, "soap")?;
    if !g.is_contiguous() {
        return Err(Error::shape("soap", "a strided gradient buffer"));
    }
    let lrs = d.upload_scalars(cell)?;
    // soap_gate(float* rec, double max_norm, const double* lrs, double beta1, double beta2, int correct_bias, i64* t)
    launch!(d, "optim", "soap_gate", one_thread(); rec.ptr(), max_norm, lrs.ptr, beta1, beta2, correct_bias as i32, t.ptr())?;
    let n = g.numel();
    // gate_clip_f32(float* g, i64 n, const float* rec)
    launch!(d, "optim", "gate_clip_f32", grid(n); ptr(g)?, n as i64, rec.ptr())?;
    Ok(lrs)
}

/// SOAP's moment updates on one parameter's buffers (see optim.cu); with `rec`, only if its
/// gate is open.
pub fn soap_moments(gp: &Tensor, m: &Tensor, v: &Tensor, w1: f32, w2: f32, rec: Option<&StepRecord>) -> Result<()> {
    let d = dev_of(m)?;
    let n = m.numel();
    let gp = contiguous(gp)?;
    // soap_moments_f32(const float* gp, float* m, float* v, i64 n, float w1, float w2, const float* rec)
    launch!(d, "optim", "soap_moments_f32", grid(n); ptr(&gp)?, ptr(m)?, ptr(v)?, n as i64, w1, w2, rec.map_or(0, StepRecord::ptr))
}

/// `mp / (√v + eps)`, a new tensor of `mp`'s shape.
pub fn soap_ratio(mp: &Tensor, v: &Tensor, eps: f32) -> Result<Tensor> {
    let d = dev_of(mp)?;
    let mp = contiguous(mp)?;
    let out = empty(&d, mp.shape())?;
    let n = mp.numel();
    // soap_ratio_f32(const float* mp, const float* v, float* out, i64 n, float eps)
    launch!(d, "optim", "soap_ratio_f32", grid(n); ptr(&mp)?, ptr(v)?, ptr(&out)?, n as i64, eps)?;
    Ok(out)
}

/// `p ← (p − step·u)·keep` in place; with `gate` (the record, this parameter's learning-rate
/// multiplier and the device address of its decay factor, an f64 the gate's cell staged) the
/// step size is the gate's times the multiplier, keep is read there, and nothing happens when
/// the gate is closed; with `normalize`, u divided by its RMS first (its Σu² taken on the
/// device). `p16`: this parameter's view of the bf16 copy, written in the same pass.
pub fn soap_apply(
    p: &Tensor,
    u: &Tensor,
    (step, keep): (f32, f32),
    normalize: bool,
    p16: Option<&Tensor>,
    gate: Option<(&StepRecord, f64, u64)>,
) -> Result<()> {
    let d = dev_of(p)?;
    let n = p.numel();
    let p16 = half_copy("soap", p16, n)?;
    let u = contiguous(u)?;
    let (rec, scale, keep_at) = gate.map_or((0, 1.0, 0), |(r, s, k)| (r.ptr(), s, k));
    // The buffer lives until the update has run (stream order).
    let sumsq = normalize.then(|| d.alloc(8)).transpose()?;
    if let Some(b) = &sumsq {
        super::reduce::sum_squares_to(&d, &u, b.ptr)?;
    }
    // soap_apply_f32(float* p, const float* u, i64 n, float step, float keep, bf16_t* p16, const float* rec, double scale,
    //                const double* sumsq, const double* keep_at)
    launch!(d, "optim", "soap_apply_f32", grid(n);
        ptr(p)?, ptr(&u)?, n as i64, step, keep, p16, rec, scale, sumsq.as_ref().map_or(0, |b| b.ptr), keep_at)
}

/// `gg ← gg + w·(gram − gg)` in place (a SOAP factor's statistics); with `rec`, only if its
/// gate is open.
pub fn soap_statistics(gg: &Tensor, gram: &Tensor, w: f32, rec: Option<&StepRecord>) -> Result<()> {
    let d = dev_of(gg)?;
    let n = gg.numel();
    if gram.numel() != n || !gg.is_contiguous() {
        return Err(Error::shape("soap", format!("statistics {:?} updated by {:?}", gg.shape(), gram.shape())));
    }
    let gram = contiguous(gram)?;
    // soap_statistics_f32(float* gg, const float* gram, i64 n, float w, const float* rec)
    launch!(d, "optim", "soap_statistics_f32", grid(n); ptr(gg)?, ptr(&gram)?, n as i64, w, rec.map_or(0, StepRecord::ptr))
}

// SAFETY: plain-old-data with the C layouts of `struct LambStep` / `struct LarsStep` in optim.cu.
unsafe impl DeviceRepr for crate::ops::flat::LambStep {}

unsafe impl DeviceRepr for crate::ops::flat::LarsStep {}

/// A chunk table on the device (see `seg_sumsq_f32` in optim.cu), with the segments' (decay,
/// learning-rate) multipliers when an optimizer's update reads them.
pub struct DevTable {
    pub(crate) buf: DevBuf,
    pub(crate) nchunks: usize,
    pub(crate) nseg: usize,
    scales: Option<DevBuf>,
}

impl DevTable {
    fn scales(&self, op: &'static str) -> Result<u64> {
        self.scales.as_ref().map(|b| b.ptr).ok_or_else(|| Error::Msg(format!("{op}: a segment table without multipliers")))
    }
}

/// Uploads `table` (4 i64 per chunk, then nseg + 1 first-chunk offsets) and the segments'
/// multipliers (2 f32 a segment) next to `like`.
pub fn upload_table(like: &Tensor, table: &[i64], nchunks: usize, nseg: usize, scales: Option<&[f32]>) -> Result<DevTable> {
    let d = dev_of(like)?;
    Ok(DevTable { buf: d.upload(table)?, nchunks, nseg, scales: scales.map(|s| d.upload(s)).transpose()? })
}

/// `[nseg, 2]` device tensor of (‖x‖, ‖y‖) per segment: one reduction launch, one finishing
/// launch. `y_rec`: `y` is a gradient to take clipped by this step record's gate (device-decided
/// LARS).
pub fn segment_norms(x: &Tensor, y: &Tensor, t: &DevTable, y_rec: u64) -> Result<Tensor> {
    let d = dev_of(x)?;
    let partial = empty(&d, &[t.nchunks.max(1), 2])?;
    let norms = empty(&d, &[t.nseg.max(1), 2])?;
    // seg_sumsq_f32(const float* x, const float* y, const i64* table, i64 nchunks, float* partial, const float* rec)
    launch!(d, "optim", "seg_sumsq_f32", per_row(t.nchunks); ptr(x)?, ptr(y)?, t.buf.ptr, t.nchunks as i64, ptr(&partial)?, y_rec)?;
    // seg_norms_f32(const float* partial, const i64* table, i64 nchunks, i64 nseg, float* norms)
    launch!(d, "optim", "seg_norms_f32", grid(t.nseg); ptr(&partial)?, t.buf.ptr, t.nchunks as i64, t.nseg as i64, ptr(&norms)?)?;
    Ok(norms)
}

/// `[nseg, 2]` device tensor of the square roots of the probe sums of `seg_probe_f32` (mode 0:
/// ‖a‖, ‖b‖; 1: ‖a − b‖, ‖b‖; 2: √count(√v̂ < ε), ‖m̂/(√v̂ + ε)‖).
pub fn segment_probe(a: &Tensor, b: &Tensor, t: &DevTable, mode: i32, c1: f32, c2: f32, eps: f32) -> Result<Tensor> {
    let d = dev_of(a)?;
    let partial = empty(&d, &[t.nchunks.max(1), 2])?;
    let norms = empty(&d, &[t.nseg.max(1), 2])?;
    // seg_probe_f32(const float* a, const float* b, const i64* table, i64 nchunks, int mode, float c1, float c2, float eps, float* partial)
    launch!(d, "optim", "seg_probe_f32", per_row(t.nchunks); ptr(a)?, ptr(b)?, t.buf.ptr, t.nchunks as i64, mode, c1, c2, eps, ptr(&partial)?)?;
    launch!(d, "optim", "seg_norms_f32", grid(t.nseg); ptr(&partial)?, t.buf.ptr, t.nchunks as i64, t.nseg as i64, ptr(&norms)?)?;
    Ok(norms)
}

/// What a LAMB step decided on the device takes: the step's record, the gate's scalars, the
/// step count and the cell with (lr, independent decay).
pub type LambGateArgs<'a> = (&'a StepRecord, crate::ops::flat::LambGateScalars, &'a DevCounter, &'a crate::tensor::cuda::HostScalars);

#[allow(clippy::too_many_arguments)]
/// Fused LAMB over flat buffers: moments and direction into `r`, the per-parameter norms of
/// `p` and `r`, then the trust-scaled update; with `gate`, decided on the device (`lamb_gate`
/// in optim.cu). `p16` as [`adamw`]'s.
pub fn lamb(
    p: &Tensor,
    g: &Tensor,
    m: &Tensor,
    v: &Tensor,
    r: &Tensor,
    t: &DevTable,
    s: crate::ops::flat::LambStep,
    gate: Option<LambGateArgs>,
    p16: Option<&Tensor>,
) -> Result<()> {
    let d = dev_of(p)?;
    let n = p.numel();
    let p16 = half_copy("lamb", p16, n)?;
    // The cell's values go up for this launch (a CUDA graph uploads them again before each
    // replay); the buffer lives until the kernels below have run (stream order).
    let mut lrs = None;
    let rec = match gate {
        Some((rec, g, count, cell)) => {
            lrs = Some(d.upload_scalars(cell)?);
            // lamb_gate(float* rec, double max_norm, double beta1, double beta2, int correct_bias, i64* t)
            launch!(d, "optim", "lamb_gate", one_thread(); rec.ptr(), g.max_norm, g.beta1, g.beta2, g.correct_bias as i32, count.ptr())?;
            rec.ptr()
        }
        None => 0,
    };
    let lrs_ptr = lrs.as_ref().map_or(0, |b| b.ptr);
    let scales = t.scales("lamb")?;
    // lamb_moments_f32(const float* p, const float* g, float* m, float* v, float* r, const float* seg_scale, const i64* table,
    //                  i64 nchunks, LambStep s, const float* rec)
    launch!(d, "optim", "lamb_moments_f32", per_row(t.nchunks);
        ptr(p)?, ptr(g)?, ptr(m)?, ptr(v)?, ptr(r)?, scales, t.buf.ptr, t.nchunks as i64, s, rec)?;
    let norms = segment_norms(p, r, t, 0)?;
    // lamb_apply_f32(float* p, const float* r, const float* seg_scale, const i64* table, i64 nchunks, const float* norms,
    //                LambStep s, const float* rec, const double* lrs, bf16_t* p16)
    launch!(d, "optim", "lamb_apply_f32", per_row(t.nchunks);
        ptr(p)?, ptr(r)?, scales, t.buf.ptr, t.nchunks as i64, ptr(&norms)?, s, rec, lrs_ptr, p16)
}

/// Fused LARS over flat buffers: the per-parameter norms of `p` and `g`, then the update; with
/// `gate` (the record, the clipping norm, the cell with the learning rate), decided on the
/// device (`lars_gate` in optim.cu). `p16` as [`adamw`]'s.
#[allow(clippy::too_many_arguments)]
pub fn lars(
    p: &Tensor,
    g: &Tensor,
    buf: &Tensor,
    t: &DevTable,
    s: crate::ops::flat::LarsStep,
    gate: Option<(&StepRecord, f64, &crate::tensor::cuda::HostScalars)>,
    p16: Option<&Tensor>,
) -> Result<()> {
    let d = dev_of(p)?;
    let p16 = half_copy("lars", p16, p.numel())?;
    let mut lrs = None;
    let rec = match gate {
        Some((rec, max_norm, cell)) => {
            lrs = Some(d.upload_scalars(cell)?);
            // lars_gate(float* rec, double max_norm)
            launch!(d, "optim", "lars_gate", one_thread(); rec.ptr(), max_norm)?;
            rec.ptr()
        }
        None => 0,
    };
    let lrs_ptr = lrs.as_ref().map_or(0, |b| b.ptr);
    let scales = t.scales("lars")?;
    let norms = segment_norms(p, g, t, rec)?;
    // lars_apply_f32(float* p, const float* g, float* buf, const float* seg_scale, const i64* table, i64 nchunks, const float* norms,
    //                LarsStep s, const float* rec, const double* lrs, bf16_t* p16)
    launch!(d, "optim", "lars_apply_f32", per_row(t.nchunks);
        ptr(p)?, ptr(g)?, ptr(buf)?, scales, t.buf.ptr, t.nchunks as i64, ptr(&norms)?, s, rec, lrs_ptr, p16)
}
