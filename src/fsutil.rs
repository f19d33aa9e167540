//! The files commands write on a user's behalf: created directories, outputs written into a
//! temporary sibling and renamed into place (so a failure leaves nothing half-written), and
//! errors that name the path.

use std::path::{Path, PathBuf};

use crate::{other, Failure};

/// Creates `dir` and its parents.
pub(crate) fn create_dir(dir: &Path) -> Result<(), Failure> {
    std::fs::create_dir_all(dir).map_err(|e| other(format!("cannot create {}: {e}", dir.display())))
}

/// Creates (or truncates) the file at `path`, for a log written line by line.
pub(crate) fn create_file(path: &Path) -> Result<std::fs::File, Failure> {
    std::fs::File::create(path).map_err(|e| other(format!("cannot write {}: {e}", path.display())))
}

/// Writes `bytes` to `path`, replacing it.
pub(crate) fn write(path: &Path, bytes: &[u8]) -> Result<(), Failure> {
    std::fs::write(path, bytes).map_err(|e| other(format!("cannot write {}: {e}", path.display())))
}

/// A temporary sibling of `path` (same directory, so renaming it into place is atomic).
fn partial(path: &Path) -> PathBuf {
    let leaf = path
        .file_name()
        .map_or("out".into(), |n| n.to_string_lossy().into_owned());
    path.with_file_name(format!(".{leaf}.partial-{}", std::process::id()))
}

/// Writes `bytes` to `path` through a temporary sibling renamed into place: readers see the
/// old file or the whole new one, never a part.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = partial(path);
    let result = std::fs::write(&tmp, bytes).and_then(|()| std::fs::rename(&tmp, path));
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Copies the file `from` to `to` through a temporary sibling of `to` renamed into place.
pub(crate) fn copy_atomic(from: &Path, to: &Path) -> std::io::Result<()> {
    let tmp = partial(to);
    let result = std::fs::copy(from, &tmp).and_then(|_| std::fs::rename(&tmp, to));
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Refuses an output directory that exists and is not empty.
pub(crate) fn fresh_dir(out: &Path) -> Result<(), Failure> {
    if let Ok(mut entries) = std::fs::read_dir(out) {
        if entries.next().is_some() {
            return Err(other(format!(
                "{} exists and is not empty; remove it or choose another output",
                out.display()
            )));
        }
    } else if out.exists() {
        return Err(other(format!(
            "{} exists and is not a directory",
            out.display()
        )));
    }
    Ok(())
}

/// Writes `files` (name, bytes) into `out` through a temporary sibling directory renamed into
/// place at the end.
pub(crate) fn write_dir(out: &Path, files: &[(&str, Vec<u8>)]) -> Result<(), Failure> {
    write_dir_with(out, |tmp| {
        for (name, bytes) in files {
            std::fs::write(tmp.join(name), bytes)
                .map_err(|e| other(format!("cannot write {name} in {}: {e}", tmp.display())))?;
        }
        Ok(())
    })
}

/// Fills a temporary sibling directory of `out` with `fill` and renames it into place at the
/// end (replacing an empty directory at `out`); on failure the sibling is removed.
pub(crate) fn write_dir_with(
    out: &Path,
    fill: impl FnOnce(&Path) -> Result<(), Failure>,
) -> Result<(), Failure> {
    let fail = |what: &str, e: std::io::Error| other(format!("cannot {what}: {e}"));
    let parent = out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).map_err(|e| {
        fail(
            &format!("create {} (for {})", parent.display(), out.display()),
            e,
        )
    })?;
    let leaf = out
        .file_name()
        .map_or("out".into(), |n| n.to_string_lossy().into_owned());
    let tmp = parent.join(format!(".{leaf}.partial-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir(&tmp).map_err(|e| {
        fail(
            &format!(
                "create {} (to write {} through it)",
                tmp.display(),
                out.display()
            ),
            e,
        )
    })?;
    let result = fill(&tmp).and_then(|()| {
        // An empty directory at `out` (allowed by `fresh_dir`) is replaced.
        if out.is_dir() {
            std::fs::remove_dir(out).map_err(|e| fail(&format!("replace {}", out.display()), e))?;
        }
        std::fs::rename(&tmp, out)
            .map_err(|e| fail(&format!("move the result to {}", out.display()), e))
    });
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    result
}
