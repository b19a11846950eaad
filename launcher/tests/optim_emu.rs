//! The optimizers' GPU paths on the CPU emulator of the CUDA kernels (feature `cuda-emu`): the
//! fused AdamW (both decay forms) and SGD kernels, with and without learning-rate multipliers,
//! and SOAP (stepped on the host for device parameters) must follow the CPU optimizers step for
//! step.
#![cfg(feature = "cuda-emu")]

use dptrain_core::rng::Rng;
use dptrain_core::{DType, Device, GradStore, Init, ParamBuilder, ParamStore, Role, Tensor};
use dptrain_optim::*;

fn stores(n: usize) -> (ParamStore, Vec<Vec<f32>>) {
    let mut b = ParamBuilder::new();
    b.add("w", &[n, 3], Role::Hidden, 3, n, Init::Normal { std: 0.5 });
    b.add("bias", &[n], Role::Vector, 1, 1, Init::Normal { std: 0.5 });
    let ps = b.build(7, DType::F32).unwrap();
    let mut rng = Rng::new(11);
    let grads = (0..4).map(|_| (0..ps.numel()).map(|_| rng.normal() as f32).collect()).collect();
    (ps, grads)
}

fn run(opt: &mut dyn Optimizer, ps: &mut ParamStore, grads: &[Vec<f32>], device: Device) -> Vec<f32> {
    ps.to_device(device).unwrap();
    let mut g = GradStore::try_new(ps).unwrap();
    let mut solo = dptrain_comm::LocalComm::new();
    for (i, gr) in grads.iter().enumerate() {
        let t = Tensor::from_slice(gr, &[gr.len()]).unwrap().to_device(device).unwrap();
        *g.flat_tensor_mut() = t;
        opt.step(ps, &g, &mut StepCtx { step: i as u64 + 1, lr: 0.05 / (i + 1) as f64, comm: &mut solo }).unwrap();
    }
    ps.flat().to_vec::<f32>().unwrap()
}

#[test]
fn fused_optimizer_kernels_with_per_parameter_scales_match_the_cpu() {
    // SAFETY (of set_var): this test binary has one test, so no other thread reads the
    // environment concurrently.
    unsafe { std::env::set_var("DPTRAIN_CUDA_EMULATOR", "1") };
    type Make = fn(&ParamStore, &ParamScales) -> Box<dyn Optimizer>;
    let makers: [(&str, Make); 3] = [
        ("adamw coupled", |ps, s| Box::new(AdamW::with_scales(AdamWConfig { weight_decay: 0.1, ..Default::default() }, ps, s).unwrap())),
        ("adamw independent", |ps, s| {
            let c = AdamWConfig { weight_decay: 0.1, decay_mode: DecayMode::Independent, peak_lr: 0.05, ..Default::default() };
            Box::new(AdamW::with_scales(c, ps, s).unwrap())
        }),
        ("sgd nesterov", |ps, s| {
            let c = SgdConfig { momentum: 0.9, nesterov: true, weight_decay: 0.01, ..Default::default() };
            Box::new(Sgd::with_scales(c, ps, s).unwrap())
        }),
    ];
    for (name, make) in makers {
        for with_lr in [false, true] {
            let (mut cpu, grads) = stores(5);
            let (mut gpu, _) = stores(5);
            let s = ParamScales { lr: if with_lr { vec![1.0, 0.25] } else { vec![1.0; 2] }, wd: vec![0.5, 0.0] };
            let want = run(make(&cpu, &s).as_mut(), &mut cpu, &grads, Device::Cpu);
            let got = run(make(&gpu, &s).as_mut(), &mut gpu, &grads, Device::Cuda(0));
            for (x, y) in got.iter().zip(&want) {
                assert!((x - y).abs() <= 1e-6 * (1.0 + y.abs()), "{name} (lr scales {with_lr}): emulated GPU {got:?}\nvs CPU {want:?}");
            }
        }
    }
    // SOAP, with a basis refresh inside the four steps: bitwise the CPU's.
    let soap = SoapConfig { precondition_frequency: 2, weight_decay: 0.1, ..Default::default() };
    let (mut cpu, grads) = stores(5);
    let (mut gpu, _) = stores(5);
    let want = run(&mut Soap::new(soap, &cpu), &mut cpu, &grads, Device::Cpu);
    let got = run(&mut Soap::new(soap, &gpu), &mut gpu, &grads, Device::Cuda(0));
    assert_eq!(got, want, "soap: emulated GPU vs CPU");
    assert!(got != stores(5).0.flat().to_vec::<f32>().unwrap(), "soap did not move the parameters");
}
