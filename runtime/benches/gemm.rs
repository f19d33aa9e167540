//! f32 matrix-product speed of the CPU runtime's `matmul` (the `gemm` crate):
//! `cargo bench -p kiln-runtime --bench gemm`.
//!
//! Each benchmark's throughput is declared as `2·m·n·k` elements (one multiply and one add per
//! term), so criterion's `Gelem/s` reads directly as GFLOP/s. The ceiling on the project's
//! 2-core machine is what the `gemm` crate reaches on large shapes (145–160 GFLOP/s).

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use kiln_runtime::cpu::matmul::matmul;
use std::hint::black_box;

/// One product to measure: `c[m, n] = op(a)[m, k] · op(b)[k, n]`.
struct Case {
    name: &'static str,
    m: usize,
    k: usize,
    n: usize,
    trans_a: bool,
    trans_b: bool,
}

/// Deterministic operand values in `[-1, 1)`, so every run multiplies the same numbers.
fn operand(len: usize, seed: u32) -> Vec<f32> {
    (0..len as u32)
        .map(|i| {
            (i.wrapping_mul(2654435761).wrapping_add(seed) >> 8) as f32 / (1 << 23) as f32 - 1.0
        })
        .collect()
}

fn bench_case(c: &mut Criterion, group: &str, case: &Case) {
    let Case {
        m,
        k,
        n,
        trans_a,
        trans_b,
        ..
    } = *case;
    let a = operand(m * k, 1);
    let b = operand(k * n, 2);
    let mut out = vec![0.0f32; m * n];
    let mut g = c.benchmark_group(group);
    // Large products take tens of milliseconds each; ten samples keep a run short.
    g.sample_size(10);
    g.throughput(Throughput::Elements((2 * m * n * k) as u64));
    g.bench_function(BenchmarkId::from_parameter(case.name), |bench| {
        bench.iter(|| {
            matmul(
                m,
                k,
                n,
                black_box(&a),
                trans_a,
                black_box(&b),
                trans_b,
                &mut out,
                false,
            );
            black_box(&mut out);
        })
    });
    g.finish();
}

fn bench(c: &mut Criterion) {
    for size in [1024, 2048] {
        let case = Case {
            name: if size == 1024 { "1024" } else { "2048" },
            m: size,
            k: size,
            n: size,
            trans_a: false,
            trans_b: false,
        };
        bench_case(c, "matmul square", &case);
    }
    // A linear layer of the tiny model's shape: 1024 tokens, 256 inputs, 512 outputs, with
    // the three layouts `linear_fwd` and `linear_bwd` use.
    let (tokens, inp, out) = (1024, 256, 512);
    let linear = [
        // y[tokens, out] = x[tokens, inp] · wᵀ, w stored [out, inp].
        Case {
            name: "fwd x·wT",
            m: tokens,
            k: inp,
            n: out,
            trans_a: false,
            trans_b: true,
        },
        // dx[tokens, inp] = dy[tokens, out] · w[out, inp].
        Case {
            name: "dx dy·w",
            m: tokens,
            k: out,
            n: inp,
            trans_a: false,
            trans_b: false,
        },
        // dw[out, inp] = dyᵀ · x, dy stored [tokens, out].
        Case {
            name: "dw dyT·x",
            m: out,
            k: tokens,
            n: inp,
            trans_a: true,
            trans_b: false,
        },
    ];
    for case in &linear {
        bench_case(c, "matmul linear 1024x256x512", case);
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
