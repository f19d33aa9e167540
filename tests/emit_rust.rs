//! The Rust emitter (`kiln emit rust`, `kiln::model!`): its output for `tiny` and
//! `gpt2-124m` is reviewed as snapshots; every reference spec's module parses; and model names
//! that try to inject code stay inert. (That the generated code computes the interpreter's
//! bits is `runtime/tests/specialized.rs`.)

use std::path::Path;

use kiln_compiler::check::check;
use kiln_compiler::emit_rust::{emit_text, module_ident};
use kiln_compiler::model::Model;
use kiln_compiler::program::compile;

fn model(path: &str) -> Model {
    check(&std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join(path)).unwrap()).unwrap()
}

fn emitted(m: &Model) -> String {
    emit_text(m, &compile(m).unwrap().train).unwrap()
}

#[test]
fn generated_rust_snapshots() {
    insta::assert_snapshot!("emit-rust-tiny", emitted(&model("specs/tiny.toml")));
    insta::assert_snapshot!(
        "emit-rust-gpt2-124m",
        emitted(&model("specs/gpt2-124m.toml"))
    );
}

#[test]
fn every_reference_spec_emits_a_module_that_parses() {
    for spec in [
        "specs/deepseek-v3.toml",
        "specs/deepseek-v2.toml",
        "specs/deepseek-v2-lite.toml",
        "specs/llama3-8b.toml",
        "tests/specs/micro.toml",
        "tests/specs/gpt2-micro.toml",
    ] {
        let text = emitted(&model(spec));
        // One statement per node at most, never one per expert: DeepSeek-V3's 256 experts in
        // 58 MoE layers stay grouped calls.
        assert!(text.matches("moe::experts_fwd").count() < 200, "{spec}");
        syn::parse_file(&text).unwrap_or_else(|e| panic!("{spec}: {e}"));
    }
}

#[test]
fn hostile_model_names_stay_string_literals() {
    let text = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/specs/micro.toml"),
    )
    .unwrap();
    for name in ["micro-2", "9lives", "fn", "self", "x_y"] {
        let spec = text.replace("name = \"micro\"", &format!("name = {name:?}"));
        let Ok(m) = check(spec.as_bytes()) else {
            continue;
        };
        let code = emitted(&m);
        let file = syn::parse_file(&code).unwrap_or_else(|e| panic!("{name}: {e}"));
        let syn::Item::Mod(module) = &file.items[0] else {
            panic!("{name}: the first item is the module");
        };
        assert_eq!(module.ident.to_string(), module_ident(name), "{name}");
        assert!(
            code.contains(&format!("pub const NAME: &str = {name:?};")),
            "{name}"
        );
    }
    assert_eq!(module_ident("fn"), "fn_");
    assert_eq!(module_ident("9lives"), "model_9lives");
    assert_eq!(module_ident("gpt2-124m"), "gpt2_124m");
}
