//! GELU (erf or tanh form) and its backward.

use super::*;

pub fn gelu(x: &Tensor, tanh: bool) -> Result<Tensor> {
    f32_only(x, "gelu")?;
    let d = dev_of(x)?;
    let c = contiguous(x)?;
    let out = empty(&d, x.shape())?;
    let n = out.numel();
    // gelu_f32(const float* in, float* out, i64 n, int use_tanh)
    launch!(d, "elementwise", "gelu_f32", grid(n); ptr(&c)?, ptr(&out)?, n as i64, tanh as i32)?;
    Ok(out)
}

/// GELU of f32 `x`, written in bf16 (the next GEMM's operand).
pub fn gelu_bf16(x: &Tensor, tanh: bool) -> Result<Tensor> {
    f32_only(x, "gelu")?;
    let d = dev_of(x)?;
    let c = contiguous(x)?;
    let n = c.numel();
    let out = wrap(d.alloc(n * 2)?, DType::BF16, x.shape());
    // gelu_f32_bf16(const float* in, bf16_t* out, i64 n, int use_tanh)
    launch!(d, "elementwise", "gelu_f32_bf16", grid(n); ptr(&c)?, ptr(&out)?, n as i64, tanh as i32)?;
    Ok(out)
}

pub fn gelu_bwd(g: &Tensor, x: &Tensor, tanh: bool) -> Result<Tensor> {
    let d = dev_of(g)?;
    let (g, x) = (contiguous(g)?, contiguous(x)?);
    let out = empty(&d, g.shape())?;
    let n = out.numel();
    // gelu_bwd_f32(const float* g, const float* in, float* out, i64 n, int use_tanh)
    launch!(d, "elementwise", "gelu_bwd_f32", grid(n); ptr(&g)?, ptr(&x)?, ptr(&out)?, n as i64, tanh as i32)?;
    Ok(out)
}
