//! Where the optimizers keep their per-element state. A GPU run's moments and momentum live on
//! the device; the host must not also hold a copy, nor per-element multipliers, each as large
//! as the model (GPT-124M: 0.65 GB apiece, per rank). So constructing AdamW, LAMB, LARS, SGD or
//! SOAP allocates nothing per element; a CPU step allocates the state it uses; and a
//! checkpoint of an optimizer that never stepped is its zero state. (The device side — state made there and
//! the host copy freed on upload — runs on the emulator in launcher/tests/optim_emu.rs and the
//! trainer's resume-onto-the-device test.)

use dptrain_core::rng::Rng;
use dptrain_core::{DType, GradStore, Init, ParamBuilder, ParamStore, Role, Tensor};
use dptrain_optim::*;
use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

/// The system allocator, counting the bytes each thread allocates (tests run on threads of
/// their own, so one test's count is its own).
struct Counting;

thread_local! {
    static ALLOCATED: Cell<usize> = const { Cell::new(0) };
}

// SAFETY: every call is forwarded to the system allocator unchanged; the count is a side note.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        let _ = ALLOCATED.try_with(|a| a.set(a.get() + l.size()));
        unsafe { System.alloc(l) }
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        let _ = ALLOCATED.try_with(|a| a.set(a.get() + l.size()));
        unsafe { System.alloc_zeroed(l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        let _ = ALLOCATED.try_with(|a| a.set(a.get() + new.saturating_sub(l.size())));
        unsafe { System.realloc(p, l, new) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        unsafe { System.dealloc(p, l) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Bytes this thread allocates while `f` runs.
fn allocated_by<T>(f: impl FnOnce() -> T) -> (T, usize) {
    let before = ALLOCATED.with(Cell::get);
    let out = f();
    (out, ALLOCATED.with(Cell::get) - before)
}

/// A 500×400 matrix (200,000 elements) and two vectors.
fn store() -> ParamStore {
    let mut b = ParamBuilder::new();
    b.add("w", &[500, 400], Role::Hidden, 400, 500, Init::Normal { std: 0.02 });
    b.add("bias", &[500], Role::Vector, 1, 1, Init::Const(0.0));
    b.add("gain", &[400], Role::Vector, 1, 1, Init::Const(1.0));
    b.build(1, DType::F32).unwrap()
}

type Make = fn(&ParamStore, &ParamScales) -> Box<dyn Optimizer>;

/// Each optimizer with the f32 vectors of the model's size a CPU step keeps.
const OPTIMIZERS: [(&str, Make, usize); 4] = [
    ("adamw", |ps, s| Box::new(AdamW::with_scales(AdamWConfig::default(), ps, s).unwrap()), 2),
    ("lamb", |ps, s| Box::new(Lamb::with_scales(LambConfig { weight_decay: 0.1, ..Default::default() }, ps, s).unwrap()), 3),
    ("lars", |ps, s| Box::new(Lars::with_scales(LarsConfig { weight_decay: 0.1, ..Default::default() }, ps, s).unwrap()), 1),
    ("sgd", |ps, s| Box::new(Sgd::with_scales(SgdConfig { weight_decay: 0.1, ..Default::default() }, ps, s).unwrap()), 1),
];

#[test]
fn optimizers_allocate_per_element_state_only_when_a_cpu_step_needs_it() {
    let mut ps = store();
    let n = ps.numel();
    // Learning-rate multipliers other than 1 too (μP's): they are read per parameter.
    let scales = ParamScales { lr: vec![0.5, 1.0, 2.0], wd: vec![1.0, 0.0, 0.0] };
    let mut g = GradStore::new(&ps);
    let mut rng = Rng::new(5);
    let gr: Vec<f32> = (0..n).map(|_| rng.normal() as f32).collect();
    *g.flat_tensor_mut() = Tensor::from_slice(&gr, &[n]).unwrap();
    let mut solo = dptrain_comm::LocalComm::new();
    for (name, make, vectors) in OPTIMIZERS {
        let (mut opt, made) = allocated_by(|| make(&ps, &scales));
        assert!(made < n, "{name}: constructing it allocated {made} bytes for {n} parameters");

        // Before any step its state is zeros of the parameters' shapes.
        let (state, _) = opt.state(&ps).unwrap();
        assert!(!state.is_empty(), "{name}: no state");
        for (key, t) in &state {
            assert!(t.to_vec::<f32>().unwrap().iter().all(|&x| x == 0.0), "{name}: {key} is not zero before a step");
        }

        // A CPU step allocates the state it keeps: `vectors` f32s per element.
        let ((), stepped) = allocated_by(|| opt.step(&mut ps, &g, &mut StepCtx { step: 1, lr: 0.01, comm: &mut solo }).unwrap());
        assert!(stepped >= 4 * vectors * n, "{name}: its first CPU step allocated {stepped} bytes, less than {vectors} × {n} f32s");
        // and no more at the next (the state stays allocated).
        let ((), again) = allocated_by(|| opt.step(&mut ps, &g, &mut StepCtx { step: 2, lr: 0.01, comm: &mut solo }).unwrap());
        assert!(again < n, "{name}: its second CPU step allocated {again} bytes");

        // The zero state of a fresh optimizer restores, and the restored one steps as one that
        // never saved: the same bits.
        let (mut fresh, mut restored) = (make(&ps, &scales), make(&ps, &scales));
        let (tensors, scalars) = fresh.state(&ps).unwrap();
        restored.load_state(&ps, &tensors.into_iter().collect(), &scalars).unwrap();
        let mut after = vec![];
        for opt in [&mut fresh, &mut restored] {
            let mut p = store();
            opt.step(&mut p, &g, &mut StepCtx { step: 1, lr: 0.01, comm: &mut solo }).unwrap();
            after.push(p.flat().to_vec::<f32>().unwrap());
        }
        assert!(after[0] == after[1], "{name}: a restored zero state steps otherwise than a fresh one");
    }
}

/// SOAP allocates its moments and its factors' statistics and bases (d² each per
/// preconditioned dim) on the host only once a CPU step or a restore needs them.
#[test]
fn soap_allocates_its_state_only_when_a_cpu_step_needs_it() {
    let mut ps = store();
    let n = ps.numel();
    let mut g = GradStore::new(&ps);
    let mut rng = Rng::new(6);
    let gr: Vec<f32> = (0..n).map(|_| rng.normal() as f32).collect();
    *g.flat_tensor_mut() = Tensor::from_slice(&gr, &[n]).unwrap();
    let mut solo = dptrain_comm::LocalComm::new();
    let cfg = SoapConfig { precondition_frequency: 1, ..Default::default() };
    let statistics = 4 * (500 * 500 + 400 * 400);
    let (mut soap, made) = allocated_by(|| Soap::new(cfg, &ps));
    assert!(made < n, "constructing SOAP allocated {made} bytes for {n} parameters");
    assert_eq!(soap.host_state_bytes(), 0);
    let (state, _) = soap.state(&ps).unwrap();
    for (key, t) in &state {
        assert!(t.to_vec::<f32>().unwrap().iter().all(|&x| x == 0.0), "{key} is not zero before a step");
    }
    for step in 1..=2 {
        soap.step(&mut ps, &g, &mut StepCtx { step, lr: 0.01, comm: &mut solo }).unwrap();
    }
    // Two moments of the model's size, and the bases beside the statistics.
    assert_eq!(soap.host_state_bytes(), 8 * n + 2 * statistics);
    // The zero state restores, and steps as a fresh optimizer does: the same bits.
    let (mut fresh, mut restored) = (Soap::new(cfg, &ps), Soap::new(cfg, &ps));
    let (tensors, scalars) = fresh.state(&ps).unwrap();
    restored.load_state(&ps, &tensors.into_iter().collect(), &scalars).unwrap();
    let mut after = vec![];
    for opt in [&mut fresh, &mut restored] {
        let mut p = store();
        for step in 1..=2 {
            opt.step(&mut p, &g, &mut StepCtx { step, lr: 0.01, comm: &mut solo }).unwrap();
        }
        after.push(p.flat().to_vec::<f32>().unwrap());
    }
    assert!(after[0] == after[1], "a restored zero state steps otherwise than a fresh one");
    assert!(after[0] != store().flat().to_vec::<f32>().unwrap(), "SOAP did not move the parameters");
}
