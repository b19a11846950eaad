//! Broadcasting binary ops (add, sub, mul, div), scalar affine, and pointwise functions
//! (exp, log, tanh, relu, square). Broadcast backward reduces the gradient back to each
//! operand's shape with the threaded reductions in `kernels::cpu::reduce`.

use crate::autograd::Var;
use crate::error::Result;
use crate::kernels::cpu::{self, reduce::sum_to_shape};
use crate::tensor::Tensor;
use crate::with_float;

fn unbroadcast(g: &Tensor, shape: &[usize]) -> Result<Tensor> {
    with_float!(g.dtype(), "sum_to_shape", T => sum_to_shape::<T>(g, shape))
}

/// Elementwise math on tensors (no tape), shared by several ops' backward passes.
pub mod t {
    use super::*;
    pub fn add(a: &Tensor, b: &Tensor) -> Result<Tensor> {
        with_float!(a.dtype(), "add", T => cpu::broadcast_zip::<T>(a, b, |x, y| x + y))
    }
    pub fn sub(a: &Tensor, b: &Tensor) -> Result<Tensor> {
        with_float!(a.dtype(), "sub", T => cpu::broadcast_zip::<T>(a, b, |x, y| x - y))
    }
    pub fn mul(a: &Tensor, b: &Tensor) -> Result<Tensor> {
        with_float!(a.dtype(), "mul", T => cpu::broadcast_zip::<T>(a, b, |x, y| x * y))
    }
    pub fn div(a: &Tensor, b: &Tensor) -> Result<Tensor> {
        with_float!(a.dtype(), "div", T => cpu::broadcast_zip::<T>(a, b, |x, y| x / y))
    }
    pub fn affine(a: &Tensor, mul: f64, add: f64) -> Result<Tensor> {
        with_float!(a.dtype(), "affine", T => { let (m, c) = (T::of(mul), T::of(add)); cpu::map::<T>(a, move |x| x * m + c) })
    }
    /// `b` broadcast to `shape`.
    pub fn broadcast_to(b: &Tensor, shape: &[usize]) -> Result<Tensor> {
        let z = Tensor::zeros(shape, b.dtype());
        with_float!(b.dtype(), "broadcast_to", T => cpu::broadcast_zip::<T>(&z, b, |_, y| y))
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
    /// `x * mul + add` with scalars.
    pub fn affine(self, mul: f64, add: f64) -> Result<Var<'t>> {
        let out = t::affine(&self.value(), mul, add)?;
        Ok(self.tape().record("affine", out, &[self], move |g| Ok(vec![Some(t::affine(g, mul, 0.0)?)])))
    }
    pub fn scale(self, s: f64) -> Result<Var<'t>> {
        self.affine(s, 0.0)
    }
    pub fn exp(self) -> Result<Var<'t>> {
        let out = with_float!(self.dtype(), "exp", T => cpu::map::<T>(&self.value(), |x| x.exp()))?;
        let y = out.clone();
        Ok(self.tape().record("exp", out, &[self], move |g| Ok(vec![Some(t::mul(g, &y)?)])))
    }
    pub fn log(self) -> Result<Var<'t>> {
        let x = self.value();
        let out = with_float!(x.dtype(), "log", T => cpu::map::<T>(&x, |x| x.ln()))?;
        Ok(self.tape().record("log", out, &[self], move |g| Ok(vec![Some(t::div(g, &x)?)])))
    }
    pub fn tanh(self) -> Result<Var<'t>> {
        let out = with_float!(self.dtype(), "tanh", T => cpu::map::<T>(&self.value(), |x| x.tanh()))?;
        let y = out.clone();
        Ok(self.tape().record("tanh", out, &[self], move |g| {
            Ok(vec![Some(with_float!(g.dtype(), "tanh", T => cpu::zip::<T>(g, &y, |g, y| g * (T::one() - y * y)))?)])
        }))
    }
    pub fn relu(self) -> Result<Var<'t>> {
        let out = with_float!(self.dtype(), "relu", T => cpu::map::<T>(&self.value(), |x| x.max(T::zero())))?;
        let y = out.clone();
        Ok(self.tape().record("relu", out, &[self], move |g| {
            Ok(vec![Some(with_float!(g.dtype(), "relu", T => cpu::zip::<T>(g, &y, |g, y| if y > T::zero() { g } else { T::zero() }))?)])
        }))
    }
    pub fn square(self) -> Result<Var<'t>> {
        let x = self.value();
        let out = with_float!(x.dtype(), "square", T => cpu::map::<T>(&x, |x| x * x))?;
        Ok(self.tape().record("square", out, &[self], move |g| {
            Ok(vec![Some(with_float!(g.dtype(), "square", T => cpu::zip::<T>(g, &x, |g, x| T::of(2.0) * g * x))?)])
        }))
    }
}
