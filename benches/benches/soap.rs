//! SOAP against AdamW on GPT-mini (vocab 256, context 128, d_model 128, 4 layers, 4 heads,
//! batch 16), f32, CPU, with 1 thread and with every core: optimizer-step and whole
//! training-step time (means over the timed steps, so periodic basis refreshes are amortised;
//! the optimizers take turns step by step, so a shared machine's drift hits all alike) at
//! precondition frequency 1, 10, 100, and optimizer-state bytes per parameter. Then the owner split: per-rank time spent computing
//! eigenbases with 1 rank and with 2 in-process ranks (`distribute = owner`, f = 1).
//!
//! Last, the host's eigenbasis cost per factor at GPT-124M's sizes, and what one refresh of all
//! of GPT-124M's factors costs on one core (whether the refresh can stay on the host).
//!
//! `cargo bench -p dptrain-benches --bench soap` (`DPTRAIN_BENCH_STEPS` timed steps, default 20).

use dptrain_comm::{LocalComm, ThreadComm};
use dptrain_core::comm::Communicator;
use dptrain_core::model::{Batch, Model};
use dptrain_core::probe::Probes;
use dptrain_core::rng::Rng;
use dptrain_core::{DType, GradStore, ParamBuilder, ParamStore, Tape};
use dptrain_models::{Gpt, GptConfig};
use dptrain_optim::soap::basis_refresh_seconds;
use dptrain_optim::{AdamW, AdamWConfig, Distribute, Optimizer, Soap, SoapConfig, StepCtx};
use std::time::{Duration, Instant};

/// One optimizer's run: its own parameters, gradients and timings.
struct Runner<'a> {
    name: String,
    ps: ParamStore,
    grads: GradStore,
    opt: Box<dyn Optimizer + 'a>,
    /// Optimizer-state bytes per parameter.
    bytes: f64,
    step_ms: f64,
    opt_ms: f64,
}

/// Runs every optimizer for `steps` timed steps after 2 warm-up steps, one step of each in turn
/// (so a shared machine's drift hits them alike); fills in the mean step and optimizer ms.
fn run_interleaved(model: &dyn Model, batch: &Batch, runners: &mut [Runner], steps: usize) {
    let mut solo = LocalComm::new();
    for i in 0..steps + 2 {
        for r in runners.iter_mut() {
            let t0 = Instant::now();
            let tape = Tape::new();
            let loss = model.loss(&tape, &r.ps, batch, true, &mut Probes::on_if(false)).expect("forward");
            r.grads.zero_grad();
            tape.backward(loss, &mut r.grads, |_, _| {}).expect("backward");
            drop(tape);
            let t1 = Instant::now();
            r.opt.step(&mut r.ps, &r.grads, &mut StepCtx { step: i as u64 + 1, lr: 1e-3, comm: &mut solo }).expect("step");
            if i >= 2 {
                r.opt_ms += t1.elapsed().as_secs_f64() * 1e3 / steps as f64;
                r.step_ms += t0.elapsed().as_secs_f64() * 1e3 / steps as f64;
            }
        }
    }
}

fn main() {
    let steps: usize = dptrain_core::env::env().bench_steps.unwrap_or(20);
    rayon::ThreadPoolBuilder::new().num_threads(1).build_global().expect("rayon pool");
    let mut rng = Rng::new(0);
    // The same model and initial parameters for every run (a store per run: built, not cloned).
    let make = || {
        let mut pb = ParamBuilder::new();
        let gpt = Gpt::new(GptConfig::default(), &mut pb).unwrap();
        (gpt, pb.build(0, DType::F32).unwrap())
    };
    let (gpt, ps) = make();
    let n = ps.numel();
    let ids: Vec<u32> = (0..16 * 128).map(|_| rng.below(256) as u32).collect();
    let tg: Vec<u32> = (0..16 * 128).map(|_| rng.below(256) as u32).collect();
    let batch = Batch::Tokens { inputs: ids, targets: tg, batch: 16, context: 128 };

    // 1 thread, and every core of this machine: SOAP's per-parameter work runs in parallel
    // over parameters, as the model's GEMMs do over their blocks.
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    for threads in if cores > 1 { vec![1, cores] } else { vec![1] } {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().expect("rayon pool");
        let mut runners = vec![Runner {
            name: "AdamW".into(),
            grads: GradStore::new(&ps),
            opt: Box::new(AdamW::new(AdamWConfig { weight_decay: 0.01, ..Default::default() }, &ps)),
            ps: make().1,
            // Two moments (the decay multiplier is one per parameter since 29036c5).
            bytes: 8.0,
            step_ms: 0.0,
            opt_ms: 0.0,
        }];
        for f in [1u64, 10, 100] {
            let soap = Soap::new(SoapConfig { precondition_frequency: f, ..Default::default() }, &ps);
            runners.push(Runner {
                name: format!("SOAP f={f}"),
                grads: GradStore::new(&ps),
                bytes: soap.state_bytes() as f64 / n as f64,
                opt: Box::new(soap),
                ps: make().1,
                step_ms: 0.0,
                opt_ms: 0.0,
            });
        }
        pool.install(|| run_interleaved(&gpt, &batch, &mut runners, steps));
        println!("\nSOAP vs AdamW, GPT-mini ({n} parameters), f32, {threads} thread(s), mean of {steps} steps, the optimizers interleaved step by step (ms)");
        println!("| optimizer | step | optimizer | step ratio vs AdamW | state bytes / parameter |");
        println!("|---|---|---|---|---|");
        let base = runners[0].step_ms;
        for r in &runners {
            println!("| {} | {:.1} | {:.1} | {:.2}× | {:.1} |", r.name, r.step_ms, r.opt_ms, r.step_ms / base, r.bytes);
        }
    }

    // Owner split: the same gradients on each rank, a refresh every step.
    let grads: Vec<f32> = (0..n).map(|_| rng.normal() as f32 * 1e-2).collect();
    let precond = |comm: &mut dyn Communicator, distribute: Distribute| -> f64 {
        let mut p = make().1;
        let mut g = GradStore::new(&p);
        g.flat_mut::<f32>().unwrap().copy_from_slice(&grads);
        let mut soap = Soap::new(SoapConfig { precondition_frequency: 1, distribute, ..Default::default() }, &p);
        for i in 0..6 {
            soap.step(&mut p, &g, &mut StepCtx { step: i + 1, lr: 1e-3, comm }).expect("step");
        }
        soap.precond_seconds()
    };
    let one = precond(&mut LocalComm::new(), Distribute::Replicated);
    let per_rank: Vec<f64> = std::thread::scope(|s| {
        let hs: Vec<_> = ThreadComm::group(2, Duration::from_secs(600))
            .into_iter()
            .map(|mut c| {
                let precond = &precond;
                // Each rank its own one-thread pool, as an MPI process has (the global pool
                // would run both ranks' parameters on one thread).
                s.spawn(move || {
                    let pool = rayon::ThreadPoolBuilder::new().num_threads(1).build().expect("rayon pool");
                    pool.install(|| precond(&mut c, Distribute::Owner))
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    println!("\nSOAP eigenbasis time per rank over 6 steps at f = 1 (s): owner mode splits the parameters by cost");
    println!("| ranks | rank 0 | rank 1 | max / 1-rank |");
    println!("|---|---|---|---|");
    println!("| 1 | {one:.3} | – | 1.00 |");
    println!("| 2 (owner) | {:.3} | {:.3} | {:.2} |", per_rank[0], per_rank[1], per_rank[0].max(per_rank[1]) / one);

    // GPT-124M (d_model 768, 12 layers, context 1024, vocab 50257 — above max_precond_dim, so the
    // embedding has only its 768 factor): per layer qkv 2304+768, attention projection 768+768,
    // MLP 3072+768 and 768+3072; the position embedding 1024+768.
    println!("\nHost eigenbasis cost per factor (f64, faer, 1 thread) at GPT-124M's sizes (s)");
    println!("| d | eigh (first step) | power iteration + QR (each refresh) |");
    println!("|---|---|---|");
    let mut cost = std::collections::HashMap::new();
    for d in [768usize, 1024, 2304, 3072] {
        let (e, q) = basis_refresh_seconds(d).expect("factor");
        println!("| {d} | {e:.2} | {q:.2} |");
        cost.insert(d, (e, q));
    }
    let count = [(768usize, 12 * 5 + 2), (1024, 1), (2304, 12), (3072, 24)];
    let total = |pick: fn(&(f64, f64)) -> f64| count.iter().map(|(d, k)| *k as f64 * pick(&cost[d])).sum::<f64>();
    println!(
        "GPT-124M, all {} factors on one core: eigh {:.0} s, one refresh {:.0} s",
        count.iter().map(|c| c.1).sum::<usize>(),
        total(|c| c.0),
        total(|c| c.1)
    );
}
