//! The host's TSC frequency, for the guest's `tsc_early_khz=`: under TCG the guest's own
//! calibration against the emulated PIT sometimes fails and the boot hangs.

use std::fs;
use std::io::Read;
use std::os::unix::fs::OpenOptionsExt;

/// The host TSC frequency in kHz, read at run time: from sysfs when the kernel exports it,
/// else from the kernel log's calibration lines, else from `/proc/cpuinfo`'s "cpu MHz".
/// Read once per process: the TSC frequency does not change while the host runs.
pub fn host_tsc_khz() -> Option<u64> {
    static KHZ: std::sync::OnceLock<Option<u64>> = std::sync::OnceLock::new();
    *KHZ.get_or_init(read_host_tsc_khz)
}

fn read_host_tsc_khz() -> Option<u64> {
    sysfs_khz()
        .or_else(|| kernel_log().as_deref().and_then(parse_kernel_log))
        .or_else(|| {
            fs::read_to_string("/proc/cpuinfo")
                .ok()
                .as_deref()
                .and_then(parse_cpuinfo)
        })
}

fn sysfs_khz() -> Option<u64> {
    let text = fs::read_to_string("/sys/devices/system/cpu/cpu0/tsc_freq_khz").ok()?;
    text.trim().parse().ok().filter(|&k| k > 0)
}

/// The kernel log from `/dev/kmsg` (readable by root, or anyone when `dmesg_restrict=0`).
fn kernel_log() -> Option<String> {
    let mut file = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc_o_nonblock())
        .open("/dev/kmsg")
        .ok()?;
    let mut log = String::new();
    let mut record = vec![0u8; 8192];
    // One record per read; EAGAIN at the end; EPIPE when a record was overwritten.
    for _ in 0..100_000 {
        match file.read(&mut record) {
            Ok(0) => break,
            Ok(n) => {
                log.push_str(&String::from_utf8_lossy(&record[..n]));
                log.push('\n');
            }
            Err(e) if e.raw_os_error() == Some(nix::errno::Errno::EPIPE as i32) => continue,
            Err(_) => break,
        }
    }
    Some(log)
}

fn libc_o_nonblock() -> i32 {
    nix::fcntl::OFlag::O_NONBLOCK.bits()
}

/// The refined calibration if the log has it, else the first estimate.
fn parse_kernel_log(log: &str) -> Option<u64> {
    let mhz_after = |marker: &str| {
        log.lines().rev().find_map(|line| {
            let rest = &line[line.find(marker)? + marker.len()..];
            let number = rest.split_whitespace().next()?;
            mhz_to_khz(number)
        })
    };
    mhz_after("tsc: Refined TSC clocksource calibration:").or_else(|| mhz_after("tsc: Detected"))
}

fn parse_cpuinfo(cpuinfo: &str) -> Option<u64> {
    cpuinfo.lines().find_map(|line| {
        let (key, value) = line.split_once(':')?;
        if key.trim() != "cpu MHz" {
            return None;
        }
        mhz_to_khz(value.trim())
    })
}

/// "2596.144" -> 2596144, without floating point rounding surprises.
fn mhz_to_khz(text: &str) -> Option<u64> {
    let (whole, frac) = text.split_once('.').unwrap_or((text, ""));
    let whole: u64 = whole.parse().ok()?;
    let mut frac3: String = frac.chars().take(3).collect();
    if !frac3.chars().all(|c| c.is_ascii_digit()) {
        return None;
    }
    while frac3.len() < 3 {
        frac3.push('0');
    }
    let khz = whole.checked_mul(1000)?.checked_add(frac3.parse().ok()?)?;
    (khz > 0).then_some(khz)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_sources() {
        assert_eq!(mhz_to_khz("2596.144"), Some(2_596_144));
        assert_eq!(mhz_to_khz("2200"), Some(2_200_000));
        assert_eq!(mhz_to_khz("2200.5"), Some(2_200_500));
        assert_eq!(mhz_to_khz("abc"), None);
        let log = "6,100,59,-;tsc: Detected 2596.144 MHz processor\n\
                   6,300,1000,-;tsc: Refined TSC clocksource calibration: 2596.101 MHz\n";
        assert_eq!(parse_kernel_log(log), Some(2_596_101));
        assert_eq!(
            parse_kernel_log("6,100,59,-;tsc: Detected 2596.144 MHz processor\n"),
            Some(2_596_144)
        );
        assert_eq!(
            parse_cpuinfo("processor\t: 0\ncpu MHz\t\t: 2596.144\n"),
            Some(2_596_144)
        );
    }

    #[test]
    fn host_has_a_tsc_frequency() {
        let khz = host_tsc_khz().expect("an x86_64 Linux host reports its TSC frequency");
        assert!(
            (100_000..10_000_000).contains(&khz),
            "{khz} kHz is implausible"
        );
        eprintln!("host TSC: {khz} kHz");
    }
}
