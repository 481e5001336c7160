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
