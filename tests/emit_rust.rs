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
    emit_text(&compile(m).unwrap()).unwrap()
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

/// The names of the methods outlined from layer runs in the first `impl` of `runner`.
fn outlined_methods(text: &str, runner: &str) -> Vec<String> {
    let start = text
        .find(&format!("impl {runner} {{"))
        .unwrap_or_else(|| panic!("no impl {runner}"));
    let end = start + text[start..].find("\n    }\n").expect("the impl ends");
    text[start..end]
        .lines()
        .filter_map(|l| l.trim().strip_prefix("fn "))
        .filter_map(|l| l.split('(').next())
        .filter(|name| name.starts_with("layers_") || name.starts_with("mtp_"))
        .map(str::to_string)
        .collect()
}

#[test]
fn layers_that_compute_alike_share_one_method() {
    // DeepSeek-V3: the first dense layer (it also normalizes the embedding), the other two
    // dense layers, the 58 MoE layers and the MTP module, forward and backward; code grows
    // with the kinds of layer, not with their 61 instances.
    let text = emitted(&model("specs/deepseek-v3.toml"));
    let train = outlined_methods(&text, "Train");
    assert_eq!(
        train,
        [
            "layers_0_forward",
            "layers_1_forward",
            "layers_3_forward",
            "mtp_0_forward",
            "mtp_0_backward",
            "layers_60_backward",
            "layers_2_backward",
        ],
        "{train:?}"
    );
    assert!(text.contains(
        "/// The forward pass of `layers.3` to `layers.60` (the comments name the ops of `layers.3`)."
    ));
    assert!(text.contains("/// The backward pass of `layers.60` to `layers.3`"));
    // GPT-2's twelve identical blocks: one method each way.
    let text = emitted(&model("specs/gpt2-124m.toml"));
    assert_eq!(
        outlined_methods(&text, "Train"),
        ["layers_0_forward", "layers_11_backward"]
    );
}

#[test]
fn hostile_model_names_stay_string_literals() {
    let text = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/specs/micro.toml"),
    )
    .unwrap();
    let hostile = [
        r#""; std::process::exit(1); ""#,
        "*/ panic!()",
        "#include <x>",
        "} fn evil() {",
        "\\\" r#\"#",
        "micro-2",
        "9lives",
        "fn",
        "self",
        "ünïcödé",
    ];
    for name in hostile {
        let spec = text.replace(
            "name = \"micro\"",
            &format!("name = {}", kiln_compiler::names::toml_str_literal(name)),
        );
        let m = check(spec.as_bytes()).unwrap_or_else(|_| panic!("{name:?} is a valid name"));
        assert_eq!(m.name, name);
        let code = emitted(&m);
        let file = syn::parse_file(&code).unwrap_or_else(|e| panic!("{name}: {e}"));
        let syn::Item::Mod(module) = &file.items[0] else {
            panic!("{name}: the first item is the module");
        };
        assert_eq!(module.ident.to_string(), module_ident(name), "{name}");
        // The name appears once, as the value of a string literal.
        let consts: Vec<String> = module
            .content
            .iter()
            .flat_map(|(_, items)| items)
            .filter_map(|item| match item {
                syn::Item::Const(c) if c.ident == "NAME" => match &*c.expr {
                    syn::Expr::Lit(syn::ExprLit {
                        lit: syn::Lit::Str(s),
                        ..
                    }) => Some(s.value()),
                    _ => None,
                },
                _ => None,
            })
            .collect();
        assert_eq!(consts, [name.to_string()], "{name}");
    }
    // Names with control characters (a newline could end a comment) are refused by the checker.
    let spec = text.replace("name = \"micro\"", "name = \"a\\nb\"");
    assert!(check(spec.as_bytes()).is_err());
    assert_eq!(module_ident("fn"), "fn_");
    assert_eq!(module_ident("9lives"), "n_9lives");
    assert_eq!(module_ident("gpt2-124m"), "gpt2_124m");
}

#[test]
fn a_policy_gradient_graph_emits_a_module_that_reads_token_weights() {
    let m = model("tests/specs/micro.toml");
    let text = emit_text(&kiln_compiler::program::compile_policy(&m).unwrap()).unwrap();
    syn::parse_file(&text).unwrap_or_else(|e| panic!("{e}"));
    assert!(
        text.contains("op_fns::cross_entropy_weighted("),
        "forward loss"
    );
    assert!(
        text.contains("op_fns::cross_entropy_weighted_grad("),
        "its gradient"
    );
    assert!(
        text.contains("fn token_weights"),
        "the feed's weights are read and checked"
    );
    // Spec graphs never weigh tokens, so their modules have no such helper.
    assert!(!emitted(&m).contains("fn token_weights"));
}
