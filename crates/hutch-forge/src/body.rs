//! The pull request body and the comment: the run summary, the diffstat, and what was held back. Text that
//! came from the VM (paths, the diffstat) only ever appears inside fenced code blocks whose fence is longer than
//! any backtick run in it, so it cannot close the block, start Markdown, mention people or link anywhere.

use crate::{RunSummary, Sensitive};

/// What the text describes.
pub(crate) struct Report<'a> {
    pub(crate) run_id: &'a str,
    pub(crate) summary: &'a RunSummary,
    pub(crate) diffstat: &'a str,
    /// Sensitive paths kept out of the branch.
    pub(crate) held_back: &'a [Sensitive],
    /// Sensitive paths delivered because the trigger allows them.
    pub(crate) allowed: &'a [Sensitive],
    pub(crate) branch: Option<&'a str>,
    pub(crate) pull: Option<&'a (u64, String)>,
}

/// `text` in a fenced code block that it cannot break out of.
fn fenced(text: &str) -> String {
    let longest = text.split(|c| c != '`').map(str::len).max().unwrap_or(0);
    let fence = "`".repeat(longest.max(2) + 1);
    let body = hutch_text::escape_lines(text.as_bytes());
    format!("{fence}text\n{}\n{fence}\n", body.trim_end())
}

fn exit_line(s: &RunSummary) -> String {
    match s.exit_code {
        Some(0) => "The command exited with code 0.".into(),
        Some(c) => format!("The command exited with code {c}."),
        None => "The command was stopped before it exited.".into(),
    }
}

fn sensitive_list(list: &[Sensitive]) -> String {
    fenced(&list.iter().map(|s| format!("{} ({})", s.path, s.kind)).collect::<Vec<_>>().join("\n"))
}

fn common(r: &Report<'_>) -> String {
    let mut out = String::new();
    out.push_str(&format!("{}\n\n", exit_line(r.summary)));
    for d in &r.summary.details {
        let line = hutch_text::escape(d);
        out.push_str(&fenced(&line));
    }
    if !r.summary.details.is_empty() {
        out.push('\n');
    }
    if r.diffstat.trim().is_empty() {
        out.push_str("No file changes were delivered.\n\n");
    } else {
        out.push_str("Changes:\n\n");
        out.push_str(&fenced(r.diffstat));
        out.push('\n');
    }
    if !r.held_back.is_empty() {
        out.push_str(
            "**Held back:** the run changed paths that can run code later (CI workflows, hooks, build scripts, editor or \
             agent settings), and this trigger does not allow changes to them. They are not in this branch; their \
             base version was kept:\n\n",
        );
        out.push_str(&sensitive_list(r.held_back));
        out.push('\n');
    }
    if !r.allowed.is_empty() {
        out.push_str("**Sensitive paths included** (this trigger allows them); review them with care:\n\n");
        out.push_str(&sensitive_list(r.allowed));
        out.push('\n');
    }
    out
}

/// The pull request's body.
pub(crate) fn pull_body(r: &Report<'_>) -> String {
    format!("Opened by hutch for run `{}`.\n\n{}", r.run_id, common(r))
}

/// The comment on the triggering issue.
pub(crate) fn comment_body(r: &Report<'_>) -> String {
    let mut out = format!("Hutch run `{}` finished.\n\n", r.run_id);
    match (r.pull, r.branch) {
        (Some((n, url)), _) => out.push_str(&format!("Pull request #{n}: {url}\n\n")),
        (None, Some(b)) => out.push_str(&format!("Branch: `{b}`\n\n")),
        (None, None) => {}
    }
    out.push_str(&common(r));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use hutch_repo::SensitiveKind;

    #[test]
    fn vm_text_cannot_leave_its_code_block() {
        let stat = " a```b @someone [x](https://evil) | 1 +\n\u{1b}[31m red.txt | 2 +-";
        let held = vec![Sensitive { path: ".github/workflows/ci.yml".into(), kind: SensitiveKind::Ci }];
        let summary = RunSummary { exit_code: Some(1), details: vec!["trigger: fix ````".into()] };
        let r = Report { run_id: "r1", summary: &summary, diffstat: stat, held_back: &held, allowed: &[], branch: Some("hutch/r1"), pull: None };
        let b = pull_body(&r);
        assert!(b.contains("````text\n a```b @someone"), "{b}");
        assert!(b.contains("`````text\ntrigger: fix ````\n`````"), "{b}");
        assert!(!b.contains('\u{1b}'), "{b}");
        assert!(b.contains("Held back"), "{b}");
        assert!(b.contains(".github/workflows/ci.yml (CI workflow)"), "{b}");
        assert!(b.contains("exited with code 1"), "{b}");
        let c = comment_body(&r);
        assert!(c.contains("Branch: `hutch/r1`"), "{c}");
    }
}
