//! Finding NCCL. cudarc's loader asks the dynamic linker for `libnccl.so` (and `.so.1`, `.so.9`…),
//! but pip's `nvidia-nccl-cu13` — how most GPU machines get NCCL — ships only the real soname
//! `libnccl.so.2`. So dptrain looks for `libnccl.so.2` itself (`DPTRAIN_NCCL_LIB`, then the
//! directories on `LD_LIBRARY_PATH`, then pip's `nvidia/nccl/lib` under the usual Python
//! prefixes, then the system library directories), links it as `libnccl.so` in a private
//! directory, and the launcher re-executes itself once with that directory on
//! `LD_LIBRARY_PATH` (the dynamic linker reads that variable only at process start).
//! No user symlinks needed.

use std::path::{Path, PathBuf};

/// The library file a path names: the file itself, or `libnccl.so.2` / `libnccl.so` inside a
/// directory.
fn lib_in(p: &Path) -> Option<PathBuf> {
    if p.is_file() {
        return Some(p.to_path_buf());
    }
    ["libnccl.so.2", "libnccl.so"].iter().map(|n| p.join(n)).find(|f| f.is_file())
}

/// Candidate directories, in search order (without `DPTRAIN_NCCL_LIB`).
pub fn search_dirs() -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::env::var_os("LD_LIBRARY_PATH").map(|v| std::env::split_paths(&v).collect()).unwrap_or_default();
    let mut prefixes: Vec<PathBuf> = ["VIRTUAL_ENV", "CONDA_PREFIX"].iter().filter_map(std::env::var_os).map(PathBuf::from).collect();
    prefixes.extend(["/usr/local", "/usr", "/opt/conda"].map(PathBuf::from));
    if let Some(home) = std::env::var_os("HOME") {
        prefixes.push(PathBuf::from(home).join(".local"));
    }
    for pre in prefixes {
        for lib in ["lib", "lib64"] {
            let Ok(rd) = std::fs::read_dir(pre.join(lib)) else { continue };
            let mut pys: Vec<PathBuf> = rd
                .flatten()
                .map(|e| e.path())
                .filter(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("python3")))
                .collect();
            pys.sort();
            for py in pys {
                for sp in ["site-packages", "dist-packages"] {
                    dirs.push(py.join(sp).join("nvidia/nccl/lib"));
                }
            }
        }
    }
    dirs.extend(["/usr/lib/x86_64-linux-gnu", "/usr/lib64", "/usr/local/cuda/lib64"].map(PathBuf::from));
    dirs
}

/// The NCCL library to use: `override_path` (from `DPTRAIN_NCCL_LIB`) if given — it must
/// exist — else the first match in `dirs`.
pub fn find(override_path: Option<&Path>, dirs: &[PathBuf]) -> Result<Option<PathBuf>, String> {
    if let Some(p) = override_path {
        return lib_in(p).map(Some).ok_or_else(|| format!("DPTRAIN_NCCL_LIB={}: no libnccl.so.2 there", p.display()));
    }
    Ok(dirs.iter().find_map(|d| lib_in(d)))
}

/// Makes `<dir>/libnccl.so` point at `lib` (idempotent) and returns `dir`.
pub fn shim_dir(lib: &Path, dir: &Path) -> Result<PathBuf, String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let link = dir.join("libnccl.so");
    let target = lib.canonicalize().map_err(|e| format!("{}: {e}", lib.display()))?;
    if std::fs::read_link(&link).ok().as_deref() != Some(target.as_path()) {
        let tmp = dir.join(format!(".libnccl.so.{}", std::process::id()));
        let _ = std::fs::remove_file(&tmp);
        std::os::unix::fs::symlink(&target, &tmp).map_err(|e| format!("{}: {e}", tmp.display()))?;
        std::fs::rename(&tmp, &link).map_err(|e| format!("{}: {e}", link.display()))?;
    }
    Ok(dir.to_path_buf())
}

/// The private directory for the `libnccl.so` link.
pub fn default_shim_dir() -> PathBuf {
    let base =
        std::env::var_os("XDG_CACHE_HOME").map(PathBuf::from).or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")));
    base.unwrap_or_else(std::env::temp_dir).join("dptrain").join("nccl")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_pip_soname_and_links_it() {
        let root = std::env::temp_dir().join(format!("dptrain-nccl-{}", std::process::id()));
        let pip = root.join("venv/lib/python3.11/site-packages/nvidia/nccl/lib");
        std::fs::create_dir_all(&pip).unwrap();
        std::fs::write(pip.join("libnccl.so.2"), b"not really a library").unwrap();
        let dirs = vec![root.join("empty"), pip.clone()];
        let found = find(None, &dirs).unwrap().unwrap();
        assert_eq!(found, pip.join("libnccl.so.2"));
        // the override wins and must exist
        assert_eq!(find(Some(&pip), &[]).unwrap().unwrap(), pip.join("libnccl.so.2"));
        assert!(find(Some(&root.join("nope")), &dirs).unwrap_err().contains("DPTRAIN_NCCL_LIB"));
        assert!(find(None, &[root.join("empty")]).unwrap().is_none());
        // the shim links libnccl.so to it, idempotently
        let shim = shim_dir(&found, &root.join("shim")).unwrap();
        let link = shim.join("libnccl.so");
        assert_eq!(std::fs::read_link(&link).unwrap(), found.canonicalize().unwrap());
        shim_dir(&found, &root.join("shim")).unwrap();
        assert_eq!(std::fs::read(&link).unwrap(), b"not really a library");
        // search_dirs covers VIRTUAL_ENV-style prefixes
        std::env::set_var("VIRTUAL_ENV", root.join("venv"));
        assert!(search_dirs().contains(&pip));
        std::fs::remove_dir_all(&root).ok();
    }
}
