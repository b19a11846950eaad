//! `ops::linalg` on a GPU: the row-major f32 matrix widened into a column-major f64 one
//! (`linalg.cu`), factored there by cuSOLVER (or the emulator's stand-in), and rounded back.
//! Each call reads cuSOLVER's status, so it waits for the device: these run at SOAP's basis
//! refreshes, between training steps, never inside a captured step.

use super::*;

/// A column-major f64 copy of the row-major f32 [n, n] `a`, its columns in the order `cols`
/// (in order when None), `shift` added to its diagonal.
fn widened(d: &Arc<CudaDev>, a: &Tensor, n: usize, cols: Option<&[usize]>, shift: f64) -> Result<DevBuf> {
    f32_only(a, "linalg")?;
    let a = contiguous(a)?;
    let out = d.alloc(n * n * 8)?;
    let ids = cols.map(|c| d.upload(&c.iter().map(|&i| i as u32).collect::<Vec<u32>>())).transpose()?;
    // linalg_f64_cols(double* out, const float* a, const unsigned* cols, i64 n, double shift)
    launch!(d, "linalg", "linalg_f64_cols", grid(n * n); out.ptr, ptr(&a)?, ids.as_ref().map_or(0, |b| b.ptr), n as i64, shift)?;
    Ok(out)
}

/// The column-major f64 `n × n` at `q` as a row-major f32 [n, n], its columns reversed when
/// `reverse`.
fn rounded(d: &Arc<CudaDev>, q: &DevBuf, n: usize, reverse: bool) -> Result<Tensor> {
    let out = empty(d, &[n, n])?;
    // linalg_f32_rows(float* out, const double* q, i64 n, int reverse)
    launch!(d, "linalg", "linalg_f32_rows", grid(n * n); ptr(&out)?, q.ptr, n as i64, reverse as i32)?;
    Ok(out)
}

/// cuSOLVER's status (an i32 on the device) as an error naming `what`.
fn check(d: &CudaDev, info: &DevBuf, what: &str) -> Result<()> {
    match d.download::<i32>(info.ptr, 1)?[0] {
        0 => Ok(()),
        s => Err(Error::Device(format!("{what} failed (cuSOLVER info {s})"))),
    }
}

/// `ops::linalg::eigh_desc` on the device: `syevd` orders by ascending eigenvalue, the way
/// back reverses the columns.
pub fn eigh_desc(a: &Tensor, n: usize, shift: f64) -> Result<Tensor> {
    let d = dev_of(a)?;
    let m = widened(&d, a, n, None, shift)?;
    let (w, info) = (d.alloc(n * 8)?, d.alloc(4)?);
    // SAFETY: `m` holds n² f64, `w` n f64 and `info` one i32, all on `d`.
    unsafe { d.sym_eigen_f64(m.ptr, n, w.ptr, info.ptr)? };
    check(&d, &info, "the eigendecomposition")?;
    rounded(&d, &m, n, true)
}

/// `ops::linalg::qr_q_of_columns` on the device.
pub fn qr_q_of_columns(a: &Tensor, n: usize, cols: &[usize]) -> Result<Tensor> {
    let d = dev_of(a)?;
    let m = widened(&d, a, n, Some(cols), 0.0)?;
    let (tau, info) = (d.alloc(n * 8)?, d.alloc(4)?);
    // SAFETY: `m` holds n² f64, `tau` n f64 and `info` one i32, all on `d`.
    unsafe { d.qr_q_f64(m.ptr, n, tau.ptr, info.ptr)? };
    check(&d, &info, "the QR factorisation")?;
    rounded(&d, &m, n, false)
}

/// `ops::linalg::column_dots` on the device (read to the host).
pub fn column_dots(a: &Tensor, b: &Tensor, n: usize) -> Result<Vec<f32>> {
    let d = dev_of(a)?;
    f32_only(a, "column_dots")?;
    f32_only(b, "column_dots")?;
    let (a, b) = (contiguous(a)?, contiguous(b)?);
    let out = d.alloc(n * 4)?;
    // linalg_column_dots(const float* a, const float* b, float* out, i64 n)
    launch!(d, "linalg", "linalg_column_dots", grid(n); ptr(&a)?, ptr(&b)?, out.ptr, n as i64)?;
    d.download::<f32>(out.ptr, n)
}
