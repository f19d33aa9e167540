//! Hugging Face `tokenizer.json` files: text to token ids and back, through the `tokenizers`
//! crate (pure Rust: its regexes run on fancy-regex, and nothing is downloaded).
//!
//! # What an encoding is
//!
//! Text is encoded as it is: no special tokens are added (the post-processor's BOS/EOS, if
//! the tokenizer has any, are not), so a corpus's tokens are the concatenation of its parts'
//! and a prompt is encoded as the training text around it was.
//!
//! # Chunks
//!
//! A large text is encoded in chunks of about [`CHUNK_BYTES`], in parallel on the current
//! rayon pool ([`encode_text`]). Each chunk ends just after a line end (`\n`) that is followed
//! by a character other than whitespace (or at the end of the text), found by scanning
//! forward from the chunk's target size; so a run of blank lines or indentation is never cut,
//! and a text without such a line end is one chunk. The cut points depend only on the text
//! and the chunk size, never on the number of threads: the tokens are exactly those of
//! encoding each chunk alone, one after another, on one thread. For most tokenizers (whose
//! pre-tokenizers split before a word that starts a line, such as GPT-2's byte-level regex)
//! that is also the encoding of the whole text at once. A tokenizer that marks the start of
//! the text it is given (GPT-2's `add_prefix_space`, SentencePiece's `Metaspace` prefix `▁`),
//! or whose pieces cross a line end, encodes the first word of each chunk differently from
//! the whole file: once per chunk, about once per MiB. `kiln train --tokenizer` and `kiln
//! tokenize` (at its default `--chunk-bytes`) use the same chunks, so they always agree.

use std::ops::Range;
use std::path::Path;

use rayon::prelude::*;

use super::error::DataError;

/// The target size of one chunk of [`encode_text`]: 1 MiB.
pub const CHUNK_BYTES: usize = 1 << 20;

/// The file name of a tokenizer in run and shard directories.
pub const TOKENIZER_FILE: &str = "tokenizer.json";

/// A loaded `tokenizer.json`.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    name: String,
    vocab: u32,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("name", &self.name)
            .field("vocab", &self.vocab)
            .finish()
    }
}

impl Tokenizer {
    /// Parses the bytes of a `tokenizer.json`; `name` (usually its path) describes it in
    /// messages.
    pub fn from_bytes(bytes: &[u8], name: &str) -> Result<Tokenizer, DataError> {
        let error = |reason: String| DataError::Tokenizer {
            tokenizer: name.to_string(),
            reason,
        };
        let inner = tokenizers::Tokenizer::from_bytes(bytes)
            .map_err(|e| error(format!("not a tokenizer.json this kiln can read: {e}")))?;
        // The size with added tokens, or past the largest id when ids leave gaps.
        let counted = inner.get_vocab_size(true);
        let past_largest = inner
            .get_vocab(true)
            .values()
            .map(|&id| id as usize + 1)
            .max()
            .unwrap_or(0);
        let vocab = u32::try_from(counted.max(past_largest))
            .map_err(|_| error(format!("its vocabulary of {counted} tokens is too large")))?;
        if vocab == 0 {
            return Err(error("its vocabulary is empty".to_string()));
        }
        Ok(Tokenizer {
            inner,
            name: name.to_string(),
            vocab,
        })
    }

    /// Reads and parses a `tokenizer.json`; errors name the file.
    pub fn from_file(path: &Path) -> Result<Tokenizer, DataError> {
        let bytes = std::fs::read(path).map_err(|source| DataError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Tokenizer::from_bytes(&bytes, &path.display().to_string())
    }

    /// The description given when it was loaded (usually its path).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The number of ids it can produce: its vocabulary with the added tokens (or one more
    /// than the largest id, if that is more). A model needs at least this `model.vocab`.
    pub fn vocab_size(&self) -> u32 {
        self.vocab
    }

    /// Encodes `text` without adding special tokens, on this thread.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, DataError> {
        let encoding = self
            .inner
            .encode_fast(text, false)
            .map_err(|e| DataError::Tokenizer {
                tokenizer: self.name.clone(),
                reason: format!("cannot encode the text: {e}"),
            })?;
        Ok(encoding.get_ids().to_vec())
    }

    /// Decodes ids into text, keeping special tokens. Ids the tokenizer does not know are
    /// skipped (as the tokenizers library does).
    pub fn decode(&self, ids: &[u32]) -> Result<String, DataError> {
        self.inner
            .decode(ids, false)
            .map_err(|e| DataError::Tokenizer {
                tokenizer: self.name.clone(),
                reason: format!("cannot decode ids: {e}"),
            })
    }
}

/// The byte ranges of the chunks of `text` (see the module documentation): consecutive,
/// covering the text, each at least `target` bytes long except the last, each but the last
/// ending just after a `\n` that a non-whitespace character follows.
pub fn line_chunks(text: &str, target: usize) -> Vec<Range<usize>> {
    let bytes = text.as_bytes();
    let target = target.max(1);
    let mut chunks = Vec::new();
    let mut start = 0;
    while start < bytes.len() {
        let end = cut_after(bytes, start + target).unwrap_or(bytes.len());
        chunks.push(start..end);
        start = end;
    }
    chunks
}

/// The first position at or after `from` that follows a `\n` and precedes a byte other than
/// ASCII whitespace, if any. (`\n` is one byte in UTF-8, so the position is a character
/// boundary.)
fn cut_after(bytes: &[u8], from: usize) -> Option<usize> {
    // A cut at `from` itself needs the `\n` just before it.
    let mut i = from.checked_sub(1)?;
    while i + 1 < bytes.len() {
        if bytes[i] == b'\n' && !bytes[i + 1].is_ascii_whitespace() {
            return Some(i + 1);
        }
        i += 1;
    }
    None
}

/// Encodes `text` chunk by chunk (chunks of about `chunk_bytes`, see [`line_chunks`]) on the
/// current rayon pool, calling `progress` with each finished chunk's size in bytes. The
/// result is the chunks' encodings in order: the same on any number of threads.
pub fn encode_text(
    tokenizer: &Tokenizer,
    text: &str,
    chunk_bytes: usize,
    progress: &(dyn Fn(usize) + Sync),
) -> Result<Vec<u32>, DataError> {
    let chunks = line_chunks(text, chunk_bytes);
    let encoded: Vec<Vec<u32>> = chunks
        .into_par_iter()
        .map(|range| {
            let len = range.len();
            let ids = tokenizer.encode(&text[range])?;
            progress(len);
            Ok(ids)
        })
        .collect::<Result<_, DataError>>()?;
    Ok(encoded.concat())
}

/// The text of `bytes` for a tokenizer: an error naming `source` and the offset of the first
/// invalid byte when they are not UTF-8.
pub fn utf8<'a>(bytes: &'a [u8], source: &str) -> Result<&'a str, DataError> {
    std::str::from_utf8(bytes).map_err(|e| DataError::NotUtf8 {
        source: source.to_string(),
        offset: e.valid_up_to(),
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A small hand-written WordLevel tokenizer: words and punctuation split on whitespace,
    /// unknown words become `[UNK]` (id 0), and one added special token `<|end|>`.
    pub(crate) fn word_level() -> Tokenizer {
        let words = [
            "[UNK]", "the", "cat", "sat", "on", "mat", ".", "a", "dog", "ran", "\n",
        ];
        let vocab: Vec<String> = words
            .iter()
            .enumerate()
            .map(|(i, w)| format!("{}: {i}", serde_json::to_string(w).expect("a string")))
            .collect();
        let json = format!(
            r#"{{
  "version": "1.0",
  "truncation": null,
  "padding": null,
  "added_tokens": [
    {{"id": 11, "content": "<|end|>", "single_word": false, "lstrip": false,
      "rstrip": false, "normalized": false, "special": true}}
  ],
  "normalizer": null,
  "pre_tokenizer": {{"type": "Whitespace"}},
  "post_processor": null,
  "decoder": null,
  "model": {{"type": "WordLevel", "vocab": {{{}}}, "unk_token": "[UNK]"}}
}}"#,
            vocab.join(", ")
        );
        Tokenizer::from_bytes(json.as_bytes(), "word-level test tokenizer").expect("it parses")
    }

    #[test]
    fn a_hand_written_tokenizer_encodes_and_counts_added_tokens() {
        let tokenizer = word_level();
        // 11 words plus the added `<|end|>`.
        assert_eq!(tokenizer.vocab_size(), 12);
        assert_eq!(
            tokenizer
                .encode("the cat sat on the mat.")
                .expect("encodes"),
            [1, 2, 3, 4, 1, 5, 6]
        );
        assert_eq!(
            tokenizer.encode("the bird <|end|>").expect("encodes"),
            [1, 0, 11]
        );
        assert_eq!(tokenizer.encode("").expect("encodes"), Vec::<u32>::new());
        // WordLevel without a decoder joins tokens with spaces.
        assert_eq!(
            tokenizer.decode(&[1, 2, 3]).expect("decodes"),
            "the cat sat"
        );
    }

    #[test]
    fn bad_tokenizer_files_are_errors_that_name_them() {
        for bytes in [&b""[..], b"{", b"{\"model\": 3}", b"not json at all"] {
            let error = Tokenizer::from_bytes(bytes, "broken.json").expect_err("refused");
            let message = error.to_string();
            assert!(
                matches!(error, DataError::Tokenizer { .. })
                    && message.contains("broken.json")
                    && message.contains("tokenizer.json"),
                "{message}"
            );
        }
        let error =
            Tokenizer::from_file(Path::new("/nonexistent/tokenizer.json")).expect_err("missing");
        assert!(
            error.to_string().contains("/nonexistent/tokenizer.json"),
            "{error}"
        );
    }

    #[test]
    fn chunks_cover_the_text_and_end_before_a_line_start() {
        let text = "the cat\n  sat\n\non the\nmat\nthe dog ran\n";
        for target in [1, 3, 8, 12, 100] {
            let chunks = line_chunks(text, target);
            let mut at = 0;
            for (i, chunk) in chunks.iter().enumerate() {
                assert_eq!(chunk.start, at, "consecutive");
                at = chunk.end;
                if i + 1 < chunks.len() {
                    assert!(chunk.len() >= target, "{chunks:?}");
                    assert_eq!(&text[chunk.end - 1..chunk.end], "\n");
                    let next = text.as_bytes()[chunk.end];
                    assert!(!next.is_ascii_whitespace(), "{chunks:?}");
                }
            }
            assert_eq!(at, text.len(), "the chunks cover the text");
        }
        // Cuts after `cat\n` (followed by spaces) and `sat\n` (followed by `\n`) are refused.
        assert_eq!(line_chunks(text, 1), [0..15, 15..22, 22..26, 26..38]);
        assert_eq!(line_chunks("", 4), Vec::<Range<usize>>::new());
        assert_eq!(
            line_chunks("one long line", 2),
            vec![Range { start: 0, end: 13 }]
        );
    }

    #[test]
    fn chunked_encoding_is_the_same_on_any_number_of_threads() {
        let tokenizer = word_level();
        let line = ["the cat sat on the mat .", "a dog ran", "the dog sat"];
        let text: String = (0..500).map(|i| format!("{}\n", line[i % 3])).collect();
        let whole = tokenizer.encode(&text).expect("encodes");
        let on = |threads: usize, chunk: usize| {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .expect("a pool");
            let done = std::sync::atomic::AtomicUsize::new(0);
            let ids = pool
                .install(|| {
                    encode_text(&tokenizer, &text, chunk, &|n| {
                        done.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
                    })
                })
                .expect("encodes");
            assert_eq!(done.into_inner(), text.len(), "progress counts every byte");
            ids
        };
        // Whitespace splitting never merges across a line start, so chunks change nothing.
        for chunk in [64, 1000, CHUNK_BYTES] {
            assert_eq!(on(1, chunk), whole);
            assert_eq!(on(3, chunk), whole);
        }
    }

    #[test]
    fn invalid_utf8_names_the_source_and_offset() {
        let error = utf8(b"ok\xffno", "corpus.txt").expect_err("not UTF-8");
        assert!(matches!(error, DataError::NotUtf8 { offset: 2, .. }));
        assert!(error.to_string().contains("corpus.txt"), "{error}");
        assert_eq!(utf8("héllo".as_bytes(), "x").expect("UTF-8"), "héllo");
    }
}
