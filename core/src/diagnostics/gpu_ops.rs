//! Part (a) of `dptrain gpu-check`: every op of the engine run through the real dispatch on the
//! GPU and on the CPU with the same random inputs, forward and backward, and the largest
//! relative difference reported per op. Each case builds its op on a tape from leaf inputs,
//! reduces the output against a fixed random weighting (so every output element gets a
//! distinct gradient), and backpropagates; the output and every input gradient are compared.
//!
//! Everything here is reached only after `device::cuda_status()` found a device, so cudarc's
//! loader never panics on a machine without CUDA.

use crate::autograd::{Tape, Var};
use crate::error::Result;
use crate::ops::fused::batch_norm::RunningStats;
use crate::rng::Rng;
use crate::tensor::{Device, Precision, Tensor};
use std::sync::Mutex;

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
    /// How the kernels were compiled and loaded (`KernelLoad`'s line).
    pub kernels: String,
}

/// max |g − c| / (1 + |c|) over elements (NaN anywhere counts as infinite).
pub fn rel_err(gpu: &[f32], cpu: &[f32]) -> f64 {
    if gpu.len() != cpu.len() {
        return f64::INFINITY;
    }
    gpu.iter()
        .zip(cpu)
        .map(|(&g, &c)| {
            let e = ((g - c).abs() as f64) / (1.0 + c.abs() as f64);
            if e.is_nan() {
                f64::INFINITY
            } else {
                e
            }
        })
        .fold(0.0, f64::max)
}

fn rand(shape: &[usize], seed: u64, lo: f64, hi: f64) -> Tensor {
    let mut r = Rng::new(seed);
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n).map(|_| (lo + (hi - lo) * r.uniform()) as f32).collect();
    Tensor::from_vec(v, shape).expect("shape")
}

fn randn(shape: &[usize], seed: u64) -> Tensor {
    let mut r = Rng::new(seed);
    let n: usize = shape.iter().product();
    Tensor::from_vec((0..n).map(|_| r.normal() as f32).collect::<Vec<f32>>(), shape).expect("shape")
}

/// `randn` times `k` (weights scaled so products stay O(1)).
fn randn_scaled(shape: &[usize], seed: u64, k: f32) -> Tensor {
    let v: Vec<f32> = randn(shape, seed).to_vec::<f32>().expect("f32").iter().map(|x| x * k).collect();
    Tensor::from_vec(v, shape).expect("shape")
}

/// An op under test: builds its output from leaf inputs on a tape.
type Build = Box<dyn for<'t> Fn(&'t Tape, &[Var<'t>], Device) -> Result<Var<'t>>>;

struct Case {
    name: String,
    inputs: Vec<Tensor>,
    build: Build,
    bound: f64,
    prec: Precision,
    /// What the case changes in the GPU's fused paths.
    set: Set,
}

/// A case's fused paths on the GPU: the rest as the process has them (`DPTRAIN_EPILOGUE`,
/// `DPTRAIN_FLASH_ROWS`, …).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Set {
    /// As the process has them.
    Process,
    /// GEMM epilogues off (the path taken where cuBLASLt cannot fuse).
    Unfused,
    /// The flash forward on 64-row query tiles (the 128-row kernel is the default).
    FlashRows64,
}

/// Runs a case on `device`: (output, gradient of every input), on the host.
fn run_on(c: &Case, device: Device) -> Result<(Vec<f32>, Vec<Vec<f32>>)> {
    let Device::Cuda(o) = device else { return run_case(c, device) };
    let d = crate::tensor::cuda::dev(o)?;
    let before = d.fusions();
    d.set_fusions(match c.set {
        Set::Process => before,
        Set::Unfused => crate::tensor::cuda::Fusions { epilogue: false, ..before },
        Set::FlashRows64 => crate::tensor::cuda::Fusions { flash_wide: false, ..before },
    });
    let r = run_case(c, device);
    d.set_fusions(before);
    r
}

fn run_case(c: &Case, device: Device) -> Result<(Vec<f32>, Vec<Vec<f32>>)> {
    let tape = Tape::new();
    tape.set_precision(c.prec);
    let leaves: Vec<Var> = c.inputs.iter().map(|t| t.to_device(device).map(|t| tape.leaf(t))).collect::<Result<_>>()?;
    let out = (c.build)(&tape, &leaves, device)?;
    let w = randn(&out.shape(), 999).to_device(device)?;
    let loss = out.mul(tape.constant(w))?.sum_all()?;
    let mut grads = crate::params::GradStore::empty();
    let lg = tape.backward(loss, &mut grads, |_, _| {})?;
    let y = out.value().to_vec::<f32>()?;
    let gs =
        leaves.iter().map(|l| lg.get(*l).map(|g| g.to_vec::<f32>()).transpose().map(Option::unwrap_or_default)).collect::<Result<_>>()?;
    Ok((y, gs))
}

fn cases() -> Vec<Case> {
    let mut v: Vec<Case> = vec![];
    let f32c = |name: &str, inputs: Vec<Tensor>, build: Build| Case {
        name: name.into(),
        inputs,
        build,
        bound: 1e-5,
        prec: Precision::F32,
        set: Set::Process,
    };
    v.push(f32c("add", vec![randn(&[64, 48], 1), randn(&[64, 48], 2)], Box::new(|_, x, _| x[0].add(x[1]))));
    v.push(f32c("add (bias broadcast)", vec![randn(&[64, 48], 3), randn(&[48], 4)], Box::new(|_, x, _| x[0].add(x[1]))));
    v.push(f32c("sub (column broadcast)", vec![randn(&[64, 48], 5), randn(&[64, 1], 6)], Box::new(|_, x, _| x[0].sub(x[1]))));
    v.push(f32c("mul (3-d broadcast)", vec![randn(&[4, 16, 8], 7), randn(&[4, 1, 8], 8)], Box::new(|_, x, _| x[0].mul(x[1]))));
    v.push(f32c("div", vec![randn(&[32, 32], 9), rand(&[32, 32], 10, 0.5, 2.0)], Box::new(|_, x, _| x[0].div(x[1]))));
    v.push(f32c("affine", vec![randn(&[1000], 11)], Box::new(|_, x, _| x[0].affine(-1.5, 0.25))));
    v.push(f32c("exp", vec![randn(&[1000], 12)], Box::new(|_, x, _| x[0].exp())));
    v.push(f32c("log", vec![rand(&[1000], 13, 0.1, 3.0)], Box::new(|_, x, _| x[0].log())));
    v.push(f32c("tanh", vec![randn(&[1000], 14)], Box::new(|_, x, _| x[0].tanh())));
    v.push(f32c("relu", vec![randn(&[1000], 15)], Box::new(|_, x, _| x[0].relu())));
    v.push(f32c("square", vec![randn(&[1000], 16)], Box::new(|_, x, _| x[0].square())));
    v.push(f32c("gelu (erf)", vec![randn(&[8192], 17)], Box::new(|_, x, _| x[0].gelu(false))));
    v.push(f32c("gelu (tanh)", vec![randn(&[8192], 18)], Box::new(|_, x, _| x[0].gelu(true))));
    v.push(f32c("sum over dim 0", vec![randn(&[96, 40], 19)], Box::new(|_, x, _| x[0].sum_dims(&[0], false))));
    v.push(f32c("sum over dims 0, 2 (keepdim)", vec![randn(&[6, 5, 7], 20)], Box::new(|_, x, _| x[0].sum_dims(&[0, 2], true))));
    v.push(f32c("mean of all", vec![randn(&[33, 17], 21)], Box::new(|_, x, _| x[0].mean_all())));
    v.push(f32c("matmul", vec![randn(&[48, 40], 22), randn(&[40, 56], 23)], Box::new(|_, x, _| x[0].matmul(x[1]))));
    v.push(f32c("matmul (batched)", vec![randn(&[3, 24, 16], 24), randn(&[3, 16, 20], 25)], Box::new(|_, x, _| x[0].matmul(x[1]))));
    v.push(f32c("matmul (transposed view)", vec![randn(&[48, 40], 26), randn(&[56, 40], 27)], Box::new(|_, x, _| x[0].matmul(x[1].t()?))));
    v.push(f32c("matmul (batched @ 2-d)", vec![randn(&[2, 24, 16], 28), randn(&[16, 20], 29)], Box::new(|_, x, _| x[0].matmul(x[1]))));
    v.push(f32c(
        "linear (+bias)",
        vec![randn(&[4, 32, 64], 30), randn(&[96, 64], 31), randn(&[96], 32)],
        Box::new(|_, x, _| x[0].linear(x[1], Some(x[2]))),
    ));
    v.push(Case {
        name: "linear (+bias), bf16 GEMM inputs".into(),
        inputs: vec![randn(&[4, 32, 64], 33), randn(&[96, 64], 34), randn(&[96], 35)],
        build: Box::new(|_, x, _| x[0].linear(x[1], Some(x[2]))),
        bound: 1e-5,
        prec: Precision::Bf16,
        set: Set::Process,
    });
    // The same two with the bias added (and its gradient summed) in passes of their own: what
    // runs where cuBLASLt cannot fuse, and the before-line of gpu-check's profile.
    v.push(Case {
        name: "linear (+bias), bias unfused".into(),
        inputs: vec![randn(&[4, 32, 64], 30), randn(&[96, 64], 31), randn(&[96], 32)],
        build: Box::new(|_, x, _| x[0].linear(x[1], Some(x[2]))),
        bound: 1e-5,
        prec: Precision::F32,
        set: Set::Unfused,
    });
    v.push(Case {
        name: "linear (+bias), bf16 GEMM inputs, bias unfused".into(),
        inputs: vec![randn(&[4, 32, 64], 33), randn(&[96, 64], 34), randn(&[96], 35)],
        build: Box::new(|_, x, _| x[0].linear(x[1], Some(x[2]))),
        bound: 1e-5,
        prec: Precision::Bf16,
        set: Set::Unfused,
    });
    // GELU writing the bf16 operand of the linear after it (`gelu_linear`): the GPU's GELU and
    // the CPU's differ in the last f32 bits, which can move a value across a bf16 rounding
    // boundary (one bf16 step, 2⁻⁸ relative, of that input); the bound leaves room for that.
    v.push(Case {
        name: "gelu (tanh) → linear (+bias), bf16 operand written by GELU".into(),
        inputs: vec![randn(&[4, 32, 96], 58), randn(&[40, 96], 59), randn(&[40], 60)],
        build: Box::new(|_, x, _| x[0].gelu_linear(true, x[1], Some(x[2]))),
        bound: 1e-3,
        prec: Precision::Bf16,
        set: Set::Process,
    });
    // The same for a layer norm writing the operand (`layer_norm_linear`).
    v.push(Case {
        name: "layer_norm (affine) → linear (+bias), bf16 operand written by the layer norm".into(),
        inputs: vec![randn(&[4, 32, 96], 61), randn(&[96], 62), randn(&[96], 63), randn(&[40, 96], 64), randn(&[40], 65)],
        build: Box::new(|_, x, _| x[0].layer_norm_linear(Some(x[1]), Some(x[2]), 1e-5, x[3], Some(x[4]), false)),
        bound: 1e-3,
        prec: Precision::Bf16,
        set: Set::Process,
    });
    // A linear adding its output to a residual stream in its GEMM (`linear_add`: cuBLASLt reads
    // the residual as C), with and without bias, f32 and bf16 inputs, after GELU; then without
    // cuBLASLt (the residual copied into the output, the product added with beta 1).
    for (name, prec, bias, unfused) in [
        ("linear (+bias) + residual in the GEMM", Precision::F32, true, false),
        ("linear (+bias) + residual in the GEMM, bf16 GEMM inputs", Precision::Bf16, true, false),
        ("linear (no bias) + residual in the GEMM, bf16 GEMM inputs", Precision::Bf16, false, false),
        ("linear (+bias) + residual, unfused", Precision::F32, true, true),
    ] {
        let mut inputs = vec![randn(&[4, 32, 64], 66), randn(&[96, 64], 67), randn(&[96], 68), randn(&[4, 32, 96], 69)];
        if !bias {
            inputs.remove(2);
        }
        v.push(Case {
            name: name.into(),
            inputs,
            build: Box::new(move |_, x, _| if bias { x[0].linear_add(x[1], Some(x[2]), x[3]) } else { x[0].linear_add(x[1], None, x[2]) }),
            bound: 1e-5,
            prec,
            set: if unfused { Set::Unfused } else { Set::Process },
        });
    }
    v.push(Case {
        name: "gelu (tanh) → linear (+bias) + residual in the GEMM, bf16 operand written by GELU".into(),
        inputs: vec![randn(&[4, 32, 96], 70), randn(&[40, 96], 71), randn(&[40], 72), randn(&[4, 32, 40], 73)],
        build: Box::new(|_, x, _| x[0].gelu_linear_add(true, x[1], Some(x[2]), x[3])),
        bound: 1e-3,
        prec: Precision::Bf16,
        set: Set::Process,
    });
    v.push(f32c(
        "embedding",
        vec![randn(&[50, 24], 36)],
        Box::new(|_, x, _| {
            let ids: Vec<u32> = (0..64u32).map(|i| (i * 7) % 50).collect();
            x[0].embedding(&ids, &[4, 16])
        }),
    ));
    // Rows of a multiple of 4 (of 8 for a bf16 output) run with 16-byte loads (forward: a warp per
    // row); others one element at a time (forward: a block per row). Rows wider than a block
    // keeps in registers in backward (1024 columns, 256 on the emulator's 64-thread blocks) add
    // their parameter-gradient sums in memory.
    v.push(f32c(
        "layer_norm (affine)",
        vec![randn(&[64, 520], 37), randn(&[520], 38), randn(&[520], 39)],
        Box::new(|_, x, _| x[0].layer_norm(Some(x[1]), Some(x[2]), 1e-5)),
    ));
    v.push(f32c("layer_norm (no affine)", vec![randn(&[64, 96], 40)], Box::new(|_, x, _| x[0].layer_norm(None, None, 1e-5))));
    v.push(f32c(
        "layer_norm (affine), rows of 301 (one element a load)",
        vec![randn(&[16, 301], 86), randn(&[301], 87), randn(&[301], 88)],
        Box::new(|_, x, _| x[0].layer_norm(Some(x[1]), Some(x[2]), 1e-5)),
    ));
    v.push(f32c(
        "qk_layer_norm (4 heads, affine)",
        vec![randn(&[2, 33, 3 * 32], 42), randn(&[2, 8], 43), randn(&[2, 8], 44)],
        Box::new(|_, x, _| x[0].qk_layer_norm(4, Some(x[1]), Some(x[2]), 1e-5)),
    ));
    v.push(f32c("causal_attention", vec![randn(&[2, 33, 3 * 32], 41)], Box::new(|_, x, _| Ok(x[0].causal_attention(4)?.y))));
    // μP's score scale 1/d_head (d_head = 8) instead of 1/√d_head.
    v.push(f32c(
        "causal_attention, scale 1/d_head",
        vec![randn(&[2, 33, 3 * 32], 41)],
        Box::new(|_, x, _| Ok(x[0].causal_attention_scaled(4, None, Some(1.0 / 8.0))?.y)),
    ));
    // Dropout masks are drawn on the device from (key, index): the GPU must keep exactly the
    // elements the CPU keeps, or these rows fail by O(1).
    let drop = crate::ops::dropout::Dropout::new(0.3, 0xd1ce).expect("valid p");
    v.push(f32c("dropout (p 0.3)", vec![randn(&[3, 1000], 54)], Box::new(move |_, x, _| x[0].dropout(drop))));
    v.push(f32c(
        "dropout (p 0.3) + residual add, one pass",
        vec![randn(&[3, 1000], 74), randn(&[3, 1000], 75)],
        Box::new(move |_, x, _| x[0].dropout_add(drop, x[1])),
    ));
    v.push(f32c(
        "causal_attention + dropout 0.3",
        vec![randn(&[2, 33, 3 * 32], 55)],
        Box::new(move |_, x, _| Ok(x[0].causal_attention_dropout(4, drop)?.y)),
    ));
    v.push(Case {
        name: "causal_attention, bf16 GEMM inputs".into(),
        inputs: vec![randn(&[2, 33, 3 * 32], 42)],
        build: Box::new(|_, x, _| Ok(x[0].causal_attention(4)?.y)),
        // The GPU also rounds the probabilities before P·V; the CPU does not.
        bound: 2e-2,
        prec: Precision::Bf16,
        set: Set::Process,
    });
    // Flash attention (bf16, no dropout, head size 32 or 64; `kernels/cuda/flash.cu`): T = 130
    // spans three 64-row tiles, the last one partial. The GPU rounds P, dO and dS to bf16 for
    // its products; the CPU rounds only q, k and v.
    for (name, heads, seed) in [("causal_attention, flash (bf16, d_head 64)", 2, 47), ("causal_attention, flash (bf16, d_head 32)", 4, 48)]
    {
        v.push(Case {
            name: name.into(),
            inputs: vec![randn(&[2, 130, 3 * 128], seed)],
            build: Box::new(move |_, x, _| Ok(x[0].causal_attention(heads)?.y)),
            bound: 2e-2,
            prec: Precision::Bf16,
            set: Set::Process,
        });
    }
    // Flash attention with attention dropout: the kernels must drop exactly the elements the CPU
    // drops (a wrong mask index fails by O(1)).
    v.push(Case {
        name: "causal_attention + dropout 0.3, flash (bf16, d_head 64)".into(),
        inputs: vec![randn(&[2, 130, 3 * 128], 49)],
        build: Box::new(move |_, x, _| Ok(x[0].causal_attention_dropout(2, drop)?.y)),
        bound: 2e-2,
        prec: Precision::Bf16,
        set: Set::Process,
    });
    // bf16 activations (autocast's rule, `linear_half`): a linear writes its output in bf16
    // (the bias added in bf16: by the cuBLASLt epilogue, or by a pass of its own) and the CPU
    // rounds the same sum; a value on a bf16 rounding boundary may round either way (one bf16
    // step, 2⁻⁸ relative). Its consumers read the bf16 activation and give its gradient in bf16
    // (`to_f32` widens the result for the comparison).
    for (name, unfused) in [("linear (+bias), bf16 output", false), ("linear (+bias), bf16 output, bias unfused", true)] {
        v.push(Case {
            name: name.into(),
            inputs: vec![randn(&[4, 32, 64], 66), randn_scaled(&[96, 64], 67, 0.125), randn(&[96], 68)],
            build: Box::new(|_, x, _| x[0].linear_half(x[1], Some(x[2]))?.to_f32()),
            bound: 1e-2,
            prec: Precision::Bf16,
            set: if unfused { Set::Unfused } else { Set::Process },
        });
    }
    // Flash attention on a bf16 qkv: qkv, y, dO and dqkv in bf16 (the `_bf16` kernels); the
    // CPU rounds the same values. As for the f32 rows, the GPU also rounds P and dS.
    for (name, heads, seed) in
        [("causal_attention, flash, bf16 qkv and y (d_head 64)", 2, 69), ("causal_attention, flash, bf16 qkv and y (d_head 32)", 4, 70)]
    {
        v.push(Case {
            name: name.into(),
            inputs: vec![randn(&[2, 130, 3 * 128], seed)],
            build: Box::new(move |_, x, _| x[0].to_half()?.causal_attention(heads)?.y.to_f32()),
            bound: 2e-2,
            prec: Precision::Bf16,
            set: Set::Process,
        });
    }
    // The flash forward on 64-row query tiles (`DPTRAIN_FLASH_ROWS=64`; the default runs 128-row
    // tiles, the rows above): bf16 qkv, and f32 qkv with dropout at the other head size.
    v.push(Case {
        name: "causal_attention, flash, bf16 qkv and y, 64-row forward tiles (d_head 64)".into(),
        inputs: vec![randn(&[2, 130, 3 * 128], 77)],
        build: Box::new(|_, x, _| x[0].to_half()?.causal_attention(2)?.y.to_f32()),
        bound: 2e-2,
        prec: Precision::Bf16,
        set: Set::FlashRows64,
    });
    v.push(Case {
        name: "causal_attention + dropout 0.3, flash, 64-row forward tiles (bf16, d_head 32)".into(),
        inputs: vec![randn(&[2, 130, 3 * 128], 78)],
        build: Box::new(move |_, x, _| Ok(x[0].causal_attention_dropout(4, drop)?.y)),
        bound: 2e-2,
        prec: Precision::Bf16,
        set: Set::FlashRows64,
    });
    // A bf16 qkv that starts 2 bytes into its buffer (a contiguous view one element in): its rows
    // cannot be copied 16 bytes at a time, so the flash kernels stage every tile synchronously.
    v.push(Case {
        name: "causal_attention, flash, bf16 qkv not 16-byte aligned (d_head 64)".into(),
        inputs: vec![randn(&[2 * 130 * 3 * 128 + 1], 76)],
        build: Box::new(|_, x, _| {
            x[0].to_half()?.narrow(0, 1, 2 * 130 * 3 * 128)?.reshape(&[2, 130, 3 * 128])?.causal_attention(2)?.y.to_f32()
        }),
        bound: 2e-2,
        prec: Precision::Bf16,
        set: Set::Process,
    });
    // A bf16 qkv through the unfused attention (d_head 8: no flash kernel), which reads it in
    // f32 and gives y back in bf16.
    v.push(Case {
        name: "causal_attention (unfused), bf16 qkv and y".into(),
        inputs: vec![randn(&[2, 33, 3 * 32], 71)],
        build: Box::new(|_, x, _| x[0].to_half()?.causal_attention(4)?.y.to_f32()),
        bound: 2e-2,
        prec: Precision::Bf16,
        set: Set::Process,
    });
    // GELU of a bf16 pre-activation, as an op (bf16 out, as on probe steps) and fused into the
    // next GEMM's operand (`gelu_linear`); backward is bf16 throughout on the GPU.
    v.push(Case {
        name: "linear → gelu (tanh), bf16 pre-activation and output".into(),
        inputs: vec![randn(&[64, 96], 73), randn_scaled(&[160, 96], 74, 0.125), randn(&[160], 75)],
        build: Box::new(|_, x, _| x[0].linear_half(x[1], Some(x[2]))?.gelu(true)?.to_f32()),
        bound: 1e-2,
        prec: Precision::Bf16,
        set: Set::Process,
    });
    v.push(Case {
        name: "layer_norm → linear → gelu (erf) → linear, bf16 pre-activation".into(),
        inputs: vec![
            randn(&[4, 32, 96], 76),
            randn(&[96], 77),
            randn(&[96], 78),
            randn_scaled(&[160, 96], 79, 0.125),
            randn(&[160], 80),
            randn_scaled(&[40, 160], 81, 0.125),
            randn(&[40], 82),
        ],
        build: Box::new(|_, x, _| {
            x[0].layer_norm_linear(Some(x[1]), Some(x[2]), 1e-5, x[3], Some(x[4]), true)?.gelu_linear(false, x[5], Some(x[6]))
        }),
        bound: 1e-2,
        prec: Precision::Bf16,
        set: Set::Process,
    });
    // A GPT MLP with the tanh GELU in the GEMMs' cuBLASLt epilogues (`layer_norm_mlp`): GELU of
    // the f32 sum, its derivative applied to the f32 product, as the CPU computes them too. With
    // biases and the residual in the GEMM (GPT-2's), without either, and with the epilogues off
    // (GELU's kernels on f32 products then stand in). cuBLASLt's own tanh may differ from the
    // CPU's in the last bits, which can move a value across a bf16 rounding boundary: the
    // bound is the erf MLP's.
    for (name, bias, set) in [
        ("layer_norm → linear (+bias) → gelu (tanh) → linear (+bias) + residual, GELU in the GEMMs' epilogues", true, Set::Process),
        ("layer_norm → linear → gelu (tanh) → linear, no biases, GELU in the GEMMs' epilogues", false, Set::Process),
        ("layer_norm → linear (+bias) → gelu (tanh) → linear (+bias) + residual, epilogues off", true, Set::Unfused),
    ] {
        let mut inputs = vec![
            randn(&[4, 32, 96], 83),
            randn(&[96], 84),
            randn(&[96], 85),
            randn_scaled(&[160, 96], 86, 0.125),
            randn(&[160], 87),
            randn_scaled(&[96, 160], 88, 0.125),
            randn(&[96], 89),
        ];
        if !bias {
            inputs.remove(6);
            inputs.remove(4);
        }
        v.push(Case {
            name: name.into(),
            inputs,
            build: Box::new(move |_, x, _| {
                let ln = (Some(x[1]), Some(x[2]), 1e-5);
                if bias {
                    x[0].layer_norm_mlp(ln, (x[3], Some(x[4])), true, (x[5], Some(x[6])), Some(x[0]), None)
                } else {
                    x[0].layer_norm_mlp(ln, (x[3], None), true, (x[4], None), None, None)
                }
            }),
            bound: 1e-2,
            prec: Precision::Bf16,
            set,
        });
    }
    v.push(f32c(
        "cross_entropy + z-loss",
        vec![randn(&[64, 300], 43)],
        Box::new(|_, x, _| {
            let t: Vec<u32> = (0..64u32).map(|i| (i * 37) % 300).collect();
            Ok(x[0].cross_entropy(&t, 1e-3)?.loss)
        }),
    ));
    // The fused classifier under bf16 (`linear_cross_entropy`): the GPU's GEMM writes bf16
    // logits and its backward writes their bf16 gradient over them; the CPU rounds the logits
    // the same way, so only summation order and its effect on rounding differ.
    v.push(Case {
        name: "linear_cross_entropy + z-loss, bf16 logits (fused classifier)".into(),
        inputs: vec![randn(&[64, 48], 56), randn(&[300, 48], 57)],
        build: Box::new(|_, x, _| {
            let t: Vec<u32> = (0..64u32).map(|i| (i * 53) % 300).collect();
            Ok(x[0].linear_cross_entropy(x[1], &t, 1e-3)?.loss)
        }),
        bound: 1e-4,
        prec: Precision::Bf16,
        set: Set::Process,
    });
    // Rows whose length and start allow it are read and written 16 bytes a load (eight bf16 or
    // four f32; the rows above: 300 f32, and bf16 rows of 300, which do not); these take the
    // other path each: f32 rows of 301, and bf16 rows of 2056 (more than one load per thread).
    v.push(f32c(
        "cross_entropy + z-loss, rows of 301 (one element a load)",
        vec![randn(&[32, 301], 83)],
        Box::new(|_, x, _| {
            let t: Vec<u32> = (0..32u32).map(|i| (i * 41) % 301).collect();
            Ok(x[0].cross_entropy(&t, 1e-3)?.loss)
        }),
    ));
    v.push(Case {
        name: "linear_cross_entropy + z-loss, bf16 logits, rows of 2056 (16-byte loads)".into(),
        inputs: vec![randn(&[32, 48], 84), randn(&[2056, 48], 85)],
        build: Box::new(|_, x, _| {
            let t: Vec<u32> = (0..32u32).map(|i| (i * 331) % 2056).collect();
            Ok(x[0].linear_cross_entropy(x[1], &t, 1e-3)?.loss)
        }),
        bound: 1e-4,
        prec: Precision::Bf16,
        set: Set::Process,
    });
    v.push(f32c(
        "batch_norm (train)",
        vec![randn(&[8, 6, 5, 5], 44), rand(&[6], 45, 0.5, 1.5), randn(&[6], 46)],
        Box::new(|_, x, dev| {
            // Running statistics live on the op's device, as in a model on that device.
            let mean = Mutex::new(Tensor::zeros(&[6], crate::DType::F32).to_device(dev)?);
            let var = Mutex::new(Tensor::ones(&[6], crate::DType::F32).to_device(dev)?);
            x[0].batch_norm(x[1], x[2], RunningStats { mean: &mean, var: &var, momentum: 0.1 }, true, 1e-5)
        }),
    ));
    v.push(f32c(
        "ghost batch_norm (train, 4 ghost batches)",
        vec![randn(&[8, 6, 5, 5], 44), rand(&[6], 45, 0.5, 1.5), randn(&[6], 46)],
        Box::new(|_, x, dev| {
            let mean = Mutex::new(Tensor::zeros(&[6], crate::DType::F32).to_device(dev)?);
            let var = Mutex::new(Tensor::ones(&[6], crate::DType::F32).to_device(dev)?);
            x[0].ghost_batch_norm(x[1], x[2], RunningStats { mean: &mean, var: &var, momentum: 0.1 }, true, 1e-5, 2)
        }),
    ));
    v.push(f32c(
        "conv2d (3x3, stride 2, pad 1, +bias)",
        vec![randn(&[2, 3, 9, 9], 47), randn(&[5, 3, 3, 3], 48), randn(&[5], 49)],
        Box::new(|_, x, _| x[0].conv2d(x[1], Some(x[2]), 2, 1)),
    ));
    v.push(f32c("narrow + reshape", vec![randn(&[6, 10, 4], 50)], Box::new(|_, x, _| x[0].narrow(1, 3, 5)?.reshape(&[6, 20]))));
    v.push(f32c("permute (packed copy)", vec![randn(&[3, 4, 5], 51)], Box::new(|_, x, _| x[0].permute(&[2, 0, 1])?.reshape(&[60]))));
    v.push(f32c("cat", vec![randn(&[4, 3, 5], 52), randn(&[4, 2, 5], 53)], Box::new(|_, x, _| crate::ops::shape::cat(&[x[0], x[1]], 1))));
    v
}

/// Opens CUDA device `ordinal` (compiling the kernels) and describes it.
pub fn device_info(ordinal: usize) -> std::result::Result<DeviceInfo, String> {
    let dev = crate::tensor::cuda::dev(ordinal).map_err(|e| e.to_string())?;
    let (maj, min) = match dev.ctx() {
        Ok(ctx) => ctx.compute_capability().map_err(|e| format!("{e:?}"))?,
        Err(_) => (0, 0),
    };
    Ok(DeviceInfo { name: dev.name.clone(), compute_capability: (maj, min), arch: dev.arch.clone(), kernels: dev.kernels.to_string() })
}

/// Runs every case on CUDA device `ordinal` and on the CPU, handing each row to `each` as soon
/// as it is known (so a crash later still leaves the rows before it on the screen). A case that
/// panics becomes a failed row.
pub fn run_each(ordinal: usize, each: &mut dyn FnMut(&CheckRow)) -> Vec<CheckRow> {
    let mut rows = vec![];
    for c in cases() {
        let both = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| (run_on(&c, Device::Cpu), run_on(&c, Device::Cuda(ordinal)))));
        let Ok(both) = both else {
            let row = CheckRow { op: format!("{} (panicked; message above)", c.name), max_rel_err: f64::INFINITY, bound: c.bound };
            each(&row);
            rows.push(row);
            continue;
        };
        let row = match both {
            (Ok((yc, gc)), Ok((yg, gg))) => {
                let mut e = rel_err(&yg, &yc);
                for (a, b) in gg.iter().zip(&gc) {
                    e = e.max(rel_err(a, b));
                }
                CheckRow { op: c.name.clone(), max_rel_err: e, bound: c.bound }
            }
            (Err(e), _) => CheckRow { op: format!("{} (CPU failed: {e})", c.name), max_rel_err: f64::INFINITY, bound: c.bound },
            (_, Err(e)) => CheckRow { op: format!("{} (GPU failed: {e})", c.name), max_rel_err: f64::INFINITY, bound: c.bound },
        };
        each(&row);
        rows.push(row);
    }
    for row in linalg_rows(ordinal) {
        each(&row);
        rows.push(row);
    }
    rows
}

/// Largest relative difference of two column sets after giving each GPU column the sign of
/// its CPU counterpart (eigenvectors and a QR's Q are unique only up to each column's sign,
/// which faer and cuSOLVER may choose differently). `n` columns of row-major [n, n].
fn sign_aligned_err(gpu: &[f32], cpu: &[f32], n: usize) -> f64 {
    let mut g = gpu.to_vec();
    for j in 0..n {
        let dot: f64 = (0..n).map(|i| gpu[i * n + j] as f64 * cpu[i * n + j] as f64).sum();
        if dot < 0.0 {
            (0..n).for_each(|i| g[i * n + j] = -g[i * n + j]);
        }
    }
    rel_err(&g, cpu)
}

/// The dense linear algebra SOAP's basis refreshes run (`ops::linalg`: cuSOLVER on a GPU, faer
/// on the host) on the same matrices, at a size past cuSOLVER's and faer's block sizes: the
/// eigenvectors of a symmetric positive definite matrix (distinct eigenvalues: a Gram of random
/// rows), the Q of a QR with columns re-ordered, and the estimated eigenvalues SOAP sorts by
/// (the same bits on both: each product rounded, summed in order).
fn linalg_rows(ordinal: usize) -> Vec<CheckRow> {
    use crate::ops::linalg;
    let n = 200;
    let dev = Device::Cuda(ordinal);
    let x = randn(&[n, n + 40], 80).to_vec::<f32>().expect("f32");
    // A = X·Xᵀ / cols, computed in f64 and rounded: symmetric to the bit.
    let a: Vec<f32> = (0..n * n)
        .map(|k| {
            let (i, j) = (k / n, k % n);
            ((0..n + 40).map(|l| x[i * (n + 40) + l] as f64 * x[j * (n + 40) + l] as f64).sum::<f64>() / (n + 40) as f64) as f32
        })
        .collect();
    let a = Tensor::from_vec(a, &[n, n]).expect("shape");
    let b = randn(&[n, n], 81);
    let cols: Vec<usize> = (0..n).map(|j| (j * 7 + 3) % n).collect();
    let both = |f: &dyn Fn(Device) -> Result<Vec<f32>>| -> std::result::Result<(Vec<f32>, Vec<f32>), String> {
        let cpu = f(Device::Cpu).map_err(|e| format!("CPU failed: {e}"))?;
        let gpu = f(dev).map_err(|e| format!("GPU failed: {e}"))?;
        Ok((gpu, cpu))
    };
    let on = |t: &Tensor, d: Device| t.to_device(d);
    let cases: Vec<(String, f64, std::result::Result<(Vec<f32>, Vec<f32>), String>, bool)> = vec![
        (
            format!("eigh (linalg, f64): eigenvectors of a {n} × {n} SPD matrix, signs aligned"),
            1e-5,
            both(&|d| linalg::eigh_desc(&on(&a, d)?, 1e-30)?.to_vec::<f32>()),
            true,
        ),
        (
            format!("QR (linalg, f64): Q of a {n} × {n} matrix, columns re-ordered, signs aligned"),
            1e-5,
            both(&|d| linalg::qr_q_of_columns(&on(&b, d)?, &cols)?.to_vec::<f32>()),
            true,
        ),
        (
            format!("column dots (linalg): diag(Aᵀ·B), {n} × {n}, bit for bit"),
            0.0,
            both(&|d| linalg::column_dots(&on(&a, d)?, &on(&b, d)?)),
            false,
        ),
    ];
    cases
        .into_iter()
        .map(|(op, bound, r, signs)| match r {
            Ok((g, c)) => CheckRow { max_rel_err: if signs { sign_aligned_err(&g, &c, n) } else { rel_err(&g, &c) }, op, bound },
            Err(e) => CheckRow { op: format!("{op} ({e})"), max_rel_err: f64::INFINITY, bound },
        })
        .collect()
}

/// [`device_info`] and [`run_each`] together.
pub fn run(ordinal: usize) -> std::result::Result<(DeviceInfo, Vec<CheckRow>), String> {
    let info = device_info(ordinal)?;
    Ok((info, run_each(ordinal, &mut |_| {})))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The GPU check cannot run here, but its cases can: each builds, runs forward and backward
    /// on the CPU, and yields a gradient for every input (so the GPU comparison covers them).
    #[test]
    fn every_case_runs_on_the_cpu_with_gradients_for_all_inputs() {
        let cs = cases();
        assert!(cs.len() >= 30);
        for c in &cs {
            let (y, gs) = run_on(c, Device::Cpu).unwrap_or_else(|e| panic!("{}: {e}", c.name));
            assert!(!y.is_empty() && y.iter().all(|v| v.is_finite()), "{}", c.name);
            assert_eq!(gs.len(), c.inputs.len(), "{}", c.name);
            for (g, x) in gs.iter().zip(&c.inputs) {
                assert_eq!(g.len(), x.numel(), "{}: missing input gradient", c.name);
                assert!(g.iter().any(|&v| v != 0.0), "{}: all-zero gradient", c.name);
            }
            // Deterministic: a second run gives identical numbers.
            assert_eq!(run_on(c, Device::Cpu).unwrap().0, y, "{}", c.name);
        }
        assert_eq!(rel_err(&[1.0, f32::NAN], &[1.0, 1.0]), f64::INFINITY);
        assert!(rel_err(&[1.0, 2.0], &[1.0, 2.0 + 1e-7]) < 1e-6);
    }
}
