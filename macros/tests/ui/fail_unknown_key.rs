// An invalid spec fails the build with kiln check's diagnostic.
kiln_macros::model!("../tests/invalid/04-unknown-key-kv-rnak.toml");

fn main() {}
