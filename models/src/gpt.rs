//! GPT: a pre-LN decoder-only Transformer as in nanoGPT/GPT-2 — learned token and position
//! embeddings, causal multi-head attention (the fused core), a GELU MLP, final LayerNorm and an
//! untied readout. Optional biases; optional z-loss. Parameter names follow nanoGPT
//! (`transformer.h.0.attn.c_attn.weight`, ...) so checkpoints map onto PyTorch code directly.
//!
//! Optional qk-layernorm (`qk_norm`: LayerNorm on each head's query and key, one gain and bias
//! for the queries and one for the keys shared by the heads, `transformer.h.<i>.attn.qk_ln.*`
//! of shape `[2, d_head]`), the mitigation of attention-logit growth (Wortsman et al. 2023).
//!
//! Probes, by family (`ProbeSink::set`): attention — `attn_logit_max/<layer>`,
//! `q_norm_max/<layer>/<head>`, `k_norm_max/<layer>/<head>`; logits — `logit_mean`, `log_z`
//! (mean), `log_z_max`; residual — `resid_rms/<layer>` (after the block); massive —
//! `massive_top1|median|ratio/<layer>` and where (`massive_top1/<layer>@token|@channel`);
//! sparsity — `mlp_sparsity/<layer>` (post-GELU entries ≤ the threshold).

use crate::nn::{rms, LayerNorm, Linear};
use dptrain_core::model::{Batch, Model};
use dptrain_core::probe::{record_coord, ProbeSink, Reduce};
use dptrain_core::{Error, Init, ParamBuilder, ParamId, ParamStore, Result, Role, Tape, Var};

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GptConfig {
    pub vocab_size: usize,
    pub context: usize,
    pub d_model: usize,
    pub n_layers: usize,
    pub n_heads: usize,
    pub mlp_ratio: usize,
    /// Biases in Linear and LayerNorm layers (GPT-2 has them).
    pub bias: bool,
    /// Coefficient of the z-loss term coef · log²Z (0 disables).
    pub z_loss: f64,
    /// Use the tanh approximation of GELU (GPT-2's) instead of the exact erf form.
    pub gelu_tanh: bool,
    /// Dropout probability (nanoGPT's places); 0 = off. Only in training.
    #[serde(default)]
    pub dropout: f64,
    /// qk-layernorm on each head's query and key.
    #[serde(default)]
    pub qk_norm: bool,
    /// Attention score scale; `None` = 1/√d_head (μP: 1/d_head).
    #[serde(skip)]
    pub attn_scale: Option<f64>,
    /// Multiplies the readout's input (μP: output_mult / width multiplier; 1 = standard).
    #[serde(skip, default = "crate::nn::one")]
    pub readout_mult: f64,
    /// Zero-initialise the query projection (the first d_model rows of c_attn; μP's option).
    #[serde(skip)]
    pub zero_query: bool,
}

impl Default for GptConfig {
    fn default() -> Self {
        GptConfig {
            vocab_size: 256,
            context: 128,
            d_model: 128,
            n_layers: 4,
            n_heads: 4,
            mlp_ratio: 4,
            bias: true,
            z_loss: 0.0,
            gelu_tanh: false,
            dropout: 0.0,
            qk_norm: false,
            attn_scale: None,
            readout_mult: 1.0,
            zero_query: false,
        }
    }
}

impl GptConfig {
    /// How many parameters [`Gpt::new`] declares, counted from the config alone — before any
    /// is declared, so a size no machine holds is refused before the builder loops over a
    /// billion layers or allocates. In f64: exact below 2^53, and never overflowing above.
    pub fn param_count(&self) -> f64 {
        let (c, v, t, hid) =
            (self.d_model as f64, self.vocab_size as f64, self.context as f64, (self.mlp_ratio as f64) * self.d_model as f64);
        let b = if self.bias { 1.0 } else { 0.0 };
        let d_head = self.d_model.checked_div(self.n_heads).unwrap_or(0) as f64;
        let qk = if self.qk_norm { 2.0 * d_head * (1.0 + b) } else { 0.0 };
        // Two layer norms, qkv, the attention and MLP projections, the MLP's first layer.
        let block = 2.0 * c * (1.0 + b) + (c * 3.0 * c + b * 3.0 * c) + qk + (c * c + b * c) + (c * hid + b * hid) + (hid * c + b * c);
        // Embeddings, blocks, final layer norm, untied readout (no bias).
        v * c + t * c + self.n_layers as f64 * block + c * (1.0 + b) + v * c
    }

    pub fn validate(&self) -> std::result::Result<(), (String, String)> {
        let pos = |k: &str, v: usize| if v == 0 { Err((format!("model.{k}"), "must be positive".to_string())) } else { Ok(()) };
        pos("vocab_size", self.vocab_size)?;
        pos("context", self.context)?;
        pos("d_model", self.d_model)?;
        pos("n_layers", self.n_layers)?;
        pos("n_heads", self.n_heads)?;
        pos("mlp_ratio", self.mlp_ratio)?;
        if !self.d_model.is_multiple_of(self.n_heads) {
            return Err(("model.n_heads".into(), format!("must divide model.d_model = {}", self.d_model)));
        }
        if !(self.z_loss >= 0.0 && self.z_loss.is_finite()) {
            return Err(("model.z_loss".into(), "must be a finite number ≥ 0".into()));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(("model.dropout".into(), format!("must be in [0, 1), got {}", self.dropout)));
        }
        Ok(())
    }
}

/// qk-layernorm's parameters: gain and (with biases) bias, `[2, d_head]` (queries, keys).
struct QkNorm {
    weight: ParamId,
    bias: Option<ParamId>,
}

struct Block {
    ln_1: LayerNorm,
    c_attn: Linear,
    qk_ln: Option<QkNorm>,
    attn_proj: Linear,
    ln_2: LayerNorm,
    c_fc: Linear,
    mlp_proj: Linear,
}

pub struct Gpt {
    pub cfg: GptConfig,
    wte: ParamId,
    wpe: ParamId,
    blocks: Vec<Block>,
    ln_f: LayerNorm,
    lm_head: Linear,
}

impl Gpt {
    /// Declares the parameters. Init as nanoGPT: N(0, 0.02) for weights and embeddings, residual
    /// projections N(0, 0.02/√(2·n_layers)), zero biases, unit LayerNorm gains.
    pub fn new(cfg: GptConfig, pb: &mut ParamBuilder) -> Result<Gpt> {
        cfg.validate().map_err(|(key, msg)| Error::Config { key, msg })?;
        let (c, v, l) = (cfg.d_model, cfg.vocab_size, cfg.n_layers);
        let std = Init::Normal { std: 0.02 };
        let proj_std = Init::Normal { std: 0.02 / ((2 * l) as f64).sqrt() };
        let zero = Init::Const(0.0);
        let qkv_init = if cfg.zero_query { Init::NormalZeroPrefix { std: 0.02, zeros: c * c } } else { std };
        let hid = cfg.mlp_ratio * c;
        let (wte, wpe, blocks, ln_f) = pb.scope("transformer", |pb| {
            let wte = pb.scope("wte", |pb| pb.add("weight", &[v, c], Role::Input, v, c, std));
            let wpe = pb.scope("wpe", |pb| pb.add("weight", &[cfg.context, c], Role::Input, cfg.context, c, std));
            let blocks = (0..l)
                .map(|i| {
                    pb.scope("h", |pb| {
                        pb.scope(i.to_string(), |pb| Block {
                            ln_1: LayerNorm::new(pb, "ln_1", c, cfg.bias),
                            c_attn: pb.scope("attn", |pb| Linear::new(pb, "c_attn", c, 3 * c, cfg.bias, Role::Hidden, qkv_init, zero)),
                            qk_ln: cfg.qk_norm.then(|| {
                                let d = c / cfg.n_heads;
                                pb.scope("attn", |pb| {
                                    pb.scope("qk_ln", |pb| QkNorm {
                                        weight: pb.add("weight", &[2, d], Role::Vector, 1, d, Init::Const(1.0)),
                                        bias: cfg.bias.then(|| pb.add("bias", &[2, d], Role::Vector, 1, d, zero)),
                                    })
                                })
                            }),
                            attn_proj: pb.scope("attn", |pb| Linear::new(pb, "c_proj", c, c, cfg.bias, Role::Hidden, proj_std, zero)),
                            ln_2: LayerNorm::new(pb, "ln_2", c, cfg.bias),
                            c_fc: pb.scope("mlp", |pb| Linear::new(pb, "c_fc", c, hid, cfg.bias, Role::Hidden, std, zero)),
                            mlp_proj: pb.scope("mlp", |pb| Linear::new(pb, "c_proj", hid, c, cfg.bias, Role::Hidden, proj_std, zero)),
                        })
                    })
                })
                .collect();
            let ln_f = LayerNorm::new(pb, "ln_f", c, cfg.bias);
            (wte, wpe, blocks, ln_f)
        });
        let lm_head = Linear::new(pb, "lm_head", c, v, false, Role::Output, std, zero);
        Ok(Gpt { cfg, wte, wpe, blocks, ln_f, lm_head })
    }

    /// Logits `[B, T, V]` for token ids `[B, T]` (`train`: with dropout).
    pub fn logits<'t>(
        &self,
        tape: &'t Tape,
        ps: &ParamStore,
        ids: &[u32],
        b: usize,
        t: usize,
        train: bool,
        probes: &mut dyn ProbeSink,
    ) -> Result<Var<'t>> {
        let h = self.hidden(tape, ps, ids, b, t, train, probes)?;
        let logits = self.lm_head.forward(tape, ps, h)?;
        record_coord(probes, format_args!("lm_head"), &logits);
        Ok(logits)
    }

    /// What the classifier reads, `[B, T, C]`: the last layer norm's output times μP's readout
    /// multiplier.
    fn hidden<'t>(
        &self,
        tape: &'t Tape,
        ps: &ParamStore,
        ids: &[u32],
        b: usize,
        t: usize,
        train: bool,
        probes: &mut dyn ProbeSink,
    ) -> Result<Var<'t>> {
        // Site numbers: 0 for the embeddings, then four per block.
        let p = if train { self.cfg.dropout } else { 0.0 };
        let drop = |site: u64| tape.dropout(p, site);
        if t > self.cfg.context || t == 0 || ids.len() != b * t {
            return Err(Error::shape("gpt", format!("{} ids as [{b}, {t}] with context {}", ids.len(), self.cfg.context)));
        }
        // Every module's mean |output| when the sink asks (the coordinate check).
        let tok = tape.param(ps, self.wte).embedding(ids, &[b, t])?;
        record_coord(probes, format_args!("wte"), &tok);
        let pos = tape.param(ps, self.wpe).narrow(0, 0, t)?;
        record_coord(probes, format_args!("wpe"), &pos);
        let mut x = tok.add(pos)?.dropout(drop(0)?)?;
        let want = probes.set();
        for (i, blk) in self.blocks.iter().enumerate() {
            let site = 1 + 4 * i as u64;
            let qkv = if probes.coords() {
                let h = blk.ln_1.forward(tape, ps, x)?;
                record_coord(probes, format_args!("h.{i}.ln_1"), &h);
                blk.c_attn.forward(tape, ps, h)?
            } else {
                // The layer norm writes the projection's operand (bf16 on a GPU), and the
                // projection writes qkv as a bf16 activation for attention to read (unless a
                // qk-layernorm, which reads f32, comes first).
                ln_linear(tape, ps, x, &blk.ln_1, &blk.c_attn, blk.qk_ln.is_none())?
            };
            record_coord(probes, format_args!("h.{i}.attn.c_attn"), &qkv);
            if want.attention {
                crate::probes::record_qk_norms(probes, i, &qkv, self.cfg.n_heads)?;
            }
            let qkv = match &blk.qk_ln {
                Some(n) => qkv.qk_layer_norm(self.cfg.n_heads, Some(tape.param(ps, n.weight)), n.bias.map(|b| tape.param(ps, b)), 1e-5)?,
                None => qkv,
            };
            let att = qkv.causal_attention_scaled(self.cfg.n_heads, drop(site)?, self.cfg.attn_scale)?;
            if want.attention {
                probes.record_value(&format!("attn_logit_max/{i}"), Reduce::Max, att.max_logit);
            }
            record_coord(probes, format_args!("h.{i}.attn"), &att.y);
            // Without dropout or the coordinate check between them, the output projection
            // writes its sum with the residual stream itself (`linear_add`); under dropout,
            // dropout and the residual add are one pass (`dropout_add`).
            let fuse = !probes.coords() && p == 0.0;
            x = if fuse {
                let proj = &blk.attn_proj;
                att.y.linear_add(tape.param(ps, proj.w), proj.b.map(|b| tape.param(ps, b)), x)?
            } else {
                let a = blk.attn_proj.forward(tape, ps, att.y)?;
                record_coord(probes, format_args!("h.{i}.attn.c_proj"), &a);
                a.dropout_add(drop(site + 1)?, x)?
            };
            let proj = &blk.mlp_proj;
            let (pw, pb) = (tape.param(ps, proj.w), proj.b.map(|b| tape.param(ps, b)));
            if !probes.coords() {
                // The whole MLP in one call (the tanh GELU in its GEMMs' epilogues on a GPU; see
                // `layer_norm_mlp`), its output projection writing the sum with the residual
                // stream unless dropout comes between; the sparsity probe reads its activation.
                let p = |id| tape.param(ps, id);
                let (ln, fc) = (&blk.ln_2, &blk.c_fc);
                let threshold = want.sparsity_threshold;
                let mut sparsity = |act: &dptrain_core::Tensor| crate::probes::record_sparsity(probes, i, act, threshold);
                let observe: Option<&mut dyn FnMut(&dptrain_core::Tensor) -> Result<()>> =
                    if want.sparsity { Some(&mut sparsity) } else { None };
                let mlp = x.layer_norm_mlp(
                    (Some(p(ln.w)), ln.b.map(p), 1e-5),
                    (p(fc.w), fc.b.map(p)),
                    self.cfg.gelu_tanh,
                    (pw, pb),
                    fuse.then_some(x),
                    observe,
                )?;
                x = if fuse { mlp } else { mlp.dropout_add(drop(site + 2)?, x)? };
            } else {
                // The coordinate check reads the MLP's inside.
                let h = blk.ln_2.forward(tape, ps, x)?;
                record_coord(probes, format_args!("h.{i}.ln_2"), &h);
                let m = blk.c_fc.forward(tape, ps, h)?;
                record_coord(probes, format_args!("h.{i}.mlp.c_fc"), &m);
                let m = if want.sparsity {
                    let act = m.gelu(self.cfg.gelu_tanh)?;
                    crate::probes::record_sparsity(probes, i, &act.value(), want.sparsity_threshold)?;
                    act.linear(pw, pb)?
                } else {
                    m.gelu_linear(self.cfg.gelu_tanh, pw, pb)?
                };
                record_coord(probes, format_args!("h.{i}.mlp.c_proj"), &m);
                x = m.dropout_add(drop(site + 2)?, x)?;
            }
            record_coord(probes, format_args!("h.{i}"), &x);
            if want.residual {
                probes.record(&format!("resid_rms/{i}"), Reduce::Mean, rms(&x));
            }
            if want.massive {
                crate::probes::record_massive(probes, i, &x)?;
            }
        }
        let x = self.ln_f.forward(tape, ps, x)?;
        record_coord(probes, format_args!("ln_f"), &x);
        crate::nn::readout_input(x, self.cfg.readout_mult)
    }
}

/// `lin(ln(x))` as one op (`Var::layer_norm_linear`); `half`: its output is a bf16 activation
/// under bf16 precision.
fn ln_linear<'t>(tape: &'t Tape, ps: &ParamStore, x: Var<'t>, ln: &LayerNorm, lin: &Linear, half: bool) -> Result<Var<'t>> {
    let p = |id| tape.param(ps, id);
    x.layer_norm_linear(Some(p(ln.w)), ln.b.map(p), 1e-5, p(lin.w), lin.b.map(p), half)
}

impl Model for Gpt {
    fn loss<'t>(&self, tape: &'t Tape, params: &ParamStore, batch: &Batch, train: bool, probes: &mut dyn ProbeSink) -> Result<Var<'t>> {
        let Batch::Tokens { inputs, targets, batch, context } = batch else {
            return Err(Error::Msg("gpt needs a token batch (data.kind synthetic-lm, text or tokens)".into()));
        };
        let ce = if probes.coords() {
            // The coordinate check reads the logits themselves.
            let logits = self.logits(tape, params, inputs, *batch, *context, train, probes)?;
            logits.reshape(&[batch * context, self.cfg.vocab_size])?.cross_entropy(targets, self.cfg.z_loss)?
        } else {
            let h = self.hidden(tape, params, inputs, *batch, *context, train, probes)?;
            // Classifier and loss fused (bf16 logits under bf16; see `linear_cross_entropy`).
            let h = h.reshape(&[batch * context, self.cfg.d_model])?;
            h.linear_cross_entropy(tape.param(params, self.lm_head.w), targets, self.cfg.z_loss)?
        };
        if probes.set().logits {
            probes.record_value("logit_mean", Reduce::Mean, ce.logit_mean);
            probes.record_value("log_z", Reduce::Mean, ce.log_z_mean);
            probes.record_value("log_z_max", Reduce::Max, ce.log_z_max);
        }
        if self.cfg.z_loss > 0.0 {
            probes.record_value("z_loss", Reduce::Mean, ce.z_loss);
        }
        Ok(ce.loss)
    }
    fn describe(&self) -> String {
        let c = &self.cfg;
        let mut drop = if c.dropout > 0.0 { format!(", dropout {}", c.dropout) } else { String::new() };
        if c.qk_norm {
            drop.push_str(", qk-layernorm");
        }
        format!(
            "gpt(vocab {}, context {}, d_model {}, {} layers, {} heads{drop})",
            c.vocab_size, c.context, c.d_model, c.n_layers, c.n_heads
        )
    }
}
