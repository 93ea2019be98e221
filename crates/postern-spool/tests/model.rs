//! Model-based test: random sequences of writes (whole, aborted, or long ones kept open across
//! other operations), status records written on either of two cores, reclaims, copies of
//! live messages forward (made durable or not) and restarts, checked against an in-memory
//! model after every step.
#![allow(clippy::unwrap_used)]

use proptest::prelude::*;
use proptest::sample::Index;

use postern_spool::{
    recover, DeliveryState, Draft, MessageMeta, MessageRef, PendingBody, Recipient, Spool,
    SpoolOptions, Status,
};

const CORES: usize = 2;

#[derive(Clone, Debug)]
enum Op {
    /// A whole message on `core`; aborted halfway when `abort`.
    Write {
        core: usize,
        size: usize,
        abort: bool,
    },
    /// Starts a message on `core` that stays open across later operations.
    Begin {
        core: usize,
    },
    /// More body for `core`'s open message.
    Grow {
        core: usize,
        size: usize,
    },
    /// Finishes (or aborts) `core`'s open message.
    End {
        core: usize,
        abort: bool,
    },
    /// An outcome for recipient `rcpt` of a message, written on core `on`.
    Status {
        msg: Index,
        rcpt: u32,
        outcome: u8,
        on: usize,
    },
    /// Tell the owner a final message is final.
    Reclaim {
        msg: Index,
    },
    /// Copies a live message forward (the one at `msg`, or those the spool of `core` asks
    /// for); its sync fails unless `durable`.
    Copy {
        msg: Option<Index>,
        core: usize,
        durable: bool,
    },
    Restart,
}

fn op() -> impl Strategy<Value = Op> {
    let core = 0..CORES;
    prop_oneof![
        4 => (core.clone(), 0usize..30_000, proptest::bool::weighted(0.15))
            .prop_map(|(core, size, abort)| Op::Write { core, size, abort }),
        1 => core.clone().prop_map(|core| Op::Begin { core }),
        2 => (core.clone(), 1usize..40_000).prop_map(|(core, size)| Op::Grow { core, size }),
        1 => (core.clone(), proptest::bool::weighted(0.3))
            .prop_map(|(core, abort)| Op::End { core, abort }),
        4 => (any::<Index>(), 0u32..2, 0u8..3, core.clone())
            .prop_map(|(msg, rcpt, outcome, on)| Op::Status { msg, rcpt, outcome, on }),
        2 => any::<Index>().prop_map(|msg| Op::Reclaim { msg }),
        2 => (proptest::option::of(any::<Index>()), core, proptest::bool::weighted(0.8))
            .prop_map(|(msg, core, durable)| Op::Copy { msg, core, durable }),
        1 => Just(Op::Restart),
    ]
}

#[derive(Debug)]
struct Model {
    id: String,
    core: usize,
    body: Vec<u8>,
    /// The body handle, once the sync after the step that finished it made it readable.
    handle: Option<MessageRef>,
    pending: Option<PendingBody>,
    statuses: Vec<Option<Status>>,
    reclaimed: bool,
    /// The step that wrote it (its envelope is `meta(step)`).
    step: usize,
}

impl Model {
    fn is_final(&self) -> bool {
        self.statuses
            .iter()
            .all(|s| s.as_ref().is_some_and(Status::is_final))
    }
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
            warned: step % 2 == 0,
        },
        _ => DeliveryState::Failed,
    };
    Status {
        state,
        reply: format!("reply {step}"),
    }
}

fn check(dir: &std::path::Path, model: &[Model], open: &[Option<(Draft, Vec<u8>, usize)>]) {
    let r = recover(dir).unwrap();
    assert_eq!(r.corrupt_records, 0);
    for m in model.iter().filter(|m| !m.reclaimed) {
        let found = r
            .messages
            .iter()
            .find(|x| x.queue_id == m.id)
            .unwrap_or_else(|| panic!("{} lost", m.id));
        assert_eq!(found.body().to_vec(), m.body, "{} body", m.id);
        assert_eq!(found.statuses, m.statuses, "{} statuses", m.id);
        assert_eq!(found.core as usize, m.core);
        assert_eq!(found.meta, meta(m.step), "{} envelope", m.id);
    }
    // Handles taken at finish read the same bytes, across restarts and reclaims.
    for m in model {
        let handle = m.handle.as_ref().expect("readable after the sync");
        assert_eq!(handle.to_vec(), m.body, "{} handle", m.id);
    }
    for x in &r.messages {
        assert!(
            !open
                .iter()
                .flatten()
                .any(|(d, _, _)| d.queue_id() == x.queue_id),
            "an open draft reported whole"
        );
        let m = model
            .iter()
            .find(|m| m.id == x.queue_id)
            .unwrap_or_else(|| panic!("{} was never finished", x.queue_id));
        // A reclaimed message may linger until its segment goes, but only as final.
        assert!(!m.reclaimed || x.is_final());
    }
}

fn write_body(spool: &mut Spool, d: &mut Draft, body: &[u8]) {
    for piece in body.chunks(4096) {
        spool.append(d, piece).unwrap();
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    #[test]
    fn spool_matches_the_model(ops in proptest::collection::vec(op(), 1..60)) {
        let dir = tempfile::tempdir().unwrap();
        let opts = SpoolOptions { segment_size: 64 * 1024 };
        let open_all = || -> Vec<Spool> {
            (0..CORES).map(|c| Spool::open(dir.path(), c as u32, opts).unwrap()).collect()
        };
        let mut spools = open_all();
        let mut model: Vec<Model> = Vec::new();
        let mut open: Vec<Option<(Draft, Vec<u8>, usize)>> = (0..CORES).map(|_| None).collect();
        for (step, op) in ops.into_iter().enumerate() {
            match op {
                Op::Write { core, size, abort } => {
                    let spool = &mut spools[core];
                    let body: Vec<u8> = (0..size).map(|k| (k * 7 + step) as u8).collect();
                    let mut d = spool.begin(&meta(step)).unwrap();
                    let half = if abort { size / 2 } else { size };
                    write_body(spool, &mut d, &body[..half]);
                    if abort {
                        spool.abort(d);
                    } else {
                        let id = d.queue_id().to_owned();
                        let (_, handle) = spool.finish_with_body(d).unwrap();
                        model.push(Model { id, core, body, handle: None, pending: Some(handle), statuses: vec![None, None], reclaimed: false, step });
                    }
                }
                Op::Begin { core } => {
                    if open[core].is_none() {
                        let d = spools[core].begin(&meta(step)).unwrap();
                        open[core] = Some((d, Vec::new(), step));
                    }
                }
                Op::Grow { core, size } => {
                    if let Some((d, body, _)) = open[core].as_mut() {
                        let more: Vec<u8> = (0..size).map(|k| (k * 3 + step) as u8).collect();
                        write_body(&mut spools[core], d, &more);
                        body.extend_from_slice(&more);
                    }
                }
                Op::End { core, abort } => {
                    if let Some((d, body, begun)) = open[core].take() {
                        if abort {
                            spools[core].abort(d);
                        } else {
                            let id = d.queue_id().to_owned();
                            let (_, handle) = spools[core].finish_with_body(d).unwrap();
                            model.push(Model { id, core, body, handle: None, pending: Some(handle), statuses: vec![None, None], reclaimed: false, step: begun });
                        }
                    }
                }
                Op::Status { msg, rcpt, outcome: o, on } => {
                    if model.is_empty() {
                        continue;
                    }
                    let n = model.len();
                    let m = &mut model[msg.index(n)];
                    if m.reclaimed {
                        continue;
                    }
                    let status = outcome(o, step);
                    spools[on].append_status(&m.id, rcpt, &status).unwrap();
                    if on != m.core {
                        // The owner's copy, which reclaim relies on (docs/durability.md).
                        spools[m.core].append_status(&m.id, rcpt, &status).unwrap();
                    }
                    let slot = &mut m.statuses[rcpt as usize];
                    if !slot.as_ref().is_some_and(Status::is_final) {
                        *slot = Some(status);
                    }
                }
                Op::Reclaim { msg } => {
                    // Among the messages that can be reclaimed.
                    let mut candidates: Vec<&mut Model> =
                        model.iter_mut().filter(|m| !m.reclaimed && m.is_final()).collect();
                    if candidates.is_empty() {
                        continue;
                    }
                    let n = candidates.len();
                    let m = &mut candidates[msg.index(n)];
                    if m.reclaimed || !m.is_final() {
                        continue;
                    }
                    spools[m.core].sync_now().unwrap();
                    spools[m.core].mark_final(&m.id).unwrap();
                    m.reclaimed = true;
                }
                Op::Copy { msg, core, durable } => {
                    let ids: Vec<String> = match msg {
                        Some(i) if !model.is_empty() => {
                            let n = model.len();
                            vec![model[i.index(n)].id.clone()]
                        }
                        _ => spools[core].next_to_copy(3),
                    };
                    for id in ids {
                        let Some(m) = model.iter_mut().find(|m| m.id == id) else {
                            panic!("{id} asked for and never finished");
                        };
                        if m.reclaimed || m.is_final() {
                            continue;
                        }
                        let handle = m.handle.clone().expect("readable after the sync");
                        let spool = &mut spools[m.core];
                        let copied = spool.copy_forward(&m.id, &meta(m.step), &handle).unwrap();
                        let (ticket, pending) = copied.expect("a live message is copied");
                        if durable {
                            spool.sync_now().unwrap();
                            prop_assert!(spool.is_durable(ticket));
                            m.handle = Some(spool.body(pending).unwrap());
                        }
                        spool.copy_over(&m.id, durable).unwrap();
                    }
                }
                Op::Restart => {
                    // Open drafts die with the process that wrote them.
                    for (c, slot) in open.iter_mut().enumerate() {
                        if let Some((d, _, _)) = slot.take() {
                            spools[c].abort(d);
                        }
                    }
                    for s in &mut spools {
                        s.sync_now().unwrap();
                    }
                    for m in &mut model {
                        if let Some(p) = m.pending.take() {
                            m.handle = Some(spools[m.core].body(p).unwrap());
                        }
                    }
                    drop(spools);
                    spools = open_all();
                    // An opening deletes what holds only final messages.
                    for m in model.iter_mut().filter(|m| m.is_final()) {
                        m.reclaimed = true;
                    }
                    for (c, s) in spools.iter().enumerate() {
                        let expected_live = model
                            .iter()
                            .filter(|m| m.core == c && !m.reclaimed && !m.is_final())
                            .count();
                        prop_assert_eq!(s.live_messages(), expected_live);
                    }
                }
            }
            for s in &mut spools {
                s.sync_now().unwrap();
            }
            for m in &mut model {
                if let Some(p) = m.pending.take() {
                    m.handle = Some(spools[m.core].body(p).unwrap());
                }
            }
            check(dir.path(), &model, &open);
        }
        // Once everything is final and reclaimed, only the segment in use may remain.
        for (c, slot) in open.iter_mut().enumerate() {
            if let Some((d, _, _)) = slot.take() {
                spools[c].abort(d);
            }
        }
        for m in model.iter_mut().filter(|m| !m.reclaimed) {
            for rcpt in 0..2 {
                spools[m.core].append_status(&m.id, rcpt, &outcome(0, 0)).unwrap();
            }
        }
        for s in &mut spools {
            s.sync_now().unwrap();
        }
        for m in model.iter().filter(|m| !m.reclaimed) {
            spools[m.core].mark_final(&m.id).unwrap();
        }
        for s in &mut spools {
            s.reclaim().unwrap();
        }
        for (c, s) in spools.iter().enumerate() {
            prop_assert!(s.segment_count() <= 1, "core {}: {} segments left", c, s.segment_count());
            let files = std::fs::read_dir(dir.path().join(c.to_string())).unwrap().count();
            prop_assert_eq!(files, s.segment_count());
        }
    }
}
