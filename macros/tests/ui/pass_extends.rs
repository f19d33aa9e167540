// A spec that extends another expands like the spec it resolves to.
kiln_macros::model!("../tests/extends/micro-wide.toml");

fn main() {
    assert_eq!(micro_wide::NAME, "micro_wide");
    assert_eq!(micro_wide::D_MODEL, 48);
}
