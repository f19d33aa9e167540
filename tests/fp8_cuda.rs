//! kiln's FP8 conversion (`kiln_runtime::numerics::Fp8Format`) against NVIDIA's own: the host
//! implementation in the CUDA toolkit's `cuda_fp8.h`, compared bit for bit.
//!
//! kiln emulates FP8 on the CPU (`kiln_runtime::numerics`: what a spec's `[precision]` does to
//! a training step), while the generated kernels convert with `kernels/kiln_types.cuh`, that
//! is with `__nv_cvt_float_to_fp8(x, __NV_SATFINITE, …)`, which on sm_89+ is the instruction
//! `cvt.rn.satfinite.e4m3x2.f32` (or `…e5m2x2.f32`). Emulation and GPU must produce the same
//! bytes. The header's host path of that function (the code outside `__CUDA_ARCH__`) is
//! NVIDIA's portable definition of what the instruction computes, so it is the reference
//! here; a device check of the instruction against the same inputs is to come.
//!
//! - Encoding: [`inputs`] (4,649,728 f32 bit patterns: a prime-stride sweep of all 2³² bit
//!   patterns, the neighbourhood of every code's value and of every rounding midpoint, and
//!   special values) go through `Fp8Format::encode` and through `__nv_cvt_float_to_fp8` for
//!   both formats, and every code must be equal.
//! - Decoding: all 256 codes of both formats through `Fp8Format::decode` and through
//!   `cuda_fp8.h`'s host conversion to float (`__nv_cvt_fp8_to_halfraw`, then
//!   `__half2float`, the expression `kiln_e4m3_to_f32` uses) must give the same f32 bits, any
//!   NaN matching any NaN.
//!
//! Why not all 2³² inputs: the test profile does not optimize workspace crates (the
//! `opt-level = 3` of `[profile.dev.package."*"]` is for dependencies only), and there
//! `encode` costs about 50 ns a call: encoding every bit pattern in both formats would take
//! about 7 minutes on one core. This test takes 2 to 3 seconds, nvcc included.
//!
//! The reference program is host-only C++: no device code and no CUDA runtime. nvcc compiles
//! it as a `.cpp` file, which nvcc hands to the host compiler with the toolkit's include path
//! (a `.cu` file would get a device pass and need the CUDA runtime to link), so the headers
//! are those of the pinned toolchain that compiles kiln's kernels. No GPU is needed. Without
//! nvcc the tests fail with `kiln::nvcc::find`'s message (run `scripts/cuda-toolchain`);
//! `KILN_SKIP_CUDA_COMPILE=1` makes them print why they skip and pass.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use kiln::nvcc::Nvcc;
use kiln_runtime::numerics::quant::{quantize, ScaleFormat};
use kiln_runtime::numerics::Fp8Format;

/// The stride of the sweep over all f32 bit patterns: prime (odd), so every low fraction bit
/// pattern is visited; 2³² / 1021 ≈ 4.2 million patterns.
const SWEEP_STRIDE: usize = 1021;
/// How far, in f32 bit patterns (ulps), the test looks around each code's value and each
/// midpoint between neighbouring codes.
const NEIGHBOURHOOD: u32 = 300;
/// How many mismatches a failure lists.
const SHOWN: usize = 20;

/// The reference program. Arguments: the input file (f32 bit patterns, native-endian u32)
/// and an output directory, where it writes `e4m3.codes` and `e5m2.codes` (one byte per
/// input) and `e4m3.values` and `e5m2.values` (the f32 bits of each of the 256 codes).
const REFERENCE: &str = r#"// NVIDIA's host FP8 conversions (tests/fp8_cuda.rs).
#include <cuda_fp8.h>

#include <cstdint>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#ifdef __CUDA_ARCH__
#error "the reference is cuda_fp8.h's host path; this must not be compiled for a device"
#endif

// kiln_fp8.cuh's host encoder, compared with the reference too (its warp shuffle is declared
// for the header and never called).
#include <math.h>
float __shfl_xor_sync(unsigned, float, int);
#include "kiln_fp8.cuh"

static void write_file(const std::string& path, const void* data, size_t size) {
    FILE* f = std::fopen(path.c_str(), "wb");
    if (!f || std::fwrite(data, 1, size, f) != size || std::fclose(f) != 0) {
        std::fprintf(stderr, "cannot write %s\n", path.c_str());
        std::exit(1);
    }
}

static void convert(const std::vector<uint32_t>& inputs, __nv_fp8_interpretation_t format,
                    const std::string& path) {
    std::vector<uint8_t> codes(inputs.size());
    for (size_t i = 0; i < inputs.size(); ++i) {
        float x;
        std::memcpy(&x, &inputs[i], sizeof x);
        codes[i] = __nv_cvt_float_to_fp8(x, __NV_SATFINITE, format);
    }
    write_file(path, codes.data(), codes.size());
}

static void convert_kiln(const std::vector<uint32_t>& inputs, bool e5m2, const std::string& path) {
    std::vector<uint8_t> codes(inputs.size());
    for (size_t i = 0; i < inputs.size(); ++i) {
        float x;
        std::memcpy(&x, &inputs[i], sizeof x);
        codes[i] = e5m2 ? kiln_fp8_encode_host<true>(x) : kiln_fp8_encode_host<false>(x);
    }
    write_file(path, codes.data(), codes.size());
}

static void decode(__nv_fp8_interpretation_t format, const std::string& path) {
    uint32_t values[256];
    for (unsigned code = 0; code < 256; ++code) {
        const __half_raw half = __nv_cvt_fp8_to_halfraw((__nv_fp8_storage_t)code, format);
        const float value = __half2float(__half(half));
        std::memcpy(&values[code], &value, sizeof value);
    }
    write_file(path, values, sizeof values);
}

int main(int argc, char** argv) {
    if (argc != 3) {
        std::fprintf(stderr, "usage: %s INPUTS OUT_DIR\n", argv[0]);
        return 2;
    }
    FILE* f = std::fopen(argv[1], "rb");
    if (!f) {
        std::fprintf(stderr, "cannot open %s\n", argv[1]);
        return 1;
    }
    std::vector<uint32_t> inputs;
    uint32_t chunk[4096];
    size_t n;
    while ((n = std::fread(chunk, sizeof chunk[0], 4096, f)) > 0) {
        inputs.insert(inputs.end(), chunk, chunk + n);
    }
    std::fclose(f);
    const std::string out = argv[2];
    convert(inputs, __NV_E4M3, out + "/e4m3.codes");
    convert(inputs, __NV_E5M2, out + "/e5m2.codes");
    convert_kiln(inputs, false, out + "/e4m3.kiln");
    convert_kiln(inputs, true, out + "/e5m2.kiln");
    decode(__NV_E4M3, out + "/e4m3.values");
    decode(__NV_E5M2, out + "/e5m2.values");
    return 0;
}
"#;

mod common;

use common::nvcc;

/// A fresh directory for one test's files.
fn scratch(test: &str) -> PathBuf {
    common::scratch("fp8_cuda", test)
}

/// What the reference program computed.
struct Reference {
    /// Per format (in `Fp8Format::ALL`'s order): the code of every input.
    codes: [Vec<u8>; 2],
    /// Per format: the f32 value of every code.
    values: [[f32; 256]; 2],
    /// Per format: the code of every input by `kernels/kiln_fp8.cuh`'s host encoder.
    kiln_codes: [Vec<u8>; 2],
}

/// Compiles the host-only C++ program `source` as `dir/name` with nvcc (the toolkit's headers
/// on the include path, `kernels/` too) and runs it on `inputs` (written to a file, its first
/// argument) with `dir` as its second argument.
fn compile_and_run(nvcc: &Nvcc, dir: &Path, name: &str, source: &str, inputs: &[u32]) {
    let cpp = dir.join(format!("{name}.cpp"));
    let exe = dir.join(name);
    std::fs::write(&cpp, source).unwrap();
    let mut compile = common::nvcc_command(
        nvcc,
        &["-std=c++20", "-O2", "-Xcompiler", "-Wall,-Wextra,-Werror"],
        &exe,
        &cpp,
    );
    let out = compile
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", nvcc.path().display()));
    assert!(
        out.status.success(),
        "compiling {name} failed: {compile:?}\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    let input_file = dir.join("inputs.bin");
    let bytes: Vec<u8> = inputs.iter().flat_map(|b| b.to_ne_bytes()).collect();
    std::fs::write(&input_file, bytes).unwrap();
    let run = Command::new(&exe)
        .arg(&input_file)
        .arg(dir)
        .output()
        .unwrap();
    assert!(
        run.status.success(),
        "{name} failed ({}):\n{}",
        run.status,
        String::from_utf8_lossy(&run.stderr)
    );
}

/// Compiles the reference program with `nvcc` in `dir` and runs it on `inputs`.
fn run_reference(nvcc: &Nvcc, dir: &Path, inputs: &[u32]) -> Reference {
    compile_and_run(nvcc, dir, "fp8_reference", REFERENCE, inputs);

    let read = |name: &str, len: usize| {
        let path = dir.join(name);
        let data = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert_eq!(data.len(), len, "{}: wrong size", path.display());
        data
    };
    let codes = Fp8Format::ALL.map(|f| read(&format!("{f}.codes"), inputs.len()));
    let values = Fp8Format::ALL.map(|f| {
        let data = read(&format!("{f}.values"), 256 * 4);
        std::array::from_fn(|c| {
            f32::from_bits(u32::from_ne_bytes(
                data[4 * c..4 * c + 4].try_into().unwrap(),
            ))
        })
    });
    let kiln_codes = Fp8Format::ALL.map(|f| read(&format!("{f}.kiln"), inputs.len()));
    Reference {
        codes,
        values,
        kiln_codes,
    }
}

/// The f32 bit patterns whose encoding is compared, each once:
///
/// - every 1021st of all 2³² bit patterns (both signs, zeros, subnormals, NaNs included);
/// - for each of the 256 codes of each format, every bit pattern within ±300 of its value
///   and of the midpoint between it and the next code away from zero (for the largest
///   finite code: between it and the value one step beyond, 464 and 61440, where saturation
///   starts);
/// - special values: signed zeros and infinities, NaNs of both signs with several payloads,
///   f32 subnormals, the smallest normal, `f32::MAX`, and the saturation thresholds with
///   their neighbours.
///
/// The sweep comes first, in order; the rest is sorted apart from it, without what the
/// sweep already has (sorting everything would cost seconds unoptimized).
fn inputs() -> Vec<u32> {
    let mut extra = Vec::new();
    let mut centre = |x: f32| {
        // Wrapping: around ±0 this reaches the NaNs at the far end of the other sign, which
        // are inputs as good as any.
        let first = x.to_bits().wrapping_sub(NEIGHBOURHOOD);
        extra.extend((0..=2 * NEIGHBOURHOOD).map(|i| first.wrapping_add(i)));
    };
    for format in Fp8Format::ALL {
        for code in 0..=255u8 {
            let value = format.decode(code);
            centre(value);
            if value.is_finite() {
                let next = next_away_from_zero(format, code);
                centre(((f64::from(value) + f64::from(next)) / 2.0) as f32);
            }
        }
    }
    extra.extend([
        0x0000_0000, // +0
        0x8000_0000, // -0
        0x7F80_0000, // +inf
        0xFF80_0000, // -inf
        0x7FC0_0000, // the quiet NaN
        0xFFC0_0000,
        0x7FC0_0001,
        0x7FFF_FFFF,
        0xFFFF_FFFF,
        0x7F80_0001, // signalling NaNs
        0xFF80_0001,
        0x7FA0_0000,
        0x7F81_2345,
        0xFFBF_FFFF,
        0x0000_0001, // f32 subnormals
        0x0000_0002,
        0x0040_0000,
        0x007F_FFFF,
        0x8000_0001,
        0x807F_FFFF,
        0x0080_0000, // the smallest normal
        0x8080_0000,
        0x7F7F_FFFF, // f32::MAX
        0xFF7F_FFFF,
    ]);
    for threshold in [448.0f32, 464.0, 480.0, 57344.0, 61440.0, 65536.0] {
        for x in [threshold, -threshold] {
            extra.extend((0..=6).map(|i| x.to_bits() - 3 + i));
        }
    }
    extra.sort_unstable();
    extra.dedup();
    extra.retain(|&b| b as usize % SWEEP_STRIDE != 0);

    let mut bits: Vec<u32> = (0..=u32::MAX).step_by(SWEEP_STRIDE).collect();
    bits.extend(extra);
    bits
}

/// The value of the code after `code` in magnitude: the next code, or for the largest
/// finite code, the value one step beyond it on the same grid (which the format lacks).
fn next_away_from_zero(format: Fp8Format, code: u8) -> f32 {
    let magnitude = code & 0x7F;
    if magnitude == format.max_code() {
        let max = format.decode(code);
        max + (max - format.decode(code - 1))
    } else {
        format.decode(code + 1)
    }
}

fn describe(format: Fp8Format, code: u8) -> String {
    format!("{code:#04x} ({})", format.decode(code))
}

#[test]
fn encode_matches_cuda_host_conversion() {
    let test = "encode_matches_cuda_host_conversion";
    let Some(nvcc) = nvcc(test) else { return };
    let dir = scratch(test);
    let inputs = inputs();
    let reference = run_reference(&nvcc, &dir, &inputs);

    let mut report = String::new();
    let mut per_format = Vec::new();
    let mut mismatches = 0usize;
    for (format, cuda_codes) in Fp8Format::ALL.into_iter().zip(&reference.codes) {
        let before = mismatches;
        for (&bits, &cuda) in inputs.iter().zip(cuda_codes) {
            let x = f32::from_bits(bits);
            let kiln = format.encode(x);
            if kiln != cuda {
                mismatches += 1;
                if mismatches <= SHOWN {
                    writeln!(
                        report,
                        "  {format} {bits:#010x} = {x:e}: kiln {}, CUDA {}",
                        describe(format, kiln),
                        describe(format, cuda)
                    )
                    .unwrap();
                }
            }
        }
        per_format.push(format!("{format}: {}", mismatches - before));
    }
    assert!(
        mismatches == 0,
        "kiln's encode differs from __nv_cvt_float_to_fp8(x, __NV_SATFINITE, …) in {} \
         conversions of {} inputs × 2 formats ({}); the first {}:\n{report}",
        mismatches,
        inputs.len(),
        per_format.join(", "),
        mismatches.min(SHOWN)
    );
    // kiln_fp8.cuh's host encoder (what the CPU emulation of generated kernels runs).
    for ((format, cuda_codes), kiln_codes) in Fp8Format::ALL
        .into_iter()
        .zip(&reference.codes)
        .zip(&reference.kiln_codes)
    {
        let bad: Vec<usize> = (0..inputs.len())
            .filter(|&i| cuda_codes[i] != kiln_codes[i])
            .collect();
        let shown: Vec<String> = bad
            .iter()
            .take(SHOWN)
            .map(|&i| {
                format!(
                    "  {:#010x}: kiln_fp8.cuh {}, CUDA {}",
                    inputs[i],
                    describe(format, kiln_codes[i]),
                    describe(format, cuda_codes[i])
                )
            })
            .collect();
        assert!(
            bad.is_empty(),
            "kiln_fp8_encode_host<{format}> differs from CUDA's in {} of {} inputs:\n{}",
            bad.len(),
            inputs.len(),
            shown.join("\n")
        );
    }
    eprintln!(
        "{test}: {} inputs agree in {} formats, in kiln's Rust and kiln_fp8.cuh's host encoder",
        inputs.len(),
        Fp8Format::ALL.len()
    );
}

#[test]
fn decode_matches_cuda_on_every_code() {
    let test = "decode_matches_cuda_on_every_code";
    let Some(nvcc) = nvcc(test) else { return };
    let dir = scratch(test);
    let reference = run_reference(&nvcc, &dir, &[]);

    let mut report = String::new();
    for (format, cuda_values) in Fp8Format::ALL.into_iter().zip(&reference.values) {
        for code in 0..=255u8 {
            let (kiln, cuda) = (format.decode(code), cuda_values[code as usize]);
            let same = if kiln.is_nan() || cuda.is_nan() {
                kiln.is_nan() && cuda.is_nan()
            } else {
                kiln.to_bits() == cuda.to_bits()
            };
            if !same {
                writeln!(
                    report,
                    "  {format} {code:#04x}: kiln {kiln:e} ({:#010x}), CUDA {cuda:e} ({:#010x})",
                    kiln.to_bits(),
                    cuda.to_bits()
                )
                .unwrap();
            }
        }
    }
    assert!(
        report.is_empty(),
        "kiln's decode differs from cuda_fp8.h's:\n{report}"
    );
}

/// The tile quantizer of `kernels/kiln_fp8.cuh` on the host: a warp is 32 threads, and
/// `__shfl_xor_sync` goes through a board between two barriers. Arguments: the input file
/// (f32 bit patterns of a row-major `[rows, COLS]` matrix) and an output directory, where it
/// writes, for every tile width, format and scale rule, `T-FORMAT-RULE.codes` (one byte per
/// element) and `.scales` (one f32 per tile, row-major).
const QUANTIZER: &str = r#"// kiln_fp8.cuh's tile quantizer run by emulated warps (tests/fp8_cuda.rs).
#include <math.h>
#include <vector_functions.h>
#include <vector_types.h>

#include <barrier>
#include <cstdint>
#include <cstdio>
#include <string>
#include <thread>
#include <vector>

static thread_local int kiln_lane;
static float kiln_board[32];
static std::barrier<>* kiln_warp;

float __shfl_xor_sync(unsigned, float value, int offset) {
    kiln_board[kiln_lane] = value;
    kiln_warp->arrive_and_wait();
    const float other = kiln_board[kiln_lane ^ offset];
    kiln_warp->arrive_and_wait();
    return other;
}

#include "kiln_fp8.cuh"

static void write_file(const std::string& path, const void* data, size_t size) {
    FILE* f = std::fopen(path.c_str(), "wb");
    if (!f || std::fwrite(data, 1, size, f) != size || std::fclose(f) != 0) {
        std::fprintf(stderr, "cannot write %s\n", path.c_str());
        std::exit(1);
    }
}

int main(int argc, char** argv) {
    if (argc != 3) return 2;
    FILE* f = std::fopen(argv[1], "rb");
    if (!f) return 1;
    std::vector<float> x;
    float chunk[4096];
    size_t n;
    while ((n = std::fread(chunk, sizeof chunk[0], 4096, f)) > 0) x.insert(x.end(), chunk, chunk + n);
    std::fclose(f);
    if (x.size() % 128 != 0) return 3;
    std::barrier<> warp(32);
    kiln_warp = &warp;
    for (int tile : {4, 8, 32, 128}) {
        for (int e5m2 = 0; e5m2 < 2; ++e5m2) {
            for (int pow2 = 0; pow2 < 2; ++pow2) {
                std::vector<uint8_t> codes(x.size());
                std::vector<float> scales(x.size() / tile);
                std::vector<std::thread> lanes;
                for (int lane = 0; lane < 32; ++lane) {
                    lanes.emplace_back([&, lane] {
                        kiln_lane = lane;
                        for (size_t base = 4 * lane; base < x.size(); base += 128) {
                            const float4 v = make_float4(x[base], x[base + 1], x[base + 2], x[base + 3]);
                            float s;
                            const unsigned c = e5m2 ? kiln_quantize4<true>(v, tile / 4, pow2, &s)
                                                    : kiln_quantize4<false>(v, tile / 4, pow2, &s);
                            for (int j = 0; j < 4; ++j) codes[base + j] = (c >> (8 * j)) & 0xFF;
                            if (base % tile == 0) scales[base / tile] = s;
                        }
                    });
                }
                for (auto& t : lanes) t.join();
                const std::string stem = std::string(argv[2]) + "/" + std::to_string(tile) + "-" +
                                         (e5m2 ? "e5m2" : "e4m3") + "-" + (pow2 ? "pow2" : "fp32");
                write_file(stem + ".codes", codes.data(), codes.size());
                write_file(stem + ".scales", scales.data(), 4 * scales.size());
            }
        }
    }
    return 0;
}
"#;

/// Rows of 256 elements whose tiles (4 to 128 wide) test every rule of the scale: magnitudes
/// from f32 subnormals to `f32::MAX` (the minimum-scale clamp and the overflow step-down),
/// all-zero tiles and partly zero ones, an exact 448 and 57344 (scale 1), values on FP8
/// rounding midpoints, and plain random values of one magnitude per row.
fn tile_inputs() -> (usize, Vec<f32>) {
    const COLS: usize = 256;
    let mut rng = kiln_runtime::data::Rng::new(5);
    let mut x = Vec::new();
    let uniform = |rng: &mut kiln_runtime::data::Rng| rng.next_f64() as f32 * 2.0 - 1.0;
    // One magnitude per row: 2^e for e from -149 (subnormal) to 127.
    for e in (-149..=127).step_by(6) {
        let m = 2f64.powi(e) as f32;
        x.extend((0..COLS).map(|_| uniform(&mut rng) * m * 1.5));
    }
    // Near f32::MAX: tiles whose scale would overflow.
    x.extend((0..COLS).map(|i| {
        if i % 3 == 0 {
            f32::MAX
        } else {
            -f32::MAX * uniform(&mut rng).abs()
        }
    }));
    x.extend((0..COLS).map(|i| f32::from_bits(f32::MAX.to_bits() - (i as u32 % 7))));
    // Zeros: a whole row, and every other 4-wide tile.
    x.extend(std::iter::repeat_n(0.0, COLS));
    x.extend((0..COLS).map(|i| {
        if (i / 4) % 2 == 0 {
            0.0
        } else {
            uniform(&mut rng)
        }
    }));
    // Scale 1 exactly, then midpoints between E4M3 codes (ties to even) at that scale.
    for max in [448.0f32, 57344.0] {
        x.extend((0..COLS).map(|i| {
            if i % 4 == 0 {
                max
            } else {
                let code = Fp8Format::E4m3.decode((i % 0x7E) as u8);
                let next = Fp8Format::E4m3.decode((i % 0x7E) as u8 + 1);
                (code + next) / 2.0
            }
        }));
    }
    // Within two f32 ulps of midpoints between codes, at a scale that is not a power of two:
    // x / scale must be a division (x · (1 / scale) rounds differently near midpoints).
    for format in Fp8Format::ALL {
        let amax = format.max() * 1.3;
        let scale = kiln_runtime::numerics::quant::scale_of(amax, format, ScaleFormat::Fp32);
        x.extend((0..COLS).map(|i| {
            if i % 4 == 0 {
                return amax;
            }
            let code = (i % format.max_code() as usize) as u8;
            let mid = (format.decode(code) + format.decode(code + 1)) / 2.0;
            f32::from_bits(
                (mid * scale)
                    .to_bits()
                    .wrapping_add_signed(i as i32 % 5 - 2),
            )
        }));
    }
    // f32 subnormals only: the smallest-normal clamp of the scale.
    x.extend((0..COLS).map(|i| {
        f32::from_bits(1 + (i as u32 * 977) % 0x7F_FFFF) * if i % 2 == 0 { 1.0 } else { -1.0 }
    }));
    (COLS, x)
}

#[test]
fn tile_quantization_of_kiln_fp8_cuh_matches_the_cpu_emulation() {
    let test = "tile_quantization_of_kiln_fp8_cuh_matches_the_cpu_emulation";
    let Some(nvcc) = nvcc(test) else { return };
    let dir = scratch(test);
    let (cols, x) = tile_inputs();
    let rows = x.len() / cols;
    let bits: Vec<u32> = x.iter().map(|v| v.to_bits()).collect();
    compile_and_run(&nvcc, &dir, "quantizer", QUANTIZER, &bits);

    let mut report = String::new();
    for tile in [4usize, 8, 32, 128] {
        for format in Fp8Format::ALL {
            for rule in [ScaleFormat::Fp32, ScaleFormat::Pow2] {
                let want = quantize(&x, rows, cols, [1, tile], format, rule).unwrap();
                let rule_name = if rule == ScaleFormat::Pow2 {
                    "pow2"
                } else {
                    "fp32"
                };
                let stem = dir.join(format!("{tile}-{format}-{rule_name}"));
                let codes = std::fs::read(stem.with_extension("codes")).unwrap();
                let scales: Vec<f32> = std::fs::read(stem.with_extension("scales"))
                    .unwrap()
                    .chunks_exact(4)
                    .map(|b| f32::from_ne_bytes(b.try_into().unwrap()))
                    .collect();
                let bad_scales = (0..scales.len())
                    .filter(|&i| scales[i].to_bits() != want.scales[i].to_bits())
                    .collect::<Vec<_>>();
                let bad_codes = (0..codes.len())
                    .filter(|&i| codes[i] != want.codes[i])
                    .collect::<Vec<_>>();
                if let Some(&i) = bad_scales.first() {
                    writeln!(
                        report,
                        "  1×{tile} {format} {rule_name}: {} scales differ; tile {i}: CUDA {:e}, kiln {:e}",
                        bad_scales.len(),
                        scales[i],
                        want.scales[i]
                    )
                    .unwrap();
                }
                if let Some(&i) = bad_codes.first() {
                    writeln!(
                        report,
                        "  1×{tile} {format} {rule_name}: {} codes differ; element {i} = {:e}: CUDA {:#04x}, kiln {:#04x}",
                        bad_codes.len(),
                        x[i],
                        codes[i],
                        want.codes[i]
                    )
                    .unwrap();
                }
            }
        }
    }
    assert!(
        report.is_empty(),
        "kiln_fp8.cuh's tile quantizer differs from numerics::quant:\n{report}"
    );
    eprintln!(
        "{test}: {} elements × 4 tile widths × 2 formats × 2 scale rules agree",
        x.len()
    );
}

/// The device path of `kiln_fp8x2` is inline PTX (NVRTC has no `cuda_fp8.h`); it must pass
/// its operands in the order `cuda_fp8.h`'s device code does, which puts the first element in
/// the low byte. Both are compiled to PTX for sm_90a from the same two floats, and the
/// conversion instructions must read the same registers in the same order.
#[test]
fn the_device_fp8_conversion_orders_its_operands_as_cuda_fp8_h() {
    let test = "the_device_fp8_conversion_orders_its_operands_as_cuda_fp8_h";
    let Some(nvcc) = nvcc(test) else { return };
    let dir = scratch(test);
    let source = r#"#include <cuda_fp8.h>
#include "kiln_fp8.cuh"
extern "C" __global__ void pairs(const float2* x, unsigned* kiln, unsigned* cuda) {
    const float2 v = x[threadIdx.x];
    kiln[2 * threadIdx.x] = kiln_fp8x2<false>(v.x, v.y);
    cuda[2 * threadIdx.x] = __nv_cvt_float2_to_fp8x2(v, __NV_SATFINITE, __NV_E4M3);
    kiln[2 * threadIdx.x + 1] = kiln_fp8x2<true>(v.x, v.y);
    cuda[2 * threadIdx.x + 1] = __nv_cvt_float2_to_fp8x2(v, __NV_SATFINITE, __NV_E5M2);
}
"#;
    let ptx = compile_unit(&nvcc, &dir, "pairs", source, "-ptx", "ptx");
    let text = std::fs::read_to_string(&ptx).unwrap();
    for format in ["e4m3x2", "e5m2x2"] {
        let operands: Vec<String> = text
            .lines()
            .filter(|l| l.contains(&format!("cvt.rn.satfinite.{format}.f32")))
            .map(|l| {
                // `cvt… %rsN, %fA, %fB;`: the two sources.
                let args = l.split_whitespace().skip(1).collect::<String>();
                args.trim_end_matches([';', '}'])
                    .split(',')
                    .skip(1)
                    .collect::<Vec<_>>()
                    .join(",")
            })
            .collect();
        assert_eq!(operands.len(), 2, "{format}: two conversions in\n{text}");
        assert_eq!(operands[0], operands[1], "{format}: kiln vs cuda_fp8.h");
    }
}

/// The header in a whole nvcc compile (host and device passes, as a user building the
/// generated unit with `nvcc -c` would), not only the device-only builds kiln does: its host
/// encoder and its bit casts must be callable from host code under nvcc too.
#[test]
fn kiln_fp8_cuh_builds_for_host_and_device_with_nvcc() {
    let test = "kiln_fp8_cuh_builds_for_host_and_device_with_nvcc";
    let Some(nvcc) = nvcc(test) else { return };
    let dir = scratch(test);
    let source = r#"#include "kiln_fp8.cuh"
extern "C" __global__ void tiles(const float4* x, unsigned* codes, float* scales) {
    float s;
    codes[threadIdx.x] = kiln_quantize4<false>(x[threadIdx.x], 32, false, &s);
    if (threadIdx.x % 32 == 0) scales[threadIdx.x / 32] = s;
}
#ifndef __CUDA_ARCH__
unsigned host_code(float x) { return kiln_fp8_encode_host<true>(x) + kiln_float_bits(x); }
#endif
"#;
    compile_unit(&nvcc, &dir, "both", source, "-c", "o");
}

/// Compiles the CUDA `source` as `dir/name.cu` for sm_90a with nvcc in `mode` (`-ptx`, `-c`),
/// `kernels/` on the include path; returns the output file, `dir/name.ext`.
fn compile_unit(
    nvcc: &Nvcc,
    dir: &Path,
    name: &str,
    source: &str,
    mode: &str,
    ext: &str,
) -> PathBuf {
    let cu = dir.join(format!("{name}.cu"));
    let output = dir.join(format!("{name}.{ext}"));
    std::fs::write(&cu, source).unwrap();
    let out = common::nvcc_command(nvcc, &[mode, "-arch=sm_90a", "-O3"], &output, &cu)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{name}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    output
}
