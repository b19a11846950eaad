//! Probe recording. Models report instability probes (max attention logit of a layer, output
//! logit mean and log Z, residual-stream RMS, ...) during forward into a `ProbeSink`, each with
//! the reduction that combines it over micro-steps and ranks (a maximum stays a maximum, a mean a
//! mean), so the trainer reduces by what a probe is, not by its name. Names are stable strings
//! such as `attn_logit_max/3` so downstream tools can plot them.
//!
//! A sink can be off ([`ProbeSink::enabled`]): the trainer turns probes on only for the steps it
//! logs, and models skip the probes that cost work (a norm over an activation, on a GPU a device
//! synchronisation) when it is off.

/// How a probe's values combine over micro-steps and over ranks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reduce {
    Mean,
    Max,
    Min,
    Sum,
}

/// Receives named scalar probe values.
pub trait ProbeSink {
    fn record(&mut self, name: &str, reduce: Reduce, value: f64);
    /// Whether recorded values are kept: when not, a model may skip computing them.
    fn enabled(&self) -> bool {
        true
    }
}

/// A sink that keeps values in recording order, with their reductions.
#[derive(Debug, Clone)]
pub struct Probes {
    pub values: Vec<(String, Reduce, f64)>,
    on: bool,
}

impl Default for Probes {
    fn default() -> Self {
        Probes { values: vec![], on: true }
    }
}

impl ProbeSink for Probes {
    fn record(&mut self, name: &str, reduce: Reduce, value: f64) {
        if self.on {
            self.values.push((name.to_string(), reduce, value));
        }
    }
    fn enabled(&self) -> bool {
        self.on
    }
}

impl Probes {
    /// A sink that is on only when `on` (the trainer: on logging steps).
    pub fn on_if(on: bool) -> Probes {
        Probes { values: vec![], on }
    }
    pub fn get(&self, name: &str) -> Option<f64> {
        self.values.iter().rev().find(|(n, _, _)| n == name).map(|(_, _, v)| *v)
    }
    /// Folds another micro-step's values into these, probe by probe, with each probe's
    /// reduction (means are summed here; [`Probes::finish_mean`] divides).
    pub fn accumulate(&mut self, other: Probes) {
        for (k, r, v) in other.values {
            match self.values.iter_mut().find(|(n, _, _)| *n == k) {
                Some((_, r, acc)) => {
                    *acc = match r {
                        Reduce::Max => acc.max(v),
                        Reduce::Min => acc.min(v),
                        Reduce::Mean | Reduce::Sum => *acc + v,
                    }
                }
                None => self.values.push((k, r, v)),
            }
        }
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

/// A sink that drops everything.
pub struct NoProbes;

impl ProbeSink for NoProbes {
    fn record(&mut self, _: &str, _: Reduce, _: f64) {}
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
}
