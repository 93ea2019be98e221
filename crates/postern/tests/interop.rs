//! Clients nobody here wrote: Python's smtplib (plain and STARTTLS) and swaks (pipelining,
//! STARTTLS). `scripts/test` installs python3 and swaks.
#![allow(clippy::unwrap_used)]

mod common;

use std::process::Command;

use common::{spooled, Server};

fn cert_files(dir: &std::path::Path) -> (String, String) {
    let ck =
        rcgen::generate_simple_self_signed(vec!["mx.test".into(), "localhost".into()]).unwrap();
    let cert = dir.join("cert.pem");
    let key = dir.join("key.pem");
    std::fs::write(&cert, ck.cert.pem()).unwrap();
    std::fs::write(&key, ck.signing_key.serialize_pem()).unwrap();
    (
        cert.to_str().unwrap().to_owned(),
        key.to_str().unwrap().to_owned(),
    )
}

#[test]
fn python_smtplib_plain_and_starttls() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = cert_files(dir.path());
    let mut server = Server::start(&["--tls-cert", &cert, "--tls-key", &key]);
    let script = r#"
import smtplib, ssl, sys
port = int(sys.argv[1])
with smtplib.SMTP("127.0.0.1", port, timeout=10) as s:
    code, caps = s.ehlo("py.test")
    assert code == 250 and s.has_extn("pipelining") and s.has_extn("chunking"), caps
    refused = s.sendmail("py@origin.test", ["one@dest.test", "two@dest.test"],
                         "Subject: plain\r\n\r\nfrom smtplib\r\n.leading dot\r\n")
    assert refused == {}, refused
with smtplib.SMTP("127.0.0.1", port, timeout=10) as s:
    ctx = ssl.create_default_context(cafile=sys.argv[2])
    ctx.check_hostname = False
    s.starttls(context=ctx)
    s.ehlo("py.test")
    assert not s.has_extn("starttls")
    s.sendmail("py@origin.test", ["three@dest.test"], "Subject: tls\r\n\r\nover starttls\r\n")
print("ok")
"#;
    let out = Command::new("python3")
        .args(["-c", script, &server.smtp.port().to_string(), &cert])
        .output()
        .expect("python3 is needed (scripts/test installs it)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(server.terminate().success());
    let msgs = spooled(&server.spool);
    assert_eq!(msgs.len(), 2);
    let plain = msgs.iter().find(|m| m.2.len() == 2).unwrap();
    assert!(plain
        .3
        .ends_with(b"Subject: plain\r\n\r\nfrom smtplib\r\n.leading dot\r\n"));
    let tls = msgs
        .iter()
        .find(|m| m.2 == vec!["three@dest.test".to_owned()])
        .unwrap();
    assert!(String::from_utf8_lossy(&tls.3).contains("with ESMTPS id"));
}

fn swaks(args: &[&str]) -> String {
    let out = Command::new("swaks")
        .args(args)
        .output()
        .expect("swaks is needed (scripts/test installs it)");
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}");
    text
}

#[test]
fn swaks_with_pipelining_and_with_tls() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = cert_files(dir.path());
    let mut server = Server::start(&["--tls-cert", &cert, "--tls-key", &key]);
    let port = server.smtp.port().to_string();
    let base = [
        "--server",
        "127.0.0.1",
        "--port",
        &port,
        "--from",
        "swaks@origin.test",
        "--helo",
        "swaks.test",
    ];
    let piped = swaks(
        &[
            &base[..],
            &[
                "--to",
                "p@dest.test",
                "--pipeline",
                "--body",
                "pipelined body",
            ],
        ]
        .concat(),
    );
    assert!(
        !piped.contains("<** "),
        "swaks saw an error reply:\n{piped}"
    );
    assert!(piped.contains("queued as"), "{piped}");
    let tls = swaks(
        &[
            &base[..],
            &["--to", "t@dest.test", "-tls", "--body", "tls body"],
        ]
        .concat(),
    );
    assert!(tls.contains("TLS started"), "{tls}");
    assert!(tls.contains("queued as"), "{tls}");
    assert!(server.terminate().success());
    let msgs = spooled(&server.spool);
    assert_eq!(msgs.len(), 2);
    assert!(msgs.iter().any(|m| m.2 == vec!["p@dest.test".to_owned()]
        && String::from_utf8_lossy(&m.3).contains("pipelined body")));
    assert!(msgs.iter().any(|m| m.2 == vec!["t@dest.test".to_owned()]
        && String::from_utf8_lossy(&m.3).contains("with ESMTPS")));
}
