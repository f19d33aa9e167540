//! `kiln bench --gemms`: a device's BF16 and block-scaled FP8 GEMMs timed side by side, as a
//! linear layer runs them (`y[m, n] = x[m, k] · w[n, k]ᵀ`, activations in 1×128 tiles and
//! weights in 128×128 blocks for FP8), and the bf16 product that `kiln bench --device` quotes
//! as the device's ceiling.

use std::time::Instant;

use kiln_compiler::model::Format;
use kiln_runtime::device::{
    BufId, Device, DeviceError, Fp8Call, Fp8Operand, GemmCall, GemmOperand,
};
use kiln_runtime::numerics::accum::Accumulation;
use kiln_runtime::numerics::fp8::Fp8Format;
use kiln_runtime::numerics::quant::{quantize, ScaleFormat};

/// DeepSeek-V3's GEMM shapes as `(n, k)`, output and input features (`k × n`: 7168×2048,
/// 2048×7168, 7168×18432): the model width against an expert's 2048 and the dense FFN's
/// 18432.
pub(crate) const V3_SHAPES: [(u64, u64); 3] = [(2048, 7168), (7168, 2048), (18432, 7168)];

/// One shape's timings.
#[derive(serde::Serialize)]
pub(crate) struct GemmTiming {
    pub m: u64,
    pub n: u64,
    pub k: u64,
    pub bf16_ms: f64,
    pub fp8_ms: f64,
    pub bf16_tflops: f64,
    pub fp8_tflops: f64,
    /// bf16 time over FP8 time.
    pub fp8_speedup: f64,
}

/// Parses `--gemms`' shapes: `v3` (DeepSeek-V3's, with `tokens` rows), or `MxNxK,…`.
pub(crate) fn parse_shapes(spec: &str, tokens: u64) -> Result<Vec<[u64; 3]>, String> {
    if spec == "v3" {
        return Ok(V3_SHAPES.iter().map(|&(n, k)| [tokens, n, k]).collect());
    }
    spec.split(',')
        .map(|s| {
            let dims: Vec<u64> = s
                .split('x')
                .map(|d| d.trim().parse::<u64>())
                .collect::<Result<_, _>>()
                .map_err(|_| format!("`{s}`: a shape is MxNxK, e.g. 4096x2048x7168"))?;
            match dims[..] {
                [m, n, k] if m > 0 && n > 0 && k > 0 => Ok([m, n, k]),
                _ => Err(format!("`{s}`: a shape is three positive sizes MxNxK")),
            }
        })
        .collect()
}

/// Deterministic data in [-1, 1).
fn data(len: u64, seed: u64) -> Vec<f32> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        })
        .collect()
}

fn upload(device: &mut dyn Device, bytes: &[u8]) -> Result<BufId, DeviceError> {
    let buf = device.alloc(bytes.len() as u64)?;
    device.upload(buf, bytes)?;
    Ok(buf)
}

fn f32_bytes(x: &[f32]) -> Vec<u8> {
    x.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// The median of `reps` timed calls of `call` after one untimed (which pays for the
/// library's algorithm choice), each followed by a synchronization.
fn time(device: &mut dyn Device, call: &GemmCall, reps: usize) -> Result<f64, DeviceError> {
    device.gemm(call)?;
    device.synchronize()?;
    let mut times = Vec::with_capacity(reps);
    for _ in 0..reps.max(1) {
        let t = Instant::now();
        device.gemm(call)?;
        device.synchronize()?;
        times.push(t.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    Ok(times[times.len() / 2])
}

/// A linear layer's GEMM `y[m, n] = x[m, k] · w[n, k]ᵀ` in `format` over uploaded f32 data.
fn linear(m: u64, n: u64, k: u64, x: u64, w: u64, y: u64, format: Format) -> GemmCall {
    GemmCall {
        m,
        n,
        k,
        a: GemmOperand {
            ptr: x,
            trans: false,
            ld: k,
        },
        b: GemmOperand {
            ptr: w,
            trans: true,
            ld: k,
        },
        c: y,
        ldc: n,
        bias: None,
        batch: 1,
        strides: [0; 3],
        format,
        fp8: None,
        accumulate: false,
    }
}

/// The median time of a bf16 `m × n × k` product on `device`, in seconds.
pub(crate) fn bf16_time(
    device: &mut dyn Device,
    [m, n, k]: [u64; 3],
    reps: usize,
) -> Result<f64, DeviceError> {
    let x = upload(device, &f32_bytes(&data(m * k, 1)))?;
    let w = upload(device, &f32_bytes(&data(n * k, 2)))?;
    let y = device.alloc(4 * m * n)?;
    let call = linear(
        m,
        n,
        k,
        device.address(x),
        device.address(w),
        device.address(y),
        Format::Bf16,
    );
    time(device, &call, reps)
}

/// BF16 and FP8 timings of each shape on `device`.
pub(crate) fn run(
    device: &mut dyn Device,
    shapes: &[[u64; 3]],
    reps: usize,
    mut progress: impl FnMut(&str),
) -> Result<Vec<GemmTiming>, String> {
    let mut out = Vec::new();
    for &[m, n, k] in shapes {
        progress(&format!("GEMM {m}×{n}×{k}: preparing operands"));
        let (xs, ws) = (data(m * k, 1), data(n * k, 2));
        let failed = |e: DeviceError| format!("GEMM {m}×{n}×{k}: {e}");
        let bf16 = bf16_time(device, [m, n, k], reps).map_err(failed)?;
        let fp8 = {
            let q = |v: &[f32], rows: u64, block: [usize; 2]| {
                quantize(
                    v,
                    rows as usize,
                    k as usize,
                    block,
                    Fp8Format::E4m3,
                    ScaleFormat::Fp32,
                )
                .map_err(|e| format!("GEMM {m}×{n}×{k}: quantizing: {e:?}"))
            };
            let (qx, qw) = (q(&xs, m, [1, 128])?, q(&ws, n, [128, 128])?);
            let operand = |device: &mut dyn Device, codes: &[u8], scales: &[f32], block| {
                Ok::<_, DeviceError>(Fp8Operand {
                    codes: {
                        let b = upload(device, codes)?;
                        device.address(b)
                    },
                    scales: {
                        let b = upload(device, &f32_bytes(scales))?;
                        device.address(b)
                    },
                    block,
                })
            };
            let a = operand(device, &qx.codes, &qx.scales, [1, 128]).map_err(failed)?;
            let b = operand(device, &qw.codes, &qw.scales, [128, 128]).map_err(failed)?;
            let y = device.alloc(4 * m * n).map_err(failed)?;
            let mut call = linear(m, n, k, a.codes, b.codes, device.address(y), Format::E4m3);
            call.fp8 = Some(Fp8Call {
                a,
                b,
                accumulation: Accumulation::DEEPSEEK_V3,
            });
            time(device, &call, reps).map_err(failed)?
        };
        let flop = 2.0 * (m * n * k) as f64;
        out.push(GemmTiming {
            m,
            n,
            k,
            bf16_ms: bf16 * 1e3,
            fp8_ms: fp8 * 1e3,
            bf16_tflops: flop / bf16 / 1e12,
            fp8_tflops: flop / fp8 / 1e12,
            fp8_speedup: bf16 / fp8,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes_parse_or_say_why_not() {
        assert_eq!(
            parse_shapes("v3", 4096).unwrap(),
            vec![[4096, 2048, 7168], [4096, 7168, 2048], [4096, 18432, 7168]]
        );
        assert_eq!(
            parse_shapes("8x128x256, 1x2x3", 0).unwrap(),
            vec![[8, 128, 256], [1, 2, 3]]
        );
        for bad in ["8x128", "8x0x2", "axbxc", ""] {
            assert!(parse_shapes(bad, 1).is_err(), "{bad}");
        }
    }
}
