//! One webhook delivery, from raw bytes to a decision: the signature checked over the raw body in constant time
//! (before anything parses it), then the JSON read, then the trigger's filters, then the job's values read from
//! the fields the trigger names. What comes out ([`Planned`]) holds only checked values; the payload itself
//! goes to the VM as a file, never into a command line.

use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use subtle::ConstantTimeEq;

use super::config::{check_ref, parse_repo, FieldPath, Source, Trigger, Value};

/// Whether `header` (`sha256=<hex>`) is the HMAC-SHA256 of `body` under `key`. Compared in constant time.
pub fn signature_ok(key: &[u8], body: &[u8], header: Option<&str>) -> bool {
    let Some(hex_sig) = header.and_then(|h| h.trim().strip_prefix("sha256=")) else { return false };
    let Ok(given) = hex::decode(hex_sig) else { return false };
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(key) else { return false };
    mac.update(body);
    let want = mac.finalize().into_bytes();
    given.len() == want.len() && bool::from(given.ct_eq(&want))
}

/// `sha256=<hex>` for `body` under `key` (what a sender puts in `X-Hub-Signature-256`).
pub fn sign(key: &[u8], body: &[u8]) -> String {
    let mut mac = match Hmac::<Sha256>::new_from_slice(key) {
        Ok(m) => m,
        Err(_) => return String::new(),
    };
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

/// The values a run is made from, read from an event and checked.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Planned {
    pub owner: String,
    pub repo: String,
    pub git_ref: String,
    pub issue: Option<u64>,
    pub concurrency_key: Option<String>,
    /// The comment's text after the prefix (attacker-controlled: it reaches the VM as a file and a variable).
    pub prompt: Option<String>,
    pub author: Option<String>,
    pub action: Option<String>,
}

/// What a trigger says about an event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Run(Planned),
    /// Filtered out (not an error: the sender did nothing wrong), with why.
    Skip(String),
}

fn str_at<'a>(v: &'a serde_json::Value, path: &[&str]) -> Option<&'a str> {
    path.iter().try_fold(v, |v, k| v.get(k)).and_then(|v| v.as_str())
}

/// A scalar field as text (strings as they are, numbers printed); `None` for anything else.
fn scalar(v: &serde_json::Value, f: &FieldPath) -> Option<String> {
    match f.get(v)? {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// What GitHub's payloads say about the event, for the filters.
struct Facts {
    action: Option<String>,
    repository: Option<String>,
    branch: Option<String>,
    labels: Vec<String>,
    comment: Option<String>,
    author: Option<String>,
}

fn github_facts(event: &str, p: &serde_json::Value) -> Facts {
    let branch = match event {
        "push" => str_at(p, &["ref"]).and_then(|r| r.strip_prefix("refs/heads/")).map(str::to_string),
        "pull_request" | "pull_request_review" | "pull_request_review_comment" => str_at(p, &["pull_request", "base", "ref"]).map(str::to_string),
        "check_run" => str_at(p, &["check_run", "check_suite", "head_branch"]).map(str::to_string),
        "check_suite" => str_at(p, &["check_suite", "head_branch"]).map(str::to_string),
        "workflow_run" => str_at(p, &["workflow_run", "head_branch"]).map(str::to_string),
        _ => None,
    };
    let mut labels: Vec<String> = ["issue", "pull_request"]
        .iter()
        .filter_map(|k| p.get(k).and_then(|i| i.get("labels")).and_then(|l| l.as_array()))
        .flatten()
        .filter_map(|l| l.get("name").and_then(|n| n.as_str()).map(str::to_string))
        .collect();
    if let Some(l) = str_at(p, &["label", "name"]) {
        labels.push(l.to_string());
    }
    let author = str_at(p, &["comment", "user", "login"]).or_else(|| str_at(p, &["sender", "login"])).map(str::to_string);
    Facts {
        action: str_at(p, &["action"]).map(str::to_string),
        repository: str_at(p, &["repository", "full_name"]).map(str::to_string),
        branch,
        labels,
        comment: str_at(p, &["comment", "body"]).map(str::to_string),
        author,
    }
}

/// Applies `t`'s filters and reads its job values from `payload`. `event` is `X-GitHub-Event` for GitHub
/// sources (ignored otherwise).
pub fn decide(t: &Trigger, event: &str, payload: &serde_json::Value) -> Decision {
    let skip = |why: String| Decision::Skip(why);
    let f = &t.filter;
    let github = matches!(t.source, Source::GitHub { .. });
    let facts = if github {
        github_facts(event, payload)
    } else {
        Facts {
            action: str_at(payload, &["action"]).map(str::to_string),
            repository: None,
            branch: str_at(payload, &["branch"]).or_else(|| str_at(payload, &["ref"]).and_then(|r| r.strip_prefix("refs/heads/"))).map(str::to_string),
            labels: vec![],
            comment: None,
            author: None,
        }
    };
    if github && !f.events.is_empty() && !f.events.iter().any(|e| e == event) {
        return skip(format!("event {} is not one of {:?}", hutch_text::escape(event), f.events));
    }
    if !f.actions.is_empty() && !facts.action.as_ref().is_some_and(|a| f.actions.contains(a)) {
        return skip(format!("action {} is not one of {:?}", hutch_text::escape(facts.action.as_deref().unwrap_or("(none)")), f.actions));
    }
    // The repository: from the field the job names, and one the trigger lists.
    let (owner, repo) = match &t.job.repository {
        Value::Fixed((o, r)) => (o.clone(), r.clone()),
        Value::Field(path) => {
            let Some(full) = scalar(payload, path).or(facts.repository.clone()) else {
                return skip(format!("the payload has no repository at {}", path.text()));
            };
            let Some((o, r)) = parse_repo(&full) else {
                return skip(format!("{} at {} is not OWNER/NAME", hutch_text::escape(&full), path.text()));
            };
            (o, r)
        }
    };
    let full = format!("{owner}/{repo}").to_ascii_lowercase();
    if !f.repositories.is_empty() && !f.repositories.contains(&full) {
        return skip(format!("repository {full} is not one of {:?}", f.repositories));
    }
    if !f.branches.is_empty() && !facts.branch.as_ref().is_some_and(|b| f.branches.contains(b)) {
        return skip(format!("branch {} is not one of {:?}", hutch_text::escape(facts.branch.as_deref().unwrap_or("(none)")), f.branches));
    }
    if !f.labels.is_empty() && !facts.labels.iter().any(|l| f.labels.contains(l)) {
        return skip(format!("no label of {:?}", f.labels));
    }
    let mut prompt = None;
    if let Some(prefix) = &f.comment_prefix {
        let Some(body) = facts.comment.as_deref() else { return skip("the event carries no comment".into()) };
        let body = body.trim_start();
        match body.strip_prefix(prefix.as_str()) {
            // `/hutch` but not `/hutchfoo`.
            Some(rest) if rest.is_empty() || rest.starts_with(char::is_whitespace) => prompt = Some(rest.trim().to_string()),
            _ => return skip(format!("the comment does not start with {prefix:?}")),
        }
    }
    if !f.authors.is_empty() {
        let who = facts.author.as_deref().map(str::to_ascii_lowercase);
        if !who.as_ref().is_some_and(|w| f.authors.contains(w)) {
            return skip(format!("author {} is not on the trigger's allowlist", hutch_text::escape(facts.author.as_deref().unwrap_or("(unknown)"))));
        }
    }
    let git_ref = match &t.job.git_ref {
        Value::Fixed(r) => r.clone(),
        Value::Field(path) => match scalar(payload, path) {
            Some(r) if check_ref(&r) => r,
            Some(r) => return skip(format!("{} at {} is not a branch or tag name hutch accepts", hutch_text::escape(&r), path.text())),
            None => return skip(format!("the payload has no ref at {}", path.text())),
        },
    };
    let issue = t.job.issue.as_ref().and_then(|p| p.get(payload)).and_then(|v| v.as_u64()).filter(|n| *n > 0);
    let concurrency_key = match &t.job.concurrency {
        None => None,
        Some((Value::Fixed(k), _)) => Some(format!("{}:{k}", t.name)),
        Some((Value::Field(p), _)) => match scalar(payload, p) {
            // Hashed: the key is compared, never shown or interpreted, and the payload's text stays out of it.
            Some(v) => Some(format!("{}:{full}:{}", t.name, &hex::encode(<Sha256 as sha2::Digest>::digest(v.as_bytes()))[..16])),
            None => return skip(format!("the payload has no concurrency key at {}", p.text())),
        },
    };
    Decision::Run(Planned { owner, repo, git_ref, issue, concurrency_key, prompt, author: facts.author, action: facts.action })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::triggers::config::TriggerSet;

    #[test]
    fn hmac_matches_rfc_4231_and_github() {
        // RFC 4231 test case 2.
        let s = sign(b"Jefe", b"what do ya want for nothing?");
        assert_eq!(s, "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843");
        assert!(signature_ok(b"Jefe", b"what do ya want for nothing?", Some(&s)));
        // GitHub's documented example.
        assert!(signature_ok(
            b"It's a Secret to Everybody",
            b"Hello, World!",
            Some("sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17")
        ));
        assert!(!signature_ok(b"Jefe", b"what do ya want for nothing!", Some(&s)));
        assert!(!signature_ok(b"Jefe", b"x", None));
        assert!(!signature_ok(b"Jefe", b"x", Some("sha1=00")));
        assert!(!signature_ok(b"Jefe", b"x", Some("sha256=zz")));
        assert!(!signature_ok(b"Jefe", b"x", Some("sha256=")));
    }

    fn trigger() -> Trigger {
        let text = r#"
[[trigger]]
name = "fix"
source = "github"
secret = "S"
[trigger.filter]
events = ["issue_comment"]
actions = ["created"]
repositories = ["acme/widget"]
comment_prefix = "/hutch"
authors = ["alice"]
[trigger.forge]
api = "https://api.github.com"
git = "https://github.com"
token = "T"
[trigger.job]
command = ["true"]
concurrency_key_from = "issue.number"
"#;
        TriggerSet::parse(text, std::path::Path::new("t.toml")).unwrap().triggers.remove("fix").unwrap()
    }

    fn payload(author: &str, body: &str, repo: &str) -> serde_json::Value {
        serde_json::json!({
            "action": "created",
            "issue": { "number": 7, "labels": [] },
            "comment": { "body": body, "user": { "login": author } },
            "repository": { "full_name": repo, "default_branch": "main" },
            "sender": { "login": author },
        })
    }

    #[test]
    fn filters_decide_and_values_come_from_named_fields() {
        let t = trigger();
        let d = decide(&t, "issue_comment", &payload("Alice", "/hutch fix the test", "acme/widget"));
        let Decision::Run(p) = d else { panic!("{d:?}") };
        assert_eq!((p.owner.as_str(), p.repo.as_str(), p.git_ref.as_str(), p.issue), ("acme", "widget", "main", Some(7)));
        assert_eq!(p.prompt.as_deref(), Some("fix the test"));
        assert!(p.concurrency_key.as_deref().is_some_and(|k| k.starts_with("fix:acme/widget:")));
        for (ev, pl, why) in [
            ("issues", payload("alice", "/hutch x", "acme/widget"), "event"),
            ("issue_comment", payload("mallory", "/hutch x", "acme/widget"), "allowlist"),
            ("issue_comment", payload("alice", "please /hutch", "acme/widget"), "does not start"),
            ("issue_comment", payload("alice", "/hutchx", "acme/widget"), "does not start"),
            ("issue_comment", payload("alice", "/hutch x", "evil/widget"), "not one of"),
        ] {
            match decide(&t, ev, &pl) {
                Decision::Skip(r) => assert!(r.contains(why), "{why}: {r}"),
                d => panic!("{why}: {d:?}"),
            }
        }
        // A ref that looks like an option is refused, not passed on.
        let mut pl = payload("alice", "/hutch x", "acme/widget");
        pl["repository"]["default_branch"] = "--upload-pack=evil".into();
        assert!(matches!(decide(&t, "issue_comment", &pl), Decision::Skip(_)));
    }
}
