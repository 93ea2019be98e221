//! Helpers shared by the spool's integration tests.
#![allow(dead_code, unreachable_pub)]

use postern_spool::{MessageMeta, Recipient};

/// An envelope with two recipients, told apart by `i`.
pub fn meta(i: usize) -> MessageMeta {
    MessageMeta {
        arrival: 1_795_346_220 + i as u64,
        client: "192.0.2.1".into(),
        helo: "client.test".into(),
        reverse_path: format!("sender{i}@origin.test"),
        recipients: vec![
            Recipient {
                path: "a@dest.test".into(),
                notify: Some(2),
                orcpt: Some("rfc822;a@dest.test".into()),
            },
            Recipient {
                path: "b@dest.test".into(),
                notify: None,
                orcpt: None,
            },
        ],
        envid: Some("ENV1".into()),
        ret: Some(2),
        body_type: 1,
        smtputf8: false,
    }
}

/// A body of `len` bytes that differs with `i`.
pub fn body(i: usize, len: usize) -> Vec<u8> {
    (0..len).map(|k| (k * 31 + i * 7) as u8).collect()
}

/// FNV-1a, to compare bodies by a short fingerprint.
pub fn fnv(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    })
}
