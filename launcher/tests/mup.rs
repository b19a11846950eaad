//! μP against PyPI `mup` 1.0.0 (`tests/fixtures/mup.json`, from
//! `tools/reference/make_mup_fixtures.py`): for a small GPT and MLP at two widths over a base
//! width of 16, every parameter's init (standard deviation, or constant) and its learning-rate
//! and weight-decay multipliers under an Adam-family optimizer (MuAdam's groups) and an
//! SGD-family one (MuSGD's) — as the trainer builds them (`build_model`, `mup_scales`). Weight
//! decay on vectors is on, as mup's groups decay everything.

use dptrain_core::{Init, ParamBuilder};
use dptrain_launcher::build::{build_model, load_data, mup_scales};
use dptrain_launcher::config::{apply_sets, Raw};
use dptrain_launcher::memory::Budget;
use serde_json::Value;

fn config(sets: &[String]) -> dptrain_launcher::config::RunConfig {
    let mut t = toml::Table::new();
    apply_sets(&mut t, sets).unwrap();
    Raw::new(t).unwrap().typed().unwrap()
}

fn init_value(i: Init) -> f64 {
    match i {
        Init::Const(c) => c,
        other => other.std(),
    }
}

#[test]
fn mup_init_and_learning_rates_match_pypi_mup() {
    let p = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures/mup.json");
    let f: Value = serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap();
    let mut checked = 0;
    for model in ["gpt", "mlp"] {
        let fx = &f[model];
        let base = fx["base_width"].as_u64().unwrap();
        for (w, want) in fx["widths"].as_object().unwrap() {
            let mut sets: Vec<String> = match model {
                "gpt" => vec![
                    format!("model.d_model={w}"),
                    "model.n_layers=2".into(),
                    "model.n_heads=2".into(),
                    "model.context=8".into(),
                    "data.vocab=16".into(),
                ],
                _ => vec![
                    "model.kind=\"mlp\"".into(),
                    "data.kind=\"synthetic-images\"".into(),
                    format!("model.widths=[{w}, {w}]"),
                    "data.samples=64".into(),
                    "data.val_samples=16".into(),
                ],
            };
            sets.extend(["mup.enabled=true".into(), format!("mup.base_width={base}"), "optim.decay_vectors=true".into()]);
            for (kind, key) in [("adamw", "adam"), ("sgd", "sgd")] {
                let mut s = sets.clone();
                s.push(format!("optim.kind=\"{kind}\""));
                let cfg = config(&s);
                let data = load_data(&cfg, Budget::this_node(1)).unwrap();
                let mut pb = ParamBuilder::new();
                build_model(&cfg, &data, &mut pb, Budget::this_node(1)).unwrap();
                let ps = pb.build(0, dptrain_core::DType::F32).unwrap();
                let scales = mup_scales(&cfg, &ps);
                let names: Vec<&String> = want.as_object().unwrap().keys().collect();
                assert_eq!(ps.infos().len(), names.len(), "{model} {w}: parameter count");
                for (i, info) in ps.infos().iter().enumerate() {
                    let r = &want[&info.name];
                    assert!(!r.is_null(), "{model} {w}: {} not in the reference", info.name);
                    let shape: Vec<usize> = r["shape"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as usize).collect();
                    assert_eq!(info.shape, shape, "{model} {w}: {}", info.name);
                    let close = |a: f64, b: f64| (a - b).abs() <= 1e-6 * b.abs().max(1e-3);
                    let (init, want_init) = (init_value(info.init), r["init"].as_f64().unwrap());
                    assert!(close(init, want_init), "{model} {w}: {} init {init} vs mup {want_init}", info.name);
                    let (lr, wd) = (r[format!("{key}_lr")].as_f64().unwrap(), r[format!("{key}_wd")].as_f64().unwrap());
                    assert!(close(scales.lr[i], lr), "{model} {w} {kind}: {} lr × {} vs mup {lr}", info.name, scales.lr[i]);
                    assert!(close(scales.wd[i], wd), "{model} {w} {kind}: {} wd × {} vs mup {wd}", info.name, scales.wd[i]);
                    checked += 1;
                }
            }
        }
    }
    assert_eq!(checked, 2 * 2 * (29 + 6));
}
