//! The CUDA backend (cargo feature `cuda`), through cudarc with dynamic loading: building
//! never needs CUDA, and a machine without the libraries gets an error that says what is
//! missing instead of cudarc's panic.
//!
//! Today: compiling a generated translation unit to PTX with NVRTC (no GPU needed), through an
//! on-disk cache keyed by the source, the headers, the target architecture and NVRTC's
//! version. Launching the kernels (the manifest's plan) comes next.

use std::fmt;
use std::path::{Path, PathBuf};

/// Why the CUDA backend cannot do what was asked.
#[derive(Debug)]
pub enum CudaError {
    /// A CUDA library could not be loaded: which, and the names searched.
    Missing {
        library: &'static str,
        tried: Vec<String>,
    },
    /// NVRTC rejected the source: its log.
    Compile(String),
    /// The cache directory could not be read or written.
    Cache(String),
}

impl fmt::Display for CudaError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CudaError::Missing { library, tried } => write!(
                f,
                "the CUDA library `{library}` was not found (searched: {}); install the CUDA \
                 toolkit or NVIDIA's `nvidia-cuda-nvrtc` wheel and put its lib directory on \
                 LD_LIBRARY_PATH",
                tried.join(", ")
            ),
            CudaError::Compile(log) => write!(f, "NVRTC could not compile the kernels:\n{log}"),
            CudaError::Cache(e) => write!(f, "kernel cache: {e}"),
        }
    }
}

impl std::error::Error for CudaError {}

/// Whether NVRTC can be loaded (cudarc panics on first use when it cannot).
pub fn nvrtc_available() -> Result<(), CudaError> {
    // SAFETY: only tries to open the library by its candidate names.
    if unsafe { cudarc::nvrtc::sys::is_culib_present() } {
        Ok(())
    } else {
        Err(CudaError::Missing {
            library: "nvrtc",
            tried: cudarc::get_lib_name_candidates("nvrtc"),
        })
    }
}

/// NVRTC's version, `(major, minor)`.
pub fn nvrtc_version() -> Result<(i32, i32), CudaError> {
    nvrtc_available()?;
    let (mut major, mut minor) = (0, 0);
    // SAFETY: the library is present; the call writes two ints.
    let status = unsafe { cudarc::nvrtc::sys::nvrtcVersion(&mut major, &mut minor) };
    if status != cudarc::nvrtc::sys::nvrtcResult::NVRTC_SUCCESS {
        return Err(CudaError::Compile(format!(
            "nvrtcVersion failed: {status:?}"
        )));
    }
    Ok((major, minor))
}

/// PTX for one translation unit, and whether it came from the cache.
pub struct Ptx {
    pub text: String,
    pub cached: bool,
    /// The cache file holding it.
    pub path: PathBuf,
}

/// The cache key of `source` compiled with `headers` for `arch` by NVRTC `version`.
pub fn cache_key(
    source: &str,
    headers: &[(&str, &str)],
    arch: &str,
    version: (i32, i32),
) -> String {
    let mut parts: Vec<&[u8]> = vec![source.as_bytes(), arch.as_bytes()];
    for (name, text) in headers {
        parts.push(name.as_bytes());
        parts.push(text.as_bytes());
    }
    let v = format!("{}.{}", version.0, version.1);
    parts.push(v.as_bytes());
    format!("{:016x}-{arch}", crate::device::fnv1a(&parts))
}

/// Compiles `source` (which includes `headers` by name) for `arch` (`sm_90a`) with NVRTC,
/// or reads the PTX a previous compile left in `cache`. Cache files are written through a
/// temporary file and renamed, so an interrupted compile leaves nothing half-written.
pub fn compile_cached(
    source: &str,
    headers: &[(&str, &str)],
    arch: &str,
    cache: &Path,
) -> Result<Ptx, CudaError> {
    let version = nvrtc_version()?;
    let key = cache_key(source, headers, arch, version);
    let path = cache.join(format!("{key}.ptx"));
    if let Ok(text) = std::fs::read_to_string(&path) {
        return Ok(Ptx {
            text,
            cached: true,
            path,
        });
    }
    let cache_err = |what: &str, e: std::io::Error| CudaError::Cache(format!("{what}: {e}"));
    // The headers go to a directory of their own, named by the key, for NVRTC's include path.
    let include = cache.join(format!("{key}.include"));
    std::fs::create_dir_all(&include)
        .map_err(|e| cache_err(&format!("create {}", include.display()), e))?;
    for (name, text) in headers {
        std::fs::write(include.join(name), text)
            .map_err(|e| cache_err(&format!("write {name}"), e))?;
    }
    let Some(arch_name) = arch_static(arch) else {
        return Err(CudaError::Compile(format!(
            "unsupported GPU architecture `{arch}` (kiln targets sm_80, sm_89, sm_90, sm_90a and sm_100a)"
        )));
    };
    let opts = cudarc::nvrtc::CompileOptions {
        arch: Some(arch_name),
        include_paths: vec![include.to_string_lossy().into_owned()],
        ..Default::default()
    };
    let compiled = cudarc::nvrtc::compile_ptx_with_opts(source, opts);
    let _ = std::fs::remove_dir_all(&include);
    let text = match compiled {
        Ok(ptx) => ptx.to_src(),
        Err(cudarc::nvrtc::CompileError::CompileError { log, .. }) => {
            return Err(CudaError::Compile(log.to_string_lossy().into_owned()))
        }
        Err(e) => return Err(CudaError::Compile(format!("{e:?}"))),
    };
    let tmp = cache.join(format!(".{key}.{}.tmp", std::process::id()));
    std::fs::write(&tmp, &text).map_err(|e| cache_err(&format!("write {}", tmp.display()), e))?;
    std::fs::rename(&tmp, &path)
        .map_err(|e| cache_err(&format!("move to {}", path.display()), e))?;
    Ok(Ptx {
        text,
        cached: false,
        path,
    })
}

/// NVRTC's options take `&'static str` architectures: the ones kiln targets.
fn arch_static(arch: &str) -> Option<&'static str> {
    ["sm_80", "sm_89", "sm_90", "sm_90a", "sm_100a"]
        .into_iter()
        .find(|&a| a == arch)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_keys_change_with_every_input() {
        let base = cache_key("src", &[("a.cuh", "x")], "sm_90a", (13, 5));
        assert_eq!(base, cache_key("src", &[("a.cuh", "x")], "sm_90a", (13, 5)));
        for other in [
            cache_key("src2", &[("a.cuh", "x")], "sm_90a", (13, 5)),
            cache_key("src", &[("a.cuh", "y")], "sm_90a", (13, 5)),
            cache_key("src", &[("b.cuh", "x")], "sm_90a", (13, 5)),
            cache_key("src", &[("a.cuh", "x")], "sm_80", (13, 5)),
            cache_key("src", &[("a.cuh", "x")], "sm_90a", (13, 4)),
            cache_key("sr", &[("ca.cuh", "x")], "sm_90a", (13, 5)),
        ] {
            assert_ne!(base, other);
        }
        assert!(base.ends_with("-sm_90a"));
    }
}
