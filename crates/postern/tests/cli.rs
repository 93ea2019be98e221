//! Flags: a wrong or contradictory flag ends the program with one line naming it and exit 2.
#![allow(clippy::unwrap_used)]

mod common;

use std::net::TcpStream;
use std::process::Command;

fn run(args: &[&str]) -> (i32, String, String) {
    common::run_bounded(args)
}

fn refused(args: &[&str], names: &str) {
    let (code, _, err) = run(args);
    assert_eq!(code, 2, "{args:?}: {err}");
    assert_eq!(err.lines().count(), 1, "{args:?}: not one line: {err}");
    assert!(err.starts_with("postern: "), "{err}");
    assert!(err.contains(names), "{args:?}: {err} does not name {names}");
}

#[test]
fn wrong_flags_get_one_line_and_exit_2() {
    refused(&["serve", "--no-such-flag"], "--no-such-flag");
    refused(
        &["serve", "--max-message-size", "lots"],
        "--max-message-size",
    );
    refused(&["serve", "--command-timeout", "soon"], "--command-timeout");
    refused(&["serve", "--listen", "nowhere"], "--listen");
    // Too small for an envelope of 100 recipients of the longest form (RFC 5321 4.5.3.1.8).
    refused(
        &["serve", "--spool-segment-size", "64k"],
        "--spool-segment-size must be between 128k and 4G",
    );
    // --version prints the version and does nothing else: a word beside it is refused, not
    // passed over (`postern --version serve` would have started nothing without a word).
    refused(
        &["--version", "serve"],
        "--version takes nothing else: 'serve'",
    );
    refused(&["-V", "extra"], "'extra' was given with it");
    let (code, out, err) = run(&["--version"]);
    assert_eq!((code, err.as_str()), (0, ""));
    assert!(out.starts_with("postern "), "{out}");
    // TCP takes no connections at a multicast or broadcast address: such a listener would
    // say it was ready and never get a client.
    refused(
        &["serve", "--listen", "224.0.0.1:2525"],
        "'224.0.0.1:2525' is a multicast address",
    );
    refused(
        &["serve", "--listen", "255.255.255.255:2525"],
        "is a broadcast address",
    );
    refused(
        &["serve", "--listen-tls", "[ff02::1]:4650"],
        "'[ff02::1]:4650' is a multicast address",
    );
    refused(&["serve", "--metrics", "239.1.1.1:9325"], "--metrics");
    refused(
        &["serve", "--relay-network", "10.0.0.0/99"],
        "--relay-network",
    );
    refused(
        &["serve", "--relay-network", "none", "--relay-network", "::1"],
        "--relay-network none cannot be given with networks",
    );
    refused(&["serve", "--relay-network", "nowhere"], "or none");
    for (net, says) in [
        (
            "10.0.0.0/33",
            "/33 is longer than an IPv4 address (32 bits)",
        ),
        ("::/129", "/129 is longer than an IPv6 address (128 bits)"),
        ("10.0.0.0/x", "'x' is not a prefix length"),
        ("10.0.0.0/+8", "'+8' is not a prefix length"),
        ("10.0.0.0/256", "/256 is longer than an IPv4 address"),
        ("10.0.0.300/8", "'10.0.0.300' is not an IP address"),
        (
            "192.168.1.5/24",
            "host bits set: write the network as 192.168.1.0/24 or the one address as 192.168.1.5",
        ),
        ("2001:db8::1/64", "network as 2001:db8::/64"),
    ] {
        refused(&["serve", "--relay-network", net], says);
    }
    refused(&["serve", "--tls-cert", "/x.pem"], "--tls-key");
    refused(&["serve", "--listen-tls", "127.0.0.1:0"], "--listen-tls");
    refused(&["serve", "--cores", "0"], "--cores");
    refused(&["serve", "--max-recipients", "10"], "--max-recipients");
    refused(
        &[
            "serve",
            "--max-connections",
            "5",
            "--max-connections-per-ip",
            "6",
        ],
        "--max-connections-per-ip",
    );
    refused(
        &["serve", "--max-transactions-in-flight", "0"],
        "--max-transactions-in-flight",
    );
    refused(
        &["serve", "--max-outbound-connections", "0"],
        "--max-outbound-connections",
    );
    refused(
        &["serve", "--max-outbound-connections", "many"],
        "--max-outbound-connections",
    );
    refused(&["serve", "--postmaster", "not an address"], "--postmaster");
    // A UTF-8 local part: mail sent without SMTPUTF8 could not be relayed to it.
    refused(
        &["serve", "--postmaster", "j\u{f6}rg@x.test"],
        "--postmaster",
    );
    // Values that parse but cannot work: sessions that time out before a round trip, a
    // storm of retries.
    refused(&["serve", "--command-timeout", "1ns"], "--command-timeout");
    refused(
        &["serve", "--max-session-time", "5ms"],
        "--max-session-time",
    );
    refused(&["serve", "--retry-initial", "1ms"], "--retry-initial");
    refused(
        &["serve", "--retry-initial", "10s", "--retry-max", "1s"],
        "--retry-max",
    );
    refused(
        &["serve", "--max-connections-per-ip", "0"],
        "--max-connections-per-ip",
    );
    // Listeners that would take the same connections.
    refused(
        &[
            "serve",
            "--listen",
            "127.0.0.1:2600",
            "--metrics",
            "127.0.0.1:2600",
        ],
        "--metrics",
    );
    refused(
        &[
            "serve",
            "--listen",
            "127.0.0.1:2600",
            "--listen",
            "[::ffff:127.0.0.1]:2600",
        ],
        "--listen",
    );
    refused(
        &[
            "serve",
            "--listen",
            "0.0.0.0:2600",
            "--metrics",
            "127.0.0.1:2600",
        ],
        "--metrics",
    );
    // The IPv6 wildcard takes IPv4 too on a dual-stack host (the kernel's default).
    if std::fs::read_to_string("/proc/sys/net/ipv6/bindv6only").is_ok_and(|v| v.trim() == "0") {
        refused(
            &[
                "serve",
                "--listen",
                "[::]:2600",
                "--metrics",
                "127.0.0.1:2600",
            ],
            "--metrics",
        );
        refused(
            &[
                "serve",
                "--listen",
                "127.0.0.1:2600",
                "--metrics",
                "[::]:2600",
            ],
            "--metrics",
        );
    }
    refused(
        &["serve", "--ipv6-client-prefix", "8"],
        "--ipv6-client-prefix",
    );
    refused(
        &["serve", "--ipv6-client-prefix", "129"],
        "--ipv6-client-prefix",
    );
    refused(
        &["serve", "--max-queue-lifetime", "0s"],
        "--max-queue-lifetime",
    );
    // A warning that would come after the message is returned; an address for a name; a
    // port out of range is worded as port 0 is.
    refused(
        &[
            "serve",
            "--delay-warning",
            "5days",
            "--max-queue-lifetime",
            "5days",
        ],
        "--delay-warning must be shorter than --max-queue-lifetime",
    );
    refused(&["serve", "--hostname", "127.0.0.1"], "is an IP address");
    refused(
        &["serve", "--hostname", "1.2.3"],
        "clients read as an IP address",
    );
    refused(
        &["serve", "--hostname", "99999999999999999999"],
        "is all digits and dots",
    );
    refused(&["serve", "--mx-port", "0"], "0 is not in 1..=65535");
    refused(
        &["serve", "--mx-port", "70000"],
        "'70000' is too large; it takes a whole number in 1..=65535",
    );
    // Said as for any other number (docs/operations.md), with the range.
    refused(
        &["serve", "--mx-port", "-1"],
        "'-1' is negative; it takes a whole number in 1..=65535",
    );
    refused(
        &["serve", "--ipv6-client-prefix", "-1"],
        "'-1' is negative; it takes a whole number in 16..=128",
    );
    refused(
        &["serve", "--mx-port", "99999999999999999999"],
        "'99999999999999999999' is too large",
    );
    // A count takes digits only, and says so rather than what Rust's parser says.
    for (flag, value) in [
        ("--max-connections", "abc"),
        ("--max-connections", "+5"),
        ("--queue-high-water", "1k"),
        ("--max-recipients", "1e3"),
        ("--mx-port", "25.0"),
    ] {
        refused(
            &["serve", flag, value],
            &format!("'{value}' is not a whole number; it takes digits only"),
        );
    }
    // A minus before a zero is a sign too, whether the flag's type takes one or not.
    for (flag, value) in [
        ("--cores", "-0"),
        ("--max-connections", "-00"),
        ("--mx-port", "-0"),
    ] {
        refused(
            &["serve", flag, value],
            &format!("'{value}' has a sign; it takes digits only"),
        );
    }
    refused(&["frobnicate"], "frobnicate");
    refused(&[], "postern serve");
}

#[test]
fn values_that_cannot_work_are_refused_by_name() {
    // Negative values are wrong values for their flag, not unknown flags.
    refused(&["serve", "--cores", "-1"], "--cores");
    refused(&["serve", "--command-timeout", "-1s"], "--command-timeout");
    // SIZE 0 would advertise no limit at all (RFC 1870); a session time of 0 ends every
    // session at its banner.
    refused(&["serve", "--max-message-size", "0"], "--max-message-size");
    refused(&["serve", "--max-session-time", "0s"], "--max-session-time");
    // Port 0 is no server to ask, as for --relay-host and --route.
    refused(&["serve", "--dns-server", "127.0.0.1:0"], "--dns-server");
    refused(&["serve", "--dns-server", "0.0.0.0"], "--dns-server");
    // A low mark without a high one would be ignored.
    refused(
        &["serve", "--queue-high-water", "0", "--queue-low-water", "5"],
        "--queue-low-water",
    );
    // The host name goes into the banner, EHLO and Received.
    refused(&["serve", "--hostname", ""], "--hostname");
    refused(&["serve", "--hostname", "two words"], "--hostname");
    // Underscores are taken in a client's EHLO, not in this server's own name, which is the
    // EHLO of its deliveries.
    refused(&["serve", "--hostname", "mail_gw.example"], "--hostname");
    refused(&["serve", "--hostname", "ctl\u{1}host"], "--hostname");
    refused(
        &["serve", "--accept-domain", "bad domain"],
        "--accept-domain",
    );
    refused(&["serve", "--accept-domain", "."], "--accept-domain");
    refused(
        &["serve", "--accept-domain", "..example.org"],
        "--accept-domain",
    );
    refused(
        &[
            "serve",
            "--route",
            "a.test=127.0.0.1:25",
            "--route",
            "A.test=127.0.0.1:26",
        ],
        "--route",
    );
    // A U-label and its A-label are one domain.
    refused(
        &[
            "serve",
            "--route",
            "b\u{fc}cher.test=127.0.0.1:25",
            "--route",
            "xn--bcher-kva.test=127.0.0.1:26",
        ],
        "--route",
    );
    // Far more executors than CPUs: each would reserve its spool segments on disk.
    refused(&["serve", "--cores", "100000"], "--cores");
    // An empty queue ID is a wrong value, found before the spool is looked at.
    refused(&["queue", "--delete", ""], "--delete");
    refused(&["queue", "--delete", "ID,"], "--delete");
    // So is one that cannot be a queue ID.
    refused(&["queue", "--delete", "not/an id"], "--delete");
    // A whole number past its type says so, in words of its own.
    for flag in ["--max-recipients", "--cores"] {
        let (code, _, err) = run(&["serve", flag, "99999999999999999999999"]);
        assert!(
            code == 2
                && err.contains(flag)
                && err.contains("'99999999999999999999999' is too large"),
            "{err}"
        );
    }
    refused(&["queue", "--delete", "0123456789BCDFGHa"], "--delete");
    // What is wrong with it: a character no ID holds, or its length.
    refused(&["queue", "--delete", "0123456789BCDFGHa"], "it has 'a'");
    refused(&["queue", "--show", "1M22X"], "5 characters, not 17");
    // A path that begins with '-' (a value like -1 given by mistake, a flag left without
    // its path) is a wrong value of its flag, not an unknown flag.
    refused(&["serve", "--spool", "-1"], "--spool");
    refused(&["queue", "--spool", "-1"], "--spool");
    refused(&["serve", "--spool", "--hold"], "--spool");
    refused(
        &["serve", "--tls-cert", "-1", "--tls-key", "k.pem"],
        "--tls-cert",
    );
    refused(
        &[
            "serve",
            "--outbound-tls-ca",
            "-ca.pem",
            "--outbound-tls",
            "required",
        ],
        "--outbound-tls-ca",
    );
    // A flag left without its value before another flag and that one's value: the first
    // is named (clap took the second flag for its value and named only the word after it).
    refused(&["serve", "--spool", "--cores", "1"], "'--spool'");
    refused(
        &["serve", "--tls-cert", "--tls-key", "k.pem"],
        "'--tls-cert'",
    );
    refused(&["serve", "--listen", "--spool", "x"], "'--listen'");
    refused(&["queue", "--spool", "--show", "x"], "'--spool'");
    refused(&["serve", "--hostname", "--help"], "'--hostname'");
    // A switch given its value as a separate word is named with the word.
    refused(&["serve", "--hold", "no"], "--hold");
    refused(
        &["serve", "--reject-bare-newlines", "0"],
        "--reject-bare-newlines",
    );
    refused(&["queue", "--json", "yes"], "--json");
    refused(&["serve", "--sync-on-core=maybe"], "--sync-on-core");
    // A SIZE past 64 bits is read as the largest number they hold: a limit there would take
    // it.
    refused(
        &["serve", "--max-message-size", "1025G"],
        "--max-message-size",
    );
    let (code, _, err) = run(&["serve", "--max-message-size", "18446744073709551615"]);
    assert!(code == 2 && err.contains("more than 1024G"), "{err}");
    // Queue IDs hold the core in two base-32 digits, whatever the CPUs.
    let (code, _, err) = run(&["serve", "--cores", "1025"]);
    assert!(
        code == 2 && err.contains("--cores 1025 is more than 1024"),
        "{err}"
    );
    // A core's segment and its spare are reserved from its first message on: a mark at two
    // segments per core would refuse all mail for good.
    refused(
        &[
            "serve",
            "--cores",
            "1",
            "--spool-segment-size",
            "1M",
            "--spool-high-water",
            "2M",
        ],
        "--spool-high-water",
    );
    // A deadline this far off overflows the clock.
    refused(
        &["serve", "--max-session-time", "300000000000y"],
        "--max-session-time",
    );
    refused(
        &["serve", "--outbound-idle-timeout", "300000000000y"],
        "--outbound-idle-timeout",
    );
    // An outbound wait of 0 times out at once, after the next hop may have taken the mail.
    for flag in [
        "--smtp-connect-timeout",
        "--smtp-greeting-timeout",
        "--smtp-data-done-timeout",
    ] {
        refused(&["serve", flag, "0s"], flag);
    }
    // A next hop must be a host name or an IP address.
    for bad in ["127.0.0.1:2525:5", "a b:25", "a..b:25", "-x:25"] {
        refused(&["serve", "--relay-host", bad], "--relay-host");
    }
    refused(&["serve", "--route", "a.test=h:x:y"], "--route");
    // An IPv6 address without brackets: `::1:2626` is an address, or `::1` and a port.
    refused(&["serve", "--relay-host", "::1:2626"], "in brackets");
    refused(
        &["serve", "--route", "a.test=2001:db8::1:25"],
        "in brackets",
    );
    refused(
        &[
            "serve",
            "--listen",
            "127.0.0.1:2600",
            "--listen",
            "127.0.0.1:2600",
        ],
        "--listen",
    );
    refused(
        &[
            "serve",
            "--listen",
            "127.0.0.1:2600",
            "--listen-tls",
            "127.0.0.1:2600",
            "--tls-cert",
            "/c.pem",
            "--tls-key",
            "/k.pem",
        ],
        "--listen-tls",
    );
}

#[test]
fn a_wrong_value_from_the_environment_names_its_variable() {
    let (code, err) = serve_with_env(&[], "POSTERN_MAX_RECIPIENTS", "abc");
    assert_eq!(code, Some(2), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains("--max-recipients") && err.contains("POSTERN_MAX_RECIPIENTS"),
        "{err}"
    );
    // Switches take the usual spellings of yes and no.
    let (_, err) = serve_with_env(&["--cores", "0"], "POSTERN_HOLD", "yes");
    assert!(err.contains("--cores") && !err.contains("--hold"), "{err}");
    // With the blanks a file of variables may leave around them.
    let (_, err) = serve_with_env(&["--cores", "0"], "POSTERN_HOLD", " true ");
    assert!(err.contains("--cores") && !err.contains("--hold"), "{err}");
    let (code, err) = serve_with_env(&[], "POSTERN_HOLD", "maybe");
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("--hold") && err.contains("'maybe' is not a switch value"),
        "{err}"
    );
    // A value refused after parsing names its variable too.
    let (code, err) = serve_with_env(&[], "POSTERN_MAX_MESSAGE_SIZE", "0");
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("--max-message-size") && err.contains("POSTERN_MAX_MESSAGE_SIZE"),
        "{err}"
    );
    // A flag from the environment that needs another names itself.
    let (code, err) = serve_with_env(&[], "POSTERN_TLS_CERT", "/nonexistent/cert.pem");
    assert_eq!(code, Some(2), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains("--tls-key") && err.contains("POSTERN_TLS_CERT"),
        "{err}"
    );
    // A variable that asks for nothing is not named beside the flag that is missing.
    let (code, err) = serve_with_env(&["--tls-cert", "/x.pem"], "POSTERN_SPOOL", "/tmp/x");
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("--tls-key") && !err.contains("POSTERN_SPOOL"),
        "{err}"
    );
    // Also where the message puts a colon after the flag.
    for (var, value, flag) in [
        ("POSTERN_HOSTNAME", "bad host", "--hostname"),
        ("POSTERN_RELAY_HOST", "host:0", "--relay-host"),
        ("POSTERN_OUTBOUND_TLS", "bogus", "--outbound-tls"),
    ] {
        let (code, err) = serve_with_env(&[], var, value);
        assert_eq!(code, Some(2), "{err}");
        assert!(err.contains(flag) && err.contains(var), "{var}: {err}");
    }
    // A clash names the variable behind the second flag it names too.
    let (code, err) = serve_with_env(&[], "POSTERN_RETRY_INITIAL", "2h");
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("--retry-initial") && err.contains("(from POSTERN_RETRY_INITIAL)"),
        "{err}"
    );
    let (_, err) = serve_with_env(&["--retry-max", "30m"], "POSTERN_RETRY_INITIAL", "2h");
    assert!(err.contains("(from POSTERN_RETRY_INITIAL)"), "{err}");
}

#[test]
fn an_empty_variable_is_refused_not_read_as_nothing() {
    // `POSTERN_LISTEN=` in a file of variables must not start a server that listens nowhere
    // (or on the default), and an empty switch is no "off".
    for (var, flag) in [
        ("POSTERN_LISTEN", "--listen"),
        ("POSTERN_HOLD", "--hold"),
        ("POSTERN_SPOOL", "--spool"),
        ("POSTERN_MAX_CONNECTIONS", "--max-connections"),
    ] {
        let (code, err) = serve_with_env(&[], var, "");
        assert_eq!(code, Some(2), "{var}: {err}");
        assert_eq!(err.lines().count(), 1, "{var}: {err}");
        assert!(err.contains(flag) && err.contains(var), "{var}: {err}");
    }
    // A count's error says what the value should have been.
    let (_, err) = serve_with_env(&[], "POSTERN_MAX_CONNECTIONS_PER_IP", " ");
    assert!(
        err.contains("an empty value; it takes a whole number"),
        "{err}"
    );
}

#[test]
fn serve_help_tells_of_the_environment() {
    let out = Command::new(env!("CARGO_BIN_EXE_postern"))
        .args(["serve", "--help"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(
        help.contains("POSTERN_<NAME>") && help.contains("comma-separated"),
        "{help}"
    );
}

/// `postern serve` with `args` and the variable `var` set to `value`, run to its end: the
/// exit code and what it wrote to stderr.
fn serve_with_env(args: &[&str], var: &str, value: &str) -> (Option<i32>, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_postern"))
        .arg("serve")
        .args(args)
        .env(var, value)
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn environment_variables_set_flags() {
    let out = Command::new(env!("CARGO_BIN_EXE_postern"))
        .args(["serve"])
        .env("POSTERN_MAX_MESSAGE_SIZE", "nonsense")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--max-message-size"));
}

#[test]
fn the_queue_command_s_help_gives_every_option_s_default() {
    let (code, out, _) = run(&["queue", "--help"]);
    assert_eq!(code, 0);
    let options: Vec<&str> = out
        .lines()
        .filter(|l| l.trim_start().starts_with("--") && !l.contains("--help"))
        .collect();
    assert!(options.len() >= 5, "{out}");
    for line in options {
        assert!(line.contains("[default: "), "{line}");
    }
}

#[test]
fn help_explains_every_flag_with_its_default() {
    let (code, out, _) = run(&["serve", "--help"]);
    assert_eq!(code, 0);
    for flag in [
        "--listen",
        "--listen-tls",
        "--cores",
        "--spool",
        "--hostname",
        "--accept-domain",
        "--relay-network",
        "--postmaster",
        "--max-message-size",
        "--max-recipients",
        "--max-connections",
        "--max-connections-per-ip",
        "--command-timeout",
        "--tls-cert",
        "--tls-key",
        "--metrics",
    ] {
        assert!(out.contains(flag), "--help lacks {flag}");
    }
    assert!(
        out.contains("[default: 127.0.0.1:2525, unless --listen-tls is given]")
            && out.contains("[default: 50M]")
            && out.contains("[default: 5m]")
    );
    assert!(out.contains("[env: POSTERN_LISTEN="));
}

#[test]
fn an_unwritable_spool_is_a_clear_start_up_error() {
    let (code, _, err) = run(&[
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--spool",
        "/proc/postern-cannot-be-here",
    ]);
    assert_eq!(code, 1);
    assert!(
        err.contains("/proc/postern-cannot-be-here") && err.contains("--spool"),
        "{err}"
    );
}

#[test]
fn log_lines_written_to_a_pipe_are_plain_text() {
    let dir = tempfile::tempdir().unwrap();
    let spool = dir.path().join("spool");
    let mut child = common::KillOnDrop(
        Command::new(env!("CARGO_BIN_EXE_postern"))
            .args(["serve", "--listen", "127.0.0.1:0", "--hold", "--spool"])
            .arg(&spool)
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let log = log_lines(child.stderr.take().unwrap());
    let line = first_logged(&log, "--hold");
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(line.contains("INFO"), "{line}");
    assert!(
        !line.contains('\u{1b}'),
        "terminal escapes in a log line: {line:?}"
    );
}

#[test]
fn a_start_on_an_empty_spool_says_what_it_found_too() {
    let dir = tempfile::tempdir().unwrap();
    let spool = dir.path().join("spool");
    let mut child = common::KillOnDrop(
        Command::new(env!("CARGO_BIN_EXE_postern"))
            .args(["serve", "--listen", "127.0.0.1:0", "--spool"])
            .arg(&spool)
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let log = log_lines(child.stderr.take().unwrap());
    let line = first_logged(&log, "spool recovered");
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(
        line.contains("queued=0") && line.contains("corrupt_records=0"),
        "{line}"
    );
}

/// An entry named like a segment that is not a file holds no mail: the start names it in a
/// warning and serves the rest (it once stopped every start, with a cryptic error).
#[test]
fn a_spool_with_something_odd_in_it_says_so_and_serves() {
    let dir = tempfile::tempdir().unwrap();
    let spool = dir.path().join("spool");
    let odd = spool.join("0").join("0000000009.seg");
    std::fs::create_dir_all(&odd).unwrap();
    let server = common::Server::start_in(&["--cores", "1"], spool, Some(dir));
    let warned = server.log_until(|l| l.contains("not regular files"));
    assert!(warned.contains(&odd.display().to_string()), "{warned}");
    let mut c = server.connect();
    c.line();
    c.cmd("EHLO client.test");
    c.cmd("MAIL FROM:<a@b.test>");
    c.cmd("RCPT TO:<c@d.test>");
    c.cmd("DATA");
    let reply = c.cmd("Subject: beside it\r\n\r\nbody\r\n.");
    assert!(reply.starts_with("250 "), "{reply}");
    assert!(odd.is_dir());
}

/// Hands each line postern logs to the receiver, read on a thread so that a line that never
/// comes fails the test (at `first_logged`) instead of leaving it waiting on a live server.
fn log_lines(stderr: std::process::ChildStderr) -> std::sync::mpsc::Receiver<String> {
    use std::io::{BufRead, BufReader};
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

/// The first line from `log_lines` that has `what` in it, waiting at most 30 s.
fn first_logged(rx: &std::sync::mpsc::Receiver<String>, what: &str) -> String {
    loop {
        let line = rx
            .recv_timeout(std::time::Duration::from_secs(30))
            .unwrap_or_else(|_| panic!("postern never logged {what:?}"));
        if line.contains(what) {
            return line;
        }
    }
}

/// `postern serve --hold` on a fresh spool in `dir` under `prlimit --nofile=SOFT:HARD`, with
/// `extra` flags, its stdout and stderr piped.
fn serve_under_prlimit(
    soft: u64,
    hard: u64,
    dir: &std::path::Path,
    extra: &[&str],
) -> common::KillOnDrop {
    common::KillOnDrop(
        Command::new("prlimit")
            .arg(format!("--nofile={soft}:{hard}"))
            .arg(env!("CARGO_BIN_EXE_postern"))
            .args(["serve", "--listen", "127.0.0.1:0", "--hold", "--spool"])
            .arg(dir.join("spool"))
            .args(extra)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap(),
    )
}

/// Starts `postern serve --hold` under `prlimit --nofile=SOFT:HARD` with `extra` flags;
/// returns the soft open-file limit the running server has and what it logged up to "ready".
fn open_file_limit_under(soft: u64, hard: u64, extra: &[&str]) -> (u64, String) {
    use std::io::{BufRead, BufReader};
    let dir = tempfile::tempdir().unwrap();
    let mut child = serve_under_prlimit(soft, hard, dir.path(), extra);
    let stdout = BufReader::new(child.stdout.take().unwrap());
    let stderr = child.stderr.take().unwrap();
    let log = std::thread::spawn(move || {
        let mut all = String::new();
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            all.push_str(&line);
            all.push('\n');
        }
        all
    });
    for line in stdout.lines().map_while(Result::ok) {
        if line.contains("ready with") {
            break;
        }
    }
    // prlimit execs the server, so the child's PID is the server's.
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", child.id())).unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap()
        .to_owned();
    child.kill().unwrap();
    child.wait().unwrap();
    let now = line.split_whitespace().nth(3).unwrap().parse().unwrap();
    (now, log.join().unwrap())
}

#[test]
fn the_open_file_limit_is_raised_to_the_hard_limit_and_a_short_one_is_named() {
    let (now, log) = open_file_limit_under(1024, 4096, &["--max-connections", "20000"]);
    assert_eq!(now, 4096, "{log}");
    assert!(
        log.contains("open-file limit raised from 1024 to 4096"),
        "{log}"
    );
    assert!(
        log.contains("below --max-connections (20000)"),
        "no warning that 4,096 descriptors cannot hold 20,000 connections: {log}"
    );
    let (now, log) = open_file_limit_under(1024, 4096, &["--max-connections", "1000"]);
    assert_eq!(now, 4096, "{log}");
    assert!(!log.contains("below --max-connections"), "{log}");
}

/// `postern serve --cores 1` under an open-file limit of `nofile` with `extra` flags: what
/// it logged about the limit (up to "ready"), and the connections it took before it answered
/// one with 421, all still open, each with its reader (at most 300 tried: two descriptors
/// each here), and the 421; the server runs until the last is dropped.
#[allow(clippy::type_complexity)]
fn connections_under_open_file_limit(
    nofile: u64,
    extra: &[&str],
) -> (
    Vec<String>,
    Vec<(TcpStream, std::io::BufReader<TcpStream>)>,
    String,
    common::KillOnDrop,
    std::sync::mpsc::Receiver<String>,
    tempfile::TempDir,
) {
    use std::io::{BufRead, BufReader};
    let dir = tempfile::tempdir().unwrap();
    let mut flags = vec!["--cores", "1", "--hostname", "mx.test"];
    flags.extend_from_slice(extra);
    let mut child = serve_under_prlimit(nofile, nofile, dir.path(), &flags);
    let mut port = None;
    let stdout = BufReader::new(child.stdout.take().unwrap());
    for line in stdout.lines().map_while(Result::ok) {
        if let Some(p) = line.rsplit_once("127.0.0.1:").map(|(_, p)| p.to_owned()) {
            port = p.trim().parse::<u16>().ok().or(port);
        }
        if line.contains("ready with") {
            break;
        }
    }
    // The warning, if any, comes before "ready", and the line about --hold after it.
    let log = log_lines(child.stderr.take().unwrap());
    let mut said = Vec::new();
    loop {
        let line = first_logged(&log, "");
        if line.contains("--hold") {
            break;
        }
        if line.contains("open-file limit") {
            said.push(line);
        }
    }
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port.unwrap()));
    let mut held = Vec::new();
    for _ in 0..300 {
        let tcp = TcpStream::connect(addr).unwrap();
        let mut r = BufReader::new(tcp.try_clone().unwrap());
        let mut first = String::new();
        r.read_line(&mut first).unwrap();
        if !first.starts_with("220 ") {
            // The spool's directory lives as long as the server: removed under it, the
            // server could make no new segment (a message refused 451).
            return (said, held, first, child, log, dir);
        }
        held.push((tcp, r));
    }
    panic!("300 connections and no 421");
}

#[test]
fn an_open_file_limit_below_the_connection_limit_caps_connections_with_421() {
    // 400 descriptors cannot hold 20,000 connections and the spool's: connections are capped
    // at half of what the core's own descriptors (64 + 16) leave, the rest get 421 4.3.2.
    let (said, held, refused, _server, _, _dir) = connections_under_open_file_limit(400, &[]);
    assert!(
        said.iter()
            .any(|l| l.contains("(400) is below --max-connections (20000)")
                && l.contains("connections are capped at 160, leaving 240 descriptors")),
        "{said:?}"
    );
    assert_eq!(held.len(), 160);
    assert!(
        refused.starts_with("421 4.3.2 mx.test Too many connections"),
        "{refused}"
    );
    // A lower --max-connections stays as it is: the cap never raises it.
    let (said, held, refused, _server, _, _dir) =
        connections_under_open_file_limit(1024, &["--max-connections", "100"]);
    assert!(!said.iter().any(|l| l.contains("capped")), "{said:?}");
    assert_eq!(held.len(), 100);
    assert!(refused.starts_with("421 4.3.2 "), "{refused}");
}

#[test]
fn mail_goes_through_when_the_open_file_cap_is_reached() {
    use std::io::{BufRead, Write};
    let (_, mut held, refused, _server, log, _dir) = connections_under_open_file_limit(400, &[]);
    assert!(refused.starts_with("421 4.3.2 "), "{refused}");
    let (tcp, r) = &mut held[0];
    tcp.write_all(
        b"EHLO c.test\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<c@d.test>\r\nDATA\r\nhi\r\n.\r\n",
    )
    .unwrap();
    let mut last = String::new();
    while !last.starts_with("250 2.0.0 Ok: queued") {
        last.clear();
        assert!(r.read_line(&mut last).unwrap() > 0, "closed");
        if last.starts_with('4') || last.starts_with('5') {
            // What the server logged, for the cause (bounded: what came within a second).
            let said: Vec<String> =
                std::iter::from_fn(|| log.recv_timeout(std::time::Duration::from_secs(1)).ok())
                    .take(200)
                    .collect();
            panic!("{last}\nthe server's log:\n{}", said.join("\n"));
        }
    }
}

#[test]
fn a_relay_network_of_everyone_is_warned_about() {
    let server = common::Server::start(&["--relay-network", "127.0.0.0/8,0.0.0.0/0"]);
    let line = server.log_until(|l| l.contains("open relay"));
    assert!(
        line.contains("WARN") && line.contains("--relay-network 0.0.0.0/0"),
        "{line}"
    );
    // The warning comes before the line about --hold, or not at all.
    let quiet = common::Server::start(&["--relay-network", "127.0.0.0/8,10.0.0.0/8"]);
    let first = quiet.log_until(|l| l.contains("--hold") || l.contains("open relay"));
    assert!(first.contains("--hold"), "{first}");
}

#[test]
fn where_mail_would_go_given_with_hold_is_warned_about() {
    let server = common::Server::start(&[
        "--relay-host",
        "127.0.0.1:2626",
        "--route",
        "a.test=h.test",
        "--hold",
    ]);
    let line = server.log_until(|l| l.contains("given with --hold"));
    assert!(
        line.contains("WARN") && line.contains("--relay-host and --route given with --hold"),
        "{line}"
    );
    // Without them nothing is said: the recovery's line comes first.
    let quiet = common::Server::start(&[]);
    let first =
        quiet.log_until(|l| l.contains("given with --hold") || l.contains("spool recovered"));
    assert!(first.contains("spool recovered"), "{first}");
}

#[test]
fn mail_to_the_postmaster_sent_by_the_host_s_own_mx_is_warned_about() {
    // Without --postmaster, <postmaster> becomes postmaster@<hostname>, delivered by that
    // domain's MX: most often this server, so each such message would loop and be returned.
    let first = |args: &[&str]| {
        let server = common::Server::start(args);
        server.log_until(|l| l.contains("spool recovered") || l.contains("<postmaster>"))
    };
    let line = first(&["--route", "other.test=127.0.0.1:9"]);
    assert!(
        line.contains("WARN")
            && line.contains("postmaster@mx.test")
            && line.contains("--postmaster"),
        "{line}"
    );
    // Said nowhere it is not so: a postmaster named, the host's domain routed, a relay host,
    // or nothing delivered.
    for args in [
        &[
            "--route",
            "other.test=127.0.0.1:9",
            "--postmaster",
            "pm@other.test",
        ][..],
        &["--route", "mx.test=127.0.0.1:9"][..],
        &["--relay-host", "127.0.0.1:9"][..],
        &[][..],
    ] {
        let line = first(args);
        assert!(line.contains("spool recovered"), "{args:?}: {line}");
    }
}

#[test]
fn an_outbound_ca_that_cannot_work_stops_the_start_with_hold_too() {
    // A file, not a flag, that cannot work: a start-up failure (exit 1, as for --tls-cert),
    // which a supervisor may try again once the file is there, not a wrong flag (exit 2).
    let dir = tempfile::tempdir().unwrap();
    let empty = dir.path().join("empty.pem");
    std::fs::write(&empty, "").unwrap();
    // One good CA and a PEM block damaged (a file cut or mangled): the damaged one is not left
    // out without a word (the mail of the next hops it signs would wait until it is
    // returned). And a file whose every certificate is no trust anchor.
    let good = rcgen::generate_simple_self_signed(vec!["ca.test".into()]).unwrap();
    let good = good.cert.pem();
    let damaged = dir.path().join("damaged.pem");
    std::fs::write(
        &damaged,
        format!("{good}-----BEGIN CERTIFICATE-----\n!!!!\n-----END CERTIFICATE-----\n"),
    )
    .unwrap();
    let no_anchor = dir.path().join("no-anchor.pem");
    std::fs::write(
        &no_anchor,
        "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
    )
    .unwrap();
    let spool = dir.path().join("spool");
    for ca in [
        empty.to_str().unwrap(),
        "/nonexistent/ca.pem",
        damaged.to_str().unwrap(),
        no_anchor.to_str().unwrap(),
    ] {
        let args = [
            "serve",
            "--hold",
            "--listen",
            "127.0.0.1:0",
            "--spool",
            spool.to_str().unwrap(),
            "--outbound-tls",
            "required",
            "--outbound-tls-ca",
            ca,
        ];
        let (code, _, err) = run(&args);
        assert_eq!(code, 1, "{args:?}: {err}");
        let line = err
            .lines()
            .find(|l| l.starts_with("postern: cannot start"))
            .unwrap_or_else(|| panic!("{err}"));
        assert!(line.contains("--outbound-tls-ca"), "{line}");
        assert!(!spool.exists(), "the spool was made: {err}");
    }
    // A bundle with a certificate rustls cannot take beside good ones (distribution bundles
    // have a few): the good ones are used, and the log says how many were left out.
    let mixed = dir.path().join("mixed.pem");
    std::fs::write(
        &mixed,
        format!("{good}-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"),
    )
    .unwrap();
    let server = common::Server::start(&[
        "--outbound-tls",
        "required",
        "--outbound-tls-ca",
        mixed.to_str().unwrap(),
    ]);
    let line = server.log_until(|l| l.contains("cannot be trust anchors"));
    assert!(
        line.contains("1 of its certificates") && line.contains("(1 taken)"),
        "{line}"
    );
}

/// Starts `postern serve` with a certificate and key and returns its exit code and stderr
/// (it exits at once when they cannot work).
fn start_with_tls_files(cert: &str, key: &str) -> (i32, String) {
    let dir = tempfile::tempdir().unwrap();
    let spool = dir.path().join("spool");
    let (code, _, err) = run(&[
        "serve",
        "--hold",
        "--listen",
        "127.0.0.1:0",
        "--spool",
        spool.to_str().unwrap(),
        "--tls-cert",
        cert,
        "--tls-key",
        key,
    ]);
    (code, err)
}

#[test]
fn tls_files_that_cannot_work_are_named_with_what_to_do() {
    let dir = tempfile::tempdir().unwrap();
    let path = |name: &str| dir.path().join(name).to_str().unwrap().to_owned();
    let one = rcgen::generate_simple_self_signed(vec!["mx.test".into()]).unwrap();
    let other = rcgen::generate_simple_self_signed(vec!["mx.test".into()]).unwrap();
    std::fs::write(path("cert.pem"), one.cert.pem()).unwrap();
    std::fs::write(path("other.key"), other.signing_key.serialize_pem()).unwrap();
    // What `openssl pkcs8 -topk8 -v2 aes256` and the legacy `-aes256` forms look like.
    std::fs::write(
        path("pkcs8.key"),
        "-----BEGIN ENCRYPTED PRIVATE KEY-----\nMIIFHDBOBgkqhkiG9w0BBQ0w\n-----END ENCRYPTED PRIVATE KEY-----\n",
    )
    .unwrap();
    std::fs::write(
        path("legacy.key"),
        "-----BEGIN RSA PRIVATE KEY-----\nProc-Type: 4,ENCRYPTED\nDEK-Info: AES-256-CBC,00112233445566778899AABBCCDDEEFF\n\nMIIEpAIBAAKCAQEA\n-----END RSA PRIVATE KEY-----\n",
    )
    .unwrap();

    let (code, err) = start_with_tls_files(&path("cert.pem"), &path("other.key"));
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("other.key"), "the key is not named: {err}");
    assert!(err.contains("first certificate"), "{err}");
    // Each file is named with its flag: one missing, and one file given to both flags.
    let (code, err) = start_with_tls_files(&path("missing.pem"), &path("other.key"));
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains(&format!("--tls-cert {}", path("missing.pem"))),
        "{err}"
    );
    let (code, err) = start_with_tls_files(&path("cert.pem"), &path("cert.pem"));
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains(&format!("--tls-key {}: no private key", path("cert.pem"))),
        "{err}"
    );
    for key in ["pkcs8.key", "legacy.key"] {
        let (code, err) = start_with_tls_files(&path("cert.pem"), &path(key));
        assert_eq!(code, 1, "{err}");
        assert!(err.contains(&format!("--tls-key {}", path(key))), "{err}");
        assert!(err.contains("encrypted"), "{key}: {err}");
        assert!(err.contains("openssl pkey"), "{key}: {err}");
    }
}

#[test]
fn the_queue_command_names_a_missing_spool_and_says_when_the_queue_is_empty() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nothing-here");
    let (code, out, err) = run(&["queue", "--spool", missing.to_str().unwrap()]);
    assert_eq!(code, 1, "{out}{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains("no spool at") && err.contains("nothing-here"),
        "{err}"
    );
    // A directory that is no spool (a typo) is not an empty queue.
    let (code, _, err) = run(&["queue", "--spool", dir.path().to_str().unwrap()]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("no postern.lock"), "{err}");
    // What a server that took nothing leaves: its lock file.
    std::fs::write(dir.path().join("postern.lock"), "").unwrap();
    let (code, out, err) = run(&["queue", "--spool", dir.path().to_str().unwrap()]);
    assert_eq!(
        (code, out.as_str()),
        (0, "-- the queue is empty\n"),
        "{err}"
    );
    // A move to fewer cores under way (or cut off) may list a message twice: said so.
    std::fs::write(dir.path().join(".fold-journal"), "").unwrap();
    let (code, out, err) = run(&["queue", "--spool", dir.path().to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    assert!(out.starts_with("-- the queue is empty\n"), "{out}");
    assert!(out.contains("move of the queue to fewer cores"), "{out}");
    std::fs::remove_file(dir.path().join(".fold-journal")).unwrap();
    // A core's entry that is a file: the server will not start on it, so the listing does
    // not call the queue empty.
    std::fs::write(dir.path().join("0"), "").unwrap();
    let (code, out, err) = run(&["queue", "--spool", dir.path().to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    assert!(!out.contains("the queue is empty"), "{out}");
    assert!(out.contains("named like a core's directory"), "{out}");
    let (code, _, err) = run(&[
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--hold",
        "--cores",
        "1",
        "--spool",
        dir.path().to_str().unwrap(),
    ]);
    assert_eq!(code, 1, "{err}");
    std::fs::remove_file(dir.path().join("0")).unwrap();
    refused(
        &[
            "queue",
            "--spool",
            dir.path().to_str().unwrap(),
            "--cores",
            "2",
        ],
        "--cores",
    );
}

#[test]
fn the_queue_and_the_log_give_an_ipv4_client_of_a_dual_stack_listener_as_itself() {
    // It arrives as ::ffff:127.0.0.1; Received, relay control and the per-IP count take it
    // as 127.0.0.1, and so do the listing and the log. That needs dual-stack IPv6 sockets.
    let dual_stack = std::fs::read_to_string("/proc/sys/net/ipv6/bindv6only")
        .is_ok_and(|v| v.trim() == "0")
        && std::net::TcpListener::bind("[::]:0").is_ok();
    assert!(
        dual_stack,
        "this test needs dual-stack IPv6 sockets (net.ipv6.bindv6only = 0)"
    );
    // Relaying for nobody here, so that a recipient elsewhere is refused (and logged).
    let mut server = common::Server::start(&[
        "--listen",
        "[::]:0",
        "--relay-network",
        "192.0.2.0/24",
        "--accept-domain",
        "dest.test",
    ]);
    let v4 = std::net::SocketAddr::from(([127, 0, 0, 1], server.smtp.port()));
    let mut c = common::Client::connect(v4);
    c.line();
    c.cmd("EHLO client.test");
    c.cmd("MAIL FROM:<a@client.test>");
    assert!(c.cmd("RCPT TO:<c@elsewhere.test>").starts_with("554"));
    assert!(c.cmd("RCPT TO:<b@dest.test>").starts_with("250"));
    c.cmd("DATA");
    let id = common::queue_id(&c.cmd("Subject: v4\r\n\r\nx\r\n."));
    let log = server.terminate_for_log();
    let accepted = log
        .lines()
        .find(|l| l.contains("message accepted"))
        .unwrap();
    let refused = log
        .lines()
        .find(|l| l.contains("recipient refused"))
        .unwrap();
    for line in [accepted, refused] {
        assert!(line.contains("client=127.0.0.1 "), "{line}");
    }
    let (code, out, err) = run(&["queue", "--json", "--spool", server.spool.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    let line = out.lines().find(|l| l.contains(&id)).unwrap();
    assert!(line.contains("\"client\":\"127.0.0.1\""), "{line}");
}

#[test]
fn the_queue_listing_escapes_controls_and_bidi_overrides_in_addresses() {
    // SMTPUTF8 addresses may hold C1 controls (U+009B is CSI on many terminals) and bidi
    // overrides: the listing must not pass them to the operator's terminal.
    let mut server = common::Server::start(&[]);
    let mut c = server.connect();
    c.line();
    c.cmd("EHLO client.test");
    assert!(c
        .cmd("MAIL FROM:<evil\u{202e}cba@client.test> SMTPUTF8")
        .starts_with("250"));
    assert!(c.cmd("RCPT TO:<x\u{9b}2J@localhost>").starts_with("250"));
    c.cmd("DATA");
    common::queue_id(&c.cmd("Subject: t\r\n\r\nx\r\n."));
    assert!(server.terminate().success());
    let (code, out, err) = run(&["queue", "--spool", server.spool.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    assert!(
        !out.contains('\u{202e}') && !out.contains('\u{9b}'),
        "{out:?}"
    );
    assert!(
        out.contains("<evil\\u{202e}cba@client.test>") && out.contains("<x\\u{9b}2J@localhost>"),
        "{out}"
    );
    // The JSON listing too, as JSON escapes: a reader gets the addresses as they are.
    let (code, out, err) = run(&["queue", "--json", "--spool", server.spool.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    assert!(
        !out.contains('\u{202e}') && !out.contains('\u{9b}'),
        "{out:?}"
    );
    let line: serde_json::Value = serde_json::from_str(out.lines().next().unwrap()).unwrap();
    assert_eq!(line["sender"], "evil\u{202e}cba@client.test");
    assert_eq!(line["recipients"][0]["address"], "x\u{9b}2J@localhost");
}

#[test]
fn a_spool_the_caller_cannot_enter_is_not_called_missing() {
    // Run as nobody (CI runs as root; setpriv is in util-linux) on a spool of mode 700.
    let dir = tempfile::tempdir().unwrap();
    let spool = dir.path().join("spool");
    std::fs::create_dir(&spool).unwrap();
    std::fs::write(spool.join("postern.lock"), "").unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let list_as_nobody = || {
        let out = Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .arg(env!("CARGO_BIN_EXE_postern"))
            .args(["queue", "--spool"])
            .arg(&spool)
            .output()
            .unwrap();
        let said = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        (out.status.code(), said)
    };
    // Mode 700: it may not enter; 711: it may enter and not list, which is no empty queue
    // either.
    for mode in [0o700, 0o711] {
        std::fs::set_permissions(&spool, std::fs::Permissions::from_mode(mode)).unwrap();
        let (code, said) = list_as_nobody();
        assert!(
            running_as_root(),
            "running as another user needs root (CI runs the tests as root); {said}"
        );
        assert_eq!(code, Some(1), "{mode:o}: {said}");
        assert!(
            said.contains("cannot read the spool at") && said.contains("ermission denied"),
            "{mode:o}: {said}"
        );
    }
}

#[test]
fn a_flush_without_a_server_on_the_spool_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (code, _, err) = run(&["queue", "--flush", "--spool", dir.path().to_str().unwrap()]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("no postern serves"), "{err}");
    // A lock file left by a server that has gone (its lock went with it).
    std::fs::write(dir.path().join("postern.lock"), "4194303\n").unwrap();
    let (code, _, err) = run(&["queue", "--flush", "--spool", dir.path().to_str().unwrap()]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("no postern is running on"), "{err}");
    // A process that locks only the lock file (`flock` around a backup; here this test) is
    // not postern, and is not signalled (SIGUSR1 would end this test).
    let held = std::fs::File::open(dir.path().join("postern.lock")).unwrap();
    held.lock().unwrap();
    let (code, _, err) = run(&["queue", "--flush", "--spool", dir.path().to_str().unwrap()]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("no postern is running on"), "{err}");
    drop(held);
    // A process that locks the directory itself, as postern does, but is not postern (this
    // test): not signalled either, and said so.
    let dir_lock = std::fs::File::open(dir.path()).unwrap();
    dir_lock.lock().unwrap();
    let (code, _, err) = run(&["queue", "--flush", "--spool", dir.path().to_str().unwrap()]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("which is not postern"), "{err}");
    drop(dir_lock);
    refused(&["queue", "--flush", "--json"], "--json");
}

/// `postern serve --hold` on a fresh spool with `flags`, run through `wrapper` (a command and
/// its arguments, ending where the program goes), without RUST_BACKTRACE.
fn serve_under(wrapper: &[&str], flags: &[&str]) -> (i32, String, String) {
    let dir = tempfile::tempdir().unwrap();
    let spool = dir.path().join("spool");
    let mut cmd = Command::new(wrapper[0]);
    cmd.args(&wrapper[1..])
        .arg(env!("CARGO_BIN_EXE_postern"))
        .args(["serve", "--listen", "127.0.0.1:0", "--hold", "--spool"])
        .arg(&spool)
        .args(flags)
        .env_remove("RUST_BACKTRACE");
    common::run_command_bounded(cmd)
}

/// What a panic prints by default; none may reach an operator at start-up.
const RAW_PANIC: &str = "RUST_BACKTRACE";

#[test]
fn required_outbound_tls_without_any_trust_anchor_is_a_start_up_error() {
    // A trust store that holds nothing (here: SSL_CERT_FILE and SSL_CERT_DIR naming nothing)
    // and no --outbound-tls-ca: no next hop could ever be verified, and every message would
    // wait until it is returned. Said at start, with what to do.
    let (code, _, err) = serve_under(
        &[
            "env",
            "SSL_CERT_FILE=/nonexistent/ca.pem",
            "SSL_CERT_DIR=/nonexistent",
        ],
        &["--outbound-tls", "required"],
    );
    assert_eq!(code, 1, "{err}");
    let line = err
        .lines()
        .find(|l| l.starts_with("postern: cannot start"))
        .unwrap_or_else(|| panic!("{err}"));
    assert!(line.contains("no trust anchor"), "{line}");
    assert!(
        line.contains("SSL_CERT_FILE") && line.contains("--outbound-tls-ca"),
        "{line}"
    );
    assert!(!err.contains(RAW_PANIC), "{err}");
}

#[test]
fn an_open_file_limit_too_low_for_the_cores_is_named() {
    let (code, _, err) = serve_under(&["prlimit", "--nofile=20:20"], &["--cores", "2"]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("cannot start: the open-file limit is 20, too low to start 2 cores"),
        "{err}"
    );
    assert!(!err.contains(RAW_PANIC), "{err}");
}

#[test]
fn an_address_not_of_this_machine_is_named_with_what_to_do() {
    // 192.0.2.1 (TEST-NET-1) is on no interface here.
    let (code, _, err) = serve_under(&["env"], &["--listen", "192.0.2.1:0"]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("cannot listen on 192.0.2.1:0") && err.contains("not one of this machine's"),
        "{err}"
    );
}

#[test]
fn a_start_that_fails_on_its_certificate_has_not_touched_the_spool() {
    // The spool is made (or moved to fewer cores) only once everything else is known good.
    let dir = tempfile::tempdir().unwrap();
    let spool = dir.path().join("spool");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_postern"));
    cmd.args(["serve", "--listen", "127.0.0.1:0", "--hold", "--spool"])
        .arg(&spool)
        .args([
            "--tls-cert",
            "/nonexistent/cert.pem",
            "--tls-key",
            "/nonexistent/key.pem",
        ])
        .env_remove("RUST_BACKTRACE");
    let (code, _, err) = common::run_command_bounded(cmd);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("/nonexistent/cert.pem"), "{err}");
    assert!(
        !spool.exists(),
        "the spool was made before the certificate was read"
    );
}

#[test]
fn a_file_size_limit_below_one_segment_is_a_start_up_error() {
    // Every segment file would fail to be made (EFBIG): no message could ever be stored.
    let (code, _, err) = serve_under(&["prlimit", "--fsize=1048576"], &["--cores", "1"]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains(
            "cannot start: the file-size limit is 1048576 bytes, less than one spool segment"
        ),
        "{err}"
    );
    assert!(!err.contains(RAW_PANIC), "{err}");
}

#[test]
fn no_io_uring_is_a_start_up_error_saying_what_to_allow() {
    // strace's --seccomp-bpf puts the traced process under a seccomp filter (as a container
    // runtime does), which changes what an ENOSYS is taken for. Tests that run under a filter
    // of their own cannot show the unfiltered case.
    let runner_filtered = std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .any(|l| l.strip_prefix("Seccomp:").map(str::trim) == Some("2"));
    for (call, errno, filtered, says) in [
        (
            "io_uring_setup",
            "EPERM",
            false,
            "io_uring is not allowed here",
        ),
        (
            "io_uring_setup",
            "ENOSYS",
            false,
            "this kernel has no io_uring",
        ),
        (
            "io_uring_setup",
            "ENOSYS",
            true,
            "io_uring is refused by this process's seccomp filter",
        ),
        (
            "io_uring_setup",
            "EPERM",
            true,
            "this process's seccomp filter refuses it",
        ),
        // A seccomp profile that lets a ring be made but not used.
        (
            "io_uring_register",
            "EPERM",
            false,
            "io_uring is not allowed here",
        ),
        (
            "io_uring_enter",
            "EPERM",
            false,
            "io_uring is not allowed here",
        ),
        // A kernel whose io_uring is older than what glommio asks of it.
        (
            "io_uring_register",
            "EINVAL",
            false,
            "this kernel's io_uring is too old",
        ),
    ] {
        if runner_filtered && !filtered && errno == "ENOSYS" {
            continue;
        }
        let errno = format!("{call}:error={errno}");
        let inject = format!("inject={errno}");
        let trace = format!("trace={call}");
        let mut strace = vec!["strace", "-f", "-qq", "-o", "/dev/null", "-e", &inject];
        if filtered {
            // The filter stops only at the traced calls, which must be named.
            strace.extend(["-e", &trace, "--seccomp-bpf"]);
        }
        let (code, _, err) = serve_under(&strace, &["--cores", "1"]);
        assert_eq!(code, 1, "{errno}: {err}");
        assert!(err.contains(says), "{errno}: {err}");
        assert_eq!(err.matches("cannot start").count(), 1, "{errno}: {err}");
        assert!(!err.contains(RAW_PANIC), "{errno}: {err}");
    }
}

#[test]
fn a_ring_refused_for_memory_at_the_start_up_look_is_told_with_the_memlock_limit() {
    // The first ring postern makes (the start-up look, before any core) fails with ENOMEM,
    // as under a low locked-memory limit without CAP_IPC_LOCK: the line gives the limit, as
    // a core's failure does, beside what to do.
    let (code, _, err) = serve_under(
        &[
            "prlimit",
            "--memlock=65536:65536",
            "strace",
            "-f",
            "-qq",
            "-o",
            "/dev/null",
            "-e",
            "inject=io_uring_setup:error=ENOMEM:when=1",
        ],
        &["--cores", "1"],
    );
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("cannot make an io_uring"), "{err}");
    assert!(err.contains("the memlock limit here is 64 KiB"), "{err}");
    assert!(err.contains("ulimit -l unlimited"), "{err}");
    assert_eq!(err.matches("cannot start").count(), 1, "{err}");
}

#[test]
fn a_core_that_fails_to_start_after_another_has_started_ends_the_start_up() {
    // How many rings each thread of a two-core server makes as it starts. strace counts the
    // calls of each thread apart, and the core that comes first to glommio's look at the
    // kernel's features makes one ring more than the other (for that look), so the last ring
    // of that core can be made to fail while the other core starts.
    let trace = tempfile::NamedTempFile::new().unwrap();
    let trace_path = trace.path().to_str().unwrap().to_owned();
    let dir = tempfile::tempdir().unwrap();
    let mut count = Command::new("strace");
    count
        .args(["-f", "-qq", "-e", "trace=io_uring_setup", "-o", &trace_path])
        .arg(env!("CARGO_BIN_EXE_postern"))
        .args([
            "serve",
            "--cores",
            "2",
            "--listen",
            "127.0.0.1:0",
            "--hold",
            "--spool",
        ])
        .arg(dir.path().join("spool"))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null());
    let mut tracer = common::KillOnDrop(count.spawn().unwrap());
    let stdout = std::io::BufReader::new(tracer.stdout.take().unwrap());
    let ready = std::io::BufRead::lines(stdout)
        .map_while(Result::ok)
        .any(|l| l.contains("ready with"));
    // strace's child is the server; killing strace would leave it running, so it is stopped
    // itself: with SIGTERM here, and with SIGKILL should an assertion fail first.
    let tracer_pid = tracer.id();
    let children =
        std::fs::read_to_string(format!("/proc/{tracer_pid}/task/{tracer_pid}/children"))
            .unwrap_or_default();
    struct KillPid(String);
    impl Drop for KillPid {
        fn drop(&mut self) {
            if self.0.parse::<u32>().is_ok_and(|pid| pid > 1) {
                let _ = Command::new("kill")
                    .args(["-KILL", &self.0])
                    .stderr(std::process::Stdio::null())
                    .status();
            }
        }
    }
    let server = KillPid(children.split_whitespace().next().unwrap_or("").to_owned());
    assert!(ready);
    assert!(
        server.0.parse::<u32>().is_ok_and(|pid| pid > 1),
        "{children:?}"
    );
    assert!(Command::new("kill")
        .args(["-TERM", &server.0])
        .status()
        .unwrap()
        .success());
    assert!(tracer.wait().unwrap().success());
    let trace = std::fs::read_to_string(&trace_path).unwrap();
    let mut per_thread = std::collections::BTreeMap::<u32, usize>::new();
    for line in trace.lines().filter(|l| l.contains("io_uring_setup(")) {
        let tid = line.split_whitespace().next().unwrap().parse().unwrap();
        *per_thread.entry(tid).or_default() += 1;
    }
    // The main thread's look, then the cores in the order they were made.
    let counts: Vec<usize> = per_thread.values().copied().collect();
    assert_eq!(counts.len(), 3, "{trace}");
    let more = counts[1].max(counts[2]);
    assert!(counts[1] != counts[2] && more > counts[0], "{counts:?}");

    // The last ring of the core that makes more fails; the other core starts.
    let inject = format!("inject=io_uring_setup:error=ENOMEM:when={more}");
    let (code, _, err) = serve_under(
        &["strace", "-f", "-qq", "-o", "/dev/null", "-e", &inject],
        &["--cores", "2"],
    );
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("cannot start"), "{err}");
    assert!(!err.contains(RAW_PANIC), "{err}");

    // The same failure, 5 s late: meanwhile the core that started takes a client. The failed
    // start then stops that core as SIGTERM does (the idle client gets 421) before the
    // process exits, rather than dropping its connection.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let client = std::thread::spawn(move || {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        let stream = loop {
            match TcpStream::connect(("127.0.0.1", port)) {
                Ok(s) => break s,
                Err(e) => {
                    assert!(
                        std::time::Instant::now() < deadline,
                        "nothing on {port}: {e}"
                    );
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
            }
        };
        let mut c = common::Client::from_stream(stream);
        let mut said = vec![c.line(), c.cmd("EHLO early.test")];
        // The next reply is the one the stop gives.
        said.push(c.line());
        let closed = c.closed();
        (said, closed)
    });
    let inject = format!("inject=io_uring_setup:error=ENOMEM:delay_enter=5000000:when={more}");
    let listen = format!("127.0.0.1:{port}");
    let (code, _, err) = serve_under(
        &["strace", "-f", "-qq", "-o", "/dev/null", "-e", &inject],
        &["--cores", "2", "--listen", &listen],
    );
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("cannot start"), "{err}");
    let (said, closed) = client.join().unwrap();
    assert!(said[0].starts_with("220 "), "{said:?}");
    assert!(said[1].starts_with("250 "), "{said:?}");
    assert!(said[2].starts_with("421 4.3.2"), "{said:?}");
    assert!(closed, "{said:?}");
}

#[test]
#[cfg(debug_assertions)] // The hook that makes a core fail is in debug builds only.
fn a_core_that_fails_as_it_starts_is_called_a_bug_not_a_memlock_limit() {
    // A panic in postern's own code while a core starts: the start's last line says so,
    // rather than send the operator to io_uring and the memlock limit.
    let dir = tempfile::tempdir().unwrap();
    let spool = dir.path().join("spool");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_postern"));
    cmd.args([
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--cores",
        "2",
        "--hold",
        "--spool",
    ])
    .arg(&spool)
    .env("POSTERN_DEBUG_FAIL_CORE", "1:start");
    let (code, _, err) = common::run_command_bounded(cmd);
    assert_eq!(code, 1, "{err}");
    let line = err
        .lines()
        .find(|l| l.starts_with("postern: cannot start"))
        .unwrap_or_else(|| panic!("{err}"));
    assert!(line.contains("a core failed as it started"), "{line}");
    assert!(line.contains("a bug in postern"), "{line}");
    assert!(!line.contains("memlock"), "{line}");
}

#[test]
fn a_value_that_is_not_utf8_is_named_with_its_flag_or_variable() {
    use std::ffi::OsStr;
    use std::os::unix::ffi::OsStrExt;
    let bad = OsStr::from_bytes(b"\xff");
    let bad_eq = OsStr::from_bytes(b"--cores=\xff");
    let cases: [(&[&OsStr], Option<&str>, &str); 3] = [
        (
            &[OsStr::new("--cores"), bad],
            None,
            "invalid UTF-8 in the value of --cores",
        ),
        (&[bad_eq], None, "invalid UTF-8 in the value of --cores"),
        (
            &[],
            Some("POSTERN_HOSTNAME"),
            "invalid UTF-8 in the variable POSTERN_HOSTNAME",
        ),
    ];
    for (args, var, says) in cases {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_postern"));
        cmd.arg("serve").args(args);
        if let Some(var) = var {
            cmd.env(var, bad);
        }
        let out = cmd.output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{says}: {err}");
        assert_eq!(err.lines().count(), 1, "{says}: {err}");
        assert_eq!(err.trim_end(), format!("postern: {says}"));
    }
}

#[test]
fn a_value_with_a_line_break_inside_is_named_on_one_line() {
    // Arguments, an environment variable (name, value), and the line said.
    type Case<'a> = (&'a [&'a str], Option<(&'a str, &'a str)>, &'a str);
    let cases: [Case<'_>; 5] = [
        (
            &["--dns-server", "10.0.0.53\nx"],
            None,
            "a control character (\\n) in the value of --dns-server",
        ),
        (
            &["--max-message-size=1\n\n2"],
            None,
            "a control character (\\n) in the value of --max-message-size",
        ),
        (
            &["--route", "a.example=b\r.example:25"],
            None,
            "a control character (\\r) in the value of --route",
        ),
        (
            &[],
            Some(("POSTERN_RELAY_HOST", "relay\n.example")),
            "a control character (\\n) in the variable POSTERN_RELAY_HOST",
        ),
        (
            &["x\ty"],
            None,
            "a control character (\\t) in the argument 'x\\ty'",
        ),
    ];
    for (args, var, says) in cases {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_postern"));
        cmd.arg("serve").args(args);
        if let Some((name, value)) = var {
            cmd.env(name, value);
        }
        let (code, _, err) = common::run_command_bounded(cmd);
        assert_eq!(code, 2, "{says}: {err}");
        assert_eq!(err.lines().count(), 1, "{says}: {err}");
        assert_eq!(err.trim_end(), format!("postern: {says}"));
    }
    // Help is shown whatever the values.
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_postern"));
    cmd.args(["serve", "--help"])
        .env("POSTERN_RELAY_HOST", "relay\n.example");
    let (code, out, err) = common::run_command_bounded(cmd);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("--relay-host"), "{out}");
    // A CR or LF at a value's end (an environment file written on another system) is no
    // part of the value, as any blank there.
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_postern"));
    cmd.args(["serve", "--cores", "0"])
        .env("POSTERN_HOSTNAME", "mx.example\r\n");
    let (code, _, err) = common::run_command_bounded(cmd);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("--cores"), "{err}");
    // A variable the command does not read holds nothing wrong: one whose flag is on the
    // command line, one that names no setting, one of another command.
    let unread: [(&[&str], &str); 4] = [
        (
            &["serve", "--cores", "0", "--route", "a.example=b.example:25"],
            "POSTERN_ROUTE",
        ),
        (
            &["serve", "--cores", "0", "--route=a.example=b.example:25"],
            "POSTERN_ROUTE",
        ),
        (&["serve", "--cores", "0"], "POSTERN_NO_SUCH_SETTING"),
        (
            &["queue", "--spool", "/nonexistent/spool", "--cores", "0"],
            "POSTERN_RELAY_HOST",
        ),
    ];
    for (args, name) in unread {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_postern"));
        cmd.args(args).env(name, "x\ny");
        let (code, _, err) = common::run_command_bounded(cmd);
        assert_eq!(code, 2, "{args:?} {name}: {err}");
        assert!(err.contains("--cores"), "{args:?} {name}: {err}");
    }
}

#[test]
fn a_spool_path_that_is_no_directory_gets_advice_that_fits() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("a-file");
    std::fs::write(&file, "x").unwrap();
    let dangling = dir.path().join("dangling");
    std::os::unix::fs::symlink(dir.path().join("gone"), &dangling).unwrap();
    // The start-up error of a server on `spool` with `cores`.
    let start_error = |spool: &std::path::Path, cores: &str| {
        let spool = spool.to_str().unwrap();
        let (code, _, err) = run(&[
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--hold",
            "--cores",
            cores,
            "--spool",
            spool,
        ]);
        assert_eq!(code, 1, "{err}");
        err.lines()
            .find(|l| l.contains("cannot start"))
            .unwrap_or_else(|| panic!("no start-up error in {err}"))
            .to_owned()
    };
    for (spool, says) in [
        (&file, "it is not a directory"),
        (&dangling, "symbolic link to nothing"),
    ] {
        let line = start_error(spool, "1");
        assert!(line.contains(says), "{line}");
        assert!(!line.contains("create it"), "{line}");
    }
    // A core's own directory in the spool that is a file: named, with what to do.
    let spool = dir.path().join("spool");
    std::fs::create_dir_all(spool.join("0")).unwrap();
    std::fs::write(spool.join("1"), "x").unwrap();
    let line = start_error(&spool, "2");
    assert!(line.contains("/1 is not a directory"), "{line}");
    assert!(line.contains("--spool DIR"), "{line}");
}

#[test]
fn a_system_name_that_is_no_host_name_is_refused_like_a_flag() {
    // In a UTS namespace of its own (root, as CI runs), the system's name holds a space and
    // a line end: without --hostname it would go into the banner, EHLO and Received as is.
    let dir = tempfile::tempdir().unwrap();
    let spool = dir.path().join("spool");
    let script = format!(
        "printf 'bad host\\r\\n554 x' > /proc/sys/kernel/hostname && exec timeout 20 {} serve \
         --listen 127.0.0.1:0 --cores 1 --hold --spool {}",
        env!("CARGO_BIN_EXE_postern"),
        spool.display()
    );
    let out = Command::new("unshare")
        .args(["-u", "sh", "-c", &script])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains("--hostname") && err.contains("system's name"),
        "{err}"
    );
}

/// As a user without CAP_IPC_LOCK under the usual 8 MiB memlock limit, the I/O library cannot
/// register its (unused) buffers in every ring of two cores: harmless, and not a warning in
/// the log (it came in the library's debug format, and looked like a failure).
#[test]
fn an_unprivileged_start_under_the_usual_memlock_limit_logs_no_ring_warning() {
    let dir = tempfile::tempdir().unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    let spool = dir.path().join("spool");
    assert!(
        running_as_root(),
        "running as another user needs root (CI runs the tests as root)"
    );
    let mut cmd = Command::new("setpriv");
    cmd.args([
        "--reuid=65534",
        "--regid=65534",
        "--clear-groups",
        "sh",
        "-c",
    ])
    .arg(r#"ulimit -l 8192 && exec "$0" serve --cores 2 --hold --listen 127.0.0.1:0 --spool "$1""#)
    .arg(env!("CARGO_BIN_EXE_postern"))
    .arg(&spool);
    let err = ready_then_stopped(cmd);
    assert!(!err.contains("glommio"), "{err}");
}

/// Starts a server with `cmd` (at the default log level), reads its stdout until it is ready
/// with 2 cores, stops it with SIGTERM, asserts that it was ready and stopped well, and returns
/// the whole of its stderr.
fn ready_then_stopped(cmd: Command) -> String {
    ready_then_stopped_saying(cmd).1
}

/// [`ready_then_stopped`], also giving what the server wrote to stdout until it was ready.
fn ready_then_stopped_saying(mut cmd: Command) -> (String, String) {
    // The caller's RUST_LOG would change what the tests read; one the test sets stays.
    if !cmd.get_envs().any(|(k, _)| k == "RUST_LOG") {
        cmd.env_remove("RUST_LOG");
    }
    let mut child = cmd
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let ready = "ready with 2 cores";
    let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut said = String::new();
    while !said.contains(ready) {
        let mut line = String::new();
        if std::io::BufRead::read_line(&mut out, &mut line).unwrap() == 0 {
            break;
        }
        said.push_str(&line);
    }
    let stopped = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(stopped.success());
    let rest = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&rest.stderr).into_owned();
    assert!(said.contains(ready), "{said} {err}");
    assert!(rest.status.success(), "{err}");
    (said, err)
}

#[test]
fn a_spool_file_system_smaller_than_a_segment_is_refused_and_a_tight_one_warned_of() {
    let fs = common::Tmpfs::mount("8m");
    let spool = fs.path.join("spool");
    let spool = spool.to_str().unwrap();
    // The default 64 MiB segment cannot be made on 8 MiB.
    let (code, _, err) = run(&[
        "serve",
        "--hold",
        "--cores",
        "1",
        "--listen",
        "127.0.0.1:0",
        "--spool",
        spool,
    ]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("less than one spool segment") && err.contains("--spool-segment-size"),
        "{err}"
    );
    // 2 MiB segments fit, but not the four of each of two cores (one written, the next
    // made ahead, two kept from new mail).
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_postern"));
    cmd.args(["serve", "--hold", "--cores", "2", "--listen", "127.0.0.1:0"])
        .args(["--spool-segment-size", "2M", "--spool", spool]);
    let err = ready_then_stopped(cmd);
    assert!(
        err.contains("WARN") && err.contains("less than four segments for each core"),
        "{err}"
    );
}

/// Whether this test runs as root (CI does): only root can run a command as another user.
fn running_as_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|ids| ids.split_whitespace().nth(1).map(|euid| euid == "0"))
        .unwrap_or(false)
}

/// `postern serve` on two cores, an ephemeral loopback port and `spool`, for
/// [`ready_then_stopped`].
fn serve_on(spool: &std::path::Path) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_postern"));
    cmd.args([
        "serve",
        "--cores",
        "2",
        "--listen",
        "127.0.0.1:0",
        "--spool",
    ])
    .arg(spool);
    cmd
}

#[test]
fn a_switch_set_in_the_environment_is_turned_off_by_its_flag() {
    let dir = tempfile::tempdir().unwrap();
    let held = "--hold: accepted mail stays queued";
    let start = |extra: &[&str]| {
        let mut cmd = serve_on(&dir.path().join("spool"));
        cmd.args(extra).env("POSTERN_HOLD", "true");
        ready_then_stopped(cmd)
    };
    let err = start(&[]);
    assert!(err.contains(held), "{err}");
    let err = start(&["--hold=false"]);
    assert!(!err.contains(held), "{err}");
    // The bare flag still turns it on.
    let err = start(&["--hold"]);
    assert!(err.contains(held), "{err}");
}

#[test]
fn metrics_set_in_the_environment_are_turned_off_with_none() {
    // As the systemd unit sets POSTERN_METRICS and /etc/default/postern overrides it.
    let dir = tempfile::tempdir().unwrap();
    let start = |value: &str| {
        let mut cmd = serve_on(&dir.path().join("spool"));
        cmd.env("POSTERN_METRICS", value);
        ready_then_stopped_saying(cmd).0
    };
    let said = start("127.0.0.1:0");
    assert!(said.contains("metrics listening on 127.0.0.1:"), "{said}");
    for off in ["none", "None", " none "] {
        let said = start(off);
        assert!(!said.contains("metrics listening"), "{off:?}: {said}");
    }
    let (code, err) = serve_with_env(&[], "POSTERN_METRICS", "nowhere");
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("POSTERN_METRICS"), "{err}");
    assert!(err.contains("or none"), "{err}");
}

#[test]
fn an_empty_rust_log_keeps_the_default_and_a_wrong_one_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let held = "--hold: accepted mail stays queued";
    let start = |rust_log: &str| {
        let mut cmd = serve_on(&dir.path().join("spool"));
        cmd.arg("--hold").env("RUST_LOG", rust_log);
        ready_then_stopped(cmd)
    };
    // An empty value (from an environment file, say) is the default, info.
    for empty in ["", " "] {
        let err = start(empty);
        assert!(err.contains(held), "{empty:?}: {err}");
    }
    // Levels and targets as tracing takes them.
    assert!(start("info").contains(held));
    assert!(start("WARN,postern=info").contains(held));
    assert!(!start("warn").contains(held));
    // Blanks around the parts, as in the lists of POSTERN_* variables.
    assert!(start("warn, postern=info").contains(held));
    assert!(!start(" warn ").contains(held));
    assert!(start(" info ").contains(held));
    // Targets without a level of their own go on top of the default: the rest of the log
    // stays at info (it was off, errors included), and so does a misspelt target's.
    for on_top in [
        "postern_relay=debug",
        "bogus=info",
        " postern_relay::engine=trace ",
    ] {
        assert!(start(on_top).contains(held), "{on_top}");
    }
    // A target the value names takes the value's level, not the default's.
    assert!(!start("postern=warn").contains(held));
    // A word that is no level would have silenced every line.
    for wrong in ["garbage", "warning", "info,verbose"] {
        let out = Command::new(env!("CARGO_BIN_EXE_postern"))
            .args(["serve", "--listen", "127.0.0.1:0", "--spool"])
            .arg(dir.path().join("spool"))
            .env("RUST_LOG", wrong)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{wrong}: {err}");
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(err.contains("RUST_LOG"), "{err}");
    }
    // A value the filter's parser refuses is quoted as the operator wrote it, not with the
    // default it goes on top of.
    let out = Command::new(env!("CARGO_BIN_EXE_postern"))
        .args(["serve", "--listen", "127.0.0.1:0", "--spool"])
        .arg(dir.path().join("spool"))
        .env("RUST_LOG", "postern=bogus")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.starts_with("postern: RUST_LOG: 'postern=bogus': "),
        "{err}"
    );
}

#[test]
fn a_flag_without_its_value_does_not_take_the_next_flag_for_it() {
    // `--spool --hold` was a spool directory named `--hold`, and the server delivered mail.
    for (args, flag) in [
        (&["serve", "--spool", "--hold"][..], "--spool"),
        (&["serve", "--hostname", "--hold"], "--hostname"),
        (&["serve", "--route", "--hold"], "--route"),
        (&["serve", "--tls-cert", "--hold"], "--tls-cert"),
    ] {
        let (code, _, err) = run(args);
        assert_eq!(code, 2, "{args:?}: {err}");
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(err.contains(flag), "{args:?}: {err}");
    }
    // A negative number still reaches its flag's own check.
    refused(&["serve", "--max-message-size", "-1"], "--max-message-size");
    let (_, _, err) = run(&["serve", "--max-message-size", "-1"]);
    assert!(err.contains("'-1' is negative"), "{err}");
}

#[test]
fn a_negative_number_is_called_negative() {
    for flag in ["--cores", "--max-connections", "--max-junk-commands"] {
        refused(&["serve", flag, "-1"], flag);
        let (_, _, err) = run(&["serve", flag, "-1"]);
        assert!(err.contains("'-1' is negative"), "{err}");
    }
}

#[test]
fn a_host_name_of_one_label_is_warned_of() {
    // RFC 5321 2.3.5: the banner and EHLO carry a fully qualified name; a system named `vm`
    // (the default --hostname) still starts, with a warning that says what to give.
    let dir = tempfile::tempdir().unwrap();
    let start = |name: &str| {
        let mut cmd = serve_on(&dir.path().join("spool"));
        cmd.args(["--hold", "--hostname", name]);
        ready_then_stopped(cmd)
    };
    let warning = "the host name has a single label";
    let err = start("gateway");
    let line = err
        .lines()
        .find(|l| l.contains(warning))
        .unwrap_or_else(|| panic!("{err}"));
    assert!(
        line.contains("WARN") && line.contains("hostname=gateway") && line.contains("--hostname"),
        "{line}"
    );
    for name in [
        "mx1.example.net",
        "a.b",
        "[IPv6:2001:db8::25]",
        "[192.0.2.25]",
    ] {
        let err = start(name);
        assert!(!err.contains(warning), "{name}: {err}");
    }
}

#[test]
fn the_start_names_its_version_and_a_misspelt_variable() {
    let mut server = common::Server::start_with_env(&[], &[("POSTERN_METRIC", "127.0.0.1:0")]);
    // SIGHUP without TLS files reads nothing again, and says so.
    server.signal("-HUP");
    server.log_until(|l| l.contains("SIGHUP: nothing to read again"));
    let log = server.terminate_for_log();
    assert!(
        log.contains(&format!("postern {} starting", env!("CARGO_PKG_VERSION"))),
        "{log}"
    );
    let warned = log
        .lines()
        .find(|l| l.contains("POSTERN_METRIC "))
        .unwrap_or_else(|| panic!("{log}"));
    assert!(warned.contains("WARN"), "{warned}");
    assert!(warned.contains("names no setting"), "{warned}");
    // The real settings' names are not warned of.
    assert!(!log.contains("POSTERN_HOLD names"), "{log}");
}

#[test]
fn a_server_with_only_an_implicit_tls_listener_has_no_cleartext_port() {
    // The default --listen 127.0.0.1:2525 is for a server that names no listener: one given
    // only --listen-tls opened it all the same, a cleartext port that relays for loopback.
    use std::io::BufRead;
    let dir = tempfile::tempdir().unwrap();
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::write(&cert, ck.cert.pem()).unwrap();
    std::fs::write(&key, ck.signing_key.serialize_pem()).unwrap();
    // Without --listen, and with the unit's POSTERN_LISTEN set to none (which turns off the
    // cleartext listener that a unit's own setting asks for).
    for listen in [None, Some("none")] {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_postern"));
        cmd.arg("serve")
            .arg("--spool")
            .arg(dir.path().join(format!("spool-{}", listen.is_some())))
            .args(["--hold", "--cores", "1", "--listen-tls", "127.0.0.1:0"])
            .arg("--tls-cert")
            .arg(&cert)
            .arg("--tls-key")
            .arg(&key)
            .env_remove("POSTERN_LISTEN")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null());
        if let Some(value) = listen {
            cmd.env("POSTERN_LISTEN", value);
        }
        let mut child = common::KillOnDrop(cmd.spawn().unwrap());
        let out = std::io::BufReader::new(child.stdout.take().unwrap());
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in out.lines().map_while(Result::ok) {
                let ready = line.contains("ready with");
                let _ = tx.send(line);
                if ready {
                    break;
                }
            }
        });
        let mut lines = Vec::new();
        while !lines.iter().any(|l: &String| l.contains("ready with")) {
            let line = rx
                .recv_timeout(std::time::Duration::from_secs(20))
                .unwrap_or_else(|_| panic!("not ready: {lines:?}"));
            lines.push(line);
        }
        assert!(
            lines.iter().any(|l| l.contains("smtps listening on")),
            "{lines:?}"
        );
        assert!(
            !lines.iter().any(|l| l.contains("smtp listening on")),
            "{lines:?}"
        );
    }
    // None without an implicit-TLS listener would leave no listener; none beside addresses
    // says two things.
    refused(
        &["serve", "--listen", "none"],
        "--listen none leaves no listener",
    );
    refused(
        &["serve", "--listen", "none,127.0.0.1:2525"],
        "--listen none cannot be given with listen addresses",
    );
}

#[test]
fn a_start_that_fails_on_one_core_ends_at_once_with_delivery_on() {
    // Core 1's spool cannot open (its segment numbers are used up), core 0 started: the start
    // is given up. With delivery on, core 0's stop waited for every configured core to wind
    // its deliveries down, core 1 never would, and the failed start hung for the whole grace.
    let dir = tempfile::tempdir().unwrap();
    let spool = dir.path().join("spool");
    std::fs::create_dir_all(spool.join("1/4294967295.seg")).unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_postern"));
    cmd.arg("serve")
        .args(["--listen", "127.0.0.1:0", "--cores", "2"])
        .args([
            "--route",
            "dest.test=127.0.0.1:9",
            "--shutdown-grace",
            "60s",
        ])
        .arg("--spool")
        .arg(&spool);
    let (code, _, err) = common::run_command_bounded(cmd);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("no segment can follow"), "{err}");
}

#[test]
fn no_thread_for_the_log_writer_is_a_start_s_error_not_a_bug() {
    // As `nobody` under RLIMIT_NPROC 1: the process itself is the one task allowed, so the
    // first thread it makes (the log's writer) cannot be made.
    let dir = tempfile::tempdir().unwrap();
    let open = std::os::unix::fs::PermissionsExt::from_mode(0o777);
    std::fs::set_permissions(dir.path(), open).unwrap();
    let mut cmd = Command::new("setpriv");
    cmd.args(["--reuid=nobody", "--regid=nogroup", "--clear-groups"])
        .args(["prlimit", "--nproc=1"])
        .arg(env!("CARGO_BIN_EXE_postern"))
        .args(["serve", "--listen", "127.0.0.1:0", "--hold", "--spool"])
        .arg(dir.path().join("spool"))
        .env_remove("RUST_BACKTRACE");
    let (code, _, err) = common::run_command_bounded(cmd);
    assert_eq!(code, 1, "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.starts_with("postern: cannot start: no thread for the log writer"),
        "{err}"
    );
    assert!(!err.contains("internal error"), "{err}");
}

#[test]
fn a_limit_on_threads_is_named_at_start() {
    // As `nobody` under RLIMIT_NPROC 8 (a pids limit, TasksMax=): four cores need about
    // sixteen threads. The start fails with the limit named, not with advice about io_uring
    // and locked memory (and not with a panic of the start's own thread).
    let dir = tempfile::tempdir().unwrap();
    let open = std::os::unix::fs::PermissionsExt::from_mode(0o777);
    std::fs::set_permissions(dir.path(), open).unwrap();
    let (line, _) = start_failure(
        &[
            "setpriv",
            "--reuid=nobody",
            "--regid=nogroup",
            "--clear-groups",
            "prlimit",
            "--nproc=8",
        ],
        "4",
        &dir.path().join("spool"),
    );
    assert!(line.contains("a limit on tasks"), "{line}");
    assert!(!line.contains("memlock"), "{line}");
}

/// `postern serve --hold --listen 127.0.0.1:0 --cores CORES --spool SPOOL` run through
/// `wrapper` (a command that runs the one after it), expected to fail at start-up: its
/// `cannot start` line, and all it wrote to stderr.
fn start_failure(wrapper: &[&str], cores: &str, spool: &std::path::Path) -> (String, String) {
    let mut cmd = Command::new(wrapper[0]);
    cmd.args(&wrapper[1..])
        .arg(env!("CARGO_BIN_EXE_postern"))
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--hold",
            "--cores",
            cores,
        ])
        .arg("--spool")
        .arg(spool)
        .env_remove("RUST_BACKTRACE");
    let (code, _, err) = common::run_command_bounded(cmd);
    assert_eq!(code, 1, "{err}");
    let line = err
        .lines()
        .find(|l| l.starts_with("postern: cannot start:"))
        .unwrap_or_else(|| panic!("no start-up error in {err}"))
        .to_owned();
    (line, err)
}

#[test]
fn a_locked_memory_limit_too_small_for_the_rings_is_named_before_the_spool_is_touched() {
    // glommio will not start an executor under 512 KiB of locked memory: said at once, with
    // what to change, not after a recovery of the spool and with glommio's own words.
    let dir = tempfile::tempdir().unwrap();
    let spool = dir.path().join("spool");
    for limit in ["0", "65536"] {
        let memlock = format!("--memlock={limit}:{limit}");
        let (line, err) = start_failure(&["prlimit", &memlock], "2", &spool);
        assert!(
            line.contains(&format!(
                "limit here is {} KiB",
                limit.parse::<u64>().unwrap() / 1024
            )) && line.contains("at least 512 KiB")
                && line.contains("ulimit -l"),
            "{line}"
        );
        assert!(!spool.exists(), "the spool was made: {err}");
    }
}

#[test]
fn a_core_directory_the_server_s_user_cannot_read_is_named_with_what_to_do() {
    // The spool is nobody's, as the user postern runs as; a core's directory in it is
    // root's, mode 000 (copied in by hand as root, say).
    use std::os::unix::fs::PermissionsExt;
    assert!(running_as_root(), "running as another user needs root");
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let spool = dir.path().join("spool");
    std::fs::create_dir(&spool).unwrap();
    std::os::unix::fs::chown(&spool, Some(65534), Some(65534)).unwrap();
    std::fs::create_dir(spool.join("0")).unwrap();
    std::fs::set_permissions(spool.join("0"), std::fs::Permissions::from_mode(0o000)).unwrap();
    let (line, _) = start_failure(
        &[
            "setpriv",
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
        ],
        "1",
        &spool,
    );
    assert!(
        line.contains("ermission denied") && line.contains("chown -R"),
        "{line}"
    );
}
