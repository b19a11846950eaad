//! Small layer helpers shared by the models: a layer is a set of `ParamId`s plus a forward
//! function that takes the tape and the store. Init follows PyTorch's defaults so results are
//! comparable with the same model written in torch.

use dptrain_core::ops::fused::batch_norm::RunningStats;
use dptrain_core::params::BufferId;
use dptrain_core::{DType, Init, ParamBuilder, ParamId, ParamStore, Result, Role, Tape, Var};

/// `nn.Linear(fan_in, fan_out, bias)`.
#[derive(Debug, Clone, Copy)]
pub struct Linear {
    pub w: ParamId,
    pub b: Option<ParamId>,
}

impl Linear {
    /// Declares `name.weight [out, in]` (and `name.bias`) with the given weight init; the bias
    /// starts at zero unless `bias_init` says otherwise.
    pub fn new(
        pb: &mut ParamBuilder,
        name: &str,
        fan_in: usize,
        fan_out: usize,
        bias: bool,
        role: Role,
        w_init: Init,
        bias_init: Init,
    ) -> Linear {
        pb.scope(name, |pb| Linear { w: pb.add("weight", &[fan_out, fan_in], role, fan_in, fan_out, w_init), b: None })
            .with_bias(pb, name, bias, fan_out, bias_init)
    }
    fn with_bias(mut self, pb: &mut ParamBuilder, name: &str, bias: bool, fan_out: usize, bias_init: Init) -> Linear {
        if bias {
            self.b = Some(pb.scope(name, |pb| pb.add_bias("bias", fan_out, self.w, bias_init)));
        }
        self
    }
    /// PyTorch's default init: U(±1/√fan_in) for weight and bias.
    pub fn torch_default(pb: &mut ParamBuilder, name: &str, fan_in: usize, fan_out: usize, bias: bool, role: Role) -> Linear {
        let bound = 1.0 / (fan_in as f64).sqrt();
        Self::new(pb, name, fan_in, fan_out, bias, role, Init::Uniform { bound }, Init::Uniform { bound })
    }
    pub fn forward<'t>(&self, tape: &'t Tape, ps: &ParamStore, x: Var<'t>) -> Result<Var<'t>> {
        x.linear(tape.param(ps, self.w), self.b.map(|b| tape.param(ps, b)))
    }
}

/// `nn.LayerNorm(dim, bias=bias)`.
#[derive(Debug, Clone, Copy)]
pub struct LayerNorm {
    pub w: ParamId,
    pub b: Option<ParamId>,
}

impl LayerNorm {
    pub fn new(pb: &mut ParamBuilder, name: &str, dim: usize, bias: bool) -> LayerNorm {
        pb.scope(name, |pb| LayerNorm {
            w: pb.add("weight", &[dim], Role::Vector, 1, dim, Init::Const(1.0)),
            b: bias.then(|| pb.add("bias", &[dim], Role::Vector, 1, dim, Init::Const(0.0))),
        })
    }
    pub fn forward<'t>(&self, tape: &'t Tape, ps: &ParamStore, x: Var<'t>) -> Result<Var<'t>> {
        x.layer_norm(Some(tape.param(ps, self.w)), self.b.map(|b| tape.param(ps, b)), 1e-5)
    }
}

/// The normalisation after a layer of the image models (`model.norm`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NormKind {
    None,
    /// Batch norm over the per-rank micro-batch.
    Batch,
    /// Ghost Batch Normalization over chunks of `ghost_batch` samples of the micro-batch.
    Ghost,
}

/// `nn.BatchNorm1d/2d(c)` with running statistics as store buffers; with `ghost`, Ghost Batch
/// Normalization (each chunk of that many samples normalised on its own in training).
#[derive(Debug, Clone, Copy)]
pub struct BatchNorm {
    pub w: ParamId,
    pub b: ParamId,
    pub mean: BufferId,
    pub var: BufferId,
    pub ghost: Option<usize>,
}

impl BatchNorm {
    pub fn new(pb: &mut ParamBuilder, name: &str, c: usize, ghost: Option<usize>) -> BatchNorm {
        pb.scope(name, |pb| BatchNorm {
            w: pb.add("weight", &[c], Role::Vector, 1, c, Init::Const(1.0)),
            b: pb.add("bias", &[c], Role::Vector, 1, c, Init::Const(0.0)),
            mean: pb.add_buffer("running_mean", &[c], 0.0),
            var: pb.add_buffer("running_var", &[c], 1.0),
            ghost,
        })
    }
    /// The layer `kind` asks for after a layer of `c` channels: `None` for no normalisation.
    pub fn of_kind(pb: &mut ParamBuilder, name: &str, c: usize, kind: NormKind, ghost_batch: usize) -> Option<BatchNorm> {
        match kind {
            NormKind::None => None,
            NormKind::Batch => Some(BatchNorm::new(pb, name, c, None)),
            NormKind::Ghost => Some(BatchNorm::new(pb, name, c, Some(ghost_batch))),
        }
    }
    pub fn forward<'t>(&self, tape: &'t Tape, ps: &ParamStore, x: Var<'t>, train: bool) -> Result<Var<'t>> {
        let stats = RunningStats { mean: ps.buffer(self.mean), var: ps.buffer(self.var), momentum: 0.1 };
        let (w, b) = (tape.param(ps, self.w), tape.param(ps, self.b));
        match self.ghost {
            Some(g) => x.ghost_batch_norm(w, b, stats, train, 1e-5, g),
            None => x.batch_norm(w, b, stats, train, 1e-5),
        }
    }
}

/// `x`, through `norm` when there is one.
pub fn maybe_norm<'t>(norm: &Option<BatchNorm>, tape: &'t Tape, ps: &ParamStore, x: Var<'t>, train: bool) -> Result<Var<'t>> {
    match norm {
        Some(n) => n.forward(tape, ps, x, train),
        None => Ok(x),
    }
}

/// Serde default of multipliers that are derived, not configured.
pub fn one() -> f64 {
    1.0
}

/// The readout's input times `mult` (μP's output multiplier); untouched when it is 1, so the
/// standard parametrization computes exactly what it did without the option.
pub fn readout_input(x: Var<'_>, mult: f64) -> Result<Var<'_>> {
    if mult == 1.0 {
        Ok(x)
    } else {
        x.scale(mult)
    }
}

/// Root-mean-square of a value (a probe; not differentiated).
pub fn rms(v: &Var<'_>) -> f64 {
    let t = v.value();
    if t.is_cuda() {
        let n = t.numel().max(1);
        return dptrain_core::ops::flat::sum_squares(&t).map(|ss| (ss / n as f64).sqrt()).unwrap_or(f64::NAN);
    }
    let t = t.contiguous();
    let (ss, n) = match t.dtype() {
        DType::F32 => t.data::<f32>().map(|d| (d.iter().map(|&x| (x * x) as f64).sum::<f64>(), d.len())).unwrap_or((0.0, 0)),
        _ => t.to_vec::<f64>().map(|d| (d.iter().map(|x| x * x).sum::<f64>(), d.len())).unwrap_or((0.0, 0)),
    };
    if n == 0 {
        0.0
    } else {
        (ss / n as f64).sqrt()
    }
}
