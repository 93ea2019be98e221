//! `postern queue`: the mail waiting in a spool, read straight from its segments.
//!
//! It reads without the spool's lock, beside a running server: segments are only appended to
//! and removed whole, never shortened or reused, so a mapping never loses its pages under the
//! reader. A record being written at that moment can be read half-written; every record is
//! checked (length and CRC) before it is believed, so such a record is passed over like a
//! torn tail, and the listing is a snapshot that may miss the message it belongs to.

use std::collections::{HashMap, HashSet};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, UNIX_EPOCH};

use postern_spool::{DeliveryState, Recipient, RecoveredMessage, Status};

use crate::cli::Queue;
use crate::terminal::{for_terminal, unsafe_on_a_terminal};

/// The file a server running with `--hold` keeps in its spool (and one without removes), so
/// that the listing and `--flush` can say that nothing is delivered.
pub(crate) const HOLD_FILE: &str = "postern.hold";

/// The server running on `spool` with `--hold`, if there is one.
fn held_by(spool: &Path) -> Option<rustix::process::Pid> {
    if !spool.join(HOLD_FILE).is_file() {
        return None;
    }
    server_pid(spool).ok()
}

/// Runs `postern queue`; prints the listing on stdout, or one line naming the problem on
/// stderr (exit status 1).
pub(crate) fn run(q: &Queue) -> ExitCode {
    use std::io::Write as _;
    if let Some(id) = &q.show {
        return show(&q.spool, id);
    }
    // With --flush and --delete what goes to stdout only tells of what was done: a failure
    // to write it is said, and does not make the command look as if it had failed.
    let acted = q.flush || !q.delete.is_empty();
    let result = if q.flush {
        flush(&q.spool).map(|text| (text, String::new()))
    } else if !q.delete.is_empty() {
        // `-`: the IDs on standard input too.
        let mut ids: Vec<String> = q.delete.iter().filter(|id| *id != "-").cloned().collect();
        if q.delete.iter().any(|id| id == "-") {
            let mut input = String::new();
            if let Err(e) = std::io::Read::read_to_string(&mut std::io::stdin(), &mut input) {
                let _ = writeln!(
                    std::io::stderr(),
                    "postern: --delete -: standard input: {e}"
                );
                return ExitCode::from(2);
            }
            match crate::cli::queue_ids_from(&input) {
                Ok(more) => ids.extend(more),
                Err(e) => {
                    let _ = writeln!(std::io::stderr(), "postern: {e}");
                    return ExitCode::from(2);
                }
            }
        }
        if ids.is_empty() {
            let _ = writeln!(
                std::io::stderr(),
                "postern: --delete -: no queue ID on standard input; nothing was deleted"
            );
            return ExitCode::from(2);
        }
        delete(&q.spool, &ids).map(|text| (text, String::new()))
    } else {
        listing(&q.spool, q.json)
    };
    match result {
        Ok((text, note)) => {
            let mut stdout = std::io::stdout().lock();
            match stdout
                .write_all(text.as_bytes())
                .and_then(|()| stdout.flush())
            {
                Ok(()) => {}
                // A reader that stopped early (`| head`) wanted no more.
                Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {}
                Err(e) if acted => {
                    let _ = writeln!(
                        std::io::stderr(),
                        "postern: done, but its account could not be written to stdout: {e}"
                    );
                }
                Err(e) => {
                    let _ = writeln!(std::io::stderr(), "postern: writing the listing: {e}");
                    return ExitCode::from(1);
                }
            }
            if !note.is_empty() {
                let _ = std::io::stderr().write_all(note.as_bytes());
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            let _ = writeln!(std::io::stderr(), "postern: {e}");
            ExitCode::from(1)
        }
    }
}

/// Asks the server holding `spool`'s lock to try its deferred mail now: SIGUSR1 to the
/// process that the kernel says holds the lock on the spool directory itself, which postern
/// takes (a process that only locks `postern.lock`, such as `flock` around a backup, is not
/// signalled). The PID written in the lock file is not trusted: it may be stale, or from
/// another PID namespace.
fn flush(spool: &Path) -> Result<String, String> {
    let path = spool.join(postern_spool::LOCK_FILE);
    match std::fs::metadata(&path) {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(format!(
                "no postern serves {} (no {})",
                spool.display(),
                path.display()
            ));
        }
        Err(e) => return Err(format!("{}: {e}", path.display())),
    }
    let pid = server_pid(spool)?;
    if held_by(spool).is_some() {
        return Err(format!(
            "postern (pid {}) runs with --hold: it delivers nothing, so there is nothing to \
             try now; restart it without --hold to deliver",
            pid.as_raw_nonzero()
        ));
    }
    rustix::process::kill_process(pid, rustix::process::Signal::USR1)
        .map_err(|e| format!("cannot signal postern (pid {}): {e}", pid.as_raw_nonzero()))?;
    Ok(format!(
        "asked postern (pid {}) to try its deferred mail now; its log says what it did\n",
        pid.as_raw_nonzero()
    ))
}

/// Requests of `postern queue --delete` in the spool directory, one file each:
/// `postern.delete.<pid>`, a line `<queue id> <recipients>` per message. The server reads
/// and removes them on SIGUSR2.
pub(crate) const DELETE_PREFIX: &str = "postern.delete.";

/// How long `--delete` waits for the messages to leave the queue.
const DELETE_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// Asks the server holding `spool`'s lock to delete the messages `ids`, then waits (bounded)
/// until the queue no longer lists them. Those not in the queue now (delivered or deleted
/// since a listing) are named, with exit 1, and the others deleted all the same; with none
/// in the queue, nothing is asked.
fn delete(spool: &Path, ids: &[String]) -> Result<String, String> {
    // The messages still waiting, with their recipients' count, and how those now final
    // ended: by a deletion or not.
    type Looked = (Vec<(String, u32)>, Vec<(String, bool)>);
    let look = |spool: &Path| -> Result<Looked, String> {
        let recovered = postern_spool::recover(spool)
            .map_err(|e| format!("cannot read the spool at {}: {e}", spool.display()))?;
        let (waiting, done): (Vec<_>, Vec<_>) =
            recovered.messages.iter().partition(|m| !m.is_final());
        Ok((
            waiting
                .iter()
                .map(|m| (m.queue_id.clone(), m.meta.recipients.len() as u32))
                .collect(),
            done.iter()
                .map(|m| (m.queue_id.clone(), deleted_by_operator(&m.statuses)))
                .collect(),
        ))
    };
    let queued = |spool: &Path| look(spool).map(|(waiting, _)| waiting);
    if !spool.join(postern_spool::LOCK_FILE).is_file() {
        return Err(format!(
            "no spool at {} (no {}; give the --spool of `postern serve`)",
            spool.display(),
            postern_spool::LOCK_FILE
        ));
    }
    let pid = server_pid(spool).map_err(|e| {
        format!("{e}: a deletion is made by the server on the spool (start it, with --hold to deliver nothing meanwhile)")
    })?;
    let mut ids: Vec<String> = ids.to_vec();
    ids.sort();
    ids.dedup();
    if ids.iter().any(String::is_empty) {
        return Err("--delete: an empty queue ID; nothing was deleted".to_owned());
    }
    if ids.len() > postern_server::MAX_DELETIONS_ASKED {
        return Err(format!(
            "--delete: {} queue IDs, more than the {} one command deletes; nothing was \
             deleted (give them in several commands)",
            ids.len(),
            postern_server::MAX_DELETIONS_ASKED
        ));
    }
    let now: HashMap<String, u32> = queued(spool)?.into_iter().collect();
    let (mut asked, mut missing) = (Vec::new(), Vec::new());
    for id in &ids {
        match now.get(id) {
            Some(&n) => asked.push((id.clone(), n)),
            None => missing.push(id.clone()),
        }
    }
    let not_queued = |missing: &[String]| {
        let are = if missing.len() == 1 { "is" } else { "are" };
        format!(
            "{} {are} not in the queue of {} (delivered, failed or deleted already, or \
             never queued)",
            missing.join(", "),
            spool.display()
        )
    };
    if asked.is_empty() {
        return Err(format!("{}; nothing was deleted", not_queued(&missing)));
    }
    {
        let missing: HashSet<&String> = missing.iter().collect();
        ids.retain(|id| !missing.contains(id));
    }
    let wanted: HashSet<&String> = ids.iter().collect();
    // What the others came to (on stdout, as when every ID was queued), then those not
    // queued, named: exit 1.
    let with_missing = |outcome: Result<String, String>| {
        if missing.is_empty() {
            return outcome;
        }
        match outcome {
            Ok(out) => {
                use std::io::Write as _;
                let mut stdout = std::io::stdout().lock();
                let _ = stdout
                    .write_all(out.as_bytes())
                    .and_then(|()| stdout.flush());
                Err(not_queued(&missing))
            }
            Err(e) => Err(format!("{e}\n{}", not_queued(&missing))),
        }
    };
    let raw = pid.as_raw_nonzero();
    let name = format!("{DELETE_PREFIX}{}", std::process::id());
    let tmp = spool.join(format!(".{name}.tmp"));
    let text: String = asked.iter().map(|(id, n)| format!("{id} {n}\n")).collect();
    let request = spool.join(&name);
    if let Err(e) =
        write_request(&tmp, text.as_bytes()).and_then(|()| std::fs::rename(&tmp, &request))
    {
        let _ = std::fs::remove_file(&tmp);
        return Err(format!("{}: {e}", tmp.display()));
    }
    if let Err(e) = rustix::process::kill_process(pid, rustix::process::Signal::USR2) {
        // Not left for a later signal to act on: this deletion was refused.
        let _ = std::fs::remove_file(&request);
        return Err(format!("cannot signal postern (pid {raw}): {e}"));
    }
    // Each look reads the whole spool, and the server records each deletion: more time for
    // more of them.
    let wait = DELETE_WAIT + std::time::Duration::from_millis(ids.len() as u64);
    let deadline = std::time::Instant::now() + wait;
    // How each message that left the queue ended, where a look saw it final before its
    // space was reclaimed: deleted (true), or delivered or failed first (false).
    let mut ended_as: HashMap<String, bool> = HashMap::new();
    loop {
        let left: Vec<&String> = {
            let (now, done) = match look(spool) {
                Ok(now) => now,
                Err(e) => {
                    // As at the deadline: a request not taken yet is withdrawn, not left
                    // for a later signal to act on after this command said it failed.
                    if std::fs::remove_file(&request).is_ok() {
                        return Err(format!("{e}; the request is withdrawn"));
                    }
                    return Err(format!("{e}; postern (pid {raw}) took the request"));
                }
            };
            for (id, deleted) in done {
                if wanted.contains(&id) {
                    ended_as.entry(id).or_insert(deleted);
                }
            }
            let now: HashSet<&String> = now.iter().map(|(q, _)| q).collect();
            ids.iter().filter(|id| now.contains(id)).collect()
        };
        if left.is_empty() {
            return with_missing(deletion_outcome(&ids, &ended_as));
        }
        let ended = rustix::process::test_kill_process(pid).is_err();
        if ended || std::time::Instant::now() >= deadline {
            // A request not taken yet is withdrawn: told it was not deleted, the operator
            // must not find it deleted later, at some other command's signal. (One the
            // server took is being made.)
            let withdrawn = std::fs::remove_file(&request).is_ok();
            let left: Vec<&str> = left.iter().map(|s| s.as_str()).collect();
            let what = if ended {
                format!("postern (pid {raw}) ended before it deleted")
            } else if withdrawn {
                format!(
                    "postern (pid {raw}) did not take the request within {}s (withdrawn) for",
                    wait.as_secs()
                )
            } else {
                format!(
                    "postern (pid {raw}) has not deleted within {}s",
                    wait.as_secs()
                )
            };
            return with_missing(Err(format!("{what} {}; its log says why", left.join(", "))));
        }
        // Each look reads the whole spool: a few a second.
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}

/// Whether a message's recipients were recorded as deleted by the operator.
fn deleted_by_operator(statuses: &[Option<Status>]) -> bool {
    statuses
        .iter()
        .flatten()
        .any(|s| s.state == DeliveryState::Failed && s.reply == postern_spool::DELETED_BY_OPERATOR)
}

/// What `--delete` prints once every message in `ids` has left the queue, given how those
/// seen final ended (deleted or not). A message delivered or failed before its core took the
/// request was not deleted: said, with exit 1. One whose space was reclaimed before a look
/// saw it final left the queue one way or the other; the server's log says which.
fn deletion_outcome(ids: &[String], ended_as: &HashMap<String, bool>) -> Result<String, String> {
    let mut out = String::new();
    let mut not_deleted = Vec::new();
    for id in ids {
        match ended_as.get(id) {
            Some(true) => out.push_str(&format!("deleted {id}\n")),
            Some(false) => not_deleted.push(id.as_str()),
            None => out.push_str(&format!(
                "{id} left the queue (deleted, or delivered first: the server's log says which)\n"
            )),
        }
    }
    if not_deleted.is_empty() {
        return Ok(out);
    }
    Err(format!(
        "{out}not deleted: {} had every recipient's outcome (delivered or failed) before the \
         request was taken",
        not_deleted.join(", ")
    ))
}

/// Writes a deletion request to `tmp`, a new file: never through a link or into a file that
/// is there (the spool's owner, which may not be who runs this, as root, could have put one
/// there pointing anywhere), and readable by the server whatever the umask (the spool's
/// directory keeps it from anyone else).
fn write_request(tmp: &Path, text: &[u8]) -> std::io::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
    // A leftover of an earlier command of this pid, or a link put in its place, goes (the
    // link itself, not what it points at); one put back at once makes the create fail.
    let _ = std::fs::remove_file(tmp);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .custom_flags(libc::O_NOFOLLOW)
        .mode(0o644)
        .open(tmp)?;
    file.set_permissions(std::fs::Permissions::from_mode(0o644))?;
    file.write_all(text)
}

/// The process that holds the lock on the spool directory itself (a running postern).
fn server_pid(spool: &Path) -> Result<rustix::process::Pid, String> {
    let pid = postern_spool::flock_holder(spool)
        .map_err(|e| format!("cannot find the server on {}: {e}", spool.display()))?
        .and_then(|pid| rustix::process::Pid::from_raw(i32::try_from(pid).ok()?))
        .ok_or_else(|| format!("no postern is running on {}", spool.display()))?;
    // Another program may lock the directory (`flock DIR command`): it is not signalled.
    let raw = pid.as_raw_nonzero();
    let comm = std::fs::read_to_string(format!("/proc/{raw}/comm")).unwrap_or_default();
    let same_binary = match (
        std::fs::read_link(format!("/proc/{raw}/exe")),
        std::fs::read_link("/proc/self/exe"),
    ) {
        (Ok(theirs), Ok(ours)) => theirs == ours,
        _ => false,
    };
    if comm.is_empty() && !same_binary {
        return Err(format!(
            "{} is locked by pid {raw}, which cannot be told to be postern: nothing was signalled",
            spool.display()
        ));
    }
    if !comm.trim_end().starts_with("postern") && !same_binary {
        return Err(format!(
            "{} is locked by pid {raw} ({}), which is not postern: nothing was signalled",
            spool.display(),
            comm.trim_end()
        ));
    }
    Ok(pid)
}

/// A waiting recipient's state, for the listing.
fn state(status: Option<&Status>) -> (&'static str, Option<u64>, &str) {
    match status {
        None => ("waiting", None, ""),
        Some(Status {
            state: DeliveryState::Deferred { next_attempt, .. },
            reply,
        }) => ("deferred", Some(*next_attempt), reply.as_str()),
        // Final recipients are not listed.
        Some(s) => ("final", None, s.reply.as_str()),
    }
}

/// Whether a waiting recipient's sender was sent a delay warning about it (`--delay-warning`).
fn warned(status: Option<&Status>) -> bool {
    matches!(
        status,
        Some(Status {
            state: DeliveryState::Deferred { warned: true, .. },
            ..
        })
    )
}

/// A time for the listing; one past what RFC 3339 writes (the year 9999, from a
/// `--retry-max` or `--max-queue-lifetime` of centuries, or a clock far off) is given in
/// seconds since the epoch.
fn time(unix: u64) -> String {
    /// 9999-12-31T23:59:59Z.
    const LAST: u64 = 253_402_300_799;
    if unix > LAST {
        return format!("{unix} s after 1970");
    }
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(unix)).to_string()
}

/// The listing of the spool at `spool`: messages with recipients still to deliver, oldest
/// first.
/// With the listing comes a note on damage found, if any: part of the listing in text, on
/// stderr beside JSON (whose lines stay one message each).
/// Reads the queue in `spool`, or says why not.
fn read_spool(spool: &Path) -> Result<postern_spool::Recovered, String> {
    // Every spool has the lock file from its first start: without it, the directory is
    // more likely a typo than an empty queue.
    let lock = std::fs::metadata(spool.join(postern_spool::LOCK_FILE));
    if let Err(e) = &lock {
        if e.kind() == std::io::ErrorKind::PermissionDenied {
            return Err(format!("cannot read the spool at {}: {e}", spool.display()));
        }
    }
    if !spool.is_dir() || !lock.is_ok_and(|m| m.is_file()) {
        return Err(format!(
            "no spool at {} (no {}; give the --spool of `postern serve`)",
            spool.display(),
            postern_spool::LOCK_FILE
        ));
    }
    postern_spool::recover(spool)
        .map_err(|e| format!("cannot read the spool at {}: {e}", spool.display()))
}

/// `postern queue --show ID`: the message's stored octets on standard output (exit 0), or one
/// line on stderr saying why not (exit 1: not in the queue, or the spool cannot be read).
fn show(spool: &Path, id: &str) -> ExitCode {
    use std::io::{IsTerminal as _, Write as _};
    let found = read_spool(spool).and_then(|recovered| {
        match recovered.messages.iter().find(|m| m.queue_id == id) {
            Some(m) if !m.is_final() => Ok(m.body().to_vec()),
            Some(_) => Err(format!(
                "{id} is no longer queued: each of its recipients was delivered, failed or \
                 deleted (its space is freed later)"
            )),
            None => Err(format!("{id} is not in the queue at {}", spool.display())),
        }
    });
    let message = match found {
        Ok(message) => message,
        Err(e) => {
            let _ = writeln!(std::io::stderr(), "postern: {e}");
            return ExitCode::from(1);
        }
    };
    let mut stdout = std::io::stdout().lock();
    let written = if stdout.is_terminal() {
        stdout.write_all(message_for_terminal(&message).as_bytes())
    } else {
        stdout.write_all(&message)
    };
    match written.and_then(|()| stdout.flush()) {
        Ok(()) => ExitCode::SUCCESS,
        // A reader that stopped early (`| head`) wanted no more.
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => ExitCode::SUCCESS,
        Err(e) => {
            let _ = writeln!(std::io::stderr(), "postern: writing the message: {e}");
            ExitCode::from(1)
        }
    }
}

/// A stored message for a terminal: each line (CR LF ended) as [`for_terminal`] writes it,
/// ended by a line feed; octets that are not UTF-8 as U+FFFD.
fn message_for_terminal(message: &[u8]) -> String {
    let text = String::from_utf8_lossy(message);
    let mut out = String::with_capacity(text.len());
    let mut lines = text.split("\r\n").peekable();
    while let Some(line) = lines.next() {
        // The split leaves an empty piece after a last CR LF: no line of its own.
        if lines.peek().is_none() && line.is_empty() {
            break;
        }
        out.push_str(&for_terminal(line));
        out.push('\n');
    }
    out
}

fn listing(spool: &Path, json: bool) -> Result<(String, String), String> {
    let recovered = read_spool(spool)?;
    let mut waiting: Vec<&RecoveredMessage> = recovered
        .messages
        .iter()
        .filter(|m| !m.is_final())
        .collect();
    waiting.sort_by(|a, b| (a.meta.arrival, &a.queue_id).cmp(&(b.meta.arrival, &b.queue_id)));
    let mut note = String::new();
    if recovered.corrupt_records > 0 {
        let _ = writeln!(
            note,
            "-- {} record(s) skipped as damaged (or being written at this moment); a damaged \
             record can hide the rest of its segment, whose messages are then not listed; \
             `postern serve` logs damaged ones at start-up",
            recovered.corrupt_records
        );
    }
    if recovered.unread_octets > 0 {
        let _ = writeln!(
            note,
            "-- up to {} octets of segment files could not be read past damage (a file cut \
             short, a record running past its file's end, a hole in durable records, a file \
             whose header is bad or not its own): the messages there are not listed",
            recovered.unread_octets
        );
    }
    for e in &recovered.read_errors {
        let _ = writeln!(
            note,
            "-- core {} segment {} could not be read past offset {} ({}): the disk gave an \
             error there",
            e.at.core, e.at.segment, e.at.offset, e.error
        );
    }
    if postern_spool::fold_pending(spool) {
        let _ = writeln!(
            note,
            "-- a move of the queue to fewer cores is under way, or was cut off: messages being \
             moved may be listed twice (once under each queue ID); the server's next start \
             settles it, and each is delivered once"
        );
    }
    if let Some(first) = recovered.strays.first() {
        let _ = writeln!(
            note,
            "-- {} entr{} named like a segment but not a regular file, or like a core's \
             directory but not as postern names it (first {}): not read",
            recovered.strays.len(),
            if recovered.strays.len() == 1 {
                "y"
            } else {
                "ies"
            },
            first.display()
        );
    }
    // `postern serve` refuses to start on a spool where a core's entry is not a directory;
    // listed as empty, that queue would look fine.
    let mut odd_cores: Vec<PathBuf> = std::fs::read_dir(spool)
        .map(|entries| {
            entries
                .flatten()
                .filter(|e| {
                    e.file_name()
                        .to_str()
                        .is_some_and(|n| postern_spool::core_number(n).is_some())
                        && !e.path().is_dir()
                })
                .map(|e| e.path())
                .collect()
        })
        .unwrap_or_default();
    odd_cores.sort();
    for path in &odd_cores {
        let _ = writeln!(
            note,
            "-- {} is named like a core's directory but is not one: not read, and `postern \
             serve` with that core among its --cores will not start on this spool until it is \
             moved away",
            path.display()
        );
    }
    if recovered.damaged > 0 {
        let _ = writeln!(
            note,
            "-- {} message(s) damaged (body records lost): not listed and not delivered",
            recovered.damaged
        );
    }
    for c in &recovered.cut_off {
        let _ = writeln!(
            note,
            "-- {} from {} ({} recipient{}): started before damage in core {} segment {} and \
             no end found; its end may have been lost to the damage after its 250 (or it is \
             being received at this moment): not listed and not delivered",
            c.queue_id,
            if c.reverse_path.is_empty() {
                "<>".to_owned()
            } else {
                for_terminal(&c.reverse_path)
            },
            c.recipients,
            if c.recipients == 1 { "" } else { "s" },
            c.damage.core,
            c.damage.segment
        );
    }
    if let Some(pid) = held_by(spool) {
        let _ = writeln!(
            note,
            "-- the server on this spool (pid {}) runs with --hold: nothing is delivered until \
             it runs without; mail listed as waiting is held",
            pid.as_raw_nonzero()
        );
    }
    let mut out = String::new();
    if json {
        for m in &waiting {
            let recipients: Vec<serde_json::Value> = pending(m)
                .map(|(rcpt, status)| {
                    let (state, next, reply) = state(status);
                    serde_json::json!({
                        "address": rcpt.path,
                        "state": state,
                        "next_attempt": next,
                        "reply": (!reply.is_empty()).then_some(reply),
                        "delay_warned": warned(status),
                        "notify": rcpt.notify.map(notify_words),
                        "orcpt": rcpt.orcpt,
                    })
                })
                .collect();
            let line = serde_json::json!({
                "queue_id": m.queue_id,
                "size": m.size(),
                "arrival": m.meta.arrival,
                "sender": m.meta.reverse_path,
                "client": (!m.meta.client.is_empty()).then_some(&m.meta.client),
                "envid": m.meta.envid,
                "ret": m.meta.ret.map(|r| if r == 2 { "hdrs" } else { "full" }),
                "body": match m.meta.body_type {
                    1 => "8bitmime",
                    2 => "binarymime",
                    _ => "7bit",
                },
                "smtputf8": m.meta.smtputf8,
                "recipients": recipients,
            });
            let _ = writeln!(out, "{}", json_for_terminal(&line.to_string()));
        }
        return Ok((out, note));
    }
    if waiting.is_empty() {
        out.push_str(
            if recovered.corrupt_records == 0 && recovered.damaged == 0 && odd_cores.is_empty() {
                "-- the queue is empty\n"
            } else {
                "-- no message waiting could be read\n"
            },
        );
        out.push_str(&note);
        return Ok((out, String::new()));
    }
    let _ = writeln!(
        out,
        "{:<20} {:>10}  {:<20}  SENDER / RECIPIENTS",
        "QUEUE ID", "SIZE", "ARRIVED"
    );
    let (mut recipients, mut bytes) = (0usize, 0u64);
    for m in &waiting {
        bytes += m.size();
        // Addresses come from any client; an SMTPUTF8 one may hold C1 controls and bidi
        // overrides (RFC 6531 takes them), shown escaped like a reply's.
        let sender = if m.meta.reverse_path.is_empty() {
            "<>".to_owned()
        } else {
            format!("<{}>", for_terminal(&m.meta.reverse_path))
        };
        let _ = writeln!(
            out,
            "{:<20} {:>10}  {:<20}  {sender}",
            m.queue_id,
            m.size(),
            time(m.meta.arrival)
        );
        for (rcpt, status) in pending(m) {
            let address = rcpt.path.as_str();
            recipients += 1;
            let (_, next, reply) = state(status);
            let reply = for_terminal(reply);
            let address = for_terminal(address);
            let told = if warned(status) {
                " (sender warned of the delay)"
            } else {
                ""
            };
            let _ = match next {
                Some(at) => writeln!(
                    out,
                    "{:>55}<{address}> deferred{told}, next attempt {}: {reply}",
                    "",
                    time(at)
                ),
                None => writeln!(out, "{:>55}<{address}> not tried yet", ""),
            };
        }
    }
    let _ = writeln!(
        out,
        "-- {} message{}, {recipients} recipient{} waiting, {bytes} bytes",
        waiting.len(),
        if waiting.len() == 1 { "" } else { "s" },
        if recipients == 1 { "" } else { "s" },
    );
    out.push_str(&note);
    Ok((out, String::new()))
}

/// The recipients of `m` without a final outcome, with their latest status.
fn pending(m: &RecoveredMessage) -> impl Iterator<Item = (&Recipient, Option<&Status>)> {
    m.meta
        .recipients
        .iter()
        .zip(&m.statuses)
        .filter(|(_, s)| !s.as_ref().is_some_and(Status::is_final))
        .map(|(r, s)| (r, s.as_ref()))
}

/// A recipient's NOTIFY bits (RFC 3461 4.1) as the keywords it was given with.
fn notify_words(bits: u8) -> Vec<&'static str> {
    if bits == 0 {
        return vec!["never"];
    }
    [(1, "success"), (2, "failure"), (4, "delay")]
        .into_iter()
        .filter(|(bit, _)| bits & bit != 0)
        .map(|(_, word)| word)
        .collect()
}

/// A line of JSON with the characters [`unsafe_on_a_terminal`] written as `\uXXXX` escapes
/// (serde_json escapes only C0): the same value to a JSON reader, and nothing a terminal acts
/// on. Outside strings JSON holds none of them.
fn json_for_terminal(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    for c in line.chars() {
        if unsafe_on_a_terminal(c) {
            // All of them lie in the Basic Multilingual Plane: one escape each.
            let _ = write!(out, "\\u{:04x}", u32::from(c));
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_message_shown_on_a_terminal_has_no_escape_sequences() {
        let message = b"Subject: \x1b[2Jhi\r\n\r\nline\ttwo \\ \xff\r\nlast";
        assert_eq!(
            message_for_terminal(message),
            "Subject: \\u{1b}[2Jhi\n\nline two \\\\ \u{fffd}\nlast\n"
        );
        assert_eq!(message_for_terminal(b"a\r\n\r\n"), "a\n\n");
    }

    #[test]
    fn times_past_the_year_9999_are_listed_in_seconds() {
        assert_eq!(time(0), "1970-01-01T00:00:00Z");
        assert_eq!(time(253_402_300_799), "9999-12-31T23:59:59Z");
        assert_eq!(time(253_402_300_800), "253402300800 s after 1970");
        assert_eq!(time(u64::MAX), format!("{} s after 1970", u64::MAX));
    }

    #[test]
    fn json_lines_carry_no_character_a_terminal_acts_on() {
        let value = "a\u{9b}31m\u{7f}\u{202e}b\u{1b}\u{85}c \u{e9}";
        let line = serde_json::json!({ "address": value }).to_string();
        let safe = json_for_terminal(&line);
        assert!(!safe.chars().any(unsafe_on_a_terminal), "{safe:?}");
        assert!(
            safe.contains("\\u009b") && safe.contains("\\u202e"),
            "{safe}"
        );
        // Read back, it is the same value, é and all.
        let back: serde_json::Value = serde_json::from_str(&safe).unwrap();
        assert_eq!(back["address"], value);
    }

    #[test]
    fn a_deletion_is_told_from_a_delivery_that_came_first() {
        let status = |state, reply: &str| {
            Some(Status {
                state,
                reply: reply.to_owned(),
            })
        };
        let deleted = [
            status(DeliveryState::Delivered, "250 ok"),
            status(DeliveryState::Failed, postern_spool::DELETED_BY_OPERATOR),
        ];
        let delivered = [
            status(DeliveryState::Delivered, "250 ok"),
            status(DeliveryState::Failed, "550 no such user"),
        ];
        assert!(deleted_by_operator(&deleted));
        assert!(!deleted_by_operator(&delivered));
        let ids = ["A".to_owned(), "B".to_owned(), "C".to_owned()];
        let all = deletion_outcome(&ids[..1], &HashMap::from([("A".into(), true)])).unwrap();
        assert_eq!(all, "deleted A\n");
        let unseen = deletion_outcome(&ids[2..], &HashMap::new()).unwrap();
        assert!(unseen.starts_with("C left the queue"), "{unseen}");
        let mixed = deletion_outcome(
            &ids,
            &HashMap::from([("A".into(), true), ("B".into(), false)]),
        )
        .unwrap_err();
        assert!(mixed.starts_with("deleted A\nC left the queue"), "{mixed}");
        assert!(mixed.ends_with("not deleted: B had every recipient's outcome (delivered or failed) before the request was taken"), "{mixed}");
    }

    #[test]
    fn a_reply_is_listed_without_its_control_and_reordering_characters() {
        assert_eq!(
            for_terminal("451 4.3.0 evil \u{1b}[31mRED\tx\u{7f}\u{8}\rback \u{202e}rev"),
            "451 4.3.0 evil \\u{1b}[31mRED x\\u{7f}\\u{8}\\u{d}back \\u{202e}rev"
        );
        assert_eq!(for_terminal("450 4.2.1 b\u{fc}sy"), "450 4.2.1 b\u{fc}sy");
        assert_eq!(for_terminal("a\u{61c}b"), "a\\u{61c}b");
        // Text that reads like an escape is told from one.
        assert_eq!(for_terminal("x\\u{1b}y"), "x\\\\u{1b}y");
        assert_eq!(for_terminal("x\\\\u{1b}y"), "x\\\\\\\\u{1b}y");
        assert_eq!(for_terminal("\"a\\\"b\"@c"), "\"a\\\\\"b\"@c");
    }
}
