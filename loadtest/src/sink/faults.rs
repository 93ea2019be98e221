//! Fault injection for relay tests: end-of-data replies from a weighted mix of codes, a delay
//! before each of them, and connections dropped without a reply at their N-th message.

use std::time::Duration;

use postern_proto::{EnhancedCode, StaticReply};

use crate::mix::Mix;

/// What to do at an end of data.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Answer 250 (or another 2xx) with a queue ID.
    Accept(u16),
    /// Answer with this refusal.
    Refuse(StaticReply),
    /// Close the connection without a reply.
    Drop,
}

/// The faults a sink injects.
#[derive(Clone, Debug, Default)]
pub struct Faults {
    /// End-of-data codes.
    pub mix: Option<Mix<u16>>,
    /// Wait before answering an end of data.
    pub delay: Option<Duration>,
    /// Close at the N-th end of data of a connection.
    pub drop_after: Option<u64>,
}

impl Faults {
    /// The verdict on message `n` of this executor, the `on_connection`-th (from 1) of its
    /// connection.
    pub fn verdict(&self, n: u64, on_connection: u64) -> Verdict {
        if self.drop_after.is_some_and(|d| on_connection >= d) {
            return Verdict::Drop;
        }
        let code = self.mix.as_ref().map_or(250, |m| *m.pick(n));
        if code < 300 {
            return Verdict::Accept(code);
        }
        Verdict::Refuse(refusal(code))
    }
}

/// The reply for an injected failure with `code`.
pub fn refusal(code: u16) -> StaticReply {
    let class = (code / 100) as u8;
    let text = if class == 4 {
        "Injected temporary failure (postern-load sink --reply-mix)"
    } else {
        "Injected permanent failure (postern-load sink --reply-mix)"
    };
    StaticReply::new(code, EnhancedCode::new(class, 0, 0), text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mix_and_drop() {
        let f = Faults {
            mix: Some(Mix::new(vec![(250, 2), (451, 1), (550, 1)])),
            delay: None,
            drop_after: Some(3),
        };
        let verdicts: Vec<Verdict> = (0..4).map(|n| f.verdict(n, 1)).collect();
        assert_eq!(
            verdicts
                .iter()
                .filter(|v| matches!(v, Verdict::Accept(250)))
                .count(),
            2
        );
        assert!(verdicts.contains(&Verdict::Refuse(refusal(451))));
        assert!(verdicts.contains(&Verdict::Refuse(refusal(550))));
        assert_eq!(f.verdict(0, 3), Verdict::Drop);
        assert_eq!(refusal(451).enhanced.to_string(), "4.0.0");
    }
}
