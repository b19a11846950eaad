//! SOAP (Vyas et al. 2024, "SOAP: Improving and Stabilizing Shampoo using Adam"): Adam run in
//! the eigenbasis of Shampoo's preconditioner, following the authors' `soap.py` (and PyPI
//! `pytorch-optimizer`'s port of it, which the golden tests compare against):
//!
//! - per parameter (dims merged when `merge_dims`), one factor GG_k = EMA of the mode-k Gram of
//!   the gradient per dim of size ≤ `max_precond_dim`, and its eigenbasis Q_k;
//! - the first step only builds GG and Q (eigh) and updates nothing;
//! - then: m ← lerp(m, g), v ← lerp(v, project(g)²) in the eigenbasis,
//!   u = project_back(project(m) / (√v + ε)), p ← p − step_size·u, then decoupled decay with the
//!   raw lr (after the update), then GG from the same raw g;
//! - every `precondition_frequency` updates the bases are refreshed by one power-iteration step
//!   (Q ← qr(GG·Q) with columns re-sorted by their estimated eigenvalue, v re-sorted with them).
//!
//! m is kept in the eigenbasis (the authors' `soap.py` does the same; the PyPI port keeps it in
//! the original space and projects it every step): projection is linear, so lerping the
//! projected gradient gives project(m) without projecting m — two of a step's eight
//! mode products saved. When the bases change, m goes back to the original space with the old
//! ones and into the new ones. Saved state carries m both ways: `exp_avg` in the original space
//! (the reference's meaning, for parity replays) and `exp_avg_eig` as kept (bitwise resume).
//!
//! Factors and bases are f32; eigh and QR run in f64 (`dptrain_core::ops::linalg`): on the host
//! through faer, sequentially, so the same input gives bitwise the same basis on every rank.
//! With `Distribute::Owner` each parameter's eigh/QR is computed by one rank (greedy
//! largest-first by cost) and broadcast over the optimizer's communicator; every rank applies
//! the same bases, so replicas stay identical.
//!
//! On a GPU the projections, moments and update run on the device (engine GEMMs and small
//! kernels), the statistics are accumulated there too, and every `precondition_frequency`
//! updates the eigh/QR run there as well, through cuSOLVER (in owner mode only the ones this
//! rank computes; the others' bases arrive by broadcast): on the host a refresh of GPT-124M's
//! factors takes minutes. Without cuSOLVER (or with `DPTRAIN_SOLVER=0`) the statistics come
//! down for the host's eigh/QR and the new bases go back up. The second moment is re-sorted on
//! the device, and neither moment is kept on the host. In training, the steps between
//! refreshes are decided on the device (`step_on_device`: a gate kernel checks, clips, counts
//! and sizes the step), so they never wait for it; the first step and the refreshes are
//! decided by the host (they wait for the device).

use crate::{host_state, join_state, saved_state, split_state, upload_state, OptimError, Optimizer, ParamScales, Result, StepCtx};
use dptrain_core::comm::Communicator;
use dptrain_core::ops::embedding::rows;
use dptrain_core::ops::flat;
use dptrain_core::ops::linalg;
use dptrain_core::ops::matmul::matmul_t;
use dptrain_core::{Device, GradStore, ParamStore, Precision, Tensor};
use faer::linalg::matmul::matmul;
use faer::{Accum, Mat, MatMut, MatRef, Par};
use rayon::prelude::*;

/// Who computes a parameter's eigenbasis refresh.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Distribute {
    /// Every rank computes every basis.
    Replicated,
    /// One rank per parameter computes it and broadcasts it.
    Owner,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SoapConfig {
    pub beta1: f64,
    pub beta2: f64,
    /// EMA factor of the preconditioner statistics; negative = `beta2`.
    pub shampoo_beta: f64,
    pub eps: f64,
    pub weight_decay: f64,
    pub precondition_frequency: u64,
    pub max_precond_dim: usize,
    pub merge_dims: bool,
    pub precondition_1d: bool,
    pub normalize_grads: bool,
    pub correct_bias: bool,
    pub distribute: Distribute,
    /// `Coupled` (the reference): p ← p·(1 − lr·λ) after the update. `Independent`:
    /// p ← p·(1 − s_t·λ) with s_t = lr / `peak_lr`, the schedule's multiplier.
    pub decay_mode: crate::DecayMode,
    pub peak_lr: f64,
}

impl Default for SoapConfig {
    /// The reference's defaults.
    fn default() -> Self {
        SoapConfig {
            beta1: 0.95,
            beta2: 0.95,
            shampoo_beta: -1.0,
            eps: 1e-8,
            weight_decay: 0.01,
            precondition_frequency: 10,
            max_precond_dim: 10000,
            merge_dims: false,
            precondition_1d: false,
            normalize_grads: false,
            correct_bias: true,
            distribute: Distribute::Replicated,
            decay_mode: crate::DecayMode::Coupled,
            peak_lr: 3e-3,
        }
    }
}

impl SoapConfig {
    fn shampoo_beta(&self) -> f64 {
        if self.shampoo_beta < 0.0 {
            self.beta2
        } else {
            self.shampoo_beta
        }
    }
}

/// The reference's `merge_dims`: consecutive dims are multiplied together while the product
/// stays ≤ `max`; size-1 dims vanish.
pub fn merge_dims(shape: &[usize], max: usize) -> Vec<usize> {
    let mut out = vec![];
    let mut acc = 1usize;
    for &d in shape {
        if acc * d > max {
            if acc > 1 {
                out.push(acc);
                acc = d;
            } else {
                out.push(d);
                acc = 1;
            }
        } else {
            acc *= d;
        }
    }
    if acc > 1 || out.is_empty() {
        out.push(acc);
    }
    out
}

/// One preconditioned dim: the d×d statistics and eigenbasis (row-major; Q's columns are the
/// basis vectors, by descending eigenvalue). On the host each is empty until needed: the
/// statistics until a CPU step accumulates them or a host refresh of a GPU run brings them
/// down; the basis until the first refresh (on a GPU it stays on the host only where the host
/// refreshes: for the parameters whose bases this rank computes, when the device has no solver).
#[derive(Debug, Clone)]
struct Factor {
    d: usize,
    gg: Vec<f32>,
    q: Vec<f32>,
}

impl Factor {
    /// The statistics (lower triangle read), zeros while none were accumulated.
    fn statistics(&self) -> std::borrow::Cow<'_, [f32]> {
        if self.gg.len() == self.d * self.d {
            std::borrow::Cow::Borrowed(&self.gg)
        } else {
            std::borrow::Cow::Owned(vec![0.0; self.d * self.d])
        }
    }
}

/// New bases per parameter and factor: (Q, the order its columns were sorted into).
type Bases = Vec<Vec<Option<(Vec<f32>, Vec<usize>)>>>;

/// The same, computed on the device (see [`Soap::new_bases_device`]).
type DevBases = Vec<Vec<Option<(Tensor, Vec<usize>)>>>;

/// A parameter's SOAP layout.
#[derive(Debug, Clone)]
struct PState {
    name: String,
    offset: usize,
    numel: usize,
    /// The dims the factors refer to (merged when `merge_dims`).
    dims: Vec<usize>,
    /// One entry per dim: a factor, or none (dim too large, or 1-D without precondition_1d).
    factors: Vec<Option<Factor>>,
    /// Rank that computes this parameter's bases (owner mode).
    owner: usize,
}

impl PState {
    /// Cost of one update step's projections plus an amortised refresh (relative units).
    fn cost(&self, f: u64) -> f64 {
        let n = self.numel as f64;
        self.factors.iter().flatten().map(|fa| 2.0 * n * fa.d as f64 + (fa.d as f64).powi(3) / f.max(1) as f64).sum::<f64>() + n
    }
}

pub struct Soap {
    pub cfg: SoapConfig,
    ps: Vec<PState>,
    /// Elements over all parameters.
    n: usize,
    /// The first moment, in the current eigenbasis, and the second: on the host only for CPU
    /// steps or a restore (empty until then, and freed once on a GPU — there the device holds
    /// them, and a refresh re-sorts v there).
    m: Vec<f32>,
    v: Vec<f32>,
    /// Per-parameter lr and decay multipliers.
    lr_scale: Vec<f64>,
    wd_scale: Vec<f64>,
    /// Updates applied (the first step only initialises, as the reference) — as of the last
    /// step the host decided: `ahead` steps decided on the device since then may each have
    /// been applied or skipped, which `t_dev` knows.
    t: u64,
    started: bool,
    /// Steps decided on the device since the host last knew `t` exactly.
    ahead: u64,
    /// The count of applied updates on the GPU once steps are decided there.
    t_dev: Option<flat::DeviceStepCount>,
    /// The learning rate and per-parameter decay factors as device-decided steps read them.
    lr_dev: flat::DeviceLr,
    /// The world size the owners were assigned for (0 = not yet).
    assigned_for: usize,
    /// Seconds this rank spent computing bases (eigh / power iteration + QR), for benchmarks.
    precond_s: f64,
    /// The state on the parameters' GPU once a step ran there. The factors' statistics come
    /// down for a refresh (d² values each) and the bases go up; the moments never leave it
    /// but for a checkpoint.
    dev: Option<DevState>,
}

/// SOAP's state on a GPU: the moments over the flat layout, and per parameter and dim the
/// statistics and basis (`None` where the dim has no factor).
struct DevState {
    m: Tensor,
    v: Tensor,
    gg: Vec<Vec<Option<Tensor>>>,
    q: Vec<Vec<Option<Tensor>>>,
}

impl Soap {
    /// Parameter i's decay fraction this step (`decay_mode`).
    fn decay_of(&self, i: usize, lr: f64) -> f64 {
        let c = &self.cfg;
        match c.decay_mode {
            crate::DecayMode::Coupled => lr * self.lr_scale[i] * c.weight_decay * self.wd_scale[i],
            crate::DecayMode::Independent => lr / c.peak_lr * c.weight_decay * self.wd_scale[i],
        }
    }

    /// What parameter i's values are multiplied by after its update at learning rate `lr`:
    /// 1 − its decay fraction, rounded to f32 (the host's and the device's update read this).
    fn keep_of(&self, i: usize, lr: f64) -> f32 {
        let decay = self.decay_of(i, lr);
        if decay > 0.0 {
            (1.0 - decay) as f32
        } else {
            1.0
        }
    }

    /// Whether the next step is one the device decides: every step but the first (the bases'
    /// initialisation) and a refresh (see [`Optimizer::step_on_device`]).
    fn device_decides_next(&self, params: &ParamStore) -> bool {
        let latest = self.t + self.ahead + 1;
        flat::decides_steps_on_device(params.flat()) && self.started && !latest.is_multiple_of(self.cfg.precondition_frequency.max(1))
    }

    pub fn new(cfg: SoapConfig, params: &ParamStore) -> Soap {
        Soap::with_scales(cfg, params, &ParamScales::ones(params)).expect("unit scales are valid")
    }

    pub fn with_scales(cfg: SoapConfig, params: &ParamStore, scales: &ParamScales) -> Result<Soap> {
        scales.validate(params)?;
        let ps = params
            .infos()
            .iter()
            .map(|p| {
                let shape: Vec<usize> = if p.shape.is_empty() { vec![1] } else { p.shape.clone() };
                let dims = if shape.len() > 1 && cfg.merge_dims { merge_dims(&shape, cfg.max_precond_dim) } else { shape.clone() };
                let one_d = shape.len() == 1;
                let factors = dims
                    .iter()
                    .map(|&d| {
                        let wanted = d <= cfg.max_precond_dim && (!one_d || cfg.precondition_1d);
                        wanted.then(|| Factor { d, gg: vec![], q: vec![] })
                    })
                    .collect();
                PState { name: p.name.clone(), offset: p.offset, numel: p.numel, dims, factors, owner: 0 }
            })
            .collect();
        Ok(Soap {
            cfg,
            ps,
            n: params.numel(),
            m: vec![],
            v: vec![],
            lr_scale: scales.lr.clone(),
            wd_scale: scales.wd.clone(),
            t: 0,
            started: false,
            ahead: 0,
            t_dev: None,
            lr_dev: flat::DeviceLr::default(),
            assigned_for: 0,
            precond_s: 0.0,
            dev: None,
        })
    }

    /// Greedy largest-first assignment of parameters to ranks by cost.
    fn assign_owners(&mut self, world: usize) {
        if self.assigned_for == world {
            return;
        }
        let f = self.cfg.precondition_frequency;
        let mut order: Vec<usize> = (0..self.ps.len()).collect();
        order.sort_by(|&a, &b| self.ps[b].cost(f).total_cmp(&self.ps[a].cost(f)).then(a.cmp(&b)));
        let mut load = vec![0.0f64; world];
        for i in order {
            let r = (0..world).min_by(|&a, &b| load[a].total_cmp(&load[b]).then(a.cmp(&b))).expect("world ≥ 1");
            load[r] += self.ps[i].cost(f);
            self.ps[i].owner = r;
        }
        self.assigned_for = world;
    }

    /// Seconds this rank has spent computing eigenbases so far.
    pub fn precond_seconds(&self) -> f64 {
        self.precond_s
    }

    /// Bytes of optimizer state a step keeps (on the host or the GPU it steps on): the moments,
    /// and each factor's statistics and basis.
    pub fn state_bytes(&self) -> usize {
        4 * 2 * self.n + self.ps.iter().flat_map(|p| p.factors.iter().flatten()).map(|f| 4 * 2 * f.d * f.d).sum::<usize>()
    }

    /// Bytes of that state this rank holds on the host: the moments, statistics and bases for
    /// CPU steps; on a GPU none, or where the host refreshes (no solver on the device) the
    /// statistics and bases of the parameters whose bases this rank computes.
    pub fn host_state_bytes(&self) -> usize {
        4 * (self.m.len()
            + self.v.len()
            + self.ps.iter().flat_map(|p| p.factors.iter().flatten()).map(|f| f.gg.len() + f.q.len()).sum::<usize>())
    }

    /// Per-rank relative refresh cost under the current assignment (for the benchmark).
    pub fn owner_loads(&mut self, world: usize) -> Vec<f64> {
        self.assign_owners(world);
        let f = self.cfg.precondition_frequency;
        let mut load = vec![0.0; world];
        for p in &self.ps {
            load[p.owner] += p.cost(f);
        }
        load
    }
}

// ---- dense helpers (row-major f32 buffers) -------------------------------------------------

fn view(x: &[f32], rows: usize, cols: usize) -> MatRef<'_, f32> {
    MatRef::from_row_major_slice(x, rows, cols)
}

fn view_mut(x: &mut [f32], rows: usize, cols: usize) -> MatMut<'_, f32> {
    MatMut::from_row_major_slice_mut(x, rows, cols)
}

/// Mode-k product: out[a, j, b] = Σ_i x[a, i, b]·M[i, j] (`back` = false: M = Q, the
/// projection) or Σ_i x[a, i, b]·Q[j, i] (`back` = true).
fn mode_product(x: &[f32], dims: &[usize], k: usize, q: &[f32], back: bool) -> Vec<f32> {
    let d = dims[k];
    let a_n: usize = dims[..k].iter().product();
    let b_n: usize = dims[k + 1..].iter().product();
    let mut out = vec![0.0f32; x.len()];
    let qm = view(q, d, d);
    let m = if back { qm.transpose() } else { qm };
    if b_n == 1 {
        // The last dim: one GEMM out [A, d] = x [A, d] · M, not A matrix-vector products.
        matmul(view_mut(&mut out, a_n, d), Accum::Replace, view(x, a_n, d), m, 1.0f32, Par::Seq);
        return out;
    }
    // out_a [d, B] = Mᵀ · x_a [d, B]
    for a in 0..a_n {
        let xa = view(&x[a * d * b_n..(a + 1) * d * b_n], d, b_n);
        let oa = view_mut(&mut out[a * d * b_n..(a + 1) * d * b_n], d, b_n);
        matmul(oa, Accum::Replace, m.transpose(), xa, 1.0f32, Par::Seq);
    }
    out
}

/// The tensor in the eigenbasis (`back` = false) or back from it, mode by mode.
fn project(x: &[f32], dims: &[usize], factors: &[Option<Factor>], back: bool) -> Vec<f32> {
    let mut y = x.to_vec();
    for (k, f) in factors.iter().enumerate() {
        if let Some(f) = f {
            y = mode_product(&y, dims, k, &f.q, back);
        }
    }
    y
}

/// The lower triangle (diagonal included; the rest zero) of the mode-k Gram matrix
/// Σ_{a,b} x[a, :, b]·x[a, :, b]ᵀ (d×d): half the work of the full product. The host keeps
/// only this half of each statistic up to date; [`symmetric`] fills the other half for use.
fn gram(x: &[f32], dims: &[usize], k: usize) -> Vec<f32> {
    use faer::linalg::matmul::triangular::{matmul as tri_matmul, BlockStructure as B};
    let d = dims[k];
    let a_n: usize = dims[..k].iter().product();
    let b_n: usize = dims[k + 1..].iter().product();
    let mut g = vec![0.0f32; d * d];
    if b_n == 1 {
        // The last dim: one product xᵀx over x [A, d], not A rank-one updates.
        let xm = view(x, a_n, d);
        tri_matmul(
            view_mut(&mut g, d, d),
            B::TriangularLower,
            Accum::Replace,
            xm.transpose(),
            B::Rectangular,
            xm,
            B::Rectangular,
            1.0f32,
            Par::Seq,
        );
    } else {
        for a in 0..a_n {
            let xa = view(&x[a * d * b_n..(a + 1) * d * b_n], d, b_n);
            let acc = if a == 0 { Accum::Replace } else { Accum::Add };
            tri_matmul(
                view_mut(&mut g, d, d),
                B::TriangularLower,
                acc,
                xa,
                B::Rectangular,
                xa.transpose(),
                B::Rectangular,
                1.0f32,
                Par::Seq,
            );
        }
    }
    g
}

/// The full symmetric matrix from its lower triangle (row-major d×d).
fn symmetric(lower: &[f32], d: usize) -> Vec<f32> {
    let mut s = lower.to_vec();
    for i in 0..d {
        for j in i + 1..d {
            s[i * d + j] = lower[j * d + i];
        }
    }
    s
}

fn to_f64(x: &[f32], d: usize) -> Mat<f64> {
    Mat::from_fn(d, d, |i, j| x[i * d + j] as f64)
}

fn from_f64(m: MatRef<'_, f64>) -> Vec<f32> {
    let d = m.nrows();
    let mut out = vec![0.0f32; d * m.ncols()];
    for i in 0..d {
        for j in 0..m.ncols() {
            out[i * m.ncols() + j] = m[(i, j)] as f32;
        }
    }
    out
}

/// Eigenvectors of GG + 1e-30·I by descending eigenvalue (f64, rounded to f32).
fn eigenbasis(gg: &[f32], d: usize) -> Result<Vec<f32>> {
    let mut a = to_f64(gg, d);
    for i in 0..d {
        a[(i, i)] += 1e-30;
    }
    let (u, _) = linalg::sym_eigen(a.as_ref()).map_err(|e| OptimError::State(format!("soap: {e}")))?;
    // Ascending eigenvalues: flip the columns, as the reference does.
    let flipped = Mat::from_fn(d, d, |i, j| u[(i, d - 1 - j)]);
    Ok(from_f64(flipped.as_ref()))
}

/// One power-iteration refresh: columns of GG·Q sorted by the estimated eigenvalues
/// diag(Qᵀ·GG·Q), descending; returns (the Q of their QR, the sort order).
fn refresh_basis(gg: &[f32], q: &[f32], d: usize) -> (Vec<f32>, Vec<usize>) {
    let mut mp = vec![0.0f32; d * d];
    matmul(view_mut(&mut mp, d, d), Accum::Replace, view(gg, d, d), view(q, d, d), 1.0f32, Par::Seq);
    // diag(Qᵀ·GG·Q), row by row (the column sums in the same order, cache-friendly; -0.0 is the
    // empty sum, as `Iterator::sum`'s).
    let mut est = vec![-0.0f32; d];
    for i in 0..d {
        for ((e, &a), &b) in est.iter_mut().zip(&q[i * d..(i + 1) * d]).zip(&mp[i * d..(i + 1) * d]) {
            *e += a * b;
        }
    }
    let mut idx: Vec<usize> = (0..d).collect();
    // Stable descending sort: ties keep their order.
    idx.sort_by(|&a, &b| est[b].total_cmp(&est[a]));
    let pi = Mat::from_fn(d, d, |i, j| mp[i * d + idx[j]] as f64);
    (from_f64(linalg::qr_q(pi).as_ref()), idx)
}

/// Reorders `v` (laid out as `dims`) along axis k by `idx`.
fn permute_axis(v: &mut [f32], dims: &[usize], k: usize, idx: &[usize]) {
    let d = dims[k];
    let a_n: usize = dims[..k].iter().product();
    let b_n: usize = dims[k + 1..].iter().product();
    let old = v.to_vec();
    for a in 0..a_n {
        for (j, &src) in idx.iter().enumerate().take(d) {
            let o = (a * d + j) * b_n;
            let s = (a * d + src) * b_n;
            v[o..o + b_n].copy_from_slice(&old[s..s + b_n]);
        }
    }
}

/// GG_k ← lerp(GG_k, Gram_k(g), w) for every factor of a parameter (lower triangles only).
fn accumulate_statistics(p: &mut PState, g: &[f32], w: f32) {
    for k in 0..p.dims.len() {
        if let Some(f) = &mut p.factors[k] {
            let (d, gk) = (f.d, gram(g, &p.dims, k));
            if f.gg.len() != d * d {
                f.gg = vec![0.0; d * d];
            }
            for i in 0..d {
                for (a, b) in f.gg[i * d..i * d + i + 1].iter_mut().zip(&gk[i * d..i * d + i + 1]) {
                    *a += w * (b - *a);
                }
            }
        }
    }
}

/// Disjoint mutable slices of `buf`, one per parameter (`ps` order).
fn per_param<'a>(buf: &'a mut [f32], ps: &[PState]) -> Vec<&'a mut [f32]> {
    let mut order: Vec<usize> = (0..ps.len()).collect();
    order.sort_by_key(|&i| ps[i].offset);
    let mut out: Vec<Option<&'a mut [f32]>> = (0..ps.len()).map(|_| None).collect();
    let (mut rest, mut at) = (buf, 0usize);
    for i in order {
        let (o, n) = (ps[i].offset, ps[i].numel);
        let (_, tail) = std::mem::take(&mut rest).split_at_mut(o - at);
        let (mine, tail) = tail.split_at_mut(n);
        out[i] = Some(mine);
        rest = tail;
        at = o + n;
    }
    out.into_iter().map(|s| s.expect("every parameter has a span")).collect()
}

impl Soap {
    /// Counts an update and returns its step size: lr, times Adam's bias correction
    /// √(1 − β2ᵗ) / (1 − β1ᵗ) when `correct_bias`.
    fn next_step_size(&mut self, lr: f64) -> f64 {
        self.t += 1;
        let (c, t) = (self.cfg, self.t);
        // `powi` as the device gate computes it (soap_gate in optim.cu), so both agree bit for bit.
        if c.correct_bias {
            lr * ((1.0 - crate::adamw::powi(c.beta2, t)).sqrt() / (1.0 - crate::adamw::powi(c.beta1, t)))
        } else {
            lr
        }
    }

    /// Updates applied so far (read from the device after steps decided there).
    fn steps(&self) -> Result<u64> {
        match &self.t_dev {
            Some(t) if self.ahead > 0 => Ok(t.get()?),
            _ => Ok(self.t),
        }
    }

    /// Computes the new bases of the parameters marked in `mine` (see [`Soap::computing`]) on
    /// the host and, in owner mode, exchanges them: eigh when `initial`, else the
    /// power-iteration refresh. Per parameter and factor: (Q, the order its columns were sorted
    /// into).
    fn new_bases(&mut self, initial: bool, mine: &[bool], comm: &mut dyn Communicator) -> Result<Bases> {
        // Computed results per parameter: per factor (Q, sort order). Parameters in parallel,
        // each factor sequentially: the same bases whatever the thread count.
        let t0 = std::time::Instant::now();
        let mut results: Bases = self
            .ps
            .par_iter()
            .zip(mine)
            .map(|(p, &mine)| -> Result<_> {
                if !mine {
                    return Ok(vec![]);
                }
                p.factors
                    .iter()
                    .map(|f| match f {
                        None => Ok(None),
                        // eigh reads the lower triangle only.
                        Some(f) if initial => Ok(Some((eigenbasis(&f.statistics(), f.d)?, (0..f.d).collect()))),
                        Some(f) => Ok(Some(refresh_basis(&symmetric(&f.statistics(), f.d), &f.q, f.d))),
                    })
                    .collect()
            })
            .collect::<Result<_>>()?;
        self.precond_s += t0.elapsed().as_secs_f64();
        self.exchange(&mut results, comm, |q| Ok(q.clone()), |q, _| Ok(q))?;
        Ok(results)
    }

    /// The new bases of the parameters marked in `mine`, computed on the device where the
    /// statistics are (`ops::linalg`: cuSOLVER), then exchanged in owner mode — the same
    /// arithmetic as [`Soap::new_bases`]: eigh of GG + 1e-30·I at first, then GG·Q's columns
    /// sorted by diag(Qᵀ·GG·Q) (read to the host, d values a factor, and sorted there as the
    /// host path sorts) and the Q of their QR.
    fn new_bases_device(&mut self, initial: bool, mine: &[bool], comm: &mut dyn Communicator) -> Result<DevBases> {
        let t0 = std::time::Instant::now();
        let d = self.dev.as_ref().expect("device state");
        let mut results: DevBases = vec![];
        for (i, (p, &mine)) in self.ps.iter().zip(mine).enumerate() {
            if !mine {
                results.push(vec![]);
                continue;
            }
            let per = p.factors.iter().enumerate().map(|(k, f)| -> Result<_> {
                let (Some(f), Some(gg)) = (f, &d.gg[i][k]) else { return Ok(None) };
                if initial {
                    return Ok(Some((linalg::eigh_desc(gg, 1e-30)?, (0..f.d).collect())));
                }
                Ok(Some(refresh_basis_dev(gg, d.q[i][k].as_ref().expect("a basis after the first refresh"))?))
            });
            results.push(per.collect::<Result<_>>()?);
        }
        self.precond_s += t0.elapsed().as_secs_f64();
        let device = d.v.device();
        self.exchange(&mut results, comm, |q| Ok(q.to_vec::<f32>()?), |q, dd| Ok(up(&q, &[dd, dd], device)?))?;
        Ok(results)
    }

    /// Owner mode's exchange of new bases (nothing otherwise): each rank broadcasts its
    /// parameters' results in parameter order — per factor the d×d basis (`down` brings it to
    /// the host) then d sort indices (exact in f32 below 2^24) — and takes the others' (`up`
    /// makes a basis of d×d values). Every rank takes part, even one that owns nothing or
    /// everything.
    fn exchange<B>(
        &self,
        results: &mut [Vec<Option<(B, Vec<usize>)>>],
        comm: &mut dyn Communicator,
        down: impl Fn(&B) -> Result<Vec<f32>>,
        up: impl Fn(Vec<f32>, usize) -> Result<B>,
    ) -> Result<()> {
        let (rank, world) = (comm.rank(), comm.world_size());
        if self.cfg.distribute != Distribute::Owner || world == 1 {
            return Ok(());
        }
        for src in 0..world {
            let owned: Vec<usize> = (0..self.ps.len()).filter(|&i| self.ps[i].owner == src).collect();
            let len: usize = owned.iter().flat_map(|&i| self.ps[i].factors.iter().flatten()).map(|f| f.d * f.d + f.d).sum();
            if len == 0 {
                continue;
            }
            let mut buf = vec![0.0f32; len];
            if src == rank {
                let mut at = 0;
                for &i in &owned {
                    for (q, idx) in results[i].iter().flatten() {
                        let q = down(q)?;
                        buf[at..at + q.len()].copy_from_slice(&q);
                        at += q.len();
                        for (o, &x) in buf[at..at + idx.len()].iter_mut().zip(idx) {
                            *o = x as f32;
                        }
                        at += idx.len();
                    }
                }
            }
            comm.broadcast(&mut buf, src).map_err(OptimError::Core)?;
            if src != rank {
                let mut at = 0;
                for &i in &owned {
                    results[i] = self.ps[i]
                        .factors
                        .iter()
                        .map(|f| {
                            f.as_ref()
                                .map(|f| {
                                    let q = up(buf[at..at + f.d * f.d].to_vec(), f.d)?;
                                    at += f.d * f.d;
                                    let idx = buf[at..at + f.d].iter().map(|&x| x as usize).collect();
                                    at += f.d;
                                    Ok((q, idx))
                                })
                                .transpose()
                        })
                        .collect::<Result<_>>()?;
                }
            }
        }
        Ok(())
    }

    /// Which parameters' bases this rank computes: the ones it owns in owner mode (assigned
    /// here on first use), else all.
    fn computing(&mut self, comm: &dyn Communicator) -> Vec<bool> {
        let (rank, world) = (comm.rank(), comm.world_size());
        let owner_mode = self.cfg.distribute == Distribute::Owner && world > 1;
        if owner_mode {
            self.assign_owners(world);
        }
        self.ps.iter().map(|p| !owner_mode || p.owner == rank).collect()
    }

    /// A refresh of the host state: new bases, v re-sorted with them, and m carried from the
    /// old bases into the new ones.
    fn refresh_host(&mut self, initial: bool, comm: &mut dyn Communicator) -> Result<()> {
        let mine = self.computing(comm);
        let results = self.new_bases(initial, &mine, comm)?;
        let n = self.n;
        let (ms, vs) = (per_param(host_state(&mut self.m, n), &self.ps), per_param(host_state(&mut self.v, n), &self.ps));
        self.ps.par_iter_mut().zip(results).zip(ms.into_par_iter().zip(vs)).for_each(|((p, r), (m, v))| {
            let changed = r.iter().any(Option::is_some);
            // m into the original space with the old bases (at the first refresh m is still
            // zero), then into the new ones.
            let m_orig = (changed && !initial).then(|| project(m, &p.dims, &p.factors, true));
            for (k, res) in r.into_iter().enumerate() {
                if let (Some(f), Some((q, idx))) = (&mut p.factors[k], res) {
                    if !initial {
                        permute_axis(v, &p.dims, k, &idx);
                    }
                    f.q = q;
                }
            }
            if let Some(mo) = m_orig {
                m.copy_from_slice(&project(&mo, &p.dims, &p.factors, false));
            }
        });
        Ok(())
    }

    /// A refresh of the device state: new bases for every parameter (after owner mode's
    /// exchange), returned for the caller to turn m from the old bases to them and install them
    /// ([`Soap::install_bases`]), and v re-sorted on the device. Where the device has a solver
    /// (`ops::linalg::solver_on`: cuSOLVER) the bases are computed there and the host keeps
    /// nothing; else the statistics of the parameters this rank computes come down, the host
    /// computes ([`Soap::new_bases`]) and keeps those bases for the next refresh (in owner mode
    /// each rank's downloads and host copies are its share, 1/ranks of them), and the new bases
    /// go up.
    fn refresh_device(&mut self, initial: bool, comm: &mut dyn Communicator) -> Result<Vec<Vec<Option<Tensor>>>> {
        let mine = self.computing(comm);
        let v = &self.dev.as_ref().expect("device state").v;
        let (device, on_device) = (v.device(), linalg::solver_on(v));
        let results: DevBases = if on_device {
            let r = self.new_bases_device(initial, &mine, comm)?;
            for f in self.ps.iter_mut().flat_map(|p| p.factors.iter_mut().flatten()) {
                f.q = Vec::new();
            }
            r
        } else {
            self.statistics_down(&mine)?;
            let host = self.new_bases(initial, &mine, comm)?;
            let mut r = Vec::with_capacity(host.len());
            for ((p, res), &mine) in self.ps.iter_mut().zip(host).zip(&mine) {
                let mut per = Vec::with_capacity(res.len());
                for (f, res) in p.factors.iter_mut().zip(res) {
                    per.push(match (f, res) {
                        (Some(f), Some((q, idx))) => {
                            let t = up(&q, &[f.d, f.d], device)?;
                            f.q = if mine { q } else { Vec::new() };
                            Some((t, idx))
                        }
                        _ => None,
                    });
                }
                r.push(per);
            }
            r
        };
        let d = self.dev.as_ref().expect("device state");
        let mut out = Vec::with_capacity(results.len());
        for (p, res) in self.ps.iter().zip(results) {
            let mut per: Vec<Option<Tensor>> = vec![None; p.factors.len()];
            for (k, res) in res.into_iter().enumerate() {
                if let Some((q, idx)) = res {
                    if !initial && idx.iter().enumerate().any(|(j, &i)| i != j) {
                        permute_axis_dev(&d.v.narrow(0, p.offset, p.numel)?, &p.dims, k, &idx)?;
                    }
                    per[k] = Some(q);
                }
            }
            out.push(per);
        }
        Ok(out)
    }

    /// Makes `new` the device's bases: written over the current ones where they exist, so they
    /// stay where a CUDA graph of the device-decided step reads them.
    fn install_bases(&mut self, new: Vec<Vec<Option<Tensor>>>) -> Result<()> {
        let d = self.dev.as_mut().expect("device state");
        for (old, new) in d.q.iter_mut().zip(new) {
            for (o, n) in old.iter_mut().zip(new) {
                match (o.as_ref(), n) {
                    (Some(o), Some(n)) if o.shape() == n.shape() => flat::copy_into_cuda(o, &n)?,
                    (_, n) => *o = n,
                }
            }
        }
        Ok(())
    }

    fn step_host(&mut self, p: &mut [f32], g: &[f32], ctx: &mut StepCtx) -> Result<()> {
        let w_sh = (1.0 - self.cfg.shampoo_beta()) as f32;
        if !self.started {
            // The reference's first call: statistics and bases only, no update. A non-finite
            // gradient is left out of the statistics, so eigh never sees it.
            self.ps.par_iter_mut().for_each(|s| {
                let gi = &g[s.offset..s.offset + s.numel];
                if gi.iter().all(|x| x.is_finite()) {
                    accumulate_statistics(s, gi, w_sh);
                }
            });
            self.refresh_host(true, ctx.comm)?;
            self.started = true;
            return Ok(());
        }
        let step_size = self.next_step_size(ctx.lr);
        let c = self.cfg;
        let (w1, w2, eps) = ((1.0 - c.beta1) as f32, (1.0 - c.beta2) as f32, c.eps as f32);
        // Per parameter: the step size and what the decay keeps.
        let coef: Vec<(f32, f32)> = (0..self.ps.len()).map(|i| ((step_size * self.lr_scale[i]) as f32, self.keep_of(i, ctx.lr))).collect();
        let n = self.n;
        let (ps, ms, vs) =
            (per_param(p, &self.ps), per_param(host_state(&mut self.m, n), &self.ps), per_param(host_state(&mut self.v, n), &self.ps));
        // Parameters in parallel; each one's arithmetic is sequential, so the result does not
        // depend on the thread count.
        self.ps.par_iter_mut().zip(ps).zip(ms.into_par_iter().zip(vs)).zip(coef).for_each(|(((s, pi), (m, v)), (ss, keep))| {
            let gi = &g[s.offset..s.offset + s.numel];
            // m and v both lerp the projected gradient; their ratio goes back to the original
            // space in place of the projection buffer.
            let mut u = project(gi, &s.dims, &s.factors, false);
            for ((x, m), v) in u.iter_mut().zip(m.iter_mut()).zip(v.iter_mut()) {
                *m += w1 * (*x - *m);
                *v += w2 * (*x * *x - *v);
                *x = *m / (v.sqrt() + eps);
            }
            let mut u = project(&u, &s.dims, &s.factors, true);
            if c.normalize_grads {
                let rms = (u.iter().map(|&x| (x as f64) * (x as f64)).sum::<f64>() / s.numel.max(1) as f64).sqrt();
                let inv = (1.0 / (1e-30 + rms)) as f32;
                u.iter_mut().for_each(|x| *x *= inv);
            }
            // The update, then the decay (after it, as the reference).
            for (x, u) in pi.iter_mut().zip(&u) {
                *x = (*x - ss * u) * keep;
            }
            // The same raw gradient feeds the statistics (never the basis it was projected by);
            // a non-finite one is left out, so eigh never sees it.
            if gi.iter().all(|x| x.is_finite()) {
                accumulate_statistics(s, gi, w_sh);
            }
        });
        if self.t.is_multiple_of(c.precondition_frequency.max(1)) {
            self.refresh_host(false, ctx.comm)?;
        }
        Ok(())
    }
}

/// A fixed pseudo-random d×d matrix (uniform in [-0.5, 0.5)), whose Gram matrix is the factor
/// the refresh timings below work on.
fn timing_matrix(d: usize) -> Vec<f32> {
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    (0..d * d)
        .map(|_| {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((state >> 40) as f32 / (1u64 << 24) as f32) - 0.5
        })
        .collect()
}

/// Seconds for one eigendecomposition and one power-iteration refresh (GG·Q, re-sort, QR) of a
/// d×d factor on this host, as SOAP computes them (f64, sequential) — the per-factor cost of a
/// refresh, for benchmarks. The factor is the Gram matrix of a fixed pseudo-random d×d matrix.
pub fn basis_refresh_seconds(d: usize) -> Result<(f64, f64)> {
    let gg = symmetric(&gram(&timing_matrix(d), &[d, d], 0), d);
    let t0 = std::time::Instant::now();
    let q = eigenbasis(&gg, d)?;
    let eigh_s = t0.elapsed().as_secs_f64();
    let t1 = std::time::Instant::now();
    let _ = refresh_basis(&gg, &q, d);
    Ok((eigh_s, t1.elapsed().as_secs_f64()))
}

/// [`basis_refresh_seconds`] on a GPU, as SOAP's device refresh computes them there
/// (`ops::linalg`: cuSOLVER; on the host where the device has no solver), each timed to its
/// end (the calls wait for the device). Where SOAP at GPT-124M's sizes spends its refreshes
/// (gpu-check part (c)). The solver's first use (loading it) is not timed.
pub fn basis_refresh_seconds_on(d: usize, device: Device) -> Result<(f64, f64)> {
    let warm = up(&[1.0, 0.0, 0.0, 2.0], &[2, 2], device)?;
    linalg::eigh_desc(&warm, 0.0)?;
    let x = up(&timing_matrix(d), &[d, d], device)?;
    let gg = matmul_t(&x, &x.transpose(0, 1)?, Precision::F32)?;
    // Reading anything back waits for the GEMM, so the clock below starts with GG made.
    linalg::column_dots(&gg, &gg)?;
    let t0 = std::time::Instant::now();
    let q = linalg::eigh_desc(&gg, 1e-30)?;
    let eigh_s = t0.elapsed().as_secs_f64();
    let t1 = std::time::Instant::now();
    let (q2, _) = refresh_basis_dev(&gg, &q)?;
    // The QR's status was read; one value more makes sure its result was written too.
    q2.narrow(0, 0, 1)?.to_vec::<f32>()?;
    Ok((eigh_s, t1.elapsed().as_secs_f64()))
}

// ---- the device path ------------------------------------------------------------------------

/// `x` (laid out as `dims`) as the matrix [d_k, rest] with dim k first (a copy unless k = 0).
fn mode_matrix(x: &Tensor, dims: &[usize], k: usize) -> dptrain_core::Result<Tensor> {
    let a: usize = dims[..k].iter().product();
    let (d, b) = (dims[k], dims[k + 1..].iter().product::<usize>());
    if a == 1 {
        return x.reshape(&[d, b]);
    }
    x.reshape(&[a, d, b])?.permute(&[1, 0, 2])?.try_contiguous()?.reshape(&[d, a * b])
}

/// The inverse of `mode_matrix`: [d_k, rest] back to the layout `dims`.
fn from_mode_matrix(y: &Tensor, dims: &[usize], k: usize) -> dptrain_core::Result<Tensor> {
    let a: usize = dims[..k].iter().product();
    let (d, b) = (dims[k], dims[k + 1..].iter().product::<usize>());
    if a == 1 {
        return y.reshape(dims);
    }
    y.reshape(&[d, a, b])?.permute(&[1, 0, 2])?.try_contiguous()?.reshape(dims)
}

/// `project` on the device: mode by mode, Qᵀ·X (into the eigenbasis) or Q·X (back). The
/// first and the last dim need no mode matrix: along the first it is x itself, and along the
/// last the product is X·Q (or X·Qᵀ) of x as [rest, d], a GEMM with Q read transposed in place —
/// so a matrix's two products copy nothing (a transposed copy in and out per product otherwise).
fn project_dev(x: &Tensor, dims: &[usize], qs: &[Option<Tensor>], back: bool) -> dptrain_core::Result<Tensor> {
    let mut y = x.reshape(dims)?;
    for (k, q) in qs.iter().enumerate() {
        if let Some(q) = q {
            let qt = if back { q.clone() } else { q.transpose(0, 1)? };
            let rest: usize = dims[..k].iter().product();
            y = if k + 1 == dims.len() && rest > 1 {
                matmul_t(&y.reshape(&[rest, dims[k]])?, &qt.transpose(0, 1)?, Precision::F32)?.reshape(dims)?
            } else {
                from_mode_matrix(&matmul_t(&qt, &mode_matrix(&y, dims, k)?, Precision::F32)?, dims, k)?
            };
        }
    }
    Ok(y)
}

/// [`refresh_basis`] where `gg` and `q` live (`ops::linalg`): GG·Q's columns sorted by the
/// estimated eigenvalues diag(Qᵀ·GG·Q) (read to the host, d values, and sorted as the host
/// sorts them), and the Q of their QR.
fn refresh_basis_dev(gg: &Tensor, q: &Tensor) -> Result<(Tensor, Vec<usize>)> {
    let mp = matmul_t(gg, q, Precision::F32)?;
    let est = linalg::column_dots(q, &mp)?;
    let mut idx: Vec<usize> = (0..est.len()).collect();
    // Stable descending sort: ties keep their order.
    idx.sort_by(|&a, &b| est[b].total_cmp(&est[a]));
    Ok((linalg::qr_q_of_columns(&mp, &idx)?, idx))
}

/// A device tensor from host values.
fn up(v: &[f32], shape: &[usize], device: Device) -> dptrain_core::Result<Tensor> {
    Tensor::from_slice(v, shape)?.to_device(device)
}

/// Reorders `v` (a device view laid out as `dims`) along axis k by `idx`, in place: the
/// device's `permute_axis`, a row gather of the mode-k matrix.
fn permute_axis_dev(v: &Tensor, dims: &[usize], k: usize, idx: &[usize]) -> Result<()> {
    let ids: Vec<u32> = idx.iter().map(|&i| i as u32).collect();
    let sorted = rows(&mode_matrix(v, dims, k)?, &ids)?;
    flat::copy_into_cuda(v, &from_mode_matrix(&sorted, dims, k)?)?;
    Ok(())
}

impl Soap {
    /// The statistics of the parameters marked in `mine` from the device into the host copies
    /// the refresh reads, and their bases where the host has none (computed on the device by
    /// an earlier refresh, before the solver was switched off).
    fn statistics_down(&mut self, mine: &[bool]) -> Result<()> {
        let Some(d) = &self.dev else { return Ok(()) };
        for (((p, ggs), qs), _) in self.ps.iter_mut().zip(&d.gg).zip(&d.q).zip(mine).filter(|(_, &m)| m) {
            for ((f, gg), q) in p.factors.iter_mut().zip(ggs).zip(qs) {
                if let (Some(f), Some(gg)) = (f, gg) {
                    f.gg = gg.to_vec::<f32>()?;
                    if let Some(q) = q.as_ref().filter(|_| f.q.is_empty()) {
                        f.q = q.to_vec::<f32>()?;
                    }
                }
            }
        }
        Ok(())
    }

    /// The host's bases on `device` (`None` where a dim has no factor, or before the first).
    fn bases_on(&self, device: Device) -> dptrain_core::Result<Vec<Vec<Option<Tensor>>>> {
        self.ps
            .iter()
            .map(|p| {
                p.factors
                    .iter()
                    .map(|f| f.as_ref().filter(|f| !f.q.is_empty()).map(|f| up(&f.q, &[f.d, f.d], device)).transpose())
                    .collect()
            })
            .collect()
    }

    /// Moves the state to `device` at the first GPU step: the moments and statistics (the
    /// host's after a restore or CPU steps, else zeros made there; the host copies are freed)
    /// and the bases.
    fn move_to_device(&mut self, device: Device) -> Result<()> {
        let n = self.n;
        let (m, v) = (upload_state(&mut self.m, n, device)?, upload_state(&mut self.v, n, device)?);
        let gg = self
            .ps
            .iter()
            .map(|p| {
                p.factors
                    .iter()
                    .map(|f| {
                        f.as_ref()
                            .map(|f| match f.gg.is_empty() {
                                true => Tensor::zeros_on(&[f.d, f.d], dptrain_core::DType::F32, device),
                                false => up(&symmetric(&f.gg, f.d), &[f.d, f.d], device),
                            })
                            .transpose()
                    })
                    .collect()
            })
            .collect::<dptrain_core::Result<_>>()?;
        self.dev = Some(DevState { m, v, gg, q: self.bases_on(device)? });
        // The device accumulates the statistics from now on; a host refresh brings down those it
        // needs. Where the device refreshes the bases too, the host keeps none.
        let solver = linalg::solver_on(&self.dev.as_ref().expect("just made").v);
        for f in self.ps.iter_mut().flat_map(|p| p.factors.iter_mut().flatten()) {
            f.gg = Vec::new();
            if solver {
                f.q = Vec::new();
            }
        }
        Ok(())
    }

    /// GG_k ← GG_k + w·(Gram_k(g) − GG_k) on the device, in place (with `rec`, only when its
    /// gate is open).
    fn accumulate_statistics_dev(&self, i: usize, g: &Tensor, rec: Option<&flat::StepRecord>) -> Result<()> {
        let w = (1.0 - self.cfg.shampoo_beta()) as f32;
        let dims = &self.ps[i].dims;
        let d = self.dev.as_ref().expect("device state");
        for (k, gg) in d.gg[i].iter().enumerate() {
            if let Some(gg) = gg {
                // Along the last dim the mode matrix is g as [rest, d] read transposed: Gᵀ·G
                // with no copy.
                let rest: usize = dims[..k].iter().product();
                let gram = if k + 1 == dims.len() && rest > 1 {
                    let x = g.reshape(&[rest, dims[k]])?;
                    matmul_t(&x.transpose(0, 1)?, &x, Precision::F32)?
                } else {
                    let x = mode_matrix(&g.reshape(dims)?, dims, k)?;
                    matmul_t(&x, &x.transpose(0, 1)?, Precision::F32)?
                };
                flat::soap_statistics_cuda(gg, &gram, w, rec)?;
            }
        }
        Ok(())
    }

    /// A step on the GPU; `known_finite`: the caller has found every gradient finite. With
    /// `gate` (the step's record and clipping norm) the step is decided on the device: never the
    /// first step or a refresh ([`Optimizer::step_on_device`] leaves those to the host).
    fn step_device(
        &mut self,
        params: &mut ParamStore,
        grads: &GradStore,
        ctx: &mut StepCtx,
        known_finite: bool,
        gate: Option<(&flat::StepRecord, f64)>,
    ) -> Result<()> {
        if self.dev.is_none() {
            self.move_to_device(params.flat().device())?;
        }
        let g_all = grads.flat().clone();
        // At most one synchronisation: per parameter only when something is non-finite. A
        // device gate closes on a non-finite gradient, and then nothing below writes.
        let all_finite = known_finite || gate.is_some() || flat::sum_squares(&g_all)?.is_finite();
        let finite: Vec<bool> = if all_finite {
            vec![true; self.ps.len()]
        } else {
            self.ps
                .iter()
                .map(|s| g_all.narrow(0, s.offset, s.numel).and_then(|g| flat::sum_squares(&g)).map(f64::is_finite))
                .collect::<dptrain_core::Result<_>>()?
        };
        if !self.started {
            for i in 0..self.ps.len() {
                if finite[i] {
                    let s = &self.ps[i];
                    self.accumulate_statistics_dev(i, &g_all.narrow(0, s.offset, s.numel)?, None)?;
                }
            }
            let q = self.refresh_device(true, ctx.comm)?;
            self.install_bases(q)?;
            self.started = true;
            return Ok(());
        }
        let c = self.cfg;
        // A step decided on the device reads its learning rate and each parameter's decay from
        // the staged cell (a CUDA graph of the step uploads them before each replay).
        let (step_size, rec, staged) = match gate {
            Some((rec, max_norm)) => {
                self.stage_device_lr(ctx.lr);
                let t = self.t_dev.as_ref().expect("a device count for device-decided steps");
                let gate = flat::SoapGate { rec, max_norm, t, lr: &self.lr_dev };
                let staged = flat::soap_gate_cuda(&g_all, &gate, (c.beta1, c.beta2), c.correct_bias)?;
                self.ahead += 1;
                (0.0, Some(rec), Some(staged))
            }
            None => {
                // The count after steps decided on the device comes back from there; this
                // step's goes back.
                if let Some(t) = self.t_dev.as_ref().filter(|_| self.ahead > 0) {
                    self.t = t.get()?;
                }
                self.ahead = 0;
                let step_size = self.next_step_size(ctx.lr);
                if let Some(t) = &self.t_dev {
                    t.set(self.t)?;
                }
                (step_size, None, None)
            }
        };
        // Written in place through a view: no tape may still hold the parameters. The bf16
        // copy (what bf16 GEMMs read) is written in the same passes.
        let (p_all, p16) = params.flat_and_half_mut()?;
        let (p_all, p16) = (p_all.clone(), p16.map(|h| h.clone()));
        for i in 0..self.ps.len() {
            let (o, n, dims) = (self.ps[i].offset, self.ps[i].numel, self.ps[i].dims.clone());
            let d = self.dev.as_ref().expect("device state");
            let g = g_all.narrow(0, o, n)?;
            let (m, v) = (d.m.narrow(0, o, n)?, d.v.narrow(0, o, n)?);
            let gp = project_dev(&g, &dims, &d.q[i], false)?;
            flat::soap_moments_cuda(&gp, &m, &v, (1.0 - c.beta1) as f32, (1.0 - c.beta2) as f32, rec)?;
            let ratio = flat::soap_ratio_cuda(&m.reshape(&dims)?, &v.reshape(&dims)?, c.eps as f32)?;
            let u = project_dev(&ratio, &dims, &d.q[i], true)?;
            let h = p16.as_ref().map(|h| h.narrow(0, o, n)).transpose()?;
            let step = match (rec, &staged) {
                (Some(rec), Some(staged)) => flat::SoapStepSize::Gate { rec, scale: self.lr_scale[i], staged, param: i },
                _ => flat::SoapStepSize::Host { step: (step_size * self.lr_scale[i]) as f32, keep: self.keep_of(i, ctx.lr) },
            };
            flat::soap_apply_cuda(&p_all.narrow(0, o, n)?, &u, step, c.normalize_grads, h.as_ref())?;
            if finite[i] {
                self.accumulate_statistics_dev(i, &g, rec)?;
            }
        }
        if rec.is_none() && self.t.is_multiple_of(c.precondition_frequency.max(1)) {
            // New bases (on the device, or on the host where it has no solver; owner mode
            // included), v re-sorted; m turns from the old bases to the new ones.
            let new_q = self.refresh_device(false, ctx.comm)?;
            let d = self.dev.as_ref().expect("device state");
            for (i, s) in self.ps.iter().enumerate() {
                if s.factors.iter().any(Option::is_some) {
                    let m = d.m.narrow(0, s.offset, s.numel)?;
                    let turned = project_dev(&project_dev(&m, &s.dims, &d.q[i], true)?, &s.dims, &new_q[i], false)?;
                    flat::copy_into_cuda(&m, &turned)?;
                }
            }
            self.install_bases(new_q)?;
        }
        Ok(())
    }

    /// The first moment in the original space, as the reference keeps it (host or device).
    fn m_original(&self) -> Result<Vec<f32>> {
        let mut out = vec![0.0f32; self.n];
        for (i, s) in self.ps.iter().enumerate() {
            let (o, n) = (s.offset, s.numel);
            let mo = match &self.dev {
                Some(d) => project_dev(&d.m.narrow(0, o, n)?, &s.dims, &d.q[i], true)?.to_vec::<f32>()?,
                // No step yet: zeros.
                None if self.m.len() != self.n => continue,
                None if self.started => project(&self.m[o..o + n], &s.dims, &s.factors, true),
                None => self.m[o..o + n].to_vec(),
            };
            out[o..o + n].copy_from_slice(&mo);
        }
        Ok(out)
    }
}

impl Optimizer for Soap {
    fn step(&mut self, params: &mut ParamStore, grads: &GradStore, ctx: &mut StepCtx) -> Result<()> {
        if params.flat().is_cuda() {
            return self.step_device(params, grads, ctx, false, None);
        }
        let g = grads.flat().data::<f32>()?;
        let p = params.flat_mut::<f32>()?;
        self.step_host(p, g, ctx)
    }

    /// The host path checks finiteness per parameter as it goes (no extra pass); on a GPU the
    /// check of the whole buffer and its wait are skipped.
    fn step_finite(&mut self, params: &mut ParamStore, grads: &GradStore, ctx: &mut StepCtx) -> Result<()> {
        if params.flat().is_cuda() {
            return self.step_device(params, grads, ctx, true, None);
        }
        self.step(params, grads, ctx)
    }

    /// Every step but the first (the bases' initialisation) and a basis refresh (eigh/QR, and
    /// sorting by estimated eigenvalues, read by the host). Which step refreshes follows the count of applied updates, which the host only knows
    /// after reading the device's: the step that would refresh if every step decided on the
    /// device since was applied goes to the host, which then reads the count and refreshes if
    /// the step truly is one (steps decided on the device come before it, so never are).
    fn step_on_device(
        &mut self,
        params: &mut ParamStore,
        grads: &GradStore,
        ctx: &mut StepCtx,
        rec: &flat::StepRecord,
        max_norm: f64,
    ) -> Result<bool> {
        if !self.device_decides_next(params) {
            return Ok(false);
        }
        if self.t_dev.is_none() {
            self.t_dev = Some(flat::DeviceStepCount::new(params.flat(), self.t)?);
        }
        self.step_device(params, grads, ctx, true, Some((rec, max_norm)))?;
        Ok(true)
    }

    fn decides_next_step_on_device(&self, params: &ParamStore) -> bool {
        self.device_decides_next(params)
    }
    /// The learning rate and each parameter's decay factor, as the device-decided step's
    /// kernels read them.
    fn stage_device_lr(&mut self, lr: f64) {
        let keep: Vec<f32> = (0..self.ps.len()).map(|i| self.keep_of(i, lr)).collect();
        self.lr_dev.stage_per_param(lr, &keep);
    }
    /// A replayed step was decided on the device as `step_on_device` decides one.
    fn replayed(&mut self) {
        self.ahead += 1;
    }
    fn state(&self, params: &ParamStore) -> Result<(Vec<(String, Tensor)>, serde_json::Value)> {
        // On a GPU the state is read back (once per checkpoint).
        let dev = self.dev.as_ref();
        let m = saved_state(&self.m, dev.map(|d| &d.m), self.n)?;
        let v = saved_state(&self.v, dev.map(|d| &d.v), self.n)?;
        let mut out = split_state("exp_avg", &self.m_original()?, params);
        out.extend(split_state("exp_avg_eig", &m, params));
        out.extend(split_state("exp_avg_sq", &v, params));
        for (i, p) in self.ps.iter().enumerate() {
            for (k, f) in p.factors.iter().enumerate() {
                if let Some(f) = f {
                    let shape = [f.d, f.d];
                    let (gg, q) = match &self.dev {
                        Some(d) => (
                            d.gg[i][k].as_ref().map(|t| t.to_vec::<f32>()).transpose()?.unwrap_or_default(),
                            d.q[i][k].as_ref().map(|t| t.to_vec::<f32>()).transpose()?.unwrap_or_default(),
                        ),
                        None => (symmetric(&f.statistics(), f.d), f.q.clone()),
                    };
                    out.push((format!("GG{k}.{}", p.name), Tensor::from_vec(gg, &shape)?));
                    if self.started {
                        out.push((format!("Q{k}.{}", p.name), Tensor::from_vec(q, &shape)?));
                    }
                }
            }
        }
        Ok((out, serde_json::json!({ "step": self.steps()?, "started": self.started })))
    }

    fn load_state(&mut self, params: &ParamStore, t: &std::collections::HashMap<String, Tensor>, s: &serde_json::Value) -> Result<()> {
        self.dev = None;
        (self.t_dev, self.ahead) = (None, 0);
        // m as kept (a checkpoint of ours), else the reference's original-space m, projected
        // below once the bases are loaded.
        let eig = params.infos().first().is_none_or(|p| t.contains_key(&format!("exp_avg_eig.{}", p.name)));
        let n = self.n;
        join_state(if eig { "exp_avg_eig" } else { "exp_avg" }, host_state(&mut self.m, n), params, t)?;
        join_state("exp_avg_sq", host_state(&mut self.v, n), params, t)?;
        self.t = s.get("step").and_then(|x| x.as_u64()).ok_or_else(|| OptimError::State("missing `step`".into()))?;
        self.started = s.get("started").and_then(|x| x.as_bool()).ok_or_else(|| OptimError::State("missing `started`".into()))?;
        let started = self.started;
        for p in &mut self.ps {
            for (k, f) in p.factors.iter_mut().enumerate() {
                if let Some(f) = f {
                    let get = |what: &str| -> Result<Vec<f32>> {
                        let key = format!("{what}{k}.{}", p.name);
                        let x = t.get(&key).ok_or_else(|| OptimError::State(format!("missing `{key}`")))?;
                        if x.shape() != [f.d, f.d] {
                            return Err(OptimError::State(format!("`{key}` has shape {:?}, expected [{}, {}]", x.shape(), f.d, f.d)));
                        }
                        Ok(x.to_vec::<f32>()?)
                    };
                    f.gg = get("GG")?;
                    if started {
                        f.q = get("Q")?;
                    }
                }
            }
            if started && !eig {
                let (o, n) = (p.offset, p.numel);
                let mq = project(&self.m[o..o + n], &p.dims, &p.factors, false);
                self.m[o..o + n].copy_from_slice(&mq);
            }
        }
        Ok(())
    }

    fn name(&self) -> &'static str {
        "soap"
    }
    fn adam_view(&self) -> Result<Option<crate::AdamView>> {
        let (c, t) = (&self.cfg, self.steps()?);
        let corr = if c.correct_bias {
            (1.0 / (1.0 - crate::adamw::powi(c.beta1, t)), 1.0 / (1.0 - crate::adamw::powi(c.beta2, t)))
        } else {
            (1.0, 1.0)
        };
        crate::AdamView::of(None, &self.v, self.dev.as_ref().map(|d| (None, &d.v)), (corr.0, corr.1, c.eps), t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merge_dims_follows_the_reference_table() {
        assert_eq!(merge_dims(&[4, 3, 3, 3], 16), vec![12, 9]);
        assert_eq!(merge_dims(&[1024, 1024, 3, 3], 10000), vec![1024, 9216]);
        assert_eq!(merge_dims(&[64, 3, 7, 7], 10000), vec![9408]);
        assert_eq!(merge_dims(&[1, 5], 10000), vec![5]);
    }

    #[test]
    fn projections_are_mode_products_and_invert() {
        // A 2×3 tensor, bases a rotation (2×2) and a permutation-with-sign (3×3).
        let dims = [2, 3];
        let (c, s) = (0.6f32, 0.8f32);
        let q0 = vec![c, -s, s, c];
        let q1 = vec![0.0, 1.0, 0.0, 0.0, 0.0, -1.0, 1.0, 0.0, 0.0];
        let f = |d: usize, q: Vec<f32>| Some(Factor { d, gg: vec![0.0; d * d], q });
        let factors = vec![f(2, q0.clone()), f(3, q1.clone())];
        let x: Vec<f32> = (1..=6).map(|v| v as f32).collect();
        let y = project(&x, &dims, &factors, false);
        // Q0ᵀ X Q1, by hand.
        let mut want = vec![0.0f32; 6];
        for j in 0..2 {
            for l in 0..3 {
                for i in 0..2 {
                    for k in 0..3 {
                        want[j * 3 + l] += q0[i * 2 + j] * x[i * 3 + k] * q1[k * 3 + l];
                    }
                }
            }
        }
        for (a, b) in y.iter().zip(&want) {
            assert!((a - b).abs() < 1e-5, "{y:?} vs {want:?}");
        }
        let back = project(&y, &dims, &factors, true);
        for (a, b) in back.iter().zip(&x) {
            assert!((a - b).abs() < 1e-5, "{back:?} vs {x:?}");
        }
    }

    /// A small model's store: matrices (one merged-dim candidate), a vector and a scalar-like
    /// tensor, so every path (two factors, one, none) runs.
    fn store() -> ParamStore {
        use dptrain_core::{DType, Init, ParamBuilder, Role};
        let mut b = ParamBuilder::new();
        b.add("a", &[6, 4], Role::Hidden, 4, 6, Init::Normal { std: 0.5 });
        b.add("b", &[5], Role::Vector, 1, 1, Init::Normal { std: 0.5 });
        b.add("c", &[3, 7], Role::Hidden, 7, 3, Init::Normal { std: 0.5 });
        b.add("d", &[2, 3, 2], Role::Hidden, 6, 2, Init::Normal { std: 0.5 });
        b.build(1, DType::F32).unwrap()
    }

    fn trajectory(cfg: SoapConfig, threads: usize) -> (Vec<f32>, Soap, ParamStore) {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
        pool.install(|| {
            let mut ps = store();
            let mut opt = Soap::new(cfg, &ps);
            let mut g = GradStore::new(&ps);
            let mut rng = dptrain_core::rng::Rng::new(5);
            let mut comm = dptrain_comm::LocalComm::new();
            for i in 0..9 {
                let gr: Vec<f32> = (0..ps.numel()).map(|_| rng.normal() as f32).collect();
                g.flat_mut::<f32>().unwrap().copy_from_slice(&gr);
                opt.step(&mut ps, &g, &mut StepCtx { step: i + 1, lr: 0.01, comm: &mut comm }).unwrap();
            }
            (ps.flat().to_vec::<f32>().unwrap(), opt, ps)
        })
    }

    #[test]
    fn the_step_does_not_depend_on_the_thread_count() {
        let cfg = SoapConfig { precondition_frequency: 3, merge_dims: true, max_precond_dim: 6, ..Default::default() };
        let (one, _, _) = trajectory(cfg, 1);
        let (three, _, _) = trajectory(cfg, 3);
        assert_eq!(one, three);
    }

    #[test]
    fn m_kept_in_the_eigenbasis_is_the_projection_of_the_reference_m() {
        // The reference's m is lerp(m, g) in the original space: replay it beside the optimizer
        // and compare with what the saved state turns back (`exp_avg`), across refreshes.
        let cfg = SoapConfig { precondition_frequency: 2, ..Default::default() };
        let (_, opt, ps) = trajectory(cfg, 1);
        let mut rng = dptrain_core::rng::Rng::new(5);
        let mut m = vec![0.0f32; ps.numel()];
        for i in 0..9 {
            let gr: Vec<f32> = (0..ps.numel()).map(|_| rng.normal() as f32).collect();
            if i > 0 {
                for (m, g) in m.iter_mut().zip(&gr) {
                    *m += (1.0 - cfg.beta1 as f32) * (g - *m);
                }
            }
        }
        let (tensors, _) = opt.state(&ps).unwrap();
        let get = |k: &str| tensors.iter().find(|(n, _)| n == k).unwrap().1.to_vec::<f32>().unwrap();
        let mut at = 0;
        for name in ["a", "b", "c", "d"] {
            let (orig, eig) = (get(&format!("exp_avg.{name}")), get(&format!("exp_avg_eig.{name}")));
            for (x, y) in orig.iter().zip(&m[at..]) {
                assert!((x - y).abs() < 1e-5, "{name}: {orig:?} vs {:?}", &m[at..at + orig.len()]);
            }
            // A matrix's eigenbasis m is not its original-space m.
            if name != "b" {
                assert!(orig.iter().zip(&eig).any(|(x, y)| (x - y).abs() > 1e-3), "{name}");
            }
            at += orig.len();
        }
    }

    #[test]
    fn eigenbasis_is_orthonormal_and_sorted_descending() {
        let d = 4;
        let a: Vec<f32> = vec![4.0, 1.0, 0.0, 0.0, 1.0, 3.0, 0.5, 0.0, 0.0, 0.5, 2.0, 0.1, 0.0, 0.0, 0.1, 1.0];
        let q = eigenbasis(&a, d).unwrap();
        // Qᵀ Q = I and the Rayleigh quotients descend.
        let mut last = f64::INFINITY;
        for j in 0..d {
            for l in 0..d {
                let dot: f64 = (0..d).map(|i| q[i * d + j] as f64 * q[i * d + l] as f64).sum();
                assert!((dot - if j == l { 1.0 } else { 0.0 }).abs() < 1e-5);
            }
            let ray: f64 =
                (0..d).map(|i| (0..d).map(|k| q[i * d + j] as f64 * a[i * d + k] as f64 * q[k * d + j] as f64).sum::<f64>()).sum();
            assert!(ray <= last + 1e-9);
            last = ray;
        }
        // Bitwise reproducible.
        assert_eq!(q, eigenbasis(&a, d).unwrap());
    }
}
