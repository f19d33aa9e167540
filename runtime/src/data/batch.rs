//! Batches of next-token-prediction examples.
//!
//! A batch holds `rows` sequences of `seq_len` input tokens, row-major, and the targets: the
//! same windows shifted by one token, so `targets[i]` is the token that follows `inputs[i]`.
//!
//! - [`Batcher`] draws training batches: each row is a window of `seq_len + 1` tokens starting
//!   at a uniformly random position, independently of the other rows. The order depends only
//!   on the seed, and the generator state can be saved and restored for checkpoints.
//! - [`val_batches`] walks a validation split once, in order, with non-overlapping rows.

use super::error::DataError;
use super::rng::Rng;

/// The PRNG stream a [`Batcher`] draws from, so that batches do not reuse the numbers that
/// `Rng::new(seed)` gives other consumers of the same seed (such as initialization).
pub const BATCH_STREAM: u64 = 1;

/// A batch of `rows` × `seq_len` inputs and their next-token targets.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Batch {
    /// Input tokens, `rows * seq_len`, row-major.
    pub inputs: Vec<u32>,
    /// Target tokens: each input's successor in the data, same layout.
    pub targets: Vec<u32>,
    /// The number of sequences; the batch size, except possibly in the last validation batch.
    pub rows: usize,
    /// The sequence length.
    pub seq_len: usize,
}

impl Batch {
    /// Rows `first..first + n`: a data-parallel rank's share, or one micro-batch.
    pub fn rows_range(&self, first: usize, n: usize) -> Batch {
        let width = self.inputs.len() / self.rows.max(1);
        let cut = |v: &[u32]| v[first * width..(first + n) * width].to_vec();
        Batch {
            inputs: cut(&self.inputs),
            targets: cut(&self.targets),
            rows: n,
            seq_len: self.seq_len,
        }
    }
}

/// Checks the batch shape against the token count.
fn check_shape(tokens: usize, batch_size: usize, seq_len: usize) -> Result<(), DataError> {
    if batch_size == 0 {
        return Err(DataError::InvalidArgument {
            name: "batch_size",
            value: "0".to_string(),
            expected: "at least 1",
        });
    }
    if seq_len == 0 {
        return Err(DataError::InvalidArgument {
            name: "seq_len",
            value: "0".to_string(),
            expected: "at least 1",
        });
    }
    if batch_size.checked_mul(seq_len).is_none() {
        return Err(DataError::InvalidArgument {
            name: "batch_size",
            value: batch_size.to_string(),
            expected: "batch_size × seq_len within the address space",
        });
    }
    let needed = seq_len.saturating_add(1);
    if tokens < needed {
        return Err(DataError::TooFewTokens {
            tokens,
            needed,
            seq_len,
        });
    }
    Ok(())
}

/// Draws random training batches from a token sequence.
///
/// `D` is anything that views as a token slice: a borrowed `&[u32]`, an owned `Vec<u32>` (the
/// default, e.g. a [`super::Dataset`]'s `train` moved in), or a shared `Arc<[u32]>`.
#[derive(Clone, Debug)]
pub struct Batcher<D = Vec<u32>> {
    /// The tokens batches are drawn from.
    tokens: D,
    /// Rows per batch.
    batch_size: usize,
    /// Input tokens per row.
    seq_len: usize,
    /// The generator of window positions.
    rng: Rng,
}

/// The state [`Batcher::state`] reports for a fresh batcher seeded with `seed`: what a run
/// that has not drawn a batch yet stores in its checkpoint.
pub fn initial_batch_state(seed: u64) -> [u64; 2] {
    Rng::with_stream(seed, BATCH_STREAM).state()
}

impl<D: AsRef<[u32]>> Batcher<D> {
    /// A batcher of `batch_size` rows of `seq_len` tokens, seeded with `seed`.
    ///
    /// Errors if either size is 0 or if there are fewer than `seq_len + 1` tokens.
    pub fn new(
        tokens: D,
        batch_size: usize,
        seq_len: usize,
        seed: u64,
    ) -> Result<Batcher<D>, DataError> {
        check_shape(tokens.as_ref().len(), batch_size, seq_len)?;
        Ok(Batcher {
            tokens,
            batch_size,
            seq_len,
            rng: Rng::with_stream(seed, BATCH_STREAM),
        })
    }

    /// The next batch: `batch_size` windows of `seq_len + 1` tokens at uniformly random
    /// starts (every start from 0 to `len - seq_len - 1` is equally likely; windows may
    /// overlap).
    pub fn next_batch(&mut self) -> Batch {
        let tokens = self.tokens.as_ref();
        let t = self.seq_len;
        let starts = tokens.len() - t;
        let mut inputs = Vec::with_capacity(self.batch_size * t);
        let mut targets = Vec::with_capacity(self.batch_size * t);
        for _ in 0..self.batch_size {
            let start = self.rng.below_usize(starts);
            inputs.extend_from_slice(&tokens[start..start + t]);
            targets.extend_from_slice(&tokens[start + 1..start + t + 1]);
        }
        Batch {
            inputs,
            targets,
            rows: self.batch_size,
            seq_len: t,
        }
    }

    /// The generator state, for a checkpoint: restoring it makes the following batches equal
    /// those an uninterrupted batcher would draw.
    pub fn state(&self) -> [u64; 2] {
        self.rng.state()
    }

    /// Continues from a state saved by [`Batcher::state`].
    pub fn restore(&mut self, state: [u64; 2]) {
        self.rng = Rng::from_state(state);
    }

    /// Rows per batch.
    pub fn batch_size(&self) -> usize {
        self.batch_size
    }

    /// Input tokens per row.
    pub fn seq_len(&self) -> usize {
        self.seq_len
    }

    /// The tokens batches are drawn from.
    pub fn tokens(&self) -> &[u32] {
        self.tokens.as_ref()
    }
}

/// The validation batches of `tokens`, in order, covering the split once.
///
/// Row `r` (counting across batches) has the inputs `tokens[r*T .. r*T + T]` and the targets
/// one token further, so rows do not overlap and there are `(len - 1) / T` of them. Batches
/// take `batch_size` rows each; the last batch has fewer rows (see [`Batch::rows`]) when the
/// rows do not divide evenly. The final `(len - 1) % T` tokens, too few for a row, are not
/// evaluated.
///
/// Errors if either size is 0 or if there are fewer than `seq_len + 1` tokens.
pub fn val_batches(
    tokens: &[u32],
    batch_size: usize,
    seq_len: usize,
) -> Result<ValBatches<'_>, DataError> {
    check_shape(tokens.len(), batch_size, seq_len)?;
    Ok(ValBatches {
        tokens,
        batch_size,
        seq_len,
        next_row: 0,
        rows: (tokens.len() - 1) / seq_len,
    })
}

/// The iterator of [`val_batches`].
#[derive(Clone, Debug)]
pub struct ValBatches<'a> {
    /// The validation tokens.
    tokens: &'a [u32],
    /// Rows per full batch.
    batch_size: usize,
    /// Input tokens per row.
    seq_len: usize,
    /// The first row of the next batch.
    next_row: usize,
    /// The number of rows in the split.
    rows: usize,
}

impl Iterator for ValBatches<'_> {
    type Item = Batch;

    fn next(&mut self) -> Option<Batch> {
        if self.next_row >= self.rows {
            return None;
        }
        let rows = self.batch_size.min(self.rows - self.next_row);
        let t = self.seq_len;
        let start = self.next_row * t;
        let end = start + rows * t;
        self.next_row += rows;
        Some(Batch {
            inputs: self.tokens[start..end].to_vec(),
            targets: self.tokens[start + 1..end + 1].to_vec(),
            rows,
            seq_len: t,
        })
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let left = (self.rows - self.next_row).div_ceil(self.batch_size);
        (left, Some(left))
    }
}

impl ExactSizeIterator for ValBatches<'_> {}

#[cfg(test)]
mod tests {
    use super::*;

    /// Tokens equal to their positions, so a window shows where it came from.
    fn positions(n: u32) -> Vec<u32> {
        (0..n).collect()
    }

    #[test]
    fn batches_are_shifted_windows_in_bounds() {
        let tokens = positions(1000);
        let mut batcher = Batcher::new(&tokens[..], 4, 16, 1).expect("enough tokens");
        for _ in 0..200 {
            let batch = batcher.next_batch();
            assert_eq!((batch.rows, batch.seq_len), (4, 16));
            assert_eq!(batch.inputs.len(), 64);
            assert_eq!(batch.targets.len(), 64);
            for row in 0..4 {
                let inputs = &batch.inputs[row * 16..(row + 1) * 16];
                let targets = &batch.targets[row * 16..(row + 1) * 16];
                let start = inputs[0];
                assert!(start as usize + 16 < 1000);
                for i in 0..16 {
                    assert_eq!(inputs[i], start + i as u32);
                    assert_eq!(targets[i], inputs[i] + 1);
                }
            }
        }
    }

    #[test]
    fn every_start_is_reachable() {
        // With 5 tokens and T = 2 the starts are 0, 1 and 2.
        let tokens = positions(5);
        let mut batcher = Batcher::new(tokens, 1, 2, 9).expect("enough tokens");
        let mut seen = [false; 3];
        for _ in 0..200 {
            seen[batcher.next_batch().inputs[0] as usize] = true;
        }
        assert_eq!(seen, [true; 3]);
        // Exactly T + 1 tokens: the only window is the whole sequence.
        let mut batcher = Batcher::new(vec![7, 8, 9], 2, 2, 0).expect("enough tokens");
        let batch = batcher.next_batch();
        assert_eq!(batch.inputs, [7, 8, 7, 8]);
        assert_eq!(batch.targets, [8, 9, 8, 9]);
    }

    #[test]
    fn same_seed_same_batches_and_different_seeds_differ() {
        let tokens = positions(10_000);
        let draw = |seed| {
            let mut batcher = Batcher::new(&tokens[..], 8, 32, seed).expect("enough tokens");
            (0..10).map(|_| batcher.next_batch()).collect::<Vec<_>>()
        };
        assert_eq!(draw(5), draw(5));
        assert_ne!(draw(5), draw(6));
    }

    #[test]
    fn restore_continues_the_uninterrupted_sequence() {
        let tokens = positions(10_000);
        let mut uninterrupted = Batcher::new(&tokens[..], 4, 8, 42).expect("enough tokens");
        let expected: Vec<Batch> = (0..20).map(|_| uninterrupted.next_batch()).collect();

        let mut first = Batcher::new(&tokens[..], 4, 8, 42).expect("enough tokens");
        for batch in &expected[..7] {
            assert_eq!(&first.next_batch(), batch);
        }
        let saved = first.state();
        // A new batcher with another seed, restored from the checkpoint, picks up exactly
        // where the first one stopped.
        let mut resumed = Batcher::new(tokens.clone(), 4, 8, 999).expect("enough tokens");
        resumed.restore(saved);
        for batch in &expected[7..] {
            assert_eq!(&resumed.next_batch(), batch);
        }
    }

    #[test]
    fn shape_errors() {
        let tokens = positions(10);
        assert!(matches!(
            Batcher::new(&tokens[..], 1, 10, 0),
            Err(DataError::TooFewTokens {
                tokens: 10,
                needed: 11,
                seq_len: 10
            })
        ));
        assert!(Batcher::new(&tokens[..], 1, 9, 0).is_ok());
        assert!(matches!(
            Batcher::new(&tokens[..], 0, 4, 0),
            Err(DataError::InvalidArgument {
                name: "batch_size",
                ..
            })
        ));
        assert!(matches!(
            Batcher::new(&tokens[..], 1, 0, 0),
            Err(DataError::InvalidArgument {
                name: "seq_len",
                ..
            })
        ));
        assert!(matches!(
            Batcher::new(&tokens[..], usize::MAX, 2, 0),
            Err(DataError::InvalidArgument { .. })
        ));
        assert!(matches!(
            Batcher::new(&tokens[..], 1, usize::MAX, 0),
            Err(DataError::TooFewTokens { .. })
        ));
        assert!(matches!(
            val_batches(&tokens, 1, 10),
            Err(DataError::TooFewTokens { .. })
        ));
        let message = val_batches(&tokens, 1, 10)
            .expect_err("too few")
            .to_string();
        assert!(
            message.contains("10 tokens") && message.contains("11"),
            "{message}"
        );
    }

    #[test]
    fn val_batches_cover_the_split_once() {
        for (n, b, t) in [
            (101, 4, 5),
            (100, 4, 5),
            (11, 3, 10),
            (1000, 7, 13),
            (2, 1, 1),
        ] {
            let tokens = positions(n);
            let batches: Vec<Batch> = val_batches(&tokens, b, t).expect("enough").collect();
            let rows = (n as usize - 1) / t;
            assert_eq!(batches.len(), rows.div_ceil(b));
            assert_eq!(
                val_batches(&tokens, b, t).expect("enough").len(),
                batches.len()
            );
            let inputs: Vec<u32> = batches.iter().flat_map(|x| x.inputs.clone()).collect();
            let targets: Vec<u32> = batches.iter().flat_map(|x| x.targets.clone()).collect();
            // The inputs are the split's first rows × T tokens, each exactly once, and the
            // targets are the same span shifted by one.
            assert_eq!(inputs, tokens[..rows * t]);
            assert_eq!(targets, tokens[1..rows * t + 1]);
            for (i, batch) in batches.iter().enumerate() {
                assert_eq!(batch.seq_len, t);
                assert_eq!(batch.inputs.len(), batch.rows * t);
                if i + 1 < batches.len() {
                    assert_eq!(batch.rows, b);
                } else {
                    assert!((1..=b).contains(&batch.rows));
                }
                // Row boundaries: each row's targets are its inputs shifted by one.
                for row in 0..batch.rows {
                    for j in 0..t {
                        let k = row * t + j;
                        assert_eq!(batch.targets[k], batch.inputs[k] + 1);
                    }
                }
            }
        }
    }
}
