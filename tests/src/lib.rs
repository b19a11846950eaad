//! Integration tests that need several dptrain crates at once live in `tests/tests/`; this
//! library holds their shared helpers.

use dptrain_core::model::{Batch, Model};
use dptrain_core::probe::Probes;
use dptrain_core::{GradStore, ParamStore, Tape};
use dptrain_optim::Optimizer;

/// Runs `steps` optimizer steps on one fixed batch; returns the loss before each step.
pub fn fit(model: &dyn Model, params: &mut ParamStore, opt: &mut dyn Optimizer, batch: &Batch, steps: usize, lr: f64) -> Vec<f64> {
    let mut grads = GradStore::new(params);
    let mut losses = vec![];
    for _ in 0..steps {
        let tape = Tape::new();
        let loss = model.loss(&tape, params, batch, true, &mut Probes::default()).expect("forward");
        losses.push(loss.item().expect("scalar"));
        grads.zero_grad();
        tape.backward(loss, &mut grads, |_, _| {}).expect("backward");
        drop(tape);
        opt.step(params, &grads, lr).expect("step");
    }
    losses
}
