//! Tokenizers end to end: `kiln train --tokenizer`, `kiln tokenize`, training on its shards,
//! `kiln sample` decoding with a run's tokenizer, and `export-hf`/`import-hf` carrying it.
//! Every tokenizer is made here: a byte-level BPE trained with the tokenizers crate's trainer
//! on the built-in corpus, and a hand-written WordLevel one.

mod common;

use std::path::{Path, PathBuf};
use std::process::Output;

use common::{kiln, scratch};
use kiln_runtime::data::{builtin_corpus, read_shard, tokenizer::line_chunks, Tokenizer};
use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::normalizers::NormalizerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::processors::PostProcessorWrapper;
use tokenizers::{AddedToken, TokenizerBuilder};

fn stderr(o: &Output) -> String {
    common::text(&o.stderr)
}

fn stdout(o: &Output) -> String {
    common::text(&o.stdout)
}

fn p(path: &Path) -> String {
    path.to_str().expect("test paths are UTF-8").to_string()
}

/// The vocabulary of the trained BPE: 256 bytes, one special token and the merges.
const BPE_VOCAB: usize = 300;

/// Trains a byte-level BPE of [`BPE_VOCAB`] tokens on `text` (GPT-2's pre-tokenizer without
/// a prefix space) and saves it as `dir/tokenizer.json`.
fn train_bpe(dir: &Path, text: &str) -> PathBuf {
    let byte_level = ByteLevel::new(false, true, true);
    let mut trainer = BpeTrainerBuilder::new()
        .vocab_size(BPE_VOCAB)
        .min_frequency(2)
        .show_progress(false)
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .special_tokens(vec![AddedToken::from("<|endoftext|>", true)])
        .build();
    let mut tokenizer = TokenizerBuilder::<
        BPE,
        NormalizerWrapper,
        ByteLevel,
        PostProcessorWrapper,
        ByteLevel,
    >::new()
    .with_model(BPE::default())
    .with_normalizer(None)
    .with_pre_tokenizer(Some(byte_level))
    .with_post_processor(None)
    .with_decoder(Some(byte_level))
    .build()
    .expect("a tokenizer");
    tokenizer
        .train(&mut trainer, text.lines())
        .expect("BPE trains");
    let path = dir.join("tokenizer.json");
    tokenizer.save(&path, false).expect("saved");
    path
}

/// `bytes` of the built-in corpus as text, written to `dir/name`.
fn corpus(dir: &Path, name: &str, seed: u64, bytes: usize) -> (PathBuf, String) {
    let text = String::from_utf8(builtin_corpus(seed, bytes)).expect("the corpus is ASCII");
    let path = dir.join(name);
    std::fs::write(&path, &text).expect("written");
    (path, text)
}

/// The micro spec with `--set model.vocab=N`.
fn micro_vocab(vocab: usize) -> [String; 3] {
    [
        "tests/specs/micro.toml".to_string(),
        "--set".to_string(),
        format!("model.vocab={vocab}"),
    ]
}

/// `kiln train` on micro with the given vocabulary, 3 steps, and `extra` flags.
fn train(vocab: usize, out: &Path, extra: &[&str]) -> Output {
    let spec = micro_vocab(vocab);
    let mut args = vec!["train", &spec[0], &spec[1], &spec[2], "--steps", "3"];
    args.extend(["--eval-every", "3", "--out", out.to_str().unwrap()]);
    args.extend_from_slice(extra);
    kiln(&args)
}

/// The training losses of a run, by step, as written.
fn losses(dir: &Path) -> Vec<String> {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .expect("metrics")
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).expect("JSON");
            v["loss"].to_string()
        })
        .collect()
}

#[test]
fn train_encodes_text_with_a_tokenizer_that_fits_the_vocabulary() {
    let dir = scratch("tokenizer", "train");
    let (text_path, text) = corpus(&dir, "corpus.txt", 1, 40_000);
    let tok_path = train_bpe(&dir, &text);
    let tokenizer = Tokenizer::from_file(&tok_path).expect("kiln reads it");
    assert_eq!(tokenizer.vocab_size() as usize, BPE_VOCAB);
    let tokens = tokenizer.encode(&text).expect("encodes");
    assert!(
        tokens.len() < text.len() * 9 / 10 && tokens.iter().any(|&t| t >= 256),
        "BPE merges: {} tokens",
        tokens.len()
    );

    let run = dir.join("run");
    let data = ["--data", &p(&text_path), "--tokenizer", &p(&tok_path)];
    let o = train(320, &run, &data);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(0), "{err}");
    // The header names the tokenizer, its vocabulary and the tokens it made.
    let val = (tokens.len() as f64 * 0.1).round() as usize;
    let expected = format!(
        "encoded with {} (vocabulary {BPE_VOCAB}): {} train / {val} validation tokens",
        p(&tok_path),
        tokens.len() - val
    );
    assert!(err.contains(&expected), "{expected}\n{err}");
    assert_eq!(
        std::fs::read(run.join("tokenizer.json")).unwrap(),
        std::fs::read(&tok_path).unwrap(),
        "the run keeps a copy of the tokenizer"
    );

    // Resuming encodes the text with the run's copy, unasked.
    let o = kiln(&[
        "train",
        "--resume",
        &p(&run),
        "--steps",
        "4",
        "--data",
        &p(&text_path),
    ]);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(0), "{err}");
    let copy = format!(
        "encoded with {} (vocabulary",
        p(&run.join("tokenizer.json"))
    );
    assert!(err.contains(&copy), "{err}");

    // A vocabulary too small for the tokenizer: a usage error naming both sizes and the fix.
    let o = train(128, &dir.join("small"), &data);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(
        err.contains(&format!("vocabulary of {BPE_VOCAB} tokens"))
            && err.contains("model's vocabulary of 128")
            && err.contains(&format!("--set model.vocab={BPE_VOCAB}")),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");

    // A tokenizer is for text: the built-in corpus and shards are usage errors.
    let o = train(320, &dir.join("builtin"), &["--tokenizer", &p(&tok_path)]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("--tokenizer encodes a text file"),
        "{}",
        stderr(&o)
    );

    // A later byte-level run in the same directory drops the stale copy.
    let o = train(320, &run, &["--data", &p(&text_path)]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(!run.join("tokenizer.json").exists());
}

#[test]
fn tokenize_writes_shards_that_train_as_the_text_does() {
    let dir = scratch("tokenizer", "tokenize");
    let (text_path, text) = corpus(&dir, "corpus.txt", 2, 60_000);
    let tok_path = train_bpe(&dir, &text);
    let tokenizer = Tokenizer::from_file(&tok_path).expect("kiln reads it");

    // Small chunks, so that the threads share the work; 1 and 2 threads write the same bytes.
    let write = |threads: &str, out: &Path| {
        let o = kiln(&[
            "tokenize",
            &p(&text_path),
            "--tokenizer",
            &p(&tok_path),
            "-o",
            &p(out),
            "--threads",
            threads,
            "--chunk-bytes",
            "4096",
            "--shard-tokens",
            "10000",
        ]);
        assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
        o
    };
    let (one, two) = (dir.join("one"), dir.join("two"));
    write("1", &one);
    let o = write("2", &two);
    let names = |d: &Path| {
        let mut names: Vec<String> = std::fs::read_dir(d)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        names
    };
    let listed = names(&one);
    assert_eq!(listed, names(&two));
    for name in &listed {
        assert_eq!(
            std::fs::read(one.join(name)).unwrap(),
            std::fs::read(two.join(name)).unwrap(),
            "{name} depends on the thread count"
        );
    }

    // Read back, the shards are the chunks' encodings: validation is the last tenth.
    let chunked: Vec<u32> = line_chunks(&text, 4096)
        .into_iter()
        .flat_map(|range| tokenizer.encode(&text[range]).expect("encodes"))
        .collect();
    assert!(line_chunks(&text, 4096).len() > 10, "several chunks");
    // The built-in corpus never starts a line with a space, so chunks change nothing here.
    assert_eq!(chunked, tokenizer.encode(&text).expect("encodes"));
    let shard = |name: &str| read_shard(&one.join(name)).expect("a valid shard");
    let train_names: Vec<&String> = listed.iter().filter(|n| n.contains("_train_")).collect();
    assert_eq!(train_names[0], "corpus_train_000000.bin");
    assert!(train_names.len() >= 2, "{listed:?}");
    let mut read: Vec<u32> = train_names.iter().flat_map(|n| shard(n)).collect();
    let val = shard("corpus_val_000000.bin");
    assert_eq!(val.len(), (chunked.len() as f64 * 0.1).round() as usize);
    read.extend(&val);
    assert_eq!(read, chunked);
    // llm.c's u16 format: magic 20240520, version 1.
    let bytes = std::fs::read(one.join("corpus_val_000000.bin")).unwrap();
    assert_eq!(bytes[0..4], 20_240_520i32.to_le_bytes());
    assert_eq!(bytes[4..8], 1i32.to_le_bytes());
    assert!(listed.contains(&"tokenizer.json".to_string()));
    assert!(stderr(&o).contains("on 2 threads"), "{}", stderr(&o));

    // Training on the shards is training on the text with the tokenizer: the same tokens,
    // split alike, so the same losses.
    let (from_shards, from_text) = (dir.join("from-shards"), dir.join("from-text"));
    let pattern = p(&one.join("*.bin"));
    let o = train(320, &from_shards, &["--data", &pattern]);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(0), "{err}");
    assert!(err.contains("by name"), "{err}");
    assert!(
        err.contains(&format!("tokenizer: {}", p(&one.join("tokenizer.json")))),
        "{err}"
    );
    assert!(from_shards.join("tokenizer.json").exists());
    let text_data = ["--data", &p(&text_path), "--tokenizer", &p(&tok_path)];
    let o = train(320, &from_text, &text_data);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert_eq!(losses(&from_shards), losses(&from_text));
    assert_eq!(losses(&from_text).len(), 3);

    // Shards with --tokenizer are a usage error.
    let o = train(
        320,
        &dir.join("both"),
        &["--data", &pattern, "--tokenizer", &p(&tok_path)],
    );
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("drop --tokenizer"), "{}", stderr(&o));
}

/// The words of the hand-written WordLevel tokenizer; id 0 is `[UNK]`, and `<|end|>` is an
/// added token after them.
const WORDS: [&str; 12] = [
    "[UNK]", "the", "a", "cat", "dog", "bird", "sat", "ran", "on", "mat", "log", ".",
];

/// A WordLevel tokenizer.json written by hand: whitespace-split words, no decoder (decoding
/// joins words with spaces).
fn word_level(dir: &Path) -> PathBuf {
    let vocab: Vec<String> = WORDS
        .iter()
        .enumerate()
        .map(|(i, w)| format!("{w:?}: {i}"))
        .collect();
    let json = format!(
        r#"{{"version": "1.0", "truncation": null, "padding": null,
  "added_tokens": [{{"id": {}, "content": "<|end|>", "single_word": false, "lstrip": false,
    "rstrip": false, "normalized": false, "special": true}}],
  "normalizer": null, "pre_tokenizer": {{"type": "Whitespace"}}, "post_processor": null,
  "decoder": null,
  "model": {{"type": "WordLevel", "vocab": {{{}}}, "unk_token": "[UNK]"}}}}"#,
        WORDS.len(),
        vocab.join(", ")
    );
    let path = dir.join("words.json");
    std::fs::write(&path, json).unwrap();
    path
}

/// Sentences of the WordLevel tokenizer's words, one a line.
fn word_text(lines: usize) -> String {
    let (subjects, verbs, places) = (["cat", "dog", "bird"], ["sat", "ran"], ["mat", "log"]);
    (0..lines)
        .map(|i| {
            format!(
                "the {} {} on a {} .\n",
                subjects[i % 3],
                verbs[i / 3 % 2],
                places[i / 7 % 2]
            )
        })
        .collect()
}

#[test]
fn sample_export_and_import_use_the_runs_tokenizer() {
    let dir = scratch("tokenizer", "sample");
    let words = word_level(&dir);
    let text_path = dir.join("words.txt");
    std::fs::write(&text_path, word_text(800)).unwrap();
    let run = dir.join("run");
    let data = ["--data", &p(&text_path), "--tokenizer", &p(&words)];
    // The vocabulary is the tokenizer's exactly, so every id the model draws decodes.
    let o = train(WORDS.len() + 1, &run, &data);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));

    // Byte-level, "the cat" has bytes far outside a 13-token vocabulary: that it samples
    // shows the prompt went through the tokenizer, and every word printed is one of its.
    let sample = |run: &Path, extra: &[&str]| {
        let mut args = vec!["sample", run.to_str().unwrap(), "--prompt", "the cat"];
        args.extend(["--max-tokens", "12", "--seed", "5"]);
        args.extend_from_slice(extra);
        kiln(&args)
    };
    let o = sample(&run, &[]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let out = stdout(&o);
    let rest = out.strip_prefix("the cat").expect("the prompt first");
    let printed: Vec<&str> = rest.split_whitespace().collect();
    assert_eq!(printed.len(), 12, "{out:?}");
    for word in &printed {
        assert!(
            WORDS.contains(word) || *word == "<|end|>",
            "{word:?} in {out:?}"
        );
    }
    // GRPO's tasks are byte-level: a run with a tokenizer is refused, not fed bytes.
    let o = kiln(&["rl", "--from", &p(&run), "--out", &p(&dir.join("rl"))]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stderr(&o).contains("byte-level"), "{}", stderr(&o));
    // --tokenizer names the same file explicitly: the same text.
    let o = sample(&run, &["--tokenizer", &p(&words)]);
    assert_eq!(stdout(&o), out);
    // Without the copy, the run is byte-level, and the prompt does not fit.
    let bare = dir.join("bare");
    std::fs::create_dir_all(&bare).unwrap();
    for file in ["spec.toml", "checkpoint.safetensors"] {
        std::fs::copy(run.join(file), bare.join(file)).unwrap();
    }
    let o = sample(&bare, &[]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stderr(&o).contains("outside the model's vocabulary of 13"));

    // export-hf writes the tokenizer beside config.json; import-hf carries it into the run.
    let (hf, back) = (dir.join("hf"), dir.join("back"));
    let o = kiln(&["export-hf", &p(&run), "-o", &p(&hf)]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert_eq!(
        std::fs::read(hf.join("tokenizer.json")).unwrap(),
        std::fs::read(&words).unwrap()
    );
    let o = kiln(&["import-hf", &p(&hf), "-o", &p(&back)]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("carried into the run"),
        "{}",
        stderr(&o)
    );
    assert!(back.join("tokenizer.json").exists());
    let o = sample(&back, &[]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert_eq!(stdout(&o), out, "the imported run samples as the original");
}

#[test]
fn bad_tokenizers_and_paths_are_clear_errors() {
    let dir = scratch("tokenizer", "errors");
    let (text_path, _) = corpus(&dir, "corpus.txt", 3, 5_000);
    let broken = dir.join("broken.json");
    std::fs::write(&broken, "{\"model\": {\"type\": \"BPE\", \"vocab\": 3}}").unwrap();
    let missing = dir.join("missing.json");
    let clean = |o: &Output| {
        let err = stderr(o);
        assert!(
            !err.contains("panicked") && !err.contains("RUST_BACKTRACE"),
            "{err}"
        );
        err
    };
    for tokenizer in [&broken, &missing] {
        let o = train(
            320,
            &dir.join("run"),
            &["--data", &p(&text_path), "--tokenizer", &p(tokenizer)],
        );
        assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
        assert!(clean(&o).contains(&p(tokenizer)), "{}", stderr(&o));
        let out = dir.join("shards");
        let o = kiln(&[
            "tokenize",
            &p(&text_path),
            "--tokenizer",
            &p(tokenizer),
            "-o",
            &p(&out),
        ]);
        assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
        assert!(clean(&o).contains(&p(tokenizer)), "{}", stderr(&o));
        assert!(!out.exists(), "nothing written");
    }
    assert!(stderr(&train(
        320,
        &dir.join("run"),
        &["--data", &p(&text_path), "--tokenizer", &p(&broken)]
    ))
    .contains("tokenizer.json"));

    let words = word_level(&dir);
    let tokenize = |corpus: &Path, out: &Path| {
        kiln(&[
            "tokenize",
            &p(corpus),
            "--tokenizer",
            &p(&words),
            "-o",
            &p(out),
        ])
    };
    // An unreadable corpus, a corpus that is not UTF-8, and an output under a file.
    let o = tokenize(&dir.join("nowhere.txt"), &dir.join("a"));
    assert_eq!(o.status.code(), Some(1));
    assert!(clean(&o).contains("nowhere.txt"), "{}", stderr(&o));
    let latin1 = dir.join("latin1.txt");
    std::fs::write(&latin1, b"the cat\nsat on the mat \xe9\n").unwrap();
    let o = tokenize(&latin1, &dir.join("b"));
    assert_eq!(o.status.code(), Some(1));
    let err = clean(&o);
    assert!(
        err.contains("latin1.txt") && err.contains("offset 23"),
        "{err}"
    );
    assert!(!dir.join("b").exists(), "nothing written");
    let under_a_file = text_path.join("shards");
    let o = tokenize(&text_path, &under_a_file);
    assert_eq!(o.status.code(), Some(1));
    assert!(clean(&o).contains(&p(&text_path)), "{}", stderr(&o));
    // Two corpora with one stem would write the same shards.
    let other = dir.join("sub");
    std::fs::create_dir_all(&other).unwrap();
    std::fs::copy(&text_path, other.join("corpus.txt")).unwrap();
    let o = kiln(&[
        "tokenize",
        &p(&text_path),
        &p(&other.join("corpus.txt")),
        "--tokenizer",
        &p(&words),
        "-o",
        &p(&dir.join("c")),
    ]);
    assert_eq!(o.status.code(), Some(2));
    assert!(clean(&o).contains("`corpus`"), "{}", stderr(&o));
}
