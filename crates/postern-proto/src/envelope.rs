//! The envelope of the transaction in progress, kept in one reusable buffer so that a steady
//! stream of transactions allocates nothing once the buffers have grown.

use std::hash::{BuildHasher, RandomState};
use std::ops::Range;

use crate::address::{ForwardPath, ReversePath};
use crate::params::{BodyType, MailParams, Notify, RcptParams, Ret};

#[derive(Clone, Debug, Default)]
struct RcptEntry {
    path: Range<usize>,
    notify: Option<Notify>,
    orcpt: Option<Range<usize>>,
}

/// One accepted recipient.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Recipient<'a> {
    /// The mailbox as written, without angle brackets (`Postmaster` for `<Postmaster>`).
    pub path: &'a str,
    /// NOTIFY=.
    pub notify: Option<Notify>,
    /// ORCPT=, as written.
    pub orcpt: Option<&'a str>,
}

/// Reverse path, parameters and recipients of one transaction, plus the client's HELO name.
#[derive(Clone, Debug, Default)]
pub struct Envelope {
    helo: String,
    esmtp: bool,
    buf: String,
    reverse: Option<Range<usize>>,
    size: Option<u64>,
    body: BodyType,
    smtputf8: bool,
    ret: Option<Ret>,
    envid: Option<Range<usize>>,
    auth: Option<Range<usize>>,
    rcpts: Vec<RcptEntry>,
    /// The recipients' mailbox keys ([`crate::address::mailbox_key`]) as hashes, sorted,
    /// each with its recipient's place in `rcpts`: made at the first look-up among more
    /// than a few and kept up to date until a recipient is removed. Past the recipient limit
    /// a client may send a thousand RCPTs, each looked up among a thousand recipients,
    /// whose domains would each be brought to canonical form again; hashes rather than the
    /// keys themselves, so that the index costs 16 octets a recipient, not a second copy of
    /// every mailbox (a hash found is checked against the recipient's own key).
    keys: Option<(RandomState, Vec<(u64, u32)>)>,
}

impl Envelope {
    /// The name the client gave in HELO or EHLO.
    pub fn helo(&self) -> &str {
        &self.helo
    }
    /// Whether the client greeted with EHLO (ESMTP) rather than HELO.
    pub fn is_esmtp(&self) -> bool {
        self.esmtp
    }
    /// The reverse path without angle brackets; empty for the null path `<>`.
    pub fn reverse_path(&self) -> &str {
        self.reverse.clone().map_or("", |r| &self.buf[r])
    }
    /// SIZE= as declared.
    pub fn declared_size(&self) -> Option<u64> {
        self.size
    }
    /// BODY= (7BIT when absent).
    pub fn body_type(&self) -> BodyType {
        self.body
    }
    /// Whether SMTPUTF8 was given on MAIL.
    pub fn smtputf8(&self) -> bool {
        self.smtputf8
    }
    /// RET=.
    pub fn ret(&self) -> Option<Ret> {
        self.ret
    }
    /// ENVID= as written.
    pub fn envid(&self) -> Option<&str> {
        self.envid.clone().map(|r| &self.buf[r])
    }
    /// AUTH= as written.
    pub fn auth(&self) -> Option<&str> {
        self.auth.clone().map(|r| &self.buf[r])
    }
    /// Number of accepted recipients.
    pub fn recipient_count(&self) -> usize {
        self.rcpts.len()
    }
    /// The accepted recipients in order.
    pub fn recipients(&self) -> impl ExactSizeIterator<Item = Recipient<'_>> + '_ {
        self.rcpts.iter().map(|r| Recipient {
            path: &self.buf[r.path.clone()],
            notify: r.notify,
            orcpt: r.orcpt.clone().map(|o| &self.buf[o]),
        })
    }

    pub(crate) fn set_helo(&mut self, name: &str, esmtp: bool) {
        self.helo.clear();
        self.helo.push_str(name);
        self.esmtp = esmtp;
    }

    pub(crate) fn clear_helo(&mut self) {
        self.helo.clear();
        self.esmtp = false;
    }

    pub(crate) fn clear_transaction(&mut self) {
        self.buf.clear();
        self.reverse = None;
        self.size = None;
        self.body = BodyType::SevenBit;
        self.smtputf8 = false;
        self.ret = None;
        self.envid = None;
        self.auth = None;
        self.rcpts.clear();
        self.keys = None;
    }

    fn push(&mut self, s: &str) -> Range<usize> {
        let start = self.buf.len();
        self.buf.push_str(s);
        start..self.buf.len()
    }

    fn push_display(&mut self, d: impl std::fmt::Display) -> Range<usize> {
        use std::fmt::Write;
        let start = self.buf.len();
        let _ = write!(self.buf, "{d}");
        start..self.buf.len()
    }

    pub(crate) fn set_mail(&mut self, path: &ReversePath<'_>, params: &MailParams<'_>) {
        self.clear_transaction();
        self.reverse = match path {
            ReversePath::Null => None,
            ReversePath::Mailbox(m) => Some(self.push_display(m)),
        };
        self.size = params.size;
        self.body = params.body.unwrap_or_default();
        self.smtputf8 = params.smtputf8;
        self.ret = params.ret;
        self.envid = params.envid.map(|e| self.push(e));
        self.auth = params.auth.map(|a| self.push(a));
    }

    /// Whether one more recipient keeps the octets of the envelope within `budget`.
    pub(crate) fn rcpt_fits(
        &self,
        path: &ForwardPath<'_>,
        params: &RcptParams<'_>,
        budget: usize,
    ) -> bool {
        let path = match path {
            ForwardPath::Postmaster => "Postmaster".len(),
            ForwardPath::Mailbox(m) => shown_len(m),
        };
        let orcpt = params.orcpt.map_or(0, str::len);
        self.buf.len() + path + orcpt <= budget
    }

    pub(crate) fn push_rcpt(&mut self, path: &ForwardPath<'_>, params: &RcptParams<'_>) {
        let path = match path {
            ForwardPath::Postmaster => self.push("Postmaster"),
            ForwardPath::Mailbox(m) => self.push_display(m),
        };
        let orcpt = params.orcpt.map(|o| self.push(o));
        // Kept up to date rather than made again: past the limit a repeated recipient with
        // DSN parameters is taken again, and each would have the index made anew.
        if let Some((state, index)) = self.keys.as_mut() {
            let hash = state.hash_one(crate::address::mailbox_key(&self.buf[path.clone()]));
            let at = index.partition_point(|&(h, _)| h < hash);
            let place = u32::try_from(self.rcpts.len()).unwrap_or(u32::MAX);
            index.insert(at, (hash, place));
        }
        self.rcpts.push(RcptEntry {
            path,
            notify: params.notify,
            orcpt,
        });
    }

    /// Whether `path` is the mailbox of a recipient already taken (see
    /// [`crate::address::same_mailbox`]).
    pub(crate) fn has_recipient(&mut self, path: &ForwardPath<'_>) -> bool {
        let shown = match path {
            ForwardPath::Postmaster => "Postmaster".to_owned(),
            ForwardPath::Mailbox(m) => m.to_string(),
        };
        if self.rcpts.len() <= 16 {
            return self
                .rcpts
                .iter()
                .any(|r| crate::address::same_mailbox(&self.buf[r.path.clone()], &shown));
        }
        let (rcpts, buf) = (&self.rcpts, &self.buf);
        let key_of = |place: usize| {
            rcpts
                .get(place)
                .map(|r| crate::address::mailbox_key(&buf[r.path.clone()]))
        };
        let (state, index) = self.keys.get_or_insert_with(|| {
            let state = RandomState::new();
            let mut index: Vec<(u64, u32)> = (0..rcpts.len())
                .filter_map(|place| {
                    let key = key_of(place)?;
                    Some((state.hash_one(key), u32::try_from(place).ok()?))
                })
                .collect();
            index.sort_unstable();
            (state, index)
        });
        let key = crate::address::mailbox_key(&shown);
        let hash = state.hash_one(&key);
        let from = index.partition_point(|&(h, _)| h < hash);
        index[from..]
            .iter()
            .take_while(|&&(h, _)| h == hash)
            .any(|&(_, place)| key_of(place as usize).is_some_and(|k| k == key))
    }

    pub(crate) fn pop_rcpt(&mut self) {
        self.keys = None;
        if let Some(r) = self.rcpts.pop() {
            self.buf.truncate(r.path.start);
        }
    }
}

/// The length of `d` as written, without writing it anywhere.
fn shown_len(d: impl std::fmt::Display) -> usize {
    struct Count(usize);
    impl std::fmt::Write for Count {
        fn write_str(&mut self, s: &str) -> std::fmt::Result {
            self.0 += s.len();
            Ok(())
        }
    }
    let mut n = Count(0);
    let _ = std::fmt::Write::write_fmt(&mut n, format_args!("{d}"));
    n.0
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::address::parse_forward_path;

    fn path(text: &str) -> ForwardPath<'_> {
        parse_forward_path(text).expect("a forward path").0
    }

    #[test]
    fn the_index_of_many_recipients_finds_each_mailbox_and_no_other() {
        let mut envelope = Envelope::default();
        let none = RcptParams::default();
        let taken: Vec<String> = (0..40).map(|i| format!("<u{i}@d{i}.example>")).collect();
        for p in &taken {
            envelope.push_rcpt(&path(p), &none);
        }
        // Past a few recipients the index is made at the first look-up: each mailbox is
        // found, also with its domain written otherwise, and a local part in other case is
        // another mailbox.
        for i in 0..40 {
            assert!(envelope.has_recipient(&path(&format!("<u{i}@D{i}.EXAMPLE>"))));
            assert!(!envelope.has_recipient(&path(&format!("<U{i}@d{i}.example>"))));
            assert!(!envelope.has_recipient(&path(&format!("<u{i}@d{}.example>", i + 1))));
        }
        // Recipients added once it is made are found too, the others still not.
        for i in 40..60 {
            let p = format!("<u{i}@d{i}.example>");
            assert!(!envelope.has_recipient(&path(&p)));
            envelope.push_rcpt(&path(&p), &none);
            assert!(envelope.has_recipient(&path(&p)));
        }
        // One taken away is no longer found (the index is made again).
        envelope.pop_rcpt();
        assert!(!envelope.has_recipient(&path("<u59@d59.example>")));
        assert!(envelope.has_recipient(&path("<u58@d58.example>")));
        assert!(envelope.has_recipient(&path("<u0@d0.example>")));
    }
}
