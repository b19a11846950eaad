//! qk-layernorm (Dehghani et al. 2023; Wortsman et al. 2023): LayerNorm over each head's query
//! and key, with one gain and bias for the queries and one for the keys, shared by the heads —
//! the mitigation of attention-logit growth. It works on the packed projection `qkv [B, T, 3C]`
//! in place of a split: the buffer is rows of one head's d_head values, a row's slot (query,
//! key, value) follows from its index, and value rows pass through. One kernel each way, no
//! copies of q and k, and the attention op reads the result as it reads any packed projection.

use super::layer_norm::{row_backward, row_forward};
use super::row_chunk;
use crate::autograd::Var;
use crate::error::{Error, Result};
use crate::tensor::{Elem, Tensor};
use crate::with_float;
use rayon::prelude::*;

/// The slot of row `r` (0 query, 1 key, 2 value) with `h` heads.
fn slot(r: usize, h: usize) -> usize {
    (r / h) % 3
}

#[allow(clippy::too_many_arguments)]
fn forward<T: Elem>(x: &[T], h: usize, c: usize, w: Option<&[T]>, b: Option<&[T]>, eps: f64, y: &mut [T], mean: &mut [T], rstd: &mut [T]) {
    let chunk = row_chunk(mean.len(), 16);
    y.par_chunks_mut(chunk * c)
        .zip(x.par_chunks(chunk * c))
        .zip(mean.par_chunks_mut(chunk).zip(rstd.par_chunks_mut(chunk)))
        .enumerate()
        .for_each(|(k, ((y, x), (mean, rstd)))| {
            for (i, (yr, xr)) in y.chunks_mut(c).zip(x.chunks(c)).enumerate() {
                let s = slot(k * chunk + i, h);
                if s == 2 {
                    yr.copy_from_slice(xr);
                    continue;
                }
                let (ws, bs) = (w.map(|w| &w[s * c..(s + 1) * c]), b.map(|b| &b[s * c..(s + 1) * c]));
                (mean[i], rstd[i]) = row_forward(xr, ws, bs, eps, yr);
            }
        });
}

/// Returns (gx into `gx`, Σ g·x̂ per slot `[2c]`, Σ g per slot `[2c]`).
#[allow(clippy::too_many_arguments)]
fn backward<T: Elem>(x: &[T], g: &[T], h: usize, c: usize, w: Option<&[T]>, mean: &[T], rstd: &[T], gx: &mut [T]) -> (Vec<T>, Vec<T>) {
    let chunk = row_chunk(mean.len(), 16);
    let partials: Vec<(Vec<T>, Vec<T>)> = gx
        .par_chunks_mut(chunk * c)
        .zip(x.par_chunks(chunk * c).zip(g.par_chunks(chunk * c)))
        .zip(mean.par_chunks(chunk).zip(rstd.par_chunks(chunk)))
        .enumerate()
        .map(|(k, ((gx, (x, g)), (mean, rstd)))| {
            let mut gw = vec![T::zero(); 2 * c];
            let mut gb = vec![T::zero(); 2 * c];
            for r in 0..mean.len() {
                let (xr, gr, gxr) = (&x[r * c..(r + 1) * c], &g[r * c..(r + 1) * c], &mut gx[r * c..(r + 1) * c]);
                let s = slot(k * chunk + r, h);
                if s == 2 {
                    gxr.copy_from_slice(gr);
                    continue;
                }
                let (m, rs) = (mean[r], rstd[r]);
                for j in 0..c {
                    gw[s * c + j] += gr[j] * ((xr[j] - m) * rs);
                    gb[s * c + j] += gr[j];
                }
                row_backward(xr, gr, w.map(|w| &w[s * c..(s + 1) * c]), m, rs, gxr);
            }
            (gw, gb)
        })
        .collect();
    let (mut gw, mut gb) = (vec![T::zero(); 2 * c], vec![T::zero(); 2 * c]);
    for (pw, pb) in partials {
        for j in 0..2 * c {
            gw[j] += pw[j];
            gb[j] += pb[j];
        }
    }
    (gw, gb)
}

impl<'t> Var<'t> {
    /// qk-layernorm of the packed projection `qkv [B, T, 3C]` with `n_heads` heads: each head's
    /// query and key normalised over d_head = C / n_heads (`eps` inside the square root, as
    /// `layer_norm`), then scaled by `w [2, d_head]` and shifted by `b [2, d_head]` (row 0 the
    /// queries', row 1 the keys'), when given; values unchanged.
    pub fn qk_layer_norm(self, n_heads: usize, w: Option<Var<'t>>, b: Option<Var<'t>>, eps: f64) -> Result<Var<'t>> {
        let xv = self.value().try_contiguous()?;
        let s = xv.shape().to_vec();
        if s.len() != 3 || n_heads == 0 || !s[2].is_multiple_of(3 * n_heads) {
            return Err(Error::shape("qk_layer_norm", format!("qkv {s:?} with {n_heads} heads")));
        }
        let (h, c) = (n_heads, s[2] / 3 / n_heads);
        let wv = w.map(|w| w.value().try_contiguous()).transpose()?;
        let bv = b.map(|b| b.value().try_contiguous()).transpose()?;
        for t in [&wv, &bv].into_iter().flatten() {
            if t.shape() != [2, c] {
                return Err(Error::shape("qk_layer_norm", format!("affine param {:?}, expected [2, {c}]", t.shape())));
            }
        }
        let (y, mean, rstd) = device_forward(&xv, wv.as_ref(), bv.as_ref(), h, c, eps)?;
        let (has_w, has_b) = (w.is_some(), b.is_some());
        let mut inputs = vec![self];
        inputs.extend(w);
        inputs.extend(b);
        Ok(self.tape().record("qk_layer_norm", y, &inputs, move |g| {
            let (gx, gw, gb) = device_backward(&xv, g, wv.as_ref(), &mean, &rstd, h, c)?;
            let mut v = vec![Some(gx)];
            if has_w {
                v.push(Some(gw));
            }
            if has_b {
                v.push(Some(gb));
            }
            Ok(v)
        }))
    }
}

fn device_forward(xv: &Tensor, wv: Option<&Tensor>, bv: Option<&Tensor>, h: usize, c: usize, eps: f64) -> Result<(Tensor, Tensor, Tensor)> {
    crate::on_cuda!(xv => crate::kernels::cuda::ops::qk_norm(xv, wv, bv, h, c, eps));
    let rows = xv.numel() / c;
    with_float!(xv.dtype(), "qk_layer_norm", T => {
        let mut mean = vec![T::zero(); rows];
        let mut rstd = vec![T::zero(); rows];
        let wd = match wv { Some(w) => Some(w.data::<T>()?), None => None };
        let bd = match bv { Some(b) => Some(b.data::<T>()?), None => None };
        let xd = xv.data::<T>()?;
        let y = Tensor::build::<T>(xv.shape(), |y| forward(xd, h, c, wd, bd, eps, y, &mut mean, &mut rstd));
        Ok((y, Tensor::from_vec(mean, &[rows])?, Tensor::from_vec(rstd, &[rows])?))
    })
}

#[allow(clippy::too_many_arguments)]
fn device_backward(
    xv: &Tensor,
    g: &Tensor,
    wv: Option<&Tensor>,
    mean: &Tensor,
    rstd: &Tensor,
    h: usize,
    c: usize,
) -> Result<(Tensor, Tensor, Tensor)> {
    crate::on_cuda!(xv => crate::kernels::cuda::ops::qk_norm_bwd(xv, g, wv, mean, rstd, h, c));
    with_float!(g.dtype(), "qk_layer_norm", T => {
        let g = g.contiguous();
        let wd = match wv { Some(w) => Some(w.data::<T>()?), None => None };
        let (mean, rstd) = (mean.data::<T>()?, rstd.data::<T>()?);
        let mut parts = None;
        let gx = Tensor::build::<T>(xv.shape(), |gx| {
            parts = Some(backward(xv.data::<T>().expect("checked"), g.data::<T>().expect("contiguous"), h, c, wd, mean, rstd, gx))
        });
        let (gw, gb) = parts.expect("set by build");
        Ok((gx, Tensor::from_vec(gw, &[2, c])?, Tensor::from_vec(gb, &[2, c])?))
    })
}
