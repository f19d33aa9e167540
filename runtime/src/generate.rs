//! Batched sampling on the KV-cached [`Decoder`]: temperature, top-k, top-p (nucleus), stop
//! strings, a length limit, and a seed.
//!
//! Every prompt is one sequence of the cache. Each step feeds one token to every unfinished
//! sequence: the next prompt token while its prompt lasts, then the token just drawn. A
//! sequence draws from its own PRNG stream (`seed`, sequence index), so what it generates does
//! not depend on the other prompts in the batch.
//!
//! With every completion come the model's log-probabilities of the drawn tokens (the
//! log-softmax of the logits at temperature 1, whatever the sampling temperature): what a
//! policy-gradient method needs as the sampling policy's log-probabilities.

use kiln_ir::attrs::Format;

use crate::data::Rng;
use crate::decode::{DecodeError, Decoder, KvCache};

/// How tokens are drawn.
#[derive(Clone, Debug, PartialEq)]
pub struct Sampling {
    /// Softmax temperature; 0 takes the most likely token (ties to the lower id).
    pub temperature: f64,
    /// Draw among the `top_k` most likely tokens; 0 for all.
    pub top_k: usize,
    /// Draw among the most likely tokens whose probabilities (after temperature and top-k)
    /// first reach `top_p`; 1 for all.
    pub top_p: f64,
    /// Tokens to generate at most per sequence.
    pub max_tokens: usize,
    /// Token sequences that end a completion when it ends with one (the completion keeps it;
    /// [`Completion::text_tokens`] leaves it out).
    pub stop: Vec<Vec<u32>>,
    pub seed: u64,
}

/// Why a completion ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Finish {
    /// It produced a stop sequence.
    Stop,
    /// It reached `max_tokens`.
    Length,
    /// Its sequence reached the cache's capacity (the model's positions).
    Context,
}

/// One prompt's completion.
#[derive(Clone, Debug, PartialEq)]
pub struct Completion {
    /// The generated tokens, ending with the stop sequence when `finish` is `Stop`.
    pub tokens: Vec<u32>,
    /// `log p(token)` of each generated token under the model (temperature 1).
    pub logprobs: Vec<f32>,
    pub finish: Finish,
    /// The length of the stop sequence that ends `tokens` (0 unless `finish` is `Stop`).
    pub stop_len: usize,
}

impl Completion {
    /// The generated tokens without the stop sequence: the text to show or to score.
    pub fn text_tokens(&self) -> &[u32] {
        &self.tokens[..self.tokens.len() - self.stop_len]
    }
}

/// The log-softmax of `logits` at `token`, in f64.
pub fn log_prob(logits: &[f32], token: u32) -> f64 {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let sum: f64 = logits.iter().map(|&l| (f64::from(l) - max).exp()).sum();
    f64::from(logits[token as usize]) - max - sum.ln()
}

/// Draws a token from `logits` as `s` says.
pub fn draw(logits: &[f32], s: &Sampling, rng: &mut Rng) -> u32 {
    let mut order: Vec<usize> = (0..logits.len()).collect();
    order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
    if s.temperature <= 0.0 || order.len() == 1 {
        return order[0] as u32;
    }
    let k = if s.top_k == 0 {
        order.len()
    } else {
        s.top_k.min(order.len())
    };
    let top = &order[..k];
    let max = f64::from(logits[top[0]]);
    let weights: Vec<f64> = top
        .iter()
        .map(|&i| ((f64::from(logits[i]) - max) / s.temperature).exp())
        .collect();
    let total: f64 = weights.iter().sum();
    // The nucleus: the shortest prefix whose probability reaches top_p (at least one token).
    let mut kept = weights.len();
    if s.top_p < 1.0 {
        let mut mass = 0.0;
        for (i, w) in weights.iter().enumerate() {
            mass += w / total;
            if mass >= s.top_p {
                kept = i + 1;
                break;
            }
        }
    }
    let weights = &weights[..kept];
    let total: f64 = weights.iter().sum();
    let mut x = rng.next_f64() * total;
    for (&i, w) in top.iter().zip(weights) {
        if x < *w {
            return i as u32;
        }
        x -= w;
    }
    top[kept - 1] as u32
}

/// Completes every prompt (each non-empty) in one batch; the cache stores in `format`.
pub fn generate(
    decoder: &Decoder,
    prompts: &[Vec<u32>],
    s: &Sampling,
    format: Format,
) -> Result<Vec<Completion>, DecodeError> {
    let longest = prompts.iter().map(Vec::len).max().unwrap_or(0);
    let mut cache = decoder.cache(prompts.len(), longest + s.max_tokens, format)?;
    generate_in(decoder, &mut cache, prompts, s)
}

/// [`generate`] into an existing, empty cache of at least `prompts.len()` sequences.
pub fn generate_in(
    decoder: &Decoder,
    cache: &mut KvCache,
    prompts: &[Vec<u32>],
    s: &Sampling,
) -> Result<Vec<Completion>, DecodeError> {
    if let Some(i) = prompts.iter().position(Vec::is_empty) {
        return Err(DecodeError::OutOfRange(format!(
            "prompt {i} is empty; a completion needs at least one token to follow"
        )));
    }
    let n = prompts.len();
    let mut rngs: Vec<Rng> = (0..n).map(|i| Rng::with_stream(s.seed, i as u64)).collect();
    let mut out: Vec<Completion> = (0..n)
        .map(|_| Completion {
            tokens: Vec::new(),
            logprobs: Vec::new(),
            finish: Finish::Length,
            stop_len: 0,
        })
        .collect();
    // Tokens fed per sequence: prompt tokens until the prompt is in the cache, then drawn ones.
    let mut fed = vec![0usize; n];
    let mut done = vec![s.max_tokens == 0; n];
    let mut next: Vec<u32> = prompts.iter().map(|p| p[0]).collect();
    loop {
        let rows: Vec<(usize, u32)> = (0..n).filter(|&i| !done[i]).map(|i| (i, next[i])).collect();
        if rows.is_empty() {
            break;
        }
        for &(i, _) in &rows {
            if cache.len(i) >= cache.capacity() {
                done[i] = true;
                out[i].finish = Finish::Context;
            }
        }
        let rows: Vec<(usize, u32)> = rows.into_iter().filter(|&(i, _)| !done[i]).collect();
        if rows.is_empty() {
            break;
        }
        let logits = decoder.step(cache, &rows)?;
        let vocab = logits.len() / rows.len();
        for (r, &(i, _)) in rows.iter().enumerate() {
            fed[i] += 1;
            if fed[i] < prompts[i].len() {
                next[i] = prompts[i][fed[i]];
                continue;
            }
            let l = &logits[r * vocab..(r + 1) * vocab];
            let tok = draw(l, s, &mut rngs[i]);
            let c = &mut out[i];
            c.tokens.push(tok);
            c.logprobs.push(log_prob(l, tok) as f32);
            next[i] = tok;
            if let Some(stop) = s
                .stop
                .iter()
                .find(|st| !st.is_empty() && c.tokens.ends_with(st))
            {
                c.stop_len = stop.len();
                c.finish = Finish::Stop;
                done[i] = true;
            } else if c.tokens.len() >= s.max_tokens {
                c.finish = Finish::Length;
                done[i] = true;
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sampling(temperature: f64, top_k: usize, top_p: f64) -> Sampling {
        Sampling {
            temperature,
            top_k,
            top_p,
            max_tokens: 1,
            stop: Vec::new(),
            seed: 0,
        }
    }

    #[test]
    fn drawing_respects_temperature_top_k_and_top_p() {
        let logits = [0.0f32, 3.0, 1.0, 2.9];
        let mut rng = Rng::new(1);
        assert_eq!(draw(&logits, &sampling(0.0, 0, 1.0), &mut rng), 1);
        for _ in 0..200 {
            let t = draw(&logits, &sampling(1.0, 2, 1.0), &mut rng);
            assert!(t == 1 || t == 3, "top-2 draws only the two best, got {t}");
        }
        // p(1) ≈ 0.47, p(3) ≈ 0.43: a nucleus of 0.5 holds tokens 1 and 3, one of 0.4 only 1.
        for _ in 0..200 {
            let t = draw(&logits, &sampling(1.0, 0, 0.5), &mut rng);
            assert!(t == 1 || t == 3, "top-p 0.5 keeps two tokens, got {t}");
            assert_eq!(draw(&logits, &sampling(1.0, 0, 0.4), &mut rng), 1);
        }
        let mut seen = [0usize; 4];
        for _ in 0..4000 {
            seen[draw(&logits, &sampling(1.0, 0, 1.0), &mut rng) as usize] += 1;
        }
        assert!(
            seen.iter().all(|&c| c > 0),
            "every token has a chance: {seen:?}"
        );
        assert!(seen[1] > seen[0] * 10, "{seen:?}");
    }

    #[test]
    fn log_probs_are_log_softmax() {
        let logits = [1.0f32, 2.0, 3.0];
        let z: f64 = logits.iter().map(|&l| f64::from(l).exp()).sum();
        for t in 0..3 {
            let want = f64::from(logits[t]) - z.ln();
            assert!((log_prob(&logits, t as u32) - want).abs() < 1e-12);
        }
    }
}
