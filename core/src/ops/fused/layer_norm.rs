//! Layer normalisation over the last dim, saving per-row mean and 1/std for backward
//! (`torch.nn.functional.layer_norm` semantics: biased variance, eps inside the sqrt).

use super::row_chunk;
use crate::autograd::Var;
use crate::error::{Error, Result};
use crate::tensor::{Elem, Tensor};
use crate::with_float;
use rayon::prelude::*;
use std::sync::Arc;

fn forward<T: Elem>(x: &[T], c: usize, w: Option<&[T]>, b: Option<&[T]>, eps: f64, y: &mut [T], mean: &mut [T], rstd: &mut [T]) {
    let chunk = row_chunk(mean.len(), 16);
    y.par_chunks_mut(chunk * c).zip(x.par_chunks(chunk * c)).zip(mean.par_chunks_mut(chunk).zip(rstd.par_chunks_mut(chunk))).for_each(
        |((y, x), (mean, rstd))| {
            for (r, (yr, xr)) in y.chunks_mut(c).zip(x.chunks(c)).enumerate() {
                let m = crate::kernels::cpu::reduce::sum_slice(xr) / T::of(c as f64);
                let mut var = T::zero();
                for &v in xr {
                    var += (v - m) * (v - m);
                }
                let rs = T::one() / (var / T::of(c as f64) + T::of(eps)).sqrt();
                mean[r] = m;
                rstd[r] = rs;
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
                let mut a = T::zero();
                let mut bsum = T::zero();
                for j in 0..c {
                    let xh = (xr[j] - m) * rs;
                    gw[j] += gr[j] * xh;
                    gb[j] += gr[j];
                    let gxh = match w {
                        Some(w) => gr[j] * w[j],
                        None => gr[j],
                    };
                    a += gxh;
                    bsum += gxh * xh;
                }
                let (a, bsum) = (a / T::of(c as f64), bsum / T::of(c as f64));
                for j in 0..c {
                    let xh = (xr[j] - m) * rs;
                    let gxh = match w {
                        Some(w) => gr[j] * w[j],
                        None => gr[j],
                    };
                    gxr[j] = rs * (gxh - a - xh * bsum);
                }
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

impl<'t> Var<'t> {
    /// Layer norm over the last dim with optional gain `w [C]` and bias `b [C]`.
    pub fn layer_norm(self, w: Option<Var<'t>>, b: Option<Var<'t>>, eps: f64) -> Result<Var<'t>> {
        let xv = self.value().try_contiguous()?;
        let c = *xv.shape().last().ok_or_else(|| Error::shape("layer_norm", "scalar input"))?;
        let rows = xv.numel() / c.max(1);
        let wv = w.map(|w| w.value().try_contiguous()).transpose()?;
        let bv = b.map(|b| b.value().try_contiguous()).transpose()?;
        for t in [&wv, &bv].into_iter().flatten() {
            if t.shape() != [c] {
                return Err(Error::shape("layer_norm", format!("affine param {:?} for {c} features", t.shape())));
            }
        }
        #[cfg(feature = "cuda")]
        if xv.is_cuda() {
            use crate::kernels::cuda::ops as gpu;
            let (y, mean, rstd) = gpu::layer_norm(&xv, wv.as_ref(), bv.as_ref(), eps)?;
            let (has_w, has_b) = (w.is_some(), b.is_some());
            let mut inputs = vec![self];
            inputs.extend(w);
            inputs.extend(b);
            return Ok(self.tape().record("layer_norm", y, &inputs, move |g| {
                let (gx, gw, gb) = gpu::layer_norm_bwd(&xv, g, wv.as_ref(), &mean, &rstd, has_w, has_b)?;
                let mut v = vec![Some(gx)];
                if has_w {
                    v.push(gw);
                }
                if has_b {
                    v.push(gb);
                }
                Ok(v)
            }));
        }
        let dt = xv.dtype();
        let (out, stats) = with_float!(dt, "layer_norm", T => {
            let mut mean = vec![T::zero(); rows];
            let mut rstd = vec![T::zero(); rows];
            let wd = match &wv { Some(w) => Some(w.data::<T>()?), None => None };
            let bd = match &bv { Some(b) => Some(b.data::<T>()?), None => None };
            let xd = xv.data::<T>()?;
            let y = Tensor::build::<T>(xv.shape(), |y| forward(xd, c, wd, bd, eps, y, &mut mean, &mut rstd));
            Ok((y, (Tensor::from_vec(mean, &[rows])?, Tensor::from_vec(rstd, &[rows])?)))
        })?;
        let (has_w, has_b) = (w.is_some(), b.is_some());
        let mut inputs = vec![self];
        inputs.extend(w);
        inputs.extend(b);
        let stats = Arc::new(stats);
        Ok(self.tape().record("layer_norm", out, &inputs, move |g| {
            with_float!(g.dtype(), "layer_norm", T => {
                let g = g.contiguous();
                let wd = match &wv { Some(w) => Some(w.data::<T>()?), None => None };
                let (mean, rstd) = (stats.0.data::<T>()?, stats.1.data::<T>()?);
                let mut parts = None;
                let gx = Tensor::build::<T>(xv.shape(), |gx| {
                    parts = Some(backward(xv.data::<T>().expect("checked"), g.data::<T>().expect("contiguous"), c, wd, mean, rstd, gx))
                });
                let (gw, gb) = parts.expect("set by build");
                let mut v = vec![Some(gx)];
                if has_w { v.push(Some(Tensor::from_vec(gw, &[c])?)); }
                if has_b { v.push(Some(Tensor::from_vec(gb, &[c])?)); }
                Ok(v)
            })
        }))
    }
}
