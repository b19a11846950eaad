//! Reductions over one dim of a packed tensor viewed as `[outer, r, inner]`, vectorised along
//! the contiguous axis and threaded over independent outputs. Sums over several dims reduce one
//! dim at a time; broadcast backward (`sum_to_shape`) is built from these.

use crate::error::{Error, Result};
use crate::tensor::{Elem, Tensor};
use rayon::prelude::*;

/// Sum over dim `dim`, keeping it as size 1.
pub fn sum_dim<T: Elem>(x: &Tensor, dim: usize) -> Result<Tensor> {
    if dim >= x.rank() {
        return Err(Error::shape("sum", format!("dim {dim} for shape {:?}", x.shape())));
    }
    let x = x.contiguous();
    let xs = x.data::<T>()?;
    let sh = x.shape();
    let outer: usize = sh[..dim].iter().product();
    let r = sh[dim];
    let inner: usize = sh[dim + 1..].iter().product();
    let mut out_shape = sh.to_vec();
    out_shape[dim] = 1;
    let threads = rayon::current_num_threads();
    Ok(Tensor::build::<T>(&out_shape, |o| {
        if inner == 1 {
            // Row sums: each output reads one contiguous row.
            let f = |(o, row): (&mut T, &[T])| *o = sum_slice(row);
            if outer * r >= super::PAR_CHUNK && threads > 1 {
                o.par_iter_mut().zip(xs.par_chunks(r.max(1))).for_each(f);
            } else {
                o.iter_mut().zip(xs.chunks(r.max(1))).for_each(f);
            }
            return;
        }
        let col = |o: &mut [T], block: &[T], lo: usize| {
            // o[i] = sum_j block[j*inner + lo + i]: rows added in order, vectorised along i.
            o.fill(T::zero());
            for j in 0..r {
                let row = &block[j * inner + lo..j * inner + lo + o.len()];
                for (a, &b) in o.iter_mut().zip(row) {
                    *a += b;
                }
            }
        };
        if outer * r * inner >= super::PAR_CHUNK && threads > 1 {
            if outer >= threads {
                o.par_chunks_mut(inner).zip(xs.par_chunks(r * inner)).for_each(|(o, b)| col(o, b, 0));
            } else {
                // Few outer blocks (bias gradients): split the contiguous axis instead.
                let step = inner.div_ceil(threads).max(256);
                for (ob, block) in o.chunks_mut(inner).zip(xs.chunks(r * inner)) {
                    ob.par_chunks_mut(step).enumerate().for_each(|(c, o)| col(o, block, c * step));
                }
            }
        } else {
            for (ob, block) in o.chunks_mut(inner).zip(xs.chunks(r * inner)) {
                col(ob, block, 0);
            }
        }
    }))
}

/// Pairwise-blocked sum with 8 independent accumulators (vectorises; better rounding than a
/// single running sum).
#[inline]
pub fn sum_slice<T: Elem>(x: &[T]) -> T {
    let mut acc = [T::zero(); 8];
    let chunks = x.chunks_exact(8);
    let rem = chunks.remainder();
    for c in chunks {
        for i in 0..8 {
            acc[i] += c[i];
        }
    }
    let mut s = T::zero();
    for r in rem {
        s += *r;
    }
    (acc[0] + acc[4]) + (acc[1] + acc[5]) + (acc[2] + acc[6]) + (acc[3] + acc[7]) + s
}

/// Dot product with 8 accumulators.
#[inline]
pub fn dot<T: Elem>(a: &[T], b: &[T]) -> T {
    let mut acc = [T::zero(); 8];
    let n8 = a.len() / 8 * 8;
    for (ca, cb) in a[..n8].chunks_exact(8).zip(b[..n8].chunks_exact(8)) {
        for i in 0..8 {
            acc[i] += ca[i] * cb[i];
        }
    }
    let mut s = T::zero();
    for i in n8..a.len() {
        s += a[i] * b[i];
    }
    (acc[0] + acc[4]) + (acc[1] + acc[5]) + (acc[2] + acc[6]) + (acc[3] + acc[7]) + s
}

/// Sum over several dims (keeping them as size 1).
pub fn sum_dims<T: Elem>(x: &Tensor, dims: &[usize]) -> Result<Tensor> {
    let mut t = x.clone();
    for &d in dims {
        if t.shape()[d] != 1 {
            t = sum_dim::<T>(&t, d)?;
        }
    }
    Ok(t)
}

/// Reduces a broadcast result back to `target` (the shape of the broadcast operand), as
/// broadcast ops' backward needs.
pub fn sum_to_shape<T: Elem>(g: &Tensor, target: &[usize]) -> Result<Tensor> {
    if g.shape() == target {
        return Ok(g.clone());
    }
    let r = g.rank();
    if target.len() > r {
        return Err(Error::shape("sum_to_shape", format!("{:?} -> {:?}", g.shape(), target)));
    }
    let lead = r - target.len();
    // Fast path: target equals g's trailing dims → one reduction over the merged leading dims.
    if g.shape()[lead..] == *target {
        let rows: usize = g.shape()[..lead].iter().product();
        let inner: usize = target.iter().product();
        let g2 = g.reshape(&[rows, inner])?;
        return sum_dim::<T>(&g2, 0)?.reshape(target);
    }
    let dims: Vec<usize> = (0..r).filter(|&d| d < lead || (target[d - lead] == 1 && g.shape()[d] != 1)).collect();
    sum_dims::<T>(g, &dims)?.reshape(target)
}
