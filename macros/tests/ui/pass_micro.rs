// A spec expands to a module that compiles, with its constants and its training step.
kiln_macros::model!("../tests/specs/micro.toml");

fn main() {
    assert_eq!(micro::NAME, "micro");
    assert_eq!(micro::D_MODEL, 32);
    let step: Box<dyn kiln_runtime::exec::Run> = Box::new(micro::Train::new());
    drop(step);
}
