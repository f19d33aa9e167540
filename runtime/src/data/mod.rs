//! The data pipeline: from a user's data argument to batches of token ids.
//!
//! ```text
//! "builtin" | "notes.txt" | "shards/*.bin"
//!        │ resolve
//!        ▼
//!     Source ──load──▶ Dataset { train, val, vocab } ──▶ Batcher (random windows, seeded)
//!                                                    └──▶ val_batches (in order, once)
//! ```
//!
//! - [`rng`]: PCG32, the deterministic generator with a saveable state that the corpus, the
//!   batcher and (later) initialization and sampling share.
//! - [`builtin`]: the built-in synthetic corpus (English-like prose, arithmetic and
//!   bracket-closing lines) and its arithmetic problems, including the held-out set that no
//!   corpus contains.
//! - [`brackets`]: the bracket-closing problems, their parser-checked answers and their
//!   held-out set.
//! - [`text`]: byte-level tokens (vocabulary 256).
//! - [`tokenizer`]: Hugging Face `tokenizer.json` files, and encoding text in parallel chunks.
//! - [`shard`]: llm.c's `.bin` token shards.
//! - [`source`]: [`Source`], [`resolve`], [`Dataset`] and [`load`] with the split rules.
//! - [`batch`]: [`Batcher`] and [`val_batches`].
//!
//! Nothing here parses specs or panics on input data: every problem with a file or a size is
//! a [`DataError`] that names the file or value and says what to do.

pub mod batch;
pub mod brackets;
pub mod builtin;
pub mod error;
pub mod rng;
pub mod shard;
pub mod source;
pub mod text;
pub mod tokenizer;

pub use batch::{initial_batch_state, val_batches, Batch, Batcher, ValBatches};
pub use builtin::{
    all_problems, builtin_corpus, heldout_problems, is_heldout, parse_answer, training_problems,
    Op, Problem,
};
pub use error::{DataError, ShardError};
pub use rng::Rng;
pub use shard::{parse_shard, read_shard, shard_pieces, write_shard, ShardFormat, ShardPiece};
pub use source::{
    held_out, load, load_with, resolve, Dataset, Source, DEFAULT_BUILTIN_BYTES,
    DEFAULT_BUILTIN_SEED,
};
pub use text::{byte_tokens, decode_bytes, BYTE_VOCAB};
pub use tokenizer::{encode_text, Tokenizer, CHUNK_BYTES, TOKENIZER_FILE};

/// Test helpers shared by the module's tests.
#[cfg(test)]
pub(crate) mod testing {
    use std::path::{Path, PathBuf};
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A fresh directory under the system's temporary directory, removed when dropped.
    pub(crate) struct TempDir {
        path: PathBuf,
    }

    impl TempDir {
        /// Creates a directory whose name is unique to this process and call.
        pub(crate) fn new(label: &str) -> TempDir {
            static NEXT: AtomicUsize = AtomicUsize::new(0);
            let id = NEXT.fetch_add(1, Ordering::Relaxed);
            let path =
                std::env::temp_dir().join(format!("kiln-data-{label}-{}-{id}", std::process::id()));
            // A leftover from an earlier run with the same process id would be stale.
            let _ = std::fs::remove_dir_all(&path);
            std::fs::create_dir_all(&path).expect("cannot create a temporary directory");
            TempDir { path }
        }

        /// The directory.
        pub(crate) fn path(&self) -> &Path {
            &self.path
        }

        /// Writes `bytes` to the file `name` in the directory and returns its path.
        pub(crate) fn write(&self, name: &str, bytes: &[u8]) -> PathBuf {
            let path = self.path.join(name);
            std::fs::write(&path, bytes).expect("cannot write a temporary file");
            path
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}
