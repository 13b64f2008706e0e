//! Delivery against the test net's forge over real TLS: real git pushes through `git http-backend`, the REST
//! API over rustls, the forge recording which token every request carried. The VM's side is stood in for by a
//! clone on the host that commits and edits, then packs its change exactly as `hutch_repo::collect` does (a
//! bundle of HEAD ^base, a `git diff --cached --binary` patch of the rest).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use hutch_forge::{deliver, DeliveryPlan, ForgeError, ForgeRepo, Oid, RetryPolicy, RunSummary, SecretToken, SensitiveKind};
use hutch_testnet::{ForgeRoute, TestNet};

const HOST: &str = "localhost";

/// Every log line the crate writes, from every test in this binary.
fn logs() -> Arc<Mutex<Vec<u8>>> {
    static LOGS: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    LOGS.get_or_init(|| {
        let buf = Arc::new(Mutex::new(Vec::new()));
        let w = buf.clone();
        let _ = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::DEBUG)
            .with_ansi(false)
            .with_writer(move || Sink(w.clone()))
            .try_init();
        buf
    })
    .clone()
}

struct Sink(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Sink {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn log_text() -> String {
    String::from_utf8_lossy(&logs().lock().unwrap_or_else(|p| p.into_inner())).into_owned()
}

fn git(dir: &Path, args: &[&str]) -> String {
    let out = Command::new("git")
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("HOME", dir)
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .args(["-c", "user.name=vm", "-c", "user.email=vm@example.test", "-c", "init.defaultBranch=main"])
        .args(args)
        .current_dir(dir)
        .output()
        .expect("run git");
    assert!(out.status.success(), "git {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim_end().to_string()
}

/// The VM's side: a clone of the forge repository (from its directory, as the VM's clone is not what is
/// tested here) where `work` runs, then the change packed as `collect` packs it.
struct Vm {
    dir: tempfile::TempDir,
    base: String,
}

impl Vm {
    fn clone_of(bare: &Path) -> Vm {
        let dir = tempfile::tempdir().expect("tempdir");
        git(dir.path(), &["clone", "-q", bare.to_str().expect("path"), "ws"]);
        let base = git(&dir.path().join("ws"), &["rev-parse", "HEAD"]);
        Vm { dir, base }
    }

    fn ws(&self) -> PathBuf {
        self.dir.path().join("ws")
    }

    fn write(&self, path: &str, content: &str) {
        let p = self.ws().join(path);
        std::fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
        std::fs::write(p, content).expect("write");
    }

    fn commit(&self, msg: &str) {
        git(&self.ws(), &["add", "-A"]);
        git(&self.ws(), &["commit", "-q", "-m", msg]);
    }

    /// `commits.bundle` and `changes.patch` as `hutch_repo::collect` leaves them, and the VM's HEAD.
    fn collect(&self) -> (PathBuf, Option<Oid>) {
        let out = self.dir.path().join("out");
        std::fs::create_dir_all(&out).expect("mkdir");
        let ws = self.ws();
        let head = git(&ws, &["rev-parse", "HEAD"]);
        if head != self.base {
            git(&ws, &["bundle", "create", "-q", out.join("commits.bundle").to_str().expect("path"), "HEAD", &format!("^{}", self.base)]);
        }
        git(&ws, &["add", "-A"]);
        let patch = git(&ws, &["diff", "--cached", "--binary", "--full-index", "--no-renames", "--no-ext-diff", "--no-textconv", "--no-color", "HEAD"]);
        // As collect does: a patch whenever HEAD moved (maybe empty) or the working tree changed; none means the
        // working tree is the one the VM started with.
        if !patch.is_empty() || head != self.base {
            std::fs::write(out.join("changes.patch"), if patch.is_empty() { String::new() } else { format!("{patch}\n") }).expect("patch");
        }
        (out, Oid::parse(&head))
    }
}

struct Setup {
    net: TestNet,
    bare: PathBuf,
    token: String,
}

fn setup(token: &str) -> Setup {
    let _ = logs();
    let net = TestNet::start().expect("testnet");
    let bare = net
        .create_forge_repo(
            "acme",
            "widget",
            &[
                ("src/lib.rs", "pub fn answer() -> u32 { 41 }\n"),
                ("README.md", "widget\n"),
                (".github/workflows/ci.yml", "on: push\njobs: {}\n"),
            ],
            token,
        )
        .expect("forge repo");
    Setup { net, bare, token: token.to_string() }
}

impl Setup {
    fn repo(&self) -> ForgeRepo {
        ForgeRepo {
            api_base: self.net.forge_api_base(HOST),
            clone_url: self.net.forge_clone_url(HOST, "acme", "widget"),
            owner: "acme".into(),
            name: "widget".into(),
            ca_file: Some(self.net.ca_file().to_path_buf()),
        }
    }
}

fn plan(run_id: &str, vm: &Vm, result_dir: PathBuf, vm_head: Option<Oid>) -> DeliveryPlan {
    DeliveryPlan {
        run_id: run_id.into(),
        base_ref: "main".into(),
        base_commit: Oid::parse(&vm.base).expect("oid"),
        vm_head,
        result_dir,
        open_pull_request: true,
        comment_on_issue: Some(7),
        allow_sensitive: false,
        title: "Fix the answer".into(),
        summary: RunSummary { exit_code: Some(0), details: vec!["trigger: comment-fix".into()] },
    }
}

fn quick() -> RetryPolicy {
    RetryPolicy { attempts: 4, first_delay: Duration::from_millis(20), max_delay: Duration::from_millis(100) }
}

/// Reads every process's argv and environment while `running` is set, and reports any that held `needle`.
fn watch_processes(needle: String, running: Arc<AtomicBool>) -> std::thread::JoinHandle<(usize, Vec<String>)> {
    std::thread::spawn(move || {
        let mut hits = vec![];
        let mut scans = 0;
        while running.load(Ordering::Relaxed) {
            scans += 1;
            for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
                let name = e.file_name();
                if !name.to_string_lossy().bytes().all(|b| b.is_ascii_digit()) {
                    continue;
                }
                for what in ["cmdline", "environ"] {
                    if let Ok(b) = std::fs::read(e.path().join(what)) {
                        if memchr_find(&b, needle.as_bytes()) {
                            hits.push(format!("{}/{what}", name.to_string_lossy()));
                        }
                    }
                }
            }
        }
        (scans, hits)
    })
}

fn memchr_find(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn push_pull_request_and_comment_carry_the_real_token() {
    let s = setup("ghp_forge_test_token_1234567890");
    let vm = Vm::clone_of(&s.bare);
    vm.write("src/lib.rs", "pub fn answer() -> u32 { 42 }\n");
    vm.commit("fix the answer");
    vm.write("README.md", "widget, fixed\n");
    let (out, head) = vm.collect();
    let plan = plan("run-1a2b", &vm, out, head.clone());

    let running = Arc::new(AtomicBool::new(true));
    let watcher = watch_processes(s.token.clone(), running.clone());
    let token = SecretToken::new(s.token.clone()).expect("token");
    let d = deliver(&s.repo(), &token, &plan, quick()).await;
    running.store(false, Ordering::Relaxed);
    let (scans, hits) = watcher.join().expect("watcher");
    let d = d.expect("delivery");

    assert_eq!(d.branch.as_deref(), Some("hutch/run-1a2b"));
    assert!(d.held_back.is_empty());
    let (number, url) = d.pull_request.clone().expect("pull request");
    assert!(url.ends_with(&format!("/acme/widget/pull/{number}")), "{url}");
    assert!(d.comment.is_some());
    assert!(d.diffstat.contains("src/lib.rs") && d.diffstat.contains("README.md"), "{}", d.diffstat);

    // What the forge holds: the VM's commit, then one for what it left uncommitted.
    let branch_head = s.net.forge_git("acme", "widget", &["rev-parse", "refs/heads/hutch/run-1a2b"]).expect("ref");
    assert_eq!(Some(branch_head.trim()), d.commit.as_ref().map(Oid::as_str));
    let parent = s.net.forge_git("acme", "widget", &["rev-parse", "hutch/run-1a2b^"]).expect("parent");
    assert_eq!(Some(parent.trim()), head.as_ref().map(Oid::as_str), "the VM's own commit is kept");
    let lib = s.net.forge_git("acme", "widget", &["show", "hutch/run-1a2b:src/lib.rs"]).expect("show");
    assert!(lib.contains("42"), "{lib}");
    let readme = s.net.forge_git("acme", "widget", &["show", "hutch/run-1a2b:README.md"]).expect("show");
    assert_eq!(readme, "widget, fixed\n");

    // What the forge saw: every request with the real token; the push, the pull request and the comment.
    let rec = s.net.forge_record();
    assert!(!rec.requests.is_empty());
    assert!(rec.requests.iter().all(|r| r.token.as_deref() == Some(s.token.as_str())), "{:?}", rec.requests);
    let pushed: Vec<_> = rec.pushes.iter().filter(|p| p.name == "refs/heads/hutch/run-1a2b").collect();
    assert_eq!(pushed.len(), 1, "{:?}", rec.pushes);
    assert!(pushed[0].accepted);
    assert_eq!(pushed[0].token.as_deref(), Some(s.token.as_str()));
    assert_eq!(rec.pulls.len(), 1);
    let pr = &rec.pulls[0];
    assert_eq!((pr.head.as_str(), pr.base.as_str(), pr.title.as_str()), ("hutch/run-1a2b", "main", "Fix the answer"));
    assert!(pr.body.contains("src/lib.rs") && pr.body.contains("exited with code 0"), "{}", pr.body);
    assert!(!pr.body.contains("Held back"), "{}", pr.body);
    assert_eq!(rec.comments.len(), 1);
    assert_eq!(rec.comments[0].issue, 7);
    assert!(rec.comments[0].body.contains(&url), "{}", rec.comments[0].body);

    // Never in argv, an environment or a log line; the private git configuration is gone.
    assert!(scans > 0);
    assert!(hits.is_empty(), "the token was in {hits:?}");
    let log = log_text();
    assert!(log.contains("pushed"), "the log is captured: {log}");
    assert!(!log.contains(&s.token), "the token is in the log");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_token_gets_401_and_a_clear_error_without_the_token() {
    let s = setup("ghp_right_token_abcdefghijkl");
    let vm = Vm::clone_of(&s.bare);
    vm.write("src/lib.rs", "pub fn answer() -> u32 { 42 }\n");
    let (out, head) = vm.collect();
    let plan = plan("run-2", &vm, out, head);
    let wrong = "ghp_wrong_token_zyxwvutsrqpo";
    let err = deliver(&s.repo(), &SecretToken::new(wrong).expect("token"), &plan, quick()).await.expect_err("refused");
    let msg = err.to_string();
    assert!(matches!(err, ForgeError::Unauthorized { status: 401, .. }), "{err:?}");
    assert!(msg.contains("refused the token") && msg.contains("fetching the base"), "{msg}");
    assert!(!msg.contains(wrong) && !format!("{err:?}").contains(wrong), "{msg}");
    assert!(!err.retryable());
    let rec = s.net.forge_record();
    assert!(rec.requests.iter().any(|r| r.token.as_deref() == Some(wrong) && r.status == 401), "{:?}", rec.requests);
    // A 401 is final: one request, no push, no pull request.
    assert_eq!(rec.requests.len(), 1, "{:?}", rec.requests);
    assert!(rec.pushes.is_empty() && rec.pulls.is_empty() && rec.comments.is_empty());
    assert!(!log_text().contains(wrong));
}

/// Threat 10 (paths that run code later): a change to `.github/workflows/` is not delivered without the
/// trigger's permission, and the pull request says what was held back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn class_10_workflow_changes_are_held_back_and_the_pull_request_says_so() {
    let s = setup("ghp_workflow_token_0987654321");
    let vm = Vm::clone_of(&s.bare);
    vm.write("src/lib.rs", "pub fn answer() -> u32 { 42 }\n");
    vm.write(".github/workflows/ci.yml", "on: push\njobs: { steal: { runs-on: x, steps: [ { run: 'curl evil' } ] } }\n");
    vm.commit("fix and ci");
    // Added by one commit and removed by the next: still in the history a push would deliver.
    vm.write(".github/workflows/evil.yml", "on: push\n");
    vm.commit("add");
    std::fs::remove_file(vm.ws().join(".github/workflows/evil.yml")).expect("rm");
    vm.commit("remove");
    let (out, head) = vm.collect();
    let p = plan("run-3", &vm, out.clone(), head.clone());
    let token = SecretToken::new(s.token.clone()).expect("token");
    let d = deliver(&s.repo(), &token, &p, quick()).await.expect("delivery");

    let held: Vec<_> = d.held_back.iter().map(|h| (h.path.as_str(), h.kind)).collect();
    assert!(held.contains(&(".github/workflows/ci.yml", SensitiveKind::Ci)), "{held:?}");
    assert!(held.contains(&(".github/workflows/evil.yml", SensitiveKind::Ci)), "{held:?}");
    let ci = s.net.forge_git("acme", "widget", &["show", "hutch/run-3:.github/workflows/ci.yml"]).expect("show");
    assert_eq!(ci, "on: push\njobs: {}\n", "the base version is kept");
    let lib = s.net.forge_git("acme", "widget", &["show", "hutch/run-3:src/lib.rs"]).expect("show");
    assert!(lib.contains("42"), "the rest is delivered: {lib}");
    let history = s.net.forge_git("acme", "widget", &["log", "--format=%H", "hutch/run-3", "--", ".github"]).expect("log");
    let base_touch = s.net.forge_git("acme", "widget", &["log", "--format=%H", "main", "--", ".github"]).expect("log");
    assert_eq!(history, base_touch, "no pushed commit touches .github");
    let rec = s.net.forge_record();
    let body = &rec.pulls[0].body;
    assert!(body.contains("Held back") && body.contains(".github/workflows/ci.yml (CI workflow)"), "{body}");
    assert!(rec.comments[0].body.contains("Held back"), "{}", rec.comments[0].body);

    // With the trigger's permission the same change goes out whole, and the text says so.
    let mut allowed = plan("run-3b", &vm, out, head);
    allowed.allow_sensitive = true;
    allowed.comment_on_issue = None;
    let d = deliver(&s.repo(), &token, &allowed, quick()).await.expect("delivery");
    assert!(d.held_back.is_empty());
    let ci = s.net.forge_git("acme", "widget", &["show", "hutch/run-3b:.github/workflows/ci.yml"]).expect("show");
    assert!(ci.contains("curl evil"), "{ci}");
    let rec = s.net.forge_record();
    let body = &rec.pulls.iter().find(|p| p.head == "hutch/run-3b").expect("pr").body;
    assert!(body.contains("Sensitive paths included") && !body.contains("Held back"), "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_5xx_forge_is_retried_and_a_4xx_is_not() {
    let s = setup("ghp_retry_token_1122334455");
    let vm = Vm::clone_of(&s.bare);
    vm.write("src/lib.rs", "pub fn answer() -> u32 { 42 }\n");
    vm.commit("fix");
    let (out, head) = vm.collect();
    let token = SecretToken::new(s.token.clone()).expect("token");

    // 5xx: two failed pushes and a failed pull request, then success.
    s.net.forge_inject_failure(ForgeRoute::Push, 503, 2);
    s.net.forge_inject_failure(ForgeRoute::Pulls, 502, 1);
    let d = deliver(&s.repo(), &token, &plan("run-4", &vm, out.clone(), head.clone()), quick()).await.expect("delivered after retries");
    assert!(d.pull_request.is_some());
    let rec = s.net.forge_record();
    let statuses = |route: ForgeRoute| rec.requests.iter().filter(|r| r.route == Some(route)).map(|r| r.status).collect::<Vec<_>>();
    let push = statuses(ForgeRoute::Push);
    assert_eq!(push.iter().filter(|s| **s == 503).count(), 2, "{push:?}");
    assert!(push.contains(&200), "{push:?}");
    assert_eq!(statuses(ForgeRoute::Pulls), vec![502, 201]);
    assert!(rec.pushes.iter().any(|p| p.name == "refs/heads/hutch/run-4" && p.accepted));
    let log = log_text();
    assert!(log.contains("transient forge failure"), "{log}");
    assert!(!log.contains(&s.token));

    // 4xx: the comment is refused once and not tried again.
    s.net.forge_inject_failure(ForgeRoute::Comments, 404, 5);
    let before = s.net.forge_record().requests.iter().filter(|r| r.route == Some(ForgeRoute::Comments)).count();
    let mut p = plan("run-4b", &vm, out.clone(), head.clone());
    p.open_pull_request = false;
    let err = deliver(&s.repo(), &token, &p, quick()).await.expect_err("refused");
    assert!(matches!(err, ForgeError::Rejected { status: 404, .. }), "{err:?}");
    assert!(!err.retryable());
    let after = s.net.forge_record().requests.iter().filter(|r| r.route == Some(ForgeRoute::Comments)).count();
    assert_eq!(after - before, 1, "a 4xx is not retried");

    // 5xx for longer than the retries last: a transient error the caller may retry later.
    s.net.forge_inject_failure(ForgeRoute::Push, 500, 100);
    let err = deliver(&s.repo(), &token, &plan("run-4c", &vm, out, head), quick()).await.expect_err("gave up");
    assert!(matches!(err, ForgeError::Transient { attempts: 4, .. }), "{err:?}");
    assert!(err.retryable());
    assert!(!err.to_string().contains(&s.token));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_failures_are_retried_then_reported() {
    let s = setup("ghp_connect_token_5566778899");
    let vm = Vm::clone_of(&s.bare);
    let (out, head) = vm.collect();
    let closed = std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port();
    let mut repo = s.repo();
    repo.clone_url = format!("https://{HOST}:{closed}/acme/widget.git");
    let token = SecretToken::new(s.token.clone()).expect("token");
    let policy = RetryPolicy { attempts: 3, first_delay: Duration::from_millis(10), max_delay: Duration::from_millis(10) };
    let err = deliver(&repo, &token, &plan("run-5", &vm, out, head), policy).await.expect_err("no forge there");
    assert!(matches!(err, ForgeError::Transient { attempts: 3, .. }), "{err:?}");
    assert!(err.to_string().contains("fetching the base"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_that_fails_the_checks_is_not_pushed_and_no_change_pushes_nothing() {
    let s = setup("ghp_checks_token_1029384756");
    let token = SecretToken::new(s.token.clone()).expect("token");

    // Nothing changed: no branch, no pull request; the comment says so.
    let vm = Vm::clone_of(&s.bare);
    let (out, head) = vm.collect();
    let d = deliver(&s.repo(), &token, &plan("run-6", &vm, out, head), quick()).await.expect("delivery");
    assert_eq!((d.branch.as_ref(), d.pull_request.as_ref()), (None, None));
    let rec = s.net.forge_record();
    assert!(rec.pushes.is_empty() && rec.pulls.is_empty());
    assert!(rec.comments[0].body.contains("No file changes"), "{}", rec.comments[0].body);

    // A bundle that does not hold what the VM said is refused by hutch-repo's checks before any push.
    let vm = Vm::clone_of(&s.bare);
    vm.write("src/lib.rs", "pub fn answer() -> u32 { 42 }\n");
    vm.commit("fix");
    let (out, _) = vm.collect();
    let bogus = Oid::parse(&"ab".repeat(20));
    let err = deliver(&s.repo(), &token, &plan("run-6b", &vm, out.clone(), bogus), quick()).await.expect_err("refused");
    assert!(err.to_string().contains("refused the VM's changes"), "{err}");
    // A patch that escapes the tree is refused too.
    std::fs::write(
        out.join("changes.patch"),
        "diff --git a/../x b/../x\nnew file mode 100644\nindex 0000000000000000000000000000000000000000..e69de29bb2d1d6434b8b29ae775ad8c2e48c5391\n",
    )
    .expect("patch");
    let head = Oid::parse(&git(&vm.ws(), &["rev-parse", "HEAD"]));
    let err = deliver(&s.repo(), &token, &plan("run-6c", &vm, out, head), quick()).await.expect_err("refused");
    assert!(err.to_string().contains("refused the VM's changes"), "{err}");
    assert!(s.net.forge_record().pushes.is_empty(), "nothing was pushed");
}
