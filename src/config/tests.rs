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
