//! What a process holds open in a spool: shared by the spool's tests and the server's, which
//! include this file with `#[path = "..."] mod open_files;`.

use std::path::Path;

/// Files under `dir` that process `pid` holds open with no name left (deleted, their space not
/// free). Segments are opened under a temporary name and then linked to their own, so the
/// kernel's " (deleted)" on the open name proves nothing alone: the link count does.
pub(crate) fn deleted_but_open(pid: u32, dir: &Path) -> Vec<String> {
    use std::os::unix::fs::MetadataExt;
    let prefix = dir.to_string_lossy().into_owned();
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .flatten()
        .filter_map(|fd| {
            let target = std::fs::read_link(fd.path()).ok()?;
            let nlink = std::fs::metadata(fd.path()).ok()?.nlink();
            Some((target.to_string_lossy().into_owned(), nlink))
        })
        .filter(|(t, nlink)| t.starts_with(&prefix) && *nlink == 0)
        .map(|(t, _)| t)
        .collect()
}
