//! Finding NCCL (and, with the same search, NVRTC and cuBLAS). cudarc's loader asks the dynamic
//! linker for `libnccl.so` (and `.so.1`, `.so.9`…),
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

/// Candidate directories, in search order (without `DPTRAIN_NCCL_LIB`): `LD_LIBRARY_PATH`, then
/// every `nvidia/<package>/lib` of pip's NVIDIA wheels (NCCL, NVRTC, cuBLAS — `nvidia/cu13/lib`
/// for CUDA 13 wheels) under the usual Python prefixes, then the system library directories.
pub fn search_dirs() -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::env::var_os("LD_LIBRARY_PATH").map(|v| std::env::split_paths(&v).collect()).unwrap_or_default();
    let mut prefixes: Vec<PathBuf> = ["VIRTUAL_ENV", "CONDA_PREFIX"].iter().filter_map(std::env::var_os).map(PathBuf::from).collect();
    // The environment of the `python3` on PATH (e.g. a venv's bin/python3 → the venv), without
    // resolving its symlink (that would lead to the base interpreter).
    if let Some(path) = std::env::var_os("PATH") {
        if let Some(bin) = std::env::split_paths(&path).find(|d| d.join("python3").exists()) {
            prefixes.extend(bin.parent().map(Path::to_path_buf));
        }
    }
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
                    let nv = py.join(sp).join("nvidia");
                    dirs.push(nv.join("nccl/lib"));
                    let Ok(pkgs) = std::fs::read_dir(&nv) else { continue };
                    let mut libs: Vec<PathBuf> = pkgs.flatten().map(|e| e.path().join("lib")).filter(|l| l.is_dir()).collect();
                    libs.sort();
                    dirs.extend(libs);
                }
            }
        }
    }
    dirs.extend(["/usr/lib/x86_64-linux-gnu", "/usr/lib64", "/usr/local/cuda/lib64"].map(PathBuf::from));
    dirs
}

/// The first of `dirs` holding a file named one of `names` (e.g. `libnvrtc.so.13`).
pub fn dir_with(dirs: &[PathBuf], names: &[&str]) -> Option<PathBuf> {
    dirs.iter().find(|d| names.iter().any(|n| d.join(n).is_file())).cloned()
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
    dptrain_core::env::user_cache_dir().join("dptrain").join("nccl")
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
        // search_dirs covers VIRTUAL_ENV-style prefixes, and every pip NVIDIA package's lib dir
        let cu13 = root.join("venv/lib/python3.11/site-packages/nvidia/cu13/lib");
        std::fs::create_dir_all(&cu13).unwrap();
        // (a made-up name: the real libnvrtc may be on LD_LIBRARY_PATH, which is searched first)
        std::fs::write(cu13.join("libdptrain-test.so.13"), b"").unwrap();
        std::env::set_var("VIRTUAL_ENV", root.join("venv"));
        let dirs = search_dirs();
        assert!(dirs.contains(&pip) && dirs.contains(&cu13), "{dirs:?}");
        assert_eq!(dir_with(&dirs, &["libdptrain-test.so.12", "libdptrain-test.so.13"]), Some(cu13.clone()));
        assert_eq!(dir_with(&dirs, &["libnothing.so"]), None);
        // ... and the environment of the python3 on PATH (a venv without VIRTUAL_ENV set)
        std::env::remove_var("VIRTUAL_ENV");
        let bin = root.join("venv/bin");
        std::fs::create_dir_all(&bin).unwrap();
        std::fs::write(bin.join("python3"), b"").unwrap();
        let old = std::env::var_os("PATH").unwrap_or_default();
        let mut path = std::ffi::OsString::from(bin.as_os_str());
        path.push(":");
        path.push(&old);
        std::env::set_var("PATH", &path);
        let dirs = search_dirs();
        std::env::set_var("PATH", &old);
        assert!(dirs.contains(&cu13), "{dirs:?}");
        std::fs::remove_dir_all(&root).ok();
    }
}
