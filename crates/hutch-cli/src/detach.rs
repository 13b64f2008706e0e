//! `hutch run --detach -- CMD`: the command in a sandbox on a `hutch serve` daemon (`$HUTCH_URL`, `$HUTCH_TOKEN`),
//! on a terminal session that outlives this client. Inside a git work tree the snapshot `hutch run` takes goes
//! with it (as a bundle of its commit: the daemon makes the same workspace image from it), and the daemon
//! collects and checks the change when the command ends, then destroys the sandbox; `hutch diff/apply --from ID`
//! fetch the change (see `fetch`). Prints the sandbox id and returns at once.

use std::collections::BTreeMap;

use anyhow::{bail, Context};
use futures::StreamExt;
use hutch_daemon::model::{CreateSandbox, PolicySpec, SandboxInfo, ServerMsg, StreamExec, TtySize};
use hutch_daemon::repo::RepoCreate;
use hutch_daemon::terminal::TerminalAttach;
use tokio_tungstenite::tungstenite::Message;

use hutch_repo::{HostRepo, Snapshot};

use crate::cli::{ImageName, RunArgs};
use crate::remote::{Api, Conn};

/// The daemon from the environment, as the client commands find it (`HUTCH_URL`, `HUTCH_CA_CERT`).
pub fn conn_from_env() -> anyhow::Result<Conn> {
    let url = std::env::var("HUTCH_URL").ok().filter(|u| !u.is_empty()).unwrap_or_else(|| "http://127.0.0.1:7707".into());
    let url = crate::remote::parse_url(&url).map_err(|e| anyhow::anyhow!("HUTCH_URL: {e}"))?;
    let ca_cert = std::env::var_os("HUTCH_CA_CERT").filter(|c| !c.is_empty()).map(Into::into);
    Ok(Conn { url, ca_cert })
}

/// `hutch run` flags a daemon sandbox cannot honour, each refused by name before anything is sent.
fn refuse_unsupported(a: &RunArgs) -> anyhow::Result<()> {
    let e = &a.egress;
    let used: [(bool, &str); 20] = [
        (a.vm.image != ImageName::Default, "--image (the daemon has its default image)"),
        (a.vm.accel.is_some(), "--accel"),
        (!a.copy_in.is_empty(), "--copy-in (use `hutch cp` once it runs)"),
        (!a.copy_out.is_empty(), "--copy-out (use `hutch cp` while it runs)"),
        (e.policy.is_some(), "--policy (give --allow)"),
        (!e.resolve.is_empty(), "--resolve"),
        (!e.upstream_ca.is_empty(), "--upstream-ca"),
        (!e.secret.is_empty() || !e.secret_preset.is_empty(), "--secret/--secret-preset (the daemon's secrets are `hutch secret set` on its host)"),
        (e.inspect_all, "--inspect-all"),
        (!e.setup_allow.is_empty() || !e.setup_secret.is_empty() || !e.setup_secret_preset.is_empty(), "--setup-allow/--setup-secret"),
        (!e.env_file.is_empty(), "--env-file"),
        (e.audit.is_some(), "--audit (`hutch logs ID` shows the daemon's)"),
        (a.repo.setup.is_some(), "--setup"),
        (a.repo.apply, "--apply (`hutch apply --from ID` once it ended)"),
        (a.cache.maintenance.is_some() || !a.cache.cache_input.is_empty() || a.cache.refresh_cache, "the environment cache flags"),
        (a.cold, "--cold"),
        (!a.kernel_args.is_empty(), "--kernel-arg"),
        (a.no_tty, "-T/--no-tty (a detached command runs on a terminal)"),
        (a.tty, "-t/--tty (a detached command always has a terminal)"),
        (a.copy_out_max != 1 << 30, "--copy-out-max"),
    ];
    let bad: Vec<&str> = used.iter().filter(|(u, _)| *u).map(|(_, n)| *n).collect();
    if !bad.is_empty() {
        bail!("hutch run --detach runs the command on a daemon, which does not take {}", bad.join(", "));
    }
    Ok(())
}

/// `POST /v1/sandboxes/repo`: the request as a JSON line, then the snapshot's bundle (streamed from the
/// snapshot's own scratch directory, which goes when `snap` does).
pub async fn create_with_repo(api: &Api, rc: &RepoCreate, snap: Option<&Snapshot>) -> anyhow::Result<SandboxInfo> {
    let mut line = serde_json::to_vec(rc).context("encode the request")?;
    line.push(b'\n');
    let rb = api.req(reqwest::Method::POST, "/v1/sandboxes/repo").header("content-type", "application/octet-stream");
    let rb = match snap {
        Some(snap) => {
            let bundle = snap.dir().join("upload.bundle");
            let size = snap.write_bundle(&bundle).context("packing the working-tree snapshot")?;
            let file = tokio::fs::File::open(&bundle).await.with_context(|| format!("open {}", bundle.display()))?;
            let total = line.len() as u64 + size;
            let head = futures::stream::once(async move { Ok::<_, std::io::Error>(tokio_util::bytes::Bytes::from(line)) });
            rb.header("content-length", total).body(reqwest::Body::wrap_stream(head.chain(tokio_util::io::ReaderStream::new(file))))
        }
        None => rb.body(line),
    };
    api.send(rb).await?.json().await.context("the daemon's answer is not what this hutch expects")
}

/// `hutch create --repo`: the current work tree's snapshot (credential files left out as by `hutch run`, with
/// the user's `[credentials]`), for a sandbox that keeps running after its commands.
pub fn snapshot_here() -> anyhow::Result<(HostRepo, Snapshot)> {
    let cwd = std::env::current_dir().context("cannot read the current directory")?;
    let repo = HostRepo::discover(&cwd)?.ok_or_else(|| anyhow::anyhow!("--repo: {} is not inside a git work tree", cwd.display()))?;
    let user = crate::config::UserConfig::load(None)?;
    let filter = hutch_repo::CredentialFilter::new(vec![user.credentials.clone()]);
    let snap = Snapshot::take_commit(&repo, &filter).context("taking a snapshot of the working tree")?;
    for p in &snap.left_out {
        eprintln!("hutch: left out of the VM: {} (credential file)", hutch_repo::path::show(p));
    }
    Ok((repo, snap))
}

pub async fn run(a: RunArgs) -> anyhow::Result<i32> {
    refuse_unsupported(&a)?;
    let api = Api::new(&conn_from_env()?)?;
    let user = crate::config::UserConfig::load(a.config.as_deref())?;
    let mut repo = crate::repo::RunRepo::prepare(&a, &user.credentials)?;
    if repo.has_setup() {
        bail!("this repository's approved hutch.toml has a setup script, which hutch run --detach does not run; use `hutch run` here, or --no-project-config");
    }
    if repo.project().is_some() {
        eprintln!("hutch: warning: the approved hutch.toml's policy and resources are not applied on the daemon; give --allow, --cpus, --memory");
    }
    let taken = repo.snapshot_commit()?;
    let policy = if a.egress.allow.is_empty() {
        None
    } else {
        Some(PolicySpec { allow: a.egress.allow.iter().map(|s| crate::remote::allow_spec(s)).collect::<Result<_, _>>()? })
    };
    let sandbox = CreateSandbox {
        image: None,
        cpus: Some(a.vm.cpus),
        memory_mib: Some(a.vm.memory),
        ttl_secs: a.timeout.map(|t| t.as_secs().max(1)),
        env: BTreeMap::new(),
        policy,
        secrets: vec![],
        secret_headers: BTreeMap::new(),
        labels: BTreeMap::from([("hutch.run".to_string(), "detach".to_string())]),
        setup: None,
    };
    let rc = RepoCreate { sandbox, snapshot: taken.as_ref().map(|(r, s)| s.spec(r)), end_with_command: true };
    let t0 = std::time::Instant::now();
    let info = create_with_repo(&api, &rc, taken.as_ref().map(|(_, s)| s)).await?;
    tracing::debug!(ms = t0.elapsed().as_millis() as u64, "detach: sandbox created");
    let id = info.id;

    let mut env: BTreeMap<String, String> = crate::image::default_env(a.vm.image).into_iter().collect();
    env.extend(a.env.iter().cloned());
    for (k, v) in crate::term::user_env() {
        env.entry(k).or_insert(v);
    }
    let cwd = a.workdir.clone().or_else(|| taken.as_ref().map(|(r, _)| hutch_repo::guest::guest_cwd(&r.prefix)));
    let s = crate::term::size();
    let first = TerminalAttach {
        start: Some(StreamExec { argv: a.command.clone(), env, cwd, tty: None, stdin: None }),
        size: TtySize { rows: s.rows, cols: s.cols },
        detach: true,
    };
    let started = async {
        let mut ws = api.ws(&format!("/v1/sandboxes/{id}/terminal/ws"), &first).await?;
        match ws.next().await {
            Some(Ok(Message::Text(t))) => match serde_json::from_str::<ServerMsg>(&t) {
                Ok(ServerMsg::Started { .. }) => anyhow::Ok(()),
                Ok(ServerMsg::Error { message }) => bail!("{}", hutch_text::escape_lines(message.as_bytes())),
                _ => bail!("the daemon answered something unexpected"),
            },
            _ => bail!("the daemon closed the session without an answer"),
        }
    }
    .await;
    if let Err(e) = started {
        // Nothing is left behind: the sandbox made for this command goes with it.
        let _ = api.send(api.req(reqwest::Method::DELETE, &format!("/v1/sandboxes/{id}"))).await;
        return Err(e.context(format!("starting the command in sandbox {id} (the sandbox was removed)")));
    }
    println!("{id}");
    eprintln!("hutch: started in sandbox {id} on {}; `hutch attach {id}` joins it (Enter ~ . detaches again)", api.base);
    if taken.is_some() {
        eprintln!("hutch: when the command ends its change is collected and the sandbox destroyed; then `hutch diff --from {id}` and `hutch apply --from {id}` here");
    } else {
        eprintln!("hutch: the sandbox is destroyed when the command ends");
    }
    Ok(0)
}
