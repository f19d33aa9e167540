//! Where training text comes from, and how it is split into training and validation tokens.
//!
//! [`resolve`] turns what a user typed into a [`Source`]; [`load`] reads a source into a
//! [`Dataset`] of train and validation tokens.
//!
//! # Split rules
//!
//! - **Built-in corpus and text files** are byte-level token streams; the last
//!   `round(n × val_fraction)` tokens are validation and the rest training (the cut is at a
//!   token, i.e. byte, boundary, and may fall inside a line or a UTF-8 character).
//! - **Text files with a tokenizer** ([`load_with`]) are encoded by it in chunks
//!   ([`super::tokenizer`]) and split the same way, at a token boundary.
//! - **Shards** follow llm.c's convention: a shard whose file name (not its directory)
//!   contains `val` is validation, every other shard is training, and each side is the
//!   concatenation of its shards in the order given (name order for a pattern). `val_fraction`
//!   is then unused. When no file name contains `val`, all shards are concatenated and split
//!   by `val_fraction` like text.
//!
//! Either side being empty is an error. Whether a side is long enough for a batch is the
//! batcher's check ([`super::Batcher::new`], [`super::val_batches`]).

use std::fmt;
use std::path::{Path, PathBuf};

use super::builtin::builtin_corpus;
use super::error::DataError;
use super::shard::read_shard;
use super::text::byte_tokens;
use super::tokenizer::{encode_text, utf8, Tokenizer, CHUNK_BYTES};

/// The size of the built-in corpus that [`resolve`] gives for `builtin`: 4 MiB.
pub const DEFAULT_BUILTIN_BYTES: usize = 4 << 20;

/// The seed of the built-in corpus that [`resolve`] gives for `builtin`.
pub const DEFAULT_BUILTIN_SEED: u64 = 0;

/// A source of training tokens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Source {
    /// The generated corpus of [`builtin_corpus`], read as bytes.
    Builtin {
        /// The corpus seed.
        seed: u64,
        /// The corpus size in bytes (and so in tokens).
        bytes: usize,
    },
    /// A file read as bytes, one token per byte.
    Text(PathBuf),
    /// llm.c token shards, in this order.
    Shards(Vec<PathBuf>),
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::Builtin { seed, bytes } => {
                write!(f, "the built-in corpus (seed {seed}, {bytes} bytes)")
            }
            Source::Text(path) => write!(f, "text file {}", path.display()),
            Source::Shards(paths) => match paths.as_slice() {
                [one] => write!(f, "token shard {}", one.display()),
                _ => write!(f, "{} token shards", paths.len()),
            },
        }
    }
}

/// Turns a user's data argument into a [`Source`].
///
/// - `builtin` is the built-in corpus with [`DEFAULT_BUILTIN_SEED`] and
///   [`DEFAULT_BUILTIN_BYTES`] (write `./builtin` for a file of that name).
/// - A pattern with `*` in its last component, such as `data/*.bin`, is every file of that
///   directory whose name matches (`*` matches any run of characters, `?` and `[` are
///   ordinary), sorted by name, as shards; it is an error if nothing matches.
/// - A path whose extension is `.bin` is one shard.
/// - Anything else is a text file.
///
/// Paths must exist and be files; a directory is an error that suggests a pattern.
pub fn resolve(spec: &str) -> Result<Source, DataError> {
    if spec == "builtin" {
        return Ok(Source::Builtin {
            seed: DEFAULT_BUILTIN_SEED,
            bytes: DEFAULT_BUILTIN_BYTES,
        });
    }
    if spec.is_empty() {
        return Err(DataError::InvalidArgument {
            name: "data",
            value: "\"\"".to_string(),
            expected: "a file, a pattern such as data/*.bin, or `builtin`",
        });
    }
    if spec.contains('*') {
        return expand_glob(spec).map(Source::Shards);
    }
    let path = PathBuf::from(spec);
    check_file(&path)?;
    let is_shard = path
        .extension()
        .is_some_and(|extension| extension.eq_ignore_ascii_case("bin"));
    Ok(if is_shard {
        Source::Shards(vec![path])
    } else {
        Source::Text(path)
    })
}

/// Succeeds when `path` is an existing file (following symbolic links).
fn check_file(path: &Path) -> Result<(), DataError> {
    match std::fs::metadata(path) {
        Ok(metadata) if metadata.is_dir() => Err(DataError::IsDirectory {
            path: path.to_path_buf(),
        }),
        Ok(_) => Ok(()),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Err(DataError::NotFound {
            path: path.to_path_buf(),
        }),
        Err(source) => Err(DataError::Io {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// Expands a pattern with `*` in its last component into the matching files, sorted by name.
fn expand_glob(pattern: &str) -> Result<Vec<PathBuf>, DataError> {
    let bad = |reason: &str| DataError::BadPattern {
        pattern: pattern.to_string(),
        reason: reason.to_string(),
    };
    let path = Path::new(pattern);
    let name_pattern = path
        .file_name()
        .and_then(|name| name.to_str())
        .filter(|name| name.contains('*'))
        .ok_or_else(|| bad("`*` may appear only in the last path component"))?;
    let parent = path.parent().unwrap_or(Path::new(""));
    if parent.to_string_lossy().contains('*') {
        return Err(bad("`*` may appear only in the last path component"));
    }
    let dir = if parent.as_os_str().is_empty() {
        Path::new(".")
    } else {
        parent
    };
    let entries = std::fs::read_dir(dir).map_err(|source| {
        if source.kind() == std::io::ErrorKind::NotFound {
            DataError::NotFound {
                path: dir.to_path_buf(),
            }
        } else {
            DataError::Io {
                path: dir.to_path_buf(),
                source,
            }
        }
    })?;
    let mut names = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|source| DataError::Io {
            path: dir.to_path_buf(),
            source,
        })?;
        // Names that are not UTF-8 cannot match a UTF-8 pattern; skip them.
        let Ok(name) = entry.file_name().into_string() else {
            continue;
        };
        if !wildcard_match(name_pattern.as_bytes(), name.as_bytes()) {
            continue;
        }
        // Follow symbolic links; skip directories and anything that cannot be inspected.
        if std::fs::metadata(entry.path()).is_ok_and(|metadata| metadata.is_file()) {
            names.push(name);
        }
    }
    if names.is_empty() {
        return Err(DataError::NoMatch {
            pattern: pattern.to_string(),
        });
    }
    names.sort();
    Ok(names.into_iter().map(|name| parent.join(name)).collect())
}

/// Whether `name` matches `pattern`, where `*` matches any run of bytes (also empty) and every
/// other byte matches itself.
fn wildcard_match(pattern: &[u8], name: &[u8]) -> bool {
    // The classic greedy algorithm: on a mismatch, let the most recent `*` absorb one more
    // byte and retry from there. Linear in practice, O(len(pattern) × len(name)) at worst.
    let (mut p, mut n) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while n < name.len() {
        if p < pattern.len() && pattern[p] == b'*' {
            star = Some((p, n));
            p += 1;
        } else if p < pattern.len() && pattern[p] == name[n] {
            p += 1;
            n += 1;
        } else if let Some((star_p, star_n)) = star {
            p = star_p + 1;
            n = star_n + 1;
            star = Some((star_p, star_n + 1));
        } else {
            return false;
        }
    }
    pattern[p..].iter().all(|&b| b == b'*')
}

/// Train and validation tokens of one source.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Dataset {
    /// The training tokens.
    pub train: Vec<u32>,
    /// The validation tokens.
    pub val: Vec<u32>,
    /// One more than the largest token id in either split: the smallest vocabulary a model
    /// needs for this data. (Byte-level text has ids below 256, [`super::BYTE_VOCAB`], but
    /// this counts only the ids that occur.)
    pub vocab: u32,
    /// What was loaded and how it was split, for logs.
    pub description: String,
}

/// Reads a source and splits it into training and validation tokens (see the module
/// documentation for the rules).
///
/// `val_fraction` must be in `(0, 1)`; it is checked even when shard names decide the split.
pub fn load(source: &Source, val_fraction: f64) -> Result<Dataset, DataError> {
    load_with(source, val_fraction, None)
}

/// [`load`], with a text file encoded by `tokenizer` instead of one token per byte (on the
/// current rayon pool, in [`CHUNK_BYTES`] chunks). A tokenizer is only for text files: the
/// built-in corpus is byte-level and shards hold tokens already.
pub fn load_with(
    source: &Source,
    val_fraction: f64,
    tokenizer: Option<&Tokenizer>,
) -> Result<Dataset, DataError> {
    if !(val_fraction > 0.0 && val_fraction < 1.0) {
        return Err(DataError::InvalidArgument {
            name: "val_fraction",
            value: format!("{val_fraction:?}"),
            expected: "a fraction strictly between 0 and 1",
        });
    }
    let described = match (source, tokenizer) {
        (Source::Text(_), Some(t)) => format!(
            "{source} encoded with {} (vocabulary {})",
            t.name(),
            t.vocab_size()
        ),
        (_, Some(_)) => {
            return Err(DataError::InvalidArgument {
                name: "tokenizer",
                value: format!("given for {source}"),
                expected: "a text file to encode (the built-in corpus is byte-level, and \
                           shards hold tokens already)",
            })
        }
        (_, None) => source.to_string(),
    };
    let (train, val, how) = match source {
        Source::Builtin { seed, bytes } => {
            let tokens = byte_tokens(&builtin_corpus(*seed, *bytes));
            tail_split(tokens, val_fraction, &described)?
        }
        Source::Text(path) => {
            let bytes = std::fs::read(path).map_err(|source| DataError::Io {
                path: path.clone(),
                source,
            })?;
            let tokens = match tokenizer {
                Some(t) => {
                    let text = utf8(&bytes, &path.display().to_string())?;
                    encode_text(t, text, CHUNK_BYTES, &|_| ())?
                }
                None => byte_tokens(&bytes),
            };
            tail_split(tokens, val_fraction, &described)?
        }
        Source::Shards(paths) => load_shards(paths, val_fraction, &described)?,
    };
    let largest = train.iter().chain(&val).copied().max().unwrap_or(0);
    let vocab = largest
        .checked_add(1)
        .ok_or_else(|| DataError::VocabOverflow {
            source: described.clone(),
        })?;
    let description = format!(
        "{described}: {} train / {} validation tokens ({how}), largest token id {largest}",
        train.len(),
        val.len()
    );
    Ok(Dataset {
        train,
        val,
        vocab,
        description,
    })
}

/// Reads shards and splits them by name, or by `val_fraction` when no name says `val`.
fn load_shards(
    paths: &[PathBuf],
    val_fraction: f64,
    described: &str,
) -> Result<(Vec<u32>, Vec<u32>, String), DataError> {
    if paths.is_empty() {
        return Err(DataError::Empty {
            source: "an empty list of token shards".to_string(),
        });
    }
    let is_val = |path: &PathBuf| {
        path.file_name()
            .is_some_and(|name| name.to_string_lossy().contains("val"))
    };
    let (val_paths, train_paths): (Vec<&PathBuf>, Vec<&PathBuf>) =
        paths.iter().partition(|p| is_val(p));
    let read_all = |paths: &[&PathBuf]| -> Result<Vec<u32>, DataError> {
        let mut tokens = Vec::new();
        for path in paths {
            tokens.extend(read_shard(path)?);
        }
        Ok(tokens)
    };
    if val_paths.is_empty() {
        return tail_split(read_all(&train_paths)?, val_fraction, described);
    }
    if train_paths.is_empty() {
        return Err(DataError::EmptySplit {
            split: "train",
            source: described.to_string(),
            reason: "every shard's file name contains `val`, which marks validation shards; \
                     add training shards (names without `val`)"
                .to_string(),
        });
    }
    let how = format!(
        "{} train and {} validation shards, by name",
        train_paths.len(),
        val_paths.len()
    );
    Ok((read_all(&train_paths)?, read_all(&val_paths)?, how))
}

/// How many of `n` tokens a tail split holds out for validation: `round(n × val_fraction)`,
/// at most `n`.
pub fn held_out(n: usize, val_fraction: f64) -> usize {
    // For a fraction in [0, 1] the rounded product is in [0, n]; `min` only guards against
    // floating-point surprises on huge inputs.
    ((n as f64 * val_fraction).round() as usize).min(n)
}

/// Puts the last `round(n × val_fraction)` tokens into validation.
fn tail_split(
    mut tokens: Vec<u32>,
    val_fraction: f64,
    described: &str,
) -> Result<(Vec<u32>, Vec<u32>, String), DataError> {
    if tokens.is_empty() {
        return Err(DataError::Empty {
            source: described.to_string(),
        });
    }
    let n = tokens.len();
    let val_len = held_out(n, val_fraction);
    if val_len == 0 {
        return Err(DataError::EmptySplit {
            split: "validation",
            source: described.to_string(),
            reason: format!(
                "{val_fraction} of {n} tokens rounds to none; use a larger validation \
                 fraction or more data"
            ),
        });
    }
    if val_len == n {
        return Err(DataError::EmptySplit {
            split: "train",
            source: described.to_string(),
            reason: format!(
                "{val_fraction} of {n} tokens rounds to all of them; use a smaller validation \
                 fraction or more data"
            ),
        });
    }
    let val = tokens.split_off(n - val_len);
    let how = format!("last {val_fraction} held out for validation");
    Ok((tokens, val, how))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::shard::{write_shard, ShardFormat};
    use crate::data::testing::TempDir;
    use crate::data::ShardError;

    /// The shard bytes of `tokens` in the u16 format.
    fn shard(tokens: &[u32]) -> Vec<u8> {
        write_shard(tokens, ShardFormat::U16).expect("tokens fit u16")
    }

    #[test]
    fn wildcard_matching() {
        let cases = [
            ("*.bin", "a.bin", true),
            ("*.bin", ".bin", true),
            ("*.bin", "a.bin.txt", false),
            ("*", "", true),
            ("*", "anything", true),
            ("a*b*c", "abc", true),
            ("a*b*c", "aXbYbZc", true),
            ("a*b*c", "aXbYc", true),
            ("a*b*c", "acb", false),
            ("train_*_0*.bin", "train_fw_000.bin", true),
            ("exact", "exact", true),
            ("exact", "exactly", false),
            ("**a", "ba", true),
            ("a?.bin", "ab.bin", false),
            ("a?.bin", "a?.bin", true),
        ];
        for (pattern, name, expected) in cases {
            assert_eq!(
                wildcard_match(pattern.as_bytes(), name.as_bytes()),
                expected,
                "{pattern} vs {name}"
            );
        }
    }

    #[test]
    fn resolve_builtin_text_and_single_shards() {
        assert_eq!(
            resolve("builtin").expect("builtin"),
            Source::Builtin {
                seed: DEFAULT_BUILTIN_SEED,
                bytes: DEFAULT_BUILTIN_BYTES
            }
        );
        let dir = TempDir::new("resolve");
        let text = dir.write("notes.txt", b"hello");
        let bin = dir.write("tokens.bin", &shard(&[1, 2, 3]));
        let as_str = |p: &Path| p.to_str().expect("temp paths are UTF-8").to_string();
        assert_eq!(resolve(&as_str(&text)).expect("text"), Source::Text(text));
        assert_eq!(
            resolve(&as_str(&bin)).expect("shard"),
            Source::Shards(vec![bin])
        );
        let missing = dir.path().join("missing.txt");
        let error = resolve(&as_str(&missing)).expect_err("missing");
        assert!(matches!(error, DataError::NotFound { .. }));
        let message = error.to_string();
        assert!(
            message.contains("missing.txt") && message.contains("builtin"),
            "{message}"
        );
        assert!(matches!(
            resolve(&as_str(&dir.path().join("missing.bin"))),
            Err(DataError::NotFound { .. })
        ));
        let error = resolve(&as_str(dir.path())).expect_err("directory");
        assert!(matches!(error, DataError::IsDirectory { .. }));
        assert!(error.to_string().contains("*.bin"), "{error}");
        assert!(matches!(
            resolve(""),
            Err(DataError::InvalidArgument { .. })
        ));
    }

    #[test]
    fn resolve_globs_sorted_by_name() {
        let dir = TempDir::new("glob");
        for name in ["b.bin", "val.bin", "a.bin"] {
            dir.write(name, &shard(&[1]));
        }
        dir.write("notes.txt", b"not a shard");
        std::fs::create_dir(dir.path().join("sub.bin")).expect("subdirectory");
        let pattern = format!("{}/*.bin", dir.path().display());
        let Source::Shards(paths) = resolve(&pattern).expect("matches") else {
            panic!("a pattern resolves to shards");
        };
        let names: Vec<&str> = paths
            .iter()
            .map(|p| p.file_name().and_then(|n| n.to_str()).expect("UTF-8 name"))
            .collect();
        // Sorted by name; the directory sub.bin and the text file are not matched.
        assert_eq!(names, ["a.bin", "b.bin", "val.bin"]);
        assert!(paths.iter().all(|p| p.parent() == Some(dir.path())));

        let none = format!("{}/*.shard", dir.path().display());
        let error = resolve(&none).expect_err("no match");
        assert!(matches!(error, DataError::NoMatch { .. }));
        assert!(error.to_string().contains("*.shard"), "{error}");
        let in_dir = format!("{}/*/a.bin", dir.path().display());
        assert!(matches!(
            resolve(&in_dir),
            Err(DataError::BadPattern { .. })
        ));
        let missing_dir = format!("{}/nowhere/*.bin", dir.path().display());
        assert!(matches!(
            resolve(&missing_dir),
            Err(DataError::NotFound { .. })
        ));
    }

    #[test]
    fn text_files_split_at_the_tail() {
        let dir = TempDir::new("text");
        let contents: Vec<u8> = (0..100u8).map(|i| b'a' + i % 26).collect();
        let path = dir.write("letters.txt", &contents);
        let data = load(&Source::Text(path), 0.1).expect("loads");
        assert_eq!(data.train.len(), 90);
        assert_eq!(data.val.len(), 10);
        let all: Vec<u32> = data.train.iter().chain(&data.val).copied().collect();
        assert_eq!(all, crate::data::byte_tokens(&contents));
        assert_eq!(data.vocab, u32::from(b'z') + 1);
        assert!(
            data.description.contains("letters.txt"),
            "{}",
            data.description
        );

        // Rounding: 0.25 of 10 tokens is 2.5, which rounds to 3.
        let path = dir.write("ten.txt", b"0123456789");
        let data = load(&Source::Text(path), 0.25).expect("loads");
        assert_eq!((data.train.len(), data.val.len()), (7, 3));
    }

    #[test]
    fn a_tokenizer_encodes_text_files_and_only_them() {
        let tokenizer = crate::data::tokenizer::tests::word_level();
        let dir = TempDir::new("tokenized");
        let text = "the cat sat on the mat .\na dog ran\n".repeat(10);
        let path = dir.write("story.txt", text.as_bytes());
        let data = load_with(&Source::Text(path.clone()), 0.1, Some(&tokenizer)).expect("loads");
        let all: Vec<u32> = data.train.iter().chain(&data.val).copied().collect();
        assert_eq!(all, tokenizer.encode(&text).expect("encodes"));
        assert_eq!(data.val.len(), held_out(all.len(), 0.1));
        assert!(
            data.description.contains("story.txt")
                && data
                    .description
                    .contains("word-level test tokenizer (vocabulary 12)"),
            "{}",
            data.description
        );
        let latin1 = dir.write("latin1.txt", b"caf\xe9\n");
        let error = load_with(&Source::Text(latin1), 0.1, Some(&tokenizer)).expect_err("bytes");
        assert!(
            matches!(error, DataError::NotUtf8 { offset: 3, .. }),
            "{error}"
        );
        let shard_path = dir.write("a.bin", &shard(&[1, 2, 3]));
        for source in [
            Source::Shards(vec![shard_path]),
            Source::Builtin {
                seed: 0,
                bytes: 100,
            },
        ] {
            let error = load_with(&source, 0.1, Some(&tokenizer)).expect_err("not text");
            assert!(
                matches!(
                    error,
                    DataError::InvalidArgument {
                        name: "tokenizer",
                        ..
                    }
                ),
                "{error}"
            );
        }
    }

    #[test]
    fn split_errors() {
        let dir = TempDir::new("split");
        let tiny = dir.write("tiny.txt", b"abc");
        // 0.1 of 3 tokens rounds to none; 0.9 of 3 rounds to all of them.
        assert!(matches!(
            load(&Source::Text(tiny.clone()), 0.1),
            Err(DataError::EmptySplit {
                split: "validation",
                ..
            })
        ));
        assert!(matches!(
            load(&Source::Text(tiny.clone()), 0.9),
            Err(DataError::EmptySplit { split: "train", .. })
        ));
        let empty = dir.write("empty.txt", b"");
        let error = load(&Source::Text(empty), 0.1).expect_err("empty");
        assert!(matches!(error, DataError::Empty { .. }));
        assert!(error.to_string().contains("empty.txt"), "{error}");
        for bad in [0.0, 1.0, -0.5, 1.5, f64::NAN, f64::INFINITY] {
            assert!(matches!(
                load(&Source::Text(tiny.clone()), bad),
                Err(DataError::InvalidArgument {
                    name: "val_fraction",
                    ..
                })
            ));
        }
        let missing = dir.path().join("gone.txt");
        let error = load(&Source::Text(missing), 0.1).expect_err("missing");
        assert!(matches!(error, DataError::Io { .. }));
        assert!(error.to_string().contains("gone.txt"), "{error}");
    }

    #[test]
    fn builtin_loads_and_splits() {
        let source = Source::Builtin {
            seed: 4,
            bytes: 10_000,
        };
        let data = load(&source, 0.1).expect("loads");
        assert_eq!((data.train.len(), data.val.len()), (9_000, 1_000));
        assert!(data.vocab <= 128, "the corpus is ASCII");
        let corpus = builtin_corpus(4, 10_000);
        assert_eq!(data.train, byte_tokens(&corpus[..9_000]));
        assert!(
            data.description.contains("built-in"),
            "{}",
            data.description
        );
    }

    #[test]
    fn shards_split_by_name() {
        let dir = TempDir::new("shards");
        let a = dir.write("a.bin", &shard(&[1, 2, 3]));
        let b = dir.write("b.bin", &shard(&[4, 5]));
        let val = dir.write("val.bin", &shard(&[600, 7]));
        let data = load(
            &Source::Shards(vec![a.clone(), b.clone(), val.clone()]),
            0.5,
        )
        .expect("loads");
        assert_eq!(data.train, [1, 2, 3, 4, 5]);
        assert_eq!(data.val, [600, 7]);
        assert_eq!(data.vocab, 601);
        assert!(data.description.contains("by name"), "{}", data.description);

        // Without a validation shard, the concatenation is split at the tail.
        let data = load(&Source::Shards(vec![a.clone(), b.clone()]), 0.4).expect("loads");
        assert_eq!(data.train, [1, 2, 3]);
        assert_eq!(data.val, [4, 5]);

        // Only validation shards: nothing to train on.
        let error = load(&Source::Shards(vec![val.clone()]), 0.1).expect_err("no train");
        assert!(matches!(
            error,
            DataError::EmptySplit { split: "train", .. }
        ));
        assert!(error.to_string().contains("val"), "{error}");

        // "val" counts in the file name only, not in the directory.
        let val_dir = dir.path().join("val");
        std::fs::create_dir(&val_dir).expect("subdirectory");
        let inner = val_dir.join("c.bin");
        std::fs::write(&inner, shard(&[8, 9])).expect("write");
        let data = load(&Source::Shards(vec![inner, val]), 0.1).expect("loads");
        assert_eq!((data.train, data.val), (vec![8, 9], vec![600, 7]));

        assert!(matches!(
            load(&Source::Shards(Vec::new()), 0.1),
            Err(DataError::Empty { .. })
        ));
    }

    #[test]
    fn a_bad_shard_names_its_file() {
        let dir = TempDir::new("badshard");
        let good = dir.write("a.bin", &shard(&[1, 2, 3]));
        let text = dir.write("story.bin", &b"Once upon a time. ".repeat(100));
        let error = load(&Source::Shards(vec![good, text]), 0.1).expect_err("bad magic");
        assert!(matches!(
            error,
            DataError::Shard {
                error: ShardError::BadMagic { .. },
                ..
            }
        ));
        let message = error.to_string();
        assert!(
            message.contains("story.bin") && message.contains("raw text"),
            "{message}"
        );
    }

    #[test]
    fn a_token_of_u32_max_is_an_error_not_an_overflow() {
        let dir = TempDir::new("vocab");
        let bytes = write_shard(&[1, u32::MAX, 2, 3], ShardFormat::U32).expect("fits");
        let path = dir.write("wide.bin", &bytes);
        assert!(matches!(
            load(&Source::Shards(vec![path]), 0.25),
            Err(DataError::VocabOverflow { .. })
        ));
    }
}
