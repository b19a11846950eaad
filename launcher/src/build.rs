//! Config → objects: the run's data, model and optimizer, built from the typed `RunConfig`.
//! A new model kind, data source or optimizer is one arm here (plus its schema keys); the
//! errors that depend on the data (sizes that do not fit, missing files) are raised here, named
//! after the key to change.

use crate::config::{DataKind, ModelKind, OptimKind, RunConfig};
use crate::error::{input_err, Result};
use crate::memory::Budget;
use dptrain_core::data::files::{load_npy_images, load_text, load_tokens_u16};
use dptrain_core::data::synthetic::{synthetic_images, MarkovSource};
use dptrain_core::data::{Dataset, ImageSet, TokenWindows};
use dptrain_core::model::Model;
use dptrain_core::{ParamBuilder, ParamStore};
use dptrain_models::{Gpt, GptConfig, Mlp, MlpConfig, ResNet, ResNetConfig};
use dptrain_optim::{
    AdamW, AdamWConfig, Distribute, Lamb, LambConfig, Lars, LarsConfig, Optimizer, ParamScales, Sgd, SgdConfig, Soap, SoapConfig,
};
use std::path::{Path, PathBuf};

/// The run's data.
pub struct Data {
    pub train: Box<dyn Dataset>,
    pub val: Box<dyn Dataset>,
    /// Best achievable loss (nats per token), when the source is known exactly.
    pub floor: Option<f64>,
    pub vocab: Option<usize>,
    pub image_shape: Option<[usize; 3]>,
    pub classes: Option<usize>,
    pub describe: String,
}

fn data_path(cfg: &RunConfig, key: &str, value: &str) -> Result<PathBuf> {
    if value.is_empty() {
        return Err(input_err!("{key}: required for data.kind = \"{}\"", cfg.data.kind.name()));
    }
    Ok(PathBuf::from(value))
}

/// Splits a token stream at `1 - val_fraction`.
fn split_tokens(t: Vec<u32>, vf: f64, context: usize, path: &Path) -> Result<(TokenWindows, TokenWindows)> {
    let cut = ((t.len() as f64) * (1.0 - vf)) as usize;
    let (tr, va) = (t[..cut].to_vec(), t[cut.saturating_sub(1)..].to_vec());
    if tr.len() <= context || va.len() <= context {
        return Err(input_err!(
            "{}: {} tokens is too short for model.context = {context} with data.val_fraction = {vf}",
            path.display(),
            t.len()
        ));
    }
    Ok((TokenWindows::new(tr, context), TokenWindows::new(va, context)))
}

/// Loads or generates the run's data; data that cannot fit in `budget` (synthetic by its
/// config, files by their size) is refused before it is generated or read.
pub fn load_data(cfg: &RunConfig, budget: Budget) -> Result<Data> {
    crate::memory::check_data_fits(cfg, budget)?;
    let (d, seed) = (&cfg.data, cfg.run.seed);
    let kind = d.kind.name();
    let model_kind = cfg.model.kind.name();
    let context = cfg.model.context;
    if d.kind.is_tokens() != (cfg.model.kind == ModelKind::Gpt) {
        return Err(input_err!("data.kind: \"{kind}\" does not fit model.kind = \"{model_kind}\" (gpt takes synthetic-lm, text or tokens; mlp/resnet take synthetic-images or npy)"));
    }
    let tokens = |tr: TokenWindows, va: TokenWindows, floor, vocab, describe| Data {
        train: Box::new(tr),
        val: Box::new(va),
        floor,
        vocab: Some(vocab),
        image_shape: None,
        classes: None,
        describe,
    };
    let images = |tr: ImageSet, va: ImageSet, describe: String| {
        let (shape, classes) = (tr.shape, tr.num_classes().max(va.num_classes()));
        Data {
            train: Box::new(tr),
            val: Box::new(va),
            floor: None,
            vocab: None,
            image_shape: Some(shape),
            classes: Some(classes),
            describe,
        }
    };
    match d.kind {
        DataKind::SyntheticLm => {
            let (v, order, br) = (d.vocab, d.order, d.branching);
            if (v as f64).powi(order as i32) > 4e6 {
                return Err(input_err!("data.order: vocab^order = {v}^{order} states is too many (limit 4e6)"));
            }
            let src = MarkovSource::new(v, order, br.min(v), seed);
            let (ntr, nva) = (d.train_tokens, d.val_tokens);
            if ntr <= context || nva <= context {
                return Err(input_err!("data.train_tokens / data.val_tokens: must exceed model.context = {context}"));
            }
            let floor = src.entropy_rate();
            let desc = format!("synthetic-lm (order-{order} Markov, vocab {v}, {br} successors, entropy {floor:.4} nats/token)");
            Ok(tokens(
                TokenWindows::new(src.sample(ntr, seed), context),
                TokenWindows::new(src.sample(nva, seed ^ 0x5eed), context),
                Some(floor),
                v,
                desc,
            ))
        }
        DataKind::Text => {
            let p = data_path(cfg, "data.path", &d.path)?;
            let t = load_text(&p)?;
            let (tr, va) = split_tokens(t, d.val_fraction, context, &p)?;
            Ok(tokens(tr, va, None, 256, format!("text {} (byte tokens)", p.display())))
        }
        DataKind::Tokens => {
            let p = data_path(cfg, "data.path", &d.path)?;
            let t = load_tokens_u16(&p)?;
            let (tr, va) = split_tokens(t, d.val_fraction, context, &p)?;
            let vocab = tr.max_token().max(va.max_token()) as usize + 1;
            Ok(tokens(tr, va, None, vocab, format!("tokens {} (uint16)", p.display())))
        }
        DataKind::SyntheticImages => {
            let (s, c, k) = (d.image_size, d.channels, d.classes);
            let (n, nv, noise) = (d.samples, d.val_samples, d.noise);
            let all = synthetic_images(n + nv, [c, s, s], k, noise, seed);
            let (tr, va) = all.split(nv);
            Ok(images(tr, va, format!("synthetic-images ({n} train / {nv} val, {c}x{s}x{s}, {k} classes, noise {noise})")))
        }
        DataKind::Npy => {
            let (p, l) = (data_path(cfg, "data.path", &d.path)?, data_path(cfg, "data.labels", &d.labels)?);
            let set = load_npy_images(&p, &l)?;
            let n = set.labels.len();
            let nv = ((n as f64 * d.val_fraction).round() as usize).clamp(1, n.saturating_sub(1).max(1));
            if n < 2 {
                return Err(input_err!("{}: needs at least 2 samples (train and validation)", p.display()));
            }
            let (tr, va) = set.split(nv);
            Ok(images(tr, va, format!("npy {} ({} train / {} val)", p.display(), n - nv, nv)))
        }
    }
}

/// A model kind's resolved config.
enum ModelCfg {
    Gpt(GptConfig),
    Mlp(MlpConfig),
    ResNet(ResNetConfig),
}

impl ModelCfg {
    /// What μP calls the width: gpt d_model, mlp widths[0] (all entries scale together), resnet
    /// width.
    fn width(&self) -> usize {
        match self {
            ModelCfg::Gpt(g) => g.d_model,
            ModelCfg::Mlp(c) => c.widths.first().copied().unwrap_or(1),
            ModelCfg::ResNet(c) => c.width,
        }
    }
    /// The same model at width `w` (μP's base model).
    fn at_width(&self, w: usize) -> Result<ModelCfg> {
        let w0 = self.width();
        Ok(match self {
            ModelCfg::Gpt(g) => {
                if !w.is_multiple_of(g.n_heads) {
                    return Err(input_err!("mup.base_width: {w} is not divisible by model.n_heads = {}", g.n_heads));
                }
                ModelCfg::Gpt(GptConfig { d_model: w, ..g.clone() })
            }
            ModelCfg::Mlp(c) => {
                let widths = c
                    .widths
                    .iter()
                    .map(|&x| {
                        (x * w)
                            .is_multiple_of(w0)
                            .then_some(x * w / w0)
                            .ok_or_else(|| input_err!("mup.base_width: {w} scales model.widths = {:?} to fractions", c.widths))
                    })
                    .collect::<Result<Vec<_>>>()?;
                ModelCfg::Mlp(MlpConfig { widths, ..c.clone() })
            }
            ModelCfg::ResNet(c) => ModelCfg::ResNet(ResNetConfig { width: w, ..c.clone() }),
        })
    }
    /// How many parameters `build` will declare, and the keys that set it (for the error when
    /// that is more than the machine holds).
    fn size(&self) -> (f64, String) {
        match self {
            ModelCfg::Gpt(g) => (
                g.param_count(),
                format!(
                    "gpt (d_model = {}, n_layers = {}, mlp_ratio = {}, vocab_size = {}, context = {})",
                    g.d_model, g.n_layers, g.mlp_ratio, g.vocab_size, g.context
                ),
            ),
            ModelCfg::Mlp(c) => {
                (c.param_count(), format!("mlp (input_dim = {}, widths = {:?}, classes = {})", c.input_dim, c.widths, c.classes))
            }
            ModelCfg::ResNet(c) => (
                c.param_count(),
                format!("resnet (width = {}, depth = {}, in_channels = {}, classes = {})", c.width, c.depth, c.in_channels, c.classes),
            ),
        }
    }
    fn build(self, pb: &mut ParamBuilder) -> Result<(Box<dyn Model>, toml::Table)> {
        Ok(match self {
            ModelCfg::Gpt(g) => (toml::Table::try_from(&g)?, Box::new(Gpt::new(g, pb)?) as Box<dyn Model>),
            ModelCfg::Mlp(c) => (toml::Table::try_from(&c)?, Box::new(Mlp::new(c, pb)?) as Box<dyn Model>),
            ModelCfg::ResNet(c) => (toml::Table::try_from(&c)?, Box::new(ResNet::new(c, pb)?) as Box<dyn Model>),
        })
        .map(|(t, m)| (m, t))
    }
}

/// Builds the model from the config and the data's shape, returning it with the resolved model
/// table (derived values filled in). Under μP the same model is first declared at
/// `mup.base_width` (nothing allocated) for its shapes, which set what scales with width.
/// A model that cannot fit in `budget` is refused before anything is declared
/// ([`crate::memory`]).
pub fn build_model(cfg: &RunConfig, data: &Data, pb: &mut ParamBuilder, budget: Budget) -> Result<(Box<dyn Model>, toml::Table)> {
    let m = &cfg.model;
    let mut t = toml::Table::new();
    t.insert("kind".into(), m.kind.name().into());
    let derived = |key: &str, given: Option<usize>, from_data: Option<usize>, what: &str| -> Result<usize> {
        given.or(from_data).ok_or_else(|| input_err!("{key}: required ({what} cannot be derived from this data)"))
    };
    let mut mc = match m.kind {
        ModelKind::Gpt => {
            let g = GptConfig {
                vocab_size: derived("model.vocab_size", m.vocab_size, data.vocab, "the vocabulary")?,
                context: m.context,
                d_model: m.d_model,
                n_layers: m.n_layers,
                n_heads: m.n_heads,
                mlp_ratio: m.mlp_ratio,
                bias: m.bias,
                z_loss: m.z_loss,
                gelu_tanh: m.gelu_tanh,
                dropout: m.dropout,
                qk_norm: m.qk_norm,
                ..Default::default()
            };
            g.validate().map_err(|(k, msg)| input_err!("{k}: {msg}"))?;
            if let Some(d) = data.vocab.filter(|&d| g.vocab_size < d) {
                return Err(input_err!("model.vocab_size: {} is smaller than the data's vocabulary ({d} token ids)", g.vocab_size));
            }
            ModelCfg::Gpt(g)
        }
        ModelKind::Mlp => {
            let shape = data.image_shape.unwrap_or([1, 1, 1]);
            ModelCfg::Mlp(MlpConfig {
                input_dim: derived("model.input_dim", m.input_dim, Some(shape.iter().product()), "input_dim")?,
                widths: m.widths.clone(),
                classes: derived("model.classes", m.classes, data.classes, "classes")?,
                norm: m.norm,
                ghost_batch: m.ghost_batch,
                dropout: m.dropout,
                ..Default::default()
            })
        }
        ModelKind::Resnet => ModelCfg::ResNet(ResNetConfig {
            in_channels: derived("model.in_channels", m.in_channels, data.image_shape.map(|s| s[0]), "in_channels")?,
            width: m.width,
            depth: m.depth,
            classes: derived("model.classes", m.classes, data.classes, "classes")?,
            norm: m.norm,
            ghost_batch: m.ghost_batch,
            ..Default::default()
        }),
    };
    let (count, what) = mc.size();
    crate::memory::check_model_fits(cfg, count, &what, budget)?;
    if cfg.mup.enabled {
        let w0 = cfg.mup.base_width.ok_or_else(|| {
            input_err!("mup.base_width: required when mup.enabled (the width at which μP equals the standard parametrization)")
        })?;
        let mut base = ParamBuilder::new();
        mc.at_width(w0)?.build(&mut base).map_err(|e| input_err!("mup.base_width: the base model: {e}"))?;
        pb.set_mup(dptrain_core::params::Mup { base: base.declarations(), zero_readout: cfg.mup.zero_init_readout });
        // The readout's input × output_mult / m (MuReadout), m = the readout fan-in's multiplier.
        let readout_mult = cfg.mup.output_mult * w0 as f64 / mc.width() as f64;
        match &mut mc {
            ModelCfg::Gpt(g) => {
                g.readout_mult = readout_mult;
                g.attn_scale = Some(1.0 / (g.d_model / g.n_heads) as f64);
                g.zero_query = cfg.mup.zero_init_query;
            }
            ModelCfg::Mlp(c) => c.readout_mult = readout_mult,
            ModelCfg::ResNet(c) => c.readout_mult = readout_mult,
        }
    } else if cfg.mup.zero_init_query || cfg.mup.zero_init_readout {
        return Err(input_err!("mup.zero_init_readout / mup.zero_init_query: only with mup.enabled = true"));
    }
    let (model, table) = mc.build(pb)?;
    t.extend(table);
    if let Some(c) = data.classes {
        if let Some(Ok(k)) = t.get("classes").and_then(|v| v.as_integer()).map(usize::try_from) {
            if k < c {
                return Err(input_err!("model.classes: {k} is smaller than the labels in the data ({c} classes)"));
            }
        }
    }
    Ok((model, t))
}

/// μP's per-parameter learning-rate and weight-decay multipliers (PyPI `mup`'s `MuAdam` /
/// `MuSGD` parameter groups), on top of the standard grouping's decay exemptions. Adam family
/// (adamw, lamb, soap): a matrix with two width dims gets lr/m and decay ×m (m its fan-in's
/// multiplier), so coupled decay lr·wd stays put — under independent decay the decay is left
/// alone. SGD family (sgd, lars): one width dim (vectors, input and readout weights) lr×m and
/// decay /m; two width dims lr / (fan-in mult / fan-out mult) and decay × that.
pub fn mup_scales(cfg: &RunConfig, params: &ParamStore) -> ParamScales {
    let mut s = ParamScales::standard(params, cfg.optim.decay_vectors);
    if !cfg.mup.enabled {
        return s;
    }
    let adam = matches!(cfg.optim.kind, OptimKind::Adamw | OptimKind::Lamb | OptimKind::Soap);
    let independent = adam && cfg.optim.decay == dptrain_optim::DecayMode::Independent;
    for (i, p) in params.infos().iter().enumerate() {
        let (lr, wd) = match (adam, p.ninf()) {
            (true, 2) => (1.0 / p.width_mult(), if independent { 1.0 } else { p.width_mult() }),
            (true, _) => (1.0, 1.0),
            (false, 1) => (p.width_mult(), 1.0 / p.width_mult()),
            (false, 2) => (1.0 / p.fanin_fanout_mult_ratio(), p.fanin_fanout_mult_ratio()),
            (false, _) => (1.0, 1.0),
        };
        s.lr[i] *= lr;
        s.wd[i] *= wd;
    }
    s
}

/// The optimizer `[optim]` describes, for a world of `world` ranks.
pub fn build_optimizer(cfg: &RunConfig, params: &ParamStore, world: usize) -> Result<Box<dyn Optimizer>> {
    let o = &cfg.optim;
    // The standard grouping (vectors not decayed unless optim.decay_vectors), and μP's
    // multipliers when it is on.
    let scales = mup_scales(cfg, params);
    Ok(match o.kind {
        OptimKind::Sgd => Box::new(
            Sgd::with_scales(
                SgdConfig {
                    momentum: o.momentum,
                    dampening: 0.0,
                    nesterov: o.nesterov,
                    weight_decay: o.weight_decay,
                    decay_vectors: o.decay_vectors,
                },
                params,
                &scales,
            )
            .map_err(|e| input_err!("optim: {e}"))?,
        ),
        OptimKind::Adamw => Box::new(
            AdamW::with_scales(
                AdamWConfig {
                    beta1: o.betas[0],
                    beta2: o.betas[1],
                    eps: o.eps,
                    weight_decay: o.weight_decay,
                    decay_mode: o.decay,
                    peak_lr: o.lr,
                    decay_vectors: o.decay_vectors,
                },
                params,
                &scales,
            )
            .map_err(|e| input_err!("optim: {e}"))?,
        ),
        OptimKind::Soap => {
            if o.shampoo_beta >= 1.0 || !o.shampoo_beta.is_finite() {
                return Err(input_err!("optim.shampoo_beta: must be below 1 (negative = use beta2), got {}", o.shampoo_beta));
            }
            let c = SoapConfig {
                beta1: o.betas[0],
                beta2: o.betas[1],
                shampoo_beta: o.shampoo_beta,
                eps: o.eps,
                weight_decay: o.weight_decay,
                precondition_frequency: o.precondition_frequency,
                max_precond_dim: o.max_precond_dim,
                merge_dims: o.merge_dims,
                precondition_1d: o.precondition_1d,
                normalize_grads: o.normalize_grads,
                correct_bias: o.correct_bias,
                distribute: o.distribute.unwrap_or(if world > 1 { Distribute::Owner } else { Distribute::Replicated }),
                decay_mode: o.decay,
                peak_lr: o.lr,
            };
            // Biases and norm gains are exempt from decay unless optim.decay_vectors, as for AdamW.
            Box::new(Soap::with_scales(c, params, &scales).map_err(|e| input_err!("optim: {e}"))?)
        }
        OptimKind::Lamb => {
            let c = LambConfig {
                beta1: o.betas[0],
                beta2: o.betas[1],
                eps: o.eps,
                weight_decay: o.weight_decay,
                correct_bias: o.correct_bias,
                clamp: o.trust_clamp,
                decay_mode: o.decay,
                peak_lr: o.lr,
            };
            Box::new(Lamb::with_scales(c, params, &scales).map_err(|e| input_err!("optim: {e}"))?)
        }
        OptimKind::Lars => {
            let c = LarsConfig {
                momentum: o.momentum,
                dampening: 0.0,
                nesterov: o.nesterov,
                weight_decay: o.weight_decay,
                trust_coefficient: o.trust_coefficient,
            };
            Box::new(Lars::with_scales(c, params, &scales).map_err(|e| input_err!("optim: {e}"))?)
        }
    })
}
