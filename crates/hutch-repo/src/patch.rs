//! A patch from the VM (or one stored for `apply`), parsed before git ever sees it: strictly the format
//! `git diff --binary` writes, every file section's paths checked, each path's sensitivity classified. The
//! result is what `apply` decides on; git's own reading of the same bytes is compared against it.

use std::fmt;

use crate::path::{check_path, show, PathProblem};
use crate::sensitive::{classify, SensitiveKind};

/// One file's section of a patch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FilePatch {
    /// `None` for a created file.
    pub old: Option<Vec<u8>>,
    /// `None` for a deleted file.
    pub new: Option<Vec<u8>>,
    pub old_mode: Option<u32>,
    pub new_mode: Option<u32>,
    pub binary: bool,
}

impl FilePatch {
    /// Every path this section touches (both sides of a rename).
    pub fn paths(&self) -> impl Iterator<Item = &[u8]> {
        let old = self.old.as_deref();
        let new = self.new.as_deref().filter(|n| Some(*n) != old);
        old.into_iter().chain(new)
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Patch {
    pub files: Vec<FilePatch>,
}

/// A path a patch changes that can run code later on the host.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Sensitive {
    pub path: String,
    pub kind: SensitiveKind,
}

impl Patch {
    pub fn is_empty(&self) -> bool {
        self.files.is_empty()
    }

    /// The sensitive paths among those changed, in patch order (shown escaped).
    pub fn sensitive(&self) -> Vec<Sensitive> {
        let mut out: Vec<Sensitive> = vec![];
        for p in self.files.iter().flat_map(|f| f.paths()) {
            if let Some(kind) = classify(p) {
                let path = show(p);
                if !out.iter().any(|s| s.path == path) {
                    out.push(Sensitive { path, kind });
                }
            }
        }
        out
    }

    /// All changed paths, sorted, each once.
    pub fn all_paths(&self) -> Vec<Vec<u8>> {
        let mut v: Vec<Vec<u8>> = self.files.iter().flat_map(|f| f.paths().map(<[u8]>::to_vec)).collect();
        v.sort();
        v.dedup();
        v
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PatchError {
    Syntax { line: usize, message: String },
    Path { path: String, problem: PathProblem },
    Submodule { path: String },
    Mode { path: String, mode: String },
}

impl fmt::Display for PatchError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PatchError::Syntax { line, message } => write!(f, "line {line}: {message}"),
            PatchError::Path { path, problem } => write!(f, "path {path:?} {problem}"),
            PatchError::Submodule { path } => {
                write!(f, "{path:?} is a nested git repository (submodule), which cannot be exported; remove it or ignore it in the VM")
            }
            PatchError::Mode { path, mode } => write!(f, "{path:?} has file mode {mode}, which is not a file, executable or symlink"),
        }
    }
}

impl std::error::Error for PatchError {}

fn syntax(line: usize, message: impl Into<String>) -> PatchError {
    PatchError::Syntax { line: line + 1, message: message.into() }
}

/// Parses a patch in `git diff --binary --full-index` form. Anything else (text before the first `diff --git`,
/// unknown headers, hunks whose counts disagree, contentless binary changes) is refused, not skipped.
pub fn parse(bytes: &[u8]) -> Result<Patch, PatchError> {
    let mut lines: Vec<&[u8]> = bytes.split(|&b| b == b'\n').collect();
    if lines.last().is_some_and(|l| l.is_empty()) {
        lines.pop();
    }
    let mut p = Parser { lines, i: 0 };
    let mut files = vec![];
    while p.i < p.lines.len() {
        files.push(p.file()?);
    }
    Ok(Patch { files })
}

struct Parser<'a> {
    lines: Vec<&'a [u8]>,
    i: usize,
}

#[derive(Default)]
struct Headers {
    created: bool,
    deleted: bool,
    old_mode: Option<u32>,
    new_mode: Option<u32>,
    index_mode: Option<u32>,
    rename_from: Option<Vec<u8>>,
    rename_to: Option<Vec<u8>>,
    minus: Option<Option<Vec<u8>>>,
    plus: Option<Option<Vec<u8>>>,
    binary: bool,
}

impl<'a> Parser<'a> {
    fn peek(&self) -> Option<&'a [u8]> {
        self.lines.get(self.i).copied()
    }

    fn file(&mut self) -> Result<FilePatch, PatchError> {
        let start = self.i;
        let line = self.lines[self.i];
        let rest = line.strip_prefix(b"diff --git ").ok_or_else(|| syntax(start, "expected a `diff --git` line"))?;
        let names = header_names(rest).map_err(|m| syntax(start, m))?;
        self.i += 1;
        let mut h = Headers::default();
        while let Some(l) = self.peek() {
            if l.starts_with(b"diff --git ") {
                break;
            }
            let at = self.i;
            self.i += 1;
            if let Some(r) = l.strip_prefix(b"old mode ") {
                h.old_mode = Some(mode(r).map_err(|m| syntax(at, m))?);
            } else if let Some(r) = l.strip_prefix(b"new mode ") {
                h.new_mode = Some(mode(r).map_err(|m| syntax(at, m))?);
            } else if let Some(r) = l.strip_prefix(b"deleted file mode ") {
                h.deleted = true;
                h.old_mode = Some(mode(r).map_err(|m| syntax(at, m))?);
            } else if let Some(r) = l.strip_prefix(b"new file mode ") {
                h.created = true;
                h.new_mode = Some(mode(r).map_err(|m| syntax(at, m))?);
            } else if l.starts_with(b"similarity index ") || l.starts_with(b"dissimilarity index ") {
            } else if let Some(r) = l.strip_prefix(b"rename from ").or_else(|| l.strip_prefix(b"copy from ")) {
                h.rename_from = Some(name(r).map_err(|m| syntax(at, m))?);
            } else if let Some(r) = l.strip_prefix(b"rename to ").or_else(|| l.strip_prefix(b"copy to ")) {
                h.rename_to = Some(name(r).map_err(|m| syntax(at, m))?);
            } else if let Some(r) = l.strip_prefix(b"index ") {
                h.index_mode = index_line(r).map_err(|m| syntax(at, m))?;
            } else if let Some(r) = l.strip_prefix(b"--- ") {
                h.minus = Some(side(r, b"a/").map_err(|m| syntax(at, m))?);
                let at = self.i;
                let plus = self.peek().and_then(|l| l.strip_prefix(b"+++ ")).ok_or_else(|| syntax(at, "expected a `+++` line"))?;
                h.plus = Some(side(plus, b"b/").map_err(|m| syntax(at, m))?);
                self.i += 1;
                self.hunks()?;
                break;
            } else if l == b"GIT binary patch" {
                h.binary = true;
                self.binary(at)?;
                break;
            } else if l.starts_with(b"Binary files ") {
                return Err(syntax(at, "a binary change without its content (the patch was made without --binary)"));
            } else {
                return Err(syntax(at, format!("unexpected line {:?}", show(&l[..l.len().min(80)]))));
            }
        }
        finish(start, names, h)
    }

    fn hunks(&mut self) -> Result<(), PatchError> {
        let first = self.i;
        while let Some(l) = self.peek() {
            if !l.starts_with(b"@@ ") {
                break;
            }
            let at = self.i;
            let (mut old, mut new) = hunk_counts(l).map_err(|m| syntax(at, m))?;
            self.i += 1;
            while old > 0 || new > 0 {
                let at = self.i;
                let l = self.peek().ok_or_else(|| syntax(at, "the patch ends inside a hunk"))?;
                self.i += 1;
                match l.first() {
                    // git apply reads an empty line in a hunk as an empty context line.
                    None | Some(b' ') if old > 0 && new > 0 => {
                        old -= 1;
                        new -= 1;
                    }
                    Some(b'-') if old > 0 => old -= 1,
                    Some(b'+') if new > 0 => new -= 1,
                    Some(b'\\') => {}
                    _ => return Err(syntax(at, "a hunk's lines do not match its header's counts")),
                }
            }
            while self.peek().is_some_and(|l| l.starts_with(b"\\ ")) {
                self.i += 1;
            }
        }
        if self.i == first {
            return Err(syntax(first, "expected a hunk (`@@ ... @@`) after the file names"));
        }
        Ok(())
    }

    fn binary(&mut self, header: usize) -> Result<(), PatchError> {
        for block in 0..2 {
            let at = self.i;
            match self.peek() {
                Some(l) if l.starts_with(b"literal ") || l.starts_with(b"delta ") => {}
                // The reverse block is optional.
                _ if block == 1 => return Ok(()),
                _ => return Err(syntax(at, "expected `literal` or `delta` after `GIT binary patch`")),
            }
            self.i += 1;
            let mut data = 0;
            loop {
                let at = self.i;
                let l = self.peek().ok_or_else(|| syntax(at, "the patch ends inside binary data"))?;
                self.i += 1;
                if l.is_empty() {
                    break;
                }
                if !l[0].is_ascii_alphabetic() || l.len() < 6 {
                    return Err(syntax(at, "malformed binary data line"));
                }
                data += 1;
            }
            if data == 0 {
                return Err(syntax(header, "binary patch without data"));
            }
        }
        Ok(())
    }
}

fn finish(start: usize, names: Option<Names>, h: Headers) -> Result<FilePatch, PatchError> {
    if h.created && h.deleted {
        return Err(syntax(start, "a file both created and deleted"));
    }
    // Every name given for a side must agree; git apply would refuse too, but a disagreement is never benign.
    let mut old: Option<Vec<u8>> = None;
    let mut new: Option<Vec<u8>> = None;
    let agree = |slot: &mut Option<Vec<u8>>, n: &[u8]| -> Result<(), PatchError> {
        match slot {
            Some(s) if s.as_slice() != n => Err(syntax(start, format!("inconsistent file names {:?} and {:?}", show(s), show(n)))),
            Some(_) => Ok(()),
            None => {
                *slot = Some(n.to_vec());
                Ok(())
            }
        }
    };
    let renamed = h.rename_from.is_some() || h.rename_to.is_some();
    if let (Some(from), Some(to)) = (&h.rename_from, &h.rename_to) {
        agree(&mut old, from)?;
        agree(&mut new, to)?;
    } else if renamed {
        return Err(syntax(start, "a rename or copy without both its names"));
    }
    if let Some((a, b)) = &names {
        agree(&mut old, a)?;
        agree(&mut new, b)?;
    }
    if let Some(Some(m)) = &h.minus {
        agree(&mut old, m)?;
    }
    if let Some(Some(p)) = &h.plus {
        agree(&mut new, p)?;
    }
    if h.minus == Some(None) && !h.created {
        return Err(syntax(start, "`--- /dev/null` for a file that is not new"));
    }
    if h.plus == Some(None) && !h.deleted {
        return Err(syntax(start, "`+++ /dev/null` for a file that is not deleted"));
    }
    let (Some(old), Some(new)) = (old, new) else {
        return Err(syntax(start, "cannot tell the file's name from the `diff --git` line"));
    };
    if !renamed && old != new {
        return Err(syntax(start, format!("different names {:?} and {:?} without a rename", show(&old), show(&new))));
    }
    for p in [&old, &new] {
        check_path(p).map_err(|problem| PatchError::Path { path: show(p), problem })?;
    }
    let new_mode = h.new_mode.or(h.index_mode).or(h.old_mode);
    let old_mode = h.old_mode.or(h.index_mode);
    for m in [old_mode, new_mode].into_iter().flatten() {
        if m == 0o160000 {
            return Err(PatchError::Submodule { path: show(&new) });
        }
        if !matches!(m, 0o100644 | 0o100755 | 0o120000) {
            return Err(PatchError::Mode { path: show(&new), mode: format!("{m:o}") });
        }
    }
    Ok(FilePatch {
        old: (!h.created).then_some(old),
        new: (!h.deleted).then_some(new),
        old_mode: if h.created { None } else { old_mode },
        new_mode: if h.deleted { None } else { new_mode },
        binary: h.binary,
    })
}

fn mode(r: &[u8]) -> Result<u32, String> {
    let s = std::str::from_utf8(r).map_err(|_| "bad file mode".to_string())?;
    if s.is_empty() || s.len() > 6 || !s.bytes().all(|b| (b'0'..=b'7').contains(&b)) {
        return Err(format!("bad file mode {s:?}"));
    }
    u32::from_str_radix(s, 8).map_err(|_| format!("bad file mode {s:?}"))
}

/// `index <hex>..<hex>[ <mode>]`; returns the mode when given.
fn index_line(r: &[u8]) -> Result<Option<u32>, String> {
    let s = std::str::from_utf8(r).map_err(|_| "bad index line".to_string())?;
    let (ids, m) = match s.split_once(' ') {
        Some((ids, m)) => (ids, Some(m)),
        None => (s, None),
    };
    let (a, b) = ids.split_once("..").ok_or("bad index line")?;
    for id in [a, b] {
        if id.is_empty() || id.len() > 64 || !id.bytes().all(|c| c.is_ascii_hexdigit()) {
            return Err("bad object id on an index line".into());
        }
    }
    m.map(|m| mode(m.as_bytes())).transpose()
}

fn hunk_counts(l: &[u8]) -> Result<(u64, u64), String> {
    let s = std::str::from_utf8(l).map_err(|_| "bad hunk header".to_string())?;
    let inner = s.strip_prefix("@@ -").and_then(|r| r.split_once(" @@")).map(|(i, _)| i).ok_or("bad hunk header")?;
    let (o, n) = inner.split_once(" +").ok_or("bad hunk header")?;
    let count = |r: &str| -> Result<u64, String> {
        let c = match r.split_once(',') {
            Some((start, c)) => {
                start.parse::<u64>().map_err(|_| "bad hunk header")?;
                c
            }
            None => {
                r.parse::<u64>().map_err(|_| "bad hunk header")?;
                "1"
            }
        };
        c.parse::<u64>().map_err(|_| "bad hunk header".to_string())
    };
    let (o, n) = (count(o)?, count(n)?);
    if o == 0 && n == 0 {
        return Err("empty hunk".into());
    }
    Ok((o, n))
}

/// A `---`/`+++` name: `/dev/null` or `<prefix>path`, maybe C-quoted, maybe followed by a tab.
fn side(r: &[u8], prefix: &[u8]) -> Result<Option<Vec<u8>>, String> {
    if r == b"/dev/null" {
        return Ok(None);
    }
    let n = name(r)?;
    n.strip_prefix(prefix).map(|p| Some(p.to_vec())).ok_or_else(|| format!("file name {:?} lacks the {:?} prefix", show(&n), show(prefix)))
}

/// A name on a header line, C-quoted or raw; git puts a tab after raw names that contain a space.
fn name(r: &[u8]) -> Result<Vec<u8>, String> {
    if r.first() == Some(&b'"') {
        let (n, rest) = unquote(r)?;
        if !rest.is_empty() && rest != b"\t" {
            return Err("text after a quoted name".into());
        }
        Ok(n)
    } else {
        Ok(r.strip_suffix(b"\t").unwrap_or(r).to_vec())
    }
}

type Names = (Vec<u8>, Vec<u8>);

/// The two names of `diff --git a/X b/Y`, prefixes removed; `None` when unquoted names with spaces make the
/// split ambiguous (renames then name both sides on their own lines).
fn header_names(rest: &[u8]) -> Result<Option<Names>, String> {
    let strip = |n: Vec<u8>, p: &[u8]| -> Result<Vec<u8>, String> {
        n.strip_prefix(p).map(<[u8]>::to_vec).ok_or_else(|| format!("file name {:?} lacks the {:?} prefix", show(&n), show(p)))
    };
    if rest.first() == Some(&b'"') {
        let (a, tail) = unquote(rest)?;
        let tail = tail.strip_prefix(b" ").ok_or("bad `diff --git` line")?;
        let b = if tail.first() == Some(&b'"') {
            let (b, t) = unquote(tail)?;
            if !t.is_empty() {
                return Err("bad `diff --git` line".into());
            }
            b
        } else {
            tail.to_vec()
        };
        return Ok(Some((strip(a, b"a/")?, strip(b, b"b/")?)));
    }
    if rest.last() == Some(&b'"') {
        let pos = rest.windows(2).position(|w| w == b" \"").ok_or("bad `diff --git` line")?;
        let (b, t) = unquote(&rest[pos + 1..])?;
        if !t.is_empty() {
            return Err("bad `diff --git` line".into());
        }
        return Ok(Some((strip(rest[..pos].to_vec(), b"a/")?, strip(b, b"b/")?)));
    }
    // Unquoted: `a/N b/N` with the same N on both sides.
    let len = rest.len();
    if len >= 5 && (len - 5) & 1 == 0 {
        let n = (len - 5) / 2;
        if rest.starts_with(b"a/") && &rest[2 + n..2 + n + 3] == b" b/" && rest[2..2 + n] == rest[len - n..] && n > 0 {
            let name = rest[2..2 + n].to_vec();
            return Ok(Some((name.clone(), name)));
        }
    }
    if rest.iter().filter(|&&b| b == b' ').count() == 1 {
        let (a, b) = rest.split_at(rest.iter().position(|&b| b == b' ').unwrap_or(0));
        return Ok(Some((strip(a.to_vec(), b"a/")?, strip(b[1..].to_vec(), b"b/")?)));
    }
    Ok(None)
}

/// Reads one C-quoted string (git's `quote_c_style`); returns it and what follows the closing quote.
fn unquote(s: &[u8]) -> Result<(Vec<u8>, &[u8]), String> {
    let mut out = vec![];
    let mut i = 1;
    while i < s.len() {
        match s[i] {
            b'"' => return Ok((out, &s[i + 1..])),
            b'\\' => {
                let c = *s.get(i + 1).ok_or("unterminated quoted name")?;
                i += 2;
                out.push(match c {
                    b'a' => 7,
                    b'b' => 8,
                    b't' => b'\t',
                    b'n' => b'\n',
                    b'v' => 11,
                    b'f' => 12,
                    b'r' => b'\r',
                    b'"' => b'"',
                    b'\\' => b'\\',
                    b'0'..=b'3' => {
                        let d = s.get(i..i + 2).ok_or("bad octal escape in a quoted name")?;
                        if !d.iter().all(|b| (b'0'..=b'7').contains(b)) {
                            return Err("bad octal escape in a quoted name".into());
                        }
                        i += 2;
                        ((c - b'0') << 6) | ((d[0] - b'0') << 3) | (d[1] - b'0')
                    }
                    _ => return Err("bad escape in a quoted name".into()),
                });
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    Err("unterminated quoted name".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    const MODIFY: &str = "diff --git a/src/a.txt b/src/a.txt\nindex 0123abc..4567def 100644\n--- a/src/a.txt\n+++ b/src/a.txt\n@@ -1,2 +1,2 @@\n-old\n+new\n ctx\n";
    const CREATE_EMPTY: &str = "diff --git a/empty b/empty\nnew file mode 100644\nindex 0000000..e69de29\n";
    const DELETE: &str = "diff --git a/gone b/gone\ndeleted file mode 100755\nindex 1234567..0000000\n--- a/gone\n+++ /dev/null\n@@ -1 +0,0 @@\n-bye\n\\ No newline at end of file\n";
    const BINARY: &str = "diff --git a/img.bin b/img.bin\nnew file mode 100644\nindex 0000000..5c1e5a4\nGIT binary patch\nliteral 4\nLcmZQzWMT#Y01f~L\n\nliteral 0\nHcmV?d00001\n\n";
    const SYMLINK: &str = "diff --git a/link b/link\nnew file mode 120000\nindex 0000000..1234567\n--- /dev/null\n+++ b/link\n@@ -0,0 +1 @@\n+target\n\\ No newline at end of file\n";

    #[test]
    fn git_diff_output_parses() {
        let all = [MODIFY, CREATE_EMPTY, DELETE, BINARY, SYMLINK].concat();
        let p = parse(all.as_bytes()).unwrap();
        assert_eq!(p.files.len(), 5);
        assert_eq!(p.files[0].old.as_deref(), Some(&b"src/a.txt"[..]));
        assert_eq!(p.files[0].new_mode, Some(0o100644));
        assert_eq!(p.files[1].old, None);
        assert_eq!(p.files[2].new, None);
        assert_eq!(p.files[2].old_mode, Some(0o100755));
        assert!(p.files[3].binary);
        assert_eq!(p.files[4].new_mode, Some(0o120000));
        assert!(p.sensitive().is_empty());
        assert!(parse(b"").unwrap().is_empty());
    }

    #[test]
    fn quoted_spaced_and_renamed_names() {
        let q = "diff --git \"a/t\\303\\251st\\tx\" \"b/t\\303\\251st\\tx\"\nnew file mode 100644\nindex 0000000..e69de29\n";
        let p = parse(q.as_bytes()).unwrap();
        assert_eq!(p.files[0].new.as_deref(), Some("t\u{e9}st\tx".as_bytes()));
        let spaced =
            "diff --git a/my file b/my file\nindex 1111111..2222222 100644\n--- a/my file\t\n+++ b/my file\t\n@@ -1 +1 @@\n-a\n+b\n";
        assert_eq!(parse(spaced.as_bytes()).unwrap().files[0].new.as_deref(), Some(&b"my file"[..]));
        let rename = "diff --git a/x y b/z w\nsimilarity index 100%\nrename from x y\nrename to z w\n";
        let p = parse(rename.as_bytes()).unwrap();
        assert_eq!((p.files[0].old.as_deref(), p.files[0].new.as_deref()), (Some(&b"x y"[..]), Some(&b"z w"[..])));
    }

    #[test]
    fn sensitive_paths_are_listed() {
        let text = MODIFY.replace("src/a.txt", ".vscode/tasks.json") + &CREATE_EMPTY.replace("empty", "Makefile");
        let s = parse(text.as_bytes()).unwrap().sensitive();
        assert_eq!(
            s,
            vec![
                Sensitive { path: ".vscode/tasks.json".into(), kind: SensitiveKind::Editor },
                Sensitive { path: "Makefile".into(), kind: SensitiveKind::Build }
            ]
        );
    }

    fn err(text: &str) -> String {
        parse(text.as_bytes()).expect_err(text).to_string()
    }

    #[test]
    fn hostile_paths_are_refused() {
        assert!(err(&MODIFY.replace("src/a.txt", "../outside")).contains("component"), "dotdot");
        assert!(err(&CREATE_EMPTY.replace("a/empty b/empty", "a//etc/passwd b//etc/passwd")).contains("absolute"));
        assert!(err(&MODIFY.replace("src/a.txt", ".git/hooks/post-checkout")).contains(".git"));
        assert!(err(&MODIFY.replace("src/a.txt", "sub/.GIT/config")).contains(".git"));
        let q = "diff --git \"a/..\\057x\" \"b/..\\057x\"\nnew file mode 100644\nindex 0000000..e69de29\n";
        assert!(err(q).contains("component"));
        // The header names one file, the `+++` line another.
        let mismatch = MODIFY.replace("+++ b/src/a.txt", "+++ b/../../x");
        assert!(err(&mismatch).contains("inconsistent"), "{}", err(&mismatch));
        let rename = "diff --git a/ok b/ok2\nsimilarity index 100%\nrename from ok\nrename to ../../etc/cron.d/x\n";
        assert!(err(rename).contains("inconsistent") || err(rename).contains("component"));
        let submodule = "diff --git a/vendor/x b/vendor/x\nnew file mode 160000\nindex 0000000..1234567\n--- /dev/null\n+++ b/vendor/x\n@@ -0,0 +1 @@\n+Subproject commit 1234567\n";
        assert!(err(submodule).contains("nested git repository"));
        assert!(err(&CREATE_EMPTY.replace("100644", "020000")).contains("mode"));
    }

    #[test]
    fn malformed_patches_are_refused() {
        assert!(err("hello\n").contains("diff --git"));
        assert!(err(&format!("garbage\n{MODIFY}")).contains("line 1"));
        // A hunk claiming fewer lines than it has leaves a stray line, which is not a header.
        assert!(err(&MODIFY.replace("@@ -1,2 +1,2 @@", "@@ -1,1 +1,1 @@")).contains("line 8: expected a `diff --git`"));
        assert!(err(&MODIFY.replace("@@ -1,2 +1,2 @@", "@@ -1,3 +1,3 @@")).contains("ends inside a hunk"));
        assert!(err("diff --git a/x b/x\nBinary files a/x and b/x differ\n").contains("without --binary"));
        assert!(err("diff --git a/x b/x\nnew file mode 100644\n--- /dev/null\n+++ b/x\n").contains("expected a hunk"));
        assert!(
            err("diff --git a/x b/x\nindex 1..2 100644\n--- a/x\n+++ b/x\n@@ -1 +1 @@\n-a\n+b\n+c\n").contains("expected a `diff --git`")
        );
        assert!(err("diff --git a/x b/x\nnew file mode 100644\nGIT binary patch\nliteral 3\n\n").contains("without data"));
        assert!(err("diff --git a/x b/x\nindex 1..2 100644\n--- a/x\n+++ /dev/null\n@@ -1 +0,0 @@\n-a\n").contains("not deleted"));
    }
}
