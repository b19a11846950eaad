//! Integration tests that need several dptrain crates at once live in `tests/tests/`; this
//! library holds their shared helpers.

use dptrain_core::model::{Batch, Model};
use dptrain_core::probe::Probes;
use dptrain_core::{GradStore, ParamStore, Tape};
use dptrain_optim::{Optimizer, StepCtx};

/// Runs `steps` optimizer steps on one fixed batch; returns the loss before each step.
pub fn fit(model: &dyn Model, params: &mut ParamStore, opt: &mut dyn Optimizer, batch: &Batch, steps: usize, lr: f64) -> Vec<f64> {
    let mut grads = GradStore::new(params);
    let mut losses = vec![];
    let mut solo = dptrain_comm::LocalComm::new();
    for step in 1..=steps as u64 {
        let tape = Tape::new();
        let loss = model.loss(&tape, params, batch, true, &mut Probes::default()).expect("forward");
        losses.push(loss.item().expect("scalar"));
        grads.zero_grad();
        tape.backward(loss, &mut grads, |_, _| {}).expect("backward");
        drop(tape);
        opt.step(params, &grads, &mut StepCtx { step, lr, comm: &mut solo }).expect("step");
    }
    losses
}
