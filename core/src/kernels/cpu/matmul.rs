//! Matrix multiplication through the `gemm` crate. Operands are read through their strides, so
//! a transposed view (a weight used as Wᵀ, or Kᵀ in attention) costs no copy.

use crate::error::{Error, Result};
use crate::tensor::{Elem, Tensor};
use gemm::Parallelism;

/// gemm's parallelism for the current rayon pool.
pub fn parallelism() -> Parallelism {
    let n = rayon::current_num_threads();
    if n > 1 {
        Parallelism::Rayon(n)
    } else {
        Parallelism::None
    }
}

/// A strided matrix operand: `data[off + i*rs + j*cs]`.
#[derive(Clone, Copy)]
pub struct MatRef<'a, T> {
    pub data: &'a [T],
    pub off: usize,
    pub rs: isize,
    pub cs: isize,
}

/// `dst[m×n] (row stride dst_rs) = (accumulate ? dst : 0) + scale · lhs[m×k] · rhs[k×n]`.
///
/// Bounds: callers pass operands whose extents lie inside their slices; that is checked here,
/// once per call, before the unsafe gemm call.
pub fn gemm_into<T: Elem>(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [T],
    dst_rs: usize,
    lhs: MatRef<'_, T>,
    rhs: MatRef<'_, T>,
    accumulate: bool,
    scale: T,
    par: Parallelism,
) {
    if m == 0 || n == 0 {
        return;
    }
    assert!((m - 1) * dst_rs + n <= dst.len(), "gemm dst out of bounds");
    let extent = |r: &MatRef<'_, T>, rows: usize, cols: usize| {
        r.off as isize + (rows.max(1) as isize - 1) * r.rs + (cols.max(1) as isize - 1) * r.cs
    };
    assert!(k == 0 || (extent(&lhs, m, k) < lhs.data.len() as isize), "gemm lhs out of bounds");
    assert!(k == 0 || (extent(&rhs, k, n) < rhs.data.len() as isize), "gemm rhs out of bounds");
    if k == 0 {
        if !accumulate {
            for i in 0..m {
                dst[i * dst_rs..i * dst_rs + n].fill(T::zero());
            }
        }
        return;
    }
    // SAFETY: the asserts above keep every index gemm touches inside the three slices (all
    // strides are non-negative here); `dst` is borrowed mutably, so it cannot alias lhs/rhs.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            dst_rs as isize,
            accumulate,
            lhs.data.as_ptr().add(lhs.off),
            lhs.cs,
            lhs.rs,
            rhs.data.as_ptr().add(rhs.off),
            rhs.cs,
            rhs.rs,
            T::one(),
            scale,
            false,
            false,
            false,
            par,
        )
    }
}

/// Storage slice and offset of a tensor (any strides).
fn raw<T: Elem>(t: &Tensor) -> Result<(&[T], usize)> {
    // Irrefutable in a build without CUDA.
    #[allow(irrefutable_let_patterns)]
    let crate::tensor::Storage::Cpu(c) = t.storage() else {
        unreachable!("CPU kernel reached with a CUDA tensor: ops dispatch on the device first")
    };
    let s = T::slice(c).ok_or_else(|| Error::DType { op: "matmul", expected: T::DTYPE.to_string(), got: t.dtype().to_string() })?;
    Ok((s, t.offset()))
}

/// Leading dims of `t` (all but the last two) can be merged with the row dim into one
/// strided row index.
fn rows_mergeable(t: &Tensor) -> bool {
    let (sh, st) = (t.shape(), t.strides());
    let r = sh.len();
    (0..r - 2).all(|d| sh[d] == 1 || st[d] == st[d + 1] * sh[d + 1])
}

/// Batch dims (all but the last two) walk with one uniform stride.
fn batch_uniform(t: &Tensor) -> bool {
    let (sh, st) = (t.shape(), t.strides());
    let r = sh.len();
    r < 4 || (0..r - 3).all(|d| sh[d] == 1 || st[d] == st[d + 1] * sh[d + 1])
}

/// Matrix product with batching: `a [..., m, k] @ b [k, n]` (a's leading dims fold into rows)
/// or `a [B..., m, k] @ b [B..., k, n]` with equal batch dims. Output is packed.
pub fn matmul<T: Elem>(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    if a.rank() < 2 || b.rank() < 2 {
        return Err(Error::shape("matmul", format!("{:?} @ {:?}: operands need rank ≥ 2", a.shape(), b.shape())));
    }
    let (ra, rb) = (a.rank(), b.rank());
    let (m, k) = (a.shape()[ra - 2], a.shape()[ra - 1]);
    let (k2, n) = (b.shape()[rb - 2], b.shape()[rb - 1]);
    if k != k2 {
        return Err(Error::shape("matmul", format!("{:?} @ {:?}: inner dims differ", a.shape(), b.shape())));
    }
    let par = parallelism();
    if rb == 2 {
        let a = if rows_mergeable(a) { a.clone() } else { a.contiguous() };
        let rows: usize = a.shape()[..ra - 1].iter().product();
        let mut out_shape = a.shape()[..ra - 1].to_vec();
        out_shape.push(n);
        let (ad, aoff) = raw::<T>(&a)?;
        let (bd, boff) = raw::<T>(b)?;
        let (ars, acs) = (a.strides()[ra - 2] as isize, a.strides()[ra - 1] as isize);
        let (brs, bcs) = (b.strides()[0] as isize, b.strides()[1] as isize);
        return Ok(Tensor::build::<T>(&out_shape, |o| {
            gemm_into(
                rows,
                n,
                k,
                o,
                n,
                MatRef { data: ad, off: aoff, rs: ars, cs: acs },
                MatRef { data: bd, off: boff, rs: brs, cs: bcs },
                false,
                T::one(),
                par,
            )
        }));
    }
    if a.shape()[..ra - 2] != b.shape()[..rb - 2] {
        return Err(Error::shape("matmul", format!("{:?} @ {:?}: batch dims differ", a.shape(), b.shape())));
    }
    let batch: usize = a.shape()[..ra - 2].iter().product();
    let mut out_shape = a.shape()[..ra - 2].to_vec();
    out_shape.extend([m, n]);
    // Batch dims are walked through a packed copy's strides only when they are not uniform.
    let a = if batch_uniform(a) { a.clone() } else { a.contiguous() };
    let b = if batch_uniform(b) { b.clone() } else { b.contiguous() };
    let (ad, aoff) = raw::<T>(&a)?;
    let (bd, boff) = raw::<T>(&b)?;
    let a_bs = if ra > 2 { a.strides()[ra - 3] } else { 0 };
    let b_bs = if rb > 2 { b.strides()[rb - 3] } else { 0 };
    let (ars, acs) = (a.strides()[ra - 2] as isize, a.strides()[ra - 1] as isize);
    let (brs, bcs) = (b.strides()[rb - 2] as isize, b.strides()[rb - 1] as isize);
    Ok(Tensor::build::<T>(&out_shape, |o| {
        for i in 0..batch {
            gemm_into(
                m,
                n,
                k,
                &mut o[i * m * n..(i + 1) * m * n],
                n,
                MatRef { data: ad, off: aoff + i * a_bs, rs: ars, cs: acs },
                MatRef { data: bd, off: boff + i * b_bs, rs: brs, cs: bcs },
                false,
                T::one(),
                par,
            );
        }
    }))
}
