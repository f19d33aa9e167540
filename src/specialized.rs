//! The entry of the training binaries `kiln build` makes: their generated `main` calls
//! `kiln::specialized::main(kiln::specialized::Specialized { .. })`, so they take the flags of
//! `kiln train` (and `bench`, `kiln bench`'s) and write the same files.

use crate::cmd::{bench, train};
use crate::other;

pub use crate::engine::Specialized;

/// The flags of a specialized training binary: those of `kiln train`, without the spec (it
/// is built in).
#[derive(clap::Parser)]
#[command(
    version,
    about = "Train the model this binary was built for (see `kiln build`)",
    args_conflicts_with_subcommands = true
)]
struct SpecializedCli {
    #[command(subcommand)]
    command: Option<SpecializedCommand>,
    #[command(flatten)]
    run: train::RunArgs,
}

#[derive(clap::Subcommand)]
enum SpecializedCommand {
    /// Time training steps with this binary's generated step: `kiln bench`'s report.
    Bench(bench::Flags),
}

/// The `main` of a specialized training binary: `kiln train` with the built-in spec and the
/// generated step. The same flags, the same metrics, checkpoints and run directories, and the
/// same losses bit for bit.
pub fn main(built: Specialized) -> std::process::ExitCode {
    use clap::Parser;
    kiln_runtime::memory::keep_freed_memory();
    let cli = SpecializedCli::parse();
    if let Some(SpecializedCommand::Bench(flags)) = cli.command {
        let result = kiln_compiler::check::check(built.spec.as_bytes())
            .map_err(|_| other("the built-in spec does not check; rebuild with `kiln build`"))
            .and_then(|model| bench::run_model("built-in spec", &model, &flags, Some(&built)));
        return crate::exit_code(result);
    }
    let color = std::io::IsTerminal::is_terminal(&std::io::stderr())
        && std::env::var_os("NO_COLOR").is_none();
    crate::exit_code(train::run_with(None, cli.run, color, Some(&built)))
}
