//! Sums over dimensions (GEMMs against a ones vector) and the full sum of squares.

use super::*;

/// Column sums of a packed `[rows, cols]` matrix of `dtype` (f32 or bf16) at `p`, in f32,
/// written (or added, `beta = 1`) to `out` — `onesᵀ·X` as a GEMM.
pub(crate) fn sum_rows_into(d: &Arc<CudaDev>, p: u64, rows: usize, cols: usize, out: u64, beta: f32, dtype: DType) -> Result<()> {
    sum_rows_batched_into(d, p, 1, rows, cols, out, beta, dtype)
}

/// [`sum_rows_into`] for `batch` such matrices one after the other at `p` (`[batch, rows,
/// cols]`), their sums one after the other at `out` (`[batch, cols]`): one strided-batched GEMM,
/// one launch for all of them.
#[allow(clippy::too_many_arguments)]
pub(crate) fn sum_rows_batched_into(
    d: &Arc<CudaDev>,
    p: u64,
    batch: usize,
    rows: usize,
    cols: usize,
    out: u64,
    beta: f32,
    dtype: DType,
) -> Result<()> {
    let ones = if dtype == DType::BF16 { d.ones_bf16(rows)? } else { d.ones(rows)? };
    d.gemm(
        1,
        cols,
        rows,
        MatArg { ptr: ones, trans: false, ld: rows, batch_stride: 0 },
        MatArg { ptr: p, trans: false, ld: cols, batch_stride: rows * cols },
        out,
        batch,
        1.0,
        beta,
        dtype,
    )
}

/// Sums over `dims`, keeping them as size 1.
pub fn sum_dims(x: &Tensor, dims: &[usize]) -> Result<Tensor> {
    f32_only(x, "sum")?;
    let d = dev_of(x)?;
    let r = x.rank();
    let kept_shape: Vec<usize> = (0..r).map(|i| if dims.contains(&i) { 1 } else { x.shape()[i] }).collect();
    // Reduced dims first, kept dims last, then a column-sum GEMM over the packed result.
    let perm: Vec<usize> = (0..r).filter(|i| dims.contains(i)).chain((0..r).filter(|i| !dims.contains(i))).collect();
    let p = contiguous(&x.permute(&perm)?)?;
    let rows: usize = dims.iter().map(|&i| x.shape()[i]).product();
    let cols = x.numel() / rows.max(1);
    let out = empty(&d, &kept_shape)?;
    if rows == 0 {
        fill_raw(&d, ptr(&out)?, cols, 0.0)?;
    } else {
        sum_rows_into(&d, ptr(&p)?, rows, cols, ptr(&out)?, 0.0, DType::F32)?;
    }
    Ok(out)
}

/// Reduces a broadcast result `g` back to `target` (broadcast backward).
pub fn sum_to_shape(g: &Tensor, target: &[usize]) -> Result<Tensor> {
    if g.shape() == target {
        return Ok(g.clone());
    }
    let r = g.rank();
    let lead = r.checked_sub(target.len()).ok_or_else(|| Error::shape("sum_to_shape", format!("{:?} -> {target:?}", g.shape())))?;
    let dims: Vec<usize> = (0..r).filter(|&i| i < lead || (target[i - lead] == 1 && g.shape()[i] != 1)).collect();
    sum_dims(g, &dims)?.reshape(target)
}

/// Σx² over all elements, returned to the host (waits for the device).
pub fn sum_squares_host(x: &Tensor) -> Result<f64> {
    Ok(sum_squares_and_host(x, &[])?.0)
}

/// [`sum_squares_host`] and the values of one-element f32 `scalars`, in one download (a
/// [`StepRecord`] made and read at once).
pub fn sum_squares_and_host(x: &Tensor, scalars: &[Tensor]) -> Result<(f64, Vec<f64>)> {
    let (sum, _, values) = sum_squares_and_record(x, scalars)?.read()?;
    Ok((sum, values))
}

/// A training step's record on the device: the gradient's Σg² (f64, words 0–1), four words
/// an optimizer's device gate writes (applied, clipping factor, and two of its scalars), then
/// the step's loss scalars — written without a host wait and read later in one download.
pub struct StepRecord {
    buf: crate::tensor::cuda::DevBuf,
    scalars: usize,
}

/// Words of a [`StepRecord`] before its scalars.
const RECORD_HEAD: usize = 6;

impl StepRecord {
    /// The record's device address (`float*`; the sum is the double at its start).
    pub fn ptr(&self) -> u64 {
        self.buf.ptr
    }
    /// (Σg², whether the gate applied the step, the scalars) — one download (a host wait).
    pub fn read(&self) -> Result<(f64, bool, Vec<f64>)> {
        let d = self.buf.dev();
        let w = d.download::<u32>(self.buf.ptr, RECORD_HEAD + self.scalars)?;
        let sum = f64::from_bits(w[0] as u64 | (w[1] as u64) << 32);
        Ok((sum, f32::from_bits(w[2]) != 0.0, w[RECORD_HEAD..].iter().map(|&b| f32::from_bits(b) as f64).collect()))
    }
    /// A copy in a new buffer (one device copy, no wait): what a replayed CUDA graph's record
    /// holds now, kept after the next replay overwrites it.
    pub fn copy(&self) -> Result<StepRecord> {
        let d = self.buf.dev();
        let bytes = 4 * (RECORD_HEAD + self.scalars);
        let buf = d.alloc(bytes)?;
        d.copy(buf.ptr, self.buf.ptr, bytes)?;
        Ok(StepRecord { buf, scalars: self.scalars })
    }
}

/// A counter on the device (an optimizer's step count when its steps are decided there).
pub struct DevCounter {
    buf: crate::tensor::cuda::DevBuf,
}

impl DevCounter {
    /// A counter on `like`'s device holding `v`.
    pub fn new(like: &Tensor, v: i64) -> Result<DevCounter> {
        Ok(DevCounter { buf: dev_of(like)?.upload(&[v])? })
    }
    pub fn ptr(&self) -> u64 {
        self.buf.ptr
    }
    /// Overwrites its value in place (queued on the stream).
    pub fn set(&self, v: i64) -> Result<()> {
        self.buf.dev().write(self.buf.ptr, &[v])
    }
    /// Its value (a host wait).
    pub fn get(&self) -> Result<i64> {
        Ok(self.buf.dev().download::<i64>(self.buf.ptr, 1)?[0])
    }
}

/// Σx² of the contiguous f32 `c`, written as a double to device address `out` (no wait).
pub(crate) fn sum_squares_to(d: &Arc<CudaDev>, c: &Tensor, out: u64) -> Result<()> {
    let n = c.numel();
    // One partial per block (zeroed: the emulator runs fewer blocks than asked), summed in a
    // fixed tree.
    let cfg = grid(n.min(BLOCK as usize * 1024));
    let blocks = cfg.grid_dim.0 as usize;
    let parts = d.alloc_zeros(8 * blocks)?;
    // sum_squares_f32(const float* x, double* parts, i64 n)
    launch!(d, "reduce", "sum_squares_f32", cfg; ptr(c)?, parts.ptr, n as i64)?;
    // sum_parts_f64(const double* parts, double* out, i64 n)
    launch!(d, "reduce", "sum_parts_f64", grid(1); parts.ptr, out, blocks as i64)
}

/// Σx² and the one-element f32 `scalars` in a new [`StepRecord`], without a download: the sum
/// lands in the record's first 8 bytes, each scalar is copied (on the stream) into its place
/// after the gate's words.
pub fn sum_squares_and_record(x: &Tensor, scalars: &[Tensor]) -> Result<StepRecord> {
    f32_only(x, "sum_squares")?;
    let d = dev_of(x)?;
    let c = contiguous(x)?;
    let acc = d.alloc_zeros(4 * (RECORD_HEAD + scalars.len()))?;
    sum_squares_to(&d, &c, acc.ptr)?;
    for (i, s) in scalars.iter().enumerate() {
        f32_only(s, "sum_squares_and")?;
        if s.numel() != 1 {
            return Err(Error::shape("sum_squares_and", format!("a scalar of {} elements", s.numel())));
        }
        d.copy(acc.ptr + 4 * (RECORD_HEAD + i) as u64, ptr(s)?, 4)?;
    }
    Ok(StepRecord { buf: acc, scalars: scalars.len() })
}

/// Column sums of `g2 [rows, n]` → `[n]` (the bias gradient).
pub fn sum_rows(g2: &Tensor) -> Result<Tensor> {
    let d = dev_of(g2)?;
    let (rows, n) = (g2.shape()[0], g2.shape()[1]);
    let g = contiguous(g2)?;
    let out = empty(&d, &[n])?;
    sum_rows_into(&d, ptr(&g)?, rows, n, ptr(&out)?, 0.0, DType::F32)?;
    Ok(out)
}
