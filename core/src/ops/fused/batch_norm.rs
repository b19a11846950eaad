//! Batch normalisation over all dims but the channel dim 1 (`[N, C]` or `[N, C, H, W]`), with
//! `torch.nn.functional.batch_norm` semantics: training normalises with the biased batch
//! variance and updates running statistics with the unbiased one (momentum 0.1 by default);
//! eval uses the running statistics. Ghost Batch Normalization applies this per ghost batch.

use crate::autograd::Var;
use crate::error::{Error, Result};
use crate::tensor::{Elem, Tensor};
use crate::with_float;
use std::sync::Mutex;

/// Running statistics of one batch-norm layer.
pub struct RunningStats<'a> {
    pub mean: &'a Mutex<Tensor>,
    pub var: &'a Mutex<Tensor>,
    pub momentum: f64,
}

/// Per-channel sums over (N, S) of f(x) for x laid out [N, C, S].
fn chan_stats<T: Elem>(x: &[T], n: usize, c: usize, s: usize) -> (Vec<T>, Vec<T>) {
    let cnt = T::of((n * s) as f64);
    let mut mean = vec![T::zero(); c];
    for i in 0..n {
        for ch in 0..c {
            mean[ch] += crate::kernels::cpu::reduce::sum_slice(&x[(i * c + ch) * s..][..s]);
        }
    }
    for m in &mut mean {
        *m = *m / cnt;
    }
    let mut var = vec![T::zero(); c];
    for i in 0..n {
        for ch in 0..c {
            let m = mean[ch];
            var[ch] += x[(i * c + ch) * s..][..s].iter().map(|&v| (v - m) * (v - m)).sum::<T>();
        }
    }
    for v in &mut var {
        *v = *v / cnt;
    }
    (mean, var)
}

/// One batch-norm call's layout: `[n, c, s]` (s = spatial size, 1 for `[N, C]`).
#[derive(Clone, Copy)]
struct Layout {
    n: usize,
    c: usize,
    s: usize,
}

#[cfg(feature = "cuda")]
fn cuda_forward(
    xv: &Tensor,
    wv: &Tensor,
    bv: &Tensor,
    stats: &RunningStats<'_>,
    l: Layout,
    train: bool,
    eps: f64,
) -> Result<(Tensor, Tensor, Tensor)> {
    use crate::kernels::cuda::ops as gpu;
    let Layout { n, c, s } = l;
    let (mean, var) = if train {
        let (m, v) = gpu::bn_stats(xv, n, c, s)?;
        let rm = stats.mean.lock().unwrap_or_else(|e| e.into_inner());
        let rv = stats.var.lock().unwrap_or_else(|e| e.into_inner());
        gpu::bn_running(&rm, &rv, &m, &v, stats.momentum, (n * s) as f64 / (n * s - 1) as f64)?;
        (m, v)
    } else {
        let m = stats.mean.lock().unwrap_or_else(|e| e.into_inner()).try_contiguous()?;
        let v = stats.var.lock().unwrap_or_else(|e| e.into_inner()).try_contiguous()?;
        (m, v)
    };
    let rstd = gpu::rsqrt_eps(&var, eps)?;
    let y = gpu::bn_apply(xv, &mean, &rstd, wv, bv, n, c, s)?;
    Ok((y, mean, rstd))
}

/// Forward on the input's device (updating the running statistics when `train`): (y, the
/// per-channel mean used, its 1/std).
fn device_forward(
    xv: &Tensor,
    wv: &Tensor,
    bv: &Tensor,
    stats: &RunningStats<'_>,
    l: Layout,
    train: bool,
    eps: f64,
) -> Result<(Tensor, Tensor, Tensor)> {
    #[cfg(feature = "cuda")]
    if xv.is_cuda() {
        return cuda_forward(xv, wv, bv, stats, l, train, eps);
    }
    let Layout { n, c, s } = l;
    let sh = xv.shape().to_vec();
    with_float!(xv.dtype(), "batch_norm", T => {
        let xd = xv.data::<T>()?;
        let (mean, var) = if train {
            let (m, v) = chan_stats(xd, n, c, s);
            let mo = stats.momentum;
            let unbias = (n * s) as f64 / (n * s - 1) as f64;
            let mut rm = stats.mean.lock().unwrap_or_else(|e| e.into_inner());
            let mut rv = stats.var.lock().unwrap_or_else(|e| e.into_inner());
            let new_m: Vec<T> = rm.to_vec::<T>()?.iter().zip(&m).map(|(&r, &x)| T::of((1.0 - mo) * r.f64() + mo * x.f64())).collect();
            let new_v: Vec<T> = rv.to_vec::<T>()?.iter().zip(&v).map(|(&r, &x)| T::of((1.0 - mo) * r.f64() + mo * x.f64() * unbias)).collect();
            *rm = Tensor::from_vec(new_m, &[c])?;
            *rv = Tensor::from_vec(new_v, &[c])?;
            (m, v)
        } else {
            let m = stats.mean.lock().unwrap_or_else(|e| e.into_inner()).to_vec::<T>()?;
            let v = stats.var.lock().unwrap_or_else(|e| e.into_inner()).to_vec::<T>()?;
            (m, v)
        };
        let rstd: Vec<T> = var.iter().map(|&v| T::one() / (v + T::of(eps)).sqrt()).collect();
        let (wd, bd) = (wv.data::<T>()?, bv.data::<T>()?);
        let y = Tensor::build::<T>(&sh, |y| {
            for i in 0..n {
                for ch in 0..c {
                    let (m, r, g, bb) = (mean[ch], rstd[ch], wd[ch], bd[ch]);
                    let base = (i * c + ch) * s;
                    for (yv, &xv) in y[base..base + s].iter_mut().zip(&xd[base..base + s]) {
                        *yv = (xv - m) * r * g + bb;
                    }
                }
            }
        });
        Ok((y, Tensor::from_vec(mean, &[c])?, Tensor::from_vec(rstd, &[c])?))
    })
}

/// Backward on the saved tensors' device: (dx, dw, db).
fn device_backward(
    xv: &Tensor,
    g: &Tensor,
    wv: &Tensor,
    mean: &Tensor,
    rstd: &Tensor,
    l: Layout,
    train: bool,
) -> Result<(Tensor, Tensor, Tensor)> {
    crate::on_cuda!(xv => gpu::bn_bwd(xv, g, mean, rstd, wv, l.n, l.c, l.s, train));
    let Layout { n, c, s } = l;
    let sh = xv.shape().to_vec();
    with_float!(g.dtype(), "batch_norm", T => {
        let g = g.contiguous();
        let (gd, xd, wd) = (g.data::<T>()?, xv.data::<T>()?, wv.data::<T>()?);
        let (mean, rstd) = (mean.data::<T>()?, rstd.data::<T>()?);
        let mut gw = vec![T::zero(); c];
        let mut gb = vec![T::zero(); c];
        for i in 0..n {
            for ch in 0..c {
                let base = (i * c + ch) * s;
                for k in base..base + s {
                    gw[ch] += gd[k] * (xd[k] - mean[ch]) * rstd[ch];
                    gb[ch] += gd[k];
                }
            }
        }
        let cnt = T::of((n * s) as f64);
        let gx = Tensor::build::<T>(&sh, |gx| {
            for i in 0..n {
                for ch in 0..c {
                    let base = (i * c + ch) * s;
                    let (r, wc) = (rstd[ch], wd[ch]);
                    for k in base..base + s {
                        gx[k] = if train {
                            let xh = (xd[k] - mean[ch]) * r;
                            // Σ g·w = w·gb, Σ g·w·x̂ = w·gw
                            wc * r * (gd[k] - gb[ch] / cnt - xh * gw[ch] / cnt)
                        } else {
                            gd[k] * wc * r
                        };
                    }
                }
            }
        });
        Ok((gx, Tensor::from_vec(gw, &[c])?, Tensor::from_vec(gb, &[c])?))
    })
}

impl<'t> Var<'t> {
    /// Batch norm with gain `w [C]`, bias `b [C]`. `train` selects batch statistics (and
    /// updates `stats`) or running statistics.
    pub fn batch_norm(self, w: Var<'t>, b: Var<'t>, stats: RunningStats<'_>, train: bool, eps: f64) -> Result<Var<'t>> {
        let xv = self.value().try_contiguous()?;
        let sh = xv.shape().to_vec();
        if sh.len() < 2 || w.shape() != [sh[1]] || b.shape() != [sh[1]] {
            return Err(Error::shape("batch_norm", format!("input {sh:?} with affine {:?}", w.shape())));
        }
        let l = Layout { n: sh[0], c: sh[1], s: sh[2..].iter().product() };
        if train && l.n * l.s < 2 {
            return Err(Error::shape("batch_norm", "training needs more than one value per channel"));
        }
        let (wv, bv) = (w.value().try_contiguous()?, b.value().try_contiguous()?);
        let (y, mean, rstd) = device_forward(&xv, &wv, &bv, &stats, l, train, eps)?;
        Ok(self.tape().record("batch_norm", y, &[self, w, b], move |g| {
            let (gx, gw, gb) = device_backward(&xv, g, &wv, &mean, &rstd, l, train)?;
            Ok(vec![Some(gx), Some(gw), Some(gb)])
        }))
    }
}
