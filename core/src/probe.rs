//! Probe recording. Models report instability probes (max attention logit of a layer, output
//! logit mean and log Z, residual-stream RMS, ...) during forward into a `ProbeSink`, each with
//! the reduction that combines it over micro-steps and ranks (a maximum stays a maximum, a mean a
//! mean), so the trainer reduces by what a probe is, not by its name. Names are stable strings
//! such as `attn_logit_max/3` so downstream tools can plot them.
//!
//! A sink can be off ([`ProbeSink::enabled`]): the trainer turns probes on only for the steps it
//! logs, and models skip the probes that cost work (a norm over an activation, on a GPU a device
//! synchronisation) when it is off.
//!
//! The coordinate check (`dptrain coord-check`) asks for one more kind of probe: the mean |x| of
//! every module's output, recorded as `coord/<module>` only when the sink wants them
//! ([`ProbeSink::coords`]) — they cost a pass over each activation.
//!
//! A value computed on a GPU can stay there ([`ProbeValue::Device`]): `Probes` keeps it pending
//! and [`Probes::resolve`] reads every pending value in one device-to-host transfer, on the
//! logging step, instead of one synchronisation per layer and micro-step.

use crate::error::Result;
use crate::tensor::Tensor;

/// How a probe's values combine over micro-steps and over ranks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reduce {
    Mean,
    Max,
    Min,
    Sum,
    /// Where a maximum is: a probe named `<anchor>@<what>` (e.g. `massive_top1/0@token`) keeps
    /// the value recorded with the largest value of the `Max` probe `<anchor>` — over
    /// micro-steps and over ranks — so a location follows its maximum.
    At,
}

/// The anchor of an [`Reduce::At`] probe's name (`massive_top1/0` of `massive_top1/0@token`).
pub fn anchor_of(name: &str) -> &str {
    name.rsplit_once('@').map_or(name, |(a, _)| a)
}

/// Which model-side probe families a sink wants; each costs a pass over some activations, so
/// models compute only these. The trainer sets them from `[probes]`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ProbeSet {
    /// Max attention logit per layer, max ‖q‖ and ‖k‖ per head.
    pub attention: bool,
    /// Output-logit mean, mean and max log Z (free: the cross-entropy computes them).
    pub logits: bool,
    /// Residual-stream RMS per block.
    pub residual: bool,
    /// Massive activations per block output (top-1 and median |h|, where the top-1 is).
    pub massive: bool,
    /// MLP activation sparsity per layer: the fraction of entries ≤ `sparsity_threshold`.
    pub sparsity: bool,
    pub sparsity_threshold: f64,
}

impl ProbeSet {
    pub const ALL: ProbeSet =
        ProbeSet { attention: true, logits: true, residual: true, massive: true, sparsity: true, sparsity_threshold: 0.0 };
    pub const NONE: ProbeSet =
        ProbeSet { attention: false, logits: false, residual: false, massive: false, sparsity: false, sparsity_threshold: 0.0 };
}

/// A probe value: on the host, or a tensor (typically on a GPU) whose elements combine by the
/// given reduction into the value (e.g. the per-row maxima of attention logits, by `Max`).
#[derive(Debug, Clone)]
pub enum ProbeValue {
    Host(f64),
    Device(Tensor, Reduce),
}

impl ProbeValue {
    /// The value on the host (a device value is downloaded: this waits for the device).
    pub fn to_host(&self) -> Result<f64> {
        match self {
            ProbeValue::Host(v) => Ok(*v),
            ProbeValue::Device(t, r) => Ok(combine(&t.to_vec::<f32>()?, *r)),
        }
    }
}

/// The elements of a device probe value combined by its reduction.
fn combine(x: &[f32], r: Reduce) -> f64 {
    match r {
        Reduce::Max => x.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64,
        Reduce::Min => x.iter().copied().fold(f32::INFINITY, f32::min) as f64,
        Reduce::Sum => x.iter().map(|&v| v as f64).sum(),
        Reduce::Mean => x.iter().map(|&v| v as f64).sum::<f64>() / x.len().max(1) as f64,
        // A location is recorded on the host beside its maximum; a device value has one element.
        Reduce::At => x.first().copied().unwrap_or(f32::NAN) as f64,
    }
}

/// Receives named scalar probe values.
pub trait ProbeSink {
    fn record(&mut self, name: &str, reduce: Reduce, value: f64);
    /// Records a value that may still be on a device. The default reads it at once; `Probes`
    /// keeps device values pending until [`Probes::resolve`].
    fn record_value(&mut self, name: &str, reduce: Reduce, value: ProbeValue) {
        if !self.enabled() {
            return;
        }
        // A value that cannot be read (a failed device) shows as NaN rather than stopping a run.
        self.record(name, reduce, value.to_host().unwrap_or(f64::NAN));
    }
    /// Whether recorded values are kept: when not, a model may skip computing them.
    fn enabled(&self) -> bool {
        true
    }
    /// Whether the sink wants every module's mean |output| (`coord/<module>`).
    fn coords(&self) -> bool {
        false
    }
    /// The probe families wanted (all of them when the sink is on, unless it says otherwise).
    fn set(&self) -> ProbeSet {
        if self.enabled() {
            ProbeSet::ALL
        } else {
            ProbeSet::NONE
        }
    }
}

/// Records `coord/<module>` = mean |x| of a module's output when the sink wants coordinates.
/// The name is formatted and the value read only then (`format_args!` costs nothing), so the
/// call can sit in every forward.
pub fn record_coord(sink: &mut dyn ProbeSink, module: std::fmt::Arguments<'_>, x: &crate::autograd::Var<'_>) {
    if !sink.coords() {
        return;
    }
    let mean_abs = x.value().to_vec::<f64>().map(|v| v.iter().map(|a| a.abs()).sum::<f64>() / v.len().max(1) as f64).unwrap_or(f64::NAN);
    sink.record(&format!("coord/{module}"), Reduce::Mean, mean_abs);
}

/// A sink that keeps values in recording order, with their reductions.
#[derive(Debug, Clone)]
pub struct Probes {
    pub values: Vec<(String, Reduce, f64)>,
    /// Device values not read yet, in recording order (micro-step by micro-step), each folded
    /// into `values` by `resolve` as `accumulate` would have.
    pending: Vec<(String, Reduce, Tensor, Reduce)>,
    on: bool,
    coords: bool,
    set: ProbeSet,
}

impl Default for Probes {
    fn default() -> Self {
        Probes { values: vec![], pending: vec![], on: true, coords: false, set: ProbeSet::ALL }
    }
}

impl ProbeSink for Probes {
    fn record(&mut self, name: &str, reduce: Reduce, value: f64) {
        if self.on {
            self.values.push((name.to_string(), reduce, value));
        }
    }
    fn record_value(&mut self, name: &str, reduce: Reduce, value: ProbeValue) {
        match value {
            _ if !self.on => {}
            ProbeValue::Host(v) => self.record(name, reduce, v),
            ProbeValue::Device(t, r) => self.pending.push((name.to_string(), reduce, t, r)),
        }
    }
    fn enabled(&self) -> bool {
        self.on
    }
    fn coords(&self) -> bool {
        self.coords
    }
    fn set(&self) -> ProbeSet {
        if self.on {
            self.set
        } else {
            ProbeSet::NONE
        }
    }
}

impl Probes {
    /// A sink that is on only when `on` (the trainer: on logging steps).
    pub fn on_if(on: bool) -> Probes {
        Probes { values: vec![], pending: vec![], on, coords: false, set: ProbeSet::ALL }
    }
    /// A sink that is on only when `on`, wanting the families of `set`.
    pub fn with_set(on: bool, set: ProbeSet) -> Probes {
        Probes { values: vec![], pending: vec![], on, coords: false, set }
    }
    /// A sink that also takes every module's mean |output| (the coordinate check).
    pub fn with_coords() -> Probes {
        Probes { values: vec![], pending: vec![], on: true, coords: true, set: ProbeSet::ALL }
    }
    pub fn get(&self, name: &str) -> Option<f64> {
        self.values.iter().rev().find(|(n, _, _)| n == name).map(|(_, _, v)| *v)
    }
    /// Folds another micro-step's values into these, probe by probe, with each probe's
    /// reduction (means are summed here; [`Probes::finish_mean`] divides).
    pub fn accumulate(&mut self, other: Probes) {
        // Locations first, while both anchors still hold their own micro-step's maximum.
        for (k, r, v) in &other.values {
            if *r != Reduce::At {
                continue;
            }
            let anchor = anchor_of(k);
            let (mine, theirs) = (self.get(anchor), other.get(anchor));
            let take = match (mine, theirs) {
                (Some(m), Some(t)) => t > m,
                (None, _) => true,
                (Some(_), None) => false,
            };
            match self.values.iter_mut().find(|(n, _, _)| n == k) {
                Some(slot) if take => slot.2 = *v,
                Some(_) => {}
                None => self.values.push((k.clone(), Reduce::At, *v)),
            }
        }
        for (k, r, v) in other.values {
            if r != Reduce::At {
                self.fold(k, r, v);
            }
        }
        self.pending.extend(other.pending);
    }

    fn fold(&mut self, k: String, r: Reduce, v: f64) {
        match self.values.iter_mut().find(|(n, _, _)| *n == k) {
            Some((_, r, acc)) => {
                *acc = match r {
                    Reduce::Max => acc.max(v),
                    Reduce::Min => acc.min(v),
                    Reduce::Mean | Reduce::Sum => *acc + v,
                    Reduce::At => *acc,
                }
            }
            None => self.values.push((k, r, v)),
        }
    }

    /// Reads every pending device value — gathered on the device, then one transfer — and
    /// folds them into `values` in recording order.
    pub fn resolve(&mut self) -> Result<()> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let pending = std::mem::take(&mut self.pending);
        let tensors: Vec<&Tensor> = pending.iter().map(|p| &p.2).collect();
        let host = gather_to_host(&tensors)?;
        let mut at = 0;
        for (k, r, t, er) in pending {
            let n = t.numel();
            self.fold(k, r, combine(&host[at..at + n], er));
            at += n;
        }
        Ok(())
    }
    /// Divides the accumulated means by the number of micro-steps folded in.
    pub fn finish_mean(&mut self, micro_steps: usize) {
        for (_, r, v) in &mut self.values {
            if *r == Reduce::Mean {
                *v /= micro_steps as f64;
            }
        }
    }
}

/// The elements of `ts` (f32), concatenated on the host; device tensors are first gathered into
/// one device buffer, so they cost one transfer however many there are.
fn gather_to_host(ts: &[&Tensor]) -> Result<Vec<f32>> {
    #[cfg(feature = "cuda")]
    if ts.iter().all(|t| t.is_cuda()) && !ts.is_empty() {
        use crate::kernels::cuda::ops as gpu;
        let d = gpu::dev_of(ts[0])?;
        let total: usize = ts.iter().map(|t| t.numel()).sum();
        let all = gpu::empty(&d, &[total])?;
        let mut at = all.device_region(0, total)?.ptr;
        for t in ts {
            let t = gpu::contiguous(t)?;
            let r = t.device_region(0, t.numel())?;
            d.copy(at, r.ptr, r.bytes())?;
            at += r.bytes() as u64;
        }
        return all.to_vec::<f32>();
    }
    let mut out = vec![];
    for t in ts {
        out.extend(t.to_vec::<f32>()?);
    }
    Ok(out)
}

/// A sink that drops everything.
pub struct NoProbes;

impl ProbeSink for NoProbes {
    fn record(&mut self, _: &str, _: Reduce, _: f64) {}
    fn record_value(&mut self, _: &str, _: Reduce, _: ProbeValue) {}
    fn enabled(&self) -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn micro_steps_combine_by_each_probes_reduction() {
        let mut acc = Probes::default();
        for (m, x) in [(1.0, 5.0), (3.0, 2.0)] {
            let mut p = Probes::default();
            p.record("mean", Reduce::Mean, m);
            p.record("max", Reduce::Max, x);
            p.record("min", Reduce::Min, x);
            p.record("sum", Reduce::Sum, m);
            acc.accumulate(p);
        }
        acc.finish_mean(2);
        assert_eq!([acc.get("mean"), acc.get("max"), acc.get("min"), acc.get("sum")], [Some(2.0), Some(5.0), Some(2.0), Some(4.0)]);
        let mut off = Probes::on_if(false);
        off.record("x", Reduce::Mean, 1.0);
        assert!(!off.enabled() && off.values.is_empty());
    }

    /// Tensor-held values stay pending until `resolve`, then fold in recording order exactly
    /// as host values recorded micro-step by micro-step would.
    #[test]
    fn pending_values_resolve_like_host_values() {
        let (mut host, mut dev) = (Probes::default(), Probes::default());
        for rows in [[1.0f32, 7.0, -2.0], [3.0, 2.0, 9.5]] {
            let t = Tensor::from_slice(&rows, &[3]).unwrap();
            let (mut h, mut d) = (Probes::default(), Probes::default());
            h.record("m", Reduce::Max, ProbeValue::Device(t.clone(), Reduce::Max).to_host().unwrap());
            h.record("a", Reduce::Mean, ProbeValue::Device(t.clone(), Reduce::Mean).to_host().unwrap());
            d.record_value("m", Reduce::Max, ProbeValue::Device(t.clone(), Reduce::Max));
            d.record_value("a", Reduce::Mean, ProbeValue::Device(t, Reduce::Mean));
            host.accumulate(h);
            dev.accumulate(d);
        }
        assert!(dev.values.is_empty());
        dev.resolve().unwrap();
        assert_eq!(dev.get("m"), Some(9.5));
        assert_eq!(dev.values, host.values);
        let mut off = Probes::on_if(false);
        off.record_value("m", Reduce::Max, ProbeValue::Device(Tensor::from_slice(&[1.0f32], &[1]).unwrap(), Reduce::Max));
        off.resolve().unwrap();
        assert!(off.values.is_empty());
    }
}

#[cfg(test)]
mod location_tests {
    use super::*;

    /// A location follows its anchor's maximum over micro-steps, whichever micro-step held it.
    #[test]
    fn locations_follow_their_maximum_over_micro_steps() {
        let step = |top: f64, token: f64| {
            let mut p = Probes::default();
            p.record("massive_top1/0", Reduce::Max, top);
            p.record("massive_top1/0@token", Reduce::At, token);
            p.record("massive_median/0", Reduce::Mean, 1.0);
            p
        };
        let mut acc = Probes::default();
        acc.accumulate(step(5.0, 3.0));
        acc.accumulate(step(9.0, 7.0));
        acc.accumulate(step(2.0, 1.0));
        acc.finish_mean(3);
        assert_eq!(acc.get("massive_top1/0"), Some(9.0));
        assert_eq!(acc.get("massive_top1/0@token"), Some(7.0));
        assert_eq!(acc.get("massive_median/0"), Some(1.0));
        assert_eq!(anchor_of("massive_top1/0@token"), "massive_top1/0");
    }

    /// Families a sink does not want are off; an off sink wants none.
    #[test]
    fn probe_sets_follow_the_sink() {
        let set = ProbeSet { massive: false, ..ProbeSet::ALL };
        assert_eq!(Probes::with_set(true, set).set(), set);
        assert_eq!(Probes::with_set(false, set).set(), ProbeSet::NONE);
        assert_eq!(Probes::on_if(true).set(), ProbeSet::ALL);
    }
}
