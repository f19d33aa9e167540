// A model name that tries to inject code stays a string literal.
kiln_macros::model!("../tests/specs/hostile-name.toml");

fn main() {
    assert_eq!(
        std_process_exit_1_include_x::NAME,
        "\"; std::process::exit(1); \" */ #include <x> }"
    );
}
