//! Lexer unit tests.
use super::*;

fn effects(sql: &str) -> Vec<Effect> {
    let mut out = Vec::new();
    analyze(sql, &mut out);
    out
}

fn set(key: &str, replay: &str) -> Effect {
    Effect::Set {
        key: key.into(),
        replay: replay.into(),
    }
}

#[test]
fn splits_statements_outside_quotes_and_comments() {
    let sql = "SELECT ';' ; SELECT $x$ ; $x$; /* ; /* ; */ ; */ SELECT \"a;b\" -- ;\n; E'\\';'";
    let parts: Vec<_> = Statements::new(sql).collect();
    assert_eq!(
        parts,
        vec![
            "SELECT ';'",
            "SELECT $x$ ; $x$",
            "/* ; /* ; */ ; */ SELECT \"a;b\" -- ;",
            "E'\\';'"
        ]
    );
    assert_eq!(Statements::new(" ; ;-- x\n").count(), 0);
}

#[test]
fn plain_statements_have_no_effects() {
    for sql in [
        "SELECT abalance FROM pgbench_accounts WHERE aid = $1",
        "UPDATE t SET x = 1",
        "INSERT INTO t VALUES ('set_config')",
        "BEGIN; COMMIT",
        "SELECT 'pg_advisory_lock(1)'",
        "SET LOCAL search_path TO x",
        "SET TRANSACTION ISOLATION LEVEL SERIALIZABLE",
        "CREATE TEMP TABLE t (x int) ON COMMIT DROP",
        "SELECT pg_advisory_xact_lock(1)",
        "",
    ] {
        assert_eq!(effects(sql), vec![], "{sql}");
    }
}

#[test]
fn set_and_reset_forms() {
    assert_eq!(
        effects("SET search_path TO a, b"),
        vec![set("search_path", "SET search_path TO a, b")]
    );
    assert_eq!(
        effects("set SESSION TimeZone = 'UTC'"),
        vec![set("timezone", "set SESSION TimeZone = 'UTC'")]
    );
    assert_eq!(
        effects("SET TIME ZONE 'UTC'"),
        vec![set("timezone", "SET TIME ZONE 'UTC'")]
    );
    assert_eq!(
        effects("SET myapp.client = '3'"),
        vec![set("myapp.client", "SET myapp.client = '3'")]
    );
    assert_eq!(
        effects("SET \"MyApp\".x TO 1"),
        vec![set("MyApp.x", "SET \"MyApp\".x TO 1")]
    );
    assert_eq!(
        effects("SET NAMES 'LATIN1'"),
        vec![set("client_encoding", "SET NAMES 'LATIN1'")]
    );
    assert_eq!(
        effects("RESET search_path"),
        vec![Effect::Reset {
            key: "search_path".into()
        }]
    );
    assert_eq!(
        effects("RESET myapp.client"),
        vec![Effect::Reset {
            key: "myapp.client".into()
        }]
    );
    assert_eq!(effects("reset all"), vec![Effect::ResetAll]);
    assert_eq!(
        effects("RESET TIME ZONE"),
        vec![Effect::Reset {
            key: "timezone".into()
        }]
    );
    assert_eq!(
        effects("SET myapp.a = 'x' -- note"),
        vec![set("myapp.a", "SET myapp.a = 'x'")]
    );
    assert_eq!(
        effects("SET myapp.a = 'x' /* note */ ; SELECT 1"),
        vec![set("myapp.a", "SET myapp.a = 'x'")]
    );
    assert_eq!(
        effects("SET statement_timeout TO DEFAULT"),
        vec![set("statement_timeout", "SET statement_timeout TO DEFAULT")]
    );
}

#[test]
fn set_config_literal_and_computed() {
    assert_eq!(
        effects("SELECT set_config('search_path', 'a''b', false)"),
        vec![set(
            "search_path",
            "SELECT pg_catalog.set_config('search_path', 'a''b', false)"
        )]
    );
    assert_eq!(
        effects("select pg_catalog.set_config('x.y', 'v', true)"),
        vec![]
    );
    assert_eq!(
        effects("SELECT set_config($1, $2, false)"),
        vec![Effect::Pin(PinReason::Untracked)]
    );
}

#[test]
fn pinning_statements() {
    assert_eq!(
        effects("LISTEN jobs"),
        vec![Effect::Listen {
            channel: "jobs".into()
        }]
    );
    assert_eq!(
        effects("UNLISTEN *"),
        vec![Effect::Unlisten { channel: None }]
    );
    assert_eq!(
        effects("SELECT pg_advisory_lock(42)"),
        vec![Effect::Pin(PinReason::AdvisoryLock)]
    );
    assert_eq!(
        effects("SELECT pg_try_advisory_lock(1), 2"),
        vec![Effect::Pin(PinReason::AdvisoryLock)]
    );
    assert_eq!(
        effects("SELECT pg_advisory_unlock_all()"),
        vec![Effect::UnlockAll]
    );
    assert_eq!(
        effects("CREATE TEMP TABLE t (x int)"),
        vec![Effect::Pin(PinReason::TempTable)]
    );
    assert_eq!(
        effects("create temporary view v as select 1"),
        vec![Effect::Pin(PinReason::TempTable)]
    );
    assert_eq!(
        effects("CREATE TABLE pg_temp.t (x int)"),
        vec![Effect::Pin(PinReason::TempTable)]
    );
    assert_eq!(
        effects("SELECT * INTO TEMP t2 FROM t"),
        vec![Effect::Pin(PinReason::TempTable)]
    );
    assert_eq!(
        effects("DECLARE c CURSOR WITH HOLD FOR SELECT 1"),
        vec![Effect::HeldCursor { name: "c".into() }]
    );
    assert_eq!(effects("DECLARE c CURSOR FOR SELECT 'with hold'"), vec![]);
    assert_eq!(
        effects("CLOSE ALL"),
        vec![Effect::CloseCursor { name: None }]
    );
    assert_eq!(
        effects("PREPARE q AS SELECT 1"),
        vec![Effect::SqlPrepare { name: "q".into() }]
    );
    assert_eq!(effects("PREPARE TRANSACTION 'x'"), vec![]);
    assert_eq!(
        effects("DEALLOCATE PREPARE ALL"),
        vec![Effect::Deallocate { name: None }]
    );
    assert_eq!(
        effects("LOAD 'auto_explain'"),
        vec![Effect::Pin(PinReason::Load)]
    );
    assert_eq!(
        effects("SELECT currval('s')"),
        vec![Effect::Pin(PinReason::Sequence)]
    );
    assert_eq!(effects("DISCARD ALL"), vec![Effect::DiscardAll]);
}

#[test]
fn multi_statement_text() {
    assert_eq!(
        effects("SET a.b = 1; SELECT 1; LISTEN c"),
        vec![
            set("a.b", "SET a.b = 1"),
            Effect::Listen {
                channel: "c".into()
            }
        ]
    );
}

#[test]
fn unterminated_input_does_not_panic() {
    for sql in [
        "'abc",
        "$tag$ abc",
        "\"abc",
        "/* abc",
        "E'\\",
        "SET",
        "SET x.",
        "$",
        "$1",
        "é'",
        // Found by the fuzz target: an unterminated quoted identifier ending in a multi-byte
        // character.
        "\"é",
        "LISTEN \"ché",
        "SET \"a\".\"€",
    ] {
        let _ = effects(sql);
    }
}

#[test]
fn remembered_plain_texts_never_hide_a_change() {
    // Plain texts and changes of equal length and equal first, middle and last bytes land in
    // the same slot of the per-thread memory of plain texts.
    let plain = "SELECT x FROM t WHERE a = 1";
    let change = "SET x = 1 /* xxxxxxxxxx */1";
    assert_eq!(plain.len(), change.len());
    for _ in 0..3 {
        let mut out = Vec::new();
        analyze(plain, &mut out);
        assert!(out.is_empty());
        analyze(change, &mut out);
        assert_eq!(out.len(), 1, "{out:?}");
    }
    let mut out = Vec::new();
    for i in 0..200 {
        analyze(&format!("SELECT {i}"), &mut out);
        analyze(&format!("SET search_path = s{i}"), &mut out);
    }
    assert_eq!(out.len(), 200);
}

#[test]
fn texts_without_effects_are_remembered_and_texts_with_effects_are_not() {
    // A candidate word ("set") without an effect: analyzed once, then recognized.
    let update = "UPDATE pgbench_accounts SET abalance = abalance + $1 WHERE aid = $2";
    assert!(effects(update).is_empty());
    assert!(
        Plain::unseen(update.as_bytes()).is_none(),
        "remembered as plain"
    );
    assert!(effects(update).is_empty());
    // Effects are found every time: such a text is never remembered.
    let set_path = "SET search_path = app";
    for _ in 0..2 {
        assert_eq!(effects(set_path), vec![set("search_path", set_path)]);
        assert!(Plain::unseen(set_path.as_bytes()).is_some());
    }
}

#[test]
fn text_in_another_client_encoding_is_lexed_by_its_ascii() {
    let of = |sql: &[u8]| {
        let mut out = Vec::new();
        analyze_bytes(sql, &mut out);
        out
    };
    // LATIN1 'é' (0xE9) elsewhere in the text: the SET is tracked as usual.
    assert_eq!(
        of(b"SET search_path = s1; SELECT 'caf\xe9'"),
        vec![set("search_path", "SET search_path = s1")]
    );
    assert_eq!(
        of(b"LISTEN jobs; SELECT '\xe9'"),
        vec![Effect::Listen {
            channel: "jobs".into()
        }]
    );
    // In the value itself it could not be replayed as sent: the client is pinned.
    assert_eq!(
        of(b"SET application_name = 'caf\xe9'"),
        vec![Effect::Pin(PinReason::Untracked)]
    );
    assert_eq!(
        of(b"LISTEN \"caf\xe9\""),
        vec![Effect::Pin(PinReason::Untracked)]
    );
    assert!(of(b"UPDATE t SET name = 'caf\xe9'").is_empty());
    // SJIS '\x95\x5c' ends in a backslash: read by its ASCII, the E'' string would swallow
    // the SET. Such text pins instead.
    assert_eq!(
        of(b"SELECT E'\x95\\'; SET search_path = s1"),
        vec![Effect::Pin(PinReason::Untracked)]
    );
    assert_eq!(
        of(b"SET search_path = s1; SELECT E'\x95\\n'"),
        vec![Effect::Pin(PinReason::Untracked)]
    );
}
