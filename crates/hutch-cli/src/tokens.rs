//! `hutch token` and `hutch secret`: administration of a daemon's data directory, done locally (whoever can
//! write that directory already holds every key, so no remote API is needed or offered for it). Safe while
//! the daemon runs: the database takes concurrent writers.

use std::io::Read;
use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use hutch_daemon::secrets::{list_secrets, set_secret, SecretKey};
use hutch_daemon::DataDir;
use zeroize::Zeroizing;

#[derive(Debug, Args, Clone)]
pub struct DataDirArg {
    /// The daemon's state directory (database and secrets key). Default: `$HUTCH_DATA_DIR`, else `daemon/` under
    /// the image cache root (/var/lib/hutch for root).
    #[arg(long = "data-dir")]
    pub data_dir: Option<PathBuf>,
}

impl DataDirArg {
    pub fn resolve(&self) -> anyhow::Result<DataDir> {
        if let Some(d) = &self.data_dir {
            return Ok(DataDir { root: d.clone() });
        }
        let cache = hutch_image::Cache::from_env().context("cannot choose the image cache directory")?;
        Ok(DataDir::from_env_or(cache.root()))
    }
}

#[derive(Debug, Subcommand)]
pub enum TokenCmd {
    /// Mint a token; it is printed once and stored only as a hash.
    Create {
        #[arg(long)]
        name: String,
        /// May see and act on every token's sandboxes.
        #[arg(long)]
        admin: bool,
        /// This token's own limit on concurrent sandboxes (default: the daemon's --per-token).
        #[arg(long, value_parser = clap::value_parser!(u32).range(1..=10000))]
        max_sandboxes: Option<u32>,
        /// Print the token as an E2B API key (`e2b_…`, for E2B_API_KEY); the same token either way.
        #[arg(long)]
        e2b: bool,
        #[command(flatten)]
        dir: DataDirArg,
    },
    /// List tokens (never their secrets).
    Ls {
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        dir: DataDirArg,
    },
    /// Revoke a token by name; requests with it fail from now on.
    Revoke {
        name: String,
        #[command(flatten)]
        dir: DataDirArg,
    },
}

#[derive(Debug, Subcommand)]
pub enum SecretCmd {
    /// Store a secret; its value is read from stdin (one trailing newline dropped).
    Set {
        name: String,
        /// Hosts the secret may be sent to: `a.com,*.b.com`.
        #[arg(long, value_delimiter = ',', required = true)]
        hosts: Vec<String>,
        #[command(flatten)]
        dir: DataDirArg,
    },
    /// List secrets: names and hosts, never values.
    Ls {
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        dir: DataDirArg,
    },
    /// Delete a secret.
    Rm {
        name: String,
        #[command(flatten)]
        dir: DataDirArg,
    },
}

pub fn token(c: TokenCmd) -> anyhow::Result<i32> {
    match c {
        TokenCmd::Create { name, admin, max_sandboxes, e2b, dir } => {
            let store = dir.resolve()?.open_store()?;
            let t = hutch_daemon::auth::create_token(&store, &name, admin, max_sandboxes)?;
            let (shown, var) = match e2b {
                true => (hutch_daemon::auth::to_e2b_key(&t.token).context("the new token has an unexpected shape")?, "E2B_API_KEY"),
                false => (t.token.clone(), "HUTCH_TOKEN"),
            };
            eprintln!("hutch: token {:?} created{}; it is shown only now: export {var}=<it>", t.name, if admin { " (admin)" } else { "" });
            println!("{shown}");
            Ok(0)
        }
        TokenCmd::Ls { json, dir } => {
            let store = dir.resolve()?.open_store()?;
            let rows = store.tokens()?;
            if json {
                let v: Vec<_> = rows
                    .iter()
                    .map(|t| serde_json::json!({"id": t.id, "name": t.name, "admin": t.admin, "max_sandboxes": t.max_sandboxes, "created_ms": t.created_ms, "revoked": t.revoked}))
                    .collect();
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                println!("{:<14} {:<24} {:<6} {:>8} STATUS", "ID", "NAME", "ADMIN", "MAX");
                for t in rows {
                    let max = t.max_sandboxes.map(|n| n.to_string()).unwrap_or_else(|| "default".into());
                    println!("{:<14} {:<24} {:<6} {:>8} {}", t.id, t.name, t.admin, max, if t.revoked { "revoked" } else { "active" });
                }
            }
            Ok(0)
        }
        TokenCmd::Revoke { name, dir } => {
            let store = dir.resolve()?.open_store()?;
            if !store.revoke_token(&name)? {
                bail!("no active token named {name:?} (see `hutch token ls`)");
            }
            println!("revoked {name}");
            Ok(0)
        }
    }
}

pub fn secret(c: SecretCmd) -> anyhow::Result<i32> {
    match c {
        SecretCmd::Set { name, hosts, dir } => {
            let dd = dir.resolve()?;
            let store = dd.open_store()?;
            let key = SecretKey::load_or_create(&dd.secret_key())?;
            let mut value = Zeroizing::new(String::new());
            std::io::stdin().read_to_string(&mut value).context("read the secret's value from stdin")?;
            let mut v = Zeroizing::new(value.trim_end_matches(['\n', '\r']).to_string());
            if v.is_empty() {
                bail!("no value on stdin: pipe it in, e.g. `printf %s \"$TOKEN\" | hutch secret set {name} --hosts ...`");
            }
            set_secret(&store, &key, &name, &hosts, std::mem::take(&mut v))?;
            println!("stored {name} (sent only to {})", hosts.join(", "));
            Ok(0)
        }
        SecretCmd::Ls { json, dir } => {
            let store = dir.resolve()?.open_store()?;
            let list = list_secrets(&store)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&list)?);
            } else {
                println!("{:<32} HOSTS", "NAME");
                for s in list {
                    println!("{:<32} {}", s.name, s.hosts.join(","));
                }
            }
            Ok(0)
        }
        SecretCmd::Rm { name, dir } => {
            let store = dir.resolve()?.open_store()?;
            if !store.delete_secret(&name)? {
                bail!("no secret named {name:?} (see `hutch secret ls`)");
            }
            println!("removed {name}");
            Ok(0)
        }
    }
}
