//! Helpers shared by the spool's integration tests.
#![allow(dead_code, unreachable_pub)]

use postern_spool::{DeliveryState, MessageMeta, Recipient, Spool, Status};

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

/// Message `i`, a body of `len` octets, passes through `spool`: written, made durable,
/// delivered to both recipients (`reply`) and made final, which reclaims what it can.
pub fn pass_through(spool: &mut Spool, i: usize, len: usize, reply: &str) {
    let delivered = Status {
        state: DeliveryState::Delivered,
        reply: reply.into(),
    };
    let mut d = spool.begin(&meta(i)).unwrap();
    spool.append(&mut d, &body(i, len)).unwrap();
    let id = d.queue_id().to_owned();
    spool.finish(d).unwrap();
    spool.append_status(&id, 0, &delivered).unwrap();
    spool.append_status(&id, 1, &delivered).unwrap();
    spool.sync_now().unwrap();
    spool.mark_final(&id).unwrap();
}
