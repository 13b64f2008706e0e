//! `KEY=value` files (`hutch run --env-file .env`, `[secrets] from_env_file`): each line becomes a secret whose
//! value is read here, on the host, and never leaves it; the sandbox sees the secret's placeholder under the
//! same name. The format is the common dotenv subset: `#` comments, blank lines, an optional `export `, values
//! bare, in single quotes (literal) or in double quotes (`\"`, `\\`, `\n`, `\$` escapes), all on one line.
//!
//! Values are hostile to logs (threat 12): no error message quotes a line or a value, only the file, the line
//! number and the key, and values are wiped from memory when dropped.

use std::fmt;
use std::path::{Path, PathBuf};

use zeroize::Zeroizing;

use crate::secret::{SecretName, SecretValue};

/// Largest file read: an env file is a few dozen lines.
const MAX_FILE: u64 = 1 << 20;

/// An env file that cannot be used: the file and line, and what is wrong (never the value).
#[derive(Debug, thiserror::Error)]
pub enum EnvFileError {
    #[error("cannot read the env file {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("env file {}: {problem}", path.display())]
    File { path: PathBuf, problem: String },
    #[error("env file {}, line {line}: {problem}", path.display())]
    Line { path: PathBuf, line: usize, problem: String },
}

/// One `KEY=value` line.
pub struct EnvEntry {
    pub key: SecretName,
    pub line: usize,
    value: Zeroizing<String>,
}

impl EnvEntry {
    /// The value, for loading it as a secret on the host.
    pub fn expose(&self) -> &str {
        &self.value
    }

    /// The value checked as a secret value (it can travel in a header and is long enough to mask).
    pub fn secret_value(&self, path: &Path) -> Result<SecretValue, EnvFileError> {
        SecretValue::new(self.value.to_string(), &format!("the value of {}", self.key)).map_err(|problem| EnvFileError::Line {
            path: path.to_path_buf(),
            line: self.line,
            problem,
        })
    }
}

impl fmt::Debug for EnvEntry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "EnvEntry({} on line {}, value <redacted>)", self.key, self.line)
    }
}

/// A parsed env file.
#[derive(Debug)]
pub struct EnvFile {
    pub path: PathBuf,
    pub entries: Vec<EnvEntry>,
}

impl EnvFile {
    /// Reads and parses `path`.
    pub fn read(path: &Path) -> Result<EnvFile, EnvFileError> {
        let read_err = |source| EnvFileError::Read { path: path.to_path_buf(), source };
        let meta = std::fs::metadata(path).map_err(read_err)?;
        if !meta.is_file() || meta.len() > MAX_FILE {
            return Err(EnvFileError::File {
                path: path.to_path_buf(),
                problem: format!("is not a regular file of at most {} KiB", MAX_FILE / 1024),
            });
        }
        let bytes = Zeroizing::new(std::fs::read(path).map_err(read_err)?);
        Self::parse(path, &bytes)
    }

    /// Parses the bytes of an env file; `path` names it in errors.
    pub fn parse(path: &Path, bytes: &[u8]) -> Result<EnvFile, EnvFileError> {
        let mut entries: Vec<EnvEntry> = Vec::new();
        for (i, raw) in bytes.split(|&b| b == b'\n').enumerate() {
            let line = i + 1;
            let bad = |problem: String| EnvFileError::Line { path: path.to_path_buf(), line, problem };
            let raw = raw.strip_suffix(b"\r").unwrap_or(raw);
            let text = std::str::from_utf8(raw).map_err(|_| bad("is not UTF-8 text".into()))?;
            let text = text.trim_start();
            if text.is_empty() || text.starts_with('#') {
                continue;
            }
            let text = text.strip_prefix("export ").map(str::trim_start).unwrap_or(text);
            let Some((key, rest)) = text.split_once('=') else {
                return Err(bad("is not KEY=value (and not a comment)".into()));
            };
            let key = key.trim_end();
            let key = SecretName::parse(key).map_err(|_| {
                bad("does not start with a variable name (a letter or '_', then letters, digits or '_', at most 64)".into())
            })?;
            let value = parse_value(rest.trim_start()).map_err(|p| bad(format!("{key}: {p}")))?;
            if let Some(first) = entries.iter().find(|e| e.key == key) {
                return Err(bad(format!("{key} is set again (first on line {}); keep one", first.line)));
            }
            entries.push(EnvEntry { key, line, value });
        }
        Ok(EnvFile { path: path.to_path_buf(), entries })
    }

    pub fn get(&self, key: &str) -> Option<&EnvEntry> {
        self.entries.iter().find(|e| e.key.as_str() == key)
    }
}

/// A value as written after `=`: bare (up to a ` #` comment), `'literal'`, or `"with \" escapes"`.
fn parse_value(s: &str) -> Result<Zeroizing<String>, String> {
    let mut out = Zeroizing::new(String::new());
    let after = if let Some(body) = s.strip_prefix('\'') {
        let end = body.find('\'').ok_or("its value opens a ' quote that does not close on this line (multi-line values are not supported)")?;
        out.push_str(&body[..end]);
        &body[end + 1..]
    } else if let Some(body) = s.strip_prefix('"') {
        let mut chars = body.char_indices();
        let mut end = None;
        while let Some((i, c)) = chars.next() {
            match c {
                '"' => {
                    end = Some(i + 1);
                    break;
                }
                '\\' => match chars.next().map(|(_, e)| e) {
                    Some('n') => out.push('\n'),
                    Some('t') => out.push('\t'),
                    Some(e @ ('"' | '\\' | '$' | '\'')) => out.push(e),
                    _ => return Err("its value has a `\\` escape other than \\\" \\\\ \\$ \\' \\n \\t".into()),
                },
                c => out.push(c),
            }
        }
        let end = end.ok_or("its value opens a \" quote that does not close on this line (multi-line values are not supported)")?;
        &body[end..]
    } else {
        let end = s.find(" #").or_else(|| s.find("\t#")).unwrap_or(s.len());
        out.push_str(s[..end].trim_end());
        ""
    };
    let after = after.trim_start();
    if !after.is_empty() && !after.starts_with('#') {
        return Err("has text after its quoted value".into());
    }
    Ok(out)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<EnvFile, String> {
        EnvFile::parse(Path::new("/p/.env"), text.as_bytes()).map_err(|e| e.to_string())
    }

    #[test]
    fn the_common_dotenv_forms_parse() {
        let f = parse(
            "# comment\n\nAPI_KEY=sk-plain-value-1\nexport TOKEN = 'single # quoted'\r\nDQ=\"a \\\"b\\\" \\$c\" # trailing\nBARE=v1 # comment\nEMPTY=\nURL=https://x/?a=b#frag\n",
        )
        .unwrap();
        let got: Vec<(&str, &str, usize)> = f.entries.iter().map(|e| (e.key.as_str(), e.expose(), e.line)).collect();
        assert_eq!(
            got,
            [
                ("API_KEY", "sk-plain-value-1", 3),
                ("TOKEN", "single # quoted", 4),
                ("DQ", "a \"b\" $c", 5),
                ("BARE", "v1", 6),
                ("EMPTY", "", 7),
                ("URL", "https://x/?a=b#frag", 8),
            ]
        );
    }

    /// Class 12 (secrets in error messages): no error quotes the line or a value.
    #[test]
    fn class_12_errors_name_the_line_and_key_never_the_value() {
        let cases = [
            ("A=ok\nNOT A LINE secret-xyz-1\n", "line 2: is not KEY=value"),
            ("1BAD=secret-xyz-1\n", "line 1: does not start with a variable name"),
            ("K='secret-xyz-1\n", "line 1: K: its value opens a ' quote"),
            ("K=\"secret-xyz-1\n", "line 1: K: its value opens a \" quote"),
            ("K=\"secret-xyz-1\" secret-xyz-1\n", "line 1: K: has text after its quoted value"),
            ("K=\"secret-xyz-1\\q\"\n", "escape"),
            ("K=secret-xyz-1\n\nK=secret-xyz-1\n", "line 3: K is set again (first on line 1)"),
        ];
        for (text, want) in cases {
            let e = parse(text).unwrap_err();
            assert!(e.contains(want) && e.contains("/p/.env"), "{text:?}: {e}");
            assert!(!e.contains("secret-xyz"), "the value leaked into {e}");
        }
        let e = EnvFile::parse(Path::new("f"), b"K=\xff\xfesecret-xyz\n").unwrap_err().to_string();
        assert!(e.contains("line 1: is not UTF-8") && !e.contains("secret-xyz"), "{e}");
        let f = parse("SHORT=abc\nCTL=\"secret-xyz-1\\nmore\"\n").unwrap();
        let e = f.entries[0].secret_value(&f.path).unwrap_err().to_string();
        assert!(e.contains("line 1: the value of SHORT is shorter than 8"), "{e}");
        let e = f.entries[1].secret_value(&f.path).unwrap_err().to_string();
        assert!(e.contains("line 2: the value of CTL contains control") && !e.contains("secret-xyz"), "{e}");
        assert!(!format!("{f:?}").contains("secret-xyz"), "Debug redacts values");
    }
}
