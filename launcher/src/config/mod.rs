//! Configuration in two phases (architecture principle 7): the raw TOML (file, then `--set`
//! overrides) is checked key by key against one schema table (`schema::KEYS`) — unknown keys,
//! wrong types, out-of-range values and unknown choices are one-line errors naming the key — and
//! then deserialised, with the schema's defaults filled in, into the typed `RunConfig`
//! (`typed`). The same table documents every key for `dptrain config show`, so docs, defaults
//! and validation cannot drift apart. Keys are dotted paths of any depth (`[optim.soap]` tables
//! work in files and as `--set optim.soap.distribute=owner`).

pub mod batch_rules;
pub mod schema;
pub mod typed;

pub use schema::{doc, Check, KeyDoc, Ty, KEYS, KIND_DEFAULTS, MODEL_KEYS, REPLACED};
pub use typed::*;

use crate::error::{input_err, LaunchError, Result};
use std::path::Path;
use toml::{Table, Value};
use Ty::*;

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
    match s.char_indices().nth(40) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s,
    }
}

/// Flattens a table into (dotted key, value) pairs, at any depth.
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

/// The value at a dotted path of a table.
fn get_path<'a>(t: &'a Table, key: &str) -> Option<&'a Value> {
    let (sec, name) = key.rsplit_once('.')?;
    let mut cur = t;
    for part in sec.split('.') {
        cur = cur.get(part)?.as_table()?;
    }
    cur.get(name)
}

/// Sets the value at a dotted path, creating the tables on the way.
fn set_path(t: &mut Table, key: &str, v: Value) -> Result<()> {
    let (sec, name) = key.rsplit_once('.').ok_or_else(|| input_err!("{key}: expected section.name"))?;
    let mut cur = t;
    let mut path = String::new();
    for part in sec.split('.') {
        path = if path.is_empty() { part.to_string() } else { format!("{path}.{part}") };
        cur = match cur.entry(part.to_string()).or_insert_with(|| Value::Table(Table::new())) {
            Value::Table(st) => st,
            _ => return Err(input_err!("{path}: expected a table")),
        };
    }
    cur.insert(name.to_string(), v);
    Ok(())
}

/// Applies `key=value` overrides; the value is parsed as TOML, or taken as a string.
pub fn apply_sets(t: &mut Table, sets: &[String]) -> Result<()> {
    for s in sets {
        let (key, val) = s.split_once('=').ok_or_else(|| input_err!("--set {s}: expected key=value"))?;
        let key = key.trim();
        let Some(d) = doc(key) else { return Err(unknown_key(key, "--set ")) };
        let val = val.trim();
        let parsed = format!("v = {val}").parse::<Table>().ok().and_then(|mut t| t.remove("v"));
        // Digits TOML could not read are an integer beyond 64 bits (f64's Display writes 1e20
        // so, and the sweep and coord-check write their rates with it): the number they are
        // for a float key, an error for an integer one — not a string.
        let digits = val.strip_prefix(['-', '+']).unwrap_or(val);
        let beyond_i64 = parsed.is_none() && !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit() || b == b'_');
        let v = match (beyond_i64, d.ty) {
            (true, Float) => Value::Float(val.replace('_', "").parse::<f64>().map_err(|e| input_err!("--set {s}: {e}"))?),
            (true, Int) => return Err(input_err!("--set {s}: {val} does not fit a 64-bit integer")),
            // A string key takes the text as written unless it is quoted: run.name=12345,
            // data.path=inf and run.name=true name a run or a file, not a number or a bool.
            (_, Str) => match parsed {
                Some(v @ Value::String(_)) => v,
                _ => Value::String(val.to_string()),
            },
            _ => parsed.unwrap_or_else(|| Value::String(val.to_string())),
        };
        set_path(t, key, v)?;
    }
    Ok(())
}

fn as_f64(v: &Value) -> Option<f64> {
    v.as_float().or_else(|| v.as_integer().map(|i| i as f64))
}

/// The schema's value check for a value of the right type (error names the key).
fn check_value(d: &KeyDoc, v: &Value) -> Result<()> {
    let key = d.key;
    match (d.check, d.ty) {
        (Check::Any, _) => {}
        (Check::NonNeg, Int) => {
            let i = v.as_integer().unwrap_or_default();
            if i < 0 {
                return Err(input_err!("{key}: must be ≥ 0, got {i}"));
            }
        }
        (Check::Positive, Int) => {
            let i = v.as_integer().unwrap_or_default();
            if i <= 0 {
                return Err(input_err!("{key}: must be a positive integer, got {i}"));
            }
        }
        (Check::NonNeg, Float) => {
            let x = as_f64(v).unwrap_or_default();
            if !(x.is_finite() && x >= 0.0) {
                return Err(input_err!("{key}: must be a finite number ≥ 0, got {x}"));
            }
        }
        (Check::Positive, Float) => {
            let x = as_f64(v).unwrap_or_default();
            if !(x.is_finite() && x > 0.0) {
                return Err(input_err!("{key}: must be a positive number, got {x}"));
            }
        }
        (Check::Unit | Check::Probability, Float) => {
            let x = as_f64(v).unwrap_or_default();
            if !(0.0..1.0).contains(&x) {
                let what = if d.check == Check::Probability { "a probability " } else { "" };
                return Err(input_err!("{key}: must be {what}in [0, 1), got {x}"));
            }
        }
        (Check::Positive, IntList) => {
            let a = v.as_array().map(Vec::as_slice).unwrap_or_default();
            if a.iter().any(|x| x.as_integer().unwrap_or_default() <= 0) {
                return Err(input_err!("{key}: every element must be a positive integer, got {}", short(v)));
            }
        }
        (Check::UnitPair, FloatList) => {
            let a: Vec<f64> = v.as_array().map(|a| a.iter().filter_map(as_f64).collect()).unwrap_or_default();
            if a.len() != 2 || a.iter().any(|b| !(0.0..1.0).contains(b)) {
                return Err(input_err!("{key}: expected two numbers in [0, 1), got {a:?}"));
            }
        }
        (Check::OneOf(choices), Str) => {
            let s = v.as_str().unwrap_or_default();
            if !choices.contains(&s) {
                return Err(input_err!("{key}: expected one of {}, got \"{s}\"", choices.join(" | ")));
            }
        }
        (c, t) => unreachable!("schema: check {c:?} on a {t:?} key ({key})"),
    }
    Ok(())
}

/// Checks every key of a raw config against the schema: known, of its type, within its range.
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
        check_value(d, v)?;
    }
    Ok(())
}

/// A checked raw config: the keys as given (file, then `--set`), each known, well-typed and in
/// range. `typed()` resolves it into the `RunConfig` the run reads.
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
    /// The key's value: as given, else its default — the one for the configured kind when
    /// `KIND_DEFAULTS` has one, else the schema's (`None` for an absent derived key).
    pub fn resolved(&self, key: &str) -> Option<Value> {
        if let Some(v) = get_path(&self.t, key) {
            return Some(v.clone());
        }
        for (kind_key, kind, k, lit) in KIND_DEFAULTS {
            if *k == key && self.resolved(kind_key).as_ref().and_then(Value::as_str) == Some(kind) {
                return Some(format!("v = {lit}").parse::<Table>().expect("kind defaults are valid TOML")["v"].clone());
            }
        }
        doc(key).and_then(KeyDoc::default_value)
    }
    pub fn is_set(&self, key: &str) -> bool {
        get_path(&self.t, key).is_some()
    }
    /// Every schema key with its resolved value, in the schema's tables (derived keys only when
    /// given; `skip` names sections left out).
    pub fn resolved_table(&self, skip: &[&str]) -> Table {
        let mut out = Table::new();
        for d in KEYS {
            let (sec, _) = d.section_and_name();
            if skip.contains(&sec.split('.').next().unwrap_or(sec)) {
                continue;
            }
            if let Some(v) = self.resolved(d.key) {
                set_path(&mut out, d.key, v).expect("schema paths are tables");
            }
        }
        out
    }
    /// The typed config: every key resolved (schema defaults for the absent ones).
    pub fn typed(&self) -> Result<RunConfig> {
        Value::Table(self.resolved_table(&[]))
            .try_into::<RunConfig>()
            .map_err(|e| LaunchError::Runtime(format!("config: the schema and RunConfig disagree: {e}")))
    }
}

/// `dptrain config show`: the default config as TOML, a comment on every key.
pub fn show_default() -> String {
    let mut out = String::from("# dptrain default config: `dptrain train` with no file runs exactly this.\n");
    // Tables in the order of their first key; a nested table's keys come after its parent's.
    let mut sections: Vec<&str> = vec![];
    for d in KEYS {
        let (sec, _) = d.section_and_name();
        if !sections.contains(&sec) {
            sections.push(sec);
        }
    }
    for sec in sections {
        out.push_str(&format!("\n[{sec}]\n"));
        for d in KEYS.iter().filter(|d| d.section_and_name().0 == sec) {
            let name = d.section_and_name().1;
            out.push_str(&format!("# {}\n", d.doc));
            // Keys of the other model kinds are shown commented out: the file stays a valid config.
            let other_kind = sec == "model" && name != "kind" && !MODEL_KEYS[0].1.contains(&name);
            for (kind_key, kind, _, lit) in KIND_DEFAULTS.iter().filter(|kd| kd.2 == d.key) {
                out.push_str(&format!("# default when {kind_key} = \"{kind}\": {lit}\n"));
            }
            match d.default {
                Some(v) if !other_kind => out.push_str(&format!("{name} = {v}\n")),
                Some(v) => out.push_str(&format!("# {name} = {v}\n")),
                None => out.push_str(&format!("# {name} = (derived)\n")),
            }
        }
    }
    out
}

/// Checks that only keys of `model.kind` are set.
pub fn check_model_keys(raw: &Raw, kind: ModelKind) -> Result<()> {
    let kind = kind.name();
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
                check_value(d, &v).unwrap();
            }
        }
        let shown = show_default().parse::<Table>().expect("config show is valid TOML");
        check_keys(&shown).unwrap();
        // The defaults resolve into the typed config.
        let cfg = Raw::new(Table::new()).unwrap().typed().unwrap();
        assert_eq!(cfg.train.steps, 600);
        assert_eq!(cfg.optim.betas, [0.9, 0.95]);
    }

    #[test]
    fn every_choice_and_derived_key_fits_the_typed_config() {
        for d in KEYS {
            let values: Vec<Value> = match d.check {
                Check::OneOf(c) => c.iter().map(|&s| Value::String(s.into())).collect(),
                _ if d.default.is_none() => vec![Value::Integer(3)],
                _ => continue,
            };
            for v in values {
                let mut t = Table::new();
                set_path(&mut t, d.key, v.clone()).unwrap();
                let r = Raw::new(t).unwrap_or_else(|e| panic!("{} = {v}: {e}", d.key));
                r.typed().unwrap_or_else(|e| panic!("{} = {v}: {e}", d.key));
            }
        }
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
        assert!(e("[train]\nsteps = -3").contains("train.steps: must be a positive integer"));
        assert!(e("[optim]\nkind = \"rmsprop\"").contains("optim.kind: expected one of sgd | adamw"));
        assert!(e("[optim]\nbetas = [0.9]").contains("optim.betas: expected two numbers in [0, 1)"));
        assert!(e("[model]\ndropout = 1.0").contains("model.dropout: must be a probability in [0, 1)"));
        assert!(e("[model]\nwidths = [3, 0]").contains("model.widths: every element must be a positive integer"));
        assert!(e("[optim.lr]\nx = 1").contains("optim.lr.x: unknown config key"));
        let r = raw("[model]\nkind = \"gpt\"\nwidths = [3]").unwrap();
        assert!(check_model_keys(&r, ModelKind::Gpt).unwrap_err().to_string().contains("model.widths: not a key"));
    }

    #[test]
    fn sets_override_with_typed_values() {
        let mut t = parse_str("[train]\nsteps = 3", "x").unwrap();
        apply_sets(&mut t, &["train.steps=7".into(), "run.name=abc".into(), "optim.lr=1e-2".into()]).unwrap();
        let r = Raw::new(t).unwrap().typed().unwrap();
        assert_eq!(r.train.steps, 7);
        assert_eq!(r.run.name, "abc");
        assert_eq!(r.optim.lr, 1e-2);
        assert_eq!(r.optim.eps, 1e-8);
        let mut t = Table::new();
        assert!(apply_sets(&mut t, &["train.nope=1".into()]).unwrap_err().to_string().contains("train.nope"));
        assert!(apply_sets(&mut t, &["train.steps".into()]).is_err());
        // Digits beyond a 64-bit integer (they used to become a string, then "expected a
        // number"): the number for a float key, an error naming them for an integer key.
        let e = apply_sets(&mut t, &["train.steps=100000000000000000000".into()]).unwrap_err().to_string();
        assert_eq!(e, "--set train.steps=100000000000000000000: 100000000000000000000 does not fit a 64-bit integer");
        apply_sets(&mut t, &["optim.lr=100000000000000000000".into(), "optim.eps=1000000000000000000000000000000".into()]).unwrap();
        let r = Raw::new(t).unwrap().typed().unwrap();
        assert_eq!((r.optim.lr, r.optim.eps), (1e20, 1e30));
        // A string key reads unquoted numbers, bools and inf as the text written; quotes still
        // work, and a choice key names what it got.
        let mut t = Table::new();
        apply_sets(&mut t, &["run.name=12345".into(), "data.path=inf".into()]).unwrap();
        let r = Raw::new(t).unwrap().typed().unwrap();
        assert_eq!((r.run.name.as_str(), r.data.path.as_str()), ("12345", "inf"));
        let mut t = Table::new();
        apply_sets(&mut t, &["run.name=\"quoted\"".into(), "data.kind=true".into()]).unwrap();
        assert_eq!(t["run"]["name"].as_str(), Some("quoted"));
        let e = Raw::new(t).err().expect("not a data kind").to_string();
        assert!(e.starts_with("data.kind: expected one of") && e.ends_with("got \"true\""), "{e}");
    }

    #[test]
    fn soap_takes_the_reference_defaults_unless_set() {
        let cfg = raw("[optim]\nkind = \"soap\"").unwrap().typed().unwrap();
        assert_eq!((cfg.optim.betas, cfg.optim.weight_decay), ([0.95, 0.95], 0.01));
        let cfg = raw("[optim]\nkind = \"soap\"\nweight_decay = 0.2").unwrap().typed().unwrap();
        assert_eq!((cfg.optim.betas, cfg.optim.weight_decay), ([0.95, 0.95], 0.2));
        let cfg = raw("[optim]\nkind = \"adamw\"").unwrap().typed().unwrap();
        assert_eq!((cfg.optim.betas, cfg.optim.weight_decay), ([0.9, 0.95], 0.1));
        assert!(show_default().contains("# default when optim.kind = \"soap\": [0.95, 0.95]"));
    }

    #[test]
    fn nested_paths_get_and_set_at_any_depth() {
        let mut t = parse_str("[a.b]\nc = 1", "x").unwrap();
        assert_eq!(get_path(&t, "a.b.c").and_then(Value::as_integer), Some(1));
        set_path(&mut t, "a.b.d", Value::Integer(2)).unwrap();
        set_path(&mut t, "a.e.f", Value::Integer(3)).unwrap();
        assert_eq!(get_path(&t, "a.b.d").and_then(Value::as_integer), Some(2));
        assert_eq!(get_path(&t, "a.e.f").and_then(Value::as_integer), Some(3));
        assert!(set_path(&mut t, "a.b.c.g", Value::Integer(4)).unwrap_err().to_string().contains("a.b.c: expected a table"));
    }
}
