//! Identities of unix-socket peers: the uid the kernel reports (`SO_PEERCRED`) is a user, and each user is the
//! token named `USER@unix`, so sandboxes, quotas and isolation work exactly as for bearer tokens. The token is
//! made on the user's first connection (its secret is thrown away: it is never used as a bearer token) unless an
//! administrator made it first, e.g. with `--max-sandboxes`; a revoked one refuses the user. Root (uid 0) is an
//! admin identity; every other user is an ordinary one.

use crate::auth::Principal;
use crate::store::Store;
use crate::DaemonError;

/// The token name that stands for `uid`: `USER@unix` by the passwd name, `uidN@unix` without one.
pub fn token_name(uid: u32) -> String {
    let name = nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid)).ok().flatten().map(|u| u.name);
    // A passwd name that token names cannot spell (they are letters, digits, - _ . @) falls back to the uid.
    match name.filter(|n| crate::auth::check_token_name(&format!("{n}@unix")).is_ok()) {
        Some(n) => format!("{n}@unix"),
        None => format!("uid{uid}@unix"),
    }
}

/// The principal of the unix peer `uid`, making its token on first use. `Err` says why the peer is refused.
pub fn principal_for_uid(store: &Store, uid: u32) -> Result<Principal, String> {
    let name = token_name(uid);
    let find = || -> Result<Option<crate::store::TokenRow>, String> {
        Ok(store.tokens().map_err(|e| e.to_string())?.into_iter().find(|t| t.name == name))
    };
    let row = match find()? {
        Some(row) => row,
        None => {
            match crate::auth::create_token(store, &name, uid == 0, None) {
                // Another connection of the same user may have made it meanwhile.
                Ok(_) | Err(DaemonError::Conflict(_)) => {}
                Err(e) => return Err(e.to_string()),
            }
            find()?.ok_or_else(|| format!("the token {name} could not be made"))?
        }
    };
    if row.revoked {
        return Err(format!("the token {name} is revoked"));
    }
    Ok(Principal { token_id: row.id, name: row.name, admin: row.admin, max_sandboxes: row.max_sandboxes })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn a_uid_is_one_token_made_once_and_root_is_admin() {
        let store = Store::open_in_memory().unwrap();
        let a = principal_for_uid(&store, 0).unwrap();
        assert!(a.admin && a.name == "root@unix");
        let b = principal_for_uid(&store, 0).unwrap();
        assert_eq!(a.token_id, b.token_id);
        let u = principal_for_uid(&store, 4_000_000).unwrap();
        assert!(!u.admin && u.name == "uid4000000@unix" && u.token_id != a.token_id);
        store.revoke_token("uid4000000@unix").unwrap();
        assert!(principal_for_uid(&store, 4_000_000).unwrap_err().contains("revoked"));
    }
}
