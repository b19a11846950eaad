//! The one table of config keys: each key's type, default, allowed values and documentation.
//! Checking (`super::check_keys`), defaults, the typed `RunConfig` and `dptrain config show`
//! all read it, so docs, defaults and validation cannot drift apart. A key is a dotted path of
//! any depth: `optim.lr` lives in `[optim]`, a key `optim.soap.distribute` in `[optim.soap]`.

use toml::{Table, Value};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ty {
    Int,
    Float,
    Str,
    Bool,
    IntList,
    FloatList,
}

/// What a value of the right type must also satisfy.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Check {
    Any,
    /// ≥ 0 (numbers: also finite).
    NonNeg,
    /// > 0 (numbers: also finite); for integer lists, every element.
    Positive,
    /// In [0, 1): fractions, momenta.
    Unit,
    /// In [0, 1), said as a probability (dropout).
    Probability,
    /// Two numbers in [0, 1) (Adam's betas).
    UnitPair,
    /// One of these strings.
    OneOf(&'static [&'static str]),
}

pub struct KeyDoc {
    pub key: &'static str,
    pub ty: Ty,
    /// TOML literal; `None` means derived when absent.
    pub default: Option<&'static str>,
    pub check: Check,
    pub doc: &'static str,
}

impl KeyDoc {
    /// The schema default as a TOML value (`None` for derived keys).
    pub fn default_value(&self) -> Option<Value> {
        self.default.map(|lit| format!("v = {lit}").parse::<Table>().expect("schema defaults are valid TOML")["v"].clone())
    }
    /// The table path (`optim.soap` for `optim.soap.distribute`) and the key's own name.
    pub fn section_and_name(&self) -> (&'static str, &'static str) {
        self.key.rsplit_once('.').expect("schema keys are section.name")
    }
    const fn with(self, check: Check) -> KeyDoc {
        KeyDoc { check, ..self }
    }
    const fn nonneg(self) -> KeyDoc {
        self.with(Check::NonNeg)
    }
    const fn pos(self) -> KeyDoc {
        self.with(Check::Positive)
    }
    const fn unit(self) -> KeyDoc {
        self.with(Check::Unit)
    }
    const fn one_of(self, choices: &'static [&'static str]) -> KeyDoc {
        self.with(Check::OneOf(choices))
    }
}

const fn k(key: &'static str, ty: Ty, default: Option<&'static str>, doc: &'static str) -> KeyDoc {
    KeyDoc { key, ty, default, check: Check::Any, doc }
}

use Ty::*;

/// Every config key. `model.*` keys after `model.kind` belong to one model kind each (see
/// `MODEL_KEYS`). Sections appear in `config show` in the order of their first key here.
pub const KEYS: &[KeyDoc] = &[
    k("run.name", Str, Some("\"default\""), "run name; the run directory defaults to runs/<name>"),
    k("run.seed", Int, Some("1337"), "seed for init, data and sampling: a run is a function of its config").nonneg(),
    k("run.device", Str, Some("\"cpu\""), "cpu | cuda (one GPU per process: the only visible one, else the local rank's)").one_of(&["cpu", "cuda"]),
    k("run.threads", Int, Some("0"), "compute threads per process; 0 = all cores divided by the processes on this node").nonneg(),
    k("run.log_every", Int, Some("10"), "write a metrics record every this many steps").pos(),
    k("model.kind", Str, Some("\"gpt\""), "gpt | mlp | resnet").one_of(&["gpt", "mlp", "resnet"]),
    k("model.vocab_size", Int, None, "gpt: vocabulary size (derived from the data when absent)").pos(),
    k("model.context", Int, Some("64"), "gpt: context length in tokens").pos(),
    k("model.d_model", Int, Some("64"), "gpt: model width").pos(),
    k("model.n_layers", Int, Some("2"), "gpt: Transformer blocks").pos(),
    k("model.n_heads", Int, Some("4"), "gpt: attention heads (must divide d_model)").pos(),
    k("model.mlp_ratio", Int, Some("4"), "gpt: MLP hidden width / d_model").pos(),
    k("model.bias", Bool, Some("true"), "gpt: biases in Linear and LayerNorm layers"),
    k("model.z_loss", Float, Some("0.0"), "gpt: z-loss coefficient (coef * log^2 Z added to the loss)").nonneg(),
    k("model.gelu_tanh", Bool, Some("false"), "gpt: tanh approximation of GELU instead of the erf form"),
    k(
        "model.qk_norm",
        Bool,
        Some("false"),
        "gpt: qk-layernorm — LayerNorm on each head's query and key (one gain and bias for queries, one for keys, shared by the heads), against attention-logit growth",
    ),
    k(
        "model.dropout",
        Float,
        Some("0.0"),
        "gpt/mlp: dropout probability in [0, 1), training only (gpt: nanoGPT's places — embeddings, attention probabilities, after the attention and MLP projections; mlp: after each hidden activation)",
    )
    .with(Check::Probability),
    k("model.input_dim", Int, None, "mlp: input features (derived from the data when absent)").pos(),
    k("model.widths", IntList, Some("[256, 256]"), "mlp: hidden layer widths").pos(),
    k(
        "model.norm",
        Str,
        Some("\"none\""),
        "mlp/resnet: none | batch | ghost — normalisation after each hidden Linear / convolution: batch norm over the per-rank micro-batch, or Ghost Batch Normalization over chunks of model.ghost_batch samples (Hoffer et al. 2017)",
    )
    .one_of(&["none", "batch", "ghost"]),
    k("model.ghost_batch", Int, Some("128"), "mlp/resnet: samples per ghost batch (model.norm = \"ghost\"); must divide the micro-batch").pos(),
    k("model.classes", Int, None, "mlp/resnet: classes (derived from the data when absent)").pos(),
    k("model.in_channels", Int, None, "resnet: image channels (derived from the data when absent)").pos(),
    k("model.width", Int, Some("16"), "resnet: channels of the first stage (then 2x, 4x)").pos(),
    k("model.depth", Int, Some("1"), "resnet: basic blocks per stage").pos(),
    k("data.kind", Str, Some("\"synthetic-lm\""), "synthetic-lm | synthetic-images | text | tokens | npy")
        .one_of(&["synthetic-lm", "synthetic-images", "text", "tokens", "npy"]),
    k("data.path", Str, Some("\"\""), "text: a UTF-8 file; tokens: a uint16 .bin file; npy: the images .npy"),
    k("data.labels", Str, Some("\"\""), "npy: the labels .npy (integers, one per image)"),
    k(
        "data.windows",
        Str,
        None,
        "token data: random | fixed — training windows of context+1 tokens at uniformly random offsets of the training split (nanoGPT's get_batch; default for text and tokens), or the fixed non-overlapping windows shuffled each epoch (default for synthetic-lm); validation always reads the fixed windows",
    )
    .one_of(&["random", "fixed"]),
    k("data.val_fraction", Float, Some("0.1"), "text/tokens/npy: fraction held out (from the end) for validation").unit(),
    k("data.vocab", Int, Some("64"), "synthetic-lm: vocabulary of the Markov source").pos(),
    k("data.order", Int, Some("1"), "synthetic-lm: Markov order (tokens of context that matter)").pos(),
    k("data.branching", Int, Some("4"), "synthetic-lm: possible successors of each context").pos(),
    k("data.train_tokens", Int, Some("400000"), "synthetic-lm: training tokens generated").pos(),
    k("data.val_tokens", Int, Some("40000"), "synthetic-lm: validation tokens generated (separate stream)").pos(),
    k("data.samples", Int, Some("8192"), "synthetic-images: training images").pos(),
    k("data.val_samples", Int, Some("1024"), "synthetic-images: validation images").pos(),
    k("data.image_size", Int, Some("8"), "synthetic-images: height = width").pos(),
    k("data.channels", Int, Some("1"), "synthetic-images: channels").pos(),
    k("data.classes", Int, Some("10"), "synthetic-images: classes").pos(),
    k("data.noise", Float, Some("1.0"), "synthetic-images: noise std around each class prototype").nonneg(),
    k("data.shuffle", Bool, Some("true"), "reshuffle each epoch (seed + epoch), as DistributedSampler"),
    k("data.drop_last", Bool, Some("true"), "drop the tail that does not divide over ranks (else pad with the head)"),
    k("train.steps", Int, Some("600"), "optimizer steps").pos(),
    k("train.global_batch", Int, Some("32"), "samples per optimizer step, over all ranks").pos(),
    k("train.micro_batch", Int, Some("0"), "samples per rank per micro-step; 0 = global_batch / ranks (no accumulation)").nonneg(),
    k("train.eval_every", Int, Some("100"), "validation every this many steps (0 = only at the end)").nonneg(),
    k(
        "train.eval_samples",
        Int,
        None,
        "validation samples per evaluation: the first N of the validation split, the same every time and whatever the batch size (split over ranks); 0 = all; when absent 512, or the whole split if smaller",
    )
    .nonneg(),
    k(
        "train.precision",
        Str,
        Some("\"f32\""),
        "f32 | bf16: matrix products take bf16 inputs, accumulate in f32; weights, grads, optimizer state stay f32",
    )
    .one_of(&["f32", "bf16"]),
    k(
        "train.eval_at_start",
        Bool,
        Some("false"),
        "evaluate once before the first step (logged as step 0): the loss at initialisation, at which an LR sweep counts a diverged run",
    ),
    k(
        "train.regime_adaptation",
        Bool,
        Some("false"),
        "multiply train.steps and the warmup by B/B0 (optim.base_batch): k× the batch for k× the epochs, so the number of updates matches the base run's (Hoffer et al. 2017)",
    ),
    k(
        "train.on_nonfinite",
        Str,
        Some("\"abort\""),
        "abort | skip: what a step whose loss or gradients are not finite does — abort the run (exit 1), or skip it (no optimizer step, no moment update; counted in summary.json) and go on",
    )
    .one_of(&["abort", "skip"]),
    k("train.checkpoint_every", Int, Some("200"), "checkpoint every this many steps (0 = only at the end)").nonneg(),
    k(
        "train.cuda_graph",
        Bool,
        Some("false"),
        "capture the training step as a CUDA graph after the first one and replay it (one launch per step instead of hundreds): needs run.device = \"cuda\" (any model, any optimizer: SOAP's first step and basis refreshes run eagerly between replays); with several GPUs the gradients' NCCL all-reduces are captured with the step; logging and probe steps run as before",
    ),
    k(
        "optim.kind",
        Str,
        Some("\"adamw\""),
        "sgd | adamw | soap (Adam in Shampoo's eigenbasis, Vyas et al. 2024) | lamb (Adam with a per-tensor trust ratio, You et al. 2020) | lars (SGD with a per-matrix trust ratio, You et al. 2017)",
    )
    .one_of(&["sgd", "adamw", "soap", "lamb", "lars"]),
    k("optim.lr", Float, Some("3e-3"), "peak learning rate").pos(),
    k(
        "optim.weight_decay",
        Float,
        Some("0.1"),
        "weight decay (adamw: decoupled; sgd: L2 added to the gradient; soap: p ← p·(1 − lr·wd) after the update; lamb: λw added to the Adam direction before its norm; lars: λw added to the gradient of matrices, none on 1-D parameters)",
    )
    .nonneg(),
    k("optim.betas", FloatList, Some("[0.9, 0.95]"), "adamw/soap/lamb: (beta1, beta2)").with(Check::UnitPair),
    k("optim.eps", Float, Some("1e-8"), "adamw/soap/lamb: epsilon").pos(),
    k(
        "optim.lr_scaling",
        Str,
        Some("\"none\""),
        "none | linear | sqrt: scale optim.lr and schedule.final_lr by B/B0 (Goyal et al. 2017) or sqrt(B/B0) (Hoffer et al. 2017), B = train.global_batch, B0 = optim.base_batch",
    )
    .one_of(&["none", "linear", "sqrt"]),
    k(
        "optim.base_batch",
        Int,
        None,
        "the global batch B0 at which optim.lr, schedule.final_lr, train.steps and the warmup were set; needed by optim.lr_scaling and train.regime_adaptation",
    )
    .pos(),
    k("optim.clip", Float, Some("1.0"), "global gradient-norm clip (0 = off)").nonneg(),
    k("optim.momentum", Float, Some("0.9"), "sgd/lars: momentum").unit(),
    k("optim.nesterov", Bool, Some("false"), "sgd/lars: Nesterov momentum"),
    k("optim.decay", Str, Some("\"coupled\""), "adamw, lamb, soap: coupled (torch: lr * wd; lamb: wd inside the trust-scaled direction) | independent (Wortsman et al.: schedule multiplier lr/peak lr * wd, beside the update)")
        .one_of(&["coupled", "independent"]),
    k("optim.decay_vectors", Bool, Some("false"), "also decay biases and norm gains"),
    k("optim.shampoo_beta", Float, Some("-1.0"), "soap: EMA factor of the preconditioner statistics; negative = use beta2"),
    k("optim.precondition_frequency", Int, Some("10"), "soap: refresh the eigenbases every this many updates").pos(),
    k("optim.max_precond_dim", Int, Some("10000"), "soap: dims larger than this are not preconditioned").pos(),
    k("optim.merge_dims", Bool, Some("false"), "soap: merge consecutive dims while their product stays ≤ max_precond_dim"),
    k("optim.precondition_1d", Bool, Some("false"), "soap: precondition 1-D parameters too (else Adam on them)"),
    k("optim.normalize_grads", Bool, Some("false"), "soap: divide each update by its RMS"),
    k("optim.correct_bias", Bool, Some("true"), "soap: Adam's bias correction of the step size; lamb: of both moments (m̂, v̂)"),
    k("optim.trust_clamp", Float, Some("10.0"), "lamb: the weight norm in the trust ratio is clamped to at most this (φ)").pos(),
    k("optim.trust_coefficient", Float, Some("1e-3"), "lars: trust coefficient tc in tc·‖w‖/(‖g‖ + λ‖w‖)").pos(),
    k(
        "optim.distribute",
        Str,
        None,
        "soap: replicated | owner — who computes each parameter's eigenbasis refresh: every rank, or one rank per parameter (balanced by cost) broadcasting it; default owner when there are several ranks",
    )
    .one_of(&["replicated", "owner"]),
    k("schedule.kind", Str, Some("\"cosine\""), "cosine | linear | constant (after warmup)").one_of(&["cosine", "linear", "constant"]),
    k("schedule.warmup_steps", Int, Some("30"), "linear warmup steps").nonneg(),
    k(
        "schedule.warmup_samples",
        Int,
        None,
        "warmup as a number of samples instead (warmup_steps = ceil(samples / train.global_batch)); not together with warmup_steps",
    )
    .nonneg(),
    k("schedule.final_lr", Float, Some("3e-4"), "learning rate at the last step").nonneg(),
    k("checkpoint.keep_last", Int, Some("2"), "checkpoints kept in <run>/checkpoints (older ones are deleted)").nonneg(),
    k("comm.bucket_mb", Float, Some("25.0"), "gradient bucket cap in MiB (the first bucket is 1 MiB), as PyTorch DDP").pos(),
    k("comm.overlap", Bool, Some("true"), "all-reduce buckets during backward (false: after backward)"),
    k("comm.dtype", Str, Some("\"f32\""), "f32 | bf16: precision of the gradient all-reduce (bf16 halves the bytes sent)").one_of(&["f32", "bf16"]),
    k("comm.check_every", Int, Some("100"), "compare a parameter checksum across ranks every this many steps (0 = never)").nonneg(),
    k(
        "mup.enabled",
        Bool,
        Some("false"),
        "μP (Yang et al., Tensor Programs V, as PyPI mup): init, per-parameter learning rates and readout multiplier scale with width relative to the same model at mup.base_width",
    ),
    k(
        "mup.base_width",
        Int,
        None,
        "the width at which μP equals the standard parametrization (gpt: d_model; mlp: widths[0], every entry scaled together; resnet: width); required when enabled",
    )
    .pos(),
    k("mup.output_mult", Float, Some("1.0"), "the readout's input is multiplied by output_mult / width multiplier").pos(),
    k("mup.zero_init_readout", Bool, Some("false"), "start the readout (and its bias) at zero"),
    k("mup.zero_init_query", Bool, Some("false"), "gpt: start the query projection at zero"),
    k("comm.timeout_s", Float, Some("600.0"), "a collective that does not complete within this many seconds aborts the job").pos(),
    k("probes.interval", Int, Some("10"), "compute the probes every this many steps (and at the last step), on the training batch; each such step writes a metrics record").pos(),
    k("probes.attention", Bool, Some("true"), "max attention logit per layer (attn_logit_max/<l>), each head's max query and key norm (q_norm_max/<l>/<h>, k_norm_max/<l>/<h>)"),
    k("probes.logits", Bool, Some("true"), "output logits: logit_mean, log_z (mean log Z), log_z_max"),
    k("probes.residual", Bool, Some("true"), "residual-stream RMS after each block (resid_rms/<l>)"),
    k("probes.massive", Bool, Some("true"), "massive activations per block output: massive_top1/<l>, massive_median/<l>, massive_ratio/<l>, where (massive_top1/<l>@token, @channel)"),
    k("probes.sparsity", Bool, Some("true"), "MLP activation sparsity per layer (mlp_sparsity/<l>): fraction of post-activation entries <= probes.sparsity_threshold"),
    k("probes.sparsity_threshold", Float, Some("0.0"), "an MLP activation at or below this counts as inactive"),
    k("probes.grads", Bool, Some("true"), "gradient RMS per parameter tensor (grad_rms/<param>), after the all-reduce, before clipping"),
    k(
        "probes.optimizer",
        Bool,
        Some("true"),
        "update-to-parameter RMS ratio per tensor (update_ratio/<param>); Adam family: fraction of second-moment entries with sqrt(v_hat) < eps (adam_eps_frac/<param>) and the unscaled update's RMS (adam_update_rms/<param>; not SOAP)",
    ),
    k("probes.distance", Bool, Some("true"), "distance from initialisation ||w_t - w_0|| per tensor (dist_init/<param>) and in total (dist_init); w_0 is rebuilt from run.seed"),
    k(
        "probes.critical_batch",
        Bool,
        Some("true"),
        "critical batch size B_simple (McCandlish et al. 2018) from the ranks' local gradient norms before the all-reduce (one rank: micro-batches) — cbs_b_simple and its EMA parts cbs_g2_ema, cbs_s_ema, in samples",
    ),
    k("probes.max_logit_warn", Float, Some("1000.0"), "alert when a max attention logit exceeds this").pos(),
    k("probes.spike_sigma", Float, Some("6.0"), "alert when the loss exceeds its running mean by this many running deviations (EMA, after 20 steps)").pos(),
];

/// Which `model.*` keys each kind accepts (the first entry is the default kind).
pub const MODEL_KEYS: &[(&str, &[&str])] = &[
    ("gpt", &["vocab_size", "context", "d_model", "n_layers", "n_heads", "mlp_ratio", "bias", "z_loss", "gelu_tanh", "dropout", "qk_norm"]),
    ("mlp", &["input_dim", "widths", "norm", "ghost_batch", "classes", "dropout"]),
    ("resnet", &["in_channels", "width", "depth", "norm", "ghost_batch", "classes"]),
];

/// Defaults that depend on another key: (that key, its value, the key, the default literal).
/// SOAP and LAMB take their references' defaults where they differ from AdamW's; a ResNet has
/// batch norm unless told otherwise.
pub const KIND_DEFAULTS: &[(&str, &str, &str, &str)] = &[
    ("optim.kind", "soap", "optim.betas", "[0.95, 0.95]"),
    ("optim.kind", "soap", "optim.weight_decay", "0.01"),
    ("optim.kind", "lamb", "optim.betas", "[0.9, 0.999]"),
    ("optim.kind", "lamb", "optim.eps", "1e-6"),
    ("optim.kind", "lamb", "optim.correct_bias", "false"),
    ("model.kind", "resnet", "model.norm", "\"batch\""),
];

/// Keys that were replaced: (old key, what to use instead).
pub const REPLACED: &[(&str, &str)] = &[
    ("train.eval_batches", "replaced by train.eval_samples (a number of validation samples, the same whatever the batch size)"),
    ("model.batch_norm", "replaced by model.norm = \"batch\" | \"ghost\" | \"none\""),
];

pub fn doc(key: &str) -> Option<&'static KeyDoc> {
    KEYS.iter().find(|d| d.key == key)
}
