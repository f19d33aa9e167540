//! The KV-cached decoder computes the forward pass: fed one token at a time, its logits equal
//! the interpreter's uncached forward pass over the whole sequence (every logit finite, the
//! worst relative error below 1e-6 with an f32 cache), for MLA (latent cache, absorbed
//! projections) with MoE and YaRN, for multi-head attention with learned positions and
//! LayerNorm, and for grouped-query attention; the cache's measured bytes per token are the
//! analyzer's figure.

use std::collections::HashMap;

use kiln_compiler::analyze::analyze;
use kiln_compiler::check::check_str;
use kiln_compiler::ir::InputKind;
use kiln_compiler::lower::lower;
use kiln_compiler::model::{Format, Model};
use kiln_compiler::program::{compile_decode, Program, Settings};
use kiln_runtime::data::Rng;
use kiln_runtime::decode::{DecodeError, Decoder};
use kiln_runtime::exec::{Executor, Feed};
use kiln_runtime::train::init_params;

const MICRO: &str = include_str!("../../tests/specs/micro.toml");
const MICRO_YARN: &str = include_str!("../../tests/specs/micro-yarn.toml");
const GPT2_MICRO: &str = include_str!("../../tests/specs/gpt2-micro.toml");

/// micro with grouped-query attention (4 query heads over 2 key/value heads).
fn gqa() -> String {
    let start = MICRO.find("[attention]").unwrap();
    let end = MICRO.find("[ffn]").unwrap();
    let attention = "[attention]\nkind = \"gqa\"\nheads = 4\nkv_heads = 2\nhead_dim = 8\n\n\
                     [attention.rope]\ntheta = 10000.0\n\n";
    format!("{}{attention}{}", &MICRO[..start], &MICRO[end..])
}

fn model(spec: &str, batch: u64, seq: u64) -> Model {
    let mut m = check_str(spec).unwrap_or_else(|e| panic!("{e:?}"));
    m.train.batch = batch;
    m.train.seq_len = seq;
    m
}

/// Parameters with larger weights than the initialization's, so attention is far from uniform
/// and the MLPs far from linear; router biases nonzero, so selection uses them.
fn params(m: &Model, seed: u64) -> Vec<Vec<f32>> {
    let g = lower(m).unwrap();
    let mut rng = Rng::new(seed);
    init_params(&g, seed)
        .into_iter()
        .zip(g.params.iter())
        .map(|(p, (_, param))| {
            if param.name.ends_with("router.bias") {
                p.iter()
                    .map(|_| (rng.next_f64() as f32 - 0.5) * 0.1)
                    .collect()
            } else if param.name.contains("norm") {
                p.iter()
                    .map(|v| v + (rng.next_f64() as f32 - 0.5) * 0.2)
                    .collect()
            } else {
                p.iter().map(|v| v * 8.0).collect()
            }
        })
        .collect()
}

/// The decode Program of `m` for up to 4 sequences of up to `max_positions` tokens.
fn decode_program(m: &Model) -> Program {
    compile_decode(m, 4, m.max_positions).unwrap()
}

fn tokens(m: &Model, seed: u64) -> Vec<u32> {
    let mut rng = Rng::new(seed ^ 99);
    let n = (m.train.batch * m.train.seq_len) as usize;
    (0..n).map(|_| rng.next_u32() % m.vocab as u32).collect()
}

/// The uncached logits `[b, t, vocab]` from the interpreter.
fn forward_logits(m: &Model, params: &[Vec<f32>], toks: &[u32]) -> Vec<f32> {
    let program = Program::new(lower(m).unwrap(), Settings::of(m)).unwrap();
    let g = program.graph();
    let logits = g.output("logits").unwrap();
    let exec = Executor::new(&program, &[logits]);
    let (b, t) = (m.train.batch as usize, m.train.seq_len as usize);
    let mut inputs = HashMap::new();
    for (_, v) in g.values.iter() {
        if let kiln_compiler::ir::Def::Input(kind) = v.def {
            let data = match kind {
                InputKind::Tokens { .. } => toks.to_vec(),
                InputKind::Positions => (0..b).flat_map(|_| 0..t as u32).collect(),
                InputKind::TokenWeights | InputKind::KvCache { .. } => continue,
            };
            inputs.insert(kind, data);
        }
    }
    let out = exec
        .run::<f32>(&Feed {
            params,
            inputs: &inputs,
            weights: None,
        })
        .unwrap();
    out[&logits].floats().to_vec()
}

/// The larger of `a` and `b`, and NaN if either is NaN (`f64::max` would drop the NaN, so a
/// NaN error would pass as no error).
fn max_nan(a: f64, b: f64) -> f64 {
    if a.is_nan() || b.is_nan() {
        f64::NAN
    } else {
        a.max(b)
    }
}

fn rel(got: &[f32], want: &[f32]) -> f64 {
    let d: f64 = got
        .iter()
        .zip(want)
        .map(|(a, b)| f64::from(a - b).powi(2))
        .sum();
    let n: f64 = want.iter().map(|b| f64::from(*b).powi(2)).sum();
    (d / n).sqrt()
}

/// Feeds every sequence token by token and compares each step's logits with the forward
/// pass's at that position; returns the worst relative error (NaN if any error is). Every
/// logit of both must be finite.
fn cached_vs_uncached(spec: &str, format: Format) -> f64 {
    let m = model(spec, 2, 12);
    let p = params(&m, 3);
    let toks = tokens(&m, 3);
    let want = forward_logits(&m, &p, &toks);
    assert!(
        want.iter().all(|x| x.is_finite()),
        "the uncached forward pass has non-finite logits"
    );
    let g = lower(&m).unwrap();
    let dp = decode_program(&m);
    let dec = Decoder::new(&dp, &g, &p).unwrap();
    let (b, t, v) = (2, 12, m.vocab as usize);
    let mut cache = dec.cache(b, t, format).unwrap();
    let mut worst = 0f64;
    for pos in 0..t {
        let rows: Vec<(usize, u32)> = (0..b).map(|s| (s, toks[s * t + pos])).collect();
        let got = dec.step(&mut cache, &rows).unwrap();
        assert_eq!(got.len(), b * v);
        assert!(
            got.iter().all(|x| x.is_finite()),
            "position {pos}: the decoder's logits are not all finite"
        );
        for s in 0..b {
            let w = &want[(s * t + pos) * v..(s * t + pos + 1) * v];
            worst = max_nan(worst, rel(&got[s * v..(s + 1) * v], w));
        }
    }
    assert_eq!(cache.len(0), t);
    worst
}

#[test]
fn cached_logits_equal_the_uncached_forward_pass() {
    for (name, spec) in [
        ("micro (MLA, MoE)", MICRO.to_string()),
        ("micro-yarn (MLA, YaRN)", MICRO_YARN.to_string()),
        (
            "gpt2-micro (MHA, learned positions)",
            GPT2_MICRO.to_string(),
        ),
        ("micro-gqa (GQA)", gqa()),
    ] {
        let err = cached_vs_uncached(&spec, Format::Fp32);
        println!("{name}: worst relative logit error {err:.2e}");
        assert!(err < 1e-6, "{name}: {err}");
    }
}

#[test]
fn a_bf16_cache_holds_the_analyzers_bytes_and_stays_close() {
    let m = model(MICRO, 2, 12);
    let g = lower(&m).unwrap();
    let p = params(&m, 3);
    let dp = decode_program(&m);
    let dec = Decoder::new(&dp, &g, &p).unwrap();
    let cache = dec.cache(3, 7, Format::Bf16).unwrap();
    let report = analyze(&m);
    assert_eq!(
        cache.elements_per_token() as u128,
        report.kv_cache.elements_per_token
    );
    assert_eq!(
        cache.bytes_per_token(),
        report.kv_cache.bytes_per_token as f64
    );
    // micro: (kv_rank 16 + rope 8) per layer, 2 layers, 2 bytes each.
    assert_eq!(cache.bytes_per_token(), 96.0);
    let err = cached_vs_uncached(MICRO, Format::Bf16);
    println!("bf16 cache: worst relative logit error {err:.2e}");
    assert!(err > 1e-6 && err < 3e-2, "{err}");
}

#[test]
fn a_full_cache_and_bad_ids_are_errors() {
    let m = model(MICRO, 1, 4);
    let g = lower(&m).unwrap();
    let p = params(&m, 1);
    let dp = decode_program(&m);
    let dec = Decoder::new(&dp, &g, &p).unwrap();
    let mut cache = dec.cache(1, 2, Format::Fp32).unwrap();
    dec.step(&mut cache, &[(0, 1)]).unwrap();
    dec.step(&mut cache, &[(0, 2)]).unwrap();
    assert_eq!(
        dec.step(&mut cache, &[(0, 3)]),
        Err(DecodeError::Full {
            sequence: 0,
            capacity: 2
        })
    );
    cache.reset(0);
    assert!(matches!(
        dec.step(&mut cache, &[(0, 9999)]),
        Err(DecodeError::OutOfRange(_))
    ));
    assert!(matches!(
        dec.step(&mut cache, &[(1, 1)]),
        Err(DecodeError::OutOfRange(_))
    ));
    assert!(matches!(
        dec.cache(1, 4, Format::E4m3),
        Err(DecodeError::CacheFormat(_))
    ));
    let wrong = vec![vec![0.0; 3]; p.len()];
    assert!(matches!(
        Decoder::new(&dp, &g, &wrong),
        Err(DecodeError::Param(_))
    ));
}

mod generation {
    use super::*;
    use kiln_runtime::generate::{generate, log_prob, Finish, Sampling};

    fn sampling(temperature: f64, max_tokens: usize, stop: Vec<Vec<u32>>) -> Sampling {
        Sampling {
            temperature,
            top_k: 0,
            top_p: 1.0,
            max_tokens,
            stop,
            seed: 5,
        }
    }

    #[test]
    fn generation_logprobs_are_the_uncached_forward_passs() {
        let m = model(MICRO, 1, 4);
        let g = lower(&m).unwrap();
        let p = params(&m, 4);
        let dp = decode_program(&m);
        let dec = Decoder::new(&dp, &g, &p).unwrap();
        let prompts = vec![vec![5, 9, 11], vec![7]];
        let out = generate(&dec, &prompts, &sampling(1.0, 6, vec![]), Format::Fp32).unwrap();
        for (prompt, c) in prompts.iter().zip(&out) {
            assert_eq!(c.tokens.len(), 6);
            assert_eq!(c.finish, Finish::Length);
            // The whole sequence through the uncached forward pass at batch 1.
            let seq: Vec<u32> = prompt.iter().chain(&c.tokens).copied().collect();
            let full = model(MICRO, 1, seq.len() as u64);
            let logits = forward_logits(&full, &p, &seq);
            let v = m.vocab as usize;
            for (j, (&tok, &lp)) in c.tokens.iter().zip(&c.logprobs).enumerate() {
                let at = prompt.len() - 1 + j;
                let want = log_prob(&logits[at * v..(at + 1) * v], tok);
                assert!(
                    (f64::from(lp) - want).abs() < 1e-4,
                    "token {j}: {lp} vs {want}"
                );
            }
        }
    }

    #[test]
    fn generation_is_seeded_and_independent_of_the_rest_of_the_batch() {
        let m = model(MICRO, 1, 4);
        let g = lower(&m).unwrap();
        let p = params(&m, 4);
        let dp = decode_program(&m);
        let dec = Decoder::new(&dp, &g, &p).unwrap();
        let s = sampling(1.0, 8, vec![]);
        let both = generate(&dec, &[vec![3, 4], vec![8, 8, 8, 8]], &s, Format::Fp32).unwrap();
        let again = generate(&dec, &[vec![3, 4], vec![8, 8, 8, 8]], &s, Format::Fp32).unwrap();
        assert_eq!(both, again, "same seed, same completions");
        let alone = generate(&dec, &[vec![3, 4]], &s, Format::Fp32).unwrap();
        assert_eq!(alone[0].tokens, both[0].tokens);
        let other = generate(
            &dec,
            &[vec![3, 4]],
            &Sampling { seed: 6, ..s },
            Format::Fp32,
        );
        assert_ne!(
            other.unwrap()[0].tokens,
            both[0].tokens,
            "another seed, other tokens"
        );
    }

    #[test]
    fn stop_sequences_end_a_completion() {
        let m = model(MICRO, 1, 4);
        let g = lower(&m).unwrap();
        let p = params(&m, 4);
        let dp = decode_program(&m);
        let dec = Decoder::new(&dp, &g, &p).unwrap();
        let greedy =
            generate(&dec, &[vec![1, 2]], &sampling(0.0, 6, vec![]), Format::Fp32).unwrap();
        let t = &greedy[0].tokens;
        let stop = vec![t[2..4].to_vec()];
        let stopped = generate(&dec, &[vec![1, 2]], &sampling(0.0, 6, stop), Format::Fp32).unwrap();
        // The first occurrence of the stop pair may end earlier than position 4.
        let c = &stopped[0];
        assert_eq!(c.finish, Finish::Stop);
        assert_eq!(c.stop_len, 2);
        assert!(
            c.tokens.len() <= 4 && t.starts_with(&c.tokens),
            "{t:?} → {:?}",
            c.tokens
        );
        assert!(c.tokens.ends_with(&t[2..4]));
        assert_eq!(c.text_tokens(), &c.tokens[..c.tokens.len() - 2]);
        assert_eq!(c.tokens.len(), c.logprobs.len());
        // A long completion ends with Finish::Context when its sequence fills the model's
        // positions: every position fed (1 prompt token, then 31 drawn ones), and the token
        // drawn after the last position is kept, as it needs no position of its own.
        let long = generate(&dec, &[vec![1]], &sampling(0.0, 100, vec![]), Format::Fp32).unwrap();
        assert_eq!(long[0].finish, Finish::Context);
        assert_eq!(long[0].tokens.len(), m.max_positions as usize);
    }
}
