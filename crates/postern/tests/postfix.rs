//! Postfix, which nobody here wrote, on both sides of postern: postern relays to Postfix's
//! smtpd (which offers CHUNKING, PIPELINING, DSN, SMTPUTF8 and 8BITMIME), and that Postfix
//! relays everything through its own SMTP client to a second postern. Every message arrives
//! whole: the same envelope and DSN parameters, and the same content behind the trace fields
//! each hop prepends. `scripts/test` installs Postfix; each test runs an instance of its own
//! (configuration and queue in a temporary directory, loopback only) and leaves the
//! machine's alone.
#![allow(clippy::unwrap_used)]

mod common;
mod relaying;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::Server;
use relaying::hello;

/// A Postfix instance listening on 127.0.0.1:`port` that relays all it takes to
/// 127.0.0.1:`relay`, with `extra` lines in its main.cf; stopped when dropped.
struct Postfix {
    dir: tempfile::TempDir,
    port: u16,
}

/// Postfix's services for relaying, none chrooted (the queue is a temporary directory
/// holding nothing a chroot would need).
const MASTER_CF: &str = "\
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
tlsmgr    unix  -       -       n       1000?   1       tlsmgr
postlog   unix-dgram n  -       n       -       1       postlogd
";

/// Postfix's command: Debian puts it in /usr/sbin, which a root shell's PATH may lack.
fn postfix_command() -> Command {
    let sbin = Path::new("/usr/sbin/postfix");
    Command::new(if sbin.exists() {
        sbin
    } else {
        Path::new("postfix")
    })
}

impl Postfix {
    fn start(relay: u16, extra: &str) -> Postfix {
        let installed = Command::new("id")
            .arg("postfix")
            .output()
            .is_ok_and(|o| o.status.success());
        assert!(installed, "Postfix is needed (scripts/test installs it)");
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        // Postfix's daemons run as its own user: they reach the queue through these
        // directories, whatever the umask made them.
        let open = |path: &Path| {
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
        };
        open(d);
        std::fs::create_dir(d.join("queue")).unwrap();
        open(&d.join("queue"));
        std::fs::create_dir(d.join("data")).unwrap();
        run(Command::new("chown").arg("postfix").arg(d.join("data")));
        let d_text = d.to_str().unwrap();
        let main_cf = format!(
            "compatibility_level = 3.6\n\
             queue_directory = {d_text}/queue\n\
             data_directory = {d_text}/data\n\
             maillog_file_prefixes = {d_text}\n\
             maillog_file = {d_text}/maillog\n\
             myhostname = pfx.test\n\
             inet_interfaces = loopback-only\n\
             inet_protocols = ipv4\n\
             mydestination =\n\
             mynetworks = 127.0.0.0/8\n\
             relayhost = [127.0.0.1]:{relay}\n\
             smtp_dns_support_level = disabled\n\
             alias_maps =\n\
             alias_database =\n\
             local_header_rewrite_clients =\n\
             in_flow_delay = 0s\n\
             smtputf8_enable = yes\n\
             {extra}"
        );
        std::fs::write(d.join("main.cf"), main_cf).unwrap();
        // Stopped when dropped from here on, should a start leave its master running.
        let mut pf = Postfix { dir, port: 0 };
        // A port free a moment ago may be taken before Postfix binds it: another, then.
        for attempt in 1..=3 {
            pf.port = std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port();
            let master_cf = format!("127.0.0.1:{} inet n - n - - smtpd\n{MASTER_CF}", pf.port);
            std::fs::write(pf.dir.path().join("master.cf"), master_cf).unwrap();
            let out = postfix_command()
                .arg("-c")
                .arg(pf.dir.path())
                .arg("start")
                .output()
                .unwrap();
            if out.status.success() {
                break;
            }
            assert!(attempt < 3, "postfix start: {out:?}\n{}", pf.log());
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", pf.port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "Postfix does not listen on {}: {}",
                pf.port,
                pf.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        pf
    }

    /// Postfix's log so far.
    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("maillog")).unwrap_or_default()
    }
}

impl Drop for Postfix {
    fn drop(&mut self) {
        let _ = postfix_command()
            .arg("-c")
            .arg(self.dir.path())
            .arg("stop")
            .output();
    }
}

/// Runs `cmd`, which must succeed.
fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(out.status.success(), "{cmd:?}: {out:?}");
}

/// One message sent to the first postern: its MAIL parameters, its recipients with their
/// RCPT parameters, and its content.
struct Sent {
    from: &'static str,
    mail_params: &'static str,
    rcpts: Vec<(String, &'static str)>,
    content: Vec<u8>,
}

/// Sends each message in a session of its own, by BDAT.
fn submit(server: &Server, sent: &[Sent]) {
    for m in sent {
        let (mut c, _) = hello(server);
        let mail = c.cmd(&format!("MAIL FROM:<{}>{}", m.from, m.mail_params));
        assert!(mail.starts_with("250"), "{mail}");
        for (rcpt, params) in &m.rcpts {
            let r = c.cmd(&format!("RCPT TO:<{rcpt}>{params}"));
            assert!(r.starts_with("250"), "{rcpt}: {r}");
        }
        c.send(format!("BDAT {} LAST\r\n", m.content.len()).as_bytes());
        c.send(&m.content);
        let reply = c.reply().pop().unwrap();
        assert!(reply.starts_with("250 2.0.0"), "{reply}");
        c.cmd("QUIT");
    }
}

/// What the second postern holds: each message's meta and content.
fn held(spool: &Path) -> Vec<(postern_spool::MessageMeta, Vec<u8>)> {
    let r = postern_spool::recover(spool).unwrap();
    r.messages
        .iter()
        .map(|m| (m.meta.clone(), r.body_vec(m)))
        .collect()
}

/// What `server` holds once `wanted` recipients have arrived there (bounded: a minute).
fn held_at(
    server: &Server,
    postfix: &Postfix,
    wanted: usize,
) -> Vec<(postern_spool::MessageMeta, Vec<u8>)> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let arrived = held(&server.spool);
        let rcpts: usize = arrived.iter().map(|(m, _)| m.recipients.len()).sum();
        if rcpts >= wanted {
            return arrived;
        }
        assert!(
            Instant::now() < deadline,
            "{rcpts} of {wanted} recipients arrived; Postfix's log:\n{}",
            postfix.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn message_id(content: &[u8]) -> String {
    String::from_utf8_lossy(content)
        .lines()
        .find_map(|l| l.strip_prefix("Message-ID: "))
        .unwrap_or_default()
        .to_owned()
}

#[test]
fn mail_relayed_through_postfix_arrives_whole() {
    let last = Server::start(&["--cores", "1"]);
    let postfix = Postfix::start(last.smtp.port(), "");
    let route = format!("viapf.test=127.0.0.1:{}", postfix.port);
    let first = Server::start(&["--cores", "1", "--route", &route]);

    // Text with dot lines (a lone dot too: BDAT carries it as it is, and each DATA on the
    // way must stuff it), 8-bit octets, and DSN parameters for Postfix to pass on.
    let dots = b"From: <s@origin.test>\r\nTo: <r1@viapf.test>\r\nSubject: dots\r\n\
        Date: Sun, 6 Dec 2026 12:00:00 +0000\r\nMessage-ID: <dots@pf.test>\r\n\r\n\
        .\r\n..two\r\n.leading\r\nd\xc3\xa9j\xc3\xa0 vu\r\n.\r\nend\r\n"
        .to_vec();
    // A UTF-8 sender and header field (SMTPUTF8).
    let utf8 = "From: <s\u{e9}nder@origin.test>\r\nTo: <r@viapf.test>\r\n\
        Subject: \u{e9}t\u{e9}\r\nDate: Sun, 6 Dec 2026 12:00:00 +0000\r\n\
        Message-ID: <utf8@pf.test>\r\n\r\nbody\r\n"
        .as_bytes()
        .to_vec();
    // 300 KiB of text: many chunks and writes on each hop.
    let mut big = b"From: <s@origin.test>\r\nTo: <r@viapf.test>\r\nSubject: big\r\n\
        Date: Sun, 6 Dec 2026 12:00:00 +0000\r\nMessage-ID: <big@pf.test>\r\n\r\n"
        .to_vec();
    for i in 0..4000 {
        big.extend_from_slice(format!("{i:06} {}\r\n", "x".repeat(69)).as_bytes());
    }
    // More recipients than Postfix sends in one transaction (50 by default).
    let many = b"From: <s@origin.test>\r\nTo: <list@viapf.test>\r\nSubject: many\r\n\
        Date: Sun, 6 Dec 2026 12:00:00 +0000\r\nMessage-ID: <many@pf.test>\r\n\r\nhello\r\n"
        .to_vec();
    let sent = [
        Sent {
            from: "s@origin.test",
            mail_params: " BODY=8BITMIME RET=HDRS ENVID=env+2Done",
            rcpts: vec![
                (
                    "r1@viapf.test".into(),
                    " NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;r1@viapf.test",
                ),
                ("r2@viapf.test".into(), " NOTIFY=NEVER"),
            ],
            content: dots,
        },
        Sent {
            from: "s\u{e9}nder@origin.test",
            mail_params: " SMTPUTF8 BODY=8BITMIME",
            rcpts: vec![("r@viapf.test".into(), "")],
            content: utf8,
        },
        Sent {
            from: "s@origin.test",
            mail_params: "",
            rcpts: vec![("r@viapf.test".into(), "")],
            content: big,
        },
        Sent {
            from: "s@origin.test",
            mail_params: "",
            rcpts: (0..120).map(|i| (format!("m{i}@viapf.test"), "")).collect(),
            content: many,
        },
    ];
    submit(&first, &sent);

    let wanted: usize = sent.iter().map(|m| m.rcpts.len()).sum();
    let arrived = held_at(&last, &postfix, wanted);

    for m in &sent {
        let id = message_id(&m.content);
        let copies: Vec<_> = arrived
            .iter()
            .filter(|(_, content)| message_id(content) == id)
            .collect();
        assert!(!copies.is_empty(), "{id} did not arrive");
        let mut rcpts: Vec<String> = copies
            .iter()
            .flat_map(|(meta, _)| meta.recipients.iter().map(|r| r.path.clone()))
            .collect();
        rcpts.sort();
        let mut want: Vec<String> = m.rcpts.iter().map(|(r, _)| r.clone()).collect();
        want.sort();
        assert_eq!(rcpts, want, "{id}");
        for (meta, content) in &copies {
            assert_eq!(meta.reverse_path, m.from, "{id}");
            // The content as sent, behind three trace fields: the last postern's, Postfix's
            // and the first postern's, newest first.
            assert!(
                content.ends_with(&m.content),
                "{id}: {}",
                String::from_utf8_lossy(content)
            );
            let trace = String::from_utf8_lossy(&content[..content.len() - m.content.len()]);
            let hops: Vec<&str> = trace
                .lines()
                .filter(|l| l.trim_start().starts_with("by "))
                .collect();
            assert_eq!(hops.len(), 3, "{id}: {trace}");
            assert!(hops[1].contains("pfx.test (Postfix)"), "{id}: {trace}");
            assert!(!trace.contains("Received: by"), "{id}: {trace}");
        }
    }

    // The DSN parameters came through Postfix as they were given.
    let (dots_meta, _) = arrived
        .iter()
        .find(|(_, c)| message_id(c) == "<dots@pf.test>")
        .unwrap();
    // The same value as the `env+2Done` given at the first hop, in Postfix's own xtext
    // spelling (`-` needs no escape).
    assert_eq!(dots_meta.envid.as_deref(), Some("env-one"));
    // RET=HDRS (2), NOTIFY=SUCCESS,FAILURE (1 | 2), NOTIFY=NEVER (0), BODY=8BITMIME (1).
    assert_eq!(dots_meta.ret, Some(2));
    let r1 = &dots_meta.recipients[0];
    assert_eq!(r1.path, "r1@viapf.test");
    assert_eq!(r1.orcpt.as_deref(), Some("rfc822;r1@viapf.test"));
    assert_eq!(r1.notify, Some(3));
    assert_eq!(dots_meta.recipients[1].notify, Some(0));
    assert_eq!(dots_meta.body_type, 1);
    let (utf8_meta, _) = arrived
        .iter()
        .find(|(_, c)| message_id(c) == "<utf8@pf.test>")
        .unwrap();
    assert!(utf8_meta.smtputf8);
}

#[test]
fn mail_relayed_through_postfix_goes_over_starttls_both_ways() {
    // Postfix's TLS is OpenSSL's: postern's SMTP client starts TLS with Postfix's smtpd, and
    // Postfix's SMTP client with the second postern (both opportunistic, as between MTAs
    // that do not verify each other).
    let ck = rcgen::generate_simple_self_signed(vec!["mx.test".into(), "pfx.test".into()]).unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::write(&cert, ck.cert.pem()).unwrap();
    std::fs::write(&key, ck.signing_key.serialize_pem()).unwrap();
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    let (cert, key) = (cert.to_str().unwrap(), key.to_str().unwrap());
    let last = Server::start(&["--cores", "1", "--tls-cert", cert, "--tls-key", key]);
    let postfix = Postfix::start(
        last.smtp.port(),
        &format!(
            "smtpd_tls_cert_file = {cert}\nsmtpd_tls_key_file = {key}\n\
             smtpd_tls_security_level = may\nsmtp_tls_security_level = may\n"
        ),
    );
    let route = format!("viapf.test=127.0.0.1:{}", postfix.port);
    let first = Server::start(&["--cores", "1", "--route", &route]);
    let content = b"From: <s@origin.test>\r\nTo: <r@viapf.test>\r\nSubject: tls\r\n\
        Date: Sun, 6 Dec 2026 12:00:00 +0000\r\nMessage-ID: <tls@pf.test>\r\n\r\nsecret\r\n"
        .to_vec();
    submit(
        &first,
        &[Sent {
            from: "s@origin.test",
            mail_params: "",
            rcpts: vec![("r@viapf.test".into(), "")],
            content: content.clone(),
        }],
    );
    let (meta, stored) = held_at(&last, &postfix, 1).pop().unwrap();
    assert_eq!(meta.recipients[0].path, "r@viapf.test");
    assert!(stored.ends_with(&content));
    let trace = String::from_utf8_lossy(&stored[..stored.len() - content.len()]).into_owned();
    // Each hop's trace field names the protocol its client used (RFC 3848): ESMTPS, over
    // TLS, from Postfix to the second postern and from the first postern to Postfix.
    let received: Vec<&str> = trace.split("Received: ").skip(1).collect();
    assert_eq!(received.len(), 3, "{trace}");
    assert!(received[0].contains("from pfx.test"), "{trace}");
    assert!(received[0].contains("with ESMTPS"), "{trace}");
    assert!(received[1].contains("by pfx.test (Postfix)"), "{trace}");
    assert!(received[1].contains("with ESMTPS"), "{trace}");
    assert!(received[2].contains("with ESMTP "), "{trace}");
}
