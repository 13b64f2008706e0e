//! One delivery, step by step: inputs checked; a private bare work repository (hutch-repo's git: no hooks,
//! config programs or helpers); the base fetched into it; the collected bundle and patch put through hutch-repo's
//! checks; sensitive paths held back unless allowed (then the change becomes one commit on the base with their
//! base version kept); the push to `hutch/<run_id>`; the pull request and the comment.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use hutch_repo::git::{init_scratch, Git};
use hutch_repo::{Collected, Limits, Oid, RepoError, Sensitive, Start};

use crate::api::Api;
use crate::body::{self, Report};
use crate::retry;
use crate::{remote, Delivered, DeliveryPlan, ForgeError, ForgeRepo, RetryPolicy, SecretToken};

/// A name part of a forge URL path (owner, repository) or a run id: no separators, no leading dot.
fn plain_name(s: &str) -> bool {
    !s.is_empty() && s.len() <= 100 && !s.starts_with('.') && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
}

/// A branch name git and the forge both take, written in a conservative alphabet.
fn branch_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 200
        && !s.starts_with(['-', '/', '.'])
        && !s.ends_with(['/', '.'])
        && !s.ends_with(".lock")
        && !s.contains("..")
        && !s.contains("//")
        && !s.contains("/.")
        && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_./".contains(&b))
}

/// An `https://` URL with a host, no user or password, query or fragment; its text as given.
fn https_url(what: &str, url: &str) -> Result<(), ForgeError> {
    let bad = |why: &str| Err(ForgeError::Config(format!("the forge's {what} {:?} {why}", hutch_text::shorten(&hutch_text::escape(url), 200))));
    let Ok(u) = url.parse::<http::Uri>() else { return bad("is not a URL") };
    if u.scheme_str() != Some("https") {
        return bad("must start with https://");
    }
    let Some(auth) = u.authority() else { return bad("has no host") };
    if auth.as_str().contains('@') {
        return bad("must not hold a user name or password (the token is given separately)");
    }
    if u.query().is_some() || url.contains('#') {
        return bad("must not have a query or fragment");
    }
    if !url.bytes().all(|b| b.is_ascii_graphic()) {
        return bad("must be visible ASCII");
    }
    Ok(())
}

fn check_inputs(repo: &ForgeRepo, plan: &DeliveryPlan) -> Result<(), ForgeError> {
    https_url("API base", &repo.api_base)?;
    https_url("clone URL", &repo.clone_url)?;
    for (what, v) in [("owner", &repo.owner), ("repository name", &repo.name)] {
        if !plain_name(v) {
            return Err(ForgeError::Config(format!(
                "the forge {what} {:?} must be letters, digits, '-', '_' or '.'",
                hutch_text::escape(v)
            )));
        }
    }
    if !plain_name(&plan.run_id) {
        return Err(ForgeError::Config(format!(
            "the run id {:?} must be letters, digits, '-', '_' or '.' (it names the branch hutch/<run_id>)",
            hutch_text::escape(&plan.run_id)
        )));
    }
    if Oid::parse(&plan.base_ref).is_none() && !branch_name(&plan.base_ref) {
        return Err(ForgeError::Config(format!(
            "the base ref {:?} is neither a commit id nor a branch name (letters, digits, '-', '_', '.', '/')",
            hutch_text::escape(&plan.base_ref)
        )));
    }
    if plan.open_pull_request && Oid::parse(&plan.base_ref).is_some() {
        return Err(ForgeError::Config(format!(
            "a pull request needs a branch to merge into, and the base ref {} is a commit; clone a branch or turn the pull request off",
            plan.base_ref
        )));
    }
    if plan.title.trim().is_empty() || plan.title.len() > 256 || plan.title.contains(['\n', '\r']) {
        return Err(ForgeError::Config("the title must be one line of 1 to 256 bytes".into()));
    }
    if plan.comment_on_issue == Some(0) {
        return Err(ForgeError::Config("issue numbers start at 1".into()));
    }
    Ok(())
}

/// The files `hutch_repo::collect` left in the result directory, as its `Collected`. A name that exists but is
/// not a plain file is refused.
fn collected(plan: &DeliveryPlan) -> Result<Collected, ForgeError> {
    let file = |name: &str| -> Result<Option<std::path::PathBuf>, ForgeError> {
        let p = plan.result_dir.join(name);
        match std::fs::symlink_metadata(&p) {
            Ok(m) if m.file_type().is_file() => Ok(Some(p)),
            Ok(_) => Err(ForgeError::Config(format!("{} is not a plain file", p.display()))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(ForgeError::Io { what: format!("cannot read {}", p.display()), message: e.to_string() }),
        }
    };
    if !plan.result_dir.is_dir() {
        return Err(ForgeError::Config(format!("the result directory {} does not exist", plan.result_dir.display())));
    }
    Ok(Collected { head: plan.vm_head.clone(), bundle: file("commits.bundle")?, patch: file("changes.patch")?, git_meta_changed: vec![] })
}

/// What the checked change becomes: the commit to push and the sensitive paths left out or let through.
struct Outcome {
    commit: Option<Oid>,
    held_back: Vec<Sensitive>,
    allowed: Vec<Sensitive>,
    diffstat: String,
}

fn oid(s: &str, action: &str) -> Result<Oid, ForgeError> {
    Oid::parse(s).ok_or_else(|| ForgeError::Repo(RepoError::Git { action: action.into(), stderr: format!("unexpected output {s:?}") }))
}

/// Every sensitive path the change touches: in the combined change and in each of the VM's commits (a path
/// added and removed again by its commits is in the history that a push would deliver). Raw path bytes kept,
/// for putting the base version back.
fn sensitive_paths(g: &Git, checked: &hutch_repo::Checked, empty_tree: &str) -> Result<Vec<(Vec<u8>, Sensitive)>, ForgeError> {
    let mut raw: Vec<Vec<u8>> = checked.applied.all_paths();
    for (c, parent) in &checked.commits {
        let out = g.run("diff-tree", ["diff-tree", "-r", "-z", "--name-only", "--no-renames", parent.as_deref().unwrap_or(empty_tree), c])?;
        raw.extend(out.split(|&b| b == 0).filter(|p| !p.is_empty()).map(<[u8]>::to_vec));
    }
    raw.sort();
    raw.dedup();
    Ok(raw
        .into_iter()
        .filter_map(|p| {
            let kind = hutch_repo::sensitive::classify(&p)?;
            let path = hutch_repo::path::show(&p);
            Some((p, Sensitive { path, kind }))
        })
        .collect())
}

/// Builds the commit to push from the checked change, in the work repository.
fn build(g: &Git, scratch: &Path, plan: &DeliveryPlan, checked: &hutch_repo::Checked) -> Result<Outcome, ForgeError> {
    let base = plan.base_commit.as_str();
    let empty_tree = g.line("hash-object", ["hash-object", "-t", "tree", "/dev/null"])?;
    let sensitive = sensitive_paths(g, checked, &empty_tree)?;
    let hold = !plan.allow_sensitive && !sensitive.is_empty();
    let message = format!("{}\n\nDelivered by hutch for run {}.", plan.title.trim(), plan.run_id);
    let commit_tree = |tree: &str, parent: &str, message: &str| -> Result<Oid, ForgeError> {
        let out = g.run_input("commit-tree", ["commit-tree", tree, "-p", parent, "-F", "-"], Some(message.as_bytes()))?;
        oid(String::from_utf8_lossy(&out).trim(), "commit-tree")
    };

    let (commit, held_back, allowed) = if hold {
        // One commit on the base: the final tree with every sensitive path at its base version (or absent).
        let index = scratch.join("deliver.index");
        let gi = g.clone().index(&index);
        gi.run("read-tree", ["read-tree", checked.final_tree.as_str()])?;
        let mut info = Vec::new();
        for (p, _) in &sensitive {
            let literal = OsStr::from_bytes(p);
            let entry = gi.run("ls-tree", [OsStr::new("--literal-pathspecs"), OsStr::new("ls-tree"), OsStr::new("-z"), OsStr::new(base), OsStr::new("--"), literal])?;
            // `<mode> SP <type> SP <oid> TAB <path> NUL`, or nothing when the base has no such path.
            match entry.split(|&b| b == 0).find(|e| !e.is_empty()) {
                Some(e) => {
                    let tab = e.iter().position(|&b| b == b'\t').unwrap_or(e.len());
                    let head = String::from_utf8_lossy(&e[..tab]);
                    let mut it = head.split(' ');
                    let (mode, kind, obj) = (it.next().unwrap_or(""), it.next().unwrap_or(""), it.next().unwrap_or(""));
                    if kind != "blob" {
                        continue;
                    }
                    info.extend_from_slice(format!("{mode} {obj}\t").as_bytes());
                }
                None => info.extend_from_slice(format!("0 {}\t", "0".repeat(base.len())).as_bytes()),
            }
            info.extend_from_slice(p);
            info.push(0);
        }
        gi.run_input("update-index", ["update-index", "-z", "--index-info"], Some(&info))?;
        let tree = gi.line("write-tree", ["write-tree"])?;
        let _ = std::fs::remove_file(&index);
        let base_tree = g.line("rev-parse", ["rev-parse", &format!("{base}^{{tree}}")])?;
        let held: Vec<Sensitive> = sensitive.into_iter().map(|(_, s)| s).collect();
        if tree == base_tree {
            (None, held, vec![])
        } else {
            let message = format!(
                "{message}\n\nHeld back (sensitive paths this trigger may not change):\n{}",
                held.iter().map(|s| format!("  {} ({})", s.path, s.kind)).collect::<Vec<_>>().join("\n")
            );
            (Some(commit_tree(&tree, base, &message)?), held, vec![])
        }
    } else {
        let allowed: Vec<Sensitive> = sensitive.into_iter().map(|(_, s)| s).collect();
        let vm_head = plan.vm_head.as_ref().map(Oid::as_str);
        let descends = match vm_head {
            Some(h) if !checked.commits.is_empty() => g.ok(["merge-base", "--is-ancestor", base, h]),
            _ => false,
        };
        let commit = match vm_head {
            // The VM's own commits, plus one for what it left uncommitted.
            Some(h) if descends => {
                let head_tree = g.line("rev-parse", ["rev-parse", &format!("{h}^{{tree}}")])?;
                if head_tree == checked.final_tree {
                    oid(h, "rev-parse")?
                } else {
                    commit_tree(&checked.final_tree, h, &format!("{message}\n\nChanges the run left uncommitted."))?
                }
            }
            // No commits, or history that does not grow from the base: the final tree as one commit on it.
            _ => commit_tree(&checked.final_tree, base, &message)?,
        };
        (Some(commit), vec![], allowed)
    };
    let diffstat = match &commit {
        Some(c) => {
            let out = g.run("diff-tree --stat", ["diff-tree", "--stat=100", "--no-color", base, c.as_str()])?;
            hutch_text::escape_lines(&out).trim_end().to_string()
        }
        None => String::new(),
    };
    Ok(Outcome { commit, held_back, allowed, diffstat })
}

pub(crate) async fn deliver(repo: &ForgeRepo, token: &SecretToken, plan: &DeliveryPlan, policy: RetryPolicy) -> Result<Delivered, ForgeError> {
    check_inputs(repo, plan)?;
    let collected = collected(plan)?;
    let api = Api::new(repo, token)?;
    let format = if plan.base_commit.as_str().len() == 64 { "sha256" } else { "sha1" };
    let scratch = tempfile::Builder::new()
        .prefix("hutch-forge-")
        .tempdir()
        .map_err(|e| ForgeError::Io { what: "cannot create a work directory".into(), message: e.to_string() })?;
    let gd = scratch.path().join("git");
    let g = init_scratch(&gd, format)?;
    let cfg = remote::write_config(repo, token)?;
    let net = g.clone().remote_https(cfg.path());

    // The base, fetched with the token: the branch the VM cloned when it still has the commit, else the commit.
    let base = plan.base_commit.clone();
    let fetch = |spec: String| {
        let args = vec![
            "fetch".to_string(),
            "-q".into(),
            "--no-tags".into(),
            "--no-write-fetch-head".into(),
            "--no-recurse-submodules".into(),
            repo.clone_url.clone(),
            spec,
        ];
        let net = &net;
        async move { remote::run(net, "fetch", "fetching the base", args, token).await }
    };
    if Oid::parse(&plan.base_ref).is_none() {
        let spec = format!("+refs/heads/{}:refs/hutch/base", plan.base_ref);
        retry::run(policy, "fetching the base", || fetch(spec.clone())).await?;
    }
    if !g.ok(["cat-file", "-e", &format!("{base}^{{commit}}")]) {
        let spec = format!("{base}:refs/hutch/base-commit");
        retry::run(policy, "fetching the base commit", || fetch(spec.clone())).await?;
    }
    if !g.ok(["cat-file", "-e", &format!("{base}^{{commit}}")]) {
        return Err(ForgeError::Rejected {
            what: "fetching the base".into(),
            status: 404,
            message: format!("the forge does not have the base commit {base}"),
        });
    }

    // hutch-repo's checks, exactly as for `hutch run`.
    let base_tree = oid(&g.line("rev-parse", ["rev-parse", &format!("{base}^{{tree}}")])?, "rev-parse")?;
    let start = Start { base: Some(&base), commit: &base, tree: &base_tree };
    let checked = hutch_repo::check(&g, start, scratch.path(), &collected, &Limits::default())?;
    let outcome = if checked.is_empty() {
        Outcome { commit: None, held_back: vec![], allowed: vec![], diffstat: String::new() }
    } else {
        build(&g, scratch.path(), plan, &checked)?
    };

    let mut delivered = Delivered {
        branch: None,
        commit: outcome.commit.clone(),
        pull_request: None,
        comment: None,
        held_back: outcome.held_back.clone(),
        diffstat: outcome.diffstat.clone(),
    };
    if let Some(commit) = &outcome.commit {
        let branch = format!("hutch/{}", plan.run_id);
        // Forced: a delivery tried again after a restart makes a new commit for the same branch, which is hutch's own.
        let args = vec![
            "push".to_string(),
            "-q".into(),
            "--no-verify".into(),
            "--no-recurse-submodules".into(),
            repo.clone_url.clone(),
            format!("+{commit}:refs/heads/{branch}"),
        ];
        retry::run(policy, "pushing the branch", || remote::run(&net, "push", "pushing the branch", args.clone(), token)).await?;
        tracing::info!(branch, commit = %commit, "pushed");
        delivered.branch = Some(branch);
    }
    drop(cfg);

    let branch = delivered.branch.clone();
    let mut report = Report {
        run_id: &plan.run_id,
        summary: &plan.summary,
        diffstat: &outcome.diffstat,
        held_back: &outcome.held_back,
        allowed: &outcome.allowed,
        branch: branch.as_deref(),
        pull: None,
    };
    let mut pull = None;
    if plan.open_pull_request {
        if let Some(branch) = &branch {
            let text = body::pull_body(&report);
            let pr = open_pull(&api, repo, branch, plan, &text, policy).await?;
            tracing::info!(number = pr.0, "pull request opened");
            pull = Some(pr);
        }
    }
    report.pull = pull.as_ref();
    if let Some(issue) = plan.comment_on_issue {
        let text = body::comment_body(&report);
        delivered.comment = Some(api.comment(issue, &text, policy).await?);
    }
    delivered.pull_request = pull;
    Ok(delivered)
}

/// Opens the pull request. A 422 after an earlier try failed may mean that try went through with its answer
/// lost, so an open pull request for the branch is looked up before the 422 is reported.
async fn open_pull(api: &Api<'_>, repo: &ForgeRepo, branch: &str, plan: &DeliveryPlan, text: &str, policy: RetryPolicy) -> Result<(u64, String), ForgeError> {
    match api.open_pull(branch, &plan.base_ref, plan.title.trim(), text, policy).await {
        Err(ForgeError::Rejected { status: 422, what, message }) => match api.find_pull(&repo.owner, branch, policy).await? {
            Some(p) => Ok(p),
            None => Err(ForgeError::Rejected { status: 422, what, message }),
        },
        other => other,
    }
}
