//! `dptrain report RUN_DIR`: a run's curves as PNGs and a `report.md`, from what the run wrote
//! (`metrics.jsonl`, `summary.json`, the resolved `config.toml`) — nothing is recomputed, so a
//! report can be made while the run goes on or long after, on any machine.
//!
//! Plots: training and validation loss, learning rate, gradient norm, and one plot per probe
//! family (the part of a probe's name before `/`: `attn_logit_max/0`, `attn_logit_max/1`, ...
//! share `probe_attn_logit_max.png`; a name without `/` is its own family; locations such as
//! `massive_top1/0@token` are listed, not plotted). A family of more than eight series (a
//! GPT-124M run has 144 per-head query norms and ~150 per-tensor update ratios) draws the eight
//! largest at the last step, and says so in its title. `report.md` has the final numbers, the
//! fitted slope of the distance from initialisation against log t, each probe's last value,
//! and the alerts the run recorded (`events.jsonl`).

use crate::error::{input_err, LaunchError, Result};
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Fields of a metrics record that are not probes.
const NOT_PROBES: &[&str] =
    &["step", "loss", "lr", "grad_norm", "elapsed_s", "samples_per_s", "comm_s", "comm_hidden", "entropy_floor", "val_gap"];

/// What `report` wrote.
#[derive(Debug)]
pub struct Written {
    pub plots: Vec<PathBuf>,
    pub report: PathBuf,
    /// What the report left out, one line each (a last record cut off mid-write).
    pub warnings: Vec<String>,
}

fn series(recs: &[Value], key: &str) -> Vec<(f64, f64)> {
    recs.iter().filter_map(|r| Some((r.get("step")?.as_f64()?, r.get(key)?.as_f64()?))).collect()
}

/// Series drawn per family at most.
const MAX_LINES: usize = 8;

/// A family's members to draw, in name order: all of them up to [`MAX_LINES`], else those with
/// the largest |value| at their last record (a non-finite one first: that is the one to see).
fn shown(keys: &[String], recs: &[Value]) -> Vec<String> {
    if keys.len() <= MAX_LINES {
        return keys.to_vec();
    }
    let last = |k: &str| {
        recs.iter()
            .rev()
            .find_map(|r| r.get(k))
            .map_or(f64::NEG_INFINITY, |v| v.as_f64().map_or(f64::INFINITY, |x| if x.is_nan() { f64::INFINITY } else { x.abs() }))
    };
    let mut by: Vec<(f64, &String)> = keys.iter().map(|k| (last(k), k)).collect();
    by.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(b.1)));
    let keep: std::collections::HashSet<&String> = by.into_iter().take(MAX_LINES).map(|(_, k)| k).collect();
    keys.iter().filter(|k| keep.contains(k)).cloned().collect()
}

fn file_name(family: &str) -> String {
    family.chars().map(|c| if c.is_ascii_alphanumeric() || c == '_' || c == '-' { c } else { '_' }).collect()
}

/// Writes the plots and `report.md` into `dir` (the run directory).
pub fn report(dir: &Path) -> Result<Written> {
    let metrics = dir.join("metrics.jsonl");
    let text = std::fs::read_to_string(&metrics)
        .map_err(|e| input_err!("{}: cannot read ({e}); is {} a run directory?", metrics.display(), dir.display()))?;
    let mut recs = vec![];
    let mut warnings = vec![];
    let lines: Vec<(usize, &str)> = text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()).collect();
    for (k, &(i, line)) in lines.iter().enumerate() {
        let v: Value = match serde_json::from_str(line) {
            Ok(v) => v,
            // A last line without its newline is a record being written (the run is live) or
            // cut off (the run was killed): what came before it is the run so far.
            Err(_) if k + 1 == lines.len() && !text.ends_with('\n') => {
                warnings.push(format!(
                    "{}: line {}: left out, cut off before its end (a record being written, or the run stopped while writing it)",
                    metrics.display(),
                    i + 1
                ));
                continue;
            }
            Err(e) => return Err(input_err!("{}: line {}: not JSON ({e})", metrics.display(), i + 1)),
        };
        if v.get("step").and_then(Value::as_f64).is_none() {
            return Err(input_err!("{}: line {}: no `step`", metrics.display(), i + 1));
        }
        recs.push(v);
    }
    if recs.is_empty() {
        return Err(input_err!("{}: no records yet", metrics.display()));
    }
    let summary: Option<Value> = std::fs::read_to_string(dir.join("summary.json")).ok().and_then(|s| serde_json::from_str(&s).ok());
    let mut plots = vec![];
    let mut plot = |name: &str, title: &str, y: &str, s: Vec<(String, Vec<(f64, f64)>)>, log_y: bool| -> Result<()> {
        if s.iter().all(|(_, p)| p.is_empty()) {
            return Ok(());
        }
        let p = dir.join(name);
        crate::plot::line_chart(&p, title, y, &s, log_y)?;
        plots.push(p);
        Ok(())
    };
    plot(
        "loss.png",
        "loss",
        "nats",
        vec![("train".into(), series(&recs, "loss")), ("validation".into(), series(&recs, "val_loss"))],
        false,
    )?;
    plot("lr.png", "learning rate", "lr", vec![("lr".into(), series(&recs, "lr"))], false)?;
    plot("grad_norm.png", "gradient norm (before clipping)", "‖g‖", vec![("grad_norm".into(), series(&recs, "grad_norm"))], true)?;
    // Probe families, in name order.
    let mut families: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for r in &recs {
        for (k, v) in r.as_object().into_iter().flatten() {
            if NOT_PROBES.contains(&k.as_str()) || k.starts_with("val_") || !v.is_number() || k.contains('@') {
                continue;
            }
            let fam = k.split('/').next().unwrap_or(k).to_string();
            let members = families.entry(fam).or_default();
            if !members.contains(k) {
                members.push(k.clone());
            }
        }
    }
    for (fam, keys) in &families {
        let drawn = shown(keys, &recs);
        let title = if drawn.len() < keys.len() {
            format!("{fam}: {} of {}, largest at the end (all in report.md)", drawn.len(), keys.len())
        } else {
            fam.clone()
        };
        let s = drawn.iter().map(|k| (k.clone(), series(&recs, k))).collect();
        plot(&format!("probe_{}.png", file_name(fam)), &title, fam, s, false)?;
    }

    let mut md = format!("# Run report: {}\n\n", dir.display());
    match &summary {
        Some(s) => {
            let f = |k: &str| s.get(k).and_then(Value::as_f64).map_or("—".to_string(), |v| format!("{v:.4}"));
            md.push_str(&format!(
                "| | |\n|---|---|\n| model | {} |\n| parameters | {} |\n| steps | {} |\n| final training loss | {} |\n| final validation loss | {} |\n| validation accuracy | {} |\n| entropy floor | {} |\n| gap to the floor | {} |\n| time | {} s |\n| samples/s | {} |\n\n",
                s.get("model").and_then(Value::as_str).unwrap_or("—"),
                s.get("parameters").and_then(Value::as_u64).map_or("—".into(), |v| v.to_string()),
                s.get("steps").and_then(Value::as_u64).map_or("—".into(), |v| v.to_string()),
                f("final_loss"),
                f("final_val_loss"),
                f("final_val_acc"),
                f("entropy_floor"),
                f("gap_to_floor"),
                f("elapsed_s"),
                f("samples_per_s"),
            ));
        }
        None => md.push_str("No `summary.json` yet: the run has not finished.\n\n"),
    }
    let last_step = recs.iter().filter_map(|r| r["step"].as_u64()).max().unwrap_or(0);
    md.push_str(&format!("Last logged step: {last_step}.\n\n"));
    for w in &warnings {
        md.push_str(&format!("Note: {w}.\n\n"));
    }
    let dist = series(&recs, "dist_init");
    if let Some((slope, intercept, n)) = log_fit(&dist) {
        md.push_str(&format!(
            "Distance from initialisation ‖w_t − w₀‖ against ln t, least squares over {n} probe steps: slope {slope:.4} per e-fold of steps (intercept {intercept:.4}).\n\n"
        ));
    }
    md.push_str("## Probes (last value)\n\n");
    if families.is_empty() {
        md.push_str("None logged.\n");
    } else {
        md.push_str("| probe | step | value |\n|---|---|---|\n");
        let mut keys: Vec<&String> = families.values().flatten().collect();
        // Locations sit beside the maximum they belong to.
        let mut at: Vec<String> =
            recs.iter().flat_map(|r| r.as_object().into_iter().flatten().map(|(k, _)| k.clone())).filter(|k| k.contains('@')).collect();
        at.sort();
        at.dedup();
        keys.extend(at.iter());
        for k in keys {
            if let Some((s, v)) = series(&recs, k).last() {
                md.push_str(&format!("| `{k}` | {s} | {v:.6e} |\n"));
            }
        }
    }
    md.push_str("\n## Alerts\n\n");
    match std::fs::read_to_string(dir.join("events.jsonl")) {
        Ok(ev) if !ev.trim().is_empty() => {
            for line in ev.lines() {
                md.push_str(&format!("- `{line}`\n"));
            }
        }
        _ => md.push_str("None recorded.\n"),
    }
    md.push_str("\n## Plots\n\n");
    for p in &plots {
        let name = p.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default();
        md.push_str(&format!("![{name}]({name})\n"));
    }
    let report = dir.join("report.md");
    dptrain_core::checkpoint::atomic_write(&report, md.as_bytes()).map_err(|e| LaunchError::Runtime(e.to_string()))?;
    Ok(Written { plots, report, warnings })
}

/// Least-squares fit y = a·ln t + b over the points with t > 0: (a, b, points); `None` with
/// fewer than two distinct steps.
pub fn log_fit(pts: &[(f64, f64)]) -> Option<(f64, f64, usize)> {
    let p: Vec<(f64, f64)> = pts.iter().filter(|(t, y)| *t > 0.0 && y.is_finite()).map(|&(t, y)| (t.ln(), y)).collect();
    let n = p.len() as f64;
    if p.len() < 2 {
        return None;
    }
    let (mx, my) = (p.iter().map(|q| q.0).sum::<f64>() / n, p.iter().map(|q| q.1).sum::<f64>() / n);
    let sxx: f64 = p.iter().map(|q| (q.0 - mx).powi(2)).sum();
    if sxx == 0.0 {
        return None;
    }
    let a = p.iter().map(|q| (q.0 - mx) * (q.1 - my)).sum::<f64>() / sxx;
    Some((a, my - a * mx, p.len()))
}

#[cfg(test)]
mod tests {
    use serde_json::Value;

    #[test]
    fn log_fit_recovers_a_logarithmic_curve() {
        let pts: Vec<(f64, f64)> = [10.0, 20.0, 40.0, 80.0, 160.0].iter().map(|&t: &f64| (t, 0.7 * t.ln() + 2.0)).collect();
        let (a, b, n) = super::log_fit(&pts).unwrap();
        assert!((a - 0.7).abs() < 1e-12 && (b - 2.0).abs() < 1e-12 && n == 5);
        assert!(super::log_fit(&pts[..1]).is_none());
    }

    #[test]
    fn a_crowded_family_draws_its_largest_members() {
        use serde_json::json;
        let keys: Vec<String> = (0..20).map(|i| format!("q_norm_max/0/{i}")).collect();
        // Values grow with the head index except head 3, which ends non-finite (null in JSON)
        // and head 5, whose last value is large but only in an earlier record.
        let mut last = serde_json::Map::new();
        for (i, k) in keys.iter().enumerate() {
            last.insert(k.clone(), if i == 3 { json!(null) } else { json!(i as f64) });
        }
        last.remove("q_norm_max/0/5");
        last.insert("step".into(), json!(2));
        let recs = vec![json!({"step": 1, "q_norm_max/0/5": -100.0}), Value::Object(last)];
        let got = super::shown(&keys, &recs);
        let want: Vec<String> = [3, 5, 14, 15, 16, 17, 18, 19].iter().map(|i| format!("q_norm_max/0/{i}")).collect();
        assert_eq!(got, want);
        // Few members: all, unchanged.
        assert_eq!(super::shown(&keys[..4], &recs), keys[..4].to_vec());
    }
}
