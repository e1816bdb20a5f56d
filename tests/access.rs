//! `[[hba]]` access rules: first match wins; `reject` and no matching rule refuse with 28000
//! naming the address, user and database; each rule's method decides between trust and a
//! password. Refused clients never disturb connected ones.

mod common;

use common::admin::{admin, edit_config, run, ADMIN_EXTRA};
use common::{sqlstate, value, Opts, Pgtether, Raw};
use postgres_protocol::message::backend::Message;

fn rule(database: &str, user: &str, address: &str, method: &str) -> String {
    format!(
        "[[hba]]\ndatabase = \"{database}\"\nuser = \"{user}\"\naddress = \"{address}\"\nmethod = \"{method}\"\n"
    )
}

fn start(rules: &[String]) -> Pgtether {
    Pgtether::start(Opts {
        extra: rules.concat(),
        ..Opts::default()
    })
}

fn refusal(r: Result<tokio_postgres::Client, tokio_postgres::Error>) -> (String, String) {
    match r {
        Ok(_) => panic!("login was accepted"),
        Err(e) => (
            sqlstate(&e).unwrap_or_else(|| panic!("no SQLSTATE in {e}")),
            e.as_db_error().map(|d| d.message().to_string()).unwrap(),
        ),
    }
}

#[tokio::test]
async fn reject_rule_refuses_an_address_with_28000() {
    let p = start(&[
        rule("all", "all", "127.0.0.2/32", "reject"),
        rule("all", "all", "all", "scram-sha-256"),
    ]);
    let allowed = p.connect_from("127.0.0.1", "app", "app").await.unwrap();
    let (code, message) = refusal(p.connect_from("127.0.0.2", "app", "app").await);
    assert_eq!(code, "28000", "{message}");
    assert!(
        message.contains("rule 1 rejects host \"127.0.0.2\", user \"app\", database \"app\""),
        "{message}"
    );
    assert_eq!(value(&allowed, "SELECT 1").await.unwrap(), "1");
    assert_eq!(
        p.metric("pgtether_client_login_failures_total{reason=\"hba_reject\"}")
            .await,
        Some(1.0)
    );
}

#[tokio::test]
async fn reject_rule_refuses_a_user() {
    let p = start(&[
        rule("all", "tether_md5", "all", "reject"),
        rule("all", "all", "all", "scram-sha-256"),
    ]);
    let (code, message) = refusal(p.connect_as("tether_md5", "md5pw").await);
    assert_eq!(code, "28000", "{message}");
    assert!(message.contains("user \"tether_md5\""), "{message}");
    let c = p.connect().await;
    assert_eq!(value(&c, "SELECT 1").await.unwrap(), "1");
}

#[tokio::test]
async fn no_matching_rule_is_refused_like_pg_hba() {
    let p = start(&[rule("app", "app", "127.0.0.2/32", "scram-sha-256")]);
    let c = p.connect_from("127.0.0.2", "app", "app").await.unwrap();
    let (code, message) = refusal(p.connect_from("127.0.0.1", "app", "app").await);
    assert_eq!(code, "28000", "{message}");
    assert!(
        message
            .contains("no [[hba]] rule allows host \"127.0.0.1\", user \"app\", database \"app\""),
        "{message}"
    );
    // The refused client learns nothing about other users: the same answer for one that does
    // not exist.
    let (code, _) = refusal(p.connect_from("127.0.0.1", "nobody", "x").await);
    assert_eq!(code, "28000");
    assert_eq!(value(&c, "SELECT 1").await.unwrap(), "1");
    assert_eq!(
        p.metric("pgtether_client_login_failures_total{reason=\"no_hba_entry\"}")
            .await,
        Some(2.0)
    );
}

#[tokio::test]
async fn first_matching_rule_wins() {
    // Trust first: the loopback address gets in without a password, every other is rejected.
    let p = start(&[
        rule("app", "all", "127.0.0.1/32", "trust"),
        rule("all", "all", "all", "reject"),
    ]);
    let c = p
        .connect_from("127.0.0.1", "app", "not-the-password")
        .await
        .unwrap();
    assert_eq!(value(&c, "SELECT 1").await.unwrap(), "1");
    let (code, _) = refusal(p.connect_from("127.0.0.2", "app", "app").await);
    assert_eq!(code, "28000");
    drop(p);

    // The same rules the other way round: the reject rule matches first, for everyone.
    let p = start(&[
        rule("all", "all", "all", "reject"),
        rule("app", "all", "127.0.0.1/32", "trust"),
    ]);
    let (code, message) = refusal(p.connect_from("127.0.0.1", "app", "app").await);
    assert_eq!(code, "28000", "{message}");
    assert!(message.contains("rule 1 rejects"), "{message}");
}

#[tokio::test]
async fn each_rule_picks_trust_or_a_password_method() {
    let p = start(&[
        rule("all", "all", "127.0.0.2/32", "trust"),
        rule("all", "all", "127.0.0.3/32", "md5"),
        rule("all", "all", "127.0.0.0/8", "scram-sha-256"),
    ]);
    // Trusted address: any password (none is asked for).
    let trusted = p
        .connect_from("127.0.0.2", "app", "whatever")
        .await
        .unwrap();
    assert_eq!(value(&trusted, "SELECT 1").await.unwrap(), "1");
    // Password addresses: the wrong one is refused, the right one accepted.
    for src in ["127.0.0.3", "127.0.0.1"] {
        let (code, message) = refusal(p.connect_from(src, "app", "wrong").await);
        assert_eq!(code, "28P01", "{src}: {message}");
        let c = p.connect_from(src, "app", "app").await.unwrap();
        assert_eq!(value(&c, "SELECT 2").await.unwrap(), "2");
    }
    // And the method asked for is the rule's.
    let port = p.port;
    let asked = |src: &'static str| async move {
        let mut raw = Raw::connect_from(port, src).await;
        raw.startup(&[("user", "app"), ("database", "app")]).await;
        raw.recv().await
    };
    assert!(matches!(
        asked("127.0.0.2").await,
        Message::AuthenticationOk
    ));
    assert!(matches!(
        asked("127.0.0.3").await,
        Message::AuthenticationMd5Password(_)
    ));
    assert!(matches!(
        asked("127.0.0.1").await,
        Message::AuthenticationSasl(_)
    ));
}

#[tokio::test]
async fn admin_console_follows_the_rules_too() {
    let p = Pgtether::start(Opts {
        extra: format!(
            "[admin]\nusers = [\"app\"]\n{}{}",
            rule("pgtether", "all", "all", "reject"),
            rule("all", "all", "all", "scram-sha-256"),
        ),
        ..Opts::default()
    });
    let url = format!(
        "host=127.0.0.1 port={} user=app password=app dbname=pgtether",
        p.port
    );
    let e = match tokio_postgres::connect(&url, tokio_postgres::NoTls).await {
        Ok(_) => panic!("admin console login accepted"),
        Err(e) => e,
    };
    assert_eq!(sqlstate(&e).as_deref(), Some("28000"), "{e}");
    let c = p.connect().await;
    assert_eq!(value(&c, "SELECT 1").await.unwrap(), "1");
}

#[tokio::test]
async fn reload_applies_new_rules_and_limits_to_new_logins_only() {
    let p = Pgtether::start(Opts {
        extra: format!("{ADMIN_EXTRA}[limits]\nmax_clients_per_addr = 0\n"),
        ..Opts::default()
    });
    let a = admin(&p).await;
    let connected = p.connect_from("127.0.0.2", "app", "app").await.unwrap();
    edit_config(
        &p,
        "max_clients_per_addr = 0\n",
        &format!(
            "max_clients_per_addr = 3\n{}{}",
            rule("app", "all", "127.0.0.2/32", "reject"),
            rule("all", "all", "all", "scram-sha-256"),
        ),
    );
    run(&a, "RELOAD").await.unwrap();
    let (code, message) = refusal(p.connect_from("127.0.0.2", "app", "app").await);
    assert_eq!(code, "28000", "{message}");
    // The client that was already connected stays.
    assert_eq!(value(&connected, "SELECT 1").await.unwrap(), "1");
    // The new per-address limit counts the clients already connected (the admin session).
    let b = p.connect_from("127.0.0.1", "app", "app").await.unwrap();
    let c = p.connect_from("127.0.0.1", "app", "app").await.unwrap();
    let (code, message) = refusal(p.connect_from("127.0.0.1", "app", "app").await);
    assert_eq!(code, "53300", "{message}");
    drop((b, c));
    // A bad rule is refused whole, naming the key, and the rules in force stay.
    edit_config(
        &p,
        "address = \"127.0.0.2/32\"",
        "address = \"127.0.0.2/40\"",
    );
    let e = run(&a, "RELOAD").await.unwrap_err();
    let message = e
        .as_db_error()
        .map(|d| d.message().to_string())
        .unwrap_or_default();
    assert!(message.contains("hba[0].address"), "{message}");
    let (code, _) = refusal(p.connect_from("127.0.0.2", "app", "app").await);
    assert_eq!(code, "28000");
}
