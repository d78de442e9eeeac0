//! A throwaway PostgreSQL server for tests: a new cluster (`initdb`) in a temporary folder,
//! started on a free loopback port with trust authentication, stopped and deleted on drop.
//! Debian's `postgresql` package provides the programs (`bash tests/setup` installs it).
//!
//! Shared by the storage suite (`db::tests`) and the end-to-end tests (`tests/common`), which
//! include this file.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;

pub struct PostgresCluster {
    dir: tempfile::TempDir,
    bin: PathBuf,
    port: u16,
    /// Root may not run PostgreSQL: the programs then run as the `postgres` user.
    as_postgres_user: bool,
}

impl PostgresCluster {
    pub fn start() -> Self {
        let bin = server_programs().unwrap_or_else(|| {
            panic!(
                "PostgreSQL's server programs (initdb, pg_ctl) are not installed; \
                 `bash tests/setup` installs them (Debian package postgresql)"
            )
        });
        let as_postgres_user = is_root();
        let dir = tempfile::tempdir().expect("a folder for the cluster");
        if as_postgres_user {
            run(Command::new("chown").arg("postgres").arg(dir.path()));
        }
        let port = free_port();
        let cluster = Self {
            dir,
            bin,
            port,
            as_postgres_user,
        };
        let data = cluster.data_dir();
        run(cluster
            .program("initdb")
            .args([
                "-U",
                "postgres",
                "-A",
                "trust",
                "--no-sync",
                "--no-locale",
                "-E",
                "UTF8",
            ])
            .arg("-D")
            .arg(&data));
        cluster.start_server();
        cluster
    }

    /// Starts the server on the cluster (again, after [`Self::stop`]).
    pub fn start_server(&self) {
        let options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off",
            self.port,
            self.dir.path().display()
        );
        run(self
            .program("pg_ctl")
            .arg("-D")
            .arg(self.data_dir())
            .arg("-l")
            .arg(self.dir.path().join("server.log"))
            .args(["-w", "-o", &options, "start"]));
    }

    /// A new, empty database `name` on this server; its URL. (Through `psql`: the blocking
    /// client cannot run inside the async tests' runtime.)
    pub fn create_database(&self, name: &str) -> String {
        run(Command::new(self.bin.join("psql"))
            .arg(self.url("postgres"))
            .args(["-v", "ON_ERROR_STOP=1", "-q", "-c"])
            .arg(format!("CREATE DATABASE {name}")));
        self.url(name)
    }

    pub fn url(&self, database: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{database}", self.port)
    }

    /// Stops the server at once (as a crash would); it can be started again.
    pub fn stop(&self) {
        run(self.program("pg_ctl").arg("-D").arg(self.data_dir()).args([
            "-m",
            "immediate",
            "-w",
            "stop",
        ]));
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn program(&self, name: &str) -> Command {
        let path = self.bin.join(name);
        if self.as_postgres_user {
            let mut command = Command::new("runuser");
            command.args(["-u", "postgres", "--"]).arg(path);
            command
        } else {
            Command::new(path)
        }
    }
}

impl Drop for PostgresCluster {
    fn drop(&mut self) {
        let _ = self
            .program("pg_ctl")
            .arg("-D")
            .arg(self.data_dir())
            .args(["-m", "immediate", "stop"])
            .output();
    }
}

/// The folder of `initdb` and `pg_ctl`: Debian keeps them off the PATH, in
/// `/usr/lib/postgresql/<major>/bin`; elsewhere they are on it.
fn server_programs() -> Option<PathBuf> {
    let debian = Path::new("/usr/lib/postgresql");
    let mut majors: Vec<(u32, PathBuf)> = std::fs::read_dir(debian)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let major = entry.file_name().to_str()?.parse().ok()?;
            let bin = entry.path().join("bin");
            bin.join("initdb").exists().then_some((major, bin))
        })
        .collect();
    majors.sort();
    if let Some((_, bin)) = majors.pop() {
        return Some(bin);
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .find(|dir| dir.join("initdb").exists() && dir.join("pg_ctl").exists())
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|out| String::from_utf8_lossy(&out.stdout).trim() == "0")
}

fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("a free port");
    listener.local_addr().expect("its address").port()
}

fn run(command: &mut Command) {
    let out = command
        .output()
        .unwrap_or_else(|e| panic!("cannot run {command:?}: {e}"));
    assert!(
        out.status.success(),
        "{command:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
