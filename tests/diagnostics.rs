//! Diagnostics as a user reads them: exact positions, all errors at once, suggestions.

use kiln_compiler::check::check_str;
use kiln_compiler::diag::{render, Rule};

const TINY: &str = include_str!("../specs/tiny.toml");

/// 1-based (line, col) of the first occurrence of `needle` in `text`, plus `offset` chars.
fn pos(text: &str, needle: &str, offset: usize) -> (usize, usize) {
    let at = text.find(needle).unwrap();
    let line = text[..at].matches('\n').count() + 1;
    let col = at - text[..at].rfind('\n').map_or(0, |i| i + 1) + 1 + offset;
    (line, col)
}

#[test]
fn independent_errors_are_reported_together_in_file_order() {
    let text = TINY
        .replace(
            "layers = \"dense, moe*3\"",
            "layers = \"dense, moe*3, dnse\"",
        )
        .replace("kv_rank = 64", "kv_rank = 0")
        .replace("act = \"silu(gate) * up\"", "act = \"silu(gate) * upp\"")
        .replace("warmup = 100", "warmup = 5000");
    let diags = check_str(&text).unwrap_err();
    let rules: Vec<Rule> = diags.iter().map(|d| d.rule).collect();
    assert_eq!(
        rules,
        [Rule::Dsl, Rule::Range, Rule::Dsl, Rule::Bound],
        "{diags:#?}"
    );
    // DSL errors point inside the string, at the offending word.
    assert_eq!(diags[0].line_col(&text), pos(&text, "dnse", 0));
    assert_eq!(diags[2].line_col(&text), pos(&text, "upp\"", 0));
    assert_eq!(diags[0].help.as_deref(), Some("did you mean `dense`?"));
    assert_eq!(diags[2].help.as_deref(), Some("did you mean `up`?"));
    let shown = render("tiny.toml", &text, &diags, false);
    assert!(shown.ends_with("4 errors in tiny.toml\n"), "{shown}");
}

#[test]
fn dsl_columns_are_exact_and_fall_back_to_the_literal_with_escapes() {
    let plain = TINY.replace("\"silu(gate) * up\"", "\"silu(gate) * up + foo(up)\"");
    let d = &check_str(&plain).unwrap_err()[0];
    assert_eq!(d.line_col(&plain), pos(&plain, "foo(", 0));
    // With an escape in the literal, raw and decoded offsets differ: underline the literal.
    let escaped = TINY.replace("\"silu(gate) * up\"", "\"silu(gate) \\u002A up + foo(up)\"");
    let d = &check_str(&escaped).unwrap_err()[0];
    assert_eq!(
        d.line_col(&escaped),
        pos(&escaped, "\"silu(gate) \\u002A", 0)
    );
}

#[test]
fn a_misspelled_required_key_is_one_error() {
    let text = TINY.replace("kv_rank = 64", "kvrank = 64");
    let diags = check_str(&text).unwrap_err();
    assert_eq!(diags.len(), 1, "{diags:#?}");
    assert_eq!(diags[0].rule, Rule::UnknownKey);
    assert_eq!(diags[0].help.as_deref(), Some("did you mean `kv_rank`?"));
}

#[test]
fn unicode_before_an_error_counts_columns_in_chars() {
    let text = TINY
        .replace("name = \"tiny\"", "name = \"tïny — ü\"")
        .replace("heads = 4\n", "heads = 4\nbias = \"yes\"\n");
    let diags = check_str(&text).unwrap_err();
    assert_eq!(diags.len(), 1);
    assert_eq!(diags[0].line_col(&text), pos(&text, "\"yes\"", 0));
}

#[test]
fn a_model_without_moe_layers_needs_no_moe_section_and_vice_versa() {
    let dense = TINY.replace("\"dense, moe*3\"", "\"dense*4\"");
    let d = check_str(&dense).unwrap_err();
    // [moe] now has no effect; [mtp] defaults its block to the last layer (dense). The keep
    // pattern `moe.router` selects nothing either, and is reported in the same pass.
    assert_eq!(d.len(), 2, "{d:#?}");
    let rules: Vec<Rule> = d.iter().map(|x| x.rule).collect();
    assert!(rules.contains(&Rule::Conflict) && rules.contains(&Rule::UnmatchedPattern));
}

#[test]
fn missing_keys_of_one_section_are_one_error() {
    let text = TINY
        .replace("d_model = 256\n", "")
        .replace("max_positions = 256\n", "");
    let diags = check_str(&text).unwrap_err();
    assert_eq!(diags.len(), 1, "{diags:#?}");
    assert_eq!(diags[0].rule, Rule::MissingKey);
    assert_eq!(
        diags[0].message,
        "missing required keys `d_model` and `max_positions` in [model]"
    );
    assert_eq!(diags[0].line_col(&text), pos(&text, "model]", 0));
}

#[test]
fn a_misspelled_needed_section_is_one_error() {
    let text = TINY.replace("[ffn]", "[fnn]");
    let diags = check_str(&text).unwrap_err();
    assert_eq!(diags.len(), 1, "{diags:#?}");
    assert_eq!(diags[0].rule, Rule::UnknownSection);
    assert_eq!(diags[0].help.as_deref(), Some("did you mean `[ffn]`?"));
}

/// Independent mistakes are reported in one pass: a rule runs when the values it reads are
/// valid, not when the whole spec is.
#[test]
fn independent_mistakes_are_reported_in_one_pass() {
    // `experts % groups` does not wait for a `top_k` of the wrong type.
    let text = TINY
        .replace("top_k = 2\n", "top_k = \"2\"\n")
        .replace("groups = 2\n", "groups = 3\n");
    let d = check_str(&text).unwrap_err();
    let rules: Vec<Rule> = d.iter().map(|x| x.rule).collect();
    assert_eq!(rules, [Rule::Type, Rule::Divisible], "{d:#?}");

    // The FP8 tiling rule does not wait for [train], [rl] or [parallel].
    let text = TINY
        .replace("hidden = 512\n", "hidden = 500\n")
        .replace("lr = ", "lr = 5.0 #")
        .replace(
            "[train]",
            "[rl]\ngroup = 1\n\n[parallel]\nep = 3\n\n[train]",
        );
    let d = check_str(&text).unwrap_err();
    let mut rules: Vec<&str> = d.iter().map(|x| x.rule.name()).collect();
    rules.sort();
    assert_eq!(
        rules,
        ["fp8-tile", "layout", "layout", "range", "range"],
        "{d:#?}"
    );
}

const V3: &str = include_str!("../specs/deepseek-v3.toml");

/// A tile or block size that fails many dimensions is the cause: one error at its key, with
/// the size that tiles them all.
#[test]
fn a_bad_fp8_block_is_one_error_at_its_key() {
    let text = V3.replace("weight_block = [128, 128]", "weight_block = [128, 96]");
    let d = check_str(&text).unwrap_err();
    assert_eq!(d.len(), 1, "{d:#?}");
    assert_eq!(d[0].rule, Rule::Fp8Tile);
    assert_eq!(&text[d[0].span.clone()], "[128, 96]");
    let help = d[0].help.as_deref().unwrap();
    assert!(help.contains("`weight_block = [128, 128]`"), "{help}");
    let fixed = text.replace("[128, 96]", "[128, 128]");
    assert!(check_str(&fixed).is_ok());
}

/// A dimension that does not tile gets the nearest dimensions that do, and keep patterns that
/// cover every op it fails: following either suggestion checks in one round.
#[test]
fn following_an_fp8_tiling_help_fixes_it_in_one_round() {
    let text = V3.replace("expert_hidden = 2048", "expert_hidden = 1400");
    let d = check_str(&text).unwrap_err();
    assert_eq!(d.len(), 1, "{d:#?}");
    let help = d[0].help.as_deref().unwrap();
    assert!(
        help.contains("set `moe.expert_hidden` to 1408 or 1280"),
        "{help}"
    );
    let adding = help.split("by adding ").nth(1).unwrap();
    let patterns = adding.split(" to `precision.keep`").next().unwrap();
    assert_eq!(patterns, "\"moe.experts\", \"moe.shared\"");
    let kept = text.replace("\"attn.kv_a\"]", &format!("\"attn.kv_a\", {patterns}]"));
    assert!(
        check_str(&kept).is_ok(),
        "{:#?}",
        check_str(&kept).unwrap_err()
    );
    let resized = text.replace("expert_hidden = 1400", "expert_hidden = 1408");
    assert!(check_str(&resized).is_ok());
}
