//! Applying the per-sandbox identity the host sends after each handshake: clock, entropy, hostname, base env.
//! A restored snapshot shares its RNG state with every sibling until this runs, so it reseeds the CRNG at once.

use std::os::fd::AsRawFd;

use hutch_proto::Identity;

use crate::serve::State;

// From <linux/random.h>: _IOW('R', 0x03, int[2]) and _IO('R', 0x07).
const RNDADDENTROPY: libc::c_ulong = 0x4008_5203;
const RNDRESEEDCRNG: libc::c_ulong = 0x5207;

pub fn apply(id: &Identity, state: &State) -> Result<(), String> {
    let in_vm = std::process::id() != 1 && std::env::var_os("HUTCH_AGENT_TEST").is_some();
    if !in_vm {
        set_clock(id.time_secs, id.time_nanos)?;
        seed_entropy(&id.entropy)?;
        nix::unistd::sethostname(&id.hostname).map_err(|e| format!("cannot set hostname: {e}"))?;
    }
    let mut env = vec![
        ("PATH".to_string(), "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".to_string()),
        ("HOME".to_string(), "/root".to_string()),
        ("LANG".to_string(), "C.UTF-8".to_string()),
        ("HOSTNAME".to_string(), id.hostname.clone()),
        ("HUTCH_SANDBOX_ID".to_string(), id.sandbox_id.clone()),
    ];
    env.extend(id.env.iter().cloned());
    if let Some(pem) = &id.ca_pem {
        if !in_vm {
            install_ca(pem)?;
        }
    }
    match state.env.lock() {
        Ok(mut e) => *e = env,
        Err(poisoned) => *poisoned.into_inner() = env,
    }
    state.exit_on_disconnect.store(id.exit_on_disconnect, std::sync::atomic::Ordering::SeqCst);
    Ok(())
}

/// Where the sandbox's gateway CA goes: its own file (NODE_EXTRA_CA_CERTS) and the system bundle that curl,
/// git, python and OpenSSL read.
pub const CA_FILE: &str = "/etc/hutch/ca.crt";
pub const CA_DIR: &str = "/etc/hutch";
pub const SYSTEM_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";

fn install_ca(pem: &str) -> Result<(), String> {
    use std::io::Write;
    std::fs::create_dir_all(CA_DIR).map_err(|e| format!("cannot create {CA_DIR}: {e}"))?;
    std::fs::write(CA_FILE, pem).map_err(|e| format!("cannot write {CA_FILE}: {e}"))?;
    let mut bundle = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .open(SYSTEM_BUNDLE)
        .map_err(|e| format!("cannot open {SYSTEM_BUNDLE}: {e}"))?;
    bundle.write_all(format!("\n{pem}\n").as_bytes()).map_err(|e| format!("cannot extend {SYSTEM_BUNDLE}: {e}"))
}

/// Undoes [`install_ca`]: the sandbox CA leaves `/etc/hutch` and the system bundle (before an environment
/// snapshot, whose later sandboxes each bring their own CA).
/// Only that certificate goes: what a setup script added to the bundle stays, as it would for the command.
pub fn forget_ca() {
    let Ok(pem) = std::fs::read_to_string(CA_FILE) else { return };
    if let Ok(bundle) = std::fs::read_to_string(SYSTEM_BUNDLE) {
        let block = format!("\n{pem}\n");
        if let Some(at) = bundle.rfind(&block) {
            let mut kept = bundle[..at].to_string();
            kept.push_str(&bundle[at + block.len()..]);
            let _ = std::fs::write(SYSTEM_BUNDLE, kept);
        }
    }
    let _ = std::fs::remove_file(CA_FILE);
}

fn set_clock(secs: i64, nanos: u32) -> Result<(), String> {
    let ts = nix::sys::time::TimeSpec::new(secs, i64::from(nanos));
    nix::time::clock_settime(nix::time::ClockId::CLOCK_REALTIME, ts).map_err(|e| format!("cannot set the clock: {e}"))
}

fn seed_entropy(seed: &[u8]) -> Result<(), String> {
    if seed.is_empty() {
        return Err("no entropy in identity".into());
    }
    let f = std::fs::OpenOptions::new().write(true).open("/dev/urandom").map_err(|e| format!("cannot open /dev/urandom: {e}"))?;
    // struct rand_pool_info { int entropy_count; int buf_size; __u32 buf[]; }
    let mut info = Vec::with_capacity(8 + seed.len() + 3);
    info.extend_from_slice(&((seed.len() * 8) as i32).to_ne_bytes());
    info.extend_from_slice(&(seed.len() as i32).to_ne_bytes());
    info.extend_from_slice(seed);
    info.resize(8 + seed.len().div_ceil(4) * 4, 0);
    // SAFETY: `info` is a valid rand_pool_info: header followed by `buf_size` bytes, alive for the call.
    let r = unsafe { libc::ioctl(f.as_raw_fd(), RNDADDENTROPY as _, info.as_ptr()) };
    if r != 0 {
        return Err(format!("RNDADDENTROPY failed: {}", std::io::Error::last_os_error()));
    }
    // SAFETY: RNDRESEEDCRNG takes no argument.
    let r = unsafe { libc::ioctl(f.as_raw_fd(), RNDRESEEDCRNG as _) };
    if r != 0 {
        return Err(format!("RNDRESEEDCRNG failed: {}", std::io::Error::last_os_error()));
    }
    Ok(())
}
