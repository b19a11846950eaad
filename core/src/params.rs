//! `ParamStore`: every trainable parameter in one fixed, deterministic order, with a `ParamId`,
//! a dotted PyTorch-style name, and μP metadata (role, fan-in, fan-out). Values live in **one
//! flat buffer** and each parameter is a view at a fixed offset, so a data-parallel bucket is a
//! contiguous slice and an optimizer updates everything in one pass. `GradStore` mirrors the
//! layout for gradients. Non-trainable buffers (batch-norm running statistics) sit beside the
//! parameters, also in a fixed order, so they are checkpointed and broadcast like parameters.

use crate::error::{Error, Result};
use crate::rng::Rng;
use crate::tensor::{DType, Elem, Tensor};
use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

/// Index of a parameter in its store (position in the deterministic order).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
pub struct ParamId(pub usize);

/// μP role of a parameter (Yang et al., Tensor Programs V): how its init and LR scale with width.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Role {
    /// Maps a finite dimension to width (embeddings, first layer).
    Input,
    /// Width to width.
    Hidden,
    /// Width to a finite dimension (readout).
    Output,
    /// Biases and norm gains.
    Vector,
}

/// How a parameter is initialised.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum Init {
    Normal {
        std: f64,
    },
    Uniform {
        bound: f64,
    },
    Const(f64),
    /// Normal, then the first `zeros` elements set to zero (the query rows of a fused q|k|v
    /// projection under μP's zero-initialised query).
    NormalZeroPrefix {
        std: f64,
        zeros: usize,
    },
}

impl Init {
    /// The same distribution with its spread multiplied by `k` (constants unchanged).
    pub fn scaled(self, k: f64) -> Init {
        match self {
            Init::Normal { std } => Init::Normal { std: std * k },
            Init::Uniform { bound } => Init::Uniform { bound: bound * k },
            Init::NormalZeroPrefix { std, zeros } => Init::NormalZeroPrefix { std: std * k, zeros },
            c @ Init::Const(_) => c,
        }
    }
    /// This distribution with the spread of `base` (the same parameter's init in μP's base
    /// model): for inits that depend on the fan-in, the base width's.
    pub fn with_spread_of(self, base: Init) -> Init {
        match (self, base) {
            (Init::Const(c), _) => Init::Const(c),
            (_, Init::Const(c)) => Init::Const(c),
            (Init::Uniform { .. }, b) => Init::Uniform { bound: b.std() * 3f64.sqrt() },
            (Init::NormalZeroPrefix { zeros, .. }, b) => Init::NormalZeroPrefix { std: b.std(), zeros },
            (Init::Normal { .. }, b) => Init::Normal { std: b.std() },
        }
    }
    /// The standard deviation of the distribution (0 for a constant).
    pub fn std(self) -> f64 {
        match self {
            Init::Normal { std } | Init::NormalZeroPrefix { std, .. } => std,
            Init::Uniform { bound } => bound / 3f64.sqrt(),
            Init::Const(_) => 0.0,
        }
    }
}

/// μP (Yang et al., Tensor Programs V) as PyPI `mup` 1.0.0 applies it, for the parameter
/// builder: each parameter is compared with the same-named parameter of the *base model* (the
/// same architecture at the base width); a dimension that differs is "infinite" (a width
/// dimension). Inits are the base model's (its spread, for inits that depend on the fan-in) with
/// two changes: matrices with two infinite dims
/// (hidden weights) get their spread divided by √m, m = the fan-in's width multiplier (`mup.init`),
/// and with `zero_readout` the readout (role `Output`) and its bias start at zero. Everything
/// else — embeddings, input layers, readout, biases, norm gains — keeps its base init, so the
/// model at the base width is the standard one. Learning-rate multipliers are the optimizer's
/// business (from [`ParamInfo::width_mult`] and friends); the readout's 1/m output multiplier
/// the model's.
#[derive(Debug, Clone, Default)]
pub struct Mup {
    /// Every parameter's shape and init in the base model, by name.
    pub base: HashMap<String, (Vec<usize>, Init)>,
    pub zero_readout: bool,
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct ParamInfo {
    pub id: ParamId,
    pub name: String,
    pub shape: Vec<usize>,
    pub offset: usize,
    pub numel: usize,
    pub role: Role,
    pub fan_in: usize,
    pub fan_out: usize,
    pub init: Init,
    /// For a bias: the weight it belongs to (μP treats it with its layer).
    #[serde(default)]
    pub owner: Option<ParamId>,
    /// Under μP: the parameter's shape in the base model (a differing dim is a width dim).
    #[serde(default)]
    pub base_shape: Option<Vec<usize>>,
}

impl ParamInfo {
    /// Which dims are width ("infinite") dims: those that differ from the base shape.
    pub fn inf_dims(&self) -> Vec<bool> {
        match &self.base_shape {
            Some(b) => self.shape.iter().zip(b).map(|(d, bd)| d != bd).collect(),
            None => vec![false; self.shape.len()],
        }
    }
    /// How many dims are width dims (mup's `ninf`).
    pub fn ninf(&self) -> usize {
        self.inf_dims().iter().filter(|&&x| x).count()
    }
    fn dim_mult(&self, i: usize) -> f64 {
        match &self.base_shape {
            Some(b) if b[i] != self.shape[i] => self.shape[i] as f64 / b[i] as f64,
            _ => 1.0,
        }
    }
    /// mup's `width_mult`: the multiplier of the last width dim (the fan-in of a matrix), 1 when
    /// there is none.
    pub fn width_mult(&self) -> f64 {
        self.inf_dims().iter().rposition(|&x| x).map_or(1.0, |i| self.dim_mult(i))
    }
    /// mup's `fanin_fanout_mult_ratio` (dims 1 and 0 of a matrix): MuSGD divides a hidden
    /// matrix's learning rate by it.
    pub fn fanin_fanout_mult_ratio(&self) -> f64 {
        if self.shape.len() < 2 {
            return 1.0;
        }
        self.dim_mult(1) / self.dim_mult(0)
    }
}

/// Collects parameter declarations from a model's constructor.
#[derive(Default)]
pub struct ParamBuilder {
    infos: Vec<ParamInfo>,
    buffers: Vec<(String, Vec<usize>, f64)>,
    total: usize,
    prefix: Vec<String>,
    mup: Option<Mup>,
    /// Parameters the base model lacks (or has with another rank), reported by `build`.
    mup_errors: Vec<String>,
    /// The first parameter whose size (or the running total) overflowed `usize`, reported by
    /// `build` instead of wrapping into a wrong layout.
    too_large: Option<String>,
}

/// Index of a non-trainable buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct BufferId(pub usize);

impl ParamBuilder {
    pub fn new() -> Self {
        Self::default()
    }
    /// Runs `f` with `name` pushed on the dotted-name prefix.
    pub fn scope<R>(&mut self, name: impl Into<String>, f: impl FnOnce(&mut Self) -> R) -> R {
        self.prefix.push(name.into());
        let r = f(self);
        self.prefix.pop();
        r
    }
    fn full_name(&self, name: &str) -> String {
        let mut s = self.prefix.join(".");
        if !s.is_empty() {
            s.push('.');
        }
        s.push_str(name);
        s
    }
    /// Declares parameters under μP relative to `mup.base_shapes` from now on.
    pub fn set_mup(&mut self, mup: Mup) {
        self.mup = Some(mup);
    }
    /// Every declared parameter's shape and init, by name (what a base model gives [`Mup::base`]).
    pub fn declarations(&self) -> HashMap<String, (Vec<usize>, Init)> {
        self.infos.iter().map(|p| (p.name.clone(), (p.shape.clone(), p.init))).collect()
    }
    /// The declarations so far.
    pub fn infos(&self) -> &[ParamInfo] {
        &self.infos
    }
    pub fn add(&mut self, name: &str, shape: &[usize], role: Role, fan_in: usize, fan_out: usize, init: Init) -> ParamId {
        self.push(name, shape, role, fan_in, fan_out, init, None)
    }
    /// A bias `[n]` of the layer whose weight is `owner` (role `Vector`).
    pub fn add_bias(&mut self, name: &str, n: usize, owner: ParamId, init: Init) -> ParamId {
        self.push(name, &[n], Role::Vector, 1, n, init, Some(owner))
    }
    #[allow(clippy::too_many_arguments)]
    fn push(
        &mut self,
        name: &str,
        shape: &[usize],
        role: Role,
        fan_in: usize,
        fan_out: usize,
        init: Init,
        owner: Option<ParamId>,
    ) -> ParamId {
        let id = ParamId(self.infos.len());
        let full = self.full_name(name);
        let numel = match shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d)).filter(|n| self.total.checked_add(*n).is_some()) {
            Some(n) => n,
            None => {
                self.too_large.get_or_insert_with(|| format!("{full}: shape {shape:?} has more elements than this machine can address"));
                0
            }
        };
        let mut info = ParamInfo {
            id,
            name: full.clone(),
            shape: shape.to_vec(),
            offset: self.total,
            numel,
            role,
            fan_in,
            fan_out,
            init,
            owner,
            base_shape: None,
        };
        if let Some(m) = &self.mup {
            match m.base.get(&full) {
                Some((b, base_init)) if b.len() == shape.len() => {
                    info.base_shape = Some(b.clone());
                    let readout = role == Role::Output || owner.is_some_and(|o| self.infos[o.0].role == Role::Output);
                    info.init = if m.zero_readout && readout {
                        Init::Const(0.0)
                    } else if info.ninf() == 2 {
                        init.with_spread_of(*base_init).scaled(info.width_mult().powf(-0.5))
                    } else {
                        init.with_spread_of(*base_init)
                    };
                }
                Some((b, _)) => self.mup_errors.push(format!("{full}: shape {shape:?} against {b:?} in the base model")),
                None => self.mup_errors.push(format!("{full}: not in the base model")),
            }
        }
        self.infos.push(info);
        self.total += numel;
        id
    }
    /// Each parameter's initial values, drawn in f64 from its own stream and rounded once into
    /// `out`'s type: no f64 copy of the whole model (twice an f32 model's size) on the way.
    fn init_into<T: Elem>(&self, seed: u64, out: &mut [T]) {
        for p in &self.infos {
            let mut rng = Rng::stream(seed, p.id.0 as u64);
            let dst = &mut out[p.offset..p.offset + p.numel];
            match p.init {
                Init::Normal { std } => dst.iter_mut().for_each(|x| *x = T::of(rng.normal() * std)),
                Init::Uniform { bound } => dst.iter_mut().for_each(|x| *x = T::of((2.0 * rng.uniform() - 1.0) * bound)),
                Init::Const(c) => dst.fill(T::of(c)),
                Init::NormalZeroPrefix { std, zeros } => {
                    dst.iter_mut().for_each(|x| *x = T::of(rng.normal() * std));
                    let z = zeros.min(dst.len());
                    dst[..z].fill(T::of(0.0));
                }
            }
        }
    }
    pub fn add_buffer(&mut self, name: &str, shape: &[usize], value: f64) -> BufferId {
        let n = self.full_name(name);
        self.buffers.push((n, shape.to_vec(), value));
        BufferId(self.buffers.len() - 1)
    }
    /// Allocates the flat buffer and initialises each parameter from its own RNG stream
    /// (seed, parameter index), so values do not depend on thread count or visiting order.
    pub fn build(self, seed: u64, dtype: DType) -> Result<ParamStore> {
        if let Some(e) = self.mup_errors.first() {
            return Err(Error::Config { key: "mup".into(), msg: format!("base model mismatch: {e}") });
        }
        if let Some(m) = &self.mup {
            if let Some(extra) = m.base.keys().find(|k| !self.infos.iter().any(|p| &&p.name == k)) {
                return Err(Error::Config { key: "mup".into(), msg: format!("base model mismatch: {extra} is not in the model") });
            }
        }
        if let Some(e) = &self.too_large {
            return Err(Error::Config { key: "model".into(), msg: e.clone() });
        }
        let values = match dtype {
            DType::F32 => Tensor::build::<f32>(&[self.total], |o| self.init_into(seed, o)),
            DType::F64 => Tensor::build::<f64>(&[self.total], |o| self.init_into(seed, o)),
            DType::BF16 => Tensor::build::<half::bf16>(&[self.total], |o| self.init_into(seed, o)),
        };
        let by_name = self.infos.iter().map(|p| (p.name.clone(), p.id)).collect();
        let buffers = self.buffers.into_iter().map(|(name, shape, v)| (name, Mutex::new(Tensor::full(&shape, v, dtype)))).collect();
        Ok(ParamStore { infos: self.infos, values, by_name, buffers, dtype, half: None, want_half: AtomicBool::new(false) })
    }
}

pub struct ParamStore {
    infos: Vec<ParamInfo>,
    values: Tensor,
    by_name: HashMap<String, ParamId>,
    buffers: Vec<(String, Mutex<Tensor>)>,
    dtype: DType,
    /// A bf16 copy of `values` on a GPU, kept equal to their rounding by the optimizer that
    /// writes both in one pass (AdamW), so bf16 GEMMs read the weights without casting them.
    /// Present only while it is that: anything else that may change the values drops it.
    half: Option<Tensor>,
    /// A bf16 forward asked for parameters (`Tape::param`): the optimizer then keeps `half`.
    want_half: AtomicBool,
}

impl ParamStore {
    pub fn infos(&self) -> &[ParamInfo] {
        &self.infos
    }
    pub fn info(&self, id: ParamId) -> &ParamInfo {
        &self.infos[id.0]
    }
    pub fn len(&self) -> usize {
        self.infos.len()
    }
    pub fn is_empty(&self) -> bool {
        self.infos.is_empty()
    }
    pub fn numel(&self) -> usize {
        self.values.numel()
    }
    pub fn dtype(&self) -> DType {
        self.dtype
    }
    pub fn device(&self) -> crate::tensor::Device {
        self.values.device()
    }
    /// Moves the values and buffers to `device` (f32 there for CUDA).
    pub fn to_device(&mut self, device: crate::tensor::Device) -> Result<()> {
        self.half = None;
        self.values = self.values.to_device(device)?;
        for (_, b) in &mut self.buffers {
            let b = b.get_mut().map_err(|_| Error::Msg("parameter buffer lock poisoned".into()))?;
            *b = b.to_device(device)?;
        }
        Ok(())
    }
    /// The flat value tensor for in-place updates on any device (optimizers' fused kernels);
    /// fails while an autograd tape still holds parameter views.
    pub fn flat_tensor_mut(&mut self) -> Result<&mut Tensor> {
        if !self.values.is_unique() {
            return Err(Error::Msg("parameter storage is shared (is an autograd tape still alive?)".into()));
        }
        // The caller may change the values without their bf16 copy.
        self.half = None;
        Ok(&mut self.values)
    }

    /// The flat values and, on a GPU after a bf16 forward asked for parameters, their bf16 copy
    /// (made here by one cast when there is none): for an optimizer whose fused pass writes
    /// both, keeping the copy equal to the values' rounding. Fails while a tape holds views.
    pub fn flat_and_half_mut(&mut self) -> Result<(&mut Tensor, Option<&mut Tensor>)> {
        if !self.values.is_unique() || self.half.as_mut().is_some_and(|h| !h.is_unique()) {
            return Err(Error::Msg("parameter storage is shared (is an autograd tape still alive?)".into()));
        }
        #[cfg(feature = "cuda")]
        if self.values.is_cuda() {
            if !crate::kernels::cuda::ops::dev_of(&self.values)?.fusions().weight_copy {
                self.half = None;
            } else if self.half.is_none() && self.want_half.load(Ordering::Relaxed) {
                self.half = Some(crate::kernels::cuda::ops::cast(&self.values, DType::BF16)?);
            }
        }
        Ok((&mut self.values, self.half.as_mut()))
    }

    /// Parameter `id` as a view of the bf16 copy, when there is one (see
    /// [`flat_and_half_mut`](Self::flat_and_half_mut)).
    pub fn half(&self, id: ParamId) -> Option<Tensor> {
        let p = &self.infos[id.0];
        self.half.as_ref().and_then(|h| h.view_at(p.offset, &p.shape).ok())
    }

    /// The whole bf16 copy, when there is one (its address is part of what a CUDA graph of the
    /// training step baked in).
    pub fn half_flat(&self) -> Option<&Tensor> {
        self.half.as_ref()
    }

    /// Asks for the bf16 copy (a bf16 forward read parameters; see `Tape::param`).
    pub(crate) fn want_half(&self) {
        self.want_half.store(true, Ordering::Relaxed);
    }
    pub fn id(&self, name: &str) -> Option<ParamId> {
        self.by_name.get(name).copied()
    }
    /// A parameter's value as a view of the flat buffer.
    pub fn get(&self, id: ParamId) -> Tensor {
        let p = &self.infos[id.0];
        self.values.view_at(p.offset, &p.shape).expect("layout is consistent by construction")
    }
    /// The flat value buffer (all parameters, store order).
    pub fn flat(&self) -> &Tensor {
        &self.values
    }
    /// Mutable flat values; fails while an autograd tape still holds parameter views.
    pub fn flat_mut<T: Elem>(&mut self) -> Result<&mut [T]> {
        self.half = None;
        self.values.data_mut::<T>()
    }
    pub fn buffers(&self) -> impl Iterator<Item = (&str, &Mutex<Tensor>)> {
        self.buffers.iter().map(|(n, t)| (n.as_str(), t))
    }
    pub fn buffer(&self, id: BufferId) -> &Mutex<Tensor> {
        &self.buffers[id.0].1
    }

    /// A string that identifies the layout (names, shapes, dtype, order): equal on every rank of
    /// a correctly configured job.
    pub fn layout_fingerprint(&self) -> String {
        let mut s = format!("dtype={};", self.dtype);
        for p in &self.infos {
            s.push_str(&format!("{}:{:?}@{};", p.name, p.shape, p.offset));
        }
        for (n, b) in &self.buffers {
            s.push_str(&format!("buf {}:{:?};", n, b.lock().unwrap_or_else(|e| e.into_inner()).shape()));
        }
        s
    }

    /// Named tensors (parameters, then buffers) in store order, as f32 copies on the CPU
    /// (one download of the flat buffer when the store lives on a GPU).
    pub fn named_tensors(&self) -> Result<Vec<(String, Tensor)>> {
        let flat = self.values.to_device(crate::tensor::Device::Cpu)?;
        let mut v = Vec::with_capacity(self.infos.len() + self.buffers.len());
        for p in &self.infos {
            v.push((p.name.clone(), flat.view_at(p.offset, &p.shape)?.contiguous()));
        }
        for (n, b) in &self.buffers {
            v.push((n.clone(), b.lock().unwrap_or_else(|e| e.into_inner()).to_device(crate::tensor::Device::Cpu)?));
        }
        Ok(v)
    }

    /// Writes all parameters and buffers to a safetensors file (f32, PyTorch-style names).
    pub fn save_safetensors(&self, path: &Path) -> Result<()> {
        let bytes = crate::checkpoint::tensors_to_bytes(&self.named_tensors()?)?;
        crate::checkpoint::atomic_write(path, &bytes)
    }

    /// Loads parameters and buffers by name; every name must be present with the right shape.
    pub fn load_safetensors(&mut self, path: &Path) -> Result<()> {
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        let map = crate::checkpoint::tensors_from_bytes(&bytes).map_err(|e| Error::file(path, e.to_string()))?;
        self.load_named(&map).map_err(|e| Error::file(path, e.to_string()))
    }

    /// Sets values from named tensors (all names required, shapes checked before any write).
    pub fn load_named(&mut self, map: &HashMap<String, Tensor>) -> Result<()> {
        self.half = None;
        for p in &self.infos {
            let t = map.get(&p.name).ok_or_else(|| Error::Msg(format!("missing tensor `{}`", p.name)))?;
            if t.shape() != p.shape.as_slice() {
                return Err(Error::Msg(format!("tensor `{}` has shape {:?}, expected {:?}", p.name, t.shape(), p.shape)));
            }
        }
        for (n, b) in &self.buffers {
            let t = map.get(n).ok_or_else(|| Error::Msg(format!("missing buffer `{n}`")))?;
            if t.shape() != b.lock().unwrap_or_else(|e| e.into_inner()).shape() {
                return Err(Error::Msg(format!("buffer `{n}` has the wrong shape {:?}", t.shape())));
            }
        }
        let dtype = self.dtype;
        let infos = self.infos.clone();
        match dtype {
            DType::F32 => write_named::<f32>(self.values.data_mut()?, &infos, map)?,
            DType::F64 => write_named::<f64>(self.values.data_mut()?, &infos, map)?,
            DType::BF16 => return Err(Error::Msg("bf16 parameter stores are not supported on CPU".into())),
        }
        for (n, b) in &self.buffers {
            *b.lock().unwrap_or_else(|e| e.into_inner()) = map[n].to_dtype(dtype);
        }
        Ok(())
    }
}

fn write_named<T: Elem>(flat: &mut [T], infos: &[ParamInfo], map: &HashMap<String, Tensor>) -> Result<()> {
    for p in infos {
        let v = map[&p.name].to_vec::<T>()?;
        flat[p.offset..p.offset + p.numel].copy_from_slice(&v);
    }
    Ok(())
}

/// Gradients in the same flat layout as a `ParamStore`.
pub struct GradStore {
    data: Tensor,
    ranges: Vec<(usize, usize)>,
    touched: Vec<bool>,
}

impl GradStore {
    /// A store for no parameters (tapes whose only gradients are leaves').
    pub fn empty() -> GradStore {
        GradStore { data: Tensor::zeros(&[0], DType::F32), ranges: vec![], touched: vec![] }
    }
    /// Zero gradients on the parameters' device. Panics only if device memory for them cannot
    /// be had; [`GradStore::try_new`] reports that as an error instead.
    pub fn new(params: &ParamStore) -> GradStore {
        Self::try_new(params).unwrap_or_else(|e| panic!("gradient store: {e}"))
    }

    pub fn try_new(params: &ParamStore) -> Result<GradStore> {
        Ok(GradStore {
            data: Tensor::zeros_on(&[params.numel()], params.dtype(), params.device())?,
            ranges: params.infos().iter().map(|p| (p.offset, p.numel)).collect(),
            touched: vec![true; params.len()],
        })
    }
    /// Marks every gradient as empty: the next contribution is moved (copied) in, not added.
    /// Cheap: no memset; untouched gradients are zero-filled when a backward pass finishes.
    pub fn zero_grad(&mut self) {
        self.touched.fill(false);
    }
    pub fn flat(&self) -> &Tensor {
        &self.data
    }
    /// The flat gradient tensor for in-place work on any device (clipping, the reducer).
    pub fn flat_tensor_mut(&mut self) -> &mut Tensor {
        &mut self.data
    }
    pub fn flat_mut<T: Elem>(&mut self) -> Result<&mut [T]> {
        self.data.data_mut::<T>()
    }
    pub fn get(&self, id: ParamId) -> &[f32] {
        let (o, n) = self.ranges[id.0];
        &self.data.data::<f32>().expect("f32 grads")[o..o + n]
    }
    pub fn range(&self, id: ParamId) -> (usize, usize) {
        self.ranges[id.0]
    }
    /// Mutable f32 elements `[start, start + len)` of the flat buffer, borrowing nothing else
    /// (the reducer writes one bucket back while others are still being read).
    pub fn region_mut(&mut self, start: usize, len: usize) -> Result<&mut [f32]> {
        self.data.region_mut::<f32>(start, len)
    }
    /// A parameter's gradient as a tensor of `shape` (copy).
    pub fn tensor(&self, id: ParamId, shape: &[usize]) -> Tensor {
        self.data.view_at(self.ranges[id.0].0, shape).expect("layout").contiguous()
    }

    /// Where an op may write parameter `id`'s gradient itself (a GPU GEMM straight into the
    /// flat buffer): its device address, and whether it must add to what is there (something
    /// contributed since `zero_grad`). `None` on the CPU.
    #[cfg(feature = "cuda")]
    pub(crate) fn sink(&self, id: ParamId) -> Option<crate::autograd::GradSink> {
        if !self.data.is_cuda() || !crate::kernels::cuda::ops::dev_of(&self.data).ok()?.fusions().grad_sink {
            return None;
        }
        let (o, n) = self.ranges[id.0];
        let r = self.data.device_region(o, n).ok()?;
        Some(crate::autograd::GradSink { ptr: r.ptr, len: n, accumulate: self.touched[id.0] })
    }

    /// Records that an op wrote (or added) parameter `id`'s gradient itself.
    pub(crate) fn mark_written(&mut self, id: ParamId) {
        self.touched[id.0] = true;
    }

    /// Adds (or, first time since `zero_grad`, copies) `g` into parameter `id`'s gradient.
    pub(crate) fn accumulate(&mut self, id: ParamId, g: &Tensor) -> Result<()> {
        let (o, n) = self.ranges[id.0];
        if g.numel() != n {
            return Err(Error::Autograd(format!("gradient of {} elements for a parameter of {n}", g.numel())));
        }
        let first = !self.touched[id.0];
        self.touched[id.0] = true;
        #[cfg(feature = "cuda")]
        if self.data.is_cuda() {
            use crate::kernels::cuda::ops as gpu;
            let d = gpu::dev_of(&self.data)?;
            return gpu::accumulate_raw(&d, self.data.device_region(o, n)?.ptr, g, n, !first);
        }
        let g = g.contiguous();
        // Only this parameter's region is borrowed: the reducer may be reading finished
        // parameters' regions from its communication thread meanwhile.
        match g.dtype() {
            DType::F32 => acc::<f32>(self.data.region_mut::<f32>(o, n)?, g.data::<f32>()?, first),
            DType::F64 => acc::<f64>(self.data.region_mut::<f64>(o, n)?, g.data::<f64>()?, first),
            DType::BF16 => return Err(Error::Msg("bf16 gradients are not supported on CPU".into())),
        }
        Ok(())
    }

    /// Zero-fills one parameter's gradient if nothing contributed to it since `zero_grad`.
    pub(crate) fn finish_one(&mut self, id: ParamId) -> Result<()> {
        if !self.touched[id.0] {
            let (o, n) = self.ranges[id.0];
            #[cfg(feature = "cuda")]
            if self.data.is_cuda() {
                use crate::kernels::cuda::ops as gpu;
                let d = gpu::dev_of(&self.data)?;
                gpu::fill_raw(&d, self.data.device_region(o, n)?.ptr, n, 0.0)?;
                self.touched[id.0] = true;
                return Ok(());
            }
            match self.data.dtype() {
                DType::F32 => self.data.region_mut::<f32>(o, n)?.fill(0.0),
                DType::F64 => self.data.region_mut::<f64>(o, n)?.fill(0.0),
                DType::BF16 => {}
            }
            self.touched[id.0] = true;
        }
        Ok(())
    }

    /// Zero-fills gradients nothing contributed to since `zero_grad`.
    pub(crate) fn finish(&mut self) -> Result<()> {
        for i in 0..self.ranges.len() {
            self.finish_one(ParamId(i))?;
        }
        Ok(())
    }
}

fn acc<T: Elem>(dst: &mut [T], g: &[T], first: bool) {
    if first {
        dst.copy_from_slice(g);
    } else {
        crate::kernels::cpu::add_assign(dst, g);
    }
}
