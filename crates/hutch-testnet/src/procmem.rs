//! Searching a live process's readable memory (secret-leak checks of QEMU in the egress tests).

/// Which of `needles` occur anywhere in the readable memory of process `pid`, and how many bytes
/// were read.
pub fn process_memory_contains(pid: u32, needles: &[&str]) -> (Vec<bool>, u64) {
    use std::io::{Read, Seek, SeekFrom};
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).expect("maps");
    let mut mem = std::fs::File::open(format!("/proc/{pid}/mem")).expect("open process memory");
    let finders: Vec<memchr::memmem::Finder> = needles
        .iter()
        .map(|n| memchr::memmem::Finder::new(n.as_bytes()))
        .collect();
    let overlap = needles.iter().map(|n| n.len()).max().unwrap_or(1);
    let mut found = vec![false; needles.len()];
    let mut buf = vec![0u8; 64 << 20];
    let mut total = 0u64;
    for line in maps.lines() {
        let mut f = line.split_whitespace();
        let (Some(range), Some(perms)) = (f.next(), f.next()) else {
            continue;
        };
        if !perms.starts_with('r') || line.ends_with("[vvar]") || line.ends_with("[vsyscall]") {
            continue;
        }
        let (lo, hi) = range.split_once('-').expect("range");
        let (lo, hi) = (
            u64::from_str_radix(lo, 16).expect("lo"),
            u64::from_str_radix(hi, 16).expect("hi"),
        );
        let mut at = lo;
        while at < hi {
            let len = ((hi - at) as usize).min(buf.len());
            if mem.seek(SeekFrom::Start(at)).is_err() {
                break;
            }
            let Ok(n) = mem.read(&mut buf[..len]) else {
                break;
            };
            if n == 0 {
                break;
            }
            total += n as u64;
            for (i, f) in finders.iter().enumerate() {
                found[i] |= f.find(&buf[..n]).is_some();
            }
            at += if n as u64 >= hi - at {
                n as u64
            } else {
                (n - overlap.min(n - 1)) as u64
            };
        }
    }
    (found, total)
}
