//! API tokens: minted once (shown once), stored only as a SHA-256 hash, looked up by their public id part.
//! A token is `hutch_<id>_<secret>`: 48 bits of id so lookups need no scan, 256 bits of secret so a fast hash
//! is enough (nothing to brute-force).

use sha2::{Digest, Sha256};

use crate::store::{now_ms, Store, TokenRow};
use crate::DaemonError;

/// Who made a request: the token's id (sandbox owner), its name, and what it may do.
#[derive(Debug, Clone)]
pub struct Principal {
    pub token_id: String,
    pub name: String,
    pub admin: bool,
    pub max_sandboxes: Option<u32>,
}

/// A freshly minted token: the only time the secret exists outside the caller's hands.
#[derive(Debug)]
pub struct NewToken {
    pub id: String,
    pub name: String,
    pub token: String,
}

fn hash(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// Token names: what `hutch token create --name` accepts.
pub fn check_token_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '@'));
    if ok {
        Ok(())
    } else {
        Err(format!("token name {name:?} must be 1-64 characters of letters, digits, '-', '_', '.', '@'"))
    }
}

pub fn create_token(store: &Store, name: &str, admin: bool, max_sandboxes: Option<u32>) -> Result<NewToken, DaemonError> {
    check_token_name(name).map_err(DaemonError::BadInput)?;
    let mut id = [0u8; 6];
    let mut secret = [0u8; 32];
    getrandom::getrandom(&mut id).map_err(|e| DaemonError::Internal(format!("no host randomness: {e}")))?;
    getrandom::getrandom(&mut secret).map_err(|e| DaemonError::Internal(format!("no host randomness: {e}")))?;
    let id = hex::encode(id);
    let token = format!("hutch_{id}_{}", hex::encode(secret));
    store.insert_token(&TokenRow {
        id: id.clone(),
        name: name.to_string(),
        hash: hash(&token),
        admin,
        max_sandboxes,
        created_ms: now_ms(),
        revoked: false,
    })?;
    Ok(NewToken { id, name: name.to_string(), token })
}

/// The E2B spelling of a token, `e2b_<id><secret>` (hex), for `X-API-Key`: the same secret, so the same
/// token, hash, quota and isolation.
pub fn to_e2b_key(token: &str) -> Option<String> {
    let (id, secret) = token.strip_prefix("hutch_")?.split_once('_')?;
    Some(format!("e2b_{id}{secret}"))
}

/// The token an `e2b_…` key spells, or `None` for anything not of that shape.
pub fn from_e2b_key(key: &str) -> Option<String> {
    let rest = key.strip_prefix("e2b_")?;
    if rest.len() != 12 + 64 || !rest.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    Some(format!("hutch_{}_{}", &rest[..12], &rest[12..]))
}

/// The principal behind a bearer token, or `None` for anything unknown, malformed or revoked (one answer for
/// all, so a caller learns nothing about which).
pub fn authenticate(store: &Store, token: &str) -> Result<Option<Principal>, DaemonError> {
    let Some(rest) = token.strip_prefix("hutch_") else { return Ok(None) };
    let Some((id, secret)) = rest.split_once('_') else { return Ok(None) };
    if id.len() != 12 || secret.len() != 64 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Ok(None);
    }
    let Some(row) = store.token(id)? else { return Ok(None) };
    if row.revoked || !constant_time_eq(hash(token).as_bytes(), row.hash.as_bytes()) {
        return Ok(None);
    }
    Ok(Some(Principal { token_id: row.id, name: row.name, admin: row.admin, max_sandboxes: row.max_sandboxes }))
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_stored_hashed_and_checked() {
        let store = Store::open_in_memory().unwrap();
        let t = create_token(&store, "alice", false, Some(3)).unwrap();
        let row = store.token(&t.id).unwrap().unwrap();
        assert!(!row.hash.contains(&t.token[20..]), "the secret is not stored");
        let p = authenticate(&store, &t.token).unwrap().unwrap();
        assert_eq!((p.name.as_str(), p.admin, p.max_sandboxes), ("alice", false, Some(3)));
        // One changed character, a truncated token, garbage: all unknown.
        let mut bad = t.token.clone();
        let last = bad.pop().unwrap();
        bad.push(if last == '0' { '1' } else { '0' });
        assert!(authenticate(&store, &bad).unwrap().is_none());
        assert!(authenticate(&store, &t.token[..40]).unwrap().is_none());
        assert!(authenticate(&store, "hutch_zz_zz").unwrap().is_none());
        assert!(create_token(&store, "alice", false, None).unwrap_err().to_string().contains("already exists"));
        assert!(create_token(&store, "has space", false, None).is_err());
        let e2b = to_e2b_key(&t.token).unwrap();
        assert!(e2b.starts_with("e2b_") && !e2b.contains("hutch"));
        assert_eq!(from_e2b_key(&e2b).as_deref(), Some(t.token.as_str()));
        assert!(from_e2b_key("e2b_123").is_none());
        assert!(store.revoke_token("alice").unwrap());
        assert!(authenticate(&store, &t.token).unwrap().is_none(), "revoked");
    }
}
