//! PID 1 inside the VM: mounts the API filesystems, brings up loopback, then forks the agent and reaps every
//! orphan; when the agent ends, the VM powers off.

use std::time::Duration;

use nix::mount::{mount, MsFlags};
use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::{fork, ForkResult, Pid};

pub fn run() -> i32 {
    setup_filesystems();
    if let Err(e) = loopback_up() {
        eprintln!("hutch-agent: cannot bring up lo: {e}");
    }
    let _ = nix::unistd::sethostname("hutch");
    let mut respawned = false;
    loop {
        // SAFETY: PID 1 never builds a runtime or starts a thread (the agent runs only in the child), so it is
        // single-threaded at every fork.
        match unsafe { fork() } {
            Ok(ForkResult::Child) => std::process::exit(agent_main(respawned)),
            Ok(ForkResult::Parent { child }) => reap_until(child),
            Err(e) => {
                eprintln!("hutch-agent: fork failed: {e}");
                power_off()
            }
        }
        respawned = true;
    }
}

/// The agent's exit code that asks PID 1 for a fresh agent instead of a power-off ([`hutch_proto::Request::Respawn`]).
pub const RESPAWN_CODE: i32 = 75;

fn setup_filesystems() {
    let nosuid_nodev_noexec = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    let mounts: [(&str, &str, &str, MsFlags, Option<&str>); 6] = [
        ("proc", "/proc", "proc", nosuid_nodev_noexec, None),
        ("sysfs", "/sys", "sysfs", nosuid_nodev_noexec, None),
        ("devtmpfs", "/dev", "devtmpfs", MsFlags::MS_NOSUID, Some("mode=0755")),
        ("devpts", "/dev/pts", "devpts", MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC, Some("gid=5,mode=620,ptmxmode=666")),
        ("tmpfs", "/dev/shm", "tmpfs", MsFlags::MS_NOSUID | MsFlags::MS_NODEV, None),
        ("tmpfs", "/tmp", "tmpfs", MsFlags::MS_NOSUID | MsFlags::MS_NODEV, Some("mode=1777")),
    ];
    for (src, target, fstype, flags, data) in mounts {
        let _ = std::fs::create_dir_all(target);
        match mount(Some(src), target, Some(fstype), flags, data) {
            Ok(()) | Err(nix::errno::Errno::EBUSY) => {}
            Err(e) => eprintln!("hutch-agent: mount {target}: {e}"),
        }
    }
    let _ = std::os::unix::fs::symlink("/proc/self/fd", "/dev/fd");
    if let Err(e) = trust_store_in_memory() {
        eprintln!("hutch-agent: trust store: {e}");
    }
}

/// Moves the system trust store (`/etc/ssl/certs`) and `/etc/hutch` onto tmpfs, before any snapshot is taken.
/// Each sandbox's gateway CA is appended there after restore: a write to tmpfs costs a few milliseconds under
/// TCG where the same write through ext4 and the block layer cost 40-60 ms on a cold translation cache, and the
/// per-sandbox certificate never reaches the disk layer. A whole directory (not a file) is mounted so that
/// `update-ca-certificates` can still replace the bundle by rename.
fn trust_store_in_memory() -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    const CERTS: &str = "/etc/ssl/certs";
    enum Entry {
        Link(std::path::PathBuf),
        File(Vec<u8>, u32),
    }
    let mut entries = Vec::new();
    if let Ok(dir) = std::fs::read_dir(CERTS) {
        for e in dir.flatten() {
            let ty = e.file_type()?;
            if ty.is_symlink() {
                entries.push((e.file_name(), Entry::Link(std::fs::read_link(e.path())?)));
            } else if ty.is_file() {
                let mode = e.metadata()?.permissions().mode() & 0o7777;
                entries.push((e.file_name(), Entry::File(std::fs::read(e.path())?, mode)));
            }
        }
    }
    for dir in [CERTS, crate::identity::CA_DIR] {
        std::fs::create_dir_all(dir)?;
        mount(Some("tmpfs"), dir, Some("tmpfs"), MsFlags::MS_NOSUID | MsFlags::MS_NODEV, Some("mode=0755")).map_err(std::io::Error::from)?;
    }
    let base = std::path::Path::new(CERTS);

    for (name, entry) in entries {
        match entry {
            Entry::Link(target) => std::os::unix::fs::symlink(target, base.join(name))?,
            Entry::File(bytes, mode) => {
                std::fs::write(base.join(&name), bytes)?;
                std::fs::set_permissions(base.join(name), std::fs::Permissions::from_mode(mode))?;
            }
        }
    }
    Ok(())
}

fn loopback_up() -> std::io::Result<()> {
    // SAFETY: plain socket(2) call; the fd is closed below.
    let sock = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if sock < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: ifreq is plain old data; all-zero is a valid value.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in ifr.ifr_name.iter_mut().zip(b"lo\0") {
        *dst = *src as libc::c_char;
    }
    // SAFETY: `ifr` is a valid ifreq naming an interface; the kernel fills/reads ifru_flags.
    let r = unsafe {
        let mut r = libc::ioctl(sock, libc::SIOCGIFFLAGS, &mut ifr);
        if r == 0 {
            ifr.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
            r = libc::ioctl(sock, libc::SIOCSIFFLAGS, &ifr);
        }
        r
    };
    let err = std::io::Error::last_os_error();
    // SAFETY: `sock` is our open fd.
    unsafe { libc::close(sock) };
    if r != 0 {
        return Err(err);
    }
    Ok(())
}

/// Reaps orphans until the agent ends: then powers off, or returns when the agent asked to be started again.
fn reap_until(agent: Pid) {
    loop {
        match waitpid(None, None) {
            Ok(WaitStatus::Exited(pid, RESPAWN_CODE)) if pid == agent => return,
            Ok(WaitStatus::Exited(pid, _)) | Ok(WaitStatus::Signaled(pid, _, _)) if pid == agent => power_off(),
            Ok(_) => {}
            Err(nix::errno::Errno::ECHILD) => power_off(),
            Err(_) => std::thread::sleep(Duration::from_millis(10)),
        }
    }
}

fn power_off() -> ! {
    nix::unistd::sync();
    let _ = nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_POWER_OFF);
    // reboot(2) only returns on failure; PID 1 must not exit normally (the kernel would panic, which with
    // panic=-1 also ends the VM, just less tidily).
    std::process::exit(1)
}

/// Zeroes the guest's free memory, before an environment snapshot: the previous agent and the processes of the
/// ended phase freed their pages without clearing them, and those pages held the old identity's environment and
/// requests (placeholders included). The kernel hands anonymous memory out zeroed, so taking (almost) every free
/// page once and giving it back leaves zeros behind; the page cache and live processes are untouched.
fn scrub_free_memory() {
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let free_kib: usize = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemFree:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    // A margin above the kernel's watermarks: the point is to recycle free pages, not to push out the page cache.
    let len = free_kib.saturating_sub(32 * 1024) * 1024;
    if len == 0 {
        return;
    }
    // SAFETY: an anonymous private mapping of `len` bytes at an address the kernel chooses; nothing aliases it,
    // and it is unmapped below before anything could use it.
    unsafe {
        let p = libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_POPULATE | libc::MAP_NORESERVE,
            -1,
            0,
        );
        if p != libc::MAP_FAILED {
            libc::munmap(p, len);
        }
    }
}

fn agent_main(respawned: bool) -> i32 {
    // The blocking pool's thread is made before the first `Ready` and kept: a VM restored from a snapshot then
    // finds it running instead of creating one (thread creation is cold kernel code under emulation).
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().thread_keep_alive(Duration::from_secs(24 * 3600)).build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("hutch-agent: cannot start runtime: {e}");
            return 1;
        }
    };
    if respawned {
        scrub_free_memory();
    }
    rt.block_on(async {
        let path = match crate::port::find(hutch_proto::AGENT_PORT_NAME, Duration::from_secs(10)) {
            Ok(p) => p,
            Err(e) => {
                eprintln!("hutch-agent: {e}");
                return 1;
            }
        };
        let port = match crate::port::Port::open(&path) {
            Ok(p) => p,
            Err(e) => {
                eprintln!("hutch-agent: cannot open {}: {e}", path.display());
                return 1;
            }
        };
        // Before the first `Ready`, so that a snapshot holds it: the workspace drive found and opened, the
        // overlay's directories made.
        let _ = tokio::task::spawn_blocking(crate::workspace::prepare).await;
        let state = crate::serve::State::default();
        // Routes and nft rules live in the kernel: a respawned agent finds them in place.
        if !respawned {
            crate::net::setup_routing();
        }
        if let Err(e) = crate::net::start(state.session.clone()).await {
            eprintln!("hutch-agent: egress listeners: {e}");
        }
        let mut announce = true;
        loop {
            match crate::serve::session(port.clone(), &state, announce).await {
                // Saved to disk by the host, which comes back with a `Hello` after it announced us again.
                Ok(crate::serve::Ended::Suspended) => announce = true,
                Ok(_) if state.exit_on_disconnect.load(std::sync::atomic::Ordering::SeqCst) => return 0,
                Ok(_) => announce = false,
                // The host side is closed (between a snapshot and its restore, or before a host attaches):
                // reads return EOF until one connects.
                Err(_) => tokio::time::sleep(Duration::from_millis(2)).await,
            }
        }
    })
}
