//! The `dptrain` binary: parse the command line, run, map errors to exit codes (2 for bad
//! input, 1 for failures during a run). `anyhow` is used here only.

use clap::Parser;
use dptrain_launcher::cli::{Cli, Cmd, ConfigCmd, ParityCmd};
use dptrain_launcher::error::LaunchError;
use dptrain_launcher::train::{train, TrainArgs};
use std::process::ExitCode;

// mimalloc keeps freed pages for reuse instead of returning large blocks to the OS each step.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.cmd {
        #[cfg(feature = "fault-injection")]
        Cmd::Train { config, sets, run_dir, resume, fault } => {
            ensure_cuda_libs_for_train();
            dptrain_launcher::stop::install();
            train(&TrainArgs { config, sets, run_dir, resume, fault })?;
        }
        #[cfg(not(feature = "fault-injection"))]
        Cmd::Train { config, sets, run_dir, resume } => {
            // GPU runs need NVRTC, cuBLAS (and NCCL for several GPUs) loadable; this must happen
            // before MPI starts (it may re-execute the binary with their directories on the
            // library path).
            ensure_cuda_libs_for_train();
            // SIGTERM / SIGUSR1 stop the run at a step's end with a checkpoint (`stop`): this
            // command only, not the in-process runs of gpu-check.
            dptrain_launcher::stop::install();
            train(&TrainArgs { config, sets, run_dir, resume, fault: None })?;
        }
        Cmd::CoordCheck { config, sets, widths, max_slope, seeds, steps, lr, out } => {
            use dptrain_launcher::coord_check as cc;
            let args = cc::CoordArgs { config, sets, widths, max_slope, seeds, steps, lr, out };
            let report = cc::run(&args)?;
            print!("{}", cc::table(&report));
            cc::write(&report, &args.out)?;
            println!("wrote {} and {}", args.out.join("coord_check.json").display(), args.out.join("coord_check.png").display());
            if !report.failures.is_empty() {
                return Err(LaunchError::Runtime(format!(
                    "coordinate check failed: {} (module, step) curves with |slope| ≥ {}",
                    report.failures.len(),
                    max_slope
                ))
                .into());
            }
        }
        Cmd::Sweep { config, sets, lr, grid, out, slurm, collect, job } => {
            use dptrain_launcher::sweep as sw;
            let mode = if slurm {
                sw::Mode::Slurm(Box::new(slurm_args(&job)))
            } else if collect {
                sw::Mode::Collect
            } else {
                sw::Mode::Run
            };
            let args = sw::SweepArgs { config, sets, lrs: lr, grid, out: out.clone(), mode: mode.clone() };
            if let sw::Mode::Slurm(j) = &mode {
                let script = sw::write_slurm(&args, j)?;
                println!("wrote {}: submit it with `sbatch {}`; when it has run, `dptrain sweep` with the same arguments and --collect (instead of --slurm) writes sweep.json and sweep.png", script.display(), script.display());
                return Ok(());
            }
            let s = sw::run(&args)?;
            print!("{}", sw::table(&s));
            println!("wrote {} and {}", out.join("sweep.json").display(), out.join("sweep.png").display());
        }
        Cmd::Slurm { config, sets, job, script, submit } => {
            dptrain_launcher::slurm::slurm(&dptrain_launcher::slurm::SlurmArgs { config, sets, script, submit, ..slurm_args(&job) })?;
        }
        Cmd::Launch { n, hosts, mpirun_args, no_prefix, grace, cmd } => {
            let code = dptrain_launcher::launch::launch(&dptrain_launcher::launch::LaunchArgs {
                n,
                hosts,
                mpirun_args,
                no_prefix,
                cmd,
                grace_s: grace,
            })?;
            if code != 0 {
                return Err(Exit(code).into());
            }
        }
        Cmd::Report { run_dir } => {
            let w = dptrain_launcher::report::report(&run_dir)?;
            for warning in &w.warnings {
                eprintln!("dptrain: warning: {warning}");
            }
            for p in &w.plots {
                println!("wrote {}", p.display());
            }
            println!("wrote {}", w.report.display());
        }
        Cmd::Env => print!("{}", dptrain_launcher::env_report::report()),
        Cmd::Config { cmd: ConfigCmd::Show } => print!("{}", dptrain_launcher::config::show_default()),
        Cmd::Parity { cmd: ParityCmd::Optim { config, input, output, state_in, state_out } } => {
            dptrain_launcher::parity::optim(&dptrain_launcher::parity::ParityArgs { config, input, output, state_in, state_out })?
        }
        Cmd::GpuCheck { device, profile_out } => {
            #[cfg(feature = "cuda")]
            if matches!(dptrain_core::device::cuda_status(), dptrain_core::device::CudaStatus::Devices(_)) {
                dptrain_launcher::cuda_libs::ensure_cuda_libs();
            }
            dptrain_launcher::gpu_check::run(device, profile_out.as_deref())?
        }
    }
    Ok(())
}

/// GPU runs need NVRTC, cuBLAS (and NCCL for several GPUs) loadable; this must happen before MPI
/// starts (it may re-execute the binary with their directories on the library path).
fn ensure_cuda_libs_for_train() {
    #[cfg(feature = "cuda")]
    if !dptrain_core::tensor::cuda::emulated()
        && matches!(dptrain_core::device::cuda_status(), dptrain_core::device::CudaStatus::Devices(_))
    {
        dptrain_launcher::cuda_libs::ensure_cuda_libs();
    }
}

/// The job shape of `dptrain slurm` / `sweep --slurm`.
fn slurm_args(j: &dptrain_launcher::cli::SlurmOpts) -> dptrain_launcher::slurm::SlurmArgs {
    dptrain_launcher::slurm::SlurmArgs {
        nodes: j.nodes,
        gpus_per_node: j.gpus_per_node,
        ntasks_per_node: j.ntasks_per_node,
        time: j.time.clone(),
        partition: j.partition.clone(),
        account: j.account.clone(),
        cpus_per_task: j.cpus_per_task,
        mpi: j.mpi.clone(),
        ..Default::default()
    }
}

/// A child job's exit code, passed on as ours.
#[derive(Debug)]
struct Exit(i32);

impl std::fmt::Display for Exit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "exit code {}", self.0)
    }
}

impl std::error::Error for Exit {}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            dptrain_core::env::env()
                .log
                .as_deref()
                .and_then(|f| tracing_subscriber::EnvFilter::try_new(f).ok())
                .unwrap_or_else(|| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) if e.use_stderr() => {
            // One line, like every other input error; clap's usage text is one --help away.
            let text = e.to_string();
            let first = text.lines().next().unwrap_or("invalid command line").trim_start_matches("error: ");
            dptrain_launcher::say(&format!("dptrain: error: {first} (see dptrain --help)"));
            return ExitCode::from(2);
        }
        Err(e) => {
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
    };
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        // The job said why it failed; only its code is ours to pass on.
        Err(e) if e.downcast_ref::<Exit>().is_some() => ExitCode::from(e.downcast_ref::<Exit>().map_or(1, |x| x.0.clamp(1, 255) as u8)),
        Err(e) => {
            let code = e.downcast_ref::<LaunchError>().map(|l| l.exit_code()).unwrap_or(1);
            match e.downcast_ref::<LaunchError>() {
                // Not an error: what was asked for; said once (by rank 0).
                Some(LaunchError::Stopped { message, .. }) if message.is_empty() => {}
                Some(LaunchError::Stopped { message, .. }) => dptrain_launcher::say(&format!("dptrain: {message}")),
                _ => dptrain_launcher::say(&format!("dptrain: error: {e}")),
            }
            ExitCode::from(code)
        }
    }
}
