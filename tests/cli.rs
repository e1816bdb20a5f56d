//! The `pgtether` binary's command line (`check`, `--help`, config errors that name the key at
//! fault) and its HTTP endpoints (`/healthz`, `/readyz`, `/metrics`, unknown paths).

mod common;

use std::path::PathBuf;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};

use common::{value, Opts, Pgtether};

fn pgtether(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_pgtether"))
        .args(args)
        .env_remove("PGTETHER_CONFIG")
        .output()
        .expect("pgtether runs")
}

/// Writes `text` to a fresh temporary config file.
fn config_file(text: &str) -> PathBuf {
    static N: AtomicUsize = AtomicUsize::new(0);
    let path = common::scratch().join(format!("cli-{}.toml", N.fetch_add(1, Ordering::Relaxed)));
    std::fs::write(&path, text).unwrap();
    path
}

/// Runs `pgtether check` on a config with `text`; returns (success, stderr).
fn check(text: &str) -> (bool, String) {
    let path = config_file(text);
    let out = pgtether(&["check", "--config", path.to_str().unwrap()]);
    let _ = std::fs::remove_file(&path);
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

const DATABASE: &str = "[databases.app]\nhost = \"127.0.0.1\"\n";

#[test]
fn check_accepts_the_example_config() {
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/config/pgtether.toml");
    let out = pgtether(&["check", "--config", example]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn check_names_an_unknown_key() {
    let (ok, err) = check(&format!(
        "[listen]\naddr = \"127.0.0.1:6432\"\nmax_clientz = 5\n{DATABASE}"
    ));
    assert!(!ok, "an unknown key was accepted");
    assert!(err.contains("listen.max_clientz"), "{err}");
    assert!(err.contains("unknown field"), "{err}");
}

#[test]
fn check_names_a_bad_duration() {
    let (ok, err) = check(&format!(
        "[pool]\nacquire_timeout = \"5 parsecs\"\n{DATABASE}"
    ));
    assert!(!ok, "a bad duration was accepted");
    assert!(err.contains("pool.acquire_timeout"), "{err}");
}

#[test]
fn check_names_a_bad_access_rule() {
    let rule = |address: &str, method: &str| {
        check(&format!(
            "{DATABASE}[[hba]]\ndatabase = \"all\"\nuser = \"all\"\naddress = \"{address}\"\nmethod = \"{method}\"\n"
        ))
    };
    assert!(rule("10.0.0.0/8", "reject").0, "a valid rule was refused");
    let (ok, err) = rule("10.0.0.0/33", "trust");
    assert!(!ok, "a bad CIDR was accepted");
    assert!(
        err.contains("hba[0].address") && err.contains("10.0.0.0/33"),
        "{err}"
    );
    let (ok, err) = rule("all", "ident");
    assert!(!ok, "a bad method was accepted");
    assert!(
        err.contains("hba[0].method") && err.contains("ident"),
        "{err}"
    );
}

#[test]
fn check_requires_a_database() {
    let (ok, err) = check("[listen]\naddr = \"127.0.0.1:6432\"\n");
    assert!(!ok, "a config without databases was accepted");
    assert!(err.contains("`databases`"), "{err}");
}

#[test]
fn check_reports_a_missing_file() {
    let path = common::scratch().join("no-such-file.toml");
    let out = pgtether(&["check", "--config", path.to_str().unwrap()]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cannot read config file"), "{err}");
    assert!(err.contains(path.to_str().unwrap()), "{err}");
}

#[test]
fn help_exits_zero() {
    let out = pgtether(&["--help"]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("check"), "{text}");
}

#[tokio::test]
async fn healthz_answers_ok() {
    let p = Pgtether::start(Opts::default());
    let (status, body) = p.http_get("/healthz").await;
    assert_eq!(status, 200);
    assert_eq!(body.trim(), "ok");
}

#[tokio::test]
async fn readyz_answers_200_while_serving() {
    let p = Pgtether::start(Opts::default());
    assert_eq!(p.http_get("/readyz").await.0, 200);
}

#[tokio::test]
async fn unknown_path_is_404() {
    let p = Pgtether::start(Opts::default());
    assert_eq!(p.http_get("/no-such-page").await.0, 404);
}

#[tokio::test]
async fn metrics_name_every_series() {
    let p = Pgtether::start(Opts::default());
    let c = p.connect().await;
    value(&c, "SELECT 1").await.unwrap();
    let (status, body) = p.http_get("/metrics").await;
    assert_eq!(status, 200);
    for name in [
        "pgtether_client_connections",
        "pgtether_server_connections",
        "pgtether_transactions_total",
        "pgtether_queries_total",
        "pgtether_client_wait_seconds_bucket",
        "pgtether_client_received_bytes_total",
        "pgtether_client_sent_bytes_total",
    ] {
        assert!(
            body.lines().any(|l| l.starts_with(name)),
            "{name} missing from /metrics:\n{body}"
        );
    }
}

#[tokio::test]
async fn metrics_count_queries_and_bytes() {
    let p = Pgtether::start(Opts::default());
    let pool = r#"{database="app",user="app"}"#;
    let c = p.connect().await;
    for _ in 0..5 {
        value(&c, "SELECT 1").await.unwrap();
    }
    c.batch_execute("BEGIN; SELECT 1; COMMIT").await.unwrap();
    let queries = p
        .metric_settles(&format!("pgtether_queries_total{pool}"), |v| v >= 6.0)
        .await;
    let tx = p
        .metric_settles(&format!("pgtether_transactions_total{pool}"), |v| v >= 6.0)
        .await;
    let received = p
        .metric_settles(
            &format!("pgtether_client_received_bytes_total{pool}"),
            |v| v > 0.0,
        )
        .await;
    let sent = p
        .metric_settles(&format!("pgtether_client_sent_bytes_total{pool}"), |v| {
            v > 0.0
        })
        .await;
    p.metric_settles(&format!("pgtether_client_wait_seconds_count{pool}"), |v| {
        v >= 6.0
    })
    .await;
    // More traffic moves every counter further.
    value(&c, "SELECT repeat('x', 10000)").await.unwrap();
    p.metric_settles(&format!("pgtether_queries_total{pool}"), |v| v > queries)
        .await;
    p.metric_settles(&format!("pgtether_transactions_total{pool}"), |v| v > tx)
        .await;
    p.metric_settles(
        &format!("pgtether_client_received_bytes_total{pool}"),
        |v| v > received,
    )
    .await;
    p.metric_settles(&format!("pgtether_client_sent_bytes_total{pool}"), |v| {
        v >= sent + 10000.0
    })
    .await;
}

#[tokio::test]
async fn metrics_count_idle_clients_and_server_connections() {
    let p = Pgtether::start(Opts::default());
    let idle = r#"pgtether_client_connections{database="app",state="idle",user="app"}"#;
    let mut clients = Vec::new();
    for _ in 0..3 {
        let c = p.connect().await;
        value(&c, "SELECT 1").await.unwrap();
        clients.push(c);
    }
    p.metric_settles(idle, |v| v == 3.0).await;
    // The one server connection that served them is idle in the pool.
    let servers = p
        .metric_settles(
            r#"pgtether_server_connections{database="app",state="idle",user="app"}"#,
            |v| v >= 1.0,
        )
        .await;
    assert!(servers <= 3.0, "{servers} idle server connections");
    // A client holding a transaction is active, not idle.
    clients[0].batch_execute("BEGIN").await.unwrap();
    p.metric_settles(idle, |v| v == 2.0).await;
    p.metric_settles(
        r#"pgtether_client_connections{database="app",state="active",user="app"}"#,
        |v| v == 1.0,
    )
    .await;
    clients[0].batch_execute("COMMIT").await.unwrap();
    drop(clients);
    p.metric_settles(idle, |v| v == 0.0).await;
}
