//! A throwaway PostgreSQL cluster from the machine's own binaries, for `pgtether demo` and the
//! test harness: initdb into a temporary directory, start on a free loopback port, create the
//! demo role and database, and remove everything when dropped.
//!
//! initdb and postgres refuse to run as root, so when pgtether runs as root they run as the
//! `postgres` user. The server gets a parent-death signal, so it cannot outlive its creator.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

#[derive(Debug, thiserror::Error)]
pub enum EmbeddedError {
    #[error(
        "PostgreSQL server binaries (initdb, postgres) were not found in PATH or in `pg_config --bindir`. \
         Install them, e.g. `apt-get install postgresql-15` (Debian/Ubuntu), or put their directory on PATH"
    )]
    NoBinaries,
    #[error("running as root but there is no `postgres` user to run PostgreSQL as; create one (useradd postgres)")]
    NoPostgresUser,
    #[error("{step} failed: {detail}")]
    Step { step: &'static str, detail: String },
    #[error("PostgreSQL did not become ready within {0:?}; its log: {1}")]
    NotReady(Duration, String),
}

/// Roles and settings to create in the cluster after it starts.
#[derive(Debug, Clone)]
pub struct Setup {
    /// SQL run as the superuser once the server is up.
    pub sql: Vec<String>,
    /// pg_hba.conf lines placed before the default `scram-sha-256` rule.
    pub hba: Vec<String>,
}

impl Default for Setup {
    /// The demo's layout: role `app` with password `app`, owning database `app`.
    fn default() -> Self {
        Setup {
            sql: vec![
                "CREATE ROLE app LOGIN PASSWORD 'app'".into(),
                "CREATE DATABASE app OWNER app".into(),
            ],
            hba: Vec::new(),
        }
    }
}

/// A running throwaway cluster; dropping it stops the server and deletes its files.
pub struct EmbeddedPostgres {
    pub port: u16,
    pub dir: PathBuf,
    bindir: PathBuf,
    child: Option<Child>,
}

impl EmbeddedPostgres {
    /// Creates and starts a cluster, then runs `setup`.
    pub fn start(setup: &Setup) -> Result<EmbeddedPostgres, EmbeddedError> {
        let bindir = find_bindir().ok_or(EmbeddedError::NoBinaries)?;
        let owner = run_as_owner()?;
        sweep_stale_dirs();
        let dir = std::env::temp_dir().join(format!(
            "pgtether-pg-{}-{}",
            std::process::id(),
            rand::random::<u32>()
        ));
        std::fs::create_dir_all(&dir).map_err(|e| step("creating the cluster directory", e))?;
        if let Some((uid, gid)) = owner {
            std::os::unix::fs::chown(&dir, Some(uid), Some(gid))
                .map_err(|e| step("chown of the cluster directory", e))?;
        }
        let mut pg = EmbeddedPostgres {
            port: 0,
            dir,
            bindir,
            child: None,
        };
        let data = pg.dir.join("data");
        let out = pg
            .command("initdb", owner)
            .args(["-D"])
            .arg(&data)
            .args([
                "-U",
                "postgres",
                "-A",
                "trust",
                "-E",
                "UTF8",
                "--no-sync",
                "--locale=C",
            ])
            .output()
            .map_err(|e| step("starting initdb", e))?;
        if !out.status.success() {
            return Err(EmbeddedError::Step {
                step: "initdb",
                detail: String::from_utf8_lossy(&out.stderr).into_owned(),
            });
        }
        let mut hba = String::from("local all all trust\nhost all postgres 127.0.0.1/32 trust\n");
        for line in &setup.hba {
            hba.push_str(line);
            hba.push('\n');
        }
        hba.push_str("host all all 127.0.0.1/32 scram-sha-256\n");
        std::fs::write(data.join("pg_hba.conf"), hba)
            .map_err(|e| step("writing pg_hba.conf", e))?;

        pg.port = free_port().map_err(|e| step("finding a free port", e))?;
        let log = std::fs::File::create(pg.dir.join("postgres.log"))
            .map_err(|e| step("creating the log", e))?;
        if let Some((uid, gid)) = owner {
            let _ = std::os::unix::fs::chown(pg.dir.join("postgres.log"), Some(uid), Some(gid));
        }
        let log_err = log.try_clone().map_err(|e| step("creating the log", e))?;
        let mut cmd = pg.command("postgres", owner);
        cmd.arg("-D")
            .arg(&data)
            .args(["-p", &pg.port.to_string(), "-k"])
            .arg(&pg.dir)
            .args([
                "-c",
                "listen_addresses=127.0.0.1",
                "-c",
                "fsync=off",
                "-c",
                "synchronous_commit=off",
                "-c",
                "full_page_writes=off",
                "-c",
                "max_connections=300",
            ])
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err);
        // SAFETY: prctl is async-signal-safe and touches only this (child) process.
        unsafe {
            cmd.pre_exec(|| {
                // SIGINT = fast shutdown: the server stops cleanly if its creator dies.
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGINT);
                Ok(())
            });
        }
        pg.child = Some(cmd.spawn().map_err(|e| step("starting postgres", e))?);
        pg.wait_ready(Duration::from_secs(60))?;
        for sql in &setup.sql {
            pg.psql_as("postgres", "postgres", sql)?;
        }
        Ok(pg)
    }

    fn command(&self, program: &str, owner: Option<(u32, u32)>) -> Command {
        let mut cmd = Command::new(self.bindir.join(program));
        if let Some((uid, gid)) = owner {
            cmd.uid(uid).gid(gid);
            // Keep HOME and the working directory somewhere the postgres user may read.
            cmd.current_dir(&self.dir).env("HOME", &self.dir);
        }
        cmd
    }

    fn wait_ready(&mut self, limit: Duration) -> Result<(), EmbeddedError> {
        let started = Instant::now();
        loop {
            if std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok()
                && self.psql_as("postgres", "postgres", "SELECT 1").is_ok()
            {
                return Ok(());
            }
            let exited = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
                .is_some();
            if exited || started.elapsed() > limit {
                let log =
                    std::fs::read_to_string(self.dir.join("postgres.log")).unwrap_or_default();
                return Err(EmbeddedError::NotReady(limit, log));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Runs SQL with psql over TCP as `user` (trusted: postgres; others need PGPASSWORD set
    /// by the caller). Returns psql's unaligned, tuples-only output.
    pub fn psql_as(&self, user: &str, database: &str, sql: &str) -> Result<String, EmbeddedError> {
        let out = Command::new(psql_path(&self.bindir))
            .args([
                "-X",
                "-q",
                "-A",
                "-t",
                "-v",
                "ON_ERROR_STOP=1",
                "-h",
                "127.0.0.1",
                "-p",
            ])
            .arg(self.port.to_string())
            .args(["-U", user, "-d", database, "-c", sql])
            .output()
            .map_err(|e| step("running psql", e))?;
        if !out.status.success() {
            return Err(EmbeddedError::Step {
                step: "psql",
                detail: String::from_utf8_lossy(&out.stderr).into_owned(),
            });
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    /// Runs `pg_ctl` on this cluster's data directory (as its owner), e.g. `restart -m fast`
    /// to simulate a database restart. A server pg_ctl starts is not this process's child:
    /// stop it with `pg_ctl stop` when done.
    pub fn pg_ctl(&self, args: &[&str]) -> Result<String, EmbeddedError> {
        let out = self
            .command("pg_ctl", run_as_owner()?)
            .arg("-D")
            .arg(self.dir.join("data"))
            .args(["-w", "-l"])
            .arg(self.dir.join("postgres.log"))
            .args(args)
            .output()
            .map_err(|e| step("running pg_ctl", e))?;
        if !out.status.success() {
            return Err(EmbeddedError::Step {
                step: "pg_ctl",
                detail: String::from_utf8_lossy(&out.stderr).into_owned(),
            });
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    /// Stops the server (fast shutdown) and waits for it.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SAFETY: plain kill(2) on our own child's pid.
            unsafe {
                libc::kill(child.id() as i32, libc::SIGINT);
            }
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for EmbeddedPostgres {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn step(step: &'static str, e: std::io::Error) -> EmbeddedError {
    EmbeddedError::Step {
        step,
        detail: e.to_string(),
    }
}

/// Finds the directory holding initdb and postgres: PATH first, then `pg_config --bindir`.
pub fn find_bindir() -> Option<PathBuf> {
    let has_both = |d: &Path| d.join("initdb").is_file() && d.join("postgres").is_file();
    if let Some(path) = std::env::var_os("PATH") {
        for d in std::env::split_paths(&path) {
            if has_both(&d) {
                // Resolve symlinks so sibling tools (pg_ctl, psql) are found next to them.
                let real = std::fs::canonicalize(d.join("initdb"))
                    .ok()
                    .and_then(|p| p.parent().map(Path::to_path_buf))
                    .unwrap_or(d);
                return Some(real);
            }
        }
    }
    let out = Command::new("pg_config").arg("--bindir").output().ok()?;
    let d = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    has_both(&d).then_some(d)
}

fn psql_path(bindir: &Path) -> PathBuf {
    let p = bindir.join("psql");
    if p.is_file() {
        p
    } else {
        PathBuf::from("psql")
    }
}

/// The uid/gid to run PostgreSQL as: `postgres` when we are root, else ourselves.
fn run_as_owner() -> Result<Option<(u32, u32)>, EmbeddedError> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Ok(None);
    }
    let name = std::ffi::CString::new("postgres").expect("no NUL");
    // SAFETY: getpwnam returns a pointer to static storage or null; read immediately.
    let pw = unsafe { libc::getpwnam(name.as_ptr()) };
    if pw.is_null() {
        return Err(EmbeddedError::NoPostgresUser);
    }
    // SAFETY: pw is non-null and points to a valid passwd record.
    let (uid, gid) = unsafe { ((*pw).pw_uid, (*pw).pw_gid) };
    Ok(Some((uid, gid)))
}

/// A port that was free a moment ago on 127.0.0.1.
pub fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Removes clusters left behind by processes that no longer exist (killed test runs).
fn sweep_stale_dirs() {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(rest) = name.to_str().and_then(|n| n.strip_prefix("pgtether-pg-")) else {
            continue;
        };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}
