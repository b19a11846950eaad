//! GELU (erf or tanh form) and its backward, on f32 or bf16 activations.

use super::*;

/// GELU in `x`'s dtype (f32, or bf16 for a bf16 activation, computed in f32 and rounded once).
pub fn gelu(x: &Tensor, tanh: bool) -> Result<Tensor> {
    if x.dtype() == DType::BF16 {
        return gelu_bf16(x, tanh);
    }
    f32_only(x, "gelu")?;
    let d = dev_of(x)?;
    let c = contiguous(x)?;
    let out = empty(&d, x.shape())?;
    let n = out.numel();
    // gelu_f32(const float* in, float* out, i64 n, int use_tanh)
    launch!(d, "elementwise", "gelu_f32", grid(n); ptr(&c)?, ptr(&out)?, n as i64, tanh as i32)?;
    Ok(out)
}

/// GELU of f32 or bf16 `x`, written in bf16 (the next GEMM's operand).
pub fn gelu_bf16(x: &Tensor, tanh: bool) -> Result<Tensor> {
    let d = dev_of(x)?;
    let n = x.numel();
    let out = empty_as(&d, x.shape(), DType::BF16)?;
    if x.dtype() == DType::BF16 {
        if !x.is_contiguous() {
            return Err(Error::shape("gelu", "a strided bf16 input on CUDA"));
        }
        let (xp, op) = (ptr(x)?, ptr(&out)?);
        if d.fusions().wide_loads && aligned16(&[xp, op]) {
            // gelu_bf16_bf16_x8(const bf16_t* in, bf16_t* out, i64 n, int use_tanh)
            launch!(d, "elementwise", "gelu_bf16_bf16_x8", grid(n.div_ceil(8)); xp, op, n as i64, tanh as i32)?;
        } else {
            // gelu_bf16_bf16(const bf16_t* in, bf16_t* out, i64 n, int use_tanh)
            launch!(d, "elementwise", "gelu_bf16_bf16", grid(n); xp, op, n as i64, tanh as i32)?;
        }
        return Ok(out);
    }
    f32_only(x, "gelu")?;
    let c = contiguous(x)?;
    // gelu_f32_bf16(const float* in, bf16_t* out, i64 n, int use_tanh)
    launch!(d, "elementwise", "gelu_f32_bf16", grid(n); ptr(&c)?, ptr(&out)?, n as i64, tanh as i32)?;
    Ok(out)
}

/// GELU's input gradient, in `x`'s dtype (g is brought to it first if it differs).
pub fn gelu_bwd(g: &Tensor, x: &Tensor, tanh: bool) -> Result<Tensor> {
    let d = dev_of(g)?;
    let g = if g.dtype() == x.dtype() { g.clone() } else { cast(g, x.dtype())? };
    let n = g.numel();
    if x.dtype() == DType::BF16 {
        if !(g.is_contiguous() && x.is_contiguous()) {
            return Err(Error::shape("gelu", "a strided bf16 gradient or input on CUDA"));
        }
        let out = empty_as(&d, g.shape(), DType::BF16)?;
        let (gp, xp, op) = (ptr(&g)?, ptr(x)?, ptr(&out)?);
        if d.fusions().wide_loads && aligned16(&[gp, xp, op]) {
            // gelu_bwd_bf16_x8(const bf16_t* g, const bf16_t* in, bf16_t* out, i64 n, int use_tanh)
            launch!(d, "elementwise", "gelu_bwd_bf16_x8", grid(n.div_ceil(8)); gp, xp, op, n as i64, tanh as i32)?;
        } else {
            // gelu_bwd_bf16(const bf16_t* g, const bf16_t* in, bf16_t* out, i64 n, int use_tanh)
            launch!(d, "elementwise", "gelu_bwd_bf16", grid(n); gp, xp, op, n as i64, tanh as i32)?;
        }
        return Ok(out);
    }
    let (g, x) = (contiguous(&g)?, contiguous(x)?);
    let out = empty(&d, g.shape())?;
    // gelu_bwd_f32(const float* g, const float* in, float* out, i64 n, int use_tanh)
    launch!(d, "elementwise", "gelu_bwd_f32", grid(n); ptr(&g)?, ptr(&x)?, ptr(&out)?, n as i64, tanh as i32)?;
    Ok(out)
}
