//! Each model, trained by each base optimizer on one fixed synthetic batch, must drive its loss
//! far down (memorisation): the forward, backward and update paths are wired correctly.

use dptrain_core::model::Batch;
use dptrain_core::rng::Rng;
use dptrain_core::{DType, ParamBuilder};
use dptrain_models::{Gpt, GptConfig, Mlp, MlpConfig, NormKind, ResNet, ResNetConfig};
use dptrain_optim::{AdamW, AdamWConfig, Sgd, SgdConfig};
use dptrain_tests::fit;

fn images(n: usize, shape: [usize; 3], classes: u64, seed: u64) -> Batch {
    let mut rng = Rng::new(seed);
    Batch::Images {
        pixels: (0..n * shape.iter().product::<usize>()).map(|_| rng.normal() as f32).collect(),
        labels: (0..n).map(|_| rng.below(classes) as u32).collect(),
        batch: n,
        shape,
    }
}

#[test]
fn gpt_memorises_a_batch_with_adamw() {
    let cfg = GptConfig {
        vocab_size: 32,
        context: 16,
        d_model: 32,
        n_layers: 2,
        n_heads: 4,
        mlp_ratio: 4,
        bias: true,
        z_loss: 1e-4,
        gelu_tanh: false,
        dropout: 0.0,
        ..Default::default()
    };
    let mut pb = ParamBuilder::new();
    let m = Gpt::new(cfg, &mut pb).unwrap();
    let mut ps = pb.build(0, DType::F32).unwrap();
    let mut rng = Rng::new(1);
    let toks: Vec<u32> = (0..4 * 17).map(|_| rng.below(32) as u32).collect();
    let (mut inputs, mut targets) = (vec![], vec![]);
    for b in 0..4 {
        inputs.extend_from_slice(&toks[b * 17..b * 17 + 16]);
        targets.extend_from_slice(&toks[b * 17 + 1..b * 17 + 17]);
    }
    let batch = Batch::Tokens { inputs, targets, batch: 4, context: 16 };
    let mut opt = AdamW::new(AdamWConfig { weight_decay: 0.0, ..Default::default() }, &ps);
    let l = fit(&m, &mut ps, &mut opt, &batch, 80, 3e-3);
    assert!((l[0] - (32f64).ln()).abs() < 0.1, "initial loss {} should be ≈ ln 32", l[0]);
    assert!(l[79] < 0.3, "gpt loss {} -> {}", l[0], l[79]);
}

#[test]
fn mlp_memorises_a_batch_with_sgd_and_with_batch_norm() {
    for bn in [NormKind::None, NormKind::Batch, NormKind::Ghost] {
        let mut pb = ParamBuilder::new();
        let c = MlpConfig { input_dim: 64, widths: vec![64, 64], classes: 10, norm: bn, ghost_batch: 8, ..Default::default() };
        let m = Mlp::new(c, &mut pb).unwrap();
        let mut ps = pb.build(2, DType::F32).unwrap();
        let mut opt = Sgd::new(SgdConfig { momentum: 0.9, nesterov: true, ..Default::default() }, &ps);
        let l = fit(&m, &mut ps, &mut opt, &images(32, [1, 8, 8], 10, 3), 60, 0.05);
        assert!(l[59] < 0.1 * l[0], "mlp ({bn:?}) loss {} -> {}", l[0], l[59]);
    }
}

#[test]
fn resnet_memorises_a_batch_with_adamw() {
    let mut pb = ParamBuilder::new();
    let m = ResNet::new(ResNetConfig { in_channels: 3, width: 8, depth: 1, classes: 4, ..Default::default() }, &mut pb).unwrap();
    let mut ps = pb.build(4, DType::F32).unwrap();
    let mut opt = AdamW::new(AdamWConfig { weight_decay: 0.0, ..Default::default() }, &ps);
    let l = fit(&m, &mut ps, &mut opt, &images(16, [3, 8, 8], 4, 5), 40, 1e-2);
    assert!(l[39] < 0.2 * l[0], "resnet loss {} -> {}", l[0], l[39]);
}
