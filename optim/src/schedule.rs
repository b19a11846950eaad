//! Learning-rate schedules as pure functions of the step: linear warmup from 0 to the peak
//! over `warmup_steps` (lr = peak·(s+1)/warmup, as nanoGPT), then cosine, linear or constant
//! to `final_lr` at `total_steps`.

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ScheduleKind {
    Cosine,
    Linear,
    Constant,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Schedule {
    pub kind: ScheduleKind,
    pub peak_lr: f64,
    pub final_lr: f64,
    pub warmup_steps: u64,
    pub total_steps: u64,
}

impl Schedule {
    /// LR for 0-based optimizer step `step`.
    pub fn lr(&self, step: u64) -> f64 {
        if step < self.warmup_steps {
            return self.peak_lr * (step + 1) as f64 / self.warmup_steps as f64;
        }
        let span = self.total_steps.saturating_sub(self.warmup_steps).max(1) as f64;
        let frac = ((step - self.warmup_steps) as f64 / span).min(1.0);
        let (p, f) = (self.peak_lr, self.final_lr);
        match self.kind {
            ScheduleKind::Constant => p,
            ScheduleKind::Linear => p + (f - p) * frac,
            ScheduleKind::Cosine => f + 0.5 * (p - f) * (1.0 + (std::f64::consts::PI * frac).cos()),
        }
    }
}
