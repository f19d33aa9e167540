//! `kiln_macros::model!` as users meet it: specs that expand and compile, and specs that fail
//! with the diagnostic `kiln check` prints (the `.stderr` files are reviewed snapshots).

#[test]
fn ui() {
    // trybuild compiles each file in a crate of its own under target/; spec paths stay
    // relative to this crate.
    std::env::set_var("KILN_SPEC_BASE_DIR", env!("CARGO_MANIFEST_DIR"));
    let t = trybuild::TestCases::new();
    t.pass("tests/ui/pass_*.rs");
    t.compile_fail("tests/ui/fail_*.rs");
}
