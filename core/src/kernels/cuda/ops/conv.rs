//! 2-D convolution through im2col and GEMM, forward and backward.

use super::*;

#[repr(C)]
#[derive(Clone, Copy)]
pub struct ConvGeom {
    pub c: i64,
    pub h: i64,
    pub w: i64,
    pub kh: i64,
    pub kw: i64,
    pub stride: i64,
    pub pad: i64,
    pub ho: i64,
    pub wo: i64,
}

// SAFETY: plain-old-data with the C layout of `struct ConvGeom` in conv.cu.
unsafe impl DeviceRepr for ConvGeom {}

/// 2-D convolution forward over packed x `[n, c, h, w]` and w `[o, c·kh·kw]` (+ bias `[o]`).
pub fn conv2d(x: &Tensor, w: &Tensor, b: Option<&Tensor>, g: ConvGeom, n: usize, o: usize) -> Result<Tensor> {
    let d = dev_of(x)?;
    let (x, w) = (contiguous(x)?, contiguous(w)?);
    let (ckk, hw) = ((g.c * g.kh * g.kw) as usize, (g.ho * g.wo) as usize);
    let out = match b {
        Some(b) => expand_copy(&b.reshape(&[1, o, 1])?, &[n, o, hw])?.reshape(&[n, o, g.ho as usize, g.wo as usize])?,
        None => empty(&d, &[n, o, g.ho as usize, g.wo as usize])?,
    };
    let cols = empty(&d, &[ckk, hw])?;
    let beta = if b.is_some() { 1.0 } else { 0.0 };
    for i in 0..n {
        im2col(&x, i, g, &cols)?;
        let wm = MatArg { ptr: ptr(&w)?, trans: false, ld: ckk, batch_stride: 0 };
        let cm = MatArg { ptr: ptr(&cols)?, trans: false, ld: hw, batch_stride: 0 };
        d.gemm(o, hw, ckk, wm, cm, ptr(&out)? + (i * o * hw * 4) as u64, 1, 1.0, beta, DType::F32)?;
    }
    Ok(out)
}

/// Convolution backward: (gx, gw `[o, c·kh·kw]`, gb).
pub fn conv2d_bwd(
    x: &Tensor,
    w: &Tensor,
    gout: &Tensor,
    g: ConvGeom,
    n: usize,
    o: usize,
    want_b: bool,
) -> Result<(Tensor, Tensor, Option<Tensor>)> {
    let d = dev_of(x)?;
    let (x, w, gout) = (contiguous(x)?, contiguous(w)?, contiguous(gout)?);
    let (ckk, hw) = ((g.c * g.kh * g.kw) as usize, (g.ho * g.wo) as usize);
    let gx = zeros(&d, x.shape())?;
    let gw = empty(&d, &[o, ckk])?;
    let (cols, gcols) = (empty(&d, &[ckk, hw])?, empty(&d, &[ckk, hw])?);
    for i in 0..n {
        let gi = MatArg { ptr: ptr(&gout)? + (i * o * hw * 4) as u64, trans: false, ld: hw, batch_stride: 0 };
        im2col(&x, i, g, &cols)?;
        // gW += g_i [o, hw] @ colsᵀ [hw, ckk]
        let ct = MatArg { ptr: ptr(&cols)?, trans: true, ld: hw, batch_stride: 0 };
        d.gemm(o, ckk, hw, gi, ct, ptr(&gw)?, 1, 1.0, if i > 0 { 1.0 } else { 0.0 }, DType::F32)?;
        // gcols = Wᵀ [ckk, o] @ g_i [o, hw]
        let wt = MatArg { ptr: ptr(&w)?, trans: true, ld: ckk, batch_stride: 0 };
        d.gemm(ckk, hw, o, wt, gi, ptr(&gcols)?, 1, 1.0, 0.0, DType::F32)?;
        col2im(&gcols, i, g, &gx)?;
    }
    let gb = if want_b { Some(sum_dims(&gout.reshape(&[n, o, hw])?, &[0, 2])?.reshape(&[o])?) } else { None };
    Ok((gx, gw, gb))
}

/// im2col of sample `i` of packed x `[n, c, h, w]` into `cols [c·kh·kw, ho·wo]`.
pub(crate) fn im2col(x: &Tensor, i: usize, g: ConvGeom, cols: &Tensor) -> Result<()> {
    let d = dev_of(x)?;
    let per = (g.c * g.h * g.w) as usize;
    let n = (g.c * g.kh * g.kw * g.ho * g.wo) as usize;
    // im2col_f32(const float* x, float* cols, ConvGeom g)
    launch!(d, "conv", "im2col_f32", grid(n); ptr(x)? + (i * per * 4) as u64, ptr(cols)?, g)
}

/// col2im (adds) of `cols` into sample `i` of packed gx `[n, c, h, w]`.
pub(crate) fn col2im(cols: &Tensor, i: usize, g: ConvGeom, gx: &Tensor) -> Result<()> {
    let d = dev_of(cols)?;
    let per = (g.c * g.h * g.w) as usize;
    // col2im_f32(const float* cols, float* x, ConvGeom g)
    launch!(d, "conv", "col2im_f32", grid(per); ptr(cols)?, ptr(gx)? + (i * per * 4) as u64, g)
}
