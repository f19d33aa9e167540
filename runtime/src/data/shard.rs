//! Token shards in the `.bin` format of karpathy/llm.c.
//!
//! A shard is a header of 256 little-endian `i32`s followed by the tokens, little-endian:
//!
//! | header word | meaning                                                          |
//! |-------------|------------------------------------------------------------------|
//! | 0           | magic: 20240520 (GPT-2 shards) or 20240801 (Llama-3 shards)      |
//! | 1           | version: 1 with magic 20240520 (`u16` tokens), 7 with 20240801 (`u32` tokens) |
//! | 2           | the number of tokens after the header                            |
//! | 3–255       | unused; ignored when reading, zero when writing                  |
//!
//! These are the two formats llm.c's `write_datafile` produces (`dev/data/data_common.py`).
//! Every other magic or version is rejected with an error that lists the supported ones.
//!
//! The reader is strict, like llm.c's own loader: the file must be exactly the header plus the
//! declared tokens. Missing tokens (a truncated file) and bytes after the declared tokens are
//! both errors, since either means the header and the data disagree. A header that declares no
//! tokens is an error too: such a shard cannot contribute a training sequence.

use std::fmt;
use std::path::Path;

use super::error::{DataError, ShardError};

/// The number of `i32` words in a shard header.
pub const HEADER_INTS: usize = 256;

/// The size of a shard header in bytes.
pub const HEADER_BYTES: usize = HEADER_INTS * 4;

/// The two token formats of llm.c shards.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ShardFormat {
    /// GPT-2 shards: magic 20240520, version 1, `u16` tokens.
    U16,
    /// Llama-3 shards: magic 20240801, version 7, `u32` tokens.
    U32,
}

impl ShardFormat {
    /// The magic number, header word 0.
    pub fn magic(self) -> i32 {
        match self {
            ShardFormat::U16 => 20_240_520,
            ShardFormat::U32 => 20_240_801,
        }
    }

    /// The version, header word 1.
    pub fn version(self) -> i32 {
        match self {
            ShardFormat::U16 => 1,
            ShardFormat::U32 => 7,
        }
    }

    /// The size of one token in bytes.
    pub fn token_bytes(self) -> usize {
        match self {
            ShardFormat::U16 => 2,
            ShardFormat::U32 => 4,
        }
    }

    /// The largest token the format can store.
    pub fn max_token(self) -> u32 {
        match self {
            ShardFormat::U16 => u32::from(u16::MAX),
            ShardFormat::U32 => u32::MAX,
        }
    }

    /// The narrowest format that holds every id of a vocabulary of `vocab` tokens: `u16` up to
    /// 65536 tokens, else `u32`.
    pub fn for_vocab(vocab: u32) -> ShardFormat {
        if vocab <= ShardFormat::U16.max_token() + 1 {
            ShardFormat::U16
        } else {
            ShardFormat::U32
        }
    }

    /// The format a header's magic and version words select, if they are supported.
    fn from_header(magic: i32, version: i32) -> Result<ShardFormat, ShardError> {
        let format = [ShardFormat::U16, ShardFormat::U32]
            .into_iter()
            .find(|format| format.magic() == magic)
            .ok_or(ShardError::BadMagic { found: magic })?;
        if format.version() == version {
            Ok(format)
        } else {
            Err(ShardError::UnsupportedVersion { magic, version })
        }
    }
}

impl fmt::Display for ShardFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ShardFormat::U16 => "u16",
            ShardFormat::U32 => "u32",
        })
    }
}

/// Reads a shard file; errors name the file.
pub fn read_shard(path: &Path) -> Result<Vec<u32>, DataError> {
    let bytes = std::fs::read(path).map_err(|source| DataError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    parse_shard(&bytes).map_err(|error| match error {
        DataError::Shard { path: None, error } => DataError::Shard {
            path: Some(path.to_path_buf()),
            error,
        },
        other => other,
    })
}

/// Parses the bytes of a shard into its tokens. Never panics: any bytes give tokens or a
/// [`DataError::Shard`] saying what is wrong.
pub fn parse_shard(bytes: &[u8]) -> Result<Vec<u32>, DataError> {
    parse(bytes).map_err(|error| DataError::Shard { path: None, error })
}

/// [`parse_shard`] with the bare shard error.
fn parse(bytes: &[u8]) -> Result<Vec<u32>, ShardError> {
    if bytes.len() < HEADER_BYTES {
        return Err(ShardError::TooShort { len: bytes.len() });
    }
    let (header, data) = bytes.split_at(HEADER_BYTES);
    let word = |i: usize| {
        i32::from_le_bytes([
            header[4 * i],
            header[4 * i + 1],
            header[4 * i + 2],
            header[4 * i + 3],
        ])
    };
    let format = ShardFormat::from_header(word(0), word(1))?;
    let count = word(2);
    let declared = usize::try_from(count).map_err(|_| ShardError::NegativeCount { count })?;
    if declared == 0 {
        return Err(ShardError::NoTokens);
    }
    let size = format.token_bytes();
    let present = data.len() / size;
    if present < declared {
        return Err(ShardError::Truncated {
            declared,
            present,
            data_bytes: data.len(),
        });
    }
    // `declared <= present` bounds the product by `data.len()`, so it cannot overflow.
    let used = declared * size;
    if data.len() > used {
        return Err(ShardError::TrailingBytes {
            declared,
            extra: data.len() - used,
        });
    }
    Ok(match format {
        ShardFormat::U16 => data
            .chunks_exact(2)
            .map(|c| u32::from(u16::from_le_bytes([c[0], c[1]])))
            .collect(),
        ShardFormat::U32 => data
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
    })
}

/// Writes tokens as a shard in `format`, the bytes [`parse_shard`] reads back.
///
/// Refuses what a reader would refuse or what the format cannot hold: no tokens, more than
/// `i32::MAX` tokens, or (for [`ShardFormat::U16`]) a token above 65535.
pub fn write_shard(tokens: &[u32], format: ShardFormat) -> Result<Vec<u8>, DataError> {
    if tokens.is_empty() {
        return Err(DataError::Empty {
            source: "the token list to write".to_string(),
        });
    }
    let count = i32::try_from(tokens.len()).map_err(|_| DataError::TooManyTokens {
        count: tokens.len(),
    })?;
    if let Some(&token) = tokens.iter().find(|&&t| t > format.max_token()) {
        return Err(DataError::TokenOutOfRange { token, format });
    }
    let mut header = [0i32; HEADER_INTS];
    header[0] = format.magic();
    header[1] = format.version();
    header[2] = count;
    let mut bytes = Vec::with_capacity(HEADER_BYTES + tokens.len() * format.token_bytes());
    for word in header {
        bytes.extend_from_slice(&word.to_le_bytes());
    }
    for &token in tokens {
        match format {
            // The range check above makes this conversion lossless.
            ShardFormat::U16 => bytes.extend_from_slice(&(token as u16).to_le_bytes()),
            ShardFormat::U32 => bytes.extend_from_slice(&token.to_le_bytes()),
        }
    }
    Ok(bytes)
}

/// One shard of a token stream cut by [`shard_pieces`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShardPiece {
    /// `"val"` or `"train"`.
    pub split: &'static str,
    /// The shard's number within its split, from 0.
    pub index: usize,
    /// Its tokens' positions in the stream.
    pub range: std::ops::Range<usize>,
}

impl ShardPiece {
    /// The shard's file name for a corpus named `stem`: `{stem}_{split}_{index:06}.bin`
    /// (llm.c's convention; the loader takes a name containing `val` as validation).
    pub fn file_name(&self, stem: &str) -> String {
        format!("{stem}_{}_{:06}.bin", self.split, self.index)
    }
}

/// Cuts a stream of `n` tokens into shards: the last `round(n × val_fraction)` tokens
/// ([`super::held_out`], the rule `kiln train` splits text by) are validation, the rest
/// training, and each side is cut into shards of at most `shard_tokens` tokens, in order.
/// Validation comes first, as in llm.c. A side with no tokens has no shards.
pub fn shard_pieces(n: usize, val_fraction: f64, shard_tokens: usize) -> Vec<ShardPiece> {
    let val = super::held_out(n, val_fraction);
    let size = shard_tokens.max(1);
    let cut = |split: &'static str, range: std::ops::Range<usize>| {
        (0..range.len().div_ceil(size)).map(move |index| {
            let start = range.start + index * size;
            ShardPiece {
                split,
                index,
                range: start..(start + size).min(range.end),
            }
        })
    };
    cut("val", n - val..n)
        .chain(cut("train", 0..n - val))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A header with the given words 0..3 and nothing after it.
    fn header(magic: i32, version: i32, count: i32) -> Vec<u8> {
        let mut bytes = vec![0u8; HEADER_BYTES];
        bytes[0..4].copy_from_slice(&magic.to_le_bytes());
        bytes[4..8].copy_from_slice(&version.to_le_bytes());
        bytes[8..12].copy_from_slice(&count.to_le_bytes());
        bytes
    }

    /// The shard error of `bytes`, failing the test if they parse.
    fn shard_error(bytes: &[u8]) -> ShardError {
        match parse_shard(bytes) {
            Err(DataError::Shard { path: None, error }) => error,
            other => panic!("expected a shard error, got {other:?}"),
        }
    }

    #[test]
    fn pieces_hold_out_the_tail_and_respect_the_shard_size() {
        let pieces = shard_pieces(25, 0.2, 10);
        let expect = |split, index, range| ShardPiece {
            split,
            index,
            range,
        };
        assert_eq!(
            pieces,
            [
                expect("val", 0, 20..25),
                expect("train", 0, 0..10),
                expect("train", 1, 10..20),
            ]
        );
        assert_eq!(pieces[0].file_name("corpus"), "corpus_val_000000.bin");
        assert_eq!(pieces[2].file_name("corpus"), "corpus_train_000001.bin");
        // No validation fraction: training shards only; a fraction rounding to all tokens:
        // validation only.
        assert!(shard_pieces(7, 0.0, 3).iter().all(|p| p.split == "train"));
        assert_eq!(shard_pieces(7, 0.0, 3).len(), 3);
        assert!(shard_pieces(7, 0.99, 100).iter().all(|p| p.split == "val"));
        assert!(shard_pieces(0, 0.1, 100).is_empty());
    }

    #[test]
    fn the_narrowest_format_holds_the_vocabulary() {
        assert_eq!(ShardFormat::for_vocab(50_257), ShardFormat::U16);
        assert_eq!(ShardFormat::for_vocab(65_536), ShardFormat::U16);
        assert_eq!(ShardFormat::for_vocab(65_537), ShardFormat::U32);
        assert_eq!(ShardFormat::for_vocab(128_256), ShardFormat::U32);
    }

    #[test]
    fn round_trips_both_formats() {
        let tokens: Vec<u32> = vec![0, 1, 255, 256, 50_256, 65_535];
        for format in [ShardFormat::U16, ShardFormat::U32] {
            let bytes = write_shard(&tokens, format).expect("in range");
            assert_eq!(
                bytes.len(),
                HEADER_BYTES + tokens.len() * format.token_bytes()
            );
            assert_eq!(parse_shard(&bytes).expect("valid"), tokens);
        }
        let wide = vec![7, 128_000, u32::MAX - 1];
        let bytes = write_shard(&wide, ShardFormat::U32).expect("in range");
        assert_eq!(parse_shard(&bytes).expect("valid"), wide);
    }

    #[test]
    fn writes_the_llm_c_header() {
        let bytes = write_shard(&[1, 2, 3], ShardFormat::U16).expect("in range");
        assert_eq!(&bytes[..12], &header(20_240_520, 1, 3)[..12]);
        assert!(bytes[12..HEADER_BYTES].iter().all(|&b| b == 0));
        assert_eq!(&bytes[HEADER_BYTES..], &[1, 0, 2, 0, 3, 0]);
        let bytes = write_shard(&[1], ShardFormat::U32).expect("in range");
        assert_eq!(&bytes[..12], &header(20_240_801, 7, 1)[..12]);
        assert_eq!(&bytes[HEADER_BYTES..], &[1, 0, 0, 0]);
    }

    #[test]
    fn write_refuses_what_cannot_be_stored() {
        assert!(matches!(
            write_shard(&[1, 65_536], ShardFormat::U16),
            Err(DataError::TokenOutOfRange {
                token: 65_536,
                format: ShardFormat::U16
            })
        ));
        assert!(matches!(
            write_shard(&[], ShardFormat::U32),
            Err(DataError::Empty { .. })
        ));
    }

    #[test]
    fn too_short() {
        assert_eq!(shard_error(&[]), ShardError::TooShort { len: 0 });
        assert_eq!(
            shard_error(&[0; HEADER_BYTES - 1]),
            ShardError::TooShort {
                len: HEADER_BYTES - 1
            }
        );
    }

    #[test]
    fn wrong_magic_suggests_raw_text() {
        let mut text = b"Once upon a time ".repeat(100);
        text.truncate(HEADER_BYTES + 10);
        let error = shard_error(&text);
        assert_eq!(
            error,
            ShardError::BadMagic {
                found: i32::from_le_bytes(*b"Once")
            }
        );
        let message = error.to_string();
        assert!(message.contains("\"Once\""), "{message}");
        assert!(message.contains("expected 20240520"), "{message}");
        assert!(message.contains("raw text"), "{message}");
    }

    #[test]
    fn unsupported_versions() {
        for (magic, version) in [
            (20_240_520, 2),
            (20_240_520, 7),
            (20_240_801, 1),
            (20_240_520, 0),
        ] {
            let mut bytes = header(magic, version, 1);
            bytes.extend_from_slice(&[0; 4]);
            assert_eq!(
                shard_error(&bytes),
                ShardError::UnsupportedVersion { magic, version }
            );
        }
        let message = ShardError::UnsupportedVersion {
            magic: 20_240_520,
            version: 2,
        }
        .to_string();
        assert!(message.contains("version 2 is not supported"), "{message}");
    }

    #[test]
    fn negative_and_zero_counts() {
        assert_eq!(
            shard_error(&header(20_240_520, 1, -3)),
            ShardError::NegativeCount { count: -3 }
        );
        assert_eq!(shard_error(&header(20_240_520, 1, 0)), ShardError::NoTokens);
    }

    #[test]
    fn truncated_says_declared_and_present() {
        let mut bytes = header(20_240_520, 1, 10);
        bytes.extend_from_slice(&[0; 7]);
        let error = shard_error(&bytes);
        assert_eq!(
            error,
            ShardError::Truncated {
                declared: 10,
                present: 3,
                data_bytes: 7
            }
        );
        let message = error.to_string();
        assert!(
            message.contains("declares 10 tokens but only 3"),
            "{message}"
        );
        // The largest count a header can declare must not overflow anything.
        assert!(matches!(
            shard_error(&header(20_240_801, 7, i32::MAX)),
            ShardError::Truncated { .. }
        ));
    }

    #[test]
    fn trailing_bytes_are_an_error() {
        let mut bytes = write_shard(&[1, 2], ShardFormat::U16).expect("in range");
        bytes.push(0);
        assert_eq!(
            shard_error(&bytes),
            ShardError::TrailingBytes {
                declared: 2,
                extra: 1
            }
        );
        let mut bytes = write_shard(&[1, 2], ShardFormat::U32).expect("in range");
        bytes.extend_from_slice(&[0; 8]);
        assert_eq!(
            shard_error(&bytes),
            ShardError::TrailingBytes {
                declared: 2,
                extra: 8
            }
        );
    }

    #[test]
    fn read_shard_names_the_file() {
        let dir = crate::data::testing::TempDir::new("shard");
        let path = dir.write("story.bin", b"not a shard");
        let error = read_shard(&path).expect_err("too short");
        assert!(error.to_string().contains("story.bin"), "{error}");
        assert!(matches!(
            error,
            DataError::Shard {
                path: Some(_),
                error: ShardError::TooShort { len: 11 }
            }
        ));
        let missing = read_shard(&dir.path().join("missing.bin")).expect_err("missing");
        assert!(matches!(missing, DataError::Io { .. }));
        assert!(missing.to_string().contains("missing.bin"), "{missing}");
    }

    mod no_panic {
        use super::super::*;
        use proptest::prelude::*;

        proptest! {
            #[test]
            fn arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
                let _ = parse_shard(&bytes);
            }

            #[test]
            fn valid_headers_with_arbitrary_counts_and_data(
                u32_tokens in any::<bool>(),
                count in any::<i32>(),
                small_count in -2i32..600,
                use_small in any::<bool>(),
                data in proptest::collection::vec(any::<u8>(), 0..1200),
            ) {
                let format = if u32_tokens { ShardFormat::U32 } else { ShardFormat::U16 };
                let count = if use_small { small_count } else { count };
                let mut bytes = Vec::with_capacity(HEADER_BYTES + data.len());
                for word in [format.magic(), format.version(), count] {
                    bytes.extend_from_slice(&word.to_le_bytes());
                }
                bytes.resize(HEADER_BYTES, 0);
                bytes.extend_from_slice(&data);
                if let Ok(tokens) = parse_shard(&bytes) {
                    prop_assert_eq!(tokens.len() * format.token_bytes(), data.len());
                    prop_assert_eq!(Ok(tokens.len()), usize::try_from(count));
                }
            }
        }
    }
}
