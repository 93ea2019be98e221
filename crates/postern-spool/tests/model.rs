//! Model-based test: random sequences of writes, aborts, status records, reclaims and
//! restarts, checked against an in-memory model after every step that can be observed.
#![allow(clippy::unwrap_used)]

use proptest::prelude::*;

use postern_spool::{recover, DeliveryState, MessageMeta, Recipient, Spool, SpoolOptions, Status};

#[derive(Clone, Debug)]
enum Op {
    /// A message of this body size; aborted halfway when `abort`.
    Write {
        size: usize,
        abort: bool,
    },
    /// An outcome for recipient `rcpt` (0 or 1) of the `msg`-th message written.
    Status {
        msg: usize,
        rcpt: u32,
        outcome: u8,
    },
    /// Tell the spool a message is final when the model says so.
    Reclaim {
        msg: usize,
    },
    Restart,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0usize..30_000, proptest::bool::weighted(0.15)).prop_map(|(size, abort)| Op::Write { size, abort }),
        4 => (0usize..64, 0u32..2, 0u8..3).prop_map(|(msg, rcpt, outcome)| Op::Status { msg, rcpt, outcome }),
        2 => (0usize..64).prop_map(|msg| Op::Reclaim { msg }),
        1 => Just(Op::Restart),
    ]
}

#[derive(Debug)]
struct Model {
    id: String,
    body: Vec<u8>,
    statuses: Vec<Option<Status>>,
    reclaimed: bool,
}

fn meta(i: usize) -> MessageMeta {
    MessageMeta {
        arrival: i as u64,
        reverse_path: format!("s{i}@x.test"),
        recipients: vec![
            Recipient {
                path: "a@y.test".into(),
                notify: None,
                orcpt: None,
            },
            Recipient {
                path: "b@y.test".into(),
                notify: Some(2),
                orcpt: None,
            },
        ],
        ..MessageMeta::default()
    }
}

fn outcome(o: u8, step: usize) -> Status {
    let state = match o {
        0 => DeliveryState::Delivered,
        1 => DeliveryState::Deferred {
            next_attempt: step as u64,
        },
        _ => DeliveryState::Failed,
    };
    Status {
        state,
        reply: format!("reply {step}"),
    }
}

fn check(dir: &std::path::Path, model: &[Model]) {
    let r = recover(dir).unwrap();
    assert_eq!(r.corrupt_records, 0);
    for m in model.iter().filter(|m| !m.reclaimed) {
        let found = r
            .messages
            .iter()
            .find(|x| x.queue_id == m.id)
            .unwrap_or_else(|| panic!("{} lost", m.id));
        assert_eq!(r.body_vec(found), m.body, "{} body", m.id);
        assert_eq!(found.statuses, m.statuses, "{} statuses", m.id);
    }
    for x in &r.messages {
        let m = model
            .iter()
            .find(|m| m.id == x.queue_id)
            .unwrap_or_else(|| panic!("{} was never finished", x.queue_id));
        // A reclaimed message may linger until its segment goes, but only as final.
        assert!(!m.reclaimed || x.is_final());
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn spool_matches_the_model(ops in proptest::collection::vec(op(), 1..60)) {
        let dir = tempfile::tempdir().unwrap();
        let opts = SpoolOptions { segment_size: 64 * 1024 };
        let mut spool = Spool::open(dir.path(), 0, opts).unwrap();
        let mut model: Vec<Model> = Vec::new();
        for (step, op) in ops.into_iter().enumerate() {
            match op {
                Op::Write { size, abort } => {
                    let body: Vec<u8> = (0..size).map(|k| (k * 7 + step) as u8).collect();
                    let mut d = spool.begin(&meta(step)).unwrap();
                    let half = if abort { size / 2 } else { size };
                    for piece in body[..half].chunks(4096) {
                        spool.append(&mut d, piece).unwrap();
                    }
                    if abort {
                        spool.abort(d);
                    } else {
                        let id = d.queue_id().to_owned();
                        spool.finish(d).unwrap();
                        model.push(Model { id, body, statuses: vec![None, None], reclaimed: false });
                    }
                }
                Op::Status { msg, rcpt, outcome: o } => {
                    let Some(m) = model.get_mut(msg) else { continue };
                    if m.reclaimed {
                        continue;
                    }
                    let status = outcome(o, step);
                    spool.append_status(&m.id, rcpt, &status).unwrap();
                    let slot = &mut m.statuses[rcpt as usize];
                    if !slot.as_ref().is_some_and(Status::is_final) {
                        *slot = Some(status);
                    }
                }
                Op::Reclaim { msg } => {
                    let Some(m) = model.get_mut(msg) else { continue };
                    if m.reclaimed || !m.statuses.iter().all(|s| s.as_ref().is_some_and(Status::is_final)) {
                        continue;
                    }
                    spool.sync_now().unwrap();
                    spool.mark_final(&m.id).unwrap();
                    m.reclaimed = true;
                }
                Op::Restart => {
                    spool.sync_now().unwrap();
                    drop(spool);
                    spool = Spool::open(dir.path(), 0, opts).unwrap();
                    let expected_live = model.iter().filter(|m| !m.reclaimed && !m.statuses.iter().all(|s| s.as_ref().is_some_and(Status::is_final))).count();
                    prop_assert_eq!(spool.live_messages(), expected_live);
                }
            }
            spool.sync_now().unwrap();
            check(dir.path(), &model);
        }
        // Once everything is final and reclaimed, only the segment in use may remain.
        for m in model.iter_mut().filter(|m| !m.reclaimed) {
            for rcpt in 0..2 {
                spool.append_status(&m.id, rcpt, &outcome(0, 0)).unwrap();
            }
        }
        spool.sync_now().unwrap();
        let ids: Vec<String> = model.iter().filter(|m| !m.reclaimed).map(|m| m.id.clone()).collect();
        for id in ids {
            spool.mark_final(&id).unwrap();
        }
        prop_assert!(spool.segment_count() <= 1, "{} segments left", spool.segment_count());
        let files = std::fs::read_dir(dir.path().join("0")).unwrap().count();
        prop_assert_eq!(files, spool.segment_count());
    }
}
