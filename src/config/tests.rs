use super::*;

const MINIMAL: &str = "[databases.app]\nhost = \"127.0.0.1\"\n[users.app]\npassword = \"x\"\n";

#[test]
fn defaults_fill_a_minimal_file() {
    let c = Config::parse(MINIMAL, "t").unwrap();
    assert_eq!(c.listen.addr.port(), 6432);
    assert_eq!(c.pool.mode, PoolMode::Transaction);
    assert_eq!(c.pool.size, 20);
    assert_eq!(c.databases["app"].port, 5432);
}

#[test]
fn unknown_key_is_named() {
    let text = format!("[listen]\nadress = \"x\"\n{MINIMAL}");
    let err = Config::parse(&text, "t").unwrap_err().to_string();
    assert!(err.contains("listen.adress"), "{err}");
    assert!(err.contains("unknown field"), "{err}");
}

#[test]
fn bad_duration_is_named() {
    let text = format!("[pool]\nacquire_timeout = \"five\"\n{MINIMAL}");
    let err = Config::parse(&text, "t").unwrap_err().to_string();
    assert!(err.contains("pool.acquire_timeout"), "{err}");
}

#[test]
fn overrides_fall_back_to_pool() {
    let text =
        "[pool]\nsize = 7\n[databases.a]\nhost = \"h\"\n[databases.a.pool]\nmode = \"session\"\n";
    let c = Config::parse(text, "t").unwrap();
    let s = c.pool_settings("a");
    assert_eq!(s.size, 7);
    assert_eq!(s.mode, PoolMode::Session);
}

#[test]
fn admin_users_must_be_configured_users() {
    let text = format!("[admin]\nusers = [\"app\"]\n{MINIMAL}");
    let c = Config::parse(&text, "t").unwrap();
    assert!(c.admin.is_admin("app"));
    let text = format!("[admin]\nusers = [\"app\", \"boss\"]\n{MINIMAL}");
    let err = Config::parse(&text, "t").unwrap_err().to_string();
    assert!(
        err.contains("admin.users[1]") && err.contains("boss"),
        "{err}"
    );
    let text = format!("[admin]\nuserz = []\n{MINIMAL}");
    let err = Config::parse(&text, "t").unwrap_err().to_string();
    assert!(err.contains("admin.userz"), "{err}");
    let text = format!("[admin]\nusers = [\"app\"]\n[databases.pgtether]\nhost = \"h\"\n{MINIMAL}");
    let err = Config::parse(&text, "t").unwrap_err().to_string();
    assert!(err.contains("databases.pgtether"), "{err}");
}

#[test]
fn load_substitutes_variables_and_applies_overrides() {
    let path = std::env::temp_dir().join(format!("pgtether-config-{}.toml", std::process::id()));
    std::fs::write(
        &path,
        "[databases.app]\nhost = \"${DB_HOST}\"\n[users.app]\npassword = \"${APP_PW}\"\n",
    )
    .unwrap();
    let vars = [
        ("DB_HOST", "db1"),
        ("APP_PW", "pw"),
        ("PGTETHER_POOL_SIZE", "4"),
    ];
    let lookup = |n: &str| {
        vars.iter()
            .find(|(k, _)| *k == n)
            .map(|(_, v)| v.to_string())
    };
    let c = Config::load_with_env(&path, &lookup).unwrap();
    assert_eq!(c.databases["app"].host, "db1");
    assert_eq!(c.users["app"].password.as_deref(), Some("pw"));
    assert_eq!(c.pool.size, 4);
    let vars = [
        ("DB_HOST", "db1"),
        ("APP_PW", "pw"),
        ("PGTETHER_POOL_SIZE", "0"),
    ];
    let lookup = |n: &str| {
        vars.iter()
            .find(|(k, _)| *k == n)
            .map(|(_, v)| v.to_string())
    };
    let err = Config::load_with_env(&path, &lookup)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("pool.size") && err.contains("PGTETHER_POOL_SIZE"),
        "{err}"
    );
    let lookup = |_: &str| None;
    let err = Config::load_with_env(&path, &lookup)
        .unwrap_err()
        .to_string();
    assert!(err.contains("DB_HOST") && err.contains("line 2"), "{err}");
    let _ = std::fs::remove_file(&path);
}

#[test]
fn invalid_values_are_named() {
    let text = format!("[pool]\nsize = 0\n{MINIMAL}");
    let err = Config::parse(&text, "t").unwrap_err().to_string();
    assert!(err.contains("pool.size"), "{err}");
    let err = Config::parse("[listen]\n", "t").unwrap_err().to_string();
    assert!(err.contains("databases"), "{err}");
    let text = "[databases.a]\nhost = \"h\"\n[users.u]\n";
    let err = Config::parse(text, "t").unwrap_err().to_string();
    assert!(err.contains("users.u.password"), "{err}");
}

#[test]
fn limits_have_safe_defaults() {
    let c = Config::parse(MINIMAL, "t").unwrap();
    assert_eq!(c.limits.max_clients_per_user, 0);
    assert_eq!(c.limits.max_clients_per_addr, 0);
    assert_eq!(c.limits.auth_failures_before_backoff, 5);
    assert!(c.limits.client_idle_timeout.is_zero());
    assert!(c.limits.idle_transaction_timeout.is_zero());
    let text = format!("[limits]\nclient_idle_timeout = \"0\"\nidle_transaction_timeout = \"2s\"\nmax_clients_per_addr = 3\n{MINIMAL}");
    let c = Config::parse(&text, "t").unwrap();
    assert_eq!(c.limits.idle_transaction_timeout, Duration::from_secs(2));
    let text = format!("[limits]\nauth_backoff = \"0s\"\n{MINIMAL}");
    let err = Config::parse(&text, "t").unwrap_err().to_string();
    assert!(err.contains("limits.auth_backoff"), "{err}");
}

#[test]
fn hba_rules_parse_and_bad_ones_are_named() {
    let rules = "[[hba]]\ndatabase = \"app\"\nuser = \"all\"\naddress = \"10.0.0.0/8\"\nmethod = \"reject\"\n[[hba]]\ndatabase = \"all\"\nuser = \"app\"\naddress = \"::1/128\"\nmethod = \"md5\"\n";
    let c = Config::parse(&format!("{MINIMAL}{rules}"), "t").unwrap();
    assert_eq!(c.hba.len(), 2);
    assert_eq!(c.hba[0].method, HbaMethod::Reject);
    let bad = |rule: &str| {
        Config::parse(&format!("{MINIMAL}[[hba]]\n{rule}"), "t")
            .unwrap_err()
            .to_string()
    };
    let err =
        bad("database = \"all\"\nuser = \"all\"\naddress = \"10.0.0/8\"\nmethod = \"trust\"\n");
    assert!(
        err.contains("hba[0].address") && err.contains("10.0.0/8"),
        "{err}"
    );
    let err = bad("database = \"all\"\nuser = \"all\"\naddress = \"all\"\nmethod = \"password\"\n");
    assert!(
        err.contains("hba[0].method") && err.contains("password"),
        "{err}"
    );
    let err = bad("database = \"nope\"\nuser = \"all\"\naddress = \"all\"\nmethod = \"trust\"\n");
    assert!(
        err.contains("hba[0].database") && err.contains("nope"),
        "{err}"
    );
    let err = bad("database = \"all\"\nuser = \"bob\"\naddress = \"all\"\nmethod = \"trust\"\n");
    assert!(err.contains("hba[0].user") && err.contains("bob"), "{err}");
    let err = bad(
        "database = \"all\"\nuser = \"all\"\naddress = \"all\"\nmethod = \"trust\"\nport = 1\n",
    );
    assert!(err.contains("hba[0].port"), "{err}");
}

#[test]
fn hba_methods_decide_which_passwords_are_needed() {
    let no_password = "[databases.app]\nhost = \"h\"\n[users.app]\n";
    let trust =
        "[[hba]]\ndatabase = \"all\"\nuser = \"all\"\naddress = \"all\"\nmethod = \"trust\"\n";
    Config::parse(&format!("{no_password}{trust}"), "t").unwrap();
    let md5 =
        "[[hba]]\ndatabase = \"all\"\nuser = \"app\"\naddress = \"10.0.0.0/8\"\nmethod = \"md5\"\n";
    let err = Config::parse(&format!("{no_password}{md5}{trust}"), "t")
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("users.app.password") && err.contains("hba[0].method"),
        "{err}"
    );
}

#[test]
fn auth_query_defaults_and_overrides() {
    let text = "[auth]\nuser = \"lookup\"\n[databases.a]\nhost = \"h\"\n\
                [databases.b]\nhost = \"h\"\nauth_query = \"SELECT u, p FROM f($1)\"\n\
                [users.lookup]\npassword = \"pw\"\n";
    let c = Config::parse(text, "t").unwrap();
    let a = c.auth_lookup("a").unwrap();
    assert_eq!((a.user, a.query), ("lookup", DEFAULT_AUTH_QUERY));
    assert_eq!(c.auth_lookup("b").unwrap().query, "SELECT u, p FROM f($1)");
    assert_eq!(c.auth.cache_ttl, Duration::from_secs(30));
    assert!(Config::parse(MINIMAL, "t")
        .unwrap()
        .auth_lookup("app")
        .is_none());
    // Per database only.
    let text = "[databases.a]\nhost = \"h\"\nauth_user = \"lookup\"\n\
                [databases.b]\nhost = \"h\"\n[users.lookup]\npassword = \"pw\"\n";
    let c = Config::parse(text, "t").unwrap();
    assert_eq!(c.auth_lookup("a").unwrap().user, "lookup");
    assert!(c.auth_lookup("b").is_none());
    // [[hba]] rules may name users that only the lookup knows.
    let text = "[auth]\nuser = \"lookup\"\n[databases.a]\nhost = \"h\"\n[users.lookup]\npassword = \"pw\"\n\
                [[hba]]\ndatabase = \"all\"\nuser = \"someone\"\naddress = \"all\"\nmethod = \"scram-sha-256\"\n";
    Config::parse(text, "t").unwrap();
}

#[test]
fn auth_query_mistakes_are_named() {
    let err = |text: &str| Config::parse(text, "t").unwrap_err().to_string();
    let e = err(&format!("[auth]\nuser = \"lookup\"\n{MINIMAL}"));
    assert!(
        e.contains("auth.user") && e.contains("[users.lookup]"),
        "{e}"
    );
    let e = err(&format!(
        "[auth]\nquery = \"SELECT 1, 2 WHERE $1 = ''\"\n{MINIMAL}"
    ));
    assert!(e.contains("auth.query") && e.contains("auth.user"), "{e}");
    let e = err(&format!(
        "[auth]\nuser = \"app\"\nquery = \"SELECT usename, passwd FROM pg_shadow\"\n{MINIMAL}"
    ));
    assert!(e.contains("auth.query") && e.contains("$1"), "{e}");
    let verifier = postgres_protocol::password::scram_sha_256(b"pw");
    let e = err(&format!(
        "[auth]\nuser = \"lookup\"\n[users.lookup]\npassword = \"{verifier}\"\n{MINIMAL}"
    ));
    assert!(
        e.contains("users.lookup.password") && e.contains("plain"),
        "{e}"
    );
    let e = err("[databases.a]\nhost = \"h\"\nauth_query = \"SELECT 1, 2 WHERE $1 = ''\"\n");
    assert!(e.contains("databases.a.auth_query"), "{e}");
    let e = err("[databases.a]\nhost = \"h\"\nauth_user = \"nobody\"\n");
    assert!(
        e.contains("databases.a.auth_user") && e.contains("nobody"),
        "{e}"
    );
    let e = err(&format!(
        "[auth]\nuser = \"app\"\ncache_ttl = \"1s\"\nnegative_cache_ttl = \"5s\"\n{MINIMAL}"
    ));
    assert!(e.contains("auth.negative_cache_ttl"), "{e}");
    let e = err(&format!("[auth]\nusr = \"app\"\n{MINIMAL}"));
    assert!(e.contains("auth.usr"), "{e}");
}
