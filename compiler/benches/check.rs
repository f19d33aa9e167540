//! Spec checking and analysis speed: `cargo bench -p kiln-compiler --bench check`.
//! Target (docs/perf.md): `kiln check specs/deepseek-v3.toml` under 20 ms end to end.

use criterion::{criterion_group, criterion_main, Criterion};
use kiln_compiler::analyze::analyze;
use kiln_compiler::check::check_str;
use kiln_compiler::ir::verify;
use kiln_compiler::lower::lower;
use kiln_compiler::named_ops::ops;
use kiln_compiler::report::render;

const V3: &str = include_str!("../../specs/deepseek-v3.toml");
const TINY: &str = include_str!("../../specs/tiny.toml");

fn bench(c: &mut Criterion) {
    let model = check_str(V3).expect("deepseek-v3 checks");
    c.bench_function("toml parse deepseek-v3", |b| {
        b.iter(|| toml::de::DeTable::parse(std::hint::black_box(V3)).is_ok())
    });
    c.bench_function("check deepseek-v3", |b| {
        b.iter(|| check_str(std::hint::black_box(V3)).is_ok())
    });
    c.bench_function("ops deepseek-v3", |b| {
        b.iter(|| ops(std::hint::black_box(&model)).len())
    });
    c.bench_function("analyze deepseek-v3", |b| {
        b.iter(|| analyze(std::hint::black_box(&model)))
    });
    c.bench_function("lower+verify deepseek-v3", |b| {
        b.iter(|| verify(&lower(std::hint::black_box(&model)).unwrap()).is_ok())
    });
    c.bench_function("check+analyze+render deepseek-v3", |b| {
        b.iter(|| render(&analyze(&check_str(std::hint::black_box(V3)).unwrap())))
    });
    c.bench_function("check+analyze+render tiny", |b| {
        b.iter(|| render(&analyze(&check_str(std::hint::black_box(TINY)).unwrap())))
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
