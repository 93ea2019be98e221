//! One glommio executor per thread, each on its own core when asked, started with a small
//! amount of registered I/O memory so that the default 8 MiB locked-memory limit is enough.

use std::future::Future;

use glommio::{LocalExecutorBuilder, Placement};

use crate::error::LoadError;

/// Registered memory per executor. postern-load does no file I/O through glommio; glommio's
/// default (10 MiB) would not fit under a default RLIMIT_MEMLOCK of 8 MiB with even one core.
const IO_MEMORY: usize = 64 * 1024;

/// Submission queue entries per ring: enough for hundreds of sessions per core.
const RING_DEPTH: usize = 256;

/// Starts `threads` executors, the i-th running `make(i)`, pinned to CPU `cpus[i]` when `cpus`
/// is given (taken round: more executors than CPUs share them). Returns their join handles
/// once all have been spawned.
pub fn spawn<F, Fut, T>(
    name: &str,
    threads: usize,
    cpus: &[usize],
    make: F,
) -> Result<Vec<glommio::ExecutorJoinHandle<T>>, LoadError>
where
    F: Fn(usize) -> Fut + Send + Clone + 'static,
    Fut: Future<Output = T> + 'static,
    T: Send + 'static,
{
    if let Some(online) = online_cpus() {
        if let Some(cpu) = cpus.iter().find(|c| !online.contains(c)) {
            return Err(LoadError::flag(
                "--cpus",
                format!(
                    "CPU {cpu} is not online here (online: {})",
                    online_text(&online)
                ),
            ));
        }
    }
    let mut handles = Vec::with_capacity(threads);
    for i in 0..threads {
        let placement = match cpus.get(i % cpus.len().max(1)) {
            Some(&cpu) => Placement::Fixed(cpu),
            None => Placement::Unbound,
        };
        let make = make.clone();
        let handle = LocalExecutorBuilder::new(placement)
            .name(&format!("{name}-{i}"))
            .io_memory(IO_MEMORY)
            .ring_depth(RING_DEPTH)
            .spawn(move || make(i))
            .map_err(|e| LoadError::Executor(advice(&e.to_string())))?;
        handles.push(handle);
    }
    Ok(handles)
}

/// The CPUs the kernel has online, when it says.
fn online_cpus() -> Option<Vec<usize>> {
    let text = std::fs::read_to_string("/sys/devices/system/cpu/online").ok()?;
    parse_cpus(text.trim()).ok()
}

/// `0-3,6` for CPUs 0, 1, 2, 3 and 6.
fn online_text(cpus: &[usize]) -> String {
    let mut out = String::new();
    let mut i = 0;
    while i < cpus.len() {
        let mut j = i;
        while j + 1 < cpus.len() && cpus[j + 1] == cpus[j] + 1 {
            j += 1;
        }
        if !out.is_empty() {
            out.push(',');
        }
        out.push_str(&cpus[i].to_string());
        if j > i {
            out.push('-');
            out.push_str(&cpus[j].to_string());
        }
        i = j + 1;
    }
    out
}

/// What to change when an executor does not start.
pub fn advice(cause: &str) -> String {
    let memlock = memlock_limit().map_or("unlimited or unknown".to_owned(), |l| {
        format!("{} KiB", l / 1024)
    });
    format!(
        "cannot start a glommio executor ({cause}). postern-load needs io_uring (Linux 5.8 or \
         later, not disabled by kernel.io_uring_disabled or a seccomp profile) and locked \
         memory for its rings: the limit here is {memlock} (`ulimit -l`); raise it with \
         `ulimit -l unlimited` (or LimitMEMLOCK=infinity, docker run --ulimit memlock=-1), or \
         run fewer --threads"
    )
}

/// The soft RLIMIT_MEMLOCK in bytes (None when unlimited or unknown).
fn memlock_limit() -> Option<u64> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max locked memory"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

/// Reads `0,1,4-7` as a list of CPUs.
pub fn parse_cpus(s: &str) -> Result<Vec<usize>, LoadError> {
    let bad = || LoadError::flag("--cpus", format!("{s:?} is not a CPU list like 0,1 or 2-5"));
    let mut out = Vec::new();
    for part in s.split(',').filter(|p| !p.is_empty()) {
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b): (usize, usize) = (
                    a.trim().parse().map_err(|_| bad())?,
                    b.trim().parse().map_err(|_| bad())?,
                );
                if b < a || b - a > 4096 {
                    return Err(bad());
                }
                out.extend(a..=b);
            }
            None => out.push(part.trim().parse().map_err(|_| bad())?),
        }
    }
    if out.is_empty() {
        return Err(bad());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn cpu_lists_read_and_write_back() {
        assert_eq!(parse_cpus("0-3,6").unwrap(), [0, 1, 2, 3, 6]);
        assert_eq!(online_text(&[0, 1, 2, 3, 6]), "0-3,6");
        assert_eq!(online_text(&[1]), "1");
        assert_eq!(online_text(&[0, 2, 3]), "0,2-3");
        assert_eq!(online_text(&[]), "");
    }
}
