//! Builds the test guest kernel (`src/*.S`, `src/*.c`) with the host's `gcc`
//! and GNU `ld` into `$OUT_DIR/ftvm-guest.elf`, a static ELF64 x86_64
//! executable laid out by `src/guest.ld`. No other toolchain is needed.

use std::env;
use std::ffi::OsStr;
use std::fs;
use std::path::PathBuf;
use std::process::{exit, Command};

/// Flags for every C and assembly source. The guest runs with no FPU/SSE state
/// set up and takes interrupts on its own stack, hence `-mgeneral-regs-only`
/// and `-mno-red-zone`. `-fno-tree-loop-distribute-patterns` stops gcc from
/// turning plain loops into calls to `memset`/`memcpy`.
const CFLAGS: &[&str] = &[
    "-m64",
    "-ffreestanding",
    "-mgeneral-regs-only",
    "-mno-red-zone",
    "-nostdlib",
    "-fno-pic",
    "-fno-pie",
    "-fno-stack-protector",
    "-fno-asynchronous-unwind-tables",
    "-fno-unwind-tables",
    "-fno-tree-loop-distribute-patterns",
    "-fcf-protection=none",
    "-O2",
    "-Wall",
    "-Wextra",
    "-Werror",
    "-std=gnu11",
    "-mcmodel=small",
];

fn main() {
    let manifest_dir = PathBuf::from(env_var("CARGO_MANIFEST_DIR"));
    let out_dir = PathBuf::from(env_var("OUT_DIR"));
    let src_dir = manifest_dir.join("src");
    let linker_script = src_dir.join("guest.ld");

    println!("cargo:rerun-if-changed=build.rs");
    // Watching the directory also catches sources that are added or removed.
    println!("cargo:rerun-if-changed={}", src_dir.display());

    let mut files: Vec<PathBuf> = fs::read_dir(&src_dir)
        .and_then(|dir| dir.map(|entry| entry.map(|e| e.path())).collect())
        .unwrap_or_else(|e| fail(&format!("cannot read {}: {e}", src_dir.display())));
    // Deterministic link order, whatever order the directory lists in.
    files.sort();

    let mut sources = Vec::new();
    for path in files {
        let ext = path.extension().and_then(OsStr::to_str).unwrap_or("");
        if matches!(ext, "c" | "S" | "h" | "ld") {
            println!("cargo:rerun-if-changed={}", path.display());
        }
        if matches!(ext, "c" | "S") {
            sources.push(path);
        }
    }
    if sources.is_empty() {
        fail(&format!("no guest sources found in {}", src_dir.display()));
    }

    let mut objects = Vec::new();
    for src in &sources {
        // `foo.c` -> `foo.c.o`, so `foo.c` and `foo.S` could not collide.
        let name = src.file_name().unwrap_or_default().to_string_lossy();
        let obj = out_dir.join(format!("{name}.o"));
        let mut cmd = Command::new("gcc");
        cmd.args(CFLAGS)
            .arg("-I")
            .arg(&src_dir)
            .arg("-c")
            .arg(src)
            .arg("-o")
            .arg(&obj);
        run(cmd, "gcc", &format!("compiling {}", src.display()));
        objects.push(obj);
    }

    let elf = out_dir.join("ftvm-guest.elf");
    let mut cmd = Command::new("ld");
    cmd.args([
        "-m",
        "elf_x86_64",
        "-nostdlib",
        "-static",
        "-no-pie",
        "-z",
        "noexecstack",
        "-z",
        "max-page-size=0x1000",
        "--build-id=none",
    ])
    .arg("-T")
    .arg(&linker_script)
    .arg("-o")
    .arg(&elf)
    .args(&objects);
    run(cmd, "ld", "linking the guest kernel");
}

/// Runs `cmd` (the program `tool`); on failure, stops the build with a message
/// that includes the tool's own output.
fn run(mut cmd: Command, tool: &str, what: &str) {
    let output = cmd.output().unwrap_or_else(|e| {
        fail(&format!(
            "{what}: cannot run `{tool}`: {e}\n\
             The ftvm test guest is built with the host's gcc and GNU binutils (ld); \
             install them (e.g. `apt-get install gcc binutils`)."
        ))
    });
    if !output.status.success() {
        fail(&format!(
            "{what}: `{tool}` failed ({})\ncommand: {cmd:?}\n{}{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr),
        ));
    }
}

fn env_var(name: &str) -> String {
    env::var(name).unwrap_or_else(|e| fail(&format!("environment variable {name}: {e}")))
}

/// Prints `msg` (shown by cargo when a build script fails) and exits.
fn fail(msg: &str) -> ! {
    eprintln!("error: building the ftvm test guest: {msg}");
    exit(1);
}
