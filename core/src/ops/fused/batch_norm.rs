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

/// One batch-norm call's layout: `k` ghost batches of `n` samples, each `[n, c, s]` (s = spatial
/// size, 1 for `[N, C]`); plain batch norm is k = 1. The batch dim is outermost, so ghost batch
/// g is the contiguous slice `[g·n·c·s, (g+1)·n·c·s)`.
#[derive(Clone, Copy)]
struct Layout {
    k: usize,
    n: usize,
    c: usize,
    s: usize,
}

impl Layout {
    fn chunk(&self) -> usize {
        self.n * self.c * self.s
    }
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
    let Layout { k, n, c, s } = l;
    let (mean, var) = if train {
        let (m, v) = gpu::bn_stats(xv, k, n, c, s)?;
        let rm = stats.mean.lock().unwrap_or_else(|e| e.into_inner());
        let rv = stats.var.lock().unwrap_or_else(|e| e.into_inner());
        gpu::bn_running(&rm, &rv, &m, &v, k, stats.momentum, (n * s) as f64 / (n * s - 1) as f64)?;
        (m, v)
    } else {
        let m = stats.mean.lock().unwrap_or_else(|e| e.into_inner()).try_contiguous()?;
        let v = stats.var.lock().unwrap_or_else(|e| e.into_inner()).try_contiguous()?;
        (m, v)
    };
    let rstd = gpu::rsqrt_eps(&var, eps)?;
    // Eval: one set of (running) statistics for the whole batch, one group.
    let (k, n) = if train { (k, n) } else { (1, k * n) };
    let y = gpu::bn_apply(xv, &mean, &rstd, wv, bv, k, n, c, s)?;
    Ok((y, mean, rstd))
}

/// Forward on the input's device (updating the running statistics when `train`, once per ghost
/// batch in order): (y, the per-(ghost batch, channel) mean used `[k, c]`, its 1/std).
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
    let Layout { k, n, c, s } = l;
    let sh = xv.shape().to_vec();
    with_float!(xv.dtype(), "batch_norm", T => {
        let xd = xv.data::<T>()?;
        let (mean, var) = if train {
            let mo = stats.momentum;
            let unbias = (n * s) as f64 / (n * s - 1) as f64;
            let mut rm = stats.mean.lock().unwrap_or_else(|e| e.into_inner());
            let mut rv = stats.var.lock().unwrap_or_else(|e| e.into_inner());
            let (mut run_m, mut run_v) = (rm.to_vec::<T>()?, rv.to_vec::<T>()?);
            let (mut mean, mut var) = (Vec::with_capacity(k * c), Vec::with_capacity(k * c));
            for x in xd.chunks(l.chunk()) {
                let (m, v) = chan_stats(x, n, c, s);
                for ch in 0..c {
                    run_m[ch] = T::of((1.0 - mo) * run_m[ch].f64() + mo * m[ch].f64());
                    run_v[ch] = T::of((1.0 - mo) * run_v[ch].f64() + mo * v[ch].f64() * unbias);
                }
                mean.extend(m);
                var.extend(v);
            }
            *rm = Tensor::from_vec(run_m, &[c])?;
            *rv = Tensor::from_vec(run_v, &[c])?;
            (mean, var)
        } else {
            let m = stats.mean.lock().unwrap_or_else(|e| e.into_inner()).to_vec::<T>()?;
            let v = stats.var.lock().unwrap_or_else(|e| e.into_inner()).to_vec::<T>()?;
            (m, v)
        };
        let rstd: Vec<T> = var.iter().map(|&v| T::one() / (v + T::of(eps)).sqrt()).collect();
        let (wd, bd) = (wv.data::<T>()?, bv.data::<T>()?);
        let y = Tensor::build::<T>(&sh, |y| {
            for i in 0..k * n {
                // Eval normalises every sample with the one set of running statistics.
                let g = if train { i / n } else { 0 };
                for ch in 0..c {
                    let (m, r, gn, bb) = (mean[g * c + ch], rstd[g * c + ch], wd[ch], bd[ch]);
                    let base = (i * c + ch) * s;
                    for (yv, &xv) in y[base..base + s].iter_mut().zip(&xd[base..base + s]) {
                        *yv = (xv - m) * r * gn + bb;
                    }
                }
            }
        });
        let kk = if train { k } else { 1 };
        Ok((y, Tensor::from_vec(mean, &[kk, c])?, Tensor::from_vec(rstd, &[kk, c])?))
    })
}

/// Backward on the saved tensors' device: (dx, dw, db). In training each ghost batch is its own
/// normalisation, so the input gradient uses that batch's sums; the parameters' gradients sum
/// over all of them.
fn device_backward(
    xv: &Tensor,
    g: &Tensor,
    wv: &Tensor,
    mean: &Tensor,
    rstd: &Tensor,
    l: Layout,
    train: bool,
) -> Result<(Tensor, Tensor, Tensor)> {
    let l = if train { l } else { Layout { k: 1, n: l.k * l.n, ..l } };
    crate::on_cuda!(xv => gpu::bn_bwd(xv, g, mean, rstd, wv, l.k, l.n, l.c, l.s, train));
    let Layout { k, n, c, s } = l;
    let sh = xv.shape().to_vec();
    with_float!(g.dtype(), "batch_norm", T => {
        let g = g.contiguous();
        let (gd, xd, wd) = (g.data::<T>()?, xv.data::<T>()?, wv.data::<T>()?);
        let (mean, rstd) = (mean.data::<T>()?, rstd.data::<T>()?);
        // Per (ghost batch, channel): Σ g·x̂ and Σ g.
        let mut gw = vec![T::zero(); k * c];
        let mut gb = vec![T::zero(); k * c];
        for i in 0..k * n {
            let q = i / n;
            for ch in 0..c {
                let base = (i * c + ch) * s;
                let (m, r) = (mean[q * c + ch], rstd[q * c + ch]);
                for kx in base..base + s {
                    gw[q * c + ch] += gd[kx] * (xd[kx] - m) * r;
                    gb[q * c + ch] += gd[kx];
                }
            }
        }
        let cnt = T::of((n * s) as f64);
        let gx = Tensor::build::<T>(&sh, |gx| {
            for i in 0..k * n {
                let q = i / n;
                for ch in 0..c {
                    let base = (i * c + ch) * s;
                    let j = q * c + ch;
                    let (r, wc) = (rstd[j], wd[ch]);
                    for kx in base..base + s {
                        gx[kx] = if train {
                            let xh = (xd[kx] - mean[j]) * r;
                            // Σ g·w = w·gb, Σ g·w·x̂ = w·gw
                            wc * r * (gd[kx] - gb[j] / cnt - xh * gw[j] / cnt)
                        } else {
                            gd[kx] * wc * r
                        };
                    }
                }
            }
        });
        let sum_groups = |v: Vec<T>| -> Vec<T> {
            let mut out = v[..c].to_vec();
            for q in 1..k {
                for ch in 0..c {
                    out[ch] += v[q * c + ch];
                }
            }
            out
        };
        Ok((gx, Tensor::from_vec(sum_groups(gw), &[c])?, Tensor::from_vec(sum_groups(gb), &[c])?))
    })
}

impl<'t> Var<'t> {
    /// Batch norm with gain `w [C]`, bias `b [C]`. `train` selects batch statistics (and
    /// updates `stats`) or running statistics.
    pub fn batch_norm(self, w: Var<'t>, b: Var<'t>, stats: RunningStats<'_>, train: bool, eps: f64) -> Result<Var<'t>> {
        let n = self.shape().first().copied().unwrap_or(0);
        self.ghost_batch_norm(w, b, stats, train, eps, n)
    }

    /// Ghost Batch Normalization (Hoffer et al. 2017): in training, each consecutive chunk of
    /// `ghost` samples is normalised with its own statistics and updates the running ones in
    /// turn (one kernel launch for all chunks); eval uses the running statistics. `ghost` must
    /// divide the batch; `ghost` = the batch is plain batch norm.
    pub fn ghost_batch_norm(self, w: Var<'t>, b: Var<'t>, stats: RunningStats<'_>, train: bool, eps: f64, ghost: usize) -> Result<Var<'t>> {
        let xv = self.value().try_contiguous()?;
        let sh = xv.shape().to_vec();
        if sh.len() < 2 || w.shape() != [sh[1]] || b.shape() != [sh[1]] {
            return Err(Error::shape("batch_norm", format!("input {sh:?} with affine {:?}", w.shape())));
        }
        // Eval normalises with the running statistics: ghost batches play no part.
        let ghost = if train { ghost } else { sh[0] };
        if ghost == 0 || sh[0] % ghost != 0 {
            return Err(Error::shape("batch_norm", format!("ghost batches of {ghost} do not divide the batch of {}", sh[0])));
        }
        let l = Layout { k: sh[0] / ghost, n: ghost, c: sh[1], s: sh[2..].iter().product() };
        if train && l.n * l.s < 2 {
            return Err(Error::shape("batch_norm", "training needs more than one value per channel (in each ghost batch)"));
        }
        let (wv, bv) = (w.value().try_contiguous()?, b.value().try_contiguous()?);
        let (y, mean, rstd) = device_forward(&xv, &wv, &bv, &stats, l, train, eps)?;
        Ok(self.tape().record("batch_norm", y, &[self, w, b], move |g| {
            let (gx, gw, gb) = device_backward(&xv, g, &wv, &mean, &rstd, l, train)?;
            Ok(vec![Some(gx), Some(gw), Some(gb)])
        }))
    }
}
