//! A transaction's replies made into each recipient's outcome (delivered, deferred with a
//! retry time, failed for good) and sent back to the core that owns the message.

use super::*;

impl CoreRelay {
    /// Records the outcome of `job`'s transaction on `conn`, and says what becomes of the
    /// connection.
    /// `partial`: with a broken connection (`Err(Err(_))`), the replies this job's transaction
    /// got before the break.
    pub(super) fn conclude(
        &self,
        conn: &Outbound,
        dq: &DestQueue,
        job: Job,
        outcome: Result<TransactionResult, Result<Reply, ConnError>>,
        partial: Option<TransactionResult>,
        carry: &mut Vec<Carried>,
    ) -> After {
        let remote_name = conn.remote.as_str();
        let remote = Some(relay_label(remote_name, conn.addr));
        match outcome {
            Ok(result) => {
                dq.broken_in_a_row.set(0);
                dq.unopened_in_a_row.set(0);
                dq.answered.set(dq.answered.get().wrapping_add(1));
                dq.note_outcome(false);
                conn.answered_mark
                    .set(conn.answered_mark.get().wrapping_add(1));
                let mut deferred = Vec::new();
                let mut deferred_texts = Vec::new();
                let mut last_deferral = String::new();
                // Recipients the next hop would not take in this transaction only ("too many
                // recipients") while it took others: they go again at once, in the next
                // transaction (RFC 5321 4.5.3.1.10), not after a retry delay.
                let mut overflow = Vec::new();
                let took_some = result.mail.is_positive()
                    && result.data.as_ref().is_some_and(Reply::is_positive)
                    && result.rcpts.iter().any(Reply::is_positive);
                let mut out = Vec::with_capacity(job.rcpts.len());
                for (k, &rcpt) in job.rcpts.iter().enumerate() {
                    let reply = result.outcome(k);
                    let text = reply_line(reply);
                    // RFC 5321 4.5.3.1.10: a 552 to RCPT is "too many recipients" from an
                    // older server, and is temporary (as Postfix takes it).
                    let rcpt_552 = result.mail.is_positive()
                        && result.rcpts.get(k).is_some_and(|r| r.code == 552);
                    if reply.is_positive() {
                        let relayed = !job.hop_dsn;
                        self.report(
                            &mut out,
                            &job.msg,
                            rcpt,
                            Result_::Delivered { relayed },
                            text,
                            remote.clone(),
                        );
                    } else if reply.is_permanent() && !rcpt_552 {
                        let status = dsn::status_of(&text);
                        self.report(
                            &mut out,
                            &job.msg,
                            rcpt,
                            Result_::Failed { status },
                            text,
                            remote.clone(),
                        );
                    } else if took_some
                        && postern_proto::client::too_many_recipients(&result.rcpts, k)
                    {
                        overflow.push(rcpt);
                    } else {
                        deferred.push(rcpt);
                        deferred_texts.push(text.clone());
                        last_deferral = text;
                    }
                }
                self.send_reports(&job.msg, out);
                if !overflow.is_empty() {
                    self.schedule(Job {
                        msg: job.msg.clone(),
                        rcpts: overflow,
                        dest: job.dest.clone(),
                        failures: job.failures,
                        not_before: 0,
                        hop_dsn: false,
                        tried: Vec::new(),
                        flushes: job.flushes,
                    });
                }
                if !deferred.is_empty() {
                    let whole = deferred.len() == job.rcpts.len();
                    let again = Job {
                        rcpts: deferred,
                        ..job
                    };
                    let status = dsn::status_of(&last_deferral);
                    if !whole {
                        self.settle_each(
                            again,
                            false,
                            &status,
                            &last_deferral,
                            &deferred_texts,
                            remote,
                        );
                        return After::Keep;
                    }
                    // The whole transaction was put off: another address of the next hop may
                    // take it now. A 4xx to MAIL or to the data (the host's trouble) also
                    // passes the address over for other jobs a while; a 4xx to every RCPT
                    // (greylisting, full mailboxes) only for this job.
                    let host_trouble =
                        !result.mail.is_positive() || result.rcpts.iter().any(Reply::is_positive);
                    let c = Carried {
                        job: again,
                        status,
                        text: last_deferral,
                        texts: deferred_texts,
                        remote,
                    };
                    match self.pass_over(dq, conn.addr, host_trouble, c, carry) {
                        Some(c) => self.settle_carried(c),
                        None => return After::Elsewhere,
                    }
                }
                After::Keep
            }
            Err(Ok(local)) => {
                // Decided here, before anything was sent: postern's words, not a reply.
                let text = local.lines.join(" ");
                let status = local
                    .enhanced
                    .map_or_else(|| "5.3.4".to_owned(), |e| e.to_string());
                self.settle_all(job, local.is_permanent(), &status, &text, remote);
                After::Keep
            }
            Err(Err(e)) => {
                // Given up out of step after every byte of the transaction went out, or
                // before BDAT was written (not a reply the session could not take: it wrote
                // its own QUIT then; nor after a 354, where a QUIT would be body text).
                if matches!(&e, ConnError::Io(t)
                    if t == crate::conn::OUT_OF_STEP || t == crate::conn::UNASKED_BEFORE_BDAT)
                {
                    conn.out_of_step_given_up();
                }
                if matches!(
                    e,
                    ConnError::Smtp(ClientError::Protocol(_) | ClientError::Unexpected(..))
                ) || crate::conn::out_of_step(&e)
                    || conn.lost_pipelined_replies()
                {
                    // Replies that could not be read: a body that went out pipelined behind
                    // them may have been taken, and would be at every retry. Replies that
                    // stopped coming partway through pipelined commands: a next hop that
                    // drops what is pipelined would time out at every retry.
                    if conn.lost_pipelined_replies() && dq.lockstep_until.get() <= mono_ms() {
                        tracing::info!(
                            next_hop = %dq.dest.key(),
                            relay = %remote_name,
                            "the next hop answered part of the commands pipelined to it and then \
                             nothing more: it is sent one command at a time for {}s",
                            LOCKSTEP_AFTER_PROTOCOL_ERROR.as_secs()
                        );
                    }
                    dq.lockstep_until
                        .set(mono_ms() + LOCKSTEP_AFTER_PROTOCOL_ERROR.as_millis() as u64);
                }
                // The connection broke off (421, closed, timed out): another address may
                // take the job at once. Recipients the next hop had already refused for good
                // are failed now with that refusal (RFC 5321 4.2.1), not tried again.
                let job = match partial {
                    Some(r) => self.fail_refused(job, &r, &remote),
                    None => job,
                };
                let text = e.describe(remote_name);
                if job.rcpts.is_empty() {
                    if !conn.broke_counted.replace(true) {
                        self.broke_off(dq, conn, &text);
                    }
                    return After::Broken;
                }
                // 4.4.2 (the connection broke), or the status of the reply that ended it (a
                // 421 4.3.2), which a report and the expiry bounce then keep.
                let c = Carried {
                    job,
                    status: dsn::connection_status(&text, "4.4.2"),
                    text,
                    texts: Vec::new(),
                    remote,
                };
                // One broken connection counts once, whatever it carried.
                if !conn.broke_counted.replace(true) {
                    self.broke_off(dq, conn, &c.text);
                }
                if let Some(c) = self.pass_over(dq, conn.addr, true, c, carry) {
                    // Once per pause: the jobs after this one in the batch come back too.
                    if self.every_address_broke(dq) && dq.down_until.get() <= mono_ms() {
                        self.suspend(dq, &c, carry);
                    }
                    self.settle_carried(c);
                }
                After::Broken
            }
        }
    }

    /// Fails the recipients of `job` that `partial` (the replies its transaction got before the
    /// connection broke) shows refused for good: all of them when MAIL was (a pipelined
    /// transaction's sender refused, then the session ended), or each refused at RCPT after
    /// MAIL was taken; returns the job with the others. A 552 to RCPT is "too many
    /// recipients" and temporary (as in `conclude`).
    pub(super) fn fail_refused(
        &self,
        mut job: Job,
        partial: &TransactionResult,
        remote: &Option<String>,
    ) -> Job {
        if partial.mail.is_permanent() {
            let text = reply_line(&partial.mail);
            let status = dsn::status_of(&text);
            let mut out = Vec::new();
            for &rcpt in &job.rcpts {
                let result = Result_::Failed {
                    status: status.clone(),
                };
                self.report(
                    &mut out,
                    &job.msg,
                    rcpt,
                    result,
                    text.clone(),
                    remote.clone(),
                );
            }
            self.send_reports(&job.msg, out);
            job.rcpts.clear();
            return job;
        }
        if !partial.mail.is_positive() {
            return job;
        }
        let mut out = Vec::new();
        let mut left = Vec::with_capacity(job.rcpts.len());
        for (k, &rcpt) in job.rcpts.iter().enumerate() {
            match partial.rcpts.get(k) {
                Some(r) if r.is_permanent() && r.code != 552 => {
                    let text = reply_line(r);
                    let status = dsn::status_of(&text);
                    let result = Result_::Failed { status };
                    self.report(&mut out, &job.msg, rcpt, result, text, remote.clone());
                }
                _ => left.push(rcpt),
            }
        }
        self.send_reports(&job.msg, out);
        job.rcpts = left;
        job
    }

    /// A passed-over job that no other address took: deferred with the last answer.
    pub(super) fn settle_carried(&self, c: Carried) {
        self.settle_each(c.job, false, &c.status, &c.text, &c.texts, c.remote);
    }

    /// Every recipient of `job` failed the same way: for good, or for now (then rescheduled,
    /// or expired when the message's lifetime is over).
    pub(super) fn settle_all(
        &self,
        job: Job,
        permanent: bool,
        status: &str,
        text: &str,
        remote: Option<String>,
    ) {
        self.settle_each(job, permanent, status, text, &[], remote);
    }

    /// Like [`CoreRelay::settle_all`], with each recipient's own reply where `texts` has one
    /// (in the order of `job.rcpts`; its status is then the reply's).
    pub(super) fn settle_each(
        &self,
        job: Job,
        permanent: bool,
        status: &str,
        text: &str,
        texts: &[String],
        remote: Option<String>,
    ) {
        let text_of = |k: usize| texts.get(k).map_or(text, String::as_str);
        let status_of = |k: usize| match texts.get(k) {
            Some(t) => dsn::status_of(t),
            None => status.to_owned(),
        };
        let mut out = Vec::with_capacity(job.rcpts.len());
        if permanent {
            for (k, &rcpt) in job.rcpts.iter().enumerate() {
                let result = Result_::Failed {
                    status: status_of(k),
                };
                let reply = text_of(k).to_owned();
                self.report(&mut out, &job.msg, rcpt, result, reply, remote.clone());
            }
            self.send_reports(&job.msg, out);
            return;
        }
        let failures = job.failures + 1;
        let arrival = arrival_ms(&job.msg.meta);
        let retry = &self.relay.config.retry;
        // Put off unsent because its next hop was suspended while it waited (see `suspend`):
        // its last attempt, if this was to be it, comes after the pause.
        let decision = if texts.is_empty() && text.starts_with(dsn::NOT_TRIED) {
            retry.after_untried_at(
                arrival,
                job.msg.seen.age(),
                failures,
                now_ms(),
                self.pause_ms(),
            )
        } else {
            retry.after_failure_at(arrival, job.msg.seen.age(), failures, now_ms())
        };
        match decision {
            RetryDecision::RetryAt(at) => {
                for (k, &rcpt) in job.rcpts.iter().enumerate() {
                    let result = Result_::Deferred {
                        next_attempt: at,
                        status: status_of(k),
                    };
                    let reply = text_of(k).to_owned();
                    self.report(&mut out, &job.msg, rcpt, result, reply, remote.clone());
                }
                self.send_reports(&job.msg, out);
                // Not a message the operator deleted (its outcome is only logged, above).
                if !job.msg.deleted.load(Ordering::Acquire) {
                    self.handle.count_outcome(Outcome::Deferred);
                }
                self.schedule(Job {
                    failures,
                    not_before: at,
                    tried: Vec::new(),
                    ..job
                });
            }
            RetryDecision::Expire => {
                for (k, &rcpt) in job.rcpts.iter().enumerate() {
                    // RFC 3463 3.5: the actual problem's code rather than 4.4.7 where there is
                    // one (a reply's `4.2.1`, postern's `4.4.1` for no answer), in the
                    // transient class the failure had (a `552 5.2.2` to RCPT, a `554 5.7.1`
                    // greeting, taken as temporary, are `4.2.2` and `4.7.1`, as in the delay
                    // warning); 4.4.7 where the last error said no more than its class.
                    let status = match status_of(k).split_once('.') {
                        Some((_, rest)) if rest != "0.0" => format!("4.{rest}"),
                        _ => "4.4.7".to_owned(),
                    };
                    let result = Result_::Failed { status };
                    let reply = format!("delivery time expired; last error: {}", text_of(k));
                    self.report(&mut out, &job.msg, rcpt, result, reply, remote.clone());
                }
                self.send_reports(&job.msg, out);
            }
        }
    }

    /// Logs one recipient's outcome and adds it to `out`, the outcomes of its job that go to
    /// the owner together ([`CoreRelay::send_reports`]).
    pub(super) fn report(
        &self,
        out: &mut Vec<Report>,
        msg: &Msg,
        rcpt: u32,
        result: Result_,
        reply: String,
        remote: Option<String>,
    ) {
        let to = msg
            .meta
            .recipients
            .get(rcpt as usize)
            .map_or("", |r| r.path.as_str());
        let relay = remote.as_deref().unwrap_or("none");
        if msg.deleted.load(Ordering::Acquire) {
            // Deleted by the operator while a transaction was under way: its owner tracks it
            // no more (nothing is recorded or counted), but what became of the mail that was
            // under way is logged: a message the next hop took has left.
            let status = match &result {
                Result_::Delivered { .. } => "sent",
                Result_::Deferred { .. } => "deferred",
                Result_::Failed { .. } => "bounced",
            };
            tracing::info!(
                queue_id = %msg.queue_id,
                to,
                relay,
                status,
                "{reply} (under way when the operator deleted the message)"
            );
            return;
        }
        // The enhanced status the reports give the outcome (RFC 3463), as Postfix logs `dsn=`.
        match &result {
            Result_::Delivered { .. } => {
                let dsn = dsn::status_of(&reply);
                let dsn = if dsn.starts_with('2') {
                    dsn.as_str()
                } else {
                    "2.0.0"
                };
                tracing::info!(queue_id = %msg.queue_id, to, relay, status = "sent", dsn, "{reply}")
            }
            Result_::Deferred { status, .. } => {
                // A 5xx taken for a deferral (a 554 greeting, a 552 to RCPT) is logged with
                // the transient class its reports give it.
                let dsn = dsn::transient(&dsn::deferral_status(&reply, status));
                tracing::info!(queue_id = %msg.queue_id, to, relay, status = "deferred", dsn, "{reply}")
            }
            Result_::Failed { status } => {
                tracing::info!(queue_id = %msg.queue_id, to, relay, status = "bounced", dsn = status.as_str(), "{reply}")
            }
        }
        out.push(Report {
            queue_id: msg.queue_id.clone(),
            rcpt,
            result,
            reply,
            remote,
        });
    }

    /// Sends the outcomes of one job to the owner of its message, in one piece.
    pub(super) fn send_reports(&self, msg: &Msg, out: Vec<Report>) {
        if !out.is_empty() {
            self.relay.reports.send(msg.owner, out);
        }
    }
}

/// A reply as one line of text: `550 5.1.1 text`, cut as every account of an attempt is
/// ([`crate::conn::cut_account`]).
pub(super) fn reply_line(r: &Reply) -> String {
    let mut s = r.code.to_string();
    if let Some(e) = &r.enhanced {
        s.push(' ');
        s.push_str(&e.to_string());
    }
    for line in &r.lines {
        s.push(' ');
        s.push_str(line);
        if s.len() > crate::conn::MAX_ACCOUNT {
            break;
        }
    }
    crate::conn::cut_account(s)
}

#[cfg(test)]
mod tests {
    use super::*;
    use postern_proto::EnhancedCode;

    #[test]
    fn a_long_reply_is_kept_cut_at_a_character() {
        let reply = |lines: Vec<String>| Reply {
            code: 451,
            enhanced: Some(EnhancedCode::new(4, 3, 0)),
            lines,
        };
        let short = reply(vec!["try".into(), "later".into()]);
        assert_eq!(reply_line(&short), "451 4.3.0 try later");
        let long = reply(vec!["é".repeat(250); 64]);
        let kept = reply_line(&long);
        assert!(kept.len() <= crate::conn::MAX_ACCOUNT + 6, "{}", kept.len());
        assert!(kept.starts_with("451 4.3.0 éé"));
        assert!(kept.ends_with("é [...]"), "{kept}");
        // A session that ended on such a reply is told of as briefly.
        let ended =
            crate::conn::ConnError::Smtp(postern_proto::client::ClientError::Greeting(long));
        let told = ended.describe("mx.test [192.0.2.1]");
        assert!(told.starts_with("mx.test [192.0.2.1] said: 451"), "{told}");
        assert!(told.len() <= crate::conn::MAX_ACCOUNT + 6, "{}", told.len());
        assert!(told.ends_with(" [...]"), "{told}");
    }
}
