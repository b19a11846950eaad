//! 2-D convolution as im2col + gemm (per sample; columns are rebuilt in backward rather than
//! kept, trading a cheap copy for batch×C·k²×HW floats of memory).

use crate::autograd::Var;
use crate::error::{Error, Result};
use crate::kernels::cpu::matmul::{gemm_into, parallelism, MatRef};
use crate::tensor::{Elem, Tensor};
use crate::with_float;

#[derive(Clone, Copy)]
struct Geom {
    c: usize,
    h: usize,
    w: usize,
    kh: usize,
    kw: usize,
    stride: usize,
    pad: usize,
    ho: usize,
    wo: usize,
}

fn im2col<T: Elem>(x: &[T], g: Geom, cols: &mut [T]) {
    let hw = g.ho * g.wo;
    for c in 0..g.c {
        for ki in 0..g.kh {
            for kj in 0..g.kw {
                let row = &mut cols[((c * g.kh + ki) * g.kw + kj) * hw..][..hw];
                for oy in 0..g.ho {
                    let iy = (oy * g.stride + ki) as isize - g.pad as isize;
                    let dst = &mut row[oy * g.wo..(oy + 1) * g.wo];
                    if iy < 0 || iy >= g.h as isize {
                        dst.fill(T::zero());
                        continue;
                    }
                    let src = &x[(c * g.h + iy as usize) * g.w..][..g.w];
                    for ox in 0..g.wo {
                        let ix = (ox * g.stride + kj) as isize - g.pad as isize;
                        dst[ox] = if ix < 0 || ix >= g.w as isize { T::zero() } else { src[ix as usize] };
                    }
                }
            }
        }
    }
}

fn col2im<T: Elem>(cols: &[T], g: Geom, x: &mut [T]) {
    let hw = g.ho * g.wo;
    for c in 0..g.c {
        for ki in 0..g.kh {
            for kj in 0..g.kw {
                let row = &cols[((c * g.kh + ki) * g.kw + kj) * hw..][..hw];
                for oy in 0..g.ho {
                    let iy = (oy * g.stride + ki) as isize - g.pad as isize;
                    if iy < 0 || iy >= g.h as isize {
                        continue;
                    }
                    let dst = &mut x[(c * g.h + iy as usize) * g.w..][..g.w];
                    for ox in 0..g.wo {
                        let ix = (ox * g.stride + kj) as isize - g.pad as isize;
                        if ix >= 0 && ix < g.w as isize {
                            dst[ix as usize] += row[oy * g.wo + ox];
                        }
                    }
                }
            }
        }
    }
}

#[cfg(feature = "cuda")]
fn cuda_geom(g: Geom) -> crate::kernels::cuda::ops::ConvGeom {
    crate::kernels::cuda::ops::ConvGeom {
        c: g.c as i64,
        h: g.h as i64,
        w: g.w as i64,
        kh: g.kh as i64,
        kw: g.kw as i64,
        stride: g.stride as i64,
        pad: g.pad as i64,
        ho: g.ho as i64,
        wo: g.wo as i64,
    }
}

/// Forward on the input's device: `[n, o, ho, wo]`.
fn device_forward(xv: &Tensor, wv: &Tensor, bv: Option<&Tensor>, g: Geom, n: usize, o: usize) -> Result<Tensor> {
    let (ckk, hw, ho, wo) = (g.c * g.kh * g.kw, g.ho * g.wo, g.ho, g.wo);
    crate::on_cuda!(xv => gpu::conv2d(xv, &wv.reshape(&[o, ckk])?, bv, cuda_geom(g), n, o));
    with_float!(xv.dtype(), "conv2d", T => {
        let (xd, wd) = (xv.data::<T>()?, wv.data::<T>()?);
        let bd = match bv { Some(b) => Some(b.data::<T>()?), None => None };
        let mut cols = T::pool().take(ckk * hw);
        let t = Tensor::build::<T>(&[n, o, ho, wo], |out| {
            for i in 0..n {
                im2col(&xd[i * g.c * g.h * g.w..(i + 1) * g.c * g.h * g.w], g, &mut cols);
                let dst = &mut out[i * o * hw..(i + 1) * o * hw];
                if let Some(bd) = bd {
                    for (oc, row) in dst.chunks_mut(hw).enumerate() { row.fill(bd[oc]); }
                }
                gemm_into(o, hw, ckk, dst, hw, MatRef { data: wd, off: 0, rs: ckk as isize, cs: 1 }, MatRef { data: &cols, off: 0, rs: hw as isize, cs: 1 }, bd.is_some(), T::one(), parallelism());
            }
        });
        T::pool().give(cols);
        Ok(t)
    })
}

/// Backward on the saved tensors' device: gradients of (input, weight, bias when `has_b`).
fn device_backward(xv: &Tensor, wv: &Tensor, gout: &Tensor, g: Geom, n: usize, o: usize, has_b: bool) -> Result<Vec<Option<Tensor>>> {
    let (xs, ws) = (xv.shape().to_vec(), wv.shape().to_vec());
    let (ckk, hw) = (g.c * g.kh * g.kw, g.ho * g.wo);
    #[cfg(feature = "cuda")]
    if xv.is_cuda() {
        let (gx, gw, gb) = crate::kernels::cuda::ops::conv2d_bwd(xv, &wv.reshape(&[o, ckk])?, gout, cuda_geom(g), n, o, has_b)?;
        let mut v = vec![Some(gx), Some(gw.reshape(&ws)?)];
        if has_b {
            v.push(gb);
        }
        return Ok(v);
    }
    with_float!(gout.dtype(), "conv2d", T => {
        let gout = gout.contiguous();
        let gd = gout.data::<T>()?;
        let (xd, wd) = (xv.data::<T>()?, wv.data::<T>()?);
        let mut cols = T::pool().take(ckk * hw);
        let mut gcols = T::pool().take(ckk * hw);
        let mut gw = T::pool().take(o * ckk);
        let mut gx = T::pool().take(n * g.c * g.h * g.w);
        gx.fill(T::zero());
        let chw = g.c * g.h * g.w;
        for i in 0..n {
            let gi = &gd[i * o * hw..(i + 1) * o * hw];
            im2col(&xd[i * chw..(i + 1) * chw], g, &mut cols);
            // gW += g_i [o, hw] @ colsᵀ [hw, ckk]
            gemm_into(o, ckk, hw, &mut gw, ckk, MatRef { data: gi, off: 0, rs: hw as isize, cs: 1 }, MatRef { data: &cols, off: 0, rs: 1, cs: hw as isize }, i > 0, T::one(), parallelism());
            // gcols = Wᵀ [ckk, o] @ g_i [o, hw]
            gemm_into(ckk, hw, o, &mut gcols, hw, MatRef { data: wd, off: 0, rs: 1, cs: ckk as isize }, MatRef { data: gi, off: 0, rs: hw as isize, cs: 1 }, false, T::one(), parallelism());
            col2im(&gcols, g, &mut gx[i * chw..(i + 1) * chw]);
        }
        T::pool().give(cols);
        T::pool().give(gcols);
        let mut grads = vec![Some(Tensor::from_vec(gx, &xs)?), Some(Tensor::from_vec(gw, &ws)?)];
        if has_b {
            let mut gb = vec![T::zero(); o];
            for i in 0..n {
                for (oc, row) in gd[i * o * hw..(i + 1) * o * hw].chunks(hw).enumerate() {
                    gb[oc] += crate::kernels::cpu::reduce::sum_slice(row);
                }
            }
            grads.push(Some(Tensor::from_vec(gb, &[o])?));
        }
        Ok(grads)
    })
}

impl<'t> Var<'t> {
    /// `self [N, C, H, W]` convolved with `weight [O, C, KH, KW]` (+ `bias [O]`).
    pub fn conv2d(self, weight: Var<'t>, bias: Option<Var<'t>>, stride: usize, pad: usize) -> Result<Var<'t>> {
        let (xv, wv) = (self.value().try_contiguous()?, weight.value().try_contiguous()?);
        let (xs, ws) = (xv.shape().to_vec(), wv.shape().to_vec());
        if xs.len() != 4 || ws.len() != 4 || xs[1] != ws[1] || stride == 0 || xs[2] + 2 * pad < ws[2] || xs[3] + 2 * pad < ws[3] {
            return Err(Error::shape("conv2d", format!("input {xs:?}, weight {ws:?}, stride {stride}, pad {pad}")));
        }
        let (n, o) = (xs[0], ws[0]);
        let ho = (xs[2] + 2 * pad - ws[2]) / stride + 1;
        let wo = (xs[3] + 2 * pad - ws[3]) / stride + 1;
        let g = Geom { c: xs[1], h: xs[2], w: xs[3], kh: ws[2], kw: ws[3], stride, pad, ho, wo };
        let bv = bias.map(|b| b.value().try_contiguous()).transpose()?;
        let out = device_forward(&xv, &wv, bv.as_ref(), g, n, o)?;
        let has_b = bias.is_some();
        let mut inputs = vec![self, weight];
        inputs.extend(bias);
        Ok(self.tape().record("conv2d", out, &inputs, move |gout| device_backward(&xv, &wv, gout, g, n, o, has_b)))
    }
}
