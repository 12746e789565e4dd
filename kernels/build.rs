//! Builds the CPU emulation of the CUDA kernels: the project's .cu sources compiled by the host C++
//! compiler against emulation/cuda_emu.h, with the fiber scheduler, into a static library that the
//! `emulated` module calls. Needs a C++17 compiler (and, off x86-64, ucontext); nothing from CUDA.

fn main() {
    println!("cargo:rerun-if-changed=cuda");
    println!("cargo:rerun-if-changed=emulation");
    let mut build = cc::Build::new();
    build
        .cpp(true)
        .std("c++17")
        .include("cuda")
        .include("emulation")
        .file("emulation/emulator.cpp")
        .file("emulation/kernels.cpp")
        .warnings(true)
        .flag_if_supported("-Wno-unused-parameter")
        .flag_if_supported("-Wno-unknown-pragmas")
        // As the device is told (__fmul_rn, ...) where it matters: no fused multiply-adds.
        .flag_if_supported("-ffp-contract=off")
        .opt_level(2);
    // LAYERWISE_EMULATION_ASAN=1: the emulation and the kernels under AddressSanitizer (run the tests
    // with ASAN_OPTIONS=verify_asan_link_order=0, since the Rust test binary does not load it first).
    println!("cargo:rerun-if-env-changed=LAYERWISE_EMULATION_ASAN");
    if std::env::var("LAYERWISE_EMULATION_ASAN").is_ok_and(|v| v == "1") {
        build.flag("-fsanitize=address").flag("-fno-omit-frame-pointer");
        println!("cargo:rustc-link-lib=dylib=asan");
    }
    build.compile("layerwise_emulation");
    stand_in_driver();
}

/// The stand-in driver, `$OUT_DIR/stand-in/libcuda.so` (and `.so.1`): standin/standin.cpp with the
/// emulation linked in, a shared library the tests put on LD_LIBRARY_PATH. Linux only.
fn stand_in_driver() {
    println!("cargo:rerun-if-changed=standin");
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR")).join("stand-in");
    println!("cargo:rustc-env=LAYERWISE_STANDIN_DIR={}", out.display());
    if !cfg!(target_os = "linux") {
        return;
    }
    std::fs::create_dir_all(&out).expect("stand-in directory");
    let compiler = cc::Build::new().cpp(true).get_compiler();
    let library = out.join("libcuda.so.1");
    let status = compiler
        .to_command()
        .args(["-std=c++17", "-O2", "-shared", "-fPIC", "-Wno-unknown-pragmas", "-Icuda", "-Iemulation"])
        .args(["-Wl,-soname,libcuda.so.1", "-o"])
        .arg(&library)
        .args(["standin/standin.cpp", "emulation/emulator.cpp", "emulation/kernels.cpp", "-ldl", "-lpthread"])
        .status()
        .expect("run the C++ compiler for the stand-in driver");
    assert!(status.success(), "building the stand-in driver failed");
    let link = out.join("libcuda.so");
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink("libcuda.so.1", &link).expect("libcuda.so link");
}
