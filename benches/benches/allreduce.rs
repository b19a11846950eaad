//! All-reduce bandwidth: dptrain's gradient path (GradReducer: bucket copy-out, communication
//! thread, watchdog-polled MPI_Iallreduce, average, copy-back) against a raw blocking
//! MPI_Allreduce of the same bytes, 2 ranks, 4 KiB … 64 MiB, in one run. Prints bus bandwidth
//! (busbw = algbw · 2(n−1)/n, as nccl-tests) and the ratio.
//!
//! `cargo bench -p dptrain-benches --bench allreduce` re-launches itself under
//! `mpirun -np 2` when not already started by an MPI launcher.

use dptrain_comm::mpi::MpiEnv;
use dptrain_comm::GradReducer;
use dptrain_core::{DType, GradStore, Init, ParamBuilder, ParamId, Role};
use std::time::{Duration, Instant};

fn relaunch() -> ! {
    let exe = std::env::current_exe().expect("own path");
    let status = std::process::Command::new("mpirun")
        .args(["--oversubscribe", "--bind-to", "none", "-np", "2"])
        .arg(exe)
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .status()
        .expect("mpirun (install Open MPI)");
    std::process::exit(status.code().unwrap_or(1));
}

fn main() {
    if !dptrain_comm::world::under_mpi_launcher() {
        relaunch();
    }
    let env = MpiEnv::init().expect("MPI");
    let n = env.info.world_size as f64;
    let mut raw = env.comm(Duration::from_secs(600), "raw");
    let rank0 = env.info.rank == 0;
    if rank0 {
        println!("\nall-reduce, {} ranks, f32, median of timed iterations; busbw = bytes/t · 2(n−1)/n", env.info.world_size);
        println!("| size | raw MPI_Allreduce busbw (GB/s) | dptrain reducer busbw (GB/s) | ratio |");
        println!("|---|---|---|---|");
    }
    let mut kib = 4usize;
    while kib <= 64 * 1024 {
        let elems = kib * 1024 / 4;
        let iters = (256 * 1024 / kib).clamp(5, 200);
        // raw
        let send: Vec<f32> = vec![1.0; elems];
        let mut recv = vec![0f32; elems];
        let mut t_raw = vec![];
        for i in 0..iters + 2 {
            dptrain_core::comm::Communicator::barrier(&mut raw).unwrap();
            let t = Instant::now();
            raw.raw_all_reduce_sum(&send, &mut recv);
            if i >= 2 {
                t_raw.push(t.elapsed().as_secs_f64());
            }
        }
        // reducer: one parameter of `elems` floats, one bucket
        let mut pb = ParamBuilder::new();
        pb.add("g", &[elems], Role::Hidden, 1, 1, Init::Const(0.0));
        let ps = pb.build(0, DType::F32).unwrap();
        let mut grads = GradStore::new(&ps);
        grads.flat_mut::<f32>().unwrap().fill(1.0);
        let mut red = GradReducer::new(Box::new(env.comm(Duration::from_secs(600), "grads")), &ps, 1024.0, true);
        let mut t_red = vec![];
        for i in 0..iters + 2 {
            dptrain_core::comm::Communicator::barrier(&mut raw).unwrap();
            let t = Instant::now();
            red.begin(true);
            // SAFETY: `grads` outlives the reducer and is not written before wait_all.
            unsafe { red.on_ready(ParamId(0), &grads) }.unwrap();
            red.wait_all(&mut grads).unwrap();
            if i >= 2 {
                t_red.push(t.elapsed().as_secs_f64());
            }
        }
        drop(red);
        let bus = |t: f64| (kib * 1024) as f64 / t * 2.0 * (n - 1.0) / n / 1e9;
        let (a, b) = (dptrain_benches::median(&t_raw), dptrain_benches::median(&t_red));
        if rank0 {
            let size = if kib >= 1024 { format!("{} MiB", kib / 1024) } else { format!("{kib} KiB") };
            println!("| {size} | {:.2} | {:.2} | {:.2} |", bus(a), bus(b), a / b);
        }
        kib *= 4;
    }
}
