//! CPU kernels: gemm-crate matmul (transposes as strides, no copies), rayon-threaded elementwise
//! maps and reductions over packed buffers. Written once, generically over [`Elem`] (f32 for
//! training, f64 for gradient checks).

pub mod matmul;
pub mod reduce;

use crate::error::{Error, Result};
use crate::tensor::{Elem, Tensor};
use rayon::prelude::*;

/// Elementwise loops split into chunks of this many elements across rayon threads; below it
/// the work stays on the calling thread (threading a small loop costs more than it saves).
pub const PAR_CHUNK: usize = 1 << 15;

/// `out[i] = f(x[i])` over a packed buffer, threaded for large buffers.
pub fn map_slice<T: Elem>(x: &[T], out: &mut [T], f: impl Fn(T) -> T + Sync) {
    if x.len() >= 2 * PAR_CHUNK && rayon::current_num_threads() > 1 {
        out.par_chunks_mut(PAR_CHUNK).zip(x.par_chunks(PAR_CHUNK)).for_each(|(o, i)| {
            for (o, &i) in o.iter_mut().zip(i) {
                *o = f(i);
            }
        });
    } else {
        for (o, &i) in out.iter_mut().zip(x) {
            *o = f(i);
        }
    }
}

/// `out[i] = f(a[i], b[i])`, threaded for large buffers.
pub fn zip_slice<T: Elem>(a: &[T], b: &[T], out: &mut [T], f: impl Fn(T, T) -> T + Sync) {
    if a.len() >= 2 * PAR_CHUNK && rayon::current_num_threads() > 1 {
        out.par_chunks_mut(PAR_CHUNK).zip(a.par_chunks(PAR_CHUNK).zip(b.par_chunks(PAR_CHUNK))).for_each(|(o, (a, b))| {
            for ((o, &a), &b) in o.iter_mut().zip(a).zip(b) {
                *o = f(a, b);
            }
        });
    } else {
        for ((o, &a), &b) in out.iter_mut().zip(a).zip(b) {
            *o = f(a, b);
        }
    }
}

/// `acc[i] += x[i]`.
pub fn add_assign<T: Elem>(acc: &mut [T], x: &[T]) {
    if acc.len() >= 2 * PAR_CHUNK && rayon::current_num_threads() > 1 {
        acc.par_chunks_mut(PAR_CHUNK).zip(x.par_chunks(PAR_CHUNK)).for_each(|(a, x)| {
            for (a, &x) in a.iter_mut().zip(x) {
                *a += x;
            }
        });
    } else {
        for (a, &x) in acc.iter_mut().zip(x) {
            *a += x;
        }
    }
}

/// Unary elementwise op producing a new packed tensor.
pub fn map<T: Elem>(x: &Tensor, f: impl Fn(T) -> T + Sync) -> Result<Tensor> {
    let x = x.contiguous();
    let xs = x.data::<T>()?;
    Ok(Tensor::build::<T>(x.shape(), |o| map_slice(xs, o, f)))
}

/// Binary elementwise op of two same-shape tensors.
pub fn zip<T: Elem>(a: &Tensor, b: &Tensor, f: impl Fn(T, T) -> T + Sync) -> Result<Tensor> {
    if a.shape() != b.shape() {
        return Err(Error::shape("zip", format!("{:?} vs {:?}", a.shape(), b.shape())));
    }
    let (a, b) = (a.contiguous(), b.contiguous());
    let (xa, xb) = (a.data::<T>()?, b.data::<T>()?);
    Ok(Tensor::build::<T>(a.shape(), |o| zip_slice(xa, xb, o, f)))
}

/// NumPy broadcasting of two shapes.
pub fn broadcast_shape(a: &[usize], b: &[usize]) -> Result<Vec<usize>> {
    let r = a.len().max(b.len());
    let mut out = vec![0; r];
    for i in 0..r {
        let da = if i + a.len() >= r { a[i + a.len() - r] } else { 1 };
        let db = if i + b.len() >= r { b[i + b.len() - r] } else { 1 };
        out[i] = if da == db || db == 1 {
            da
        } else if da == 1 {
            db
        } else {
            return Err(Error::shape("broadcast", format!("{a:?} and {b:?}")));
        };
    }
    Ok(out)
}

/// Is `small` (left-padded) equal to the trailing dims of `big` with only leading 1s?
/// Then `small` repeats every `small.numel()` elements of `big` (bias-add pattern).
fn is_suffix(big: &[usize], small: &[usize]) -> bool {
    let s: Vec<usize> = small.iter().copied().skip_while(|&d| d == 1).collect();
    s.len() <= big.len() && big[big.len() - s.len()..] == s[..]
}

/// Binary op with NumPy broadcasting.
pub fn broadcast_zip<T: Elem>(a: &Tensor, b: &Tensor, f: impl Fn(T, T) -> T + Sync) -> Result<Tensor> {
    if a.shape() == b.shape() {
        return zip(a, b, f);
    }
    let out_shape = broadcast_shape(a.shape(), b.shape())?;
    let (a, b) = (a.contiguous(), b.contiguous());
    let (xa, xb) = (a.data::<T>()?, b.data::<T>()?);
    let n: usize = out_shape.iter().product();
    if a.shape() == &out_shape[..] && is_suffix(&out_shape, b.shape()) {
        let nb = xb.len().max(1);
        return Ok(Tensor::build::<T>(&out_shape, |o| {
            o.par_chunks_mut(nb * (PAR_CHUNK / nb).max(1)).zip(xa.par_chunks(nb * (PAR_CHUNK / nb).max(1))).for_each(|(o, a)| {
                for (o, a) in o.chunks_mut(nb).zip(a.chunks(nb)) {
                    for ((o, &a), &b) in o.iter_mut().zip(a).zip(xb) {
                        *o = f(a, b);
                    }
                }
            })
        }));
    }
    if b.shape() == &out_shape[..] && is_suffix(&out_shape, a.shape()) {
        let na = xa.len().max(1);
        return Ok(Tensor::build::<T>(&out_shape, |o| {
            for (o, b) in o.chunks_mut(na).zip(xb.chunks(na)) {
                for ((o, &b), &a) in o.iter_mut().zip(b).zip(xa) {
                    *o = f(a, b);
                }
            }
        }));
    }
    // General case: walk the output index, with stride 0 on broadcast dims.
    let r = out_shape.len();
    let bstrides = |s: &[usize]| -> Vec<usize> {
        let cs = crate::tensor::contiguous_strides(s);
        (0..r).map(|i| if i + s.len() < r || s[i + s.len() - r] == 1 { 0 } else { cs[i + s.len() - r] }).collect()
    };
    let (sa, sb) = (bstrides(a.shape()), bstrides(b.shape()));
    Ok(Tensor::build::<T>(&out_shape, |o| {
        let mut idx = vec![0usize; r];
        for k in 0..n {
            let (mut ia, mut ib) = (0, 0);
            for d in 0..r {
                ia += idx[d] * sa[d];
                ib += idx[d] * sb[d];
            }
            o[k] = f(xa[ia], xb[ib]);
            for d in (0..r).rev() {
                idx[d] += 1;
                if idx[d] < out_shape[d] {
                    break;
                }
                idx[d] = 0;
            }
        }
    }))
}
