//! `scripts/setup.sh` judged against fake machines. CI's own machine already has every system
//! package, so a detection bug (such as taking `libclang-cpp.so.14` for libclang) would stay green
//! there; these tests build fake library trees and fake tools and check what the script decides,
//! in report mode (`--check`) and in install mode with a fake `apt-get`.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// A 64-bit (class 2) or 32-bit (class 1) ELF header: all clang-sys reads of a library.
fn elf(class: u8) -> Vec<u8> {
    let mut b = vec![0x7f, b'E', b'L', b'F', class, 1, 1, 0];
    b.resize(64, 0);
    b
}

struct FakeMachine {
    dir: PathBuf,
}

impl FakeMachine {
    /// A machine with cc, c++, a working mpicc, mpirun and cargo, and no libclang.
    fn new(name: &str) -> FakeMachine {
        let dir = std::env::temp_dir().join(format!("dptrain-setup-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(dir.join("bin")).unwrap();
        fs::create_dir_all(dir.join("root")).unwrap();
        let m = FakeMachine { dir };
        for tool in ["cc", "c++", "mpirun", "cargo"] {
            m.tool(tool, "exit 0");
        }
        m.tool("mpicc", r#"[ "$1" = -show ] && echo "gcc -I/usr/lib/openmpi/include -lmpi""#);
        m
    }

    fn tool(&self, name: &str, body: &str) {
        let p = self.dir.join("bin").join(name);
        fs::write(&p, format!("#!/bin/bash\n{body}\n")).unwrap();
        fs::set_permissions(&p, fs::Permissions::from_mode(0o755)).unwrap();
    }

    fn remove_tool(&self, name: &str) {
        fs::remove_file(self.dir.join("bin").join(name)).unwrap();
    }

    /// Writes a file under the fake root (or anywhere, for an absolute path outside it).
    fn file(&self, rel: &str, bytes: &[u8]) -> PathBuf {
        let p = if Path::new(rel).is_absolute() { PathBuf::from(rel) } else { self.dir.join("root").join(rel) };
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(&p, bytes).unwrap();
        p
    }

    /// Runs the script with only the fake tools on PATH and none of the search variables set,
    /// except those given.
    fn run(&self, args: &[&str], env: &[(&str, &str)]) -> Output {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/setup.sh");
        let mut cmd = Command::new("/bin/bash");
        cmd.arg(script).args(args).env_clear();
        cmd.env("PATH", self.dir.join("bin")).env("DPTRAIN_SETUP_ROOT", self.dir.join("root"));
        for (k, v) in env {
            cmd.env(k, v);
        }
        cmd.output().unwrap()
    }

    fn check(&self, env: &[(&str, &str)]) -> (bool, String) {
        let out = self.run(&["--check"], env);
        (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

impl Drop for FakeMachine {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.dir);
    }
}

fn line<'a>(report: &'a str, name: &str) -> &'a str {
    report.lines().find(|l| l.split_whitespace().nth(1) == Some(name)).unwrap_or_else(|| panic!("no line for {name} in:\n{report}"))
}

#[test]
fn libclang_cpp_alone_is_missing_libclang() {
    // The fresh Debian 12 machine of issue 9: only the C++ library, from libclang-cpp14.
    let m = FakeMachine::new("cpp-only");
    m.file("usr/lib/x86_64-linux-gnu/libclang-cpp.so.14", &elf(2));
    m.file("usr/lib/llvm-14/lib/libclang-cpp.so.14", &elf(2));
    let (ok, report) = m.check(&[]);
    assert!(!ok, "{report}");
    assert!(line(&report, "libclang").starts_with("missing"), "{report}");
    assert!(line(&report, "libclang").contains("libclang-dev"), "{report}");
    for tool in ["cc", "c++", "mpicc", "mpirun"] {
        assert!(line(&report, tool).starts_with("ok"), "{report}");
    }
}

#[test]
fn libclang_where_clang_sys_looks_is_found() {
    for rel in [
        "usr/lib/llvm-14/lib/libclang-14.so.1",
        "usr/lib/llvm-14/lib/libclang.so",
        "usr/lib/x86_64-linux-gnu/libclang-16.so.16",
        "usr/local/lib/libclang.so.1",
    ] {
        let m = FakeMachine::new("found");
        let p = m.file(rel, &elf(2));
        let (ok, report) = m.check(&[]);
        assert!(ok, "{rel}: {report}");
        assert!(line(&report, "libclang").ends_with(&p.display().to_string()), "{rel}: {report}");
    }
}

#[test]
fn a_libclang_that_is_not_a_64_bit_elf_does_not_count() {
    let m = FakeMachine::new("invalid");
    m.file("usr/lib/i386-linux-gnu/libclang.so.1", &elf(1));
    m.file("usr/lib/x86_64-linux-gnu/libclang.so", b"INPUT(-lclang-14)\n");
    let (ok, report) = m.check(&[]);
    assert!(!ok && line(&report, "libclang").starts_with("missing"), "{report}");
}

#[test]
fn libclang_path_is_the_only_place_searched_when_set() {
    let m = FakeMachine::new("libclang-path");
    m.file("usr/lib/llvm-14/lib/libclang-14.so.1", &elf(2));
    let custom = m.dir.join("custom");
    let lib = m.file(custom.join("libclang.so.18").to_str().unwrap(), &elf(2));
    // A directory holding one.
    let (ok, report) = m.check(&[("LIBCLANG_PATH", custom.to_str().unwrap())]);
    assert!(ok && line(&report, "libclang").ends_with(&lib.display().to_string()), "{report}");
    // The file itself.
    let (ok, report) = m.check(&[("LIBCLANG_PATH", lib.to_str().unwrap())]);
    assert!(ok && line(&report, "libclang").ends_with(&lib.display().to_string()), "{report}");
    // A directory without one: the system's is not looked at, as clang-sys would not.
    let empty = m.dir.join("empty");
    fs::create_dir_all(&empty).unwrap();
    let (ok, report) = m.check(&[("LIBCLANG_PATH", empty.to_str().unwrap())]);
    assert!(!ok && line(&report, "libclang").starts_with("missing"), "{report}");
}

#[test]
fn llvm_config_and_ld_library_path_are_searched() {
    let m = FakeMachine::new("llvm-config");
    let prefix = m.dir.join("opt-llvm");
    let lib = m.file(prefix.join("lib/libclang.so").to_str().unwrap(), &elf(2));
    m.tool("llvm-config", &format!(r#"[ "$1" = --prefix ] && echo "{}""#, prefix.display()));
    let (ok, report) = m.check(&[]);
    assert!(ok && line(&report, "libclang").ends_with(&lib.display().to_string()), "{report}");

    let m = FakeMachine::new("ld-path");
    let dir = m.dir.join("ld");
    let lib = m.file(dir.join("libclang-17.so.17").to_str().unwrap(), &elf(2));
    let (ok, report) = m.check(&[("LD_LIBRARY_PATH", &format!("/nonexistent:{}", dir.display()))]);
    assert!(ok && line(&report, "libclang").ends_with(&lib.display().to_string()), "{report}");
}

#[test]
fn mpi_is_judged_by_mpicc_show_and_mpirun() {
    let m = FakeMachine::new("mpi");
    m.file("usr/lib/llvm-14/lib/libclang-14.so.1", &elf(2));
    // An mpicc that exists but cannot show its command line (a broken wrapper) is not enough.
    m.tool("mpicc", "exit 1");
    m.remove_tool("mpirun");
    let (ok, report) = m.check(&[]);
    assert!(!ok, "{report}");
    assert!(line(&report, "mpicc").starts_with("missing") && line(&report, "mpicc").contains("libopenmpi-dev"));
    assert!(line(&report, "mpirun").starts_with("missing") && line(&report, "mpirun").contains("openmpi-bin"));
    // $MPICC is what the build probes first.
    m.tool("my-mpicc", r#"[ "$1" = -show ] && echo gcc"#);
    let (_, report) = m.check(&[("MPICC", "my-mpicc")]);
    assert!(line(&report, "mpicc").starts_with("ok"), "{report}");
}

#[test]
fn install_mode_installs_what_is_missing_says_why_and_checks_again() {
    let m = FakeMachine::new("install");
    let log = m.dir.join("apt.log");
    let lib = m.dir.join("root/usr/lib/llvm-14/lib/libclang-14.so.1");
    // An apt-get that "installs" libclang-dev by putting the library where Debian does.
    m.tool(
        "apt-get",
        &format!(
            "echo \"$*\" >>{log}\nfor a in \"$@\"; do [ \"$a\" = libclang-dev ] && /bin/mkdir -p {dir} && printf '\\177ELF\\002\\001\\001' >{lib}; done; exit 0",
            log = log.display(),
            dir = lib.parent().unwrap().display(),
            lib = lib.display()
        ),
    );
    // Not root on some machines: sudo runs the fake apt-get too.
    m.tool("sudo", r#"exec "$@""#);
    m.file("usr/lib/llvm-14/lib/libclang-cpp.so.14", &elf(2));
    let out = m.run(&[], &[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("libclang missing — installing libclang-dev"), "{err}");
    let calls = fs::read_to_string(&log).unwrap();
    assert!(calls.lines().any(|l| l.starts_with("install") && l.ends_with("libclang-dev")), "{calls}");
    assert!(lib.exists());

    // Nothing to do: apt-get is not called again.
    fs::remove_file(&log).unwrap();
    assert!(m.run(&[], &[]).status.success());
    assert!(!log.exists());
}

#[test]
fn install_mode_fails_in_one_line_when_the_install_did_not_help() {
    let m = FakeMachine::new("still-missing");
    m.tool("apt-get", "exit 0");
    m.tool("sudo", r#"exec "$@""#);
    m.remove_tool("mpirun");
    let out = m.run(&[], &[]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    let last = err.lines().last().unwrap_or("");
    assert_eq!(last, "scripts/setup.sh: still missing after apt-get install: mpirun (openmpi-bin) libclang (libclang-dev)", "{err}");
}

#[test]
fn tests_mode_also_needs_a_python_venv() {
    let m = FakeMachine::new("venv");
    m.file("usr/lib/llvm-14/lib/libclang-14.so.1", &elf(2));
    m.tool("python3", "exit 1");
    let (ok, report) = m.check(&[]);
    assert!(ok, "{report}");
    let out = m.run(&["--check", "--tests"], &[]);
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success() && line(&report, "python3-venv").contains("python3-venv"), "{report}");
}

/// `--tests` also needs shellcheck and a Slurm the tests can start: the daemons and client
/// commands, srun's PMIx plugin (the generated scripts use `--mpi=pmix`) and munge with its key.
#[test]
fn test_requirements_include_a_startable_slurm() {
    let m = FakeMachine::new("slurm");
    for tool in ["slurmctld", "slurmd", "sbatch", "srun", "munged", "munge", "shellcheck"] {
        m.tool(tool, "exit 0");
    }
    let out = m.run(&["--tests", "--check"], &[]);
    let report = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(line(&report, "shellcheck").starts_with("ok"), "{report}");
    // No PMIx plugin, no munge key: Slurm could not run the tests' jobs.
    assert!(line(&report, "slurm").starts_with("missing") && line(&report, "slurm").contains("slurm-wlm"), "{report}");
    assert!(line(&report, "munge").starts_with("missing"), "{report}");
    m.file("usr/lib/x86_64-linux-gnu/slurm-wlm/mpi_pmix.so", &elf(2));
    m.file("etc/munge/munge.key", b"k");
    let report = String::from_utf8_lossy(&m.run(&["--tests", "--check"], &[]).stdout).into_owned();
    assert!(line(&report, "slurm").starts_with("ok") && line(&report, "munge").starts_with("ok"), "{report}");
    m.remove_tool("shellcheck");
    let report = String::from_utf8_lossy(&m.run(&["--tests", "--check"], &[]).stdout).into_owned();
    assert!(line(&report, "shellcheck").starts_with("missing"), "{report}");
}
