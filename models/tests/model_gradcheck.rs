//! Whole-model gradient checks on tiny instances in f64: for two entries of every parameter
//! tensor, the backprop gradient must match a central finite difference of the full loss.
//! With dropout on, every evaluation draws the same masks (the tape's key stays fixed), so the
//! loss is a smooth function of the parameters and the check applies unchanged.

use dptrain_core::model::{Batch, Model};
use dptrain_core::probe::Probes;
use dptrain_core::rng::Rng;
use dptrain_core::{DType, GradStore, ParamBuilder, ParamStore, Tape};
use dptrain_models::{Gpt, GptConfig, Mlp, MlpConfig, NormKind, ResNet, ResNetConfig};

fn loss_and_grads(m: &dyn Model, ps: &ParamStore, b: &Batch) -> (f64, Vec<f64>) {
    let tape = Tape::new();
    let loss = m.loss(&tape, ps, b, true, &mut Probes::default()).unwrap();
    let l = loss.item().unwrap();
    let mut g = GradStore::new(ps);
    g.zero_grad();
    tape.backward(loss, &mut g, |_, _| {}).unwrap();
    (l, g.flat().to_vec::<f64>().unwrap())
}

fn check_model(name: &str, m: &dyn Model, mut ps: ParamStore, b: &Batch) {
    let (_, grads) = loss_and_grads(m, &ps, b);
    let mut rng = Rng::new(5);
    let infos = ps.infos().to_vec();
    let h = 1e-6;
    let mut checked = 0;
    for p in &infos {
        for _ in 0..2 {
            let i = p.offset + rng.below(p.numel as u64) as usize;
            let orig = ps.flat_mut::<f64>().unwrap()[i];
            ps.flat_mut::<f64>().unwrap()[i] = orig + h;
            let lp = loss_and_grads(m, &ps, b).0;
            ps.flat_mut::<f64>().unwrap()[i] = orig - h;
            let lm = loss_and_grads(m, &ps, b).0;
            ps.flat_mut::<f64>().unwrap()[i] = orig;
            let num = (lp - lm) / (2.0 * h);
            let err = (num - grads[i]).abs();
            assert!(err <= 1e-6 * num.abs().max(1e-2), "{name}: {} [{}]: backprop {} vs numeric {num}", p.name, i - p.offset, grads[i]);
            checked += 1;
        }
    }
    assert!(checked >= 2 * infos.len());
}

#[test]
fn gpt_gradients() {
    for dropout in [0.0, 0.3] {
        gpt_gradients_with(dropout, None, 1.0, false);
    }
    // μP's forward: attention scale 1/d_head and a readout multiplier.
    gpt_gradients_with(0.0, Some(0.25), 0.5, false);
    // qk-layernorm (its gains and biases among the checked parameters).
    gpt_gradients_with(0.0, None, 1.0, true);
}

fn gpt_gradients_with(dropout: f64, attn_scale: Option<f64>, readout_mult: f64, qk_norm: bool) {
    let cfg = GptConfig {
        vocab_size: 11,
        context: 6,
        d_model: 8,
        n_layers: 2,
        n_heads: 2,
        mlp_ratio: 2,
        bias: true,
        z_loss: 1e-2,
        gelu_tanh: false,
        dropout,
        attn_scale,
        readout_mult,
        qk_norm,
        ..Default::default()
    };
    let mut pb = ParamBuilder::new();
    let m = Gpt::new(cfg, &mut pb).unwrap();
    let ps = pb.build(1, DType::F64).unwrap();
    assert_eq!(ps.id("transformer.h.1.attn.qk_ln.weight").is_some(), qk_norm);
    assert_eq!(ps.id("transformer.h.1.attn.qk_ln.bias").is_some(), qk_norm);
    assert_eq!(ps.infos()[0].name, "transformer.wte.weight");
    assert!(ps.id("transformer.h.1.attn.c_attn.bias").is_some() && ps.id("lm_head.weight").is_some());
    let mut rng = Rng::new(2);
    let ids: Vec<u32> = (0..2 * 6).map(|_| rng.below(11) as u32).collect();
    let targets: Vec<u32> = (0..2 * 6).map(|_| rng.below(11) as u32).collect();
    check_model(
        &format!("gpt dropout {dropout} scale {attn_scale:?} readout × {readout_mult} qk_norm {qk_norm}"),
        &m,
        ps,
        &Batch::Tokens { inputs: ids, targets, batch: 2, context: 6 },
    );
}

fn images(n: usize, shape: [usize; 3], classes: u64) -> Batch {
    let mut rng = Rng::new(3);
    Batch::Images {
        pixels: (0..n * shape.iter().product::<usize>()).map(|_| rng.normal() as f32).collect(),
        labels: (0..n).map(|_| rng.below(classes) as u32).collect(),
        batch: n,
        shape,
    }
}

#[test]
fn mlp_gradients() {
    // Ghost batches of 2 over a batch of 6: three normalisations in one layer.
    for (norm, dropout, n) in [(NormKind::None, 0.0, 5), (NormKind::Batch, 0.0, 5), (NormKind::None, 0.25, 5), (NormKind::Ghost, 0.0, 6)] {
        let mut pb = ParamBuilder::new();
        let c = MlpConfig { input_dim: 6, widths: vec![5, 4], classes: 3, norm, ghost_batch: 2, dropout, ..Default::default() };
        let m = Mlp::new(c, &mut pb).unwrap();
        let ps = pb.build(4, DType::F64).unwrap();
        check_model(&format!("mlp {norm:?} dropout {dropout}"), &m, ps, &images(n, [1, 2, 3], 3));
    }
}

#[test]
fn resnet_gradients() {
    for (norm, n) in [(NormKind::Batch, 3), (NormKind::Ghost, 4), (NormKind::None, 3)] {
        let mut pb = ParamBuilder::new();
        let c = ResNetConfig { in_channels: 2, width: 2, depth: 1, classes: 3, norm, ghost_batch: 2, ..Default::default() };
        let m = ResNet::new(c, &mut pb).unwrap();
        let ps = pb.build(6, DType::F64).unwrap();
        assert!(ps.id("layer2.0.downsample.0.weight").is_some());
        // Without normalisation the convolutions carry biases.
        assert_eq!(ps.id("layer2.0.conv1.bias").is_some(), norm == NormKind::None);
        check_model(&format!("resnet {norm:?}"), &m, ps, &images(n, [2, 6, 6], 3));
    }
}
