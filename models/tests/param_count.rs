//! Each model config's `param_count` (what the launcher checks against the machine's memory
//! before declaring anything) is the number of parameters its constructor then declares, over
//! every option that changes the set: biases, qk-norm, normalisation kinds, depths, strides.

use dptrain_core::ParamBuilder;
use dptrain_models::{Gpt, GptConfig, Mlp, MlpConfig, NormKind, ResNet, ResNetConfig};

fn declared(build: impl FnOnce(&mut ParamBuilder)) -> f64 {
    let mut pb = ParamBuilder::new();
    build(&mut pb);
    pb.infos().iter().map(|p| p.numel).sum::<usize>() as f64
}

#[test]
fn gpt_count_is_what_it_declares() {
    for (bias, qk_norm, n_layers, mlp_ratio) in [(true, false, 2, 4), (false, false, 3, 4), (true, true, 1, 2), (false, true, 4, 3)] {
        let cfg =
            GptConfig { vocab_size: 97, context: 24, d_model: 48, n_layers, n_heads: 6, mlp_ratio, bias, qk_norm, ..Default::default() };
        let n = declared(|pb| {
            Gpt::new(cfg.clone(), pb).unwrap();
        });
        assert_eq!(cfg.param_count(), n, "{cfg:?}");
    }
    // GPT-2 small (124,475,904 with its head tied to the embedding at vocab 50304) plus the
    // untied head: 50304 × 768 more.
    let g = GptConfig { vocab_size: 50304, context: 1024, d_model: 768, n_layers: 12, n_heads: 12, ..Default::default() };
    assert_eq!(g.param_count(), 163_109_376.0);
}

#[test]
fn mlp_count_is_what_it_declares() {
    for (widths, norm) in
        [(vec![32, 16], NormKind::None), (vec![8], NormKind::Batch), (vec![12, 12, 5], NormKind::Ghost), (vec![], NormKind::None)]
    {
        let cfg = MlpConfig { input_dim: 20, widths, classes: 7, norm, ..Default::default() };
        let n = declared(|pb| {
            Mlp::new(cfg.clone(), pb).unwrap();
        });
        assert_eq!(cfg.param_count(), n, "{cfg:?}");
    }
}

#[test]
fn resnet_count_is_what_it_declares() {
    for (width, depth, norm) in [(4, 1, NormKind::Batch), (3, 3, NormKind::None), (5, 2, NormKind::Ghost)] {
        let cfg = ResNetConfig { in_channels: 3, width, depth, classes: 10, norm, ..Default::default() };
        let n = declared(|pb| {
            ResNet::new(cfg.clone(), pb).unwrap();
        });
        assert_eq!(cfg.param_count(), n, "{cfg:?}");
    }
}

#[test]
fn counts_of_sizes_no_machine_holds_are_finite_and_instant() {
    // What the launcher refuses: counted without looping over the layers or overflowing.
    let g = GptConfig { d_model: 1 << 40, n_layers: 1 << 50, n_heads: 1, ..Default::default() };
    assert!(g.param_count() > 1e36 && g.param_count().is_finite());
    let r = ResNetConfig { width: usize::MAX / 2, depth: usize::MAX, ..Default::default() };
    assert!(r.param_count() > 1e50);
    let m = MlpConfig { widths: vec![usize::MAX; 3], ..Default::default() };
    assert!(m.param_count() > 1e38);
}
