//! Paths in VM output: what a repository path may look like, and where a symlink may point. Every path the VM
//! exports is hostile until these checks pass (threat 11); they work on raw bytes, as git stores paths.

use std::collections::{BTreeMap, VecDeque};
use std::fmt;

/// Why a path from the VM is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathProblem {
    Empty,
    Absolute,
    /// An empty, `.` or `..` component.
    Traversal,
    /// A component git would read as its own directory (`.git`, `.GIT`, `git~1`, `.git.`, HFS-ignorable spellings).
    GitDir,
    Nul,
}

impl fmt::Display for PathProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PathProblem::Empty => "is empty",
            PathProblem::Absolute => "is absolute",
            PathProblem::Traversal => "has an empty, `.` or `..` component",
            PathProblem::GitDir => "is inside a `.git` directory (git metadata never leaves the VM)",
            PathProblem::Nul => "contains a NUL byte",
        })
    }
}

/// Checks a path relative to the repository root, as found in a patch header or a tree.
pub fn check_path(p: &[u8]) -> Result<(), PathProblem> {
    if p.is_empty() {
        return Err(PathProblem::Empty);
    }
    if p.contains(&0) {
        return Err(PathProblem::Nul);
    }
    if p[0] == b'/' {
        return Err(PathProblem::Absolute);
    }
    for c in p.split(|&b| b == b'/') {
        check_component(c)?;
    }
    Ok(())
}

/// Checks one tree entry name.
pub fn check_component(c: &[u8]) -> Result<(), PathProblem> {
    if c.contains(&0) {
        return Err(PathProblem::Nul);
    }
    if c.is_empty() || c == b"." || c == b".." {
        return Err(PathProblem::Traversal);
    }
    if is_git_dir_name(c) {
        return Err(PathProblem::GitDir);
    }
    Ok(())
}

/// True for names that some filesystem git supports would treat as `.git`: case folding (Windows, macOS),
/// trailing dots and spaces and the 8.3 short name (NTFS), zero-width code points (HFS+).
pub fn is_git_dir_name(c: &[u8]) -> bool {
    const IGNORABLE: &[char] = &[
        '\u{200c}', '\u{200d}', '\u{200e}', '\u{200f}', '\u{202a}', '\u{202b}', '\u{202c}', '\u{202d}', '\u{202e}', '\u{206a}', '\u{206b}',
        '\u{206c}', '\u{206d}', '\u{206e}', '\u{206f}', '\u{feff}',
    ];
    let s = String::from_utf8_lossy(c);
    let folded: String = s.chars().filter(|ch| !IGNORABLE.contains(ch)).collect::<String>().to_ascii_lowercase();
    let trimmed = folded.trim_end_matches([' ', '.']);
    trimmed == ".git" || trimmed == "git~1"
}

/// Why a symlink from the VM is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinkProblem {
    Empty,
    Absolute,
    /// Resolving it (through other links in the same tree) leaves the repository.
    Escapes,
    /// More than 40 links followed.
    Loop,
    Nul,
}

impl fmt::Display for LinkProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            LinkProblem::Empty => "has an empty target",
            LinkProblem::Absolute => "points to an absolute path",
            LinkProblem::Escapes => "points outside the repository",
            LinkProblem::Loop => "is part of a symlink loop",
            LinkProblem::Nul => "has a NUL byte in its target",
        })
    }
}

/// The symlinks of one tree, by path, with their targets.
#[derive(Debug, Default)]
pub struct Links {
    map: BTreeMap<Vec<u8>, Vec<u8>>,
}

impl Links {
    pub fn insert(&mut self, path: Vec<u8>, target: Vec<u8>) {
        self.map.insert(path, target);
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Checks every link: each must resolve, following the others, to somewhere inside the tree.
    pub fn check_all(&self) -> Result<(), (Vec<u8>, LinkProblem)> {
        for path in self.map.keys() {
            self.check(path).map_err(|p| (path.clone(), p))?;
        }
        Ok(())
    }

    /// Resolves the link at `path` lexically, substituting links of this tree as they are met. Links that
    /// point at paths absent from the tree are fine as long as they stay inside it.
    pub fn check(&self, path: &[u8]) -> Result<(), LinkProblem> {
        let Some(target) = self.map.get(path) else { return Ok(()) };
        let mut dir: Vec<&[u8]> = path.split(|&b| b == b'/').collect();
        dir.pop();
        let mut todo: VecDeque<&[u8]> = VecDeque::new();
        push_target(&mut todo, target)?;
        let mut hops = 0;
        while let Some(c) = todo.pop_front() {
            match c {
                b"" | b"." => {}
                b".." => {
                    if dir.pop().is_none() {
                        return Err(LinkProblem::Escapes);
                    }
                }
                name => {
                    dir.push(name);
                    let here = dir.join(&b'/');
                    if let Some(t) = self.map.get(&here) {
                        hops += 1;
                        if hops > 40 {
                            return Err(LinkProblem::Loop);
                        }
                        dir.pop();
                        let mut rest: VecDeque<&[u8]> = VecDeque::new();
                        push_target(&mut rest, t)?;
                        rest.extend(todo.drain(..));
                        todo = rest;
                    }
                }
            }
        }
        Ok(())
    }
}

fn push_target<'a>(todo: &mut VecDeque<&'a [u8]>, target: &'a [u8]) -> Result<(), LinkProblem> {
    if target.is_empty() {
        return Err(LinkProblem::Empty);
    }
    if target.contains(&0) {
        return Err(LinkProblem::Nul);
    }
    if target[0] == b'/' {
        return Err(LinkProblem::Absolute);
    }
    todo.extend(target.split(|&b| b == b'/'));
    Ok(())
}

/// A path for messages: printable as is, control, bidirectional and invisible format characters and invalid
/// UTF-8 escaped (the shared [`hutch_text`] rules), so VM-chosen names cannot drive or mislead the user's terminal.
pub fn show(p: &[u8]) -> String {
    hutch_text::escape_bytes(p)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ordinary_paths_pass() {
        for p in ["a", "src/main.rs", ".github/workflows/ci.yml", "dir/.gitignore", "a b/c d", ".gitx/y", "x.git/y"] {
            assert_eq!(check_path(p.as_bytes()), Ok(()), "{p}");
        }
    }

    #[test]
    fn traversal_absolute_and_git_dirs_are_refused() {
        let cases: &[(&[u8], PathProblem)] = &[
            (b"", PathProblem::Empty),
            (b"/etc/passwd", PathProblem::Absolute),
            (b"../x", PathProblem::Traversal),
            (b"a/../../x", PathProblem::Traversal),
            (b"a/./b", PathProblem::Traversal),
            (b"a//b", PathProblem::Traversal),
            (b"a/", PathProblem::Traversal),
            (b".git/hooks/post-checkout", PathProblem::GitDir),
            (b"sub/.git", PathProblem::GitDir),
            (b".GIT/config", PathProblem::GitDir),
            (b".git. /config", PathProblem::GitDir),
            (b"GIT~1/config", PathProblem::GitDir),
            (".g\u{200c}it/config".as_bytes(), PathProblem::GitDir),
            (b"a\0b", PathProblem::Nul),
        ];
        for (p, want) in cases {
            assert_eq!(check_path(p).as_ref(), Err(want), "{}", show(p));
        }
    }

    fn links(pairs: &[(&str, &str)]) -> Links {
        let mut l = Links::default();
        for (p, t) in pairs {
            l.insert(p.as_bytes().to_vec(), t.as_bytes().to_vec());
        }
        l
    }

    #[test]
    fn links_inside_the_tree_pass() {
        let l = links(&[("a", "b"), ("d/up", "../a"), ("d/e/f", "../../d/up"), ("dangling", "no/such/file"), ("self", ".")]);
        assert_eq!(l.check_all(), Ok(()));
    }

    #[test]
    fn links_leaving_the_tree_are_refused() {
        assert_eq!(links(&[("l", "/etc/passwd")]).check(b"l"), Err(LinkProblem::Absolute));
        assert_eq!(links(&[("l", "..")]).check(b"l"), Err(LinkProblem::Escapes));
        assert_eq!(links(&[("d/l", "../../x")]).check(b"d/l"), Err(LinkProblem::Escapes));
        assert_eq!(links(&[("l", "")]).check(b"l"), Err(LinkProblem::Empty));
        // Lexically inside, but `d/a` is itself a link to the root, so `d/a/..` is above it.
        let chained = links(&[("d/a", ".."), ("b", "d/a/..")]);
        assert_eq!(chained.check(b"b"), Err(LinkProblem::Escapes));
        let chained = links(&[("x", "sub/deep"), ("sub/deep", "../.."), ("y", "x/z")]);
        assert_eq!(chained.check(b"y"), Err(LinkProblem::Escapes));
        let looped = links(&[("a", "b/x"), ("b", "a")]);
        assert_eq!(looped.check(b"a"), Err(LinkProblem::Loop));
    }

    #[test]
    fn shown_paths_cannot_carry_terminal_escapes() {
        assert_eq!(show(b"ok/file.txt"), "ok/file.txt");
        assert_eq!(show(b"evil\x1b]0;pwned\x07name"), "evil\\x1b]0;pwned\\x07name");
        assert_eq!(show(b"bad\xffutf8"), "bad\\xffutf8");
        assert_eq!(show("caf\u{e9}".as_bytes()), "caf\u{e9}");
    }
}
