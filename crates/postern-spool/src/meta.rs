//! What the spool keeps about a message besides its body: the envelope and the trace facts.

use crate::format::{Cursor, Fields};

/// One recipient with its DSN parameters (RFC 3461).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Recipient {
    /// The mailbox, without angle brackets.
    pub path: String,
    /// NOTIFY bits (1 SUCCESS, 2 FAILURE, 4 DELAY; 0 NEVER), None when not given.
    pub notify: Option<u8>,
    /// ORCPT as written.
    pub orcpt: Option<String>,
}

/// The envelope and trace facts of a message.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MessageMeta {
    /// Arrival, seconds since the Unix epoch.
    pub arrival: u64,
    /// The client's address.
    pub client: String,
    /// The client's HELO/EHLO name.
    pub helo: String,
    /// The reverse path without angle brackets, empty for `<>`.
    pub reverse_path: String,
    /// The recipients.
    pub recipients: Vec<Recipient>,
    /// ENVID.
    pub envid: Option<String>,
    /// RET: 1 FULL, 2 HDRS.
    pub ret: Option<u8>,
    /// BODY: 0 7BIT, 1 8BITMIME, 2 BINARYMIME.
    pub body_type: u8,
    /// SMTPUTF8 was given.
    pub smtputf8: bool,
}

/// What a `START` record holds beyond the recipients' paths and ORCPTs, at its longest: the
/// message number and queue ID, the arrival time, the client address, the HELO name (a
/// command line), the reverse path, the ENVID and the flags, each with its length, and room
/// for the postmaster addresses a server may put in place of `<Postmaster>`.
const START_FIXED_MAX: usize = 2048;

/// What each recipient adds to a `START` record besides its path and ORCPT: their lengths, its
/// NOTIFY and whether it has an ORCPT.
pub const START_PER_RECIPIENT: usize = 4 + 8 + 8 + 4;

/// The most octets a message's recipients may take in its `START` record (their paths and
/// ORCPT values, and [`START_PER_RECIPIENT`] each) so that the record fits a segment of
/// `segment_size` whatever else it holds. A server caps its envelopes at this (a larger one
/// could never be stored, and would be refused as if the disk were full).
pub fn envelope_room(segment_size: u64) -> usize {
    let payload = usize::try_from(segment_size)
        .unwrap_or(usize::MAX)
        .saturating_sub(crate::format::HEADER + crate::format::RECORD_HEADER + 8);
    payload.saturating_sub(START_FIXED_MAX)
}

fn opt_str(f: &mut Fields, s: &Option<String>) {
    f.u64(u64::from(s.is_some()));
    f.bytes(s.as_deref().unwrap_or("").as_bytes());
}

fn read_opt_str(c: &mut Cursor<'_>) -> Option<Option<String>> {
    let present = c.u64()? != 0;
    let s = String::from_utf8(c.bytes()?.to_vec()).ok()?;
    Some(present.then_some(s))
}

fn read_str(c: &mut Cursor<'_>) -> Option<String> {
    String::from_utf8(c.bytes()?.to_vec()).ok()
}

impl MessageMeta {
    pub(crate) fn encode(&self, f: &mut Fields) {
        f.u64(self.arrival)
            .bytes(self.client.as_bytes())
            .bytes(self.helo.as_bytes())
            .bytes(self.reverse_path.as_bytes());
        opt_str(f, &self.envid);
        f.u64(self.ret.map_or(0, u64::from))
            .u64(u64::from(self.body_type))
            .u64(u64::from(self.smtputf8))
            .u64(self.recipients.len() as u64);
        for r in &self.recipients {
            f.bytes(r.path.as_bytes())
                .u64(r.notify.map_or(0xff, u64::from));
            opt_str(f, &r.orcpt);
        }
    }

    pub(crate) fn decode(c: &mut Cursor<'_>) -> Option<MessageMeta> {
        let arrival = c.u64()?;
        let client = read_str(c)?;
        let helo = read_str(c)?;
        let reverse_path = read_str(c)?;
        let envid = read_opt_str(c)?;
        let ret = match c.u64()? {
            0 => None,
            r => Some(u8::try_from(r).ok()?),
        };
        let body_type = u8::try_from(c.u64()?).ok()?;
        let smtputf8 = c.u64()? != 0;
        let n = c.u64()?;
        let mut recipients = Vec::with_capacity(n.min(1024) as usize);
        for _ in 0..n {
            let path = read_str(c)?;
            let notify = match c.u64()? {
                0xff => None,
                v => Some(u8::try_from(v).ok()?),
            };
            let orcpt = read_opt_str(c)?;
            recipients.push(Recipient {
                path,
                notify,
                orcpt,
            });
        }
        Some(MessageMeta {
            arrival,
            client,
            helo,
            reverse_path,
            recipients,
            envid,
            ret,
            body_type,
            smtputf8,
        })
    }
}

/// What happened to one recipient's delivery.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DeliveryState {
    /// Accepted by the next hop (2xx): final.
    Delivered,
    /// Failed for now (4xx, no connection): try again at `next_attempt` (Unix seconds).
    Deferred {
        /// When to try again.
        next_attempt: u64,
        /// The sender was sent a delay warning naming this recipient (`--delay-warning`),
        /// durable before this record was written: a restart does not warn again.
        warned: bool,
    },
    /// Refused for good (5xx) or expired: final.
    Failed,
}

/// The reply recorded for each recipient of a message the operator deleted
/// (`postern queue --delete`).
pub const DELETED_BY_OPERATOR: &str = "deleted by the operator";

/// A recipient's outcome with the next hop's reply, as a status record holds it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Status {
    /// The outcome.
    pub state: DeliveryState,
    /// The next hop's reply (or a local explanation).
    pub reply: String,
}

impl Status {
    /// Whether nothing more will happen to this recipient.
    pub fn is_final(&self) -> bool {
        !matches!(self.state, DeliveryState::Deferred { .. })
    }

    pub(crate) fn encode(&self, queue_id: &str, rcpt: u32, f: &mut Fields) {
        let (state, next) = match self.state {
            DeliveryState::Delivered => (1, 0),
            DeliveryState::Deferred {
                next_attempt,
                warned: false,
            } => (2, next_attempt),
            DeliveryState::Deferred {
                next_attempt,
                warned: true,
            } => (4, next_attempt),
            DeliveryState::Failed => (3, 0),
        };
        f.u64(u64::from(rcpt))
            .bytes(queue_id.as_bytes())
            .u64(state)
            .u64(next)
            .bytes(self.reply.as_bytes());
    }

    /// Decodes (recipient index, queue ID, status) from a status record whose leading
    /// recipient index was already read as `rcpt`.
    pub(crate) fn decode(rcpt: u64, c: &mut Cursor<'_>) -> Option<(u32, String, Status)> {
        let queue_id = read_str(c)?;
        let state = match (c.u64()?, c.u64()?) {
            (1, _) => DeliveryState::Delivered,
            (2, next_attempt) => DeliveryState::Deferred {
                next_attempt,
                warned: false,
            },
            (4, next_attempt) => DeliveryState::Deferred {
                next_attempt,
                warned: true,
            },
            (3, _) => DeliveryState::Failed,
            _ => return None,
        };
        let reply = read_str(c)?;
        Some((u32::try_from(rcpt).ok()?, queue_id, Status { state, reply }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An envelope of `envelope_room` octets of paths and ORCPTs, every other field at its
    /// longest, makes a START record that fits a segment.
    #[test]
    fn an_envelope_within_its_room_fits_a_segment() {
        for (segment, n) in [(64 * 1024, 1000), (64 * 1024, 100), (1 << 20, 1000)] {
            let room = envelope_room(segment) - n * START_PER_RECIPIENT;
            let each = room / n;
            let recipient = |i: usize| Recipient {
                path: "p".repeat(each / 2 + usize::from(i < room % n)),
                notify: Some(0xf),
                orcpt: Some("o".repeat(each - each / 2)),
            };
            let meta = MessageMeta {
                arrival: u64::MAX,
                client: "f".repeat(45),
                helo: "h".repeat(505),
                reverse_path: "r".repeat(256),
                recipients: (0..n).map(recipient).collect(),
                envid: Some("e".repeat(100)),
                ret: Some(2),
                body_type: 2,
                smtputf8: true,
            };
            let mut f = Fields(Vec::new());
            f.u64(u64::MAX).bytes(&[b'Q'; 17]);
            meta.encode(&mut f);
            let payload =
                segment as usize - crate::format::HEADER - crate::format::RECORD_HEADER - 8;
            assert!(
                f.0.len() <= payload,
                "{segment} {n}: {} > {payload}",
                f.0.len()
            );
            assert!(room > 0);
        }
    }
}
