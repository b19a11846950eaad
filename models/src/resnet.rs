//! A small CIFAR-style ResNet (He et al. 2016, §4.2): a 3×3 stem, three stages of basic blocks
//! (widths w, 2w, 4w; stride 2 at the start of stages 2 and 3, 1×1 projection shortcuts),
//! batch norm after every convolution, global average pooling and a linear head. `depth` is
//! the number of blocks per stage (ResNet-20 is depth 3). torchvision-style names.

use crate::nn::{rms, BatchNorm, Linear};
use dptrain_core::model::{Batch, Model};
use dptrain_core::probe::{ProbeSink, Reduce};
use dptrain_core::{Error, Init, ParamBuilder, ParamId, ParamStore, Result, Role, Tape, Tensor, Var};

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResNetConfig {
    pub in_channels: usize,
    pub width: usize,
    /// Basic blocks per stage.
    pub depth: usize,
    pub classes: usize,
}

impl Default for ResNetConfig {
    fn default() -> Self {
        ResNetConfig { in_channels: 3, width: 16, depth: 1, classes: 10 }
    }
}

struct Conv {
    w: ParamId,
    stride: usize,
    pad: usize,
}

impl Conv {
    /// Kaiming-normal (fan_out, ReLU gain) as torchvision's ResNet.
    fn new(pb: &mut ParamBuilder, name: &str, cin: usize, cout: usize, k: usize, stride: usize, role: Role) -> Conv {
        let std = (2.0 / (cout * k * k) as f64).sqrt();
        let w = pb.scope(name, |pb| pb.add("weight", &[cout, cin, k, k], role, cin * k * k, cout * k * k, Init::Normal { std }));
        Conv { w, stride, pad: k / 2 }
    }
    fn forward<'t>(&self, tape: &'t Tape, ps: &ParamStore, x: Var<'t>) -> Result<Var<'t>> {
        x.conv2d(tape.param(ps, self.w), None, self.stride, self.pad)
    }
}

struct BasicBlock {
    conv1: Conv,
    bn1: BatchNorm,
    conv2: Conv,
    bn2: BatchNorm,
    downsample: Option<(Conv, BatchNorm)>,
}

pub struct ResNet {
    pub cfg: ResNetConfig,
    conv1: Conv,
    bn1: BatchNorm,
    blocks: Vec<BasicBlock>,
    fc: Linear,
}

impl ResNet {
    pub fn new(cfg: ResNetConfig, pb: &mut ParamBuilder) -> Result<ResNet> {
        if cfg.in_channels == 0 || cfg.width == 0 || cfg.depth == 0 || cfg.classes == 0 {
            return Err(Error::Config { key: "model".into(), msg: "resnet in_channels, width, depth and classes must be positive".into() });
        }
        let w = cfg.width;
        let conv1 = Conv::new(pb, "conv1", cfg.in_channels, w, 3, 1, Role::Input);
        let bn1 = BatchNorm::new(pb, "bn1", w);
        let mut blocks = vec![];
        let mut cin = w;
        for stage in 0..3 {
            let cout = w << stage;
            for b in 0..cfg.depth {
                let stride = if stage > 0 && b == 0 { 2 } else { 1 };
                let blk = pb.scope(format!("layer{}", stage + 1), |pb| {
                    pb.scope(b.to_string(), |pb| BasicBlock {
                        conv1: Conv::new(pb, "conv1", cin, cout, 3, stride, Role::Hidden),
                        bn1: BatchNorm::new(pb, "bn1", cout),
                        conv2: Conv::new(pb, "conv2", cout, cout, 3, 1, Role::Hidden),
                        bn2: BatchNorm::new(pb, "bn2", cout),
                        downsample: (stride != 1 || cin != cout).then(|| {
                            pb.scope("downsample", |pb| {
                                (Conv::new(pb, "0", cin, cout, 1, stride, Role::Hidden), BatchNorm::new(pb, "1", cout))
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
        let x = Tensor::from_slice(pixels, &[*batch, shape[0], shape[1], shape[2]])?.to_dtype(ps.dtype()).to_device(ps.device())?;
        let x = tape.constant(x);
        let mut h = self.bn1.forward(tape, ps, self.conv1.forward(tape, ps, x)?, train)?.relu()?;
        for (i, blk) in self.blocks.iter().enumerate() {
            let y = blk.bn1.forward(tape, ps, blk.conv1.forward(tape, ps, h)?, train)?.relu()?;
            let y = blk.bn2.forward(tape, ps, blk.conv2.forward(tape, ps, y)?, train)?;
            let short = match &blk.downsample {
                Some((c, bn)) => bn.forward(tape, ps, c.forward(tape, ps, h)?, train)?,
                None => h,
            };
            h = y.add(short)?.relu()?;
            if probes.enabled() {
                probes.record(&format!("resid_rms/{i}"), Reduce::Mean, rms(&h));
            }
        }
        let pooled = h.mean_dims(&[2, 3], false)?;
        let ce = self.fc.forward(tape, ps, pooled)?.cross_entropy(labels, 0.0)?;
        probes.record("logit_mean", Reduce::Mean, ce.logit_mean);
        probes.record("log_z", Reduce::Mean, ce.log_z_mean);
        probes.record("acc", Reduce::Mean, ce.accuracy);
        Ok(ce.loss)
    }
    fn describe(&self) -> String {
        format!("resnet(width {}, {} blocks/stage, {} classes)", self.cfg.width, self.cfg.depth, self.cfg.classes)
    }
}
