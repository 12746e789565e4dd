//! Builds the CPU emulation of the CUDA kernels: the project's .cu sources compiled by the host C++
//! compiler against emulation/cuda_emu.h, with the fiber scheduler, into a static library that the
//! `emulated` module calls. Needs a C++17 compiler and ucontext (glibc); nothing from CUDA.

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
        .opt_level(2);
    // LAYERWISE_EMULATION_ASAN=1: the emulation and the kernels under AddressSanitizer (run the tests
    // with ASAN_OPTIONS=verify_asan_link_order=0, since the Rust test binary does not load it first).
    println!("cargo:rerun-if-env-changed=LAYERWISE_EMULATION_ASAN");
    if std::env::var("LAYERWISE_EMULATION_ASAN").is_ok_and(|v| v == "1") {
        build.flag("-fsanitize=address").flag("-fno-omit-frame-pointer");
        println!("cargo:rustc-link-lib=dylib=asan");
    }
    build.compile("layerwise_emulation");
}
