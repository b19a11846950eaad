//! Batch norm: statistics, running averages, apply and backward.

use super::*;

/// Per-(ghost batch, channel) statistics of packed `x [k·n, c, s]`: (mean, biased var), each
/// `[k, c]`, in one launch.
pub fn bn_stats(x: &Tensor, k: usize, n: usize, c: usize, s: usize) -> Result<(Tensor, Tensor)> {
    let d = dev_of(x)?;
    let x = contiguous(x)?;
    let (mean, var) = (empty(&d, &[k, c])?, empty(&d, &[k, c])?);
    // bn_stats_f32(const float* x, float* mean, float* var, i64 k, i64 n, i64 c, i64 s)
    launch!(d, "batch_norm", "bn_stats_f32", per_row(k * c);
        ptr(&x)?, ptr(&mean)?, ptr(&var)?, k as i64, n as i64, c as i64, s as i64)?;
    Ok((mean, var))
}

/// For each of the k ghost batches in order: `rm ← (1−mo)·rm + mo·mean_g`,
/// `rv ← (1−mo)·rv + mo·var_g·unbias`, in place on the device.
pub fn bn_running(rm: &Tensor, rv: &Tensor, mean: &Tensor, var: &Tensor, k: usize, mo: f64, unbias: f64) -> Result<()> {
    let d = dev_of(mean)?;
    let c = mean.numel() / k;
    // bn_running_f32(float* rm, float* rv, const float* mean, const float* var, i64 k, i64 c, float mo, float unbias)
    launch!(d, "batch_norm", "bn_running_f32", grid(c);
        ptr(rm)?, ptr(rv)?, ptr(mean)?, ptr(var)?, k as i64, c as i64, mo as f32, unbias as f32)
}

/// `1/sqrt(var + eps)`.
pub fn rsqrt_eps(var: &Tensor, eps: f64) -> Result<Tensor> {
    let d = dev_of(var)?;
    let var = contiguous(var)?;
    let out = empty(&d, var.shape())?;
    let c = var.numel();
    // rsqrt_eps_f32(const float* var, float* rstd, i64 c, float eps)
    launch!(d, "batch_norm", "rsqrt_eps_f32", grid(c); ptr(&var)?, ptr(&out)?, c as i64, eps as f32)?;
    Ok(out)
}

/// `y = (x − mean)·rstd·w + b` with the statistics of each element's ghost batch (`[k, c]`;
/// k = 1 for plain batch norm and for eval).
#[allow(clippy::too_many_arguments)]
pub fn bn_apply(
    x: &Tensor,
    mean: &Tensor,
    rstd: &Tensor,
    w: &Tensor,
    b: &Tensor,
    k: usize,
    n: usize,
    c: usize,
    s: usize,
) -> Result<Tensor> {
    let d = dev_of(x)?;
    let (x, w, b) = (contiguous(x)?, contiguous(w)?, contiguous(b)?);
    let y = empty(&d, x.shape())?;
    // bn_apply_f32(x, mean, rstd, w, b, y, i64 k, i64 n, i64 c, i64 s)
    launch!(d, "batch_norm", "bn_apply_f32", grid(k * n * c * s);
        ptr(&x)?, ptr(mean)?, ptr(rstd)?, ptr(&w)?, ptr(&b)?, ptr(&y)?, k as i64, n as i64, c as i64, s as i64)?;
    Ok(y)
}

/// Batch norm backward over k ghost batches: (dx, dw, db); the parameters' gradients are the
/// per-batch sums added over the k batches (a column-sum GEMM when k > 1).
#[allow(clippy::too_many_arguments)]
pub fn bn_bwd(
    x: &Tensor,
    g: &Tensor,
    mean: &Tensor,
    rstd: &Tensor,
    w: &Tensor,
    k: usize,
    n: usize,
    c: usize,
    s: usize,
    train: bool,
) -> Result<(Tensor, Tensor, Tensor)> {
    let d = dev_of(x)?;
    let (x, g, w) = (contiguous(x)?, contiguous(g)?, contiguous(w)?);
    let (gw, gb) = (empty(&d, &[k, c])?, empty(&d, &[k, c])?);
    // bn_grad_params_f32(x, g, mean, rstd, gw, gb, i64 k, i64 n, i64 c, i64 s)
    launch!(d, "batch_norm", "bn_grad_params_f32", per_row(k * c);
        ptr(&x)?, ptr(&g)?, ptr(mean)?, ptr(rstd)?, ptr(&gw)?, ptr(&gb)?, k as i64, n as i64, c as i64, s as i64)?;
    let gx = empty(&d, x.shape())?;
    // bn_bwd_input_f32(x, g, mean, rstd, w, gw, gb, gx, i64 k, i64 n, i64 c, i64 s, int train)
    launch!(d, "batch_norm", "bn_bwd_input_f32", grid(k * n * c * s);
        ptr(&x)?, ptr(&g)?, ptr(mean)?, ptr(rstd)?, ptr(&w)?, ptr(&gw)?, ptr(&gb)?, ptr(&gx)?, k as i64, n as i64, c as i64, s as i64, train as i32)?;
    if k == 1 {
        return Ok((gx, gw.reshape(&[c])?, gb.reshape(&[c])?));
    }
    Ok((gx, sum_rows(&gw)?, sum_rows(&gb)?))
}
