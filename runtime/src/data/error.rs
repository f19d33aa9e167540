//! The errors of the data pipeline: each names the file or value at fault and says what to do.

use std::fmt;
use std::io;
use std::path::PathBuf;

use super::shard::{ShardFormat, HEADER_BYTES};

/// Why data could not be found, read, split or batched.
#[derive(Debug)]
#[non_exhaustive]
pub enum DataError {
    /// Reading a file or listing a directory failed.
    Io {
        /// The file or directory.
        path: PathBuf,
        /// What the operating system reported.
        source: io::Error,
    },
    /// A path names nothing.
    NotFound {
        /// The missing path.
        path: PathBuf,
    },
    /// A directory was given where a file was expected.
    IsDirectory {
        /// The directory.
        path: PathBuf,
    },
    /// A glob pattern matched no file.
    NoMatch {
        /// The pattern as given.
        pattern: String,
    },
    /// A glob pattern this module cannot expand.
    BadPattern {
        /// The pattern as given.
        pattern: String,
        /// What is wrong with it.
        reason: String,
    },
    /// Bytes that are not a valid llm.c token shard.
    Shard {
        /// The file, when the bytes came from one.
        path: Option<PathBuf>,
        /// What is wrong with the bytes.
        error: ShardError,
    },
    /// A token that the chosen shard format cannot store.
    TokenOutOfRange {
        /// The token.
        token: u32,
        /// The format it was to be written in.
        format: ShardFormat,
    },
    /// Too many tokens for one shard: the header stores the count as an `i32`.
    TooManyTokens {
        /// The number of tokens.
        count: usize,
    },
    /// A source holds no tokens at all.
    Empty {
        /// The source, described for people.
        source: String,
    },
    /// A train/validation split would leave one side empty.
    EmptySplit {
        /// The empty side: `"train"` or `"validation"`.
        split: &'static str,
        /// The source, described for people.
        source: String,
        /// Why it is empty.
        reason: String,
    },
    /// Fewer tokens than one sequence needs.
    TooFewTokens {
        /// How many tokens there are.
        tokens: usize,
        /// How many one sequence (`seq_len + 1`) needs.
        needed: usize,
        /// The sequence length asked for.
        seq_len: usize,
    },
    /// A token id so large that `1 + id` does not fit the vocabulary size type.
    VocabOverflow {
        /// The source, described for people.
        source: String,
    },
    /// A `tokenizer.json` that cannot be read or parsed, or that fails on some text.
    Tokenizer {
        /// The tokenizer file, described for people.
        tokenizer: String,
        /// What the tokenizers library reported.
        reason: String,
    },
    /// Text for a tokenizer that is not UTF-8.
    NotUtf8 {
        /// The text, described for people (usually a file name).
        source: String,
        /// The byte offset of the first invalid byte.
        offset: usize,
    },
    /// A parameter outside its valid range.
    InvalidArgument {
        /// The parameter.
        name: &'static str,
        /// Its value, as written by `Debug`.
        value: String,
        /// The valid range.
        expected: &'static str,
    },
}

/// What is wrong with the bytes of a token shard.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ShardError {
    /// Fewer bytes than the 1024-byte header.
    TooShort {
        /// The number of bytes.
        len: usize,
    },
    /// The first header word is not a known magic number.
    BadMagic {
        /// The first header word.
        found: i32,
    },
    /// A known magic number with a version this reader does not support.
    UnsupportedVersion {
        /// The magic number.
        magic: i32,
        /// The version word.
        version: i32,
    },
    /// A negative token count in the header.
    NegativeCount {
        /// The count as stored.
        count: i32,
    },
    /// A header that declares zero tokens.
    NoTokens,
    /// Fewer tokens after the header than it declares.
    Truncated {
        /// The declared token count.
        declared: usize,
        /// The whole tokens present.
        present: usize,
        /// The bytes after the header.
        data_bytes: usize,
    },
    /// Bytes after the declared tokens.
    TrailingBytes {
        /// The declared token count.
        declared: usize,
        /// The number of surplus bytes.
        extra: usize,
    },
}

impl fmt::Display for DataError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DataError::Io { path, source } => write!(
                f,
                "cannot read {}: {source}; check that it exists and is readable",
                path.display()
            ),
            DataError::NotFound { path } => write!(
                f,
                "{} does not exist; give a text file, an llm.c token shard (.bin), a pattern \
                 such as data/*.bin, or `builtin` for the built-in corpus",
                path.display()
            ),
            DataError::IsDirectory { path } => write!(
                f,
                "{} is a directory, not a file; to read the token shards in it, give a \
                 pattern such as {}",
                path.display(),
                path.join("*.bin").display()
            ),
            DataError::NoMatch { pattern } => write!(
                f,
                "no file matches {pattern}; check the directory and the pattern (only `*` is \
                 special, and only in the last path component)"
            ),
            DataError::BadPattern { pattern, reason } => {
                write!(f, "cannot expand the pattern {pattern}: {reason}")
            }
            DataError::Shard { path, error } => match path {
                Some(path) => write!(f, "{}: {error}", path.display()),
                None => write!(f, "token shard: {error}"),
            },
            DataError::TokenOutOfRange { token, format } => write!(
                f,
                "token {token} does not fit a {format} shard (largest token {}); write a \
                 u32 shard instead",
                format.max_token()
            ),
            DataError::TooManyTokens { count } => write!(
                f,
                "{count} tokens do not fit one shard (the header counts at most {}); split \
                 them into several shards",
                i32::MAX
            ),
            DataError::Empty { source } => write!(
                f,
                "{source} holds no tokens; give data with at least one token (a non-empty \
                 file, or a built-in corpus of at least one byte)"
            ),
            DataError::EmptySplit {
                split,
                source,
                reason,
            } => write!(f, "{source}: the {split} split would be empty: {reason}"),
            DataError::TooFewTokens {
                tokens,
                needed,
                seq_len,
            } => write!(
                f,
                "{tokens} tokens are too few for sequences of length {seq_len}, which need at \
                 least {needed} (the inputs and one more token for the last target); use a \
                 shorter sequence length or more data (for the validation split, a larger \
                 validation fraction)"
            ),
            DataError::VocabOverflow { source } => write!(
                f,
                "{source} contains the token id {}, too large for a vocabulary; the data is \
                 probably corrupt",
                u32::MAX
            ),
            DataError::Tokenizer { tokenizer, reason } => write!(
                f,
                "{tokenizer}: {reason}; give a Hugging Face tokenizer.json (the file \
                 `tokenizer.save(\"tokenizer.json\")` writes)"
            ),
            DataError::NotUtf8 { source, offset } => write!(
                f,
                "{source} is not UTF-8 text (invalid byte at offset {offset}); a tokenizer \
                 encodes text, so convert the file to UTF-8, or train without --tokenizer \
                 (one token per byte)"
            ),
            DataError::InvalidArgument {
                name,
                value,
                expected,
            } => write!(f, "{name} = {value} is invalid: expected {expected}"),
        }
    }
}

impl std::error::Error for DataError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            DataError::Io { source, .. } => Some(source),
            _ => None,
        }
    }
}

impl fmt::Display for ShardError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let supported = format!(
            "kiln reads magic {} version {} (GPT-2, u16 tokens) and magic {} version {} \
             (Llama-3, u32 tokens)",
            ShardFormat::U16.magic(),
            ShardFormat::U16.version(),
            ShardFormat::U32.magic(),
            ShardFormat::U32.version(),
        );
        match self {
            ShardError::TooShort { len } => write!(
                f,
                "the file is {len} bytes, shorter than the {HEADER_BYTES}-byte header of an \
                 llm.c token shard; if it is raw text, give it a name that does not end in .bin \
                 so that it is read as text"
            ),
            ShardError::BadMagic { found } => {
                let bytes = found.to_le_bytes();
                write!(
                    f,
                    "not an llm.c token shard: the magic number is {found} (bytes {:02x} {:02x} \
                     {:02x} {:02x}",
                    bytes[0], bytes[1], bytes[2], bytes[3]
                )?;
                if bytes.iter().all(|b| b.is_ascii_graphic() || *b == b' ') {
                    let text: String = bytes.iter().map(|&b| char::from(b)).collect();
                    write!(f, ", the text {text:?}")?;
                }
                write!(
                    f,
                    "), expected {} or {}; the file may be raw text: give text files a name \
                     that does not end in .bin so that they are read as text",
                    ShardFormat::U16.magic(),
                    ShardFormat::U32.magic()
                )
            }
            ShardError::UnsupportedVersion { magic, version } => write!(
                f,
                "magic {magic} with version {version} is not supported: {supported}; \
                 re-export the shard with llm.c's write_datafile"
            ),
            ShardError::NegativeCount { count } => write!(
                f,
                "the header declares {count} tokens, a negative count, so it is corrupt; \
                 re-create the shard"
            ),
            ShardError::NoTokens => write!(
                f,
                "the header declares 0 tokens; a shard must hold at least one, so remove the \
                 file or re-create it"
            ),
            ShardError::Truncated {
                declared,
                present,
                data_bytes,
            } => write!(
                f,
                "truncated: the header declares {declared} tokens but only {present} follow it \
                 ({data_bytes} bytes after the header); the file was probably cut off while \
                 being written or copied, so re-create or re-download it"
            ),
            ShardError::TrailingBytes { declared, extra } => write!(
                f,
                "{extra} bytes follow the {declared} tokens the header declares; the header \
                 does not match the file size (llm.c rejects such files too), so re-create the \
                 shard"
            ),
        }
    }
}
