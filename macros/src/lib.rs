//! kiln-macros: `model!("specs/x.toml")`, a thin shell over kiln-compiler's Rust emitter
//! that expands a spec into a specialized training module.
//!
//! The macro parses its one argument (a spec path relative to the invoking crate's
//! `Cargo.toml`, or to `$KILN_SPEC_BASE_DIR` when that is set), checks and compiles the spec with kiln-compiler, and returns what
//! `kiln_compiler::emit_rust::emit` makes of the training Program. A spec error becomes a
//! `compile_error!` carrying the same rendered diagnostic `kiln check` prints (with the spec's
//! file:line:col). A spec may `extends` another, as for the CLI. The expansion includes the
//! bytes of every spec it read with `include_bytes!`, so cargo rebuilds the crate when one
//! changes.

use std::path::PathBuf;

use kiln_compiler::check::extends::{self, Loaded};
use kiln_compiler::source::SpecSource;

use proc_macro::TokenStream;
use quote::quote;
use syn::{parse_macro_input, LitStr};

/// Expands to `pub mod <model name> { … }`: the model's dimensions as constants, its
/// parameter names and shapes, and `Train`, the training graph as straight-line code
/// implementing `kiln_runtime::exec::Run`. The invoking crate depends on `kiln-runtime`.
///
/// ```ignore
/// kiln_macros::model!("specs/tiny.toml");
/// let step = tiny::Train::new(); // a kiln_runtime::exec::Run
/// ```
#[proc_macro]
pub fn model(input: TokenStream) -> TokenStream {
    let arg = parse_macro_input!(input as LitStr);
    match expand(&arg.value()) {
        Ok(tokens) => tokens.into(),
        Err(message) => syn::Error::new(arg.span(), message)
            .to_compile_error()
            .into(),
    }
}

/// The variable that, when set, replaces `CARGO_MANIFEST_DIR` as the directory spec paths are
/// relative to (trybuild compiles test crates far from the sources they name).
const BASE_DIR_VAR: &str = "KILN_SPEC_BASE_DIR";

fn expand(relative: &str) -> Result<proc_macro2::TokenStream, String> {
    let base = std::env::var_os(BASE_DIR_VAR)
        .or_else(|| std::env::var_os("CARGO_MANIFEST_DIR"))
        .map_or_else(PathBuf::new, PathBuf::from);
    // The spec and every spec its `extends` chain names, for rebuilds.
    let mut read = Vec::new();
    // Named as written (relative to the base directory), read at `base.join(name)`.
    let mut load = |name: PathBuf| -> Result<Loaded, String> {
        let at = base.join(&name);
        let text = std::fs::read_to_string(&at).map_err(|e| format!("{}: {e}", at.display()))?;
        let id = at
            .canonicalize()
            .unwrap_or(at)
            .to_string_lossy()
            .into_owned();
        read.push(id.clone());
        let name = name.display().to_string();
        Ok(Loaded { id, name, text })
    };
    let first =
        load(PathBuf::from(relative)).map_err(|e| format!("kiln::model!: cannot read spec {e}"))?;
    let resolved = extends::resolve(first, &mut |from, target| {
        let dir = std::path::Path::new(&from.name).parent().map(PathBuf::from);
        load(dir.unwrap_or_default().join(target))
    });
    let invalid = |src: SpecSource, diags: Vec<_>| {
        let rendered = src.render(&diags, false);
        format!("kiln::model!: the spec {relative} is invalid\n{rendered}")
    };
    let src = resolved.map_err(|(src, diags)| invalid(src, diags))?;
    let model = kiln_compiler::check::check_str(src.text()).map_err(|d| invalid(src.clone(), d))?;
    let compiled = kiln_compiler::program::compile(&model)
        .map_err(|e| format!("kiln::model!: cannot compile {relative}: {e}"))?;
    let module = kiln_compiler::emit_rust::emit(&compiled);
    Ok(quote! {
        #module
        // Rebuild when the spec, or a spec it extends, changes.
        #(const _: &[u8] = include_bytes!(#read);)*
    })
}

#[cfg(test)]
mod tests {
    use super::expand;

    #[test]
    fn a_spec_expands_to_its_module() {
        let tokens = expand("../tests/specs/micro.toml").unwrap().to_string();
        assert!(tokens.starts_with("# [allow"), "{}", &tokens[..80]);
        assert!(tokens.contains("pub mod micro"));
        assert!(tokens.contains("include_bytes !"));
    }

    #[test]
    fn an_invalid_spec_becomes_the_rendered_diagnostic() {
        let e = expand("../tests/invalid/04-unknown-key-kv-rnak.toml").unwrap_err();
        assert!(e.starts_with("kiln::model!: the spec"), "{e}");
        // The same rendering `kiln check` prints: file:line:col, the rule and the suggestion.
        assert!(
            e.contains("../tests/invalid/04-unknown-key-kv-rnak.toml:"),
            "{e}"
        );
        assert!(e.contains("unknown key `kv_rnak`"), "{e}");
        assert!(e.contains("did you mean `kv_rank`?"), "{e}");
    }

    #[test]
    fn a_missing_spec_is_named() {
        let e = expand("no/such/spec.toml").unwrap_err();
        assert!(
            e.contains("cannot read spec") && e.contains("no/such/spec.toml"),
            "{e}"
        );
    }
}
