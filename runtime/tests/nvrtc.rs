//! The CUDA backend's kernel compile (feature `cuda`), without a GPU: NVRTC compiles the
//! generated unit of every reference spec to PTX holding every kernel, and the on-disk cache
//! returns the same PTX the second time without compiling.
//!
//! Needs NVRTC on the library path (`scripts/test` puts the pinned `nvidia-cuda-nvrtc` wheel's
//! there); without it the test fails with the backend's message, unless
//! `KILN_SKIP_CUDA_COMPILE=1`.
#![cfg(feature = "cuda")]

use kiln_compiler::check::check;
use kiln_compiler::emit_cuda::{emit, HEADERS};
use kiln_compiler::program::compile;
use kiln_runtime::cuda::{compile_cached, nvrtc_available, CudaError};

#[test]
fn nvrtc_compiles_every_spec_through_the_cache() {
    if let Err(e) = nvrtc_available() {
        if std::env::var("KILN_SKIP_CUDA_COMPILE").as_deref() == Ok("1") {
            eprintln!("skipped: {e}");
            return;
        }
        panic!("{e}");
    }
    let cache = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("nvrtc-cache");
    let _ = std::fs::remove_dir_all(&cache);
    std::fs::create_dir_all(&cache).unwrap();
    for spec in [
        "tiny",
        "gpt2-124m",
        "llama3-8b",
        "deepseek-v2-lite",
        "deepseek-v3",
    ] {
        let path = format!("{}/../specs/{spec}.toml", env!("CARGO_MANIFEST_DIR"));
        let model = check(&std::fs::read(&path).unwrap()).unwrap();
        let cuda = emit(&compile(&model).unwrap().train);
        let first = compile_cached(&cuda.source, &HEADERS, "sm_90a", &cache)
            .unwrap_or_else(|e| panic!("{spec}: {e}"));
        assert!(!first.cached, "{spec}: a fresh cache compiles");
        for k in &cuda.kernels {
            assert!(
                first.text.contains(&format!(".entry {}(", k.name)),
                "{spec}: the PTX has {}",
                k.name
            );
        }
        let again = compile_cached(&cuda.source, &HEADERS, "sm_90a", &cache).unwrap();
        assert!(
            again.cached,
            "{spec}: the second compile comes from the cache"
        );
        assert_eq!(first.text, again.text);
        assert_eq!(first.path, again.path);
    }
}

#[test]
fn kiln_fp8_cuh_compiles_with_nvrtc_alone_to_the_fp8_conversion_instruction() {
    // NVRTC has no CUDA headers (kiln_types.cuh cannot be compiled by it), so the FP8 tile
    // quantizer that generated kernels will include must need nothing but itself.
    if nvrtc_available().is_err() {
        return; // the first test reports it
    }
    let cache = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("nvrtc-fp8");
    let _ = std::fs::remove_dir_all(&cache);
    std::fs::create_dir_all(&cache).unwrap();
    let headers = [("kiln_fp8.cuh", include_str!("../../kernels/kiln_fp8.cuh"))];
    let source = r#"#include "kiln_fp8.cuh"
extern "C" __global__ void quantize(const float4* x, unsigned* codes, float* scales, int e5m2) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    float s;
    codes[i] = e5m2 ? kiln_quantize4<true>(x[i], 32, true, &s)
                    : kiln_quantize4<false>(x[i], 32, false, &s);
    if (i % 32 == 0) scales[i / 32] = s;
}
"#;
    let ptx = compile_cached(source, &headers, "sm_90a", &cache).unwrap_or_else(|e| panic!("{e}"));
    for format in ["e4m3x2", "e5m2x2"] {
        assert!(
            ptx.text.contains(&format!("cvt.rn.satfinite.{format}.f32")),
            "{format}: {}",
            ptx.text
        );
    }
    assert!(
        ptx.text.contains("shfl.sync.bfly"),
        "the tile max is a warp butterfly"
    );
}

#[test]
fn a_compile_error_returns_nvrtcs_log_and_caches_nothing() {
    if nvrtc_available().is_err() {
        return; // the test above reports it
    }
    let cache = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("nvrtc-bad");
    let _ = std::fs::remove_dir_all(&cache);
    std::fs::create_dir_all(&cache).unwrap();
    let bad = "extern \"C\" __global__ void k(float* y) { y[0] = undefined_name; }\n";
    match compile_cached(bad, &[], "sm_90a", &cache) {
        Err(CudaError::Compile(log)) => assert!(log.contains("undefined_name"), "{log}"),
        Err(e) => panic!("expected a compile error, got {e}"),
        Ok(_) => panic!("the source does not compile"),
    }
    assert_eq!(
        std::fs::read_dir(&cache).unwrap().count(),
        0,
        "nothing cached"
    );
    assert!(matches!(
        compile_cached("", &[], "sm_42", &cache),
        Err(CudaError::Compile(m)) if m.contains("unsupported GPU architecture")
    ));
}

#[test]
fn the_cuda_devices_helper_kernels_compile_with_nvrtc_alone() {
    // kernels/kiln_device.cu (the bf16/f16 rounding, bias and FP8-scale kernels around
    // cuBLASLt) must need no header: NVRTC has none of CUDA's.
    if nvrtc_available().is_err() {
        return; // the first test reports it
    }
    let cache = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("nvrtc-helpers");
    let _ = std::fs::remove_dir_all(&cache);
    std::fs::create_dir_all(&cache).unwrap();
    let program = kiln_runtime::device::lt::helper_program();
    assert!(!program.kernels.is_empty());
    for arch in ["sm_80", "sm_90a"] {
        let ptx = compile_cached(&program.source, &[], arch, &cache)
            .unwrap_or_else(|e| panic!("{arch}: {e}"));
        for k in &program.kernels {
            assert!(
                ptx.text.contains(&format!(".entry {}(", k.name)),
                "{arch}: the PTX has {}",
                k.name
            );
        }
    }
}

#[test]
fn a_machine_without_a_driver_gets_missing_libcuda_not_a_panic() {
    // This check runs where there is no GPU driver (CI, the build machines); with one, the
    // device opens or fails for another reason, which the test leaves alone.
    // SAFETY: only tries to open the library under its candidate names.
    if unsafe { cudarc::driver::sys::is_culib_present() } {
        eprintln!("skipped: this machine has a CUDA driver");
        return;
    }
    match kiln_runtime::device::cuda::Cuda::new(0) {
        Err(kiln_runtime::device::DeviceError::Missing { library, tried }) => {
            assert!(library.contains("libcuda"), "{library}");
            assert!(
                tried.iter().any(|t| t == "libcuda.so.1"),
                "the driver's usual file name is among those searched: {tried:?}"
            );
        }
        Err(e) => panic!("expected the driver to be missing, got {e}"),
        Ok(_) => panic!("expected the driver to be missing, got a device"),
    }
}
