//! Dense linear algebra for preconditioners (SOAP's eigenbases in `dptrain-optim`): the
//! eigenvectors of a symmetric matrix and the Q of a QR factorisation, both in f64 whatever the
//! tensors' dtype — on the host through faer, sequentially (the same input gives the same bits
//! on every rank, whatever the thread count), and where the tensor lives on a GPU through
//! cuSOLVER (`syevd`, `geqrf` + `orgqr`). A refresh of GPT-124M's 99 factors takes about two
//! minutes of one host core (README "SOAP"); on the GPU the statistics never leave it.
//!
//! The CUDA path widens and transposes the row-major f32 matrix into a column-major f64 one
//! (taking its columns in the order asked), runs cuSOLVER there, and rounds and transposes back
//! (`kernels/cuda/linalg.cu`). On the CUDA emulator the host functions below stand in for
//! cuSOLVER on those column-major buffers, so the conversions are tested as a GPU runs them.
//!
//! Eigenvectors and Q are unique only up to each column's sign (and, for a repeated
//! eigenvalue, up to a rotation within its eigenspace): faer and cuSOLVER may choose
//! differently. SOAP's update does not depend on the signs, and gpu-check compares the two
//! column by column after aligning them.

use crate::error::{Error, Result};
use crate::tensor::Tensor;
use faer::{Mat, MatRef, Par};

/// The eigenvectors (columns, by ascending eigenvalue, as LAPACK's `syevd` orders them) and
/// eigenvalues of the symmetric `a`, its lower triangle read (faer).
pub fn sym_eigen(a: MatRef<'_, f64>) -> Result<(Mat<f64>, Vec<f64>)> {
    let evd = a.self_adjoint_eigen(faer::Side::Lower).map_err(|e| Error::Msg(format!("eigendecomposition failed: {e:?}")))?;
    let values = evd.S().column_vector().iter().copied().collect();
    Ok((evd.U().to_owned(), values))
}

/// The Q of a square matrix's Householder QR (faer's blocked QR, sequential). Q is formed from
/// the identity applying the blocks last to first, each only to the trailing rows and columns
/// it can change (the rest is still the identity's): about a third less work than faer's
/// `compute_Q`, which applies every block to all columns, and the same values.
pub fn qr_q(mut a: Mat<f64>) -> Mat<f64> {
    use faer::dyn_stack::{MemBuffer, MemStack};
    use faer::linalg::householder::{
        apply_block_householder_on_the_left_in_place_scratch, apply_block_householder_on_the_left_in_place_with_conj,
    };
    use faer::linalg::qr::no_pivoting::factor::{qr_in_place, qr_in_place_scratch, recommended_block_size};
    let d = a.nrows();
    let bs = recommended_block_size::<f64>(d, d);
    let mut coeff = Mat::<f64>::zeros(bs, d);
    let mut buf = MemBuffer::new(
        qr_in_place_scratch::<f64>(d, d, bs, Par::Seq, Default::default())
            .or(apply_block_householder_on_the_left_in_place_scratch::<f64>(d, bs, d)),
    );
    qr_in_place(a.as_mut(), coeff.as_mut(), Par::Seq, MemStack::new(&mut buf), Default::default());
    let mut q = Mat::<f64>::identity(d, d);
    // Blocks of `bs` columns, the last one possibly shorter.
    let mut j = d;
    let mut b = if d.is_multiple_of(bs) { bs } else { d % bs };
    while j > 0 {
        let start = j - b;
        apply_block_householder_on_the_left_in_place_with_conj(
            a.as_ref().get(start.., start..j),
            coeff.as_ref().get(.., start..j).subrows(0, j - start),
            faer::Conj::No,
            q.as_mut().get_mut(start.., start..),
            Par::Seq,
            MemStack::new(&mut buf),
        );
        j = start;
        b = bs;
    }
    q
}

/// The side of a square f32 matrix (`op` names the caller in the error).
fn side(op: &'static str, a: &Tensor) -> Result<usize> {
    match a.shape() {
        [r, c] if r == c && a.dtype() == crate::tensor::DType::F32 => Ok(*r),
        s => Err(Error::shape(op, format!("a square f32 matrix, got {s:?} ({})", a.dtype()))),
    }
}

/// `a` (row-major f32 [n, n]) as f64, its columns in the order `cols` (all, in order, when None).
fn widened(a: &Tensor, n: usize, cols: Option<&[usize]>) -> Result<Mat<f64>> {
    let x = a.to_vec::<f32>()?;
    Ok(Mat::from_fn(n, n, |i, j| x[i * n + cols.map_or(j, |c| c[j])] as f64))
}

/// A column order of `n` columns: each index once.
fn check_order(op: &'static str, cols: &[usize], n: usize) -> Result<()> {
    let mut seen = vec![false; n];
    for &c in cols {
        if c >= n || std::mem::replace(&mut seen[c], true) {
            return Err(Error::shape(op, format!("a permutation of 0..{n}, got {cols:?}")));
        }
    }
    if cols.len() != n {
        return Err(Error::shape(op, format!("{n} column indices, got {}", cols.len())));
    }
    Ok(())
}

/// The eigenvectors of the symmetric f32 [n, n] `a` + `shift`·I (its lower triangle read), by
/// descending eigenvalue, as the columns of an f32 [n, n] on `a`'s device — computed in f64,
/// on a GPU by cuSOLVER where [`solver_on`], else on the host.
pub fn eigh_desc(a: &Tensor, shift: f64) -> Result<Tensor> {
    let n = side("eigh_desc", a)?;
    #[cfg(feature = "cuda")]
    if a.is_cuda() && solver_on(a) {
        return crate::kernels::cuda::ops::eigh_desc(a, n, shift);
    }
    let mut m = widened(a, n, None)?;
    for i in 0..n {
        m[(i, i)] += shift;
    }
    let (u, _) = sym_eigen(m.as_ref())?;
    Tensor::from_vec((0..n * n).map(|k| u[(k / n, n - 1 - k % n)] as f32).collect(), &[n, n])?.to_device(a.device())
}

/// The Q of the QR factorisation of the f32 [n, n] `a` with its columns taken in the order
/// `cols` (a permutation of 0..n), as an f32 [n, n] on `a`'s device — computed in f64, on a GPU
/// by cuSOLVER where [`solver_on`], else on the host.
pub fn qr_q_of_columns(a: &Tensor, cols: &[usize]) -> Result<Tensor> {
    let n = side("qr_q_of_columns", a)?;
    check_order("qr_q_of_columns", cols, n)?;
    #[cfg(feature = "cuda")]
    if a.is_cuda() && solver_on(a) {
        return crate::kernels::cuda::ops::qr_q_of_columns(a, n, cols);
    }
    let q = qr_q(widened(a, n, Some(cols))?);
    Tensor::from_vec((0..n * n).map(|k| q[(k / n, k % n)] as f32).collect(), &[n, n])?.to_device(a.device())
}

/// diag(aᵀ·b) of two f32 [n, n] on one device, read to the host: for each column j,
/// Σ_i a[i, j]·b[i, j] with each product rounded and the sum taken over i in order from -0.0 (the
/// same bits on either device). Waits for the device.
pub fn column_dots(a: &Tensor, b: &Tensor) -> Result<Vec<f32>> {
    let n = side("column_dots", a)?;
    if b.shape() != a.shape() || b.dtype() != a.dtype() {
        return Err(Error::shape("column_dots", format!("two matrices of one shape, got {:?} and {:?}", a.shape(), b.shape())));
    }
    crate::on_cuda!(a => gpu::column_dots(a, b, n));
    let (x, y) = (a.to_vec::<f32>()?, b.to_vec::<f32>()?);
    let mut out = vec![-0.0f32; n];
    for i in 0..n {
        for ((o, &p), &q) in out.iter_mut().zip(&x[i * n..(i + 1) * n]).zip(&y[i * n..(i + 1) * n]) {
            *o += p * q;
        }
    }
    Ok(out)
}

/// Whether [`eigh_desc`] and [`qr_q_of_columns`] of a tensor on `t`'s device compute there:
/// always on the host; on a GPU when cuSOLVER loads and `DPTRAIN_SOLVER=0` did not turn it off
/// (else they go through the host, one matrix at a time).
pub fn solver_on(t: &Tensor) -> bool {
    #[cfg(feature = "cuda")]
    if let crate::tensor::Storage::Cuda(c) = t.storage() {
        return c.dev().has_solver();
    }
    let _ = t;
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qr_q_is_faers_q() {
        // Sizes below, at and off multiples of faer's block size.
        for d in [1usize, 5, 32, 37, 100, 130] {
            let a = Mat::<f64>::from_fn(d, d, |i, j| ((i * 31 + j * 17) % 97) as f64 / 97.0 - 0.4 + if i == j { 0.5 } else { 0.0 });
            let want = a.as_ref().qr().compute_Q();
            let got = qr_q(a);
            for i in 0..d {
                for j in 0..d {
                    assert!((got[(i, j)] - want[(i, j)]).abs() < 1e-12, "d={d} ({i}, {j}): {} vs {}", got[(i, j)], want[(i, j)]);
                }
            }
        }
    }

    fn matrix(n: usize, seed: u64) -> Vec<f32> {
        let mut r = crate::rng::Rng::new(seed);
        (0..n * n).map(|_| r.normal() as f32).collect()
    }

    /// On the host, the tensor functions are what they say: eigenvectors by descending
    /// eigenvalue (A·q_j = λ_j·q_j, λ falling), the Q of the re-ordered columns (orthonormal,
    /// and Qᵀ·A[:, cols] upper triangular), and the column dots as summed in order.
    #[test]
    fn host_eigh_qr_and_column_dots_do_what_they_say() {
        let n = 9;
        let x = matrix(n, 3);
        // A symmetric matrix: X + Xᵀ.
        let a: Vec<f32> = (0..n * n).map(|k| x[k] + x[(k % n) * n + k / n]).collect();
        let q = eigh_desc(&Tensor::from_vec(a.clone(), &[n, n]).unwrap(), 0.0).unwrap().to_vec::<f32>().unwrap();
        let mut last = f64::INFINITY;
        for j in 0..n {
            let col: Vec<f64> = (0..n).map(|i| q[i * n + j] as f64).collect();
            let av: Vec<f64> = (0..n).map(|i| (0..n).map(|l| a[i * n + l] as f64 * col[l]).sum()).collect();
            let lambda: f64 = av.iter().zip(&col).map(|(p, c)| p * c).sum();
            assert!(lambda <= last + 1e-6, "eigenvalue {j} ({lambda}) above the one before ({last})");
            last = lambda;
            for i in 0..n {
                assert!((av[i] - lambda * col[i]).abs() < 1e-4, "column {j} is not an eigenvector");
            }
        }
        let b = matrix(n, 4);
        let cols: Vec<usize> = (0..n).rev().collect();
        let qr = qr_q_of_columns(&Tensor::from_vec(b.clone(), &[n, n]).unwrap(), &cols).unwrap().to_vec::<f32>().unwrap();
        for i in 0..n {
            for j in 0..n {
                let qtq: f64 = (0..n).map(|l| qr[l * n + i] as f64 * qr[l * n + j] as f64).sum();
                assert!((qtq - if i == j { 1.0 } else { 0.0 }).abs() < 1e-5, "Q is not orthonormal at ({i}, {j})");
                // R = Qᵀ·B[:, cols] is upper triangular.
                let r: f64 = (0..n).map(|l| qr[l * n + i] as f64 * b[l * n + cols[j]] as f64).sum();
                assert!(i <= j || r.abs() < 1e-4, "R({i}, {j}) = {r} below the diagonal");
            }
        }
        let dots = column_dots(&Tensor::from_vec(a.clone(), &[n, n]).unwrap(), &Tensor::from_vec(b.clone(), &[n, n]).unwrap()).unwrap();
        for j in 0..n {
            let want = (0..n).fold(-0.0f32, |s, i| s + a[i * n + j] * b[i * n + j]);
            assert_eq!(dots[j].to_bits(), want.to_bits());
        }
        assert!(qr_q_of_columns(&Tensor::from_vec(b, &[n, n]).unwrap(), &[0, 0, 1, 2, 3, 4, 5, 6, 7]).is_err());
        assert!(eigh_desc(&Tensor::from_vec(vec![0.0f32; 6], &[2, 3]).unwrap(), 0.0).is_err());
    }
}
