// The argument is a string literal.
kiln_macros::model!(specs::tiny);

fn main() {}
