//! The typed configuration a run reads: one serde struct per section, built once from a checked
//! raw table with the schema's defaults filled in (`RunConfig::from_raw`). Every value here has
//! already passed its schema check (type, range, choice), so code that reads a field needs no
//! validation of its own; what depends on the data or the world (derived sizes, divisibility)
//! is checked where those are known, in `setup`.
//!
//! A new section or nested table (`[optim.soap]`) is a struct here plus its keys in `schema`;
//! a test checks that every schema key deserialises into this struct.

use dptrain_core::Precision;
use dptrain_optim::{DecayMode, Distribute, ScheduleKind};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunConfig {
    pub run: RunSection,
    pub model: ModelSection,
    pub data: DataSection,
    pub train: TrainSection,
    pub optim: OptimSection,
    pub schedule: ScheduleSection,
    pub checkpoint: CheckpointSection,
    pub comm: CommSection,
    pub mup: MupSection,
    pub probes: ProbesSection,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProbesSection {
    pub interval: u64,
    pub attention: bool,
    pub logits: bool,
    pub residual: bool,
    pub massive: bool,
    pub sparsity: bool,
    pub sparsity_threshold: f64,
    pub grads: bool,
    pub optimizer: bool,
    pub distance: bool,
    pub critical_batch: bool,
    pub max_logit_warn: f64,
    pub spike_sigma: f64,
}

impl ProbesSection {
    /// The model-side families, as the models' probe sink reads them.
    pub fn model_set(&self) -> dptrain_core::probe::ProbeSet {
        dptrain_core::probe::ProbeSet {
            attention: self.attention,
            logits: self.logits,
            residual: self.residual,
            massive: self.massive,
            sparsity: self.sparsity,
            sparsity_threshold: self.sparsity_threshold,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnNonFinite {
    Abort,
    Skip,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MupSection {
    pub enabled: bool,
    /// `None` = not given (an error when enabled).
    pub base_width: Option<usize>,
    pub output_mult: f64,
    pub zero_init_readout: bool,
    pub zero_init_query: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeviceKind {
    Cpu,
    Cuda,
}

impl DeviceKind {
    pub fn name(self) -> &'static str {
        match self {
            DeviceKind::Cpu => "cpu",
            DeviceKind::Cuda => "cuda",
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunSection {
    pub name: String,
    pub seed: u64,
    pub device: DeviceKind,
    pub threads: usize,
    pub log_every: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ModelKind {
    Gpt,
    Mlp,
    Resnet,
}

impl ModelKind {
    pub fn name(self) -> &'static str {
        match self {
            ModelKind::Gpt => "gpt",
            ModelKind::Mlp => "mlp",
            ModelKind::Resnet => "resnet",
        }
    }
}

/// The keys of every model kind (each kind reads its own; `check_model_keys` rejects the others'
/// when set). Derived sizes are `None` until the data is known.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSection {
    pub kind: ModelKind,
    pub vocab_size: Option<usize>,
    pub context: usize,
    pub d_model: usize,
    pub n_layers: usize,
    pub n_heads: usize,
    pub mlp_ratio: usize,
    pub bias: bool,
    pub z_loss: f64,
    pub gelu_tanh: bool,
    pub dropout: f64,
    pub qk_norm: bool,
    pub input_dim: Option<usize>,
    pub widths: Vec<usize>,
    pub norm: dptrain_models::NormKind,
    pub ghost_batch: usize,
    pub classes: Option<usize>,
    pub in_channels: Option<usize>,
    pub width: usize,
    pub depth: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DataKind {
    SyntheticLm,
    SyntheticImages,
    Text,
    Tokens,
    Npy,
}

impl DataKind {
    pub fn name(self) -> &'static str {
        match self {
            DataKind::SyntheticLm => "synthetic-lm",
            DataKind::SyntheticImages => "synthetic-images",
            DataKind::Text => "text",
            DataKind::Tokens => "tokens",
            DataKind::Npy => "npy",
        }
    }
    /// Token streams (language-model data), as opposed to labelled images.
    pub fn is_tokens(self) -> bool {
        matches!(self, DataKind::SyntheticLm | DataKind::Text | DataKind::Tokens)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Windows {
    Random,
    Fixed,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataSection {
    pub kind: DataKind,
    pub path: String,
    pub labels: String,
    pub windows: Option<Windows>,
    pub val_fraction: f64,
    pub vocab: usize,
    pub order: usize,
    pub branching: usize,
    pub train_tokens: usize,
    pub val_tokens: usize,
    pub samples: usize,
    pub val_samples: usize,
    pub image_size: usize,
    pub channels: usize,
    pub classes: usize,
    pub noise: f64,
    pub shuffle: bool,
    pub drop_last: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainSection {
    pub steps: u64,
    pub global_batch: usize,
    /// 0 = global_batch / ranks.
    pub micro_batch: usize,
    pub eval_every: u64,
    /// `None` = derived (512, or the whole split if smaller); 0 = all.
    pub eval_samples: Option<usize>,
    pub precision: Precision,
    pub regime_adaptation: bool,
    pub eval_at_start: bool,
    pub on_nonfinite: OnNonFinite,
    pub checkpoint_every: u64,
    pub cuda_graph: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LrScaling {
    None,
    Linear,
    Sqrt,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OptimKind {
    Sgd,
    Adamw,
    Soap,
    Lamb,
    Lars,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OptimSection {
    pub kind: OptimKind,
    pub lr: f64,
    pub weight_decay: f64,
    pub betas: [f64; 2],
    pub eps: f64,
    pub lr_scaling: LrScaling,
    /// `None` = not given (then no rule may need it).
    pub base_batch: Option<usize>,
    pub clip: f64,
    pub momentum: f64,
    pub nesterov: bool,
    pub decay: DecayMode,
    pub decay_vectors: bool,
    pub shampoo_beta: f64,
    pub precondition_frequency: u64,
    pub max_precond_dim: usize,
    pub merge_dims: bool,
    pub precondition_1d: bool,
    pub normalize_grads: bool,
    pub correct_bias: bool,
    pub trust_clamp: f64,
    pub trust_coefficient: f64,
    /// `None` = derived (owner when there are several ranks).
    pub distribute: Option<Distribute>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScheduleSection {
    pub kind: ScheduleKind,
    pub warmup_steps: u64,
    /// `None` = use `warmup_steps`.
    pub warmup_samples: Option<u64>,
    pub final_lr: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckpointSection {
    pub keep_last: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CommDtype {
    F32,
    Bf16,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CommSection {
    pub bucket_mb: f64,
    pub overlap: bool,
    pub dtype: CommDtype,
    pub check_every: u64,
    pub timeout_s: f64,
}
