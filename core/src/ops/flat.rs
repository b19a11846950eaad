//! Whole-buffer operations on the flat parameter, gradient and optimizer-state tensors, for
//! the crates outside the engine (optimizers, clipping, the trainer): each runs where the
//! buffer lives. The CPU optimizers keep their own tuned loops; these are their GPU halves and
//! the device-neutral reductions.

use crate::error::Result;
use crate::tensor::Tensor;

/// Σx² of an f32 buffer, accumulated in f64 (waits for the device on a GPU).
pub fn sum_squares(t: &Tensor) -> Result<f64> {
    crate::on_cuda!(t => gpu::sum_squares_host(t));
    let d = t.data::<f32>()?;
    Ok(d.chunks(4096).map(|c| c.iter().map(|&x| (x as f64) * (x as f64)).sum::<f64>()).sum())
}

/// Σx² over `t` (accumulated in f64) and the values of the one-element f32 `scalars` on the same
/// device, read to the host in one transfer: what a training step needs there (the gradient
/// norm for clipping and the finiteness check, each micro-step's loss) for one wait for the
/// device instead of one per value.
pub fn sum_squares_and(t: &Tensor, scalars: &[Tensor]) -> Result<(f64, Vec<f64>)> {
    #[cfg(feature = "cuda")]
    if t.is_cuda() {
        return crate::kernels::cuda::ops::sum_squares_and_host(t, scalars);
    }
    Ok((sum_squares(t)?, scalars.iter().map(|s| s.item()).collect::<Result<_>>()?))
}

/// A training step's record left on the GPU: the gradient's Σg², what an optimizer's device
/// gate decided, and the step's loss scalars, written without waiting for the device and read
/// (one download) on a later logging step.
pub struct StepRecord {
    #[cfg(feature = "cuda")]
    inner: crate::kernels::cuda::ops::StepRecord,
}

impl StepRecord {
    /// (Σg², whether the step was applied, the scalars' values): waits for the device.
    pub fn read(&self) -> Result<(f64, bool, Vec<f64>)> {
        #[cfg(feature = "cuda")]
        {
            self.inner.read()
        }
        #[cfg(not(feature = "cuda"))]
        {
            Err(no_cuda())
        }
    }
    /// A copy of the record in a new buffer, without waiting (a CUDA graph's record is
    /// overwritten by its next replay).
    pub fn copy(&self) -> Result<StepRecord> {
        #[cfg(feature = "cuda")]
        {
            Ok(StepRecord { inner: self.inner.copy()? })
        }
        #[cfg(not(feature = "cuda"))]
        {
            Err(no_cuda())
        }
    }
}

/// Whether steps over the buffer `t` are decided on its device (a GPU with
/// `Fusions::device_step` on; see `Optimizer::step_on_device`).
pub fn decides_steps_on_device(t: &Tensor) -> bool {
    #[cfg(feature = "cuda")]
    if t.is_cuda() {
        return crate::kernels::cuda::ops::dev_of(t).is_ok_and(|d| d.fusions().device_step);
    }
    let _ = t;
    false
}

/// [`sum_squares_and`] left on the device as a [`StepRecord`] (GPU buffers only).
pub fn sum_squares_and_record(t: &Tensor, scalars: &[Tensor]) -> Result<StepRecord> {
    #[cfg(feature = "cuda")]
    {
        if !t.is_cuda() {
            return Err(crate::error::Error::Device("a step record lives on a GPU".into()));
        }
        Ok(StepRecord { inner: crate::kernels::cuda::ops::sum_squares_and_record(t, scalars)? })
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (t, scalars);
        Err(no_cuda())
    }
}

/// An optimizer's step count kept on the GPU, where its steps are decided.
pub struct DeviceStepCount {
    #[cfg(feature = "cuda")]
    inner: crate::kernels::cuda::ops::DevCounter,
}

impl DeviceStepCount {
    /// A count of `t` on the device of `like`.
    pub fn new(like: &Tensor, t: u64) -> Result<DeviceStepCount> {
        #[cfg(feature = "cuda")]
        {
            Ok(DeviceStepCount { inner: crate::kernels::cuda::ops::DevCounter::new(like, t as i64)? })
        }
        #[cfg(not(feature = "cuda"))]
        {
            let _ = (like, t);
            Err(no_cuda())
        }
    }
    /// Sets the count (a step the host decided; queued on the stream, no wait).
    pub fn set(&self, t: u64) -> Result<()> {
        #[cfg(feature = "cuda")]
        {
            self.inner.set(t as i64)
        }
        #[cfg(not(feature = "cuda"))]
        {
            let _ = t;
            Err(no_cuda())
        }
    }
    /// The count (waits for the device).
    pub fn get(&self) -> Result<u64> {
        #[cfg(feature = "cuda")]
        {
            Ok(self.inner.get()? as u64)
        }
        #[cfg(not(feature = "cuda"))]
        {
            Err(no_cuda())
        }
    }
}

/// What AdamW's device gate takes as arguments: the clipping norm (0: none) and the betas
/// (f64, as the host path computes with them). The learning rate comes from [`DeviceLr`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWGate {
    pub max_norm: f64,
    pub beta1: f64,
    pub beta2: f64,
}

/// A step AdamW decides on the GPU: the step's record, the host's scalars for the gate, the
/// device step count, and the cell its learning rate and decay reach the device through, staged
/// with this step's (see [`adamw_cuda`]).
pub struct DeviceGate<'a> {
    pub rec: &'a StepRecord,
    pub gate: AdamWGate,
    pub t: &'a DeviceStepCount,
    pub lr: &'a DeviceLr,
}

/// An optimizer's learning rate (and decay) as its device step reads them: uploaded from this
/// cell for each step, and by a CUDA graph of the step before each replay — so a replayed step
/// follows the schedule once the optimizer has [`DeviceLr::stage`]d the step's values.
#[derive(Clone, Default)]
pub struct DeviceLr {
    #[cfg(feature = "cuda")]
    inner: crate::tensor::cuda::HostScalars,
}

impl DeviceLr {
    /// The step's learning rate and the f32 decay the update applies (as `AdamWStep::decay`;
    /// 0 for SGD, whose decay does not follow the learning rate).
    pub fn stage(&self, lr: f64, decay: f32) {
        #[cfg(feature = "cuda")]
        self.inner.set(&[lr, decay as f64]);
        #[cfg(not(feature = "cuda"))]
        let _ = (lr, decay);
    }

    /// The step's learning rate and one f32 per parameter (SOAP: each parameter's decay factor
    /// `keep`, which [`soap_apply_cuda`] reads at index 1 + i). The count must be the same at
    /// every step a CUDA graph replays.
    pub fn stage_per_param(&self, lr: f64, values: &[f32]) {
        #[cfg(feature = "cuda")]
        self.inner.set(&std::iter::once(lr).chain(values.iter().map(|&v| v as f64)).collect::<Vec<_>>());
        #[cfg(not(feature = "cuda"))]
        let _ = (lr, values);
    }
}

/// A copy of an f32 buffer in fresh storage on the same device (a snapshot that later in-place
/// updates of `t` do not reach).
pub fn copy_of(t: &Tensor) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if t.is_cuda() {
        use crate::kernels::cuda::ops as gpu;
        let out = gpu::empty(&gpu::dev_of(t)?, t.shape())?;
        copy_into_cuda(&out, t)?;
        return Ok(out);
    }
    Tensor::from_slice(t.contiguous().data::<f32>()?, t.shape())
}

/// `t *= s` in place (t must be the only handle to its storage).
pub fn scale_in_place(t: &mut Tensor, s: f32) -> Result<()> {
    #[cfg(feature = "cuda")]
    if t.is_cuda() {
        use crate::kernels::cuda::ops as gpu;
        return gpu::scale_raw(&*gpu::dev_of(t)?, gpu::ptr(t)?, t.numel(), s);
    }
    t.data_mut::<f32>()?.iter_mut().for_each(|x| *x *= s);
    Ok(())
}

/// f32 ↔ bf16 conversion between two device regions of the same length (the bf16 gradient
/// all-reduce stages buckets through this), on `stream` when given, else the device's compute
/// stream.
#[cfg(feature = "cuda")]
pub fn cast_region(
    dev: &crate::tensor::cuda::CudaDev,
    src: crate::tensor::cuda::DevRegion,
    dst: crate::tensor::cuda::DevRegion,
    stream: Option<&cudarc::driver::CudaStream>,
) -> Result<()> {
    use crate::tensor::DType;
    let to_bf16 = match (src.dtype, dst.dtype) {
        (DType::F32, DType::BF16) => true,
        (DType::BF16, DType::F32) => false,
        (a, b) => return Err(crate::error::Error::Msg(format!("cast_region from {a} to {b}: expected f32 ↔ bf16"))),
    };
    if src.len != dst.len {
        return Err(crate::error::Error::Msg(format!("cast_region of {} elements into {}", src.len, dst.len)));
    }
    use crate::kernels::cuda::ops as gpu;
    match stream {
        Some(s) => gpu::cast_raw_on(dev, s, src.ptr, dst.ptr, src.len, to_bf16),
        None => gpu::cast_raw(dev, src.ptr, dst.ptr, src.len, to_bf16),
    }
}

#[cfg(not(feature = "cuda"))]
fn no_cuda() -> crate::error::Error {
    crate::error::Error::Device("this dptrain was built without the `cuda` feature".into())
}

/// AdamW's scalars for one step, as the fused kernel reads them (the C layout of
/// `struct AdamWStep` in `kernels/cuda/optim.cu`).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWStep {
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    /// lr / (1 − β1ᵗ), before the per-element learning-rate multiplier.
    pub step_size: f32,
    /// 1 / √(1 − β2ᵗ).
    pub inv_sqrt_bc2: f32,
    /// The decay factor, before the per-element decay multiplier: θ ← θ·(1 − decay·scale).
    pub decay: f32,
}

/// SGD's scalars for one step (the C layout of `struct SgdStep` in `kernels/cuda/optim.cu`).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SgdStep {
    /// Before the per-element learning-rate multiplier.
    pub lr: f32,
    /// Before the per-element decay multiplier.
    pub weight_decay: f32,
    pub momentum: f32,
    pub dampening: f32,
    pub nesterov: bool,
    /// The first step: the momentum buffer starts as the gradient (torch).
    pub first: bool,
}

/// One fused AdamW step on device buffers (the arithmetic of dptrain-optim's CPU loop); `p16`,
/// the parameters' bf16 copy (`ParamStore::flat_and_half_mut`), is written in the same pass.
/// With `gate` the step is decided on the GPU from the step's record: skipped when the gradient
/// norm is not finite, else the gradient clipped to `gate.max_norm`, `t` counted and the bias
/// corrections computed there, bit for bit as the host's own check, clipping and scalars
/// (`s.step_size` and `s.inv_sqrt_bc2` are then not read). `segs`: the parameters' segments
/// with their multipliers ([`DeviceSegments::with_scales`]).
#[allow(clippy::too_many_arguments)]
pub fn adamw_cuda(
    p: &mut Tensor,
    g: &Tensor,
    m: &mut Tensor,
    v: &mut Tensor,
    segs: &DeviceSegments,
    s: AdamWStep,
    gate: Option<DeviceGate>,
    p16: Option<&mut Tensor>,
) -> Result<()> {
    #[cfg(feature = "cuda")]
    {
        let gate = gate.map(|x| (&x.rec.inner, x.gate, &x.t.inner, &x.lr.inner));
        crate::kernels::cuda::ops::adamw(p, g, m, v, &segs.table, s, gate, p16.map(|t| &*t))
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (p, g, m, v, segs, s, gate, p16);
        Err(no_cuda())
    }
}

/// A step SOAP decides on the GPU: the step's record, the clipping norm (0: none), its
/// applied-step count on the device, and the cell its learning rate and per-parameter decay
/// factors reach the device through, staged with this step's ([`DeviceLr::stage_per_param`];
/// see [`soap_gate_cuda`]).
pub struct SoapGate<'a> {
    pub rec: &'a StepRecord,
    pub max_norm: f64,
    pub t: &'a DeviceStepCount,
    pub lr: &'a DeviceLr,
}

/// The staged learning rate and decay factors of a SOAP step decided on the GPU, on the device
/// (what [`soap_gate_cuda`] uploaded; in a CUDA graph, uploaded again before each replay). Keep
/// it until the step's [`soap_apply_cuda`] calls are queued.
pub struct StagedScalars {
    #[cfg(feature = "cuda")]
    buf: crate::tensor::cuda::DevBuf,
    /// Values staged: the learning rate, then one per parameter.
    #[cfg(feature = "cuda")]
    words: usize,
}

/// SOAP's gate for a step decided on the GPU, from the step's record: closed (the step does
/// nothing) when the gradient norm is not finite, else `t` counted, the step size for the
/// staged base learning rate (with the bias corrections when `correct_bias`) computed there
/// bit for bit as the host's, and the flat gradient `g` clipped in place as the host path clips
/// it. The kernels given the record afterwards follow the gate.
pub fn soap_gate_cuda(g: &Tensor, gate: &SoapGate, (beta1, beta2): (f64, f64), correct_bias: bool) -> Result<StagedScalars> {
    #[cfg(feature = "cuda")]
    {
        let words = gate.lr.inner.words().len();
        if words == 0 {
            return Err(crate::Error::Msg("soap: no learning rate staged for a step decided on the device".into()));
        }
        let buf = crate::kernels::cuda::ops::soap_gate(
            g,
            &gate.rec.inner,
            gate.max_norm,
            &gate.lr.inner,
            beta1,
            beta2,
            correct_bias,
            &gate.t.inner,
        )?;
        Ok(StagedScalars { buf, words })
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (g, gate, beta1, beta2, correct_bias);
        Err(no_cuda())
    }
}

/// SOAP's moment updates on one parameter's device buffers, both in the eigenbasis (`gp` the
/// projected gradient): `m += w1·(gp − m)`, `v += w2·(gp² − v)`. With `rec` (a step decided
/// on the device), only when its gate is open.
pub fn soap_moments_cuda(gp: &Tensor, m: &Tensor, v: &Tensor, w1: f32, w2: f32, rec: Option<&StepRecord>) -> Result<()> {
    #[cfg(feature = "cuda")]
    {
        crate::kernels::cuda::ops::soap_moments(gp, m, v, w1, w2, rec.map(|r| &r.inner))
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (gp, m, v, w1, w2, rec);
        Err(no_cuda())
    }
}

/// A SOAP factor's statistics on the device, in place: `gg ← gg + w·(gram − gg)`. With `rec`,
/// only when its gate is open.
pub fn soap_statistics_cuda(gg: &Tensor, gram: &Tensor, w: f32, rec: Option<&StepRecord>) -> Result<()> {
    #[cfg(feature = "cuda")]
    {
        crate::kernels::cuda::ops::soap_statistics(gg, gram, w, rec.map(|r| &r.inner))
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (gg, gram, w, rec);
        Err(no_cuda())
    }
}

/// `dst` ← `src` (f32, same length) on the device: `dst` may be a view into a larger buffer,
/// written in place.
pub fn copy_into_cuda(dst: &Tensor, src: &Tensor) -> Result<()> {
    #[cfg(feature = "cuda")]
    {
        use crate::kernels::cuda::ops as gpu;
        if dst.numel() != src.numel() {
            return Err(crate::Error::shape("copy_into", format!("{} elements into {}", src.numel(), dst.numel())));
        }
        let d = gpu::dev_of(dst)?;
        let src = gpu::contiguous(src)?;
        let r = src.device_region(0, src.numel())?;
        d.copy(dst.device_region(0, dst.numel())?.ptr, r.ptr, r.bytes())
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (dst, src);
        Err(no_cuda())
    }
}

/// SOAP's Adam ratio `mp / (√v + eps)` on device buffers.
pub fn soap_ratio_cuda(mp: &Tensor, v: &Tensor, eps: f32) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    {
        crate::kernels::cuda::ops::soap_ratio(mp, v, eps)
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (mp, v, eps);
        Err(no_cuda())
    }
}

/// How large a SOAP update is and how much it decays: the host's step size and `keep`, or (a
/// step decided on the device) the gate's step size times the parameter's learning-rate
/// multiplier, rounded to f32 there as the host rounds it, and parameter i's staged `keep`.
#[derive(Clone, Copy)]
pub enum SoapStepSize<'a> {
    Host { step: f32, keep: f32 },
    Gate { rec: &'a StepRecord, scale: f64, staged: &'a StagedScalars, param: usize },
}

/// SOAP's update of one parameter on the device: `p ← (p − step·u)·keep` (nothing when a
/// gate is closed), with `normalize` (`normalize_grads`) u divided by its RMS first, taken on
/// the device; `p16`, the parameter's view of the bf16 copy (`ParamStore::flat_and_half_mut`),
/// written in the same pass.
pub fn soap_apply_cuda(p: &Tensor, u: &Tensor, step: SoapStepSize, normalize: bool, p16: Option<&Tensor>) -> Result<()> {
    #[cfg(feature = "cuda")]
    {
        let (step, gate) = match step {
            SoapStepSize::Host { step, keep } => ((step, keep), None),
            // The decay factors follow the learning rate in the staged cell: f64 words.
            SoapStepSize::Gate { rec, scale, staged, param } => {
                if param + 1 >= staged.words {
                    return Err(crate::Error::Msg(format!(
                        "soap: parameter {param}'s decay factor was not staged ({} values)",
                        staged.words
                    )));
                }
                ((0.0, 1.0), Some((&rec.inner, scale, staged.buf.ptr + 8 * (1 + param as u64))))
            }
        };
        crate::kernels::cuda::ops::soap_apply(p, u, step, normalize, p16, gate)
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (p, u, step, normalize, p16);
        Err(no_cuda())
    }
}

/// A step SGD decides on the GPU: the step's record, the clipping norm (0: none), the count of
/// applied steps on the device (the first applied one starts the momentum buffer), and the
/// cell the learning rate reaches the device through (see [`sgd_cuda`]).
pub struct SgdGate<'a> {
    pub rec: &'a StepRecord,
    pub max_norm: f64,
    pub t: &'a DeviceStepCount,
    pub lr: &'a DeviceLr,
}

/// One fused SGD step on device buffers (the arithmetic of dptrain-optim's CPU loop). With
/// `gate`, decided on the device: the non-finite check, the clipping and `first` there, bit for
/// bit as the host's own (`s.lr` and `s.first` are then not read). `segs` must carry the
/// multipliers ([`DeviceSegments::with_scales`]). `p16` as [`adamw_cuda`]'s.
pub fn sgd_cuda(
    p: &mut Tensor,
    g: &Tensor,
    buf: &mut Tensor,
    segs: &DeviceSegments,
    s: SgdStep,
    gate: Option<SgdGate>,
    p16: Option<&mut Tensor>,
) -> Result<()> {
    #[cfg(feature = "cuda")]
    {
        let gate = gate.map(|x| (&x.rec.inner, x.max_norm, &x.t.inner, &x.lr.inner));
        crate::kernels::cuda::ops::sgd(p, g, buf, &segs.table, s, gate, p16.map(|t| &*t))
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (p, g, buf, segs, s, gate, p16);
        Err(no_cuda())
    }
}

/// LAMB's scalars for one step (the C layout of `struct LambStep` in `kernels/cuda/optim.cu`).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LambStep {
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    /// 1 / (1 − β1ᵗ) with bias correction, else 1.
    pub c1: f32,
    /// 1 / √(1 − β2ᵗ) with bias correction, else 1.
    pub inv_sqrt_bc2: f32,
    /// Coupled decay λ (added to the direction), before the per-element decay multiplier.
    pub weight_decay: f32,
    /// Before the per-element learning-rate multiplier.
    pub lr: f32,
    /// φ: the weight norm is clamped to at most this.
    pub clamp: f32,
    /// Independent decay s_t·λ, applied to the parameter beside the update (0: coupled, where
    /// λ is in the direction).
    pub indep_decay: f32,
}

/// What LAMB's device gate takes besides the record: the clipping norm (0: none), the betas in
/// f64 (as the host computes the bias corrections) and whether it corrects them.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LambGateScalars {
    pub max_norm: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub correct_bias: bool,
}

/// A step LAMB decides on the GPU: the step's record, the gate's scalars, the step count on the
/// device, and the cell its learning rate and independent decay reach the device through
/// (staged as `DeviceLr::stage(lr, indep_decay)`; see [`lamb_cuda`]).
pub struct LambGate<'a> {
    pub rec: &'a StepRecord,
    pub gate: LambGateScalars,
    pub t: &'a DeviceStepCount,
    pub lr: &'a DeviceLr,
}

/// A step LARS decides on the GPU: the step's record, the clipping norm (0: none) and the cell
/// its learning rate reaches the device through (see [`lars_cuda`]).
pub struct LarsGate<'a> {
    pub rec: &'a StepRecord,
    pub max_norm: f64,
    pub lr: &'a DeviceLr,
}

/// LARS's scalars for one step (the C layout of `struct LarsStep` in `kernels/cuda/optim.cu`).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LarsStep {
    pub lr: f32,
    pub weight_decay: f32,
    pub momentum: f32,
    pub dampening: f32,
    pub trust_coefficient: f32,
    pub nesterov: bool,
}

/// One parameter's place in a flat buffer, for per-tensor reductions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    pub offset: usize,
    pub len: usize,
    /// More than one dimension (LARS adapts only these).
    pub matrix: bool,
}

/// Elements per chunk of a segment table: small enough that a big parameter spreads over many
/// blocks, large enough that a block's partial is worth a launch slot.
const SEG_CHUNK: usize = 8192;

/// The parameters' segments of a flat buffer, laid out for the device's per-tensor norms: the
/// buffer cut into chunks that never cross a parameter's boundary, uploaded once. Each step's
/// norms are then one reduction launch over all chunks and one finishing launch, whatever the
/// number of parameters.
pub struct DeviceSegments {
    #[cfg(feature = "cuda")]
    table: crate::kernels::cuda::ops::DevTable,
}

impl DeviceSegments {
    /// The chunk table of `segs` (in buffer order) on the device of `like`.
    pub fn new(segs: &[Segment], like: &Tensor) -> Result<DeviceSegments> {
        DeviceSegments::build(segs, None, like)
    }

    /// [`DeviceSegments::new`] with each segment's decay and learning-rate multipliers (one
    /// per segment, `lr` `None` = all 1): what the optimizers' update kernels (AdamW, SGD,
    /// LAMB, LARS) read, two floats per segment, once per chunk, instead of an array per
    /// element (GPT-124M: 0.65 GB each, on the device and again on the host that built it).
    pub fn with_scales(segs: &[Segment], decay: &[f32], lr: Option<&[f32]>, like: &Tensor) -> Result<DeviceSegments> {
        if decay.len() != segs.len() || lr.is_some_and(|l| l.len() != segs.len()) {
            let lr_len = lr.map_or("no".to_string(), |l| l.len().to_string());
            return Err(crate::error::Error::Msg(format!(
                "{} decay and {lr_len} learning-rate multipliers for {} segments",
                decay.len(),
                segs.len()
            )));
        }
        let scales: Vec<f32> = (0..segs.len()).flat_map(|s| [decay[s], lr.map_or(1.0, |l| l[s])]).collect();
        DeviceSegments::build(segs, Some(&scales), like)
    }

    fn build(segs: &[Segment], scales: Option<&[f32]>, like: &Tensor) -> Result<DeviceSegments> {
        let mut chunks: Vec<i64> = vec![];
        let mut first: Vec<i64> = vec![];
        for (s, seg) in segs.iter().enumerate() {
            first.push((chunks.len() / 4) as i64);
            let mut at = seg.offset;
            while at < seg.offset + seg.len {
                let end = (at + SEG_CHUNK).min(seg.offset + seg.len);
                chunks.extend([at as i64, end as i64, s as i64, seg.matrix as i64]);
                at = end;
            }
        }
        let nchunks = chunks.len() / 4;
        first.push(nchunks as i64);
        chunks.extend(first);
        #[cfg(feature = "cuda")]
        {
            Ok(DeviceSegments { table: crate::kernels::cuda::ops::upload_table(like, &chunks, nchunks, segs.len(), scales)? })
        }
        #[cfg(not(feature = "cuda"))]
        {
            let _ = (like, chunks, scales);
            Err(no_cuda())
        }
    }
}

/// What [`segment_sums`] adds up over each parameter's segment of two flat buffers `a`, `b`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum SegSum {
    /// (Σa², Σb²).
    Squares,
    /// (Σ(a − b)², Σb²): a change (parameters now vs before, or vs their initial values) and
    /// the size of what it is measured against.
    Diff,
    /// Adam's moments `a = m`, `b = v` with bias corrections `c1 = 1/(1 − β1ᵗ)`,
    /// `c2 = 1/(1 − β2ᵗ)`: (#{√v̂ < ε}, Σ(m̂ / (√v̂ + ε))²) — how much of the second moment sits
    /// below ε, and the unscaled update's size (Wortsman et al. 2023's ε probe).
    Adam { c1: f32, c2: f32, eps: f32 },
}

/// Per-segment sums of `what` over the flat f32 buffers `a` and `b` (same length, same device),
/// in segment order, accumulated in f64 on the host (in f32 within a chunk, then f64, on a GPU,
/// where `dev` must be the segments' device table). Probes read these on the steps that log
/// them; a GPU call ends in one small download.
pub fn segment_sums(a: &Tensor, b: &Tensor, segs: &[Segment], dev: Option<&DeviceSegments>, what: SegSum) -> Result<Vec<[f64; 2]>> {
    if a.numel() != b.numel() {
        return Err(crate::error::Error::Msg(format!("segment_sums over buffers of {} and {} elements", a.numel(), b.numel())));
    }
    #[cfg(feature = "cuda")]
    if a.is_cuda() {
        let table = dev.ok_or_else(|| crate::error::Error::Msg("segment_sums on a GPU needs the device segments".into()))?;
        let (mode, c1, c2, eps) = match what {
            SegSum::Squares => (0, 1.0, 1.0, 0.0),
            SegSum::Diff => (1, 1.0, 1.0, 0.0),
            SegSum::Adam { c1, c2, eps } => (2, c1, c2, eps),
        };
        let roots = crate::kernels::cuda::ops::segment_probe(a, b, &table.table, mode, c1, c2, eps)?.to_vec::<f32>()?;
        return Ok(roots.chunks(2).take(segs.len()).map(|r| [(r[0] as f64).powi(2), (r[1] as f64).powi(2)]).collect());
    }
    let _ = dev;
    let (x, y) = (a.data::<f32>()?, b.data::<f32>()?);
    use rayon::prelude::*;
    Ok(segs
        .par_iter()
        .map(|s| {
            let (x, y) = (&x[s.offset..s.offset + s.len], &y[s.offset..s.offset + s.len]);
            let mut acc = [0.0f64; 2];
            for (&a, &b) in x.iter().zip(y) {
                let (a, b) = (a as f64, b as f64);
                let (p, q) = match what {
                    SegSum::Squares => (a * a, b * b),
                    SegSum::Diff => ((a - b) * (a - b), b * b),
                    SegSum::Adam { c1, c2, eps } => {
                        let r = (b * c2 as f64).sqrt();
                        let u = a * c1 as f64 / (r + eps as f64);
                        ((r < eps as f64) as u8 as f64, u * u)
                    }
                };
                acc[0] += p;
                acc[1] += q;
            }
            acc
        })
        .collect())
}

/// One fused LAMB step on device buffers (`r`: a scratch buffer of the parameters' size for
/// the direction, whose norm sets the trust ratio before any parameter moves). With `gate`,
/// decided on the device: the non-finite check, clipping, step count and bias corrections
/// there, bit for bit as the host's own (`s.c1`, `s.inv_sqrt_bc2`, `s.lr` and `s.indep_decay`
/// are then not read). `segs` must carry the multipliers ([`DeviceSegments::with_scales`]).
/// `p16` as [`adamw_cuda`]'s.
#[allow(clippy::too_many_arguments)]
pub fn lamb_cuda(
    p: &mut Tensor,
    g: &Tensor,
    m: &mut Tensor,
    v: &mut Tensor,
    r: &mut Tensor,
    segs: &DeviceSegments,
    s: LambStep,
    gate: Option<LambGate>,
    p16: Option<&mut Tensor>,
) -> Result<()> {
    #[cfg(feature = "cuda")]
    {
        let gate = gate.map(|x| (&x.rec.inner, x.gate, &x.t.inner, &x.lr.inner));
        crate::kernels::cuda::ops::lamb(p, g, m, v, r, &segs.table, s, gate, p16.map(|t| &*t))
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (p, g, m, v, r, segs, s, gate, p16);
        Err(no_cuda())
    }
}

/// One fused LARS step on device buffers. With `gate`, decided on the device: the non-finite
/// check and the clipping there, the gradient's norms taken of the clipped gradient as the
/// host path's (`s.lr` is then not read). `segs` must carry the multipliers
/// ([`DeviceSegments::with_scales`]). `p16` as [`adamw_cuda`]'s.
#[allow(clippy::too_many_arguments)]
pub fn lars_cuda(
    p: &mut Tensor,
    g: &Tensor,
    buf: &mut Tensor,
    segs: &DeviceSegments,
    s: LarsStep,
    gate: Option<LarsGate>,
    p16: Option<&mut Tensor>,
) -> Result<()> {
    #[cfg(feature = "cuda")]
    {
        let gate = gate.map(|x| (&x.rec.inner, x.max_norm, &x.lr.inner));
        crate::kernels::cuda::ops::lars(p, g, buf, &segs.table, s, gate, p16.map(|t| &*t))
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (p, g, buf, segs, s, gate, p16);
        Err(no_cuda())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segment_multipliers_must_be_one_per_segment() {
        let like = Tensor::from_vec(vec![0.0f32; 5], &[5]).unwrap();
        let segs = [Segment { offset: 0, len: 3, matrix: true }, Segment { offset: 3, len: 2, matrix: false }];
        let e = DeviceSegments::with_scales(&segs, &[1.0; 5], None, &like).err().unwrap().to_string();
        assert!(e.contains("5 decay and no learning-rate multipliers for 2 segments"), "{e}");
        let e = DeviceSegments::with_scales(&segs, &[1.0; 2], Some(&[1.0]), &like).err().unwrap().to_string();
        assert!(e.contains("2 decay and 1 learning-rate multipliers for 2 segments"), "{e}");
    }

    #[test]
    fn segment_sums_on_the_host() {
        let a = Tensor::from_vec(vec![1.0f32, 2.0, 3.0, 0.5, -1.0], &[5]).unwrap();
        let b = Tensor::from_vec(vec![1.0f32, 0.0, 1.0, 1e-8, 4.0], &[5]).unwrap();
        let segs = [Segment { offset: 0, len: 3, matrix: true }, Segment { offset: 3, len: 2, matrix: false }];
        assert_eq!(segment_sums(&a, &b, &segs, None, SegSum::Squares).unwrap(), vec![[14.0, 2.0], [1.25, (1e-8f32 as f64).powi(2) + 16.0]]);
        assert_eq!(
            segment_sums(&a, &b, &segs, None, SegSum::Diff).unwrap(),
            vec![[0.0 + 4.0 + 4.0, 2.0], [(0.5 - 1e-8f32 as f64).powi(2) + 25.0, (1e-8f32 as f64).powi(2) + 16.0]]
        );
        // c2 = 4: √v̂ = 2√v; ε = 1e-3: only v = 0 and v = 1e-8 (√v̂ = 2e-4) are below it.
        let adam = segment_sums(&a, &b, &segs, None, SegSum::Adam { c1: 2.0, c2: 4.0, eps: 1e-3 }).unwrap();
        assert_eq!(adam[0][0], 1.0);
        assert_eq!(adam[1][0], 1.0);
        let u = |m: f64, v: f64| 2.0 * m / ((4.0 * v).sqrt() + 1e-3f32 as f64);
        let want = u(1.0, 1.0).powi(2) + u(2.0, 0.0).powi(2) + u(3.0, 1.0).powi(2);
        assert!((adam[0][1] - want).abs() < 1e-9 * want, "{} vs {want}", adam[0][1]);
    }
}
