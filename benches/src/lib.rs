//! Helpers shared by dptrain's benchmarks (timing statistics, the PyTorch side).

use std::path::PathBuf;
use std::process::Command;

/// Median of a sample (sorts a copy).
pub fn median(xs: &[f64]) -> f64 {
    let mut v = xs.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        f64::NAN
    } else {
        v[v.len() / 2]
    }
}

/// The Python with torch to compare against: `$DPTRAIN_TORCH_PYTHON`, else the venv that
/// `DPTRAIN_INSTALL_TORCH=1` creates under /tmp (never done in CI), else none.
pub fn torch_python() -> Option<PathBuf> {
    let env = dptrain_core::env::env();
    if let Some(p) = &env.torch_python {
        return Some(PathBuf::from(p));
    }
    let venv = PathBuf::from("/tmp/dptrain-torch-venv");
    let py = venv.join("bin/python");
    if !py.exists() && env.install_torch {
        eprintln!("installing torch into {} (several GB, a few minutes)...", venv.display());
        let ok = Command::new("python3").args(["-m", "venv"]).arg(&venv).status().map(|s| s.success()).unwrap_or(false)
            && Command::new(&py).args(["-m", "pip", "install", "-q", "torch", "numpy"]).status().map(|s| s.success()).unwrap_or(false);
        if !ok {
            eprintln!("torch install failed; benchmarking dptrain alone");
            return None;
        }
    }
    py.exists().then_some(py)
}
