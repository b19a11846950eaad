//! `ParamScales`: per-parameter multipliers of the learning rate and the weight decay — what
//! torch expresses with parameter groups, and μP with per-layer learning rates. One entry per
//! parameter (indexed by `ParamId`); the fused updates read them one value per parameter, on
//! the host and, uploaded once with the segment table, on the parameters' device — never one
//! per element, which would cost as much memory as a moment.

use dptrain_core::{ParamStore, Role};

#[derive(Debug, Clone, PartialEq)]
pub struct ParamScales {
    /// Learning-rate multiplier per parameter.
    pub lr: Vec<f64>,
    /// Weight-decay multiplier per parameter (0 exempts it).
    pub wd: Vec<f64>,
}

impl ParamScales {
    /// Every multiplier 1.
    pub fn ones(params: &ParamStore) -> ParamScales {
        let n = params.infos().len();
        ParamScales { lr: vec![1.0; n], wd: vec![1.0; n] }
    }

    /// The usual grouping: weight decay on matrices only — biases and norm gains (role
    /// `Vector`) are exempt unless `decay_vectors`, as in nanoGPT and most large-batch recipes.
    pub fn standard(params: &ParamStore, decay_vectors: bool) -> ParamScales {
        let mut s = ParamScales::ones(params);
        for (i, p) in params.infos().iter().enumerate() {
            if !decay_vectors && p.role == Role::Vector {
                s.wd[i] = 0.0;
            }
        }
        s
    }

    /// Whether any learning-rate multiplier differs from 1 (the update then reads them).
    pub fn scales_lr(&self) -> bool {
        self.lr.iter().any(|&x| x != 1.0)
    }

    /// `f(parameter index)` for every parameter, as the updates read it.
    pub(crate) fn per_param(&self, f: impl Fn(usize) -> f64) -> Vec<f32> {
        (0..self.lr.len()).map(|i| f(i) as f32).collect()
    }

    /// The learning-rate multipliers, or `None` when all are 1.
    pub(crate) fn lr_per_param(&self) -> Option<Vec<f32>> {
        self.scales_lr().then(|| self.per_param(|i| self.lr[i]))
    }

    /// Checks one entry per parameter, each finite and ≥ 0.
    pub(crate) fn validate(&self, params: &ParamStore) -> crate::Result<()> {
        let n = params.infos().len();
        if self.lr.len() != n || self.wd.len() != n {
            return Err(crate::OptimError::State(format!(
                "parameter scales: {} learning-rate and {} weight-decay multipliers for {n} parameters",
                self.lr.len(),
                self.wd.len()
            )));
        }
        if let Some(x) = self.lr.iter().chain(&self.wd).find(|x| !(x.is_finite() && **x >= 0.0)) {
            return Err(crate::OptimError::State(format!("parameter scales: multiplier {x} is not a finite number ≥ 0")));
        }
        Ok(())
    }
}
