//! The spool holds mail: whatever the umask, what postern makes in it is its user's alone,
//! and the core directories of a spool made before are closed to other users at start.
#![allow(clippy::unwrap_used)]

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use common::Server;

/// The permission bits of `path`.
fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

/// Every directory and file below `dir`, `dir` itself first.
fn everything_under(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = vec![dir.to_path_buf()];
    let mut k = 0;
    while k < out.len() {
        if out[k].is_dir() {
            let mut entries: Vec<_> = std::fs::read_dir(&out[k])
                .unwrap()
                .map(|e| e.unwrap().path())
                .collect();
            entries.sort();
            out.extend(entries);
        }
        k += 1;
    }
    out
}

/// Hands one message to `server` (held in its queue).
fn one_message(server: &Server) {
    let mut c = server.connect();
    assert!(c.line().starts_with("220"));
    c.send(b"EHLO client.test\r\n");
    c.reply();
    assert!(c.cmd("MAIL FROM:<a@origin.test>").starts_with("250"));
    assert!(c.cmd("RCPT TO:<b@dest.test>").starts_with("250"));
    assert!(c.cmd("DATA").starts_with("354"));
    c.send(b"Subject: private\r\n\r\nfor b only\r\n.\r\n");
    assert!(c.line().starts_with("250 2.0.0"));
    c.cmd("QUIT");
}

#[test]
fn a_spool_postern_makes_is_its_user_s_alone_whatever_the_umask() {
    // The usual umask leaves new files readable by everyone.
    rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o022));
    let dir = tempfile::tempdir().unwrap();
    let spool = dir.path().join("made").join("spool");
    let mut server = Server::start_in(&[], spool.clone(), None);
    one_message(&server);
    assert!(server.terminate().success());
    let made = everything_under(&dir.path().join("made"));
    assert!(
        made.iter()
            .any(|p| p.extension().is_some_and(|e| e == "seg")),
        "no segment in {made:?}"
    );
    for path in made {
        assert_eq!(
            mode(&path) & 0o077,
            0,
            "{} is open to others: {:o}",
            path.display(),
            mode(&path)
        );
    }
}

#[test]
fn the_core_directories_of_an_older_spool_are_closed_to_other_users_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let spool = dir.path().join("spool");
    let mut server = Server::start_in(&["--cores", "2"], spool.clone(), None);
    one_message(&server);
    assert!(server.terminate().success());
    // As a spool made before its directories were private, or by hand, would be.
    for core in ["0", "1"] {
        let path = spool.join(core);
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        assert_eq!(mode(&path), 0o755);
    }
    let mut server = Server::start_in(&["--cores", "2"], spool.clone(), None);
    for core in ["0", "1"] {
        assert_eq!(mode(&spool.join(core)), 0o700, "core {core}");
    }
    assert!(server.terminate().success());
}
