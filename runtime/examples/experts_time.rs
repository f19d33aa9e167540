//! Times the routed-expert FFN of `specs/tiny.toml`'s shape (1024 tokens, top-2 of 8 experts
//! in two groups, d_model 256, 128 hidden units, SwiGLU) forward and backward:
//! `cargo run --release -p kiln-runtime --example experts_time`. Prints milliseconds per call
//! and the GFLOP/s of its GEMMs (`2·rows·3·d·h` forward, twice that backward).
use kiln_runtime::cpu::moe::{experts_bwd, experts_fwd, ExpertFfn, SwiGlu};
use std::time::Instant;
fn main() {
    kiln_runtime::memory::keep_freed_memory();
    let (n, d, k, e, h) = (1024usize, 256usize, 2usize, 8usize, 128usize);
    let mut s = 12345u64;
    // A deterministic LCG in [-0.5, 0.5).
    let mut rnd = || {
        s = s
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((s >> 40) as f32 / (1u64 << 24) as f32) - 0.5
    };
    let x: Vec<f32> = (0..n * d).map(|_| rnd()).collect();
    let wg: Vec<f32> = (0..e * h * d).map(|_| rnd() * 0.1).collect();
    let wu: Vec<f32> = (0..e * h * d).map(|_| rnd() * 0.1).collect();
    let wd: Vec<f32> = (0..e * h * d).map(|_| rnd() * 0.1).collect();
    let weights: Vec<f32> = (0..n * k).map(|_| rnd() + 1.0).collect();
    let mut experts = vec![0u32; n * k];
    // Each token picks one of the two groups of four, then two distinct experts in it.
    for t in 0..n {
        let g = if rnd() > 0.0 { 4 } else { 0 };
        let a = ((rnd() + 0.5) * 4.0) as u32 % 4;
        let b = (a + 1 + ((rnd() + 0.5) * 3.0) as u32 % 3) % 4;
        experts[t * k] = g + a;
        experts[t * k + 1] = g + b;
    }
    let dy: Vec<f32> = (0..n * d).map(|_| rnd()).collect();
    let ffn = ExpertFfn {
        x: &x,
        n,
        d,
        weights: &weights,
        experts: &experts,
        k,
        w_gate: Some(&wg),
        w_up: &wu,
        w_down: &wd,
        e,
        h,
        act: &SwiGlu,
    };
    let reps = 40;
    let (mut tf, mut tb) = (0.0, 0.0);
    for i in 0..reps + 3 {
        let t0 = Instant::now();
        let (y, saved) = experts_fwd(&ffn);
        let t1 = Instant::now();
        let g = experts_bwd(&ffn, &saved, &dy);
        let t2 = Instant::now();
        std::hint::black_box((y, g));
        if i >= 3 {
            tf += (t1 - t0).as_secs_f64();
            tb += (t2 - t1).as_secs_f64();
        }
    }
    let flop = 2.0 * (n * k * 3 * d * h) as f64;
    println!(
        "fwd {:.3} ms ({:.0} GFLOP/s)  bwd {:.3} ms ({:.0} GFLOP/s)",
        tf / reps as f64 * 1e3,
        flop * reps as f64 / tf / 1e9,
        tb / reps as f64 * 1e3,
        2.0 * flop * reps as f64 / tb / 1e9
    );
}
