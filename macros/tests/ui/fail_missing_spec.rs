// A spec that is not there is named.
kiln_macros::model!("no/such/spec.toml");

fn main() {}
