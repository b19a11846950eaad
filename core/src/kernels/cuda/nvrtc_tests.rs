//! Every CUDA kernel source compiles with NVRTC for sm_90 with no error and no warning, to PTX
//! that the GPU machines' driver (CUDA 13.0) can load. Needs libnvrtc.so.13 on
//! LD_LIBRARY_PATH (scripts/test.sh installs `nvidia-cuda-nvrtc==13.0.*` from PyPI into a venv
//! and sets DPTRAIN_REQUIRE_NVRTC=1, so CI fails rather than skips when it is missing).
//! (Unit tests of the kernel layer, which is private to the engine.)

use super::{compile, compile_all, nvrtc_available, SOURCES};

#[test]
fn every_kernel_compiles_cleanly_for_sm_90() {
    if !nvrtc_available() {
        assert!(!crate::env::env().require_nvrtc, "DPTRAIN_REQUIRE_NVRTC=1 but libnvrtc.so.13 is not loadable");
        eprintln!("skipping: NVRTC not found (set LD_LIBRARY_PATH to nvidia/cu13/lib of the nvidia-cuda-nvrtc wheel)");
        return;
    }
    let compiled = compile_all("sm_90").unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(compiled.len(), SOURCES.len());
    for c in &compiled {
        assert!(c.log.is_empty(), "{}: NVRTC warnings:\n{}", c.name, c.log);
        assert!(c.ptx.contains(".target sm_90"), "{}: PTX not for sm_90", c.name);
        // PTX ISA 9.0 is CUDA 13.0's; anything newer would not load on a CUDA 13.0 driver.
        let version = c.ptx.lines().find_map(|l| l.trim().strip_prefix(".version ")).expect("PTX has a .version line");
        let (maj, min): (u32, u32) = {
            let mut it = version.split('.').map(|x| x.trim().parse().unwrap());
            (it.next().unwrap(), it.next().unwrap())
        };
        assert!((maj, min) <= (9, 0), "{}: PTX ISA {maj}.{min} is newer than CUDA 13.0's 9.0", c.name);
        assert!(c.ptx.contains(".entry"), "{}: no kernels", c.name);
    }
}

/// A pre-Ampere GPU (sm_75, the oldest CUDA 13 supports) must still open: every file compiles
/// there too — flash.cu's tensor-core instructions need sm_80, so it compiles a stand-in that the
/// host never launches on such a device (`flash_supported`).
#[test]
fn every_kernel_compiles_for_sm_75() {
    if !nvrtc_available() {
        return;
    }
    let compiled = compile_all("sm_75").unwrap_or_else(|e| panic!("{e}"));
    for c in &compiled {
        assert!(c.log.is_empty(), "{}: NVRTC warnings for sm_75:\n{}", c.name, c.log);
    }
}

#[test]
fn a_broken_kernel_is_reported_with_its_log() {
    if !nvrtc_available() {
        return;
    }
    let e = compile("broken", "extern \"C\" __global__ void k(float* x) { x[0] = undefined_name; }", "sm_90").unwrap_err();
    assert!(e.contains("undefined_name"), "{e}");
    let w = compile("warn", "extern \"C\" __global__ void k(float* x) { int unused = 3; x[0] = 1.0f; }", "sm_90").unwrap();
    assert!(!w.log.is_empty(), "an unused variable should warn");
}

/// Kernel signatures from PTX: name → parameter sizes in bytes (struct parameters by their
/// `.b8 name[N]` size).
fn ptx_signatures() -> std::collections::HashMap<(String, String), Vec<usize>> {
    let mut out = std::collections::HashMap::new();
    for c in compile_all("sm_90").unwrap_or_else(|e| panic!("{e}")) {
        let mut lines = c.ptx.lines().peekable();
        while let Some(l) = lines.next() {
            let Some(rest) = l.trim().strip_prefix(".visible .entry ") else { continue };
            let name = rest.trim_end_matches('(').trim().to_string();
            let mut sizes = vec![];
            for p in lines.by_ref() {
                let p = p.trim();
                if p.starts_with(')') {
                    break;
                }
                let size = if p.contains(".u64") || p.contains(".s64") || p.contains(".f64") {
                    8
                } else if p.contains(".u32") || p.contains(".s32") || p.contains(".f32") {
                    4
                } else if let Some(i) = p.find('[') {
                    p[i + 1..p.find(']').unwrap()].parse().unwrap()
                } else {
                    panic!("{}: unrecognised PTX parameter `{p}`", c.name)
                };
                sizes.push(size);
            }
            out.insert((c.name.to_string(), name), sizes);
        }
    }
    out
}

/// Splits `s` on commas that are not inside brackets.
fn top_level_split(s: &str, sep: char) -> Vec<String> {
    let (mut depth, mut cur, mut out) = (0i32, String::new(), vec![]);
    for ch in s.chars() {
        match ch {
            '(' | '[' | '{' => depth += 1,
            ')' | ']' | '}' => depth -= 1,
            _ => {}
        }
        if ch == sep && depth == 0 {
            out.push(cur.trim().to_string());
            cur.clear();
        } else {
            cur.push(ch);
        }
    }
    if !cur.trim().is_empty() {
        out.push(cur.trim().to_string());
    }
    out
}

/// Without a GPU, the host/device boundary is checked statically: every `launch!` in the CUDA
/// ops names a kernel that exists in the named file, passes as many arguments as the kernel
/// has parameters, and where an argument's width is visible in the source (`as i64`, `as f32`,
/// `as i32`, a device pointer from `ptr(..)`) it matches the parameter's width in the PTX.
#[test]
fn every_launch_site_matches_its_kernel_signature() {
    if !nvrtc_available() {
        return;
    }
    let sigs = ptx_signatures();
    // The launch sites of every CUDA op family (`ops/*.rs`).
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/src/kernels/cuda/ops");
    let mut files: Vec<_> =
        std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().path()).filter(|p| p.extension().is_some_and(|x| x == "rs")).collect();
    files.sort();
    let src: String = files.iter().map(|p| std::fs::read_to_string(p).unwrap()).collect::<Vec<_>>().join("\n");
    let src = src.as_str();
    let mut checked = 0;
    let mut rest = src;
    while let Some(i) = rest.find("launch!(") {
        let body_start = i + "launch!(".len();
        let mut depth = 1;
        let mut end = body_start;
        for (k, ch) in rest[body_start..].char_indices() {
            match ch {
                '(' => depth += 1,
                ')' => depth -= 1,
                _ => {}
            }
            if depth == 0 {
                end = body_start + k;
                break;
            }
        }
        let call = &rest[body_start..end];
        rest = &rest[end..];
        let Some((head, args)) = call.split_once(';') else { continue }; // the macro definition itself
        let head = top_level_split(head, ',');
        let (file, name) = (head[1].trim_matches('"').to_string(), head[2].to_string());
        let names: Vec<String> = if name.starts_with('"') {
            vec![name.trim_matches('"').to_string()]
        } else {
            // A kernel chosen by the caller (binary, unary, map_bwd, reductions): every kernel of
            // that family must have the shape of the launch.
            match name.as_str() {
                "name" if file == "layer_norm" && args.contains("acc") => {
                    ["layer_norm_bwd_f32", "layer_norm_bwd_x4_f32"].map(String::from).to_vec()
                }
                "name" if file == "layer_norm" => {
                    ["layer_norm_fwd_f32", "layer_norm_fwd_bf16", "layer_norm_fwd_warp_f32", "layer_norm_fwd_warp_bf16"]
                        .map(String::from)
                        .to_vec()
                }
                "name" if args.contains("na as i64") => ["add_f32", "sub_f32", "mul_f32", "div_f32"].map(String::from).to_vec(),
                "name" if args.contains("ptr(&s)?") => ["tanh_bwd_f32", "relu_bwd_f32", "square_bwd_f32"].map(String::from).to_vec(),
                "name" => ["exp_f32", "log_f32", "tanh_f32", "relu_f32", "square_f32"].map(String::from).to_vec(),
                // Flash attention, one kernel per head size, element type and forward tile.
                "kernel" => ["fwd", "fwd128"]
                    .iter()
                    .flat_map(|s| [(32, ""), (64, ""), (32, "_bf16"), (64, "_bf16")].map(|(d, suf)| format!("flash_{s}_d{d}{suf}")))
                    .collect(),
                e if e.starts_with("flash_kernel(\"") => {
                    let stem = e.trim_start_matches("flash_kernel(\"").split('"').next().unwrap();
                    [(32, ""), (64, ""), (32, "_bf16"), (64, "_bf16")].map(|(d, suf)| format!("flash_bwd_{stem}_d{d}{suf}")).to_vec()
                }
                other => panic!("launch with kernel expression `{other}` not covered by this test"),
            }
        };
        let args = top_level_split(args, ',');
        for n in names {
            let sig = sigs.get(&(file.clone(), n.clone())).unwrap_or_else(|| panic!("kernel {file}.{n} does not exist"));
            assert_eq!(sig.len(), args.len(), "{file}.{n}: {} parameters, launched with {} arguments: {args:?}", sig.len(), args.len());
            for (a, &size) in args.iter().zip(sig) {
                let want = if a.ends_with("as i64") || a.starts_with("ptr(") || a.ends_with(".ptr") || a.ends_with("as u64") {
                    Some(8)
                } else if a.ends_with("as f32") || a.ends_with("as i32") {
                    Some(4)
                } else {
                    None
                };
                if let Some(w) = want {
                    assert_eq!(w, size, "{file}.{n}: argument `{a}` is {w} bytes, the parameter {size}");
                }
            }
            checked += 1;
        }
    }
    assert!(checked > 40, "only {checked} launches found");
}
