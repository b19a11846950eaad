//! Layer normalisation over the last dim, saving per-row mean and 1/std for backward
//! (`torch.nn.functional.layer_norm` semantics: biased variance, eps inside the sqrt).

use super::row_chunk;
use crate::autograd::Var;
use crate::error::{Error, Result};
use crate::tensor::{Elem, Tensor};
use crate::with_float;
use rayon::prelude::*;

/// One row: y = (x − m)·rs (·w, +b when given), biased variance, ε inside the root; returns
/// (m, rs). Shared with qk-layernorm, which normalises rows the same way.
pub(super) fn row_forward<T: Elem>(xr: &[T], w: Option<&[T]>, b: Option<&[T]>, eps: f64, yr: &mut [T]) -> (T, T) {
    let c = xr.len();
    let m = crate::kernels::cpu::reduce::sum_slice(xr) / T::of(c as f64);
    let mut var = T::zero();
    for &v in xr {
        var += (v - m) * (v - m);
    }
    let rs = T::one() / (var / T::of(c as f64) + T::of(eps)).sqrt();
    for j in 0..c {
        let mut v = (xr[j] - m) * rs;
        if let Some(w) = w {
            v *= w[j];
        }
        if let Some(b) = b {
            v += b[j];
        }
        yr[j] = v;
    }
    (m, rs)
}

/// One row's input gradient from the upstream `gr` and the saved (m, rs).
pub(super) fn row_backward<T: Elem>(xr: &[T], gr: &[T], w: Option<&[T]>, m: T, rs: T, gxr: &mut [T]) {
    let c = xr.len();
    let (mut a, mut bsum) = (T::zero(), T::zero());
    for j in 0..c {
        let xh = (xr[j] - m) * rs;
        let gxh = w.map_or(gr[j], |w| gr[j] * w[j]);
        a += gxh;
        bsum += gxh * xh;
    }
    let (a, bsum) = (a / T::of(c as f64), bsum / T::of(c as f64));
    for j in 0..c {
        let xh = (xr[j] - m) * rs;
        let gxh = w.map_or(gr[j], |w| gr[j] * w[j]);
        gxr[j] = rs * (gxh - a - xh * bsum);
    }
}

fn forward<T: Elem>(x: &[T], c: usize, w: Option<&[T]>, b: Option<&[T]>, eps: f64, y: &mut [T], mean: &mut [T], rstd: &mut [T]) {
    let chunk = row_chunk(mean.len(), 16);
    y.par_chunks_mut(chunk * c).zip(x.par_chunks(chunk * c)).zip(mean.par_chunks_mut(chunk).zip(rstd.par_chunks_mut(chunk))).for_each(
        |((y, x), (mean, rstd))| {
            for (r, (yr, xr)) in y.chunks_mut(c).zip(x.chunks(c)).enumerate() {
                (mean[r], rstd[r]) = row_forward(xr, w, b, eps, yr);
            }
        },
    );
}

/// Returns (gx, gw partial sums, gb partial sums).
fn backward<T: Elem>(x: &[T], g: &[T], c: usize, w: Option<&[T]>, mean: &[T], rstd: &[T], gx: &mut [T]) -> (Vec<T>, Vec<T>) {
    let chunk = row_chunk(mean.len(), 16);
    let partials: Vec<(Vec<T>, Vec<T>)> = gx
        .par_chunks_mut(chunk * c)
        .zip(x.par_chunks(chunk * c).zip(g.par_chunks(chunk * c)))
        .zip(mean.par_chunks(chunk).zip(rstd.par_chunks(chunk)))
        .map(|((gx, (x, g)), (mean, rstd))| {
            let mut gw = vec![T::zero(); c];
            let mut gb = vec![T::zero(); c];
            for r in 0..mean.len() {
                let (xr, gr, gxr) = (&x[r * c..(r + 1) * c], &g[r * c..(r + 1) * c], &mut gx[r * c..(r + 1) * c]);
                let (m, rs) = (mean[r], rstd[r]);
                for j in 0..c {
                    gw[j] += gr[j] * ((xr[j] - m) * rs);
                    gb[j] += gr[j];
                }
                row_backward(xr, gr, w, m, rs, gxr);
            }
            (gw, gb)
        })
        .collect();
    let mut gw = vec![T::zero(); c];
    let mut gb = vec![T::zero(); c];
    for (pw, pb) in partials {
        for j in 0..c {
            gw[j] += pw[j];
            gb[j] += pb[j];
        }
    }
    (gw, gb)
}

/// Forward on the input's device: (y, per-row mean, per-row 1/std).
fn device_forward(xv: &Tensor, wv: Option<&Tensor>, bv: Option<&Tensor>, c: usize, eps: f64) -> Result<(Tensor, Tensor, Tensor)> {
    crate::on_cuda!(xv => crate::kernels::cuda::ops::layer_norm(xv, wv, bv, eps));
    let rows = xv.numel() / c.max(1);
    with_float!(xv.dtype(), "layer_norm", T => {
        let mut mean = vec![T::zero(); rows];
        let mut rstd = vec![T::zero(); rows];
        let wd = match wv { Some(w) => Some(w.data::<T>()?), None => None };
        let bd = match bv { Some(b) => Some(b.data::<T>()?), None => None };
        let xd = xv.data::<T>()?;
        let y = Tensor::build::<T>(xv.shape(), |y| forward(xd, c, wd, bd, eps, y, &mut mean, &mut rstd));
        Ok((y, Tensor::from_vec(mean, &[rows])?, Tensor::from_vec(rstd, &[rows])?))
    })
}

/// Backward on the saved tensors' device: (dx, dw when `has_w`, db when `has_b`), each `None`
/// too where a GPU wrote it into the slot the tape offered (`autograd::take_grad_sink`: the
/// input's existing gradient at position 0, the gain's and bias's after it).
#[allow(clippy::type_complexity, clippy::too_many_arguments)]
fn device_backward(
    xv: &Tensor,
    g: &Tensor,
    wv: Option<&Tensor>,
    mean: &Tensor,
    rstd: &Tensor,
    c: usize,
    has_w: bool,
    has_b: bool,
) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
    crate::on_cuda!(xv => {
        use crate::autograd::take_grad_sink;
        let sinks = gpu::LnSinks {
            x: take_grad_sink(0),
            w: if has_w { take_grad_sink(1) } else { None },
            b: if has_b { take_grad_sink(1 + has_w as usize) } else { None },
        };
        gpu::layer_norm_bwd(xv, g, wv, mean, rstd, has_w, has_b, sinks)
    });
    with_float!(g.dtype(), "layer_norm", T => {
        let g = g.contiguous();
        let wd = match wv { Some(w) => Some(w.data::<T>()?), None => None };
        let (mean, rstd) = (mean.data::<T>()?, rstd.data::<T>()?);
        let mut parts = None;
        let gx = Tensor::build::<T>(xv.shape(), |gx| {
            parts = Some(backward(xv.data::<T>().expect("checked"), g.data::<T>().expect("contiguous"), c, wd, mean, rstd, gx))
        });
        let (gw, gb) = parts.expect("set by build");
        let gw = if has_w { Some(Tensor::from_vec(gw, &[c])?) } else { None };
        let gb = if has_b { Some(Tensor::from_vec(gb, &[c])?) } else { None };
        Ok((Some(gx), gw, gb))
    })
}

impl<'t> Var<'t> {
    /// Layer norm over the last dim with optional gain `w [C]` and bias `b [C]`.
    pub fn layer_norm(self, w: Option<Var<'t>>, b: Option<Var<'t>>, eps: f64) -> Result<Var<'t>> {
        let (y, backward) = self.layer_norm_value(w, b, eps, false)?;
        let mut inputs = vec![self];
        inputs.extend(w);
        inputs.extend(b);
        Ok(self.tape().record("layer_norm", y, &inputs, backward))
    }

    /// `self.layer_norm(ln_w, ln_b, eps)?.linear(w, b)` as one op. Under bf16 on a GPU the layer
    /// norm writes its output in bf16, straight as the GEMM's operand (no f32 copy written and
    /// read back for a cast); backward runs the layer norm's backward on the product's input
    /// gradient. The numbers are those of the two ops (the linear rounds its input to bf16
    /// anyway); elsewhere, or with
    /// `Fusions::operands` off, it is exactly them.
    ///
    /// `half_out`: the product is a bf16 activation under bf16 precision (as
    /// [`linear_half`](Self::linear_half)'s), for a consumer that reads bf16.
    #[allow(clippy::too_many_arguments)]
    pub fn layer_norm_linear(
        self,
        ln_w: Option<Var<'t>>,
        ln_b: Option<Var<'t>>,
        eps: f64,
        w: Var<'t>,
        b: Option<Var<'t>>,
        half_out: bool,
    ) -> Result<Var<'t>> {
        #[cfg(feature = "cuda")]
        if self.value().is_cuda()
            && self.tape().precision() == crate::tensor::Precision::Bf16
            && crate::kernels::cuda::ops::dev_of(&self.value())?.fusions().operands
        {
            return Ok(self.layer_norm_linear_gpu((ln_w, ln_b, eps), w, b, half_out, false)?.0);
        }
        let h = self.layer_norm(ln_w, ln_b, eps)?;
        if half_out {
            h.linear_half(w, b)
        } else {
            h.linear(w, b)
        }
    }

    /// [`layer_norm_linear`](Self::layer_norm_linear)'s bf16 GPU path: the layer norm writes
    /// the GEMM's bf16 operand. With `gelu`, the tanh GELU of the product comes from the same
    /// GEMM, in its cuBLASLt epilogue where it can (`Var::layer_norm_mlp`,
    /// `ops::matmul::linear_gelu_value`): the node's value is then the bf16 pre-activation, and
    /// the activation comes back beside it for the next GEMM to read.
    #[cfg(feature = "cuda")]
    pub(crate) fn layer_norm_linear_gpu(
        self,
        (ln_w, ln_b, eps): (Option<Var<'t>>, Option<Var<'t>>, f64),
        w: Var<'t>,
        b: Option<Var<'t>>,
        half_out: bool,
        gelu: bool,
    ) -> Result<(Var<'t>, Option<Tensor>)> {
        use crate::ops::matmul::{linear_gelu_value, linear_value, HalfIo, LinearGelu};
        let (h16, ln_bwd) = self.layer_norm_value(ln_w, ln_b, eps, true)?;
        // The layer norm's backward reads an f32 gradient of its output; the weight follows
        // x and the layer norm's own parameters among the inputs.
        let w_at = 1 + ln_w.is_some() as usize + ln_b.is_some() as usize;
        let (wq, bq) = ((w.value(), w.half_twin()), b.map(|b| (b.value(), b.half_twin())));
        let (out, act, lin_bwd): LinearGelu<Option<Tensor>> = if gelu {
            let (act, pre, bwd) = linear_gelu_value(&h16, wq, bq, w_at)?;
            (pre, Some(act), bwd)
        } else {
            let half = HalfIo { y: half_out, gx: false };
            let (out, bwd) = linear_value(&h16, wq, bq, crate::tensor::Precision::Bf16, half, w_at, None, None)?;
            (out, None, Box::new(bwd))
        };
        let mut inputs = vec![self];
        inputs.extend(ln_w);
        inputs.extend(ln_b);
        let n_ln = inputs.len();
        inputs.push(w);
        inputs.extend(b);
        let y = self.tape().record("layer_norm_linear", out, &inputs, move |g| {
            let mut lin = lin_bwd(g)?;
            let gh = lin[0].take().ok_or_else(|| Error::Autograd("linear gave no input gradient".into()))?;
            let mut v = ln_bwd(&gh)?;
            debug_assert_eq!(v.len(), n_ln);
            v.extend(lin.drain(1..));
            Ok(v)
        });
        Ok((y, act))
    }

    /// The layer norm's output (in bf16 on a GPU when `bf16_out`) and its backward (gradients
    /// of x, w and b when given), recording nothing.
    fn layer_norm_value(
        self,
        w: Option<Var<'t>>,
        b: Option<Var<'t>>,
        eps: f64,
        bf16_out: bool,
    ) -> Result<(Tensor, impl FnOnce(&Tensor) -> Result<Vec<Option<Tensor>>> + 'static)> {
        let xv = self.value().try_contiguous()?;
        let c = *xv.shape().last().ok_or_else(|| Error::shape("layer_norm", "scalar input"))?;
        let wv = w.map(|w| w.value().try_contiguous()).transpose()?;
        let bv = b.map(|b| b.value().try_contiguous()).transpose()?;
        for t in [&wv, &bv].into_iter().flatten() {
            if t.shape() != [c] {
                return Err(Error::shape("layer_norm", format!("affine param {:?} for {c} features", t.shape())));
            }
        }
        let (y, mean, rstd) = if bf16_out {
            #[cfg(feature = "cuda")]
            {
                crate::kernels::cuda::ops::layer_norm_to(&xv, wv.as_ref(), bv.as_ref(), eps, crate::tensor::DType::BF16)?
            }
            #[cfg(not(feature = "cuda"))]
            {
                unreachable!("bf16 layer-norm output is a GPU path")
            }
        } else {
            device_forward(&xv, wv.as_ref(), bv.as_ref(), c, eps)?
        };
        let (has_w, has_b) = (w.is_some(), b.is_some());
        Ok((y, move |g: &Tensor| {
            let (gx, gw, gb) = device_backward(&xv, g, wv.as_ref(), &mean, &rstd, c, has_w, has_b)?;
            let mut v = vec![gx];
            if has_w {
                v.push(gw);
            }
            if has_b {
                v.push(gb);
            }
            Ok(v)
        }))
    }
}
