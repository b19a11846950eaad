//! Elementwise arithmetic with broadcasting, unary maps and their backward, gradient accumulation and in-place scaling.

use super::*;

/// One operand of a broadcasting binary op: packed data and the period with which it repeats
/// in the output (its own size when it is a suffix of the output shape).
pub(super) fn operand(x: &Tensor, out: &[usize]) -> Result<(Tensor, usize)> {
    let n: usize = out.iter().product();
    let stripped: Vec<usize> = x.shape().iter().copied().skip_while(|&d| d == 1).collect();
    if stripped.len() <= out.len() && out[out.len() - stripped.len()..] == stripped[..] {
        let c = contiguous(x)?;
        return Ok((c, x.numel().max(1)));
    }
    Ok((broadcast_to(x, out)?, n))
}

/// `a op b` with broadcasting; `name` is one of add_f32, sub_f32, mul_f32, div_f32.
pub fn binary(name: &'static str, a: &Tensor, b: &Tensor) -> Result<Tensor> {
    f32_only(a, name)?;
    f32_only(b, name)?;
    let d = dev_of(a)?;
    let shape = broadcast_shape(a.shape(), b.shape())?;
    let n: usize = shape.iter().product();
    let (pa, na) = operand(a, &shape)?;
    let (pb, nb) = operand(b, &shape)?;
    let out = empty(&d, &shape)?;
    // name(const float* a, const float* b, float* out, i64 n, i64 na, i64 nb)
    launch!(d, "elementwise", name, grid(n); ptr(&pa)?, ptr(&pb)?, ptr(&out)?, n as i64, na as i64, nb as i64)?;
    Ok(out)
}

/// A pointwise map; `name` is one of exp_f32, log_f32, tanh_f32, relu_f32, square_f32.
pub fn unary(name: &'static str, x: &Tensor) -> Result<Tensor> {
    f32_only(x, name)?;
    let d = dev_of(x)?;
    let c = contiguous(x)?;
    let out = empty(&d, x.shape())?;
    let n = out.numel();
    // name(const float* in, float* out, i64 n)
    launch!(d, "elementwise", name, grid(n); ptr(&c)?, ptr(&out)?, n as i64)?;
    Ok(out)
}

pub fn affine(x: &Tensor, mul: f64, add: f64) -> Result<Tensor> {
    f32_only(x, "affine")?;
    let d = dev_of(x)?;
    let c = contiguous(x)?;
    let out = empty(&d, x.shape())?;
    let n = out.numel();
    // affine_f32(const float* in, float* out, i64 n, float mul, float add)
    launch!(d, "elementwise", "affine_f32", grid(n); ptr(&c)?, ptr(&out)?, n as i64, mul as f32, add as f32)?;
    Ok(out)
}

/// Backward of a pointwise map from the output gradient `g` and a saved tensor `s` (the output
/// for tanh/relu, the input for square); `name` is tanh_bwd_f32, relu_bwd_f32 or square_bwd_f32.
pub fn map_bwd(name: &'static str, g: &Tensor, s: &Tensor) -> Result<Tensor> {
    let d = dev_of(g)?;
    let (g, s) = (contiguous(g)?, contiguous(s)?);
    let out = empty(&d, g.shape())?;
    let n = out.numel();
    // name(const float* g, const float* y, float* out, i64 n)
    launch!(d, "elementwise", name, grid(n); ptr(&g)?, ptr(&s)?, ptr(&out)?, n as i64)?;
    Ok(out)
}

/// `dst[i] += src[i]` (`add = true`) or `dst[i] = src[i]` for `n` f32 elements at raw addresses.
pub(crate) fn accumulate_raw(d: &CudaDev, dst: u64, src: &Tensor, n: usize, add: bool) -> Result<()> {
    let s = contiguous(src)?;
    if add {
        // add_assign_f32(float* acc, const float* x, i64 n)
        launch!(d, "elementwise", "add_assign_f32", grid(n); dst, ptr(&s)?, n as i64)
    } else {
        d.copy(dst, ptr(&s)?, n * 4)
    }
}

/// `x *= s` in place at a raw address.
pub(crate) fn scale_raw(d: &CudaDev, p: u64, n: usize, s: f32) -> Result<()> {
    // scale_f32(float* x, i64 n, float s)
    launch!(d, "elementwise", "scale_f32", grid(n); p, n as i64, s)
}
