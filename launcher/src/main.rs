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
            train(&TrainArgs { config, sets, run_dir, resume, fault })?;
        }
        #[cfg(not(feature = "fault-injection"))]
        Cmd::Train { config, sets, run_dir, resume } => {
            // GPU runs need NVRTC, cuBLAS (and NCCL for several GPUs) loadable; this must happen
            // before MPI starts (it may re-execute the binary with their directories on the
            // library path).
            ensure_cuda_libs_for_train();
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
        Cmd::Sweep { config, sets, lr, grid, out } => {
            use dptrain_launcher::sweep as sw;
            let s = sw::run(&sw::SweepArgs { config, sets, lrs: lr, grid, out: out.clone() })?;
            print!("{}", sw::table(&s));
            println!("wrote {} and {}", out.join("sweep.json").display(), out.join("sweep.png").display());
        }
        Cmd::Report { run_dir } => {
            let w = dptrain_launcher::report::report(&run_dir)?;
            for p in &w.plots {
                println!("wrote {}", p.display());
            }
            println!("wrote {}", w.report.display());
        }
        Cmd::Config { cmd: ConfigCmd::Show } => print!("{}", dptrain_launcher::config::show_default()),
        Cmd::Parity { cmd: ParityCmd::Optim { config, input, output, state_in, state_out } } => {
            dptrain_launcher::parity::optim(&dptrain_launcher::parity::ParityArgs { config, input, output, state_in, state_out })?
        }
        Cmd::GpuCheck { device } => {
            #[cfg(feature = "cuda")]
            if matches!(dptrain_core::device::cuda_status(), dptrain_core::device::CudaStatus::Devices(_)) {
                dptrain_launcher::cuda_libs::ensure_cuda_libs();
            }
            dptrain_launcher::gpu_check::run(device)?
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
            eprintln!("dptrain: error: {first} (see dptrain --help)");
            return ExitCode::from(2);
        }
        Err(e) => {
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
    };
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let code = e.downcast_ref::<LaunchError>().map(|l| l.exit_code()).unwrap_or(1);
            eprintln!("dptrain: error: {e}");
            ExitCode::from(code)
        }
    }
}
