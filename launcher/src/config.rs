//! Configuration in two phases (architecture principle 7): the raw TOML (file, then `--set`
//! overrides) is checked key by key against one schema table — unknown keys, wrong types and
//! out-of-range values are one-line errors naming the key — and then resolved into a typed
//! `RunConfig` with derived values computed once. The same table documents every key for
//! `dptrain config show`, so docs, defaults and validation cannot drift apart.

use crate::error::{input_err, LaunchError, Result};
use std::path::Path;
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

pub struct KeyDoc {
    pub key: &'static str,
    pub ty: Ty,
    /// TOML literal; `None` means derived when absent.
    pub default: Option<&'static str>,
    pub doc: &'static str,
}

impl KeyDoc {
    /// The schema default as a TOML value (`None` for derived keys).
    pub fn default_value(&self) -> Option<Value> {
        self.default.map(|lit| format!("v = {lit}").parse::<Table>().expect("schema defaults are valid TOML")["v"].clone())
    }
}

const fn k(key: &'static str, ty: Ty, default: Option<&'static str>, doc: &'static str) -> KeyDoc {
    KeyDoc { key, ty, default, doc }
}

use Ty::*;

/// Every config key. `model.*` keys after `model.kind` belong to one model kind each (see
/// `MODEL_KEYS`).
pub const KEYS: &[KeyDoc] = &[
    k("run.name", Str, Some("\"default\""), "run name; the run directory defaults to runs/<name>"),
    k("run.seed", Int, Some("1337"), "seed for init, data and sampling: a run is a function of its config"),
    k("run.device", Str, Some("\"cpu\""), "cpu | cuda (one GPU per process: the only visible one, else the local rank's)"),
    k("run.threads", Int, Some("0"), "compute threads per process; 0 = all cores divided by the processes on this node"),
    k("run.log_every", Int, Some("10"), "write a metrics record every this many steps"),
    k("model.kind", Str, Some("\"gpt\""), "gpt | mlp | resnet"),
    k("model.vocab_size", Int, None, "gpt: vocabulary size (derived from the data when absent)"),
    k("model.context", Int, Some("64"), "gpt: context length in tokens"),
    k("model.d_model", Int, Some("64"), "gpt: model width"),
    k("model.n_layers", Int, Some("2"), "gpt: Transformer blocks"),
    k("model.n_heads", Int, Some("4"), "gpt: attention heads (must divide d_model)"),
    k("model.mlp_ratio", Int, Some("4"), "gpt: MLP hidden width / d_model"),
    k("model.bias", Bool, Some("true"), "gpt: biases in Linear and LayerNorm layers"),
    k("model.z_loss", Float, Some("0.0"), "gpt: z-loss coefficient (coef * log^2 Z added to the loss)"),
    k("model.gelu_tanh", Bool, Some("false"), "gpt: tanh approximation of GELU instead of the erf form"),
    k(
        "model.dropout",
        Float,
        Some("0.0"),
        "gpt/mlp: dropout probability in [0, 1), training only (gpt: nanoGPT's places — embeddings, attention probabilities, after the attention and MLP projections; mlp: after each hidden activation)",
    ),
    k("model.input_dim", Int, None, "mlp: input features (derived from the data when absent)"),
    k("model.widths", IntList, Some("[256, 256]"), "mlp: hidden layer widths"),
    k("model.batch_norm", Bool, Some("false"), "mlp: batch norm after each hidden Linear"),
    k("model.classes", Int, None, "mlp/resnet: classes (derived from the data when absent)"),
    k("model.in_channels", Int, None, "resnet: image channels (derived from the data when absent)"),
    k("model.width", Int, Some("16"), "resnet: channels of the first stage (then 2x, 4x)"),
    k("model.depth", Int, Some("1"), "resnet: basic blocks per stage"),
    k("data.kind", Str, Some("\"synthetic-lm\""), "synthetic-lm | synthetic-images | text | tokens | npy"),
    k("data.path", Str, Some("\"\""), "text: a UTF-8 file; tokens: a uint16 .bin file; npy: the images .npy"),
    k("data.labels", Str, Some("\"\""), "npy: the labels .npy (integers, one per image)"),
    k(
        "data.windows",
        Str,
        None,
        "token data: random | fixed — training windows of context+1 tokens at uniformly random offsets of the training split (nanoGPT's get_batch; default for text and tokens), or the fixed non-overlapping windows shuffled each epoch (default for synthetic-lm); validation always reads the fixed windows",
    ),
    k("data.val_fraction", Float, Some("0.1"), "text/tokens/npy: fraction held out (from the end) for validation"),
    k("data.vocab", Int, Some("64"), "synthetic-lm: vocabulary of the Markov source"),
    k("data.order", Int, Some("1"), "synthetic-lm: Markov order (tokens of context that matter)"),
    k("data.branching", Int, Some("4"), "synthetic-lm: possible successors of each context"),
    k("data.train_tokens", Int, Some("400000"), "synthetic-lm: training tokens generated"),
    k("data.val_tokens", Int, Some("40000"), "synthetic-lm: validation tokens generated (separate stream)"),
    k("data.samples", Int, Some("8192"), "synthetic-images: training images"),
    k("data.val_samples", Int, Some("1024"), "synthetic-images: validation images"),
    k("data.image_size", Int, Some("8"), "synthetic-images: height = width"),
    k("data.channels", Int, Some("1"), "synthetic-images: channels"),
    k("data.classes", Int, Some("10"), "synthetic-images: classes"),
    k("data.noise", Float, Some("1.0"), "synthetic-images: noise std around each class prototype"),
    k("data.shuffle", Bool, Some("true"), "reshuffle each epoch (seed + epoch), as DistributedSampler"),
    k("data.drop_last", Bool, Some("true"), "drop the tail that does not divide over ranks (else pad with the head)"),
    k("train.steps", Int, Some("600"), "optimizer steps"),
    k("train.global_batch", Int, Some("32"), "samples per optimizer step, over all ranks"),
    k("train.micro_batch", Int, Some("0"), "samples per rank per micro-step; 0 = global_batch / ranks (no accumulation)"),
    k("train.eval_every", Int, Some("100"), "validation every this many steps (0 = only at the end)"),
    k(
        "train.eval_samples",
        Int,
        None,
        "validation samples per evaluation: the first N of the validation split, the same every time and whatever the batch size (split over ranks); 0 = all; when absent 512, or the whole split if smaller",
    ),
    k(
        "train.precision",
        Str,
        Some("\"f32\""),
        "f32 | bf16: matrix products take bf16 inputs, accumulate in f32; weights, grads, optimizer state stay f32",
    ),
    k("train.checkpoint_every", Int, Some("200"), "checkpoint every this many steps (0 = only at the end)"),
    k("optim.kind", Str, Some("\"adamw\""), "sgd | adamw"),
    k("optim.lr", Float, Some("3e-3"), "peak learning rate"),
    k("optim.weight_decay", Float, Some("0.1"), "weight decay (adamw: decoupled; sgd: L2 added to the gradient)"),
    k("optim.betas", FloatList, Some("[0.9, 0.95]"), "adamw: (beta1, beta2)"),
    k("optim.eps", Float, Some("1e-8"), "adamw: epsilon"),
    k("optim.clip", Float, Some("1.0"), "global gradient-norm clip (0 = off)"),
    k("optim.momentum", Float, Some("0.9"), "sgd: momentum"),
    k("optim.nesterov", Bool, Some("false"), "sgd: Nesterov momentum"),
    k("optim.decay", Str, Some("\"coupled\""), "adamw: coupled (torch: lr * wd) | independent (schedule multiplier * wd)"),
    k("optim.decay_vectors", Bool, Some("false"), "also decay biases and norm gains"),
    k("schedule.kind", Str, Some("\"cosine\""), "cosine | linear | constant (after warmup)"),
    k("schedule.warmup_steps", Int, Some("30"), "linear warmup steps"),
    k("schedule.final_lr", Float, Some("3e-4"), "learning rate at the last step"),
    k("checkpoint.keep_last", Int, Some("2"), "checkpoints kept in <run>/checkpoints (older ones are deleted)"),
    k("comm.bucket_mb", Float, Some("25.0"), "gradient bucket cap in MiB (the first bucket is 1 MiB), as PyTorch DDP"),
    k("comm.overlap", Bool, Some("true"), "all-reduce buckets during backward (false: after backward)"),
    k("comm.dtype", Str, Some("\"f32\""), "f32 | bf16: precision of the gradient all-reduce (bf16 halves the bytes sent)"),
    k("comm.check_every", Int, Some("100"), "compare a parameter checksum across ranks every this many steps (0 = never)"),
    k("comm.timeout_s", Float, Some("600.0"), "a collective that does not complete within this many seconds aborts the job"),
];

/// Which `model.*` keys each kind accepts (the first entry is the default kind).
pub const MODEL_KEYS: &[(&str, &[&str])] = &[
    ("gpt", &["vocab_size", "context", "d_model", "n_layers", "n_heads", "mlp_ratio", "bias", "z_loss", "gelu_tanh", "dropout"]),
    ("mlp", &["input_dim", "widths", "batch_norm", "classes", "dropout"]),
    ("resnet", &["in_channels", "width", "depth", "classes"]),
];

/// Keys that were replaced: (old key, what to use instead).
pub const REPLACED: &[(&str, &str)] =
    &[("train.eval_batches", "replaced by train.eval_samples (a number of validation samples, the same whatever the batch size)")];

fn doc(key: &str) -> Option<&'static KeyDoc> {
    KEYS.iter().find(|d| d.key == key)
}

/// The error for a key that is not in the schema (naming its replacement, if it had one).
fn unknown_key(key: &str, origin: &str) -> LaunchError {
    match REPLACED.iter().find(|(old, _)| *old == key) {
        Some((_, instead)) => input_err!("{origin}{key}: {instead}"),
        None if origin.is_empty() => input_err!("{key}: unknown config key (see `dptrain config show`)"),
        None => input_err!("{origin}{key}: unknown config key"),
    }
}

fn type_name(ty: Ty) -> &'static str {
    match ty {
        Int => "an integer",
        Float => "a number",
        Str => "a string",
        Bool => "true or false",
        IntList => "a list of integers",
        FloatList => "a list of numbers",
    }
}

fn type_ok(ty: Ty, v: &Value) -> bool {
    match (ty, v) {
        (Int, Value::Integer(_)) | (Float, Value::Float(_) | Value::Integer(_)) | (Str, Value::String(_)) | (Bool, Value::Boolean(_)) => {
            true
        }
        (IntList, Value::Array(a)) => a.iter().all(|x| matches!(x, Value::Integer(_))),
        (FloatList, Value::Array(a)) => a.iter().all(|x| matches!(x, Value::Float(_) | Value::Integer(_))),
        _ => false,
    }
}

fn short(v: &Value) -> String {
    let s = v.to_string();
    if s.len() > 40 {
        format!("{}…", &s[..40])
    } else {
        s
    }
}

/// Flattens a table into (dotted key, value) pairs; tables nested below a section are errors.
fn leaves(t: &Table, prefix: &str, out: &mut Vec<(String, Value)>) {
    for (k, v) in t {
        let key = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
        match v {
            Value::Table(sub) => leaves(sub, &key, out),
            _ => out.push((key, v.clone())),
        }
    }
}

/// Parses a TOML config file (one-line error naming the file, line and column).
pub fn parse_file(path: &Path) -> Result<Table> {
    let text = std::fs::read_to_string(path).map_err(|e| input_err!("{}: cannot read config ({e})", path.display()))?;
    parse_str(&text, &path.display().to_string())
}

pub fn parse_str(text: &str, origin: &str) -> Result<Table> {
    text.parse::<Table>().map_err(|e| {
        let (line, col) = e.span().map(|s| line_col(text, s.start)).unwrap_or((0, 0));
        let msg = e.message().split_whitespace().collect::<Vec<_>>().join(" ");
        input_err!("{origin}: malformed TOML at line {line}, column {col}: {msg}")
    })
}

fn line_col(text: &str, at: usize) -> (usize, usize) {
    let before = &text[..at.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let col = before.len() - before.rfind('\n').map(|i| i + 1).unwrap_or(0) + 1;
    (line, col)
}

/// Applies `key=value` overrides; the value is parsed as TOML, or taken as a string.
pub fn apply_sets(t: &mut Table, sets: &[String]) -> Result<()> {
    for s in sets {
        let (key, val) = s.split_once('=').ok_or_else(|| input_err!("--set {s}: expected key=value"))?;
        let key = key.trim();
        if doc(key).is_none() {
            return Err(unknown_key(key, "--set "));
        }
        let val = val.trim();
        let v =
            format!("v = {val}").parse::<Table>().ok().and_then(|mut t| t.remove("v")).unwrap_or_else(|| Value::String(val.to_string()));
        let (sec, name) = key.split_once('.').expect("schema keys are section.name");
        let entry = t.entry(sec.to_string()).or_insert_with(|| Value::Table(Table::new()));
        match entry {
            Value::Table(st) => {
                st.insert(name.to_string(), v);
            }
            _ => return Err(input_err!("{sec}: expected a table")),
        }
    }
    Ok(())
}

/// Checks every key of a raw config against the schema.
pub fn check_keys(t: &Table) -> Result<()> {
    let mut ls = vec![];
    leaves(t, "", &mut ls);
    for (key, v) in &ls {
        if key == "derived" || key.starts_with("derived.") {
            continue; // written by dptrain into resolved configs; ignored on input
        }
        let d = doc(key).ok_or_else(|| unknown_key(key, ""))?;
        if !type_ok(d.ty, v) {
            return Err(input_err!("{key}: expected {}, got {}", type_name(d.ty), short(v)));
        }
    }
    Ok(())
}

/// A checked raw config with typed getters falling back to schema defaults.
pub struct Raw {
    t: Table,
}

impl Raw {
    pub fn new(t: Table) -> Result<Raw> {
        check_keys(&t)?;
        Ok(Raw { t })
    }
    pub fn table(&self) -> &Table {
        &self.t
    }
    fn get(&self, key: &str) -> Option<Value> {
        let (sec, name) = key.split_once('.')?;
        self.t.get(sec)?.get(name).cloned()
    }
    /// The key's value: as given, else the schema default (`None` for an absent derived key).
    pub fn resolved(&self, key: &str) -> Option<Value> {
        self.get(key).or_else(|| doc(key).and_then(KeyDoc::default_value))
    }
    fn value(&self, key: &str) -> Value {
        self.resolved(key).unwrap_or_else(|| panic!("{key} is not in the schema or is derived; use opt_*"))
    }
    pub fn is_set(&self, key: &str) -> bool {
        self.get(key).is_some()
    }
    pub fn str(&self, key: &str) -> String {
        self.value(key).as_str().unwrap_or_default().to_string()
    }
    pub fn bool(&self, key: &str) -> bool {
        self.value(key).as_bool().unwrap_or_default()
    }
    pub fn float(&self, key: &str) -> f64 {
        match self.value(key) {
            Value::Integer(i) => i as f64,
            v => v.as_float().unwrap_or_default(),
        }
    }
    pub fn int(&self, key: &str) -> i64 {
        self.value(key).as_integer().unwrap_or_default()
    }
    pub fn opt_int(&self, key: &str) -> Option<i64> {
        self.get(key).and_then(|v| v.as_integer())
    }
    /// A non-negative integer as usize (error names the key).
    pub fn count(&self, key: &str) -> Result<usize> {
        let v = self.int(key);
        usize::try_from(v).map_err(|_| input_err!("{key}: must be ≥ 0, got {v}"))
    }
    /// A positive integer.
    pub fn positive(&self, key: &str) -> Result<usize> {
        let v = self.int(key);
        if v <= 0 {
            return Err(input_err!("{key}: must be a positive integer, got {v}"));
        }
        Ok(v as usize)
    }
    pub fn opt_positive(&self, key: &str) -> Result<Option<usize>> {
        match self.opt_int(key) {
            None => Ok(None),
            Some(v) if v > 0 => Ok(Some(v as usize)),
            Some(v) => Err(input_err!("{key}: must be a positive integer, got {v}")),
        }
    }
    pub fn floats(&self, key: &str) -> Vec<f64> {
        self.value(key)
            .as_array()
            .map(|a| a.iter().filter_map(|x| x.as_float().or_else(|| x.as_integer().map(|i| i as f64))).collect())
            .unwrap_or_default()
    }
    pub fn ints(&self, key: &str) -> Vec<i64> {
        self.value(key).as_array().map(|a| a.iter().filter_map(|x| x.as_integer()).collect()).unwrap_or_default()
    }
    /// One of `choices` (error lists them).
    pub fn choice(&self, key: &str, choices: &[&str]) -> Result<String> {
        let v = self.str(key);
        if choices.contains(&v.as_str()) {
            Ok(v)
        } else {
            Err(input_err!("{key}: expected one of {}, got \"{v}\"", choices.join(" | ")))
        }
    }
}

/// `dptrain config show`: the default config as TOML, a comment on every key.
pub fn show_default() -> String {
    let mut out = String::from("# dptrain default config: `dptrain train` with no file runs exactly this.\n");
    let mut section = "";
    for d in KEYS {
        let (sec, name) = d.key.split_once('.').expect("section.key");
        if sec != section {
            out.push_str(&format!("\n[{sec}]\n"));
            section = sec;
        }
        out.push_str(&format!("# {}\n", d.doc));
        // Keys of the other model kinds are shown commented out: the file stays a valid config.
        let other_kind = sec == "model" && name != "kind" && !MODEL_KEYS[0].1.contains(&name);
        match d.default {
            Some(v) if !other_kind => out.push_str(&format!("{name} = {v}\n")),
            Some(v) => out.push_str(&format!("# {name} = {v}\n")),
            None => out.push_str(&format!("# {name} = (derived)\n")),
        }
    }
    out
}

/// Checks model keys against `model.kind`.
pub fn check_model_keys(raw: &Raw, kind: &str) -> Result<()> {
    let allowed = MODEL_KEYS.iter().find(|(k, _)| *k == kind).map(|(_, v)| *v).unwrap_or(&[]);
    if let Some(Value::Table(m)) = raw.table().get("model") {
        for key in m.keys() {
            if key != "kind" && !allowed.contains(&key.as_str()) {
                return Err(input_err!("model.{key}: not a key of model.kind = \"{kind}\" (its keys: {})", allowed.join(", ")));
            }
        }
    }
    Ok(())
}

impl From<toml::ser::Error> for LaunchError {
    fn from(e: toml::ser::Error) -> Self {
        LaunchError::Runtime(e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(s: &str) -> Result<Raw> {
        Raw::new(parse_str(s, "test.toml")?)
    }

    #[test]
    fn schema_defaults_parse_with_their_types() {
        for d in KEYS {
            if let Some(v) = d.default_value() {
                assert!(type_ok(d.ty, &v), "{}", d.key);
            }
        }
        let shown = show_default().parse::<Table>().expect("config show is valid TOML");
        check_keys(&shown).unwrap();
    }

    #[test]
    fn errors_name_the_key() {
        let e = |s: &str| raw(s).err().expect("must fail").to_string();
        assert!(e("[train]\nstepz = 3").contains("train.stepz: unknown config key"));
        assert!(e("[train]\nsteps = \"many\"").contains("train.steps: expected an integer"));
        assert!(e("[optim]\nbetas = [0.9, \"x\"]").contains("optim.betas: expected a list of numbers"));
        let m = e("[train\nsteps = 3");
        assert!(m.starts_with("test.toml: malformed TOML at line 1"), "{m}");
        assert!(!m.contains('\n'));
        let r = raw("[train]\nsteps = -3").unwrap();
        assert!(r.positive("train.steps").unwrap_err().to_string().contains("train.steps: must be a positive integer"));
        assert!(raw("[optim]\nkind = \"rmsprop\"").unwrap().choice("optim.kind", &["sgd", "adamw"]).is_err());
        let r = raw("[model]\nkind = \"gpt\"\nwidths = [3]").unwrap();
        assert!(check_model_keys(&r, "gpt").unwrap_err().to_string().contains("model.widths: not a key"));
    }

    #[test]
    fn sets_override_with_typed_values() {
        let mut t = parse_str("[train]\nsteps = 3", "x").unwrap();
        apply_sets(&mut t, &["train.steps=7".into(), "run.name=abc".into(), "optim.lr=1e-2".into()]).unwrap();
        let r = Raw::new(t).unwrap();
        assert_eq!(r.int("train.steps"), 7);
        assert_eq!(r.str("run.name"), "abc");
        assert_eq!(r.float("optim.lr"), 1e-2);
        assert_eq!(r.float("optim.eps"), 1e-8);
        let mut t = Table::new();
        assert!(apply_sets(&mut t, &["train.nope=1".into()]).unwrap_err().to_string().contains("train.nope"));
        assert!(apply_sets(&mut t, &["train.steps".into()]).is_err());
    }
}
