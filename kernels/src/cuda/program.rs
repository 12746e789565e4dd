//! Building the kernels for the device at hand: every kernel file in one program, compiled with NVRTC
//! to a CUBIN for the device's own architecture (a CUBIN, unlike PTX from a newer NVRTC than the
//! driver, always loads), cached on disk under `$LAYERWISE_CACHE/kernels` (default
//! `~/.cache/layerwise/kernels`), keyed by a hash of the source, the options and NVRTC's version.

use std::ffi::{c_char, CString};
use std::path::PathBuf;

use cudarc::nvrtc::sys;

use crate::sources::{KERNELS, SOURCES};

/// All kernel files as one program (the shared header inlined once).
pub fn whole_program() -> String {
    let common = SOURCES.iter().find(|(name, _)| *name == "common.cuh").map_or("", |(_, text)| text);
    let mut text = String::from(common);
    for (file, _) in KERNELS {
        let body = SOURCES.iter().find(|(name, _)| name == file).map_or("", |(_, text)| text);
        text.push_str(&format!("\n// ---- {file}\n"));
        text.push_str(&body.replace("#include \"common.cuh\"", ""));
    }
    text
}

/// FNV-1a, 64 bits: a stable key for the cache (not a defence against anyone).
fn fnv1a(parts: &[&[u8]]) -> u64 {
    let mut hash = 0xcbf2_9ce4_8422_2325u64;
    for part in parts {
        for &b in *part {
            hash ^= b as u64;
            hash = hash.wrapping_mul(0x0100_0000_01b3);
        }
        hash ^= 0xff;
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    hash
}

fn cache_dir() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("LAYERWISE_CACHE") {
        return Some(PathBuf::from(dir).join("kernels"));
    }
    std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".cache/layerwise/kernels"))
}

/// Whether NVRTC (libnvrtc) can be opened.
pub fn nvrtc_available() -> bool {
    // SAFETY: only opens the library to see whether it is there.
    unsafe { sys::is_culib_present() }
}

/// NVRTC's (major, minor) version.
pub fn nvrtc_version() -> Result<(i32, i32), String> {
    let (mut major, mut minor) = (0, 0);
    // SAFETY: plain out-parameters.
    let status = unsafe { sys::nvrtcVersion(&mut major, &mut minor) };
    if status != sys::nvrtcResult::NVRTC_SUCCESS {
        return Err(format!("nvrtcVersion failed: {status:?}"));
    }
    Ok((major, minor))
}

/// A CUBIN of the whole program for compute capability `major.minor`, from the cache or NVRTC.
pub fn cubin(major: i32, minor: i32) -> Result<Vec<u8>, String> {
    if !nvrtc_available() {
        return Err("NVRTC (libnvrtc) not found: it compiles the kernels for the device".into());
    }
    let source = whole_program();
    let options = vec![format!("--gpu-architecture=sm_{major}{minor}"), "--std=c++17".to_string()];
    let (nv_major, nv_minor) = nvrtc_version()?;
    let key = fnv1a(&[source.as_bytes(), options.join(" ").as_bytes(), format!("{nv_major}.{nv_minor}").as_bytes()]);
    let cached = cache_dir().map(|dir| dir.join(format!("layerwise-sm{major}{minor}-{key:016x}.cubin")));
    if let Some(bytes) = cached.as_ref().and_then(|path| std::fs::read(path).ok()) {
        return Ok(bytes);
    }
    let bytes = compile(&source, &options)?;
    if let Some(path) = cached {
        // Written whole under a temporary name, then renamed: a reader never sees half a file.
        if let Some(dir) = path.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        let partial = path.with_extension(format!("partial{}", std::process::id()));
        if std::fs::write(&partial, &bytes).is_ok() {
            let _ = std::fs::rename(&partial, &path);
        }
    }
    Ok(bytes)
}

fn check(status: sys::nvrtcResult, what: &str) -> Result<(), String> {
    if status == sys::nvrtcResult::NVRTC_SUCCESS {
        Ok(())
    } else {
        Err(format!("{what} failed: {status:?}"))
    }
}

fn compile(source: &str, options: &[String]) -> Result<Vec<u8>, String> {
    let src = CString::new(source).map_err(|_| "the kernel source holds a NUL byte".to_string())?;
    let name = CString::new("layerwise.cu").map_err(|e| e.to_string())?;
    let options: Vec<CString> =
        options.iter().map(|o| CString::new(o.as_str()).map_err(|e| e.to_string())).collect::<Result<_, _>>()?;
    let option_ptrs: Vec<*const c_char> = options.iter().map(|o| o.as_ptr()).collect();
    let mut program: sys::nvrtcProgram = std::ptr::null_mut();
    // SAFETY: the strings live until the program is destroyed below; no headers are passed.
    unsafe {
        check(
            sys::nvrtcCreateProgram(&mut program, src.as_ptr(), name.as_ptr(), 0, std::ptr::null(), std::ptr::null()),
            "nvrtcCreateProgram",
        )?;
        let compiled = sys::nvrtcCompileProgram(program, option_ptrs.len() as i32, option_ptrs.as_ptr());
        let result = if compiled != sys::nvrtcResult::NVRTC_SUCCESS {
            let mut size = 0usize;
            sys::nvrtcGetProgramLogSize(program, &mut size);
            let mut log = vec![0 as c_char; size.max(1)];
            sys::nvrtcGetProgramLog(program, log.as_mut_ptr());
            let log: Vec<u8> = log.iter().take_while(|&&c| c != 0).map(|&c| c as u8).collect();
            Err(format!("NVRTC could not compile the kernels ({compiled:?}):\n{}", String::from_utf8_lossy(&log)))
        } else {
            let mut size = 0usize;
            check(sys::nvrtcGetCUBINSize(program, &mut size), "nvrtcGetCUBINSize").and_then(|_| {
                let mut cubin = vec![0u8; size];
                check(sys::nvrtcGetCUBIN(program, cubin.as_mut_ptr() as *mut c_char), "nvrtcGetCUBIN").map(|_| cubin)
            })
        };
        sys::nvrtcDestroyProgram(&mut program);
        result
    }
}
