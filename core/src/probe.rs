//! Probe recording. Models report instability probes (max attention logit of a layer, output
//! logit mean and log Z, residual-stream RMS, ...) during forward into a `ProbeSink`; the
//! trainer decides what to average across ranks and log. Names are stable strings such as
//! `attn_logit_max/3` so downstream tools can plot them.

/// Receives named scalar probe values.
pub trait ProbeSink {
    fn record(&mut self, name: &str, value: f64);
}

/// A sink that keeps values in recording order.
#[derive(Debug, Default, Clone)]
pub struct Probes(pub Vec<(String, f64)>);

impl ProbeSink for Probes {
    fn record(&mut self, name: &str, value: f64) {
        self.0.push((name.to_string(), value));
    }
}

impl Probes {
    pub fn get(&self, name: &str) -> Option<f64> {
        self.0.iter().rev().find(|(n, _)| n == name).map(|(_, v)| *v)
    }
}

/// A sink that drops everything.
pub struct NoProbes;

impl ProbeSink for NoProbes {
    fn record(&mut self, _: &str, _: f64) {}
}
