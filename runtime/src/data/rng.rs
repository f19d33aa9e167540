//! A small deterministic pseudo-random number generator.
//!
//! [`Rng`] is PCG32 (M. E. O'Neill's permuted congruential generator, the XSH-RR 64/32
//! variant): a 64-bit linear congruential state and an odd 64-bit increment that selects one
//! of 2^63 independent streams, with a 32-bit output permutation. It is small, fast, has no
//! dependencies, and its whole state is two `u64`s, so a checkpoint can save it with
//! [`Rng::state`] and resume bit-identically with [`Rng::from_state`].
//!
//! The data pipeline uses it for the built-in corpus and for batch sampling; the training loop
//! reuses it for initialization and sampling. It is not cryptographically secure.

/// The multiplier of the underlying 64-bit linear congruential generator (PCG's default).
const MULTIPLIER: u64 = 6_364_136_223_846_793_005;

/// A deterministic PCG32 generator; the same seed and stream always give the same sequence.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rng {
    /// The LCG state, advanced once per 32-bit output.
    state: u64,
    /// The LCG increment; always odd.
    inc: u64,
}

impl Rng {
    /// Creates a generator from a seed, on stream 0.
    ///
    /// Nearby seeds (0, 1, 2, …) give unrelated sequences: the seed is mixed with SplitMix64's
    /// finalizer before it becomes PCG's initial state.
    pub fn new(seed: u64) -> Rng {
        Rng::with_stream(seed, 0)
    }

    /// Creates a generator from a seed on one of 2^63 streams.
    ///
    /// Different streams of the same seed are independent sequences, so one user seed can feed
    /// several consumers (initialization, data order, sampling) without them sharing numbers.
    /// Only the low 63 bits of `stream` matter.
    pub fn with_stream(seed: u64, stream: u64) -> Rng {
        Rng::from_pcg_seed(mix64(seed), stream)
    }

    /// Seeds exactly like the reference `pcg32_srandom_r(initstate, initseq)`.
    fn from_pcg_seed(initstate: u64, initseq: u64) -> Rng {
        let mut rng = Rng {
            state: 0,
            inc: (initseq << 1) | 1,
        };
        rng.step();
        rng.state = rng.state.wrapping_add(initstate);
        rng.step();
        rng
    }

    /// Rebuilds a generator from a value of [`Rng::state`]; it continues the saved sequence.
    ///
    /// The second word is the increment, which PCG requires to be odd; its lowest bit is set
    /// here, so every `[u64; 2]` gives a valid generator (states from [`Rng::state`] are
    /// unchanged by this).
    pub fn from_state(state: [u64; 2]) -> Rng {
        Rng {
            state: state[0],
            inc: state[1] | 1,
        }
    }

    /// The whole generator state, for checkpoints: `[lcg_state, increment]`.
    pub fn state(&self) -> [u64; 2] {
        [self.state, self.inc]
    }

    /// Advances the LCG by one step.
    fn step(&mut self) {
        self.state = self.state.wrapping_mul(MULTIPLIER).wrapping_add(self.inc);
    }

    /// The next uniformly distributed `u32`.
    pub fn next_u32(&mut self) -> u32 {
        let old = self.state;
        self.step();
        let xorshifted = (((old >> 18) ^ old) >> 27) as u32;
        let rotation = (old >> 59) as u32;
        xorshifted.rotate_right(rotation)
    }

    /// The next uniformly distributed `u64` (two 32-bit outputs, the first one high).
    pub fn next_u64(&mut self) -> u64 {
        let high = u64::from(self.next_u32());
        let low = u64::from(self.next_u32());
        (high << 32) | low
    }

    /// A uniformly distributed `f64` in `[0, 1)`, with 53 random bits.
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// A uniformly distributed integer in `0..n`, without modulo bias.
    ///
    /// This is Lemire's multiply-and-reject method: it draws one `u64` in the common case and
    /// redraws only when the draw falls into the biased sliver of the range.
    ///
    /// # Panics
    ///
    /// Panics if `n` is 0, since the range `0..0` is empty. The data pipeline checks its sizes
    /// before it samples, so no input file can reach this.
    pub fn below(&mut self, n: u64) -> u64 {
        assert!(n > 0, "Rng::below(0): the range 0..0 is empty");
        let mut product = u128::from(self.next_u64()) * u128::from(n);
        if (product as u64) < n {
            // The draws whose low half is below 2^64 mod n are the surplus that would bias the
            // result; reject them and draw again.
            let threshold = n.wrapping_neg() % n;
            while (product as u64) < threshold {
                product = u128::from(self.next_u64()) * u128::from(n);
            }
        }
        (product >> 64) as u64
    }

    /// [`Rng::below`] for `usize` ranges, such as indices into a slice.
    ///
    /// # Panics
    ///
    /// Panics if `n` is 0, like [`Rng::below`].
    pub fn below_usize(&mut self, n: usize) -> usize {
        // A usize is at most 64 bits wide on every supported target, so both conversions are
        // lossless: the result is below n.
        self.below(n as u64) as usize
    }
}

/// SplitMix64's finalizer: a fixed bijection of `u64` that scatters nearby inputs.
///
/// Used to turn small seeds into well-mixed PCG states and as the hash behind the held-out
/// rule of the built-in arithmetic problems, which must never change.
pub(crate) fn mix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_the_pcg32_reference_output() {
        // The first outputs of the reference implementation's demo, seeded with
        // pcg32_srandom_r(&rng, 42, 54).
        let mut rng = Rng::from_pcg_seed(42, 54);
        let expected = [
            0xa15c_02b7,
            0x7b47_f409,
            0xba1d_3330,
            0x83d2_f293,
            0xbfa4_784b,
            0xcbed_606e,
        ];
        for want in expected {
            assert_eq!(rng.next_u32(), want);
        }
    }

    #[test]
    fn same_seed_same_sequence_and_different_seeds_differ() {
        let draw = |seed: u64| {
            let mut rng = Rng::new(seed);
            (0..64).map(|_| rng.next_u64()).collect::<Vec<_>>()
        };
        assert_eq!(draw(7), draw(7));
        assert_ne!(draw(7), draw(8));
        assert_ne!(draw(0), draw(1));
    }

    #[test]
    fn streams_are_different_sequences() {
        let mut a = Rng::with_stream(3, 0);
        let mut b = Rng::with_stream(3, 1);
        let a: Vec<u32> = (0..16).map(|_| a.next_u32()).collect();
        let b: Vec<u32> = (0..16).map(|_| b.next_u32()).collect();
        assert_ne!(a, b);
        assert_eq!(Rng::new(3), Rng::with_stream(3, 0));
    }

    #[test]
    fn state_round_trip_resumes_the_sequence() {
        let mut rng = Rng::new(99);
        for _ in 0..10 {
            rng.next_u32();
        }
        let saved = rng.state();
        let expected: Vec<u64> = (0..20).map(|_| rng.next_u64()).collect();
        let mut resumed = Rng::from_state(saved);
        let got: Vec<u64> = (0..20).map(|_| resumed.next_u64()).collect();
        assert_eq!(got, expected);
        // Any pair of words is a valid state: an even increment is made odd.
        let mut odd = Rng::from_state([5, 4]);
        assert_eq!(odd.state()[1], 5);
        odd.next_u32();
    }

    #[test]
    fn below_stays_in_range_and_is_roughly_uniform() {
        let mut rng = Rng::new(1);
        for n in [1u64, 2, 3, 7, 10, 1000, u64::MAX, (1 << 63) + 1] {
            for _ in 0..1000 {
                assert!(rng.below(n) < n);
            }
        }
        // Ten buckets, 100_000 draws: each expects 10_000 with a standard deviation of about
        // 95, so ±600 is a generous bound that still catches a real bias.
        let mut counts = [0u32; 10];
        for _ in 0..100_000 {
            counts[rng.below_usize(10)] += 1;
        }
        for count in counts {
            assert!((9_400..=10_600).contains(&count), "{counts:?}");
        }
        // A range just above 2^63 is where modulo reduction would be most biased: about
        // half of the draws would fall into the low half of the range. An unbiased draw lands
        // in the upper half about half of the time.
        let n = (1u64 << 63) + (1 << 62);
        let upper = (0..10_000).filter(|_| rng.below(n) >= n / 2).count();
        assert!((4_700..=5_300).contains(&upper), "{upper}");
    }

    #[test]
    fn next_f64_is_in_the_unit_interval() {
        let mut rng = Rng::new(5);
        let mut sum = 0.0;
        for _ in 0..10_000 {
            let x = rng.next_f64();
            assert!((0.0..1.0).contains(&x));
            sum += x;
        }
        let mean = sum / 10_000.0;
        assert!((0.48..0.52).contains(&mean), "{mean}");
    }
}
