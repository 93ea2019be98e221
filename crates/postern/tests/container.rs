//! The container image (deploy/Containerfile) built and run by Podman: under the runtime's
//! default seccomp profile postern refuses to start and says which profile to use; under
//! deploy/seccomp.json it takes mail as an unprivileged user, relays for no one, stops
//! gracefully on `podman stop`, and the mail it acknowledged is in the spool volume for the
//! next container. Needs root, Podman, runc and debootstrap (scripts/test installs them) and
//! the Debian mirror: no registry can be reached here, so the image's base,
//! `debian:bookworm-slim`, is a minimal bookworm made by debootstrap, and the image takes the
//! binary under test (`--target prebuilt`) rather than building one. What the build is sent of
//! the source tree (`.dockerignore`) is checked apart.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::Client;

const IMAGE: &str = "localhost/postern:test";
const BASE: &str = "docker.io/library/debian:bookworm-slim";

/// Podman with a store of its own in a temporary directory, so that nothing is left behind
/// in the machine's.
struct Podman {
    dir: tempfile::TempDir,
}

impl Podman {
    fn new() -> Podman {
        Podman {
            dir: tempfile::tempdir().unwrap(),
        }
    }

    fn command(&self, args: &[&str]) -> Command {
        let at = |name: &str| self.dir.path().join(name);
        let mut cmd = Command::new("podman");
        cmd.arg("--root")
            .arg(at("storage"))
            .arg("--runroot")
            .arg(at("run"))
            .arg("--tmpdir")
            .arg(at("tmp"))
            .arg("--volumepath")
            .arg(at("volumes"))
            // crun refuses this machine's hybrid cgroup hierarchy (a v2 controller beside
            // the v1 ones); runc takes it. There is no systemd to manage cgroups or hold
            // events either.
            .args(["--runtime", "runc", "--cgroup-manager", "cgroupfs"])
            .args(["--events-backend", "file"])
            .args(args);
        cmd
    }

    /// Runs podman with `args` to its end, within `limit`: exit code, stdout, stderr.
    fn run_within(&self, args: &[&str], limit: Duration) -> (i32, String, String) {
        common::run_command_within(self.command(args), limit)
    }

    /// Like [`Podman::run_within`] for a command that must succeed; returns its stdout.
    fn ok(&self, args: &[&str]) -> String {
        let (code, out, err) = self.run_within(args, Duration::from_secs(120));
        assert_eq!(code, 0, "podman {args:?}: {err}{out}");
        out
    }
}

impl Drop for Podman {
    fn drop(&mut self) {
        // Containers' network set-up lives outside the directory, and the store mounts
        // inside it. (`podman system reset` would also remove the machine's own networks.)
        for args in [
            &["rm", "--all", "--force"][..],
            &["volume", "rm", "--all", "--force"],
            &["rmi", "--all", "--force"],
        ] {
            // Bounded: a podman stuck on its store must not hold the test run.
            if let Ok(mut child) = self
                .command(args)
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
            {
                let deadline = Instant::now() + Duration::from_secs(60);
                while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(50));
                }
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        unmount_under(self.dir.path());
    }
}

/// Unmounts whatever is mounted under `dir`, the latest first, so that the directory can be
/// removed.
fn unmount_under(dir: &Path) {
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let under: Vec<&str> = mounts
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .filter(|point| Path::new(point).starts_with(dir))
        .collect();
    for point in under.iter().rev() {
        let _ = Command::new("umount").arg(point).output();
    }
}

/// A temporary directory that is unmounted under before it is removed: debootstrap mounts
/// `/proc` and `/sys` in the tree it makes, and one killed at its bound leaves them.
struct WorkDir(tempfile::TempDir);

impl Drop for WorkDir {
    fn drop(&mut self) {
        unmount_under(self.0.path());
    }
}

/// Limits within this machine's: podman gives containers higher ones by default, which this
/// machine, with no CAP_SYS_RESOURCE, does not let it raise.
fn ulimits() -> Vec<String> {
    let limits = std::fs::read_to_string("/proc/self/limits").unwrap();
    let hard_nofile = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(4))
        .unwrap()
        .to_owned();
    vec![
        "--ulimit".into(),
        format!("nofile={hard_nofile}:{hard_nofile}"),
        "--ulimit".into(),
        "nproc=4096:4096".into(),
    ]
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Makes the base image, a minimal Debian bookworm, and builds deploy/Containerfile on it
/// with the binary under test.
fn build_image(podman: &Podman) {
    let work = WorkDir(tempfile::tempdir().unwrap());
    let work = &work.0;
    let rootfs = work.path().join("rootfs");
    let mirror = std::env::var("POSTERN_TEST_DEBIAN_MIRROR")
        .unwrap_or_else(|_| "http://deb.debian.org/debian".to_owned());
    // A second try where the first fails (a download cut off by the network).
    let mut tries = 0;
    loop {
        tries += 1;
        let mut debootstrap = Command::new("debootstrap");
        debootstrap
            .args(["--variant=minbase", "bookworm"])
            .arg(&rootfs)
            .arg(&mirror);
        let (code, out, err) = common::run_command_within(debootstrap, Duration::from_secs(600));
        if code == 0 {
            break;
        }
        assert!(tries < 2, "debootstrap: {err}{out}");
        let _ = std::fs::remove_dir_all(&rootfs);
    }
    let tarball = work.path().join("rootfs.tar");
    let status = Command::new("tar")
        .arg("-C")
        .arg(&rootfs)
        .arg("-cf")
        .arg(&tarball)
        .arg(".")
        .status()
        .unwrap();
    assert!(status.success());
    podman.ok(&["import", "--quiet", tarball.to_str().unwrap(), BASE]);

    // The build context: only the binary, where the prebuilt stage takes it.
    let context = work.path().join("context");
    std::fs::create_dir_all(context.join("target/release")).unwrap();
    std::fs::copy(
        env!("CARGO_BIN_EXE_postern"),
        context.join("target/release/postern"),
    )
    .unwrap();
    let containerfile = repo().join("deploy/Containerfile");
    let mut args = vec![
        "build".to_owned(),
        "--quiet".into(),
        "--pull=never".into(),
        // The host's network for the RUN steps (apt), as for the containers below: a
        // network of podman's own would set up NAT on this machine, and with it connection
        // tracking of all its traffic, loopback too, for as long as it runs.
        "--network".into(),
        "host".into(),
        // Docker's image format, which holds the HEALTHCHECK (OCI's has no place for it).
        "--format".into(),
        "docker".into(),
        "-f".into(),
        containerfile.to_str().unwrap().into(),
        "--target".into(),
        "prebuilt".into(),
        "-t".into(),
        IMAGE.into(),
    ];
    args.extend(ulimits());
    args.push(context.to_str().unwrap().into());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    podman.ok(&args);
}

/// `podman run` with this machine's limits, then `args`.
fn run_args<'a>(limits: &'a [String], args: &[&'a str]) -> Vec<&'a str> {
    let mut all = vec!["run"];
    all.extend(limits.iter().map(String::as_str));
    all.extend(args);
    all
}

/// Waits (bounded) until the container's log says postern is ready; returns the log.
fn wait_ready(podman: &Podman, name: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (_, out, err) = podman.run_within(&["logs", name], Duration::from_secs(30));
        let log = format!("{out}{err}");
        if log.contains("postern: ready with") {
            return log;
        }
        let (_, state, _) = podman.run_within(
            &["inspect", "--format", "{{.State.Status}}", name],
            Duration::from_secs(30),
        );
        assert!(
            Instant::now() < deadline && state.trim() == "running",
            "postern in {name} not ready ({}): {log}",
            state.trim()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The address a line of `log` says postern listens on for `what` (`smtp`, `metrics`).
fn listening(log: &str, what: &str) -> std::net::SocketAddr {
    let prefix = format!("postern: {what} listening on ");
    log.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .unwrap_or_else(|| panic!("no {what} listener in {log}"))
        .trim()
        .parse()
        .unwrap()
}

#[test]
fn the_image_runs_postern_under_its_seccomp_profile_and_keeps_the_spool_in_its_volume() {
    let podman = Podman::new();
    build_image(&podman);
    let limits = ulimits();
    let profile = repo().join("deploy/seccomp.json");
    let seccomp = format!("seccomp={}", profile.to_str().unwrap());

    // The runtime's default seccomp profile refuses io_uring: postern says so, and what to
    // run it with, and exits 1.
    let (code, out, err) = podman.run_within(
        &run_args(&limits, &["--rm", "--network", "none", IMAGE]),
        Duration::from_secs(120),
    );
    assert_eq!(code, 1, "{err}{out}");
    assert!(
        err.contains("cannot start: io_uring is refused by this process's seccomp filter"),
        "{err}"
    );
    assert!(err.contains("deploy/seccomp.json"), "{err}");

    // With the profile: mail to a domain it accepts, held, from a client on loopback (in the
    // host's network, on ports of the kernel's choosing), which the image lets relay no more
    // than any other.
    podman.ok(&run_args(
        &limits,
        &[
            "--detach",
            "--name",
            "mx",
            "--security-opt",
            &seccomp,
            "--network",
            "host",
            "--env",
            "POSTERN_LISTEN=127.0.0.1:0",
            "--env",
            "POSTERN_METRICS=127.0.0.1:0",
            "--volume",
            "spool:/var/spool/postern",
            "--env",
            "POSTERN_HOSTNAME=mx.example.net",
            "--env",
            "POSTERN_ACCEPT_DOMAIN=example.net",
            "--env",
            "POSTERN_HOLD=true",
            IMAGE,
        ],
    ));
    let log = wait_ready(&podman, "mx");
    let mut c = Client::connect(listening(&log, "smtp"));
    let banner = c.line();
    assert!(banner.starts_with("220 mx.example.net "), "{banner}");
    assert!(c.cmd("EHLO client.example.org").starts_with("250 "));
    assert!(c.cmd("MAIL FROM:<a@example.org>").starts_with("250 "));
    assert!(c.cmd("RCPT TO:<b@example.com>").starts_with("554 5.7.1"));
    assert!(c.cmd("RCPT TO:<b@example.net>").starts_with("250 "));
    assert!(c.cmd("DATA").starts_with("354 "));
    let id = common::queue_id(&c.cmd("Subject: in a container\r\n\r\nhello\r\n."));
    assert!(c.cmd("QUIT").starts_with("221 "));

    let metrics = listening(&log, "metrics");
    let (status, body) = http_get(metrics, "/readyz");
    assert!(status.contains("200"), "{status} {body}");
    // The image's health check is `postern ready`, and it runs there (here on the test's
    // ephemeral metrics port rather than the image's own setting).
    let check = podman.ok(&[
        "inspect",
        "--format",
        "{{json .Config.Healthcheck.Test}}",
        "mx",
    ]);
    assert_eq!(check.trim(), r#"["CMD","/usr/local/bin/postern","ready"]"#);
    let ready = podman.ok(&[
        "exec",
        "mx",
        "postern",
        "ready",
        "--metrics",
        &metrics.to_string(),
    ]);
    assert_eq!(ready, "ready\n");

    // The profile is in force (a filter, a refused call), and postern runs unprivileged.
    // The trust anchors of outbound TLS are in the image.
    podman.ok(&[
        "exec",
        "mx",
        "test",
        "-s",
        "/etc/ssl/certs/ca-certificates.crt",
    ]);
    let status = podman.ok(&["exec", "mx", "cat", "/proc/1/status"]);
    assert!(status.lines().any(|l| l == "Seccomp:\t2"), "{status}");
    assert!(
        status.lines().any(|l| l.starts_with("Uid:\t10025\t")),
        "{status}"
    );
    let (code, _, err) = podman.run_within(
        &["exec", "mx", "unshare", "--user", "true"],
        Duration::from_secs(30),
    );
    assert_ne!(code, 0, "unshare was allowed: {err}");
    assert!(err.contains("Operation not permitted"), "{err}");

    // `podman stop` sends SIGTERM: a graceful stop, exit 0.
    podman.ok(&["stop", "--time", "60", "mx"]);
    let code = podman.ok(&["inspect", "--format", "{{.State.ExitCode}}", "mx"]);
    assert_eq!(code.trim(), "0");
    let (_, out, err) = podman.run_within(&["logs", "mx"], Duration::from_secs(30));
    assert!(
        format!("{out}{err}")
            .lines()
            .any(|l| l == "postern: stopped"),
        "{out}{err}"
    );

    // The next container on the volume finds the message (`postern queue` needs no
    // io_uring: the default profile will do).
    let listing = podman.ok(&run_args(
        &limits,
        &[
            "--rm",
            "--network",
            "none",
            "--volume",
            "spool:/var/spool/postern",
            IMAGE,
            "queue",
        ],
    ));
    assert!(listing.contains(&id), "{listing}");
    assert!(listing.contains("b@example.net"), "{listing}");
}

/// A GET of `path` on `addr`: the status line and the body.
fn http_get(addr: std::net::SocketAddr, path: &str) -> (String, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut all = String::new();
    s.read_to_string(&mut all).unwrap();
    let (head, body) = all.split_once("\r\n\r\n").unwrap_or((&all, ""));
    (
        head.lines().next().unwrap_or("").to_owned(),
        body.to_owned(),
    )
}

/// The paths (below `context/`) that a build of `context` is sent, with the `.dockerignore`
/// it holds: what a Containerfile that copies its whole context gets.
fn sent_to_a_build(podman: &Podman, context: &Path) -> Vec<String> {
    let work = tempfile::tempdir().unwrap();
    let containerfile = work.path().join("Containerfile");
    std::fs::write(&containerfile, "FROM scratch\nCOPY . /context/\n").unwrap();
    podman.ok(&[
        "build",
        "--quiet",
        "--pull=never",
        "-f",
        containerfile.to_str().unwrap(),
        "-t",
        "localhost/context:test",
        context.to_str().unwrap(),
    ]);
    podman.ok(&[
        "create",
        "--name",
        "context",
        "localhost/context:test",
        "/none",
    ]);
    let tarball = work.path().join("context.tar");
    podman.ok(&["export", "-o", tarball.to_str().unwrap(), "context"]);
    podman.ok(&["rm", "context"]);
    let listing = Command::new("tar")
        .arg("-tf")
        .arg(&tarball)
        .output()
        .unwrap();
    assert!(listing.status.success());
    String::from_utf8(listing.stdout)
        .unwrap()
        .lines()
        .filter_map(|l| l.trim_start_matches("./").strip_prefix("context/"))
        .map(|l| l.trim_end_matches('/').to_owned())
        .collect()
}

#[test]
fn a_build_is_sent_the_sources_and_of_target_only_the_release_binary() {
    // From the top of the source tree, as deploy/Containerfile is built.
    let podman = Podman::new();
    let sent = sent_to_a_build(&podman, &repo().canonicalize().unwrap());
    // What `cargo build --locked --bin postern` needs: every workspace member.
    for needed in [
        "Cargo.toml",
        "Cargo.lock",
        "crates/postern/Cargo.toml",
        "crates/postern-spool/Cargo.toml",
        "crates/postern-proto/src/lib.rs",
        "loadtest/Cargo.toml",
        "benches/Cargo.toml",
        "deploy/Containerfile",
    ] {
        assert!(sent.iter().any(|p| p == needed), "{needed} is not sent");
    }
    for path in &sent {
        assert!(!path.starts_with(".git/"), "{path} is sent");
        if let Some(rest) = path.strip_prefix("target/") {
            assert!(
                ["release", "release/postern"].contains(&rest),
                "{path} is sent"
            );
        }
    }
}

#[test]
fn dockerignore_keeps_the_release_binary_and_drops_the_rest_of_the_build_output() {
    // The repository's .dockerignore over a tree of every kind of path it must keep or drop
    // (the test above sees the real tree, whose target/release/postern may not be built).
    let podman = Podman::new();
    let work = tempfile::tempdir().unwrap();
    let kept = [
        "Cargo.toml",
        "crates/postern-spool/Cargo.toml",
        "crates/postern-spool/src/lib.rs",
        "target/release/postern",
        "fuzz/fuzz_targets/command.rs",
        "deploy/Containerfile",
    ];
    let dropped = [
        ".git/HEAD",
        "target/debug/postern",
        "target/release/deps/libx.rlib",
        "target/release/postern.d",
        "postern-spool/0/0000000000000001.seg",
        "crates/postern/postern-spool/lock",
        "loadtest/postern-spool/lock",
        "fuzz/target/x",
        "fuzz/corpus/command/x",
        "benches/__pycache__/report.pyc",
    ];
    for path in kept.iter().chain(&dropped) {
        let path = work.path().join(path);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, b"x").unwrap();
    }
    std::fs::copy(
        repo().join(".dockerignore"),
        work.path().join(".dockerignore"),
    )
    .unwrap();
    let sent = sent_to_a_build(&podman, work.path());
    for path in kept {
        assert!(
            sent.iter().any(|p| p == path),
            "{path} is not sent: {sent:?}"
        );
    }
    for path in dropped {
        assert!(!sent.iter().any(|p| p == path), "{path} is sent: {sent:?}");
    }
}
