//! The device side of `dptrain gpu-check`: compiles every kernel for the device's own
//! architecture, loads it, runs the kernels that have a CPU counterpart in the engine on random
//! inputs, and reports the largest relative difference from the CPU result. This is the first
//! thing a machine with a GPU runs; it needs no CUDA toolkit, only the driver and NVRTC.
//!
//! Everything here is reached only after `device::cuda_status()` found a device, so cudarc's
//! loader never panics on a machine without CUDA.

use super::{compile, SOURCES};
use crate::autograd::Tape;
use crate::rng::Rng;
use crate::tensor::Tensor;
use cudarc::driver::{CudaContext, CudaFunction, CudaModule, CudaStream, LaunchConfig, PushKernelArg};
use cudarc::nvrtc::Ptx;
use std::collections::HashMap;
use std::sync::Arc;

/// One row of the check: an op, its largest relative error against the CPU engine, and the
/// bound it must meet.
#[derive(Debug, Clone)]
pub struct CheckRow {
    pub op: String,
    pub max_rel_err: f64,
    pub bound: f64,
}

impl CheckRow {
    pub fn ok(&self) -> bool {
        self.max_rel_err <= self.bound
    }
}

/// Device facts printed at the top of the check.
#[derive(Debug, Clone)]
pub struct DeviceInfo {
    pub name: String,
    pub compute_capability: (i32, i32),
    pub arch: String,
}

fn e(x: impl std::fmt::Debug) -> String {
    format!("{x:?}")
}

fn rel_err(gpu: &[f32], cpu: &[f32]) -> f64 {
    gpu.iter().zip(cpu).map(|(&g, &c)| ((g - c).abs() as f64) / (1.0 + c.abs() as f64)).fold(0.0, f64::max)
}

fn rand_vec(n: usize, seed: u64) -> Vec<f32> {
    let mut r = Rng::new(seed);
    (0..n).map(|_| r.normal() as f32).collect()
}

fn cfg(n: usize) -> LaunchConfig {
    LaunchConfig { grid_dim: (n.div_ceil(256).clamp(1, 65535) as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 }
}

fn rows_cfg(rows: usize) -> LaunchConfig {
    LaunchConfig { grid_dim: (rows.clamp(1, 65535) as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 }
}

struct Kernels {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    modules: HashMap<&'static str, Arc<CudaModule>>,
}

impl Kernels {
    fn f(&self, module: &str, name: &str) -> Result<CudaFunction, String> {
        self.modules
            .get(module)
            .ok_or_else(|| format!("no module {module}"))?
            .load_function(name)
            .map_err(|x| format!("{module}.{name}: {x:?}"))
    }
}

/// Runs the check on device `ordinal`.
pub fn run(ordinal: usize) -> Result<(DeviceInfo, Vec<CheckRow>), String> {
    let ctx = CudaContext::new(ordinal).map_err(e)?;
    let (maj, min) = ctx.compute_capability().map_err(e)?;
    let info = DeviceInfo { name: ctx.name().map_err(e)?, compute_capability: (maj, min), arch: format!("sm_{maj}{min}") };
    let arch: &'static str = Box::leak(info.arch.clone().into_boxed_str());
    let mut modules = HashMap::new();
    for (name, src) in SOURCES {
        let c = compile(name, src, arch)?;
        modules.insert(*name, ctx.load_module(Ptx::from_src(c.ptx)).map_err(|x| format!("loading {name}: {x:?}"))?);
    }
    let k = Kernels { stream: ctx.default_stream(), ctx, modules };
    let rows = vec![
        check_binary(&k)?,
        check_gelu(&k, false)?,
        check_gelu(&k, true)?,
        check_layer_norm(&k)?,
        check_cross_entropy(&k)?,
        check_adamw(&k)?,
        check_sum_cols(&k)?,
    ];
    k.ctx.synchronize().map_err(e)?;
    Ok((info, rows))
}

fn check_binary(k: &Kernels) -> Result<CheckRow, String> {
    let (n, c) = (4096usize, 64usize);
    let (a, b) = (rand_vec(n, 1), rand_vec(c, 2));
    let s = &k.stream;
    let (da, db) = (s.clone_htod(&a).map_err(e)?, s.clone_htod(&b).map_err(e)?);
    let mut out = s.alloc_zeros::<f32>(n).map_err(e)?;
    let f = k.f("elementwise", "add_f32")?;
    let (ni, na, nb) = (n as i64, n as i64, c as i64);
    // SAFETY: argument types and order match `add_f32` in elementwise.cu; buffers hold n, n and
    // c elements as the kernel's index arithmetic requires.
    unsafe { s.launch_builder(&f).arg(&da).arg(&db).arg(&mut out).arg(&ni).arg(&na).arg(&nb).launch(cfg(n)) }.map_err(e)?;
    let gpu = s.clone_dtoh(&out).map_err(e)?;
    let tape = Tape::inference();
    let cpu =
        tape.constant(Tensor::from_vec(a, &[n / c, c]).map_err(e)?).add(tape.constant(Tensor::from_vec(b, &[c]).map_err(e)?)).map_err(e)?;
    Ok(CheckRow { op: "add (bias broadcast)".into(), max_rel_err: rel_err(&gpu, &cpu.value().to_vec::<f32>().map_err(e)?), bound: 1e-6 })
}

fn check_gelu(k: &Kernels, tanh: bool) -> Result<CheckRow, String> {
    let n = 8192usize;
    let x = rand_vec(n, 3);
    let s = &k.stream;
    let dx = s.clone_htod(&x).map_err(e)?;
    let mut out = s.alloc_zeros::<f32>(n).map_err(e)?;
    let f = k.f("elementwise", "gelu_f32")?;
    let (ni, t) = (n as i64, tanh as i32);
    // SAFETY: matches `gelu_f32(const float*, float*, i64, int)`; both buffers hold n floats.
    unsafe { s.launch_builder(&f).arg(&dx).arg(&mut out).arg(&ni).arg(&t).launch(cfg(n)) }.map_err(e)?;
    let gpu = s.clone_dtoh(&out).map_err(e)?;
    let tape = Tape::inference();
    let cpu = tape.constant(Tensor::from_vec(x, &[n]).map_err(e)?).gelu(tanh).map_err(e)?;
    Ok(CheckRow {
        op: format!("gelu ({})", if tanh { "tanh" } else { "erf" }),
        max_rel_err: rel_err(&gpu, &cpu.value().to_vec::<f32>().map_err(e)?),
        bound: 1e-5,
    })
}

fn check_layer_norm(k: &Kernels) -> Result<CheckRow, String> {
    let (rows, c) = (256usize, 128usize);
    let (x, w, b) = (rand_vec(rows * c, 4), rand_vec(c, 5), rand_vec(c, 6));
    let s = &k.stream;
    let (dx, dw, db) = (s.clone_htod(&x).map_err(e)?, s.clone_htod(&w).map_err(e)?, s.clone_htod(&b).map_err(e)?);
    let mut y = s.alloc_zeros::<f32>(rows * c).map_err(e)?;
    let mut mean = s.alloc_zeros::<f32>(rows).map_err(e)?;
    let mut rstd = s.alloc_zeros::<f32>(rows).map_err(e)?;
    let f = k.f("layer_norm", "layer_norm_fwd_f32")?;
    let (r, cc, eps) = (rows as i64, c as i64, 1e-5f32);
    // SAFETY: matches layer_norm_fwd_f32's signature; x, y hold rows·c floats, w, b c floats,
    // mean, rstd rows floats.
    unsafe {
        s.launch_builder(&f)
            .arg(&dx)
            .arg(&dw)
            .arg(&db)
            .arg(&mut y)
            .arg(&mut mean)
            .arg(&mut rstd)
            .arg(&r)
            .arg(&cc)
            .arg(&eps)
            .launch(rows_cfg(rows))
    }
    .map_err(e)?;
    let gpu = s.clone_dtoh(&y).map_err(e)?;
    let tape = Tape::inference();
    let t = |v: Vec<f32>, sh: &[usize]| Tensor::from_vec(v, sh).map(|t| tape.constant(t)).map_err(e);
    let cpu = t(x, &[rows, c])?.layer_norm(Some(t(w, &[c])?), Some(t(b, &[c])?), 1e-5).map_err(e)?;
    Ok(CheckRow { op: "layer_norm".into(), max_rel_err: rel_err(&gpu, &cpu.value().to_vec::<f32>().map_err(e)?), bound: 1e-5 })
}

fn check_cross_entropy(k: &Kernels) -> Result<CheckRow, String> {
    let (rows, v) = (128usize, 512usize);
    let x = rand_vec(rows * v, 7);
    let tg: Vec<u32> = (0..rows as u32).map(|i| (i * 37) % v as u32).collect();
    let s = &k.stream;
    let (dx, dt) = (s.clone_htod(&x).map_err(e)?, s.clone_htod(&tg).map_err(e)?);
    let mut loss = s.alloc_zeros::<f32>(rows).map_err(e)?;
    let mut lse = s.alloc_zeros::<f32>(rows).map_err(e)?;
    let f = k.f("cross_entropy", "xent_fwd_f32")?;
    let (r, vv, z) = (rows as i64, v as i64, 1e-3f32);
    // SAFETY: matches xent_fwd_f32's signature; x holds rows·v floats, targets rows ids < v.
    unsafe { s.launch_builder(&f).arg(&dx).arg(&dt).arg(&mut loss).arg(&mut lse).arg(&r).arg(&vv).arg(&z).launch(rows_cfg(rows)) }
        .map_err(e)?;
    let per_row = s.clone_dtoh(&loss).map_err(e)?;
    let gpu_mean = per_row.iter().map(|&l| l as f64).sum::<f64>() / rows as f64;
    let tape = Tape::inference();
    let cpu = tape.constant(Tensor::from_vec(x, &[rows, v]).map_err(e)?).cross_entropy(&tg, 1e-3).map_err(e)?;
    let c = cpu.loss.item().map_err(e)?;
    Ok(CheckRow { op: "cross_entropy + z-loss".into(), max_rel_err: (gpu_mean - c).abs() / (1.0 + c.abs()), bound: 1e-5 })
}

fn check_adamw(k: &Kernels) -> Result<CheckRow, String> {
    let n = 10_000usize;
    let (p0, g) = (rand_vec(n, 8), rand_vec(n, 9));
    let s = &k.stream;
    let mut dp = s.clone_htod(&p0).map_err(e)?;
    let dg = s.clone_htod(&g).map_err(e)?;
    let mut dm = s.alloc_zeros::<f32>(n).map_err(e)?;
    let mut dv = s.alloc_zeros::<f32>(n).map_err(e)?;
    let mask = s.clone_htod(&vec![1f32; n]).map_err(e)?;
    // First AdamW step with lr 1e-2, betas (0.9, 0.999), eps 1e-8, coupled decay 0.1: the
    // constants the CPU optimizer derives (dptrain-optim's AdamW::step).
    let (b1, b2, eps, lr, wd) = (0.9f32, 0.999f32, 1e-8f32, 1e-2f64, 0.1f64);
    let (bc1, bc2) = (1.0 - 0.9f64, 1.0 - 0.999f64);
    let (step, inv_sqrt_bc2, decay) = ((lr / bc1) as f32, (1.0 / bc2.sqrt()) as f32, (lr * wd) as f32);
    let f = k.f("optim", "adamw_f32")?;
    let ni = n as i64;
    // SAFETY: matches adamw_f32's signature; all buffers hold n floats.
    unsafe {
        s.launch_builder(&f)
            .arg(&mut dp)
            .arg(&dg)
            .arg(&mut dm)
            .arg(&mut dv)
            .arg(&mask)
            .arg(&ni)
            .arg(&b1)
            .arg(&b2)
            .arg(&eps)
            .arg(&step)
            .arg(&inv_sqrt_bc2)
            .arg(&decay)
            .launch(cfg(n))
    }
    .map_err(e)?;
    let gpu = s.clone_dtoh(&dp).map_err(e)?;
    // CPU reference: the same arithmetic as dptrain-optim's fused pass.
    let cpu: Vec<f32> = p0
        .iter()
        .zip(&g)
        .map(|(&p, &gi)| {
            let m = (1.0 - b1) * gi;
            let v = (1.0 - b2) * gi * gi;
            p * (1.0 - decay) - step * m / (v.sqrt() * inv_sqrt_bc2 + eps)
        })
        .collect();
    Ok(CheckRow { op: "adamw step".into(), max_rel_err: rel_err(&gpu, &cpu), bound: 1e-6 })
}

fn check_sum_cols(k: &Kernels) -> Result<CheckRow, String> {
    let (rows, cols) = (512usize, 384usize);
    let x = rand_vec(rows * cols, 10);
    let s = &k.stream;
    let dx = s.clone_htod(&x).map_err(e)?;
    let mut out = s.alloc_zeros::<f32>(cols).map_err(e)?;
    let f = k.f("reduce", "sum_cols_f32")?;
    let (r, c) = (rows as i64, cols as i64);
    // SAFETY: matches sum_cols_f32's signature; x holds rows·cols floats, out cols floats.
    unsafe { s.launch_builder(&f).arg(&dx).arg(&mut out).arg(&r).arg(&c).launch(cfg(cols)) }.map_err(e)?;
    let gpu = s.clone_dtoh(&out).map_err(e)?;
    let cpu = crate::kernels::cpu::reduce::sum_dim::<f32>(&Tensor::from_vec(x, &[rows, cols]).map_err(e)?, 0).map_err(e)?;
    Ok(CheckRow { op: "sum over rows (bias grad)".into(), max_rel_err: rel_err(&gpu, &cpu.to_vec::<f32>().map_err(e)?), bound: 1e-5 })
}
