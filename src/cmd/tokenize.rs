//! `kiln tokenize`: text corpora encoded with a `tokenizer.json` into llm.c token shards that
//! `kiln train --data 'DIR/*.bin'` reads.
//!
//! Each corpus is read whole, checked to be UTF-8, and encoded in chunks of about
//! `--chunk-bytes` cut at line starts, on `--threads` threads
//! ([`kiln_runtime::data::tokenizer`] says what the chunks mean: the tokens never depend on the
//! thread count, and `kiln train --data FILE --tokenizer` encodes the same way). Its last
//! `--val-fraction` of tokens become validation shards, the rest training shards, each at
//! most `--shard-tokens` long ([`kiln_runtime::data::shard_pieces`]), named
//! `STEM_val_000000.bin`, `STEM_train_000000.bin`… after the corpus's file stem. The format
//! is llm.c's u16 one when the tokenizer's ids fit 16 bits, else its u32 one. A copy of the
//! tokenizer goes beside the shards. Everything is written into a temporary sibling of the
//! output directory, renamed into place at the end.

use std::collections::BTreeSet;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use kiln_runtime::data::{
    self, encode_text, shard_pieces, write_shard, ShardFormat, CHUNK_BYTES, TOKENIZER_FILE,
};

use super::layout::usage;
use crate::engine::TokenizerFile;
use crate::fsutil::{fresh_dir, write_dir_with};
use crate::{other, Failure};

/// The command's arguments (see `kiln tokenize --help`).
#[derive(clap::Args)]
pub(crate) struct Args {
    /// UTF-8 text files to encode; each gets its own shards, named after its file stem (so
    /// stems must differ).
    #[arg(required = true, value_name = "CORPUS")]
    pub corpus: Vec<PathBuf>,
    /// The Hugging Face tokenizer.json to encode with (no special tokens are added).
    #[arg(long, value_name = "FILE")]
    pub tokenizer: PathBuf,
    /// The directory to write the shards and a copy of the tokenizer into; it must not exist,
    /// or be empty.
    #[arg(short, long, value_name = "DIR")]
    pub out: PathBuf,
    /// The share of each corpus's tokens, its last ones, written as validation shards
    /// (`STEM_val_*.bin`, which `kiln train` holds out by name); 0 writes training shards
    /// only. `kiln train --data FILE --tokenizer` with the same fraction splits alike.
    #[arg(long, default_value_t = 0.1)]
    pub val_fraction: f64,
    /// The most tokens in one shard (a longer split continues in `_000001.bin`…).
    #[arg(long, default_value_t = 100_000_000)]
    pub shard_tokens: usize,
    /// Encoding threads [default: every core].
    #[arg(long)]
    pub threads: Option<usize>,
    /// The target size of a chunk that one thread encodes at a time; a chunk ends at the
    /// first line start past it. The tokens depend on it (at the cuts, for tokenizers that
    /// mark the start of a text, like a prefix space, or merge across line starts) but never
    /// on --threads.
    #[arg(long, default_value_t = CHUNK_BYTES, value_name = "BYTES")]
    pub chunk_bytes: usize,
}

pub(crate) fn run(args: Args) -> Result<(), Failure> {
    check_args(&args)?;
    let stems = stems(&args.corpus)?;
    for path in &args.corpus {
        readable_file(path)?;
    }
    let file = TokenizerFile::read(&args.tokenizer)?;
    fresh_dir(&args.out)?;
    let threads = args
        .threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .map_err(|e| other(format!("cannot start {threads} encoding threads: {e}")))?;
    let format = ShardFormat::for_vocab(file.tokenizer.vocab_size());
    let total: u64 = args
        .corpus
        .iter()
        .map(|p| std::fs::metadata(p).map_or(0, |m| m.len()))
        .sum();
    let progress = Progress::new(total);
    let mut written = 0usize;
    write_dir_with(&args.out, |tmp| {
        for (path, stem) in args.corpus.iter().zip(&stems) {
            let bytes = std::fs::read(path)
                .map_err(|e| other(format!("cannot read {}: {e}", path.display())))?;
            let text = data::tokenizer::utf8(&bytes, &path.display().to_string())
                .map_err(|e| other(e.to_string()))?;
            let tokens = pool
                .install(|| {
                    encode_text(&file.tokenizer, text, args.chunk_bytes, &|n| {
                        progress.advance(n)
                    })
                })
                .map_err(|e| other(e.to_string()))?;
            progress.clear();
            written += write_shards(tmp, &args, path, stem, &tokens, format, bytes.len())?;
        }
        std::fs::write(tmp.join(TOKENIZER_FILE), &file.bytes).map_err(|e| {
            other(format!(
                "cannot write {TOKENIZER_FILE} in {}: {e}",
                tmp.display()
            ))
        })
    })?;
    let seconds = progress.start.elapsed().as_secs_f64();
    eprintln!(
        "wrote {written} {format} shard{} and {TOKENIZER_FILE} to {} in {seconds:.1} s ({} on \
         {threads} thread{}); train with `kiln train --data '{}' --set model.vocab={}`",
        plural(written),
        args.out.display(),
        rate(total, seconds),
        plural(threads),
        args.out.join("*.bin").display(),
        file.tokenizer.vocab_size()
    );
    Ok(())
}

/// Refuses flag values out of range (usage errors).
fn check_args(args: &Args) -> Result<(), Failure> {
    if !(0.0..1.0).contains(&args.val_fraction) {
        return Err(usage(
            &format!(
                "--val-fraction {} is not a fraction in [0, 1)",
                args.val_fraction
            ),
            "hold out a share such as 0.1, or 0 for training shards only",
        ));
    }
    if args.shard_tokens == 0 || i32::try_from(args.shard_tokens).is_err() {
        return Err(usage(
            &format!("--shard-tokens {} is out of range", args.shard_tokens),
            &format!(
                "a shard holds 1 to {} tokens (its header counts them in an i32)",
                i32::MAX
            ),
        ));
    }
    if args.threads == Some(0) || args.chunk_bytes == 0 {
        return Err(usage(
            "--threads and --chunk-bytes must be at least 1",
            "leave them out for every core and 1 MiB chunks",
        ));
    }
    Ok(())
}

/// Each corpus's file stem, which names its shards; two corpora with one stem would write the
/// same shards, so that is a usage error.
fn stems(corpora: &[PathBuf]) -> Result<Vec<String>, Failure> {
    let mut seen = BTreeSet::new();
    let mut stems = Vec::new();
    for path in corpora {
        let stem = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| "corpus".to_string());
        if !seen.insert(stem.clone()) {
            return Err(usage(
                &format!(
                    "two corpora have the file stem `{stem}`, which names their shards \
                     ({stem}_train_000000.bin…)"
                ),
                "rename one of them, or tokenize them into separate directories",
            ));
        }
        stems.push(stem);
    }
    Ok(stems)
}

/// Refuses a corpus that is missing, a directory or unreadable, before any encoding.
fn readable_file(path: &Path) -> Result<(), Failure> {
    let failed = |why: String| other(format!("cannot read the corpus {}: {why}", path.display()));
    let metadata = std::fs::metadata(path).map_err(|e| failed(e.to_string()))?;
    if metadata.is_dir() {
        return Err(failed(
            "it is a directory; give the text files in it".to_string(),
        ));
    }
    std::fs::File::open(path).map_err(|e| failed(e.to_string()))?;
    Ok(())
}

/// Writes one corpus's validation and training shards into `dir`, reports them, and returns
/// how many it wrote.
fn write_shards(
    dir: &Path,
    args: &Args,
    path: &Path,
    stem: &str,
    tokens: &[u32],
    format: ShardFormat,
    bytes: usize,
) -> Result<usize, Failure> {
    if tokens.is_empty() {
        return Err(other(format!(
            "{} holds no tokens; give a corpus with some text",
            path.display()
        )));
    }
    let pieces = shard_pieces(tokens.len(), args.val_fraction, args.shard_tokens);
    let count = |split| pieces.iter().filter(|p| p.split == split).count();
    let (val, train) = (count("val"), count("train"));
    if train == 0 {
        return Err(other(format!(
            "{}: --val-fraction {} of its {} tokens leaves none for training; use a smaller \
             fraction or more text",
            path.display(),
            args.val_fraction,
            tokens.len()
        )));
    }
    if val == 0 && args.val_fraction > 0.0 {
        eprintln!(
            "note: {}: --val-fraction {} of its {} tokens rounds to none, so it has no \
             validation shard",
            path.display(),
            args.val_fraction,
            tokens.len()
        );
    }
    for piece in &pieces {
        let shard = write_shard(&tokens[piece.range.clone()], format)
            .map_err(|e| other(format!("{}: {e}", path.display())))?;
        let name = piece.file_name(stem);
        std::fs::write(dir.join(&name), shard)
            .map_err(|e| other(format!("cannot write {name} in {}: {e}", dir.display())))?;
    }
    let held = data::held_out(tokens.len(), args.val_fraction);
    eprintln!(
        "{}: {bytes} bytes → {} tokens ({:.2} bytes a token): {val} validation shard{} ({held} \
         tokens), {train} training shard{} ({} tokens)",
        path.display(),
        tokens.len(),
        bytes as f64 / tokens.len() as f64,
        plural(val),
        plural(train),
        tokens.len() - held
    );
    Ok(pieces.len())
}

/// Progress on stderr while encoding: bytes done of the total and the rate, at most once a
/// second (rewriting one line on a terminal), so small corpora print none.
struct Progress {
    total: u64,
    done: AtomicU64,
    start: Instant,
    last: Mutex<Instant>,
    tty: bool,
    shown: AtomicBool,
}

impl Progress {
    fn new(total: u64) -> Progress {
        let start = Instant::now();
        Progress {
            total,
            done: AtomicU64::new(0),
            start,
            last: Mutex::new(start),
            tty: std::io::stderr().is_terminal(),
            shown: AtomicBool::new(false),
        }
    }

    /// Clears a terminal's progress line, so the next line starts clean.
    fn clear(&self) {
        if self.tty && self.shown.swap(false, Ordering::Relaxed) {
            eprint!("\r\x1b[K");
        }
    }

    /// Counts `bytes` more as encoded, and reports if a second has passed since the last
    /// report.
    fn advance(&self, bytes: usize) {
        let done = self.done.fetch_add(bytes as u64, Ordering::Relaxed) + bytes as u64;
        let Ok(mut last) = self.last.try_lock() else {
            return; // another thread is reporting
        };
        if last.elapsed() < Duration::from_secs(1) {
            return;
        }
        *last = Instant::now();
        let seconds = self.start.elapsed().as_secs_f64();
        let line = format!(
            "tokenize: {} of {} ({:.0}%), {}",
            mib(done),
            mib(self.total),
            100.0 * done as f64 / self.total.max(1) as f64,
            rate(done, seconds)
        );
        if self.tty {
            eprint!("\r{line}\x1b[K");
            self.shown.store(true, Ordering::Relaxed);
        } else {
            eprintln!("{line}");
        }
    }
}

/// Bytes in MiB, for people.
fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1 << 20) as f64)
}

/// A rate in MiB/s.
fn rate(bytes: u64, seconds: f64) -> String {
    format!(
        "{:.1} MiB/s",
        bytes as f64 / (1 << 20) as f64 / seconds.max(1e-9)
    )
}

/// "s" unless `n` is 1.
fn plural(n: usize) -> &'static str {
    if n == 1 {
        ""
    } else {
        "s"
    }
}
