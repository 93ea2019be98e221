//! Each core runs on a CPU the process was given (the Nth of its affinity mask, as `taskset`,
//! a cpuset cgroup or systemd's AllowedCPUs= set it), never on a CPU outside it; and the
//! process runs without transparent huge pages.
#![allow(clippy::unwrap_used)]

mod common;

use rustix::thread::{sched_getaffinity, sched_setaffinity, CpuSet};

fn cpus(mask: &CpuSet) -> Vec<usize> {
    (0..CpuSet::MAX_CPU)
        .filter(|&cpu| mask.is_set(cpu))
        .collect()
}

/// `Cpus_allowed_list` of every thread of `pid` whose name starts with `prefix`.
fn allowed_lists(pid: u32, prefix: &str) -> Vec<String> {
    let mut lists = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let task = task.unwrap().path();
        let Ok(name) = std::fs::read_to_string(task.join("comm")) else {
            continue;
        };
        if !name.starts_with(prefix) {
            continue;
        }
        let status = std::fs::read_to_string(task.join("status")).unwrap();
        let list = status
            .lines()
            .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
            .unwrap()
            .trim()
            .to_owned();
        lists.push(list);
    }
    lists
}

#[test]
fn a_core_runs_on_the_cpu_it_was_given_not_on_cpu_0() {
    let mine = sched_getaffinity(None).unwrap();
    let given = cpus(&mine);
    let Some(&last) = given.last().filter(|&&cpu| cpu != 0) else {
        panic!("this test needs a CPU besides CPU 0 to give the server (CI has two)");
    };
    // The server inherits the mask of the thread that starts it.
    let mut only = CpuSet::new();
    only.set(last);
    sched_setaffinity(None, &only).unwrap();
    let server = common::Server::start(&["--cores", "1"]);
    sched_setaffinity(None, &mine).unwrap();

    let pid = server.child.id();
    let lists = allowed_lists(pid, "postern-core-0");
    // The core's thread and its blocking pool's.
    assert!(lists.len() >= 2, "threads of core 0: {lists:?}");
    assert!(
        lists.iter().all(|list| *list == last.to_string()),
        "core 0's threads may run on {lists:?}, the process was given CPU {last} alone"
    );
    // And it serves there.
    let mut client = server.connect();
    assert!(client.line().starts_with("220 "));
    assert!(client.cmd("EHLO t").starts_with("250"));
    client.cmd("QUIT");
}

#[test]
fn without_sysfs_the_cores_start_unpinned_and_say_why() {
    // Pinning reads the CPU topology from /sys; a chroot or a container may have none. Here
    // /sys is hidden under an empty tmpfs in a mount namespace of the server's own: it starts,
    // says its cores are not pinned, and takes mail.
    let server = common::Server::start_via(
        &[
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            "mount -t tmpfs none /sys && exec \"$0\" \"$@\"",
        ],
        &["--cores", "1"],
    );
    let warned = server.log_until(|l| l.contains("cannot read the CPU topology"));
    assert!(warned.contains("not pinned"), "{warned}");
    let mut c = server.connect();
    assert!(c.line().starts_with("220 "));
    assert!(c.cmd("EHLO client.test").starts_with("250"));
    assert!(c.cmd("QUIT").starts_with("221"));
}

#[test]
fn the_server_runs_without_transparent_huge_pages() {
    // A 2 MiB page zeroed at its first touch stalls the core that touches it: postern turns
    // them off for itself, whatever the system's setting (the kernel shows it from 5.0 on).
    // Only where this test's own process has them: a kernel without them, or a parent that
    // turned them off (the setting is inherited), shows 0 whatever postern does.
    if thp_enabled(std::process::id()).as_deref() != Some("1") {
        eprintln!("transparent huge pages are off for this test already: nothing to check");
        return;
    }
    let server = common::Server::start(&["--cores", "1"]);
    let status = std::fs::read_to_string(format!("/proc/{}/status", server.child.id())).unwrap();
    let thp = status
        .lines()
        .find_map(|l| l.strip_prefix("THP_enabled:"))
        .map(str::trim);
    assert_eq!(thp, Some("0"), "{status}");
}

/// The `THP_enabled` line of process `pid`'s status (absent before Linux 5.0).
fn thp_enabled(pid: u32) -> Option<String> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("THP_enabled:"))
        .map(|v| v.trim().to_owned())
}
