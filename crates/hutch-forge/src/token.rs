//! The forge token: held in memory only, zeroed on drop, never printed, and scrubbed out of any text (git's
//! stderr, a forge's error body) before that text becomes an error or a log line.

use base64::Engine;
use zeroize::Zeroizing;

/// A forge token. `Debug` and `Display` never show it.
#[derive(Clone)]
pub struct SecretToken(Zeroizing<String>);

impl std::fmt::Debug for SecretToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SecretToken([redacted])")
    }
}

impl SecretToken {
    /// Checks that `value` can travel in an HTTP header: 8 to 4096 visible ASCII characters.
    pub fn new(value: impl Into<String>) -> Result<SecretToken, crate::ForgeError> {
        let value = Zeroizing::new(value.into());
        let v = value.as_str();
        if v.len() < 8 || v.len() > 4096 || !v.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(crate::ForgeError::Config(
                "the forge token must be 8 to 4096 visible ASCII characters (no spaces or line breaks)".into(),
            ));
        }
        Ok(SecretToken(value))
    }

    pub(crate) fn expose(&self) -> &str {
        &self.0
    }

    /// `Authorization` for git over HTTPS, as GitHub takes it: Basic with `x-access-token` as the user.
    pub(crate) fn git_basic(&self) -> Zeroizing<String> {
        let raw = Zeroizing::new(format!("x-access-token:{}", self.expose()));
        Zeroizing::new(format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(raw.as_bytes())))
    }

    /// `text` with the token and the encodings it travels in replaced by `[redacted]`.
    pub(crate) fn redact(&self, text: &str) -> String {
        let t = self.expose();
        let basic = self.git_basic();
        let mut needles: Vec<String> = vec![t.to_string()];
        if let Some(b64) = basic.strip_prefix("Basic ") {
            needles.push(b64.to_string());
        }
        for engine in [&base64::engine::general_purpose::STANDARD_NO_PAD, &base64::engine::general_purpose::URL_SAFE_NO_PAD] {
            needles.push(engine.encode(t.as_bytes()));
        }
        let mut out = text.to_string();
        for n in needles.iter().filter(|n| n.len() >= 8) {
            out = out.replace(n.as_str(), "[redacted]");
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_checked_and_never_shown() {
        assert!(SecretToken::new("short").is_err());
        assert!(SecretToken::new("has a space in it").is_err());
        assert!(SecretToken::new("line\nbreak-token").is_err());
        let t = SecretToken::new("ghp_abcdefghijklmnop").unwrap();
        assert!(!format!("{t:?}").contains("ghp_"));
        let basic = t.git_basic();
        let msg = format!("sent {} and ghp_abcdefghijklmnop and {}", basic.as_str(), base64::engine::general_purpose::STANDARD_NO_PAD.encode("ghp_abcdefghijklmnop"));
        let r = t.redact(&msg);
        assert!(!r.contains("ghp_abcdefghijklmnop"), "{r}");
        assert!(!r.contains(basic.strip_prefix("Basic ").unwrap()), "{r}");
        assert!(!r.contains(&base64::engine::general_purpose::STANDARD_NO_PAD.encode("ghp_abcdefghijklmnop")), "{r}");
        assert_eq!(r.matches("[redacted]").count(), 3);
    }
}
