//! Broadcasting binary ops (add, sub, mul, div), scalar affine, and pointwise functions
//! (exp, log, tanh, relu, square). Broadcast backward reduces the gradient back to each
//! operand's shape with the threaded reductions in `kernels::cpu::reduce` (GEMM column sums on
//! CUDA).

use crate::autograd::Var;
use crate::error::Result;
use crate::kernels::cpu::{self, reduce::sum_to_shape};
use crate::tensor::Tensor;
use crate::{on_cuda, with_float};

fn unbroadcast(g: &Tensor, shape: &[usize]) -> Result<Tensor> {
    on_cuda!(g => gpu::sum_to_shape(g, shape));
    with_float!(g.dtype(), "sum_to_shape", T => sum_to_shape::<T>(g, shape))
}

/// Elementwise math on tensors (no tape), shared by several ops' backward passes; each runs on
/// the tensors' device.
pub mod t {
    use super::*;
    pub fn add(a: &Tensor, b: &Tensor) -> Result<Tensor> {
        on_cuda!(a => gpu::binary("add_f32", a, b));
        with_float!(a.dtype(), "add", T => cpu::broadcast_zip::<T>(a, b, |x, y| x + y))
    }
    pub fn sub(a: &Tensor, b: &Tensor) -> Result<Tensor> {
        on_cuda!(a => gpu::binary("sub_f32", a, b));
        with_float!(a.dtype(), "sub", T => cpu::broadcast_zip::<T>(a, b, |x, y| x - y))
    }
    pub fn mul(a: &Tensor, b: &Tensor) -> Result<Tensor> {
        on_cuda!(a => gpu::binary("mul_f32", a, b));
        with_float!(a.dtype(), "mul", T => cpu::broadcast_zip::<T>(a, b, |x, y| x * y))
    }
    pub fn div(a: &Tensor, b: &Tensor) -> Result<Tensor> {
        on_cuda!(a => gpu::binary("div_f32", a, b));
        with_float!(a.dtype(), "div", T => cpu::broadcast_zip::<T>(a, b, |x, y| x / y))
    }
    pub fn affine(a: &Tensor, mul: f64, add: f64) -> Result<Tensor> {
        on_cuda!(a => gpu::affine(a, mul, add));
        with_float!(a.dtype(), "affine", T => { let (m, c) = (T::of(mul), T::of(add)); cpu::map::<T>(a, move |x| x * m + c) })
    }
    /// A tensor of `x`'s shape, dtype and device filled with `v`.
    pub fn full_like(x: &Tensor, v: f64) -> Result<Tensor> {
        on_cuda!(x => gpu::full(&gpu::dev_of(x)?, x.shape(), v as f32));
        Ok(Tensor::full(x.shape(), v, x.dtype()))
    }
    /// `b` broadcast to `shape`.
    pub fn broadcast_to(b: &Tensor, shape: &[usize]) -> Result<Tensor> {
        on_cuda!(b => gpu::broadcast_to(b, shape));
        let z = Tensor::zeros(shape, b.dtype());
        with_float!(b.dtype(), "broadcast_to", T => cpu::broadcast_zip::<T>(&z, b, |_, y| y))
    }
    /// A pointwise map: `kernel` on CUDA, `f` on the CPU (generic, so the closure inlines).
    pub fn map(x: &Tensor, kernel: &'static str, f: impl Fn(f64) -> f64 + Sync, f32f: impl Fn(f32) -> f32 + Sync) -> Result<Tensor> {
        on_cuda!(x => gpu::unary(kernel, x));
        match x.dtype() {
            crate::tensor::DType::F32 => cpu::map::<f32>(x, f32f),
            crate::tensor::DType::F64 => cpu::map::<f64>(x, f),
            other => Err(crate::error::Error::DType { op: kernel, expected: "f32 or f64".into(), got: other.to_string() }),
        }
    }
    /// A pointwise backward `out = f(g, s)` with a saved tensor `s`: `kernel` on CUDA.
    pub fn map_bwd(
        g: &Tensor,
        s: &Tensor,
        kernel: &'static str,
        f: impl Fn(f64, f64) -> f64 + Sync,
        f32f: impl Fn(f32, f32) -> f32 + Sync,
    ) -> Result<Tensor> {
        on_cuda!(g => gpu::map_bwd(kernel, g, s));
        match g.dtype() {
            crate::tensor::DType::F32 => cpu::zip::<f32>(g, s, f32f),
            crate::tensor::DType::F64 => cpu::zip::<f64>(g, s, f),
            other => Err(crate::error::Error::DType { op: kernel, expected: "f32 or f64".into(), got: other.to_string() }),
        }
    }
}

impl<'t> Var<'t> {
    pub fn add(self, b: Var<'t>) -> Result<Var<'t>> {
        let (sa, sb) = (self.shape(), b.shape());
        let out = t::add(&self.value(), &b.value())?;
        Ok(self.tape().record("add", out, &[self, b], move |g| Ok(vec![Some(unbroadcast(g, &sa)?), Some(unbroadcast(g, &sb)?)])))
    }
    pub fn sub(self, b: Var<'t>) -> Result<Var<'t>> {
        let (sa, sb) = (self.shape(), b.shape());
        let out = t::sub(&self.value(), &b.value())?;
        Ok(self.tape().record("sub", out, &[self, b], move |g| {
            Ok(vec![Some(unbroadcast(g, &sa)?), Some(t::affine(&unbroadcast(g, &sb)?, -1.0, 0.0)?)])
        }))
    }
    pub fn mul(self, b: Var<'t>) -> Result<Var<'t>> {
        let (av, bv) = (self.value(), b.value());
        let out = t::mul(&av, &bv)?;
        Ok(self.tape().record("mul", out, &[self, b], move |g| {
            Ok(vec![Some(unbroadcast(&t::mul(g, &bv)?, av.shape())?), Some(unbroadcast(&t::mul(g, &av)?, bv.shape())?)])
        }))
    }
    pub fn div(self, b: Var<'t>) -> Result<Var<'t>> {
        let (av, bv) = (self.value(), b.value());
        let out = t::div(&av, &bv)?;
        let y = out.clone();
        Ok(self.tape().record("div", out, &[self, b], move |g| {
            let ga = t::div(g, &bv)?;
            // d(a/b)/db = -(a/b)/b
            let gb = t::affine(&t::mul(&ga, &y)?, -1.0, 0.0)?;
            Ok(vec![Some(unbroadcast(&ga, av.shape())?), Some(unbroadcast(&gb, bv.shape())?)])
        }))
    }
    /// The value widened to f32: a bf16 activation (a `linear_half` output, flash attention's
    /// output from one) read by an op that wants f32. On the CPU, and for f32 values, the value
    /// itself. Its gradient reaches the input in the input's dtype (the tape's rule).
    pub fn to_f32(self) -> Result<Var<'t>> {
        let x = self.value();
        if x.dtype() != crate::tensor::DType::BF16 {
            return Ok(self);
        }
        #[cfg(feature = "cuda")]
        if x.is_cuda() {
            let out = crate::kernels::cuda::ops::cast(&x, crate::tensor::DType::F32)?;
            return Ok(self.tape().record("to_f32", out, &[self], |g| Ok(vec![Some(g.clone())])));
        }
        Err(crate::error::Error::Msg("bf16 autograd is not supported on CPU".into()))
    }

    /// The value as a bf16 activation (autocast's cast): a bf16 tensor on a GPU, rounded to
    /// bf16 (and marked, see [`Var::mark_half`]) on the CPU. Its gradient is rounded to bf16
    /// and reaches the input in the input's dtype.
    pub fn to_half(self) -> Result<Var<'t>> {
        if self.is_half() {
            return Ok(self);
        }
        let x = self.value();
        #[cfg(feature = "cuda")]
        if x.is_cuda() {
            let out = crate::kernels::cuda::ops::cast(&x, crate::tensor::DType::BF16)?;
            return Ok(self.tape().record("to_half", out, &[self], |g| Ok(vec![Some(g.clone())])));
        }
        let out = crate::ops::matmul::round_for(&x, crate::tensor::Precision::Bf16)?;
        Ok(self.tape().record("to_half", out, &[self], |g| Ok(vec![Some(g.clone())])).mark_half())
    }

    /// `x * mul + add` with scalars.
    pub fn affine(self, mul: f64, add: f64) -> Result<Var<'t>> {
        let out = t::affine(&self.value(), mul, add)?;
        Ok(self.tape().record("affine", out, &[self], move |g| Ok(vec![Some(t::affine(g, mul, 0.0)?)])))
    }
    pub fn scale(self, s: f64) -> Result<Var<'t>> {
        self.affine(s, 0.0)
    }
    pub fn exp(self) -> Result<Var<'t>> {
        let out = t::map(&self.value(), "exp_f32", f64::exp, f32::exp)?;
        let y = out.clone();
        Ok(self.tape().record("exp", out, &[self], move |g| Ok(vec![Some(t::mul(g, &y)?)])))
    }
    pub fn log(self) -> Result<Var<'t>> {
        let x = self.value();
        let out = t::map(&x, "log_f32", f64::ln, f32::ln)?;
        Ok(self.tape().record("log", out, &[self], move |g| Ok(vec![Some(t::div(g, &x)?)])))
    }
    pub fn tanh(self) -> Result<Var<'t>> {
        let out = t::map(&self.value(), "tanh_f32", f64::tanh, f32::tanh)?;
        let y = out.clone();
        Ok(self.tape().record("tanh", out, &[self], move |g| {
            Ok(vec![Some(t::map_bwd(g, &y, "tanh_bwd_f32", |g, y| g * (1.0 - y * y), |g, y| g * (1.0 - y * y))?)])
        }))
    }
    pub fn relu(self) -> Result<Var<'t>> {
        let out = t::map(&self.value(), "relu_f32", |x| x.max(0.0), |x| x.max(0.0))?;
        let y = out.clone();
        Ok(self.tape().record("relu", out, &[self], move |g| {
            Ok(vec![Some(t::map_bwd(g, &y, "relu_bwd_f32", |g, y| if y > 0.0 { g } else { 0.0 }, |g, y| if y > 0.0 { g } else { 0.0 })?)])
        }))
    }
    pub fn square(self) -> Result<Var<'t>> {
        let x = self.value();
        let out = t::map(&x, "square_f32", |x| x * x, |x| x * x)?;
        Ok(self.tape().record("square", out, &[self], move |g| {
            Ok(vec![Some(t::map_bwd(g, &x, "square_bwd_f32", |g, x| 2.0 * g * x, |g, x| 2.0 * g * x)?)])
        }))
    }
}
