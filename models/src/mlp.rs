//! MLP classifier: flattened input → [Linear (→ batch norm or Ghost BN) → ReLU (→ Dropout)] ×
//! depth → Linear head. PyTorch default init. Probes: `resid_rms/<layer>` (activation RMS after each hidden
//! layer), `logit_mean`, `log_z`, `acc` (top-1 accuracy of the batch).

use crate::nn::{rms, BatchNorm, Linear, NormKind};
use dptrain_core::model::{Batch, Model};
use dptrain_core::probe::{record_coord, ProbeSink, Reduce};
use dptrain_core::{Error, ParamBuilder, ParamStore, Result, Role, Tape, Tensor, Var};

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MlpConfig {
    /// Input features (e.g. 784 for 28×28 images); must match the data's C·H·W.
    pub input_dim: usize,
    /// Hidden widths, one per hidden layer.
    pub widths: Vec<usize>,
    pub classes: usize,
    /// Normalisation after each hidden Linear (which then has no bias).
    pub norm: NormKind,
    /// Samples per ghost batch (`norm = Ghost`).
    pub ghost_batch: usize,
    /// Dropout probability after each hidden activation; 0 = off. Only in training.
    #[serde(default)]
    pub dropout: f64,
    /// Multiplies the readout's input (μP: output_mult / width multiplier; 1 = standard).
    #[serde(skip, default = "crate::nn::one")]
    pub readout_mult: f64,
}

impl Default for MlpConfig {
    fn default() -> Self {
        MlpConfig {
            input_dim: 784,
            widths: vec![1024, 1024],
            classes: 10,
            norm: NormKind::None,
            ghost_batch: 128,
            dropout: 0.0,
            readout_mult: 1.0,
        }
    }
}

pub struct Mlp {
    pub cfg: MlpConfig,
    layers: Vec<(Linear, Option<BatchNorm>)>,
    head: Linear,
}

impl MlpConfig {
    /// How many parameters [`Mlp::new`] declares, from the config alone (see
    /// [`crate::GptConfig::param_count`]).
    pub fn param_count(&self) -> f64 {
        // A hidden layer has a bias without normalisation, a norm's gain and bias with it.
        let per_width = if self.norm == NormKind::None { 1.0 } else { 2.0 };
        let mut fan_in = self.input_dim as f64;
        let mut n = 0.0;
        for &w in &self.widths {
            n += fan_in * w as f64 + per_width * w as f64;
            fan_in = w as f64;
        }
        n + fan_in * self.classes as f64 + self.classes as f64
    }
}

impl Mlp {
    pub fn new(cfg: MlpConfig, pb: &mut ParamBuilder) -> Result<Mlp> {
        if cfg.input_dim == 0 || cfg.classes == 0 || cfg.widths.contains(&0) {
            return Err(Error::Config { key: "model".into(), msg: "mlp input_dim, widths and classes must be positive".into() });
        }
        if !(0.0..1.0).contains(&cfg.dropout) {
            return Err(Error::Config { key: "model.dropout".into(), msg: format!("must be in [0, 1), got {}", cfg.dropout) });
        }
        let mut fan_in = cfg.input_dim;
        let mut layers = vec![];
        for (i, &w) in cfg.widths.iter().enumerate() {
            let role = if i == 0 { Role::Input } else { Role::Hidden };
            let bias = cfg.norm == NormKind::None;
            let lin = pb.scope("layers", |pb| Linear::torch_default(pb, &i.to_string(), fan_in, w, bias, role));
            let bn = pb.scope("bn", |pb| BatchNorm::of_kind(pb, &i.to_string(), w, cfg.norm, cfg.ghost_batch));
            layers.push((lin, bn));
            fan_in = w;
        }
        let head = Linear::torch_default(pb, "head", fan_in, cfg.classes, true, Role::Output);
        Ok(Mlp { cfg, layers, head })
    }
}

impl Model for Mlp {
    fn loss<'t>(&self, tape: &'t Tape, ps: &ParamStore, batch: &Batch, train: bool, probes: &mut dyn ProbeSink) -> Result<Var<'t>> {
        let Batch::Images { pixels, labels, batch, shape } = batch else {
            return Err(Error::Msg("mlp needs an image batch (data.kind synthetic-images or npy)".into()));
        };
        let feat: usize = shape.iter().product();
        if feat != self.cfg.input_dim {
            return Err(Error::Config {
                key: "model.input_dim".into(),
                msg: format!("is {}, but the data has {feat} features per sample", self.cfg.input_dim),
            });
        }
        // On a GPU a step input (a CUDA graph of the step uploads it again at each replay).
        let x = Tensor::input_f32(pixels, &[*batch, feat], ps.device())?.to_dtype(ps.dtype());
        let mut h = tape.constant(x);
        for (i, (lin, bn)) in self.layers.iter().enumerate() {
            h = lin.forward(tape, ps, h)?;
            record_coord(probes, format_args!("layers.{i}"), &h);
            if let Some(bn) = bn {
                h = bn.forward(tape, ps, h, train)?;
                record_coord(probes, format_args!("bn.{i}"), &h);
            }
            h = h.relu()?;
            let want = probes.set();
            if want.sparsity {
                crate::probes::record_sparsity(probes, i, &h.value(), want.sparsity_threshold)?;
            }
            h = h.dropout(tape.dropout(if train { self.cfg.dropout } else { 0.0 }, i as u64)?)?;
            record_coord(probes, format_args!("act.{i}"), &h);
            if want.residual {
                probes.record(&format!("resid_rms/{i}"), Reduce::Mean, rms(&h));
            }
        }
        let logits = self.head.forward(tape, ps, crate::nn::readout_input(h, self.cfg.readout_mult)?)?;
        record_coord(probes, format_args!("head"), &logits);
        let ce = logits.cross_entropy(labels, 0.0)?;
        if probes.set().logits {
            probes.record_value("logit_mean", Reduce::Mean, ce.logit_mean);
            probes.record_value("log_z", Reduce::Mean, ce.log_z_mean);
            probes.record_value("log_z_max", Reduce::Max, ce.log_z_max);
        }
        probes.record_value("acc", Reduce::Mean, ce.accuracy);
        Ok(ce.loss)
    }
    fn describe(&self) -> String {
        let drop = if self.cfg.dropout > 0.0 { format!(", dropout {}", self.cfg.dropout) } else { String::new() };
        let norm = match self.cfg.norm {
            NormKind::None => "no norm".to_string(),
            NormKind::Batch => "batch norm".to_string(),
            NormKind::Ghost => format!("ghost batch norm of {}", self.cfg.ghost_batch),
        };
        format!("mlp({} -> {:?} -> {}, {norm}{drop})", self.cfg.input_dim, self.cfg.widths, self.cfg.classes)
    }
}
