//! CPU time and memory of this process's threads, from `/proc` (Linux). The load generator runs
//! the local verifiers on their own runtime with named threads, so the CPU those threads burn is
//! the servers' cost alone, not the client's.

use std::fs;

/// Nanoseconds of CPU the threads whose name starts with `prefix` have used so far.
/// `None` where `/proc` is not available.
pub fn threads_cpu_ns(prefix: &str) -> Option<u64> {
    let mut total = 0;
    for task in fs::read_dir("/proc/self/task").ok()?.flatten() {
        let dir = task.path();
        let Ok(comm) = fs::read_to_string(dir.join("comm")) else {
            continue;
        };
        if comm.trim_end().starts_with(prefix) {
            total += task_cpu_ns(&dir.to_string_lossy()).unwrap_or(0);
        }
    }
    Some(total)
}

/// Nanoseconds of CPU the calling thread has used so far.
pub fn this_thread_cpu_ns() -> Option<u64> {
    task_cpu_ns("/proc/thread-self")
}

/// `schedstat`'s first field (ns on the CPU); `stat`'s utime+stime (clock ticks) as a fallback.
fn task_cpu_ns(dir: &str) -> Option<u64> {
    if let Ok(s) = fs::read_to_string(format!("{dir}/schedstat"))
        && let Some(ns) = s.split_whitespace().next().and_then(|v| v.parse().ok())
    {
        return Some(ns);
    }
    let stat = fs::read_to_string(format!("{dir}/stat")).ok()?;
    // Fields after the parenthesised command name; utime and stime are the 12th and 13th.
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    Some(ticks * 10_000_000)
}

/// Resident memory of this process in bytes.
pub fn rss_bytes() -> Option<u64> {
    let status = fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// CPU and memory of another process (a server the load generator started, or
/// one it was told the pid of), from `/proc/<pid>` (Linux).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ProcessSample {
    /// User + system CPU of every thread the process has had, reaped ones included
    /// (`stat`'s utime + stime; clock-tick resolution, 10 ms).
    pub cpu_ns: u64,
    /// Resident memory (`VmRSS`).
    pub rss_bytes: u64,
}

/// Clock ticks per second of `stat`'s CPU times: 100 on every Linux build that matters
/// (`USER_HZ`, fixed by the kernel ABI whatever the kernel's own tick rate).
const USER_HZ: u64 = 100;

/// A sample of process `pid` now; `None` when it is gone or `/proc` is not readable.
pub fn process_sample(pid: u32) -> Option<ProcessSample> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let rss_kib: u64 = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    Some(ProcessSample {
        cpu_ns: ticks * (1_000_000_000 / USER_HZ),
        rss_bytes: rss_kib * 1024,
    })
}

impl ProcessSample {
    /// The sum of several processes' samples (a tier of relays).
    pub fn sum(samples: impl IntoIterator<Item = ProcessSample>) -> ProcessSample {
        samples
            .into_iter()
            .fold(ProcessSample::default(), |a, b| ProcessSample {
                cpu_ns: a.cpu_ns + b.cpu_ns,
                rss_bytes: a.rss_bytes + b.rss_bytes,
            })
    }
}
