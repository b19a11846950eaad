//! A small CIFAR-style ResNet (He et al. 2016, §4.2): a 3×3 stem, three stages of basic blocks
//! (widths w, 2w, 4w; stride 2 at the start of stages 2 and 3, 1×1 projection shortcuts),
//! batch norm (or Ghost BN) after every convolution, global average pooling and a linear head.
//! `depth` is the number of blocks per stage (ResNet-20 is depth 3). torchvision-style names.
//! Without normalisation the convolutions get biases, as torch's default.

use crate::nn::{maybe_norm, rms, BatchNorm, Linear, NormKind};
use dptrain_core::model::{Batch, Model};
use dptrain_core::probe::{record_coord, ProbeSink, Reduce};
use dptrain_core::{Error, Init, ParamBuilder, ParamId, ParamStore, Result, Role, Tape, Tensor, Var};

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResNetConfig {
    pub in_channels: usize,
    pub width: usize,
    /// Basic blocks per stage.
    pub depth: usize,
    pub classes: usize,
    /// Normalisation after each convolution.
    pub norm: NormKind,
    /// Samples per ghost batch (`norm = Ghost`).
    pub ghost_batch: usize,
    /// Multiplies the readout's input (μP: output_mult / width multiplier; 1 = standard).
    #[serde(skip, default = "crate::nn::one")]
    pub readout_mult: f64,
}

impl Default for ResNetConfig {
    fn default() -> Self {
        ResNetConfig { in_channels: 3, width: 16, depth: 1, classes: 10, norm: NormKind::Batch, ghost_batch: 128, readout_mult: 1.0 }
    }
}

struct Conv {
    w: ParamId,
    b: Option<ParamId>,
    stride: usize,
    pad: usize,
}

impl Conv {
    /// Kaiming-normal (fan_out, ReLU gain) as torchvision's ResNet; a bias (torch's default
    /// U(±1/√fan_in)) only when `bias`.
    #[allow(clippy::too_many_arguments)]
    fn new(pb: &mut ParamBuilder, name: &str, cin: usize, cout: usize, k: usize, stride: usize, role: Role, bias: bool) -> Conv {
        let std = (2.0 / (cout * k * k) as f64).sqrt();
        let bound = 1.0 / ((cin * k * k) as f64).sqrt();
        let (w, b) = pb.scope(name, |pb| {
            let w = pb.add("weight", &[cout, cin, k, k], role, cin * k * k, cout * k * k, Init::Normal { std });
            (w, bias.then(|| pb.add_bias("bias", cout, w, Init::Uniform { bound })))
        });
        Conv { w, b, stride, pad: k / 2 }
    }
    fn forward<'t>(&self, tape: &'t Tape, ps: &ParamStore, x: Var<'t>) -> Result<Var<'t>> {
        x.conv2d(tape.param(ps, self.w), self.b.map(|b| tape.param(ps, b)), self.stride, self.pad)
    }
}

struct BasicBlock {
    conv1: Conv,
    bn1: Option<BatchNorm>,
    conv2: Conv,
    bn2: Option<BatchNorm>,
    downsample: Option<(Conv, Option<BatchNorm>)>,
}

pub struct ResNet {
    pub cfg: ResNetConfig,
    conv1: Conv,
    bn1: Option<BatchNorm>,
    blocks: Vec<BasicBlock>,
    fc: Linear,
}

impl ResNetConfig {
    /// How many parameters [`ResNet::new`] declares, from the config alone (see
    /// [`crate::GptConfig::param_count`]).
    pub fn param_count(&self) -> f64 {
        // Each convolution has a bias without normalisation, a norm's gain and bias with it.
        let per_out = if self.norm == NormKind::None { 1.0 } else { 2.0 };
        let conv = |cin: f64, cout: f64, k: f64| cin * cout * k * k + per_out * cout;
        let w = self.width as f64;
        let mut n = conv(self.in_channels as f64, w, 3.0);
        let mut cin = w;
        for stage in 0..3 {
            let cout = w * f64::from(1u32 << stage);
            // A stage's first block (a 1×1 projection where it changes stride or width), then
            // depth - 1 alike blocks, counted at once: depth may be more than any machine holds.
            n += conv(cin, cout, 3.0) + conv(cout, cout, 3.0);
            if stage > 0 || cin != cout {
                n += conv(cin, cout, 1.0);
            }
            n += self.depth.saturating_sub(1) as f64 * 2.0 * conv(cout, cout, 3.0);
            cin = cout;
        }
        n + cin * self.classes as f64 + self.classes as f64
    }
}

impl ResNet {
    pub fn new(cfg: ResNetConfig, pb: &mut ParamBuilder) -> Result<ResNet> {
        if cfg.in_channels == 0 || cfg.width == 0 || cfg.depth == 0 || cfg.classes == 0 {
            return Err(Error::Config { key: "model".into(), msg: "resnet in_channels, width, depth and classes must be positive".into() });
        }
        let w = cfg.width;
        let bias = cfg.norm == NormKind::None;
        let (kind, gb) = (cfg.norm, cfg.ghost_batch);
        let conv1 = Conv::new(pb, "conv1", cfg.in_channels, w, 3, 1, Role::Input, bias);
        let bn1 = BatchNorm::of_kind(pb, "bn1", w, kind, gb);
        let mut blocks = vec![];
        let mut cin = w;
        for stage in 0..3 {
            let cout = w << stage;
            for b in 0..cfg.depth {
                let stride = if stage > 0 && b == 0 { 2 } else { 1 };
                let blk = pb.scope(format!("layer{}", stage + 1), |pb| {
                    pb.scope(b.to_string(), |pb| BasicBlock {
                        conv1: Conv::new(pb, "conv1", cin, cout, 3, stride, Role::Hidden, bias),
                        bn1: BatchNorm::of_kind(pb, "bn1", cout, kind, gb),
                        conv2: Conv::new(pb, "conv2", cout, cout, 3, 1, Role::Hidden, bias),
                        bn2: BatchNorm::of_kind(pb, "bn2", cout, kind, gb),
                        downsample: (stride != 1 || cin != cout).then(|| {
                            pb.scope("downsample", |pb| {
                                (Conv::new(pb, "0", cin, cout, 1, stride, Role::Hidden, bias), BatchNorm::of_kind(pb, "1", cout, kind, gb))
                            })
                        }),
                    })
                });
                blocks.push(blk);
                cin = cout;
            }
        }
        let fc = Linear::torch_default(pb, "fc", cin, cfg.classes, true, Role::Output);
        Ok(ResNet { cfg, conv1, bn1, blocks, fc })
    }
}

impl Model for ResNet {
    fn loss<'t>(&self, tape: &'t Tape, ps: &ParamStore, batch: &Batch, train: bool, probes: &mut dyn ProbeSink) -> Result<Var<'t>> {
        let Batch::Images { pixels, labels, batch, shape } = batch else {
            return Err(Error::Msg("resnet needs an image batch (data.kind synthetic-images or npy)".into()));
        };
        if shape[0] != self.cfg.in_channels {
            return Err(Error::Config {
                key: "model.in_channels".into(),
                msg: format!("is {}, but images have {} channels", self.cfg.in_channels, shape[0]),
            });
        }
        // On a GPU a step input (a CUDA graph of the step uploads it again at each replay).
        let x = Tensor::input_f32(pixels, &[*batch, shape[0], shape[1], shape[2]], ps.device())?.to_dtype(ps.dtype());
        let x = tape.constant(x);
        let mut h = maybe_norm(&self.bn1, tape, ps, self.conv1.forward(tape, ps, x)?, train)?.relu()?;
        record_coord(probes, format_args!("conv1"), &h);
        for (i, blk) in self.blocks.iter().enumerate() {
            let y = maybe_norm(&blk.bn1, tape, ps, blk.conv1.forward(tape, ps, h)?, train)?.relu()?;
            let y = maybe_norm(&blk.bn2, tape, ps, blk.conv2.forward(tape, ps, y)?, train)?;
            let short = match &blk.downsample {
                Some((c, bn)) => maybe_norm(bn, tape, ps, c.forward(tape, ps, h)?, train)?,
                None => h,
            };
            h = y.add(short)?.relu()?;
            record_coord(probes, format_args!("block.{i}"), &h);
            if probes.set().residual {
                probes.record(&format!("resid_rms/{i}"), Reduce::Mean, rms(&h));
            }
        }
        let pooled = h.mean_dims(&[2, 3], false)?;
        let logits = self.fc.forward(tape, ps, crate::nn::readout_input(pooled, self.cfg.readout_mult)?)?;
        record_coord(probes, format_args!("fc"), &logits);
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
        let norm = match self.cfg.norm {
            NormKind::None => "no norm".to_string(),
            NormKind::Batch => "batch norm".to_string(),
            NormKind::Ghost => format!("ghost batch norm of {}", self.cfg.ghost_batch),
        };
        format!("resnet(width {}, {} blocks/stage, {} classes, {norm})", self.cfg.width, self.cfg.depth, self.cfg.classes)
    }
}
