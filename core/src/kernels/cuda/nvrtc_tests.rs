//! Every CUDA kernel source compiles with NVRTC for sm_90 with no error and no warning, to PTX
//! that the GPU machines' driver (CUDA 13.0) can load. Needs libnvrtc.so.13 on
//! LD_LIBRARY_PATH (scripts/test.sh installs `nvidia-cuda-nvrtc==13.0.*` from PyPI into a venv
//! and sets DPTRAIN_REQUIRE_NVRTC=1, so CI fails rather than skips when it is missing).
//! (Unit tests of the kernel layer, which is private to the engine.)

use super::{compile, compile_all, nvrtc_available, programs, Compiled, SOURCES};

/// Every program compiled for sm_90, once for the tests that read it.
fn sm_90() -> &'static [Compiled] {
    static COMPILED: std::sync::OnceLock<Vec<Compiled>> = std::sync::OnceLock::new();
    COMPILED.get_or_init(|| compile_all("sm_90").unwrap_or_else(|e| panic!("{e}")))
}

#[test]
fn every_kernel_compiles_cleanly_for_sm_90() {
    if !nvrtc_available() {
        assert!(!crate::env::env().require_nvrtc, "DPTRAIN_REQUIRE_NVRTC=1 but libnvrtc.so.13 is not loadable");
        eprintln!("skipping: NVRTC not found (set LD_LIBRARY_PATH to nvidia/cu13/lib of the nvidia-cuda-nvrtc wheel)");
        return;
    }
    let compiled = sm_90();
    assert_eq!(compiled.len(), programs().len());
    let mut slowest: Vec<_> = compiled.iter().map(|c| (c.seconds, c.name)).collect();
    slowest.sort_by(|a, b| b.0.total_cmp(&a.0));
    eprintln!("slowest programs (s, one per core at a time): {:.2?}", &slowest[..4]);
    for c in compiled {
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

/// Kernel signatures from PTX: (kernel file, name) → parameter sizes in bytes (struct
/// parameters by their `.b8 name[N]` size). A kernel in two programs of a file is an error.
fn ptx_signatures() -> std::collections::HashMap<(String, String), Vec<usize>> {
    let mut out = std::collections::HashMap::new();
    for (p, c) in programs().iter().zip(sm_90()) {
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
            let twice = out.insert((p.file.to_string(), name.clone()), sizes);
            assert!(twice.is_none(), "{}.{name} is in two of its programs", p.file);
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

/// What ptxas reports for one kernel (`-Xptxas -v`): registers per thread, local memory (stack
/// frame, spill stores and loads, in bytes) and static shared memory.
#[derive(Debug, Default)]
struct Resources {
    kernel: String,
    registers: u32,
    stack: u32,
    spill_stores: u32,
    spill_loads: u32,
    smem: u32,
}

/// The number before `unit` in `line` ("… 104 bytes stack frame, …" → 104 for "bytes stack").
fn number_before(line: &str, unit: &str) -> Option<u32> {
    let i = line.find(unit)?;
    line[..i].split_whitespace().last()?.parse().ok()
}

/// ptxas's report per kernel, from the log of a compile with `-Xptxas -v`: a "Function
/// properties for K" line, then the stack/spill line, then "Used N registers, … M bytes smem".
fn ptxas_resources(log: &str) -> Vec<Resources> {
    let mut out: Vec<Resources> = vec![];
    for line in log.lines() {
        if let Some(k) = line.split("Function properties for ").nth(1) {
            out.push(Resources { kernel: k.trim().to_string(), ..Default::default() });
        } else if let Some(r) = out.last_mut() {
            if line.contains("bytes stack frame") {
                r.stack = number_before(line, "bytes stack frame").expect("stack frame size");
                r.spill_stores = number_before(line, "bytes spill stores").expect("spill stores");
                r.spill_loads = number_before(line, "bytes spill loads").expect("spill loads");
            } else if line.contains("Used ") && line.contains(" registers") {
                r.registers = number_before(line, "registers").expect("register count");
                r.smem = number_before(line, "bytes smem").unwrap_or(0);
            }
        }
    }
    out
}

#[test]
fn ptxas_reports_are_parsed() {
    let log = "ptxas info    : Compiling entry function 'k' for 'sm_90'\n\
               ptxas info    : Function properties for k\n\
               ptxas         .     104 bytes stack frame, 8 bytes spill stores, 12 bytes spill loads\n\
               ptxas info    : Used 36 registers, used 1 barriers, 37888 bytes smem, 104 bytes cumulative stack size\n\
               ptxas info    : Function properties for j\n\
               ptxas         .     0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads\n\
               ptxas info    : Used 24 registers, used 0 barriers\n";
    let r = ptxas_resources(log);
    assert_eq!(r.len(), 2);
    assert_eq!(
        (r[0].kernel.as_str(), r[0].registers, r[0].stack, r[0].spill_stores, r[0].spill_loads, r[0].smem),
        ("k", 36, 104, 8, 12, 37888)
    );
    assert_eq!((r[1].kernel.as_str(), r[1].registers, r[1].stack, r[1].smem), ("j", 24, 0, 0));
}

/// What the GPU machine's driver does with our PTX — ptxas, NVRTC's own copy of it here — is
/// checked without a GPU: on sm_90 no kernel uses local memory (a stack frame or register
/// spills: per-thread arrays indexed at run time live there, and every access is a round trip
/// to device memory — the first GPU profile caught the strided copy doing that), static shared
/// memory stays within the 48 KiB a launch gets without opting in, and every kernel but flash
/// attention's fits a 1024-thread block (≤ 64 registers; a launch needing more than the SM's
/// 65,536 registers fails on the GPU only, with "too many resources requested"). Flash
/// attention's kernels run 128 threads a block, which ptxas's 255-register cap always fits.
#[test]
fn no_kernel_spills_or_outgrows_its_block_on_sm_90() {
    if !nvrtc_available() {
        return;
    }
    let mut problems = vec![];
    let mut kernels = 0;
    let compiled = super::per_program(|p| super::compile_with(&p.name, &p.source, "sm_90", &["-Xptxas", "-v"]));
    for (p, c) in programs().iter().zip(compiled) {
        let (name, c) = (&p.name, c.unwrap_or_else(|e| panic!("{e}")));
        let report = ptxas_resources(&c.log);
        let entries = c.ptx.matches(".entry ").count();
        assert_eq!(report.len(), entries, "{name}: ptxas reported {} kernels, the PTX has {entries}:\n{}", report.len(), c.log);
        for r in report {
            eprintln!("{name}.{}: {} registers, {} B smem, {} B stack", r.kernel, r.registers, r.smem, r.stack);
            if r.stack > 0 || r.spill_stores > 0 || r.spill_loads > 0 {
                problems.push(format!(
                    "{name}.{}: local memory ({} B stack frame, {} B spill stores, {} B spill loads)",
                    r.kernel, r.stack, r.spill_stores, r.spill_loads
                ));
            }
            if r.smem > 48 * 1024 {
                problems.push(format!("{name}.{}: {} B of static shared memory (48 KiB at most)", r.kernel, r.smem));
            }
            if p.file != "flash" && r.registers > 64 {
                problems.push(format!("{name}.{}: {} registers, too many for a 1024-thread block", r.kernel, r.registers));
            }
            kernels += 1;
        }
    }
    assert!(kernels > 90, "only {kernels} kernels reported");
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

/// A kernel cache in a fresh temporary directory (the directory, for the test to remove).
fn empty_cache(tag: &str) -> (std::path::PathBuf, super::KernelCache) {
    let dir = std::env::temp_dir().join(format!("dptrain-nvrtc-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let cache = super::KernelCache::new(&dir);
    (dir, cache)
}

/// The device loads NVRTC's machine code: for sm_90 each file has a 64-bit little-endian ELF
/// for the CUDA machine (EM_CUDA, 190) holding every kernel of its PTX, and none for a
/// virtual architecture. Through the kernel cache a second request is the same bytes, read
/// back instead of compiled.
#[test]
fn the_machine_code_is_a_cuda_elf_and_the_cache_returns_it() {
    if !nvrtc_available() {
        return;
    }
    let (dir, cache) = empty_cache("cache");
    for (name, src) in SOURCES.iter().filter(|(n, _)| ["elementwise", "optim"].contains(n)) {
        let c = compile(name, src, "sm_90").unwrap();
        let elf = &c.cubin;
        assert!(elf.len() > 64 && &elf[..4] == b"\x7fELF", "{name}: not an ELF file");
        assert_eq!((elf[4], elf[5]), (2, 1), "{name}: not 64-bit little-endian");
        assert_eq!(u16::from_le_bytes([elf[18], elf[19]]), 190, "{name}: not EM_CUDA");
        for entry in c.ptx.lines().filter_map(|l| l.trim().strip_prefix(".visible .entry ")) {
            let kernel = entry.split('(').next().unwrap().trim();
            assert!(elf.windows(kernel.len()).any(|w| w == kernel.as_bytes()), "{name}: {kernel} is not in the machine code");
        }
        assert!(compile(name, src, "compute_90").unwrap().cubin.is_empty());

        let t = std::time::Instant::now();
        let (first, hit) = super::cubin(name, src, "sm_90", Some(&cache)).unwrap();
        let compiled = t.elapsed();
        assert!(!hit, "{name}: the cache held it before it was compiled");
        let t = std::time::Instant::now();
        let (second, hit) = super::cubin(name, src, "sm_90", Some(&cache)).unwrap();
        eprintln!("{name}: compiled in {compiled:?}, from the cache in {:?}", t.elapsed());
        assert!(hit && second == first, "{name}: the second request was not the cached bytes");
        // another architecture is compiled again, and kept beside it
        let (other, hit) = super::cubin(name, src, "sm_80", Some(&cache)).unwrap();
        assert!(!hit && other != first);
        assert!(super::cubin(name, src, "sm_80", Some(&cache)).unwrap().1);
        // no cache: compiled every time
        assert!(!super::cubin(name, src, "sm_90", None).unwrap().1);
    }
    // the key has NVRTC's version and options
    let id = super::compiler_id("sm_90");
    assert!(id.starts_with("nvrtc 13.") && id.contains("--gpu-architecture=sm_90"), "{id}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// What a device does at start (`load_all`), with a stand-in for the driver's module load:
/// every file is handed over as machine code, compiled on the first start and from the kernel
/// cache on the next; a file whose machine code the "driver" refuses is handed over as PTX
/// instead (and counted), and a file it refuses both ways is an error naming it.
#[test]
fn a_device_start_loads_machine_code_from_the_cache_and_falls_back_to_ptx() {
    if !nvrtc_available() {
        return;
    }
    use super::{load_all, Image};
    let (dir, cache) = empty_cache("load");
    // The stand-in driver: refuses the machine code of `refuse`, and its PTX too with `strict`.
    let start = |refuse: &'static str, strict: bool| {
        load_all("sm_90", Some(&cache), |file, image| match image {
            Image::Cubin(_) if file == refuse => Err("CUDA_ERROR_INVALID_IMAGE".to_string()),
            Image::Ptx(_) if strict => Err("CUDA_ERROR_INVALID_PTX".to_string()),
            Image::Cubin(bin) => {
                assert!(bin.starts_with(b"\x7fELF"), "{file}: not machine code");
                Ok("cubin")
            }
            Image::Ptx(text) => {
                assert!(text.contains(".entry") && text.contains(".target sm_90"), "{file}: not PTX");
                Ok("ptx")
            }
        })
    };
    let n = programs().len();
    let (modules, how) = start("reduce", false).unwrap();
    assert_eq!(modules.len(), n);
    assert!(modules.iter().zip(programs()).all(|((f, _), p)| *f == p.file), "in programs() order, with their files");
    assert!(modules.iter().all(|(f, m)| *m == if *f == "reduce" { "ptx" } else { "cubin" }), "{modules:?}");
    assert_eq!((how.programs, how.from_cache, how.as_ptx), (n, 0, 1));
    assert_eq!(how.cache_dir.as_deref(), Some(dir.as_path()));
    eprintln!("first start: {:.1} s", how.seconds);
    let (_, how) = start("none", false).unwrap();
    assert_eq!((how.from_cache, how.as_ptx), (n, 0), "the second start compiled again");
    eprintln!("second start: {:.3} s", how.seconds);
    let e = start("optim", true).unwrap_err();
    assert!(e.contains("loading kernels optim") && e.contains("CUDA_ERROR_INVALID_PTX"), "{e}");

    // A GPU newer than this NVRTC knows gets PTX for the newest architecture it does know
    // (the driver compiles it), none of it cached; one older than its oldest is a plain error.
    let known = super::supported_archs();
    let (oldest, newest) = (known[0], *known.last().unwrap());
    assert!(known.contains(&90) && oldest <= 75, "{known:?}");
    eprintln!("NVRTC {:?} compiles for {known:?}", super::nvrtc_version());
    let future = format!("sm_{}", newest + 10);
    let (modules, how) = load_all(&future, Some(&cache), |file, image| match image {
        Image::Ptx(text) if text.contains(&format!(".target sm_{newest}")) => Ok(file),
        other => Err(format!("{file}: {other:?}")),
    })
    .unwrap();
    assert_eq!((modules.len(), how.as_ptx, how.from_cache), (n, n, 0));
    assert_eq!(how.target, format!("compute_{newest}"));
    assert!(how.to_string().contains(&format!("all as PTX for compute_{newest}")), "{how}");
    assert!(!std::fs::read_dir(&dir).unwrap().flatten().any(|e| e.file_name().to_string_lossy().contains(&future)));
    let e = load_all(&format!("sm_{}", oldest - 10), None, |_, _| Ok(())).unwrap_err();
    assert!(e.contains(&format!("compiles for sm_{oldest} and newer")), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
}
