//! A gateway with a setup phase before its agent phase (`hutch run --setup`): each phase decides
//! with its own policy; a setup secret is swapped during setup only and flagged afterwards, also
//! on its own host; leaving the setup phase closes the connections opened in it. Threats 6 and 15.

mod common;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hutch_gateway::{
    AuditEvent, AuditRecord, DnsAnswer, GatewayError, Limits, Phase, PhaseEgress, Verdict,
};
use hyper_util::rt::TokioIo;
use tokio::io::AsyncReadExt;

const SETUP_TOKEN: &str = "setup_REAL_token_value_0123456789";

/// The agent phase: api.test without any secret.
const AGENT: &str = r#"
allow = ["api.test:HTTPS_PORT"]
resolve = ["api.test:HTTPS_PORT:127.0.0.1"]
upstream_ca = ["CA_FILE"]
"#;

/// The setup phase: api.test with SETUP_TOKEN bound to it, and echo.test (passed through).
const SETUP: &str = r#"
allow = ["api.test:HTTPS_PORT", "echo.test:HTTPS_PORT"]
resolve = ["api.test:HTTPS_PORT:127.0.0.1", "echo.test:HTTPS_PORT:127.0.0.1"]
upstream_ca = ["CA_FILE"]
[secrets.SETUP_TOKEN]
hosts = ["api.test"]
"#;

async fn fixture() -> Fixture {
    let net = Internet::start().await;
    let setup = Arc::new(policy_from(SETUP, &net));
    let secrets = setup
        .load_secrets_with(|v| (v == "SETUP_TOKEN").then(|| SETUP_TOKEN.to_string()))
        .expect("setup secrets");
    Fixture::with_net(net, AGENT, &[], Limits::default(), |cfg| {
        cfg.setup = Some(PhaseEgress {
            policy: setup,
            secrets,
        });
    })
}

fn get(path: &str, host: &str, auth: &str) -> Request<Full<Bytes>> {
    Request::builder()
        .uri(path)
        .header("host", host)
        .header("authorization", auth)
        .body(Full::new(Bytes::new()))
        .expect("request")
}

async fn wait_for(f: &Fixture, what: &str, pred: impl Fn(&AuditRecord) -> bool) -> AuditRecord {
    for _ in 0..500 {
        if let Some(r) = f.audit.records().into_iter().find(|r| pred(r)) {
            return r;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("no audit record for {what} in {:#?}", f.audit.records());
}

#[tokio::test]
async fn setup_phase_has_its_own_policy_and_secrets_and_its_connections_end_with_it() {
    let f = fixture().await;
    let port = f.net.https.port();
    assert_eq!(
        f.gw.phase(),
        Phase::Setup,
        "a gateway with a setup phase starts in it"
    );
    let setup_ph =
        f.gw.phase_placeholders(Phase::Setup)
            .into_iter()
            .find(|(n, _)| n == "SETUP_TOKEN")
            .map(|(_, p)| p)
            .expect("setup placeholder");
    assert!(
        f.gw.placeholders().iter().all(|(n, _)| n != "SETUP_TOKEN"),
        "the base environment never gets a setup placeholder"
    );
    assert!(matches!(
        f.gw.dns_allowed("echo.test"),
        DnsAnswer::Allowed { .. }
    ));

    // Setup: the placeholder is swapped on its host; a keep-alive connection stays open.
    let tls_io = tls(
        tunnel(&f.gw, "api.test", port),
        "api.test",
        &f.gw.ca_cert_pem(),
    )
    .await
    .expect("TLS to api.test");
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls_io))
        .await
        .expect("handshake");
    let conn_task = tokio::spawn(conn);
    let resp = sender
        .send_request(get("/in-setup", "api.test", &format!("Bearer {setup_ph}")))
        .await
        .expect("setup request");
    assert_eq!(resp.status(), StatusCode::OK);
    resp.into_body().collect().await.expect("body");
    let up = f
        .net
        .seen()
        .into_iter()
        .find(|s| s.path == "/in-setup")
        .expect("upstream saw it");
    assert_eq!(
        up.header("authorization"),
        Some(format!("Bearer {SETUP_TOKEN}").as_str())
    );
    // And a passed-through connection to a setup-only host, also kept open.
    let echo = tls(tunnel(&f.gw, "echo.test", port), "echo.test", &f.net.ca_pem)
        .await
        .expect("TLS to echo.test");
    let (mut echo_sender, echo_conn) = hyper::client::conn::http1::handshake(TokioIo::new(echo))
        .await
        .expect("handshake");
    let echo_task = tokio::spawn(echo_conn);
    let resp = echo_sender
        .send_request(get("/echo-in-setup", "echo.test", "none"))
        .await
        .expect("echo request");
    assert_eq!(resp.status(), StatusCode::OK);
    resp.into_body().collect().await.expect("body");

    f.gw.enter_phase(Phase::Agent)
        .expect("enter the agent phase");
    assert_eq!(f.gw.phase(), Phase::Agent);
    f.gw.enter_phase(Phase::Agent)
        .expect("entering the current phase again is a no-op");
    assert!(
        matches!(
            f.gw.enter_phase(Phase::Setup),
            Err(GatewayError::PhaseOrder { .. })
        ),
        "phases only move forward"
    );

    // Both setup connections are closed and audited as cut.
    for dest in ["api.test", "echo.test"] {
        let rec = wait_for(&f, dest, |r| {
            r.event == AuditEvent::Connection
                && r.dest.starts_with(dest)
                && r.flags.iter().any(|x| x == "phase_ended")
        })
        .await;
        assert_eq!(rec.phase, Phase::Setup, "{rec:?}");
        assert_eq!(
            rec.reason.as_deref(),
            Some("closed: the setup phase ended"),
            "{rec:?}"
        );
    }
    assert!(
        sender
            .send_request(get("/after", "api.test", "x"))
            .await
            .is_err(),
        "the setup connection is gone"
    );
    assert!(
        echo_sender
            .send_request(get("/after", "echo.test", "x"))
            .await
            .is_err(),
        "so is the passed-through one"
    );
    let _ = tokio::time::timeout(Duration::from_secs(5), conn_task)
        .await
        .expect("the client side saw the close");
    let _ = tokio::time::timeout(Duration::from_secs(5), echo_task)
        .await
        .expect("the client side saw the close");
    assert!(
        f.net.seen().iter().all(|s| s.path != "/after"),
        "nothing got through after the phase ended"
    );

    // Agent phase: its own policy (echo.test is gone), and the setup placeholder is not swapped, even on
    // its own host, and is flagged.
    assert!(matches!(
        f.gw.dns_allowed("echo.test"),
        DnsAnswer::Denied { .. }
    ));
    let c = tunnel(&f.gw, "echo.test", port);
    let mut c = c;
    let mut buf = Vec::new();
    assert_eq!(
        c.read_to_end(&mut buf).await.expect("closed"),
        0,
        "a setup-only host is refused in the agent phase"
    );
    let io = tls(
        tunnel(&f.gw, "api.test", port),
        "api.test",
        &f.gw.ca_cert_pem(),
    )
    .await
    .expect("TLS in the agent phase");
    let (status, _, _) = request(
        io,
        get("/in-agent", "api.test", &format!("Bearer {setup_ph}")),
    )
    .await
    .expect("agent request");
    assert_eq!(status, StatusCode::OK);
    let up = f
        .net
        .seen()
        .into_iter()
        .find(|s| s.path == "/in-agent")
        .expect("upstream saw it");
    assert_eq!(
        up.header("authorization"),
        Some(format!("Bearer {setup_ph}").as_str()),
        "arrives as the placeholder"
    );
    let rec = wait_for(&f, "the agent request", |r| {
        r.event == AuditEvent::Request && r.path.as_deref() == Some("/in-agent")
    })
    .await;
    assert_eq!(rec.phase, Phase::Agent);
    assert!(rec.secrets.is_empty(), "{rec:?}");
    assert!(
        rec.flags
            .iter()
            .any(|x| x == "placeholder_out_of_phase:SETUP_TOKEN"),
        "{rec:?}"
    );
    let setup_req = wait_for(&f, "the setup request", |r| {
        r.event == AuditEvent::Request && r.path.as_deref() == Some("/in-setup")
    })
    .await;
    assert_eq!(
        (setup_req.phase, setup_req.secrets.clone()),
        (Phase::Setup, vec!["SETUP_TOKEN".to_string()])
    );
    let denied = wait_for(&f, "the denied tunnel", |r| {
        r.decision == Verdict::Deny && r.dest.starts_with("echo.test")
    })
    .await;
    assert_eq!(denied.phase, Phase::Agent);
    let summary = f.gw.summary().to_string();
    assert!(
        summary.contains("echo.test") && !summary.contains("during setup"),
        "{summary}"
    );
}

/// A gateway without a setup phase is in the agent phase from the start and has no other.
#[tokio::test]
async fn without_a_setup_phase_the_gateway_is_in_the_agent_phase() {
    let f = Fixture::new(AGENT, &[], Limits::default()).await;
    assert_eq!(f.gw.phase(), Phase::Agent);
    assert!(matches!(
        f.gw.enter_phase(Phase::Setup),
        Err(GatewayError::NoSuchPhase(Phase::Setup))
    ));
    assert!(matches!(
        f.gw.dns_allowed("echo.test"),
        DnsAnswer::Denied { .. }
    ));
    let rec = f.audit.records().pop().expect("dns record");
    assert_eq!((rec.event, rec.phase), (AuditEvent::Dns, Phase::Agent));
}
