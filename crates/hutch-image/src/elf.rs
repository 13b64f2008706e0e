//! Just enough ELF reading to tell whether a program can run in the guest before switch_root:
//! x86_64, and static (no program interpreter, since the initramfs has no dynamic loader).

/// What an executable file is, as far as the guest is concerned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Executable {
    /// An x86_64 ELF without a program interpreter.
    StaticElf,
    /// A `#!` script; it runs after switch_root only if its interpreter exists in the rootfs.
    Script { interpreter: String },
}

const PT_INTERP: u32 = 3;
const EM_X86_64: u16 = 62;
const ET_EXEC: u16 = 2;
const ET_DYN: u16 = 3;

/// Classifies `bytes` (a whole file); the error says what is wrong with it.
pub(crate) fn inspect(bytes: &[u8]) -> Result<Executable, String> {
    if let Some(rest) = bytes.strip_prefix(b"#!") {
        let line = rest.split(|b| *b == b'\n').next().unwrap_or_default();
        let interpreter = String::from_utf8_lossy(line).trim().to_owned();
        if interpreter.is_empty() {
            return Err("a `#!` line without an interpreter".into());
        }
        return Ok(Executable::Script { interpreter });
    }
    if !bytes.starts_with(b"\x7fELF") {
        return Err("not an ELF executable nor a `#!` script".into());
    }
    // e_ident: class 2 = 64-bit, data 1 = little endian.
    if bytes.get(4) != Some(&2) || bytes.get(5) != Some(&1) {
        return Err("not a 64-bit little-endian ELF; build it for x86_64".into());
    }
    let e_type = u16_at(bytes, 16).ok_or("truncated ELF header")?;
    let e_machine = u16_at(bytes, 18).ok_or("truncated ELF header")?;
    if e_machine != EM_X86_64 {
        return Err(format!(
            "ELF machine {e_machine} is not x86_64; build it for x86_64-unknown-linux-musl"
        ));
    }
    if e_type != ET_EXEC && e_type != ET_DYN {
        return Err("an ELF object that is not an executable".into());
    }
    let phoff = u64_at(bytes, 32).ok_or("truncated ELF header")?;
    let phentsize = u16_at(bytes, 54).ok_or("truncated ELF header")?;
    let phnum = u16_at(bytes, 56).ok_or("truncated ELF header")?;
    for i in 0..u64::from(phnum) {
        let at = phoff
            .checked_add(i * u64::from(phentsize))
            .and_then(|v| usize::try_from(v).ok())
            .ok_or("ELF program header offset out of range")?;
        let p_type = u32_at(bytes, at).ok_or("truncated ELF program headers")?;
        if p_type == PT_INTERP {
            return Err(
                "dynamically linked (it names a program interpreter), but the initramfs has no \
                 dynamic loader; link it statically (e.g. --target x86_64-unknown-linux-musl)"
                    .into(),
            );
        }
    }
    Ok(Executable::StaticElf)
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn u64_at(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_static_busybox_is_static() {
        let Ok(bytes) = std::fs::read("/bin/busybox") else {
            eprintln!("SKIP: /bin/busybox absent (apt-get install busybox-static)");
            return;
        };
        assert_eq!(inspect(&bytes), Ok(Executable::StaticElf));
    }

    #[test]
    fn host_ls_is_dynamic() {
        let bytes = std::fs::read("/bin/ls").expect("/bin/ls exists on Debian");
        let err = inspect(&bytes).expect_err("ls is dynamically linked");
        assert!(err.contains("dynamically linked"), "{err}");
    }

    #[test]
    fn scripts_and_junk() {
        assert_eq!(
            inspect(b"#!/bin/sh -e\necho hi\n"),
            Ok(Executable::Script {
                interpreter: "/bin/sh -e".into()
            })
        );
        assert!(inspect(b"#!\n").is_err());
        assert!(inspect(b"hello").is_err());
        assert!(inspect(b"\x7fELF\x02\x01").is_err());
    }
}
