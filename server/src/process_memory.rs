//! Resident memory of this process, read from `/proc/self/status` (Linux). Used by benchmarks
//! and metrics; `None` where the file or field is unavailable.

fn status_kib(field: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status
        .lines()
        .find_map(|line| line.strip_prefix(field)?.trim().strip_suffix("kB"))
        .and_then(|kib| kib.trim().parse().ok())
}

/// Current resident set size in bytes (`VmRSS`).
pub fn resident_bytes() -> Option<u64> {
    status_kib("VmRSS:").map(|kib| kib * 1024)
}

/// Peak resident set size in bytes since the process started (`VmHWM`).
pub fn peak_resident_bytes() -> Option<u64> {
    status_kib("VmHWM:").map(|kib| kib * 1024)
}

#[cfg(test)]
mod tests {
    #[test]
    fn reads_nonzero_memory_and_peak_is_at_least_current() {
        let current = super::resident_bytes().expect("VmRSS on Linux");
        let peak = super::peak_resident_bytes().expect("VmHWM on Linux");
        assert!(current > 0 && peak >= current);
    }
}
