//! Whether an ordinary user could build a root filesystem on this host: mmdebstrap's unshare mode needs user
//! namespaces, the setuid `newuidmap`/`newgidmap` of Debian's `uidmap` and a subordinate id range for the user,
//! and `mkfs.ext4 -d` must then run inside that namespace to record root ownership. `hutch doctor` reports it.

use std::path::Path;

/// One thing the host lacks for a rootless build, with what to do about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Missing {
    pub what: String,
    pub fix: String,
}

/// What stands in the way of a rootless build for `user` (name and uid) below `root` (`/` on a real host; a
/// parameter so that tests can use a fake tree). Empty: the host allows it.
pub fn rootless_build_blockers(root: &Path, user: &str, uid: u32) -> Vec<Missing> {
    let mut missing = Vec::new();
    let read = |rel: &str| std::fs::read_to_string(root.join(rel)).ok();
    let number = |rel: &str| read(rel).and_then(|s| s.trim().parse::<i64>().ok());
    if number("proc/sys/user/max_user_namespaces") == Some(0) {
        missing.push(Missing {
            what: "user namespaces are disabled (user.max_user_namespaces = 0)".into(),
            fix: "sysctl -w user.max_user_namespaces=15000".into(),
        });
    }
    if number("proc/sys/kernel/unprivileged_userns_clone") == Some(0) {
        missing.push(Missing {
            what: "unprivileged user namespaces are disabled (kernel.unprivileged_userns_clone = 0)".into(),
            fix: "sysctl -w kernel.unprivileged_userns_clone=1".into(),
        });
    }
    if number("proc/sys/kernel/apparmor_restrict_unprivileged_userns") == Some(1) {
        missing.push(Missing {
            what: "AppArmor restricts unprivileged user namespaces (kernel.apparmor_restrict_unprivileged_userns = 1)"
                .into(),
            fix: "sysctl -w kernel.apparmor_restrict_unprivileged_userns=0, or an AppArmor profile for mmdebstrap".into(),
        });
    }
    for tool in ["newuidmap", "newgidmap"] {
        let found = ["usr/bin", "bin", "usr/sbin", "sbin"].iter().map(|d| root.join(d).join(tool)).find(|p| p.is_file());
        match found {
            None => missing.push(Missing { what: format!("{tool} is not installed"), fix: "apt-get install uidmap".into() }),
            Some(p) => {
                use std::os::unix::fs::MetadataExt;
                let setuid = std::fs::metadata(&p).map(|m| m.mode() & 0o4000 != 0 && m.uid() == 0).unwrap_or(false);
                if !setuid {
                    missing.push(Missing {
                        what: format!("{} is not setuid root", p.display()),
                        fix: "apt-get install --reinstall uidmap".into(),
                    });
                }
            }
        }
    }
    for (file, flag) in [("etc/subuid", "--add-subuids"), ("etc/subgid", "--add-subgids")] {
        if !has_subordinate_range(read(file).as_deref().unwrap_or(""), user, uid) {
            missing.push(Missing {
                what: format!("/{file} gives {user} no range of 65536 ids"),
                fix: format!("usermod {flag} 100000-165535 {user} (as root; pick a range no other user has)"),
            });
        }
    }
    if !["usr/bin/mmdebstrap", "bin/mmdebstrap"].iter().any(|p| root.join(p).is_file()) {
        missing.push(Missing { what: "mmdebstrap is not installed".into(), fix: "apt-get install mmdebstrap".into() });
    }
    missing
}

/// Whether a `/etc/subuid`-style text gives `user` (by name or uid) a range of at least 65536 ids.
fn has_subordinate_range(text: &str, user: &str, uid: u32) -> bool {
    text.lines().any(|line| {
        let mut f = line.trim().split(':');
        let (Some(who), Some(_start), Some(count)) = (f.next(), f.next(), f.next()) else {
            return false;
        };
        (who == user || who == uid.to_string()) && count.trim().parse::<u64>().is_ok_and(|c| c >= 65536)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subordinate_ranges_are_matched_by_name_or_uid_and_size() {
        let text = "alice:100000:65536\n1001:200000:65536\nsmall:300000:1000\n";
        assert!(has_subordinate_range(text, "alice", 1000));
        assert!(has_subordinate_range(text, "bob", 1001));
        assert!(!has_subordinate_range(text, "small", 1002));
        assert!(!has_subordinate_range(text, "carol", 1003));
    }

    #[test]
    fn a_bare_host_lists_every_blocker_with_a_fix() {
        let t = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir_all(t.path().join("proc/sys/user")).expect("mkdir");
        std::fs::write(t.path().join("proc/sys/user/max_user_namespaces"), "0\n").expect("write");
        let missing = rootless_build_blockers(t.path(), "alice", 1000);
        let text: Vec<String> = missing.iter().map(|m| format!("{} -> {}", m.what, m.fix)).collect();
        for needle in ["max_user_namespaces", "newuidmap", "newgidmap", "/etc/subuid", "/etc/subgid", "mmdebstrap"] {
            assert!(text.iter().any(|l| l.contains(needle)), "{needle} in {text:?}");
        }
        assert!(missing.iter().all(|m| !m.fix.is_empty()));
    }
}
