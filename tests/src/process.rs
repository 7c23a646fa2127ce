//! Processes the stack starts, each on a loopback port it picked, each stopped by its pid.

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// A free loopback port (bound, then released for the child to bind).
pub fn free_port() -> anyhow::Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0").context("binding a free port")?;
    Ok(listener.local_addr()?.port())
}

/// A child process that is stopped (by its pid) when dropped.
pub struct Managed {
    pub name: String,
    child: Child,
}

impl Managed {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends a signal to the process, by its pid.
    pub fn signal(&self, signal: Signal) {
        let _ = kill(Pid::from_raw(self.child.id() as i32), signal);
    }

    /// SIGKILL, and reap it.
    pub fn kill_now(&mut self) {
        self.signal(Signal::SIGKILL);
        let _ = self.child.wait();
    }

    /// Sends `signal` and waits up to `grace` for the exit; SIGKILL after that.
    pub fn stop(&mut self, signal: Signal, grace: Duration) -> Option<std::process::ExitStatus> {
        if let Ok(Some(status)) = self.child.try_wait() {
            return Some(status);
        }
        self.signal(signal);
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        self.kill_now();
        None
    }

    pub fn try_wait(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }
}

impl Drop for Managed {
    fn drop(&mut self) {
        self.stop(Signal::SIGTERM, Duration::from_secs(5));
    }
}

pub fn spawn(name: &str, command: &mut Command) -> anyhow::Result<Managed> {
    let child = command
        .spawn()
        .with_context(|| format!("starting {name} ({command:?})"))?;
    Ok(Managed {
        name: name.to_string(),
        child,
    })
}

/// Where cargo put the workspace's binaries: beside the running test or command.
pub fn bin_path(name: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe().context("locating the running executable")?;
    let mut dir = exe
        .parent()
        .context("executable without a folder")?
        .to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    let path = dir.join(name);
    if !path.exists() {
        bail!(
            "{} is not built; run `cargo build --workspace --all-targets` first",
            path.display()
        );
    }
    Ok(path)
}

/// Waits until something accepts TCP connections at `addr`.
pub fn wait_for_port(addr: SocketAddr, within: Duration, what: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    bail!("{what} did not listen on {addr} within {within:?}")
}

/// A private Postgres cluster in a temporary folder, on a port of its own.
pub struct Postgres {
    pub port: u16,
    pub dir: tempfile::TempDir,
    pub process: Option<Managed>,
    run_as: Option<(u32, u32)>,
    /// Loads `pg_stat_statements` (for `hive-bench --statements`).
    track_statements: bool,
}

pub fn pg_bin(name: &str) -> PathBuf {
    for dir in [
        "/usr/lib/postgresql/15/bin",
        "/usr/lib/postgresql/16/bin",
        "/usr/local/bin",
    ] {
        let p = Path::new(dir).join(name);
        if p.exists() {
            return p;
        }
    }
    PathBuf::from(name)
}

impl Postgres {
    pub fn start() -> anyhow::Result<Self> {
        Self::start_with(false)
    }

    /// As [`Postgres::start`]; `track_statements` loads `pg_stat_statements`.
    pub fn start_with(track_statements: bool) -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new().prefix("hive-pg-").tempdir()?;
        // Postgres refuses to run as root: run it as the `postgres` user when we are root.
        let run_as = if nix::unistd::geteuid().is_root() {
            let user = nix::unistd::User::from_name("postgres")?
                .context("running as root needs a `postgres` user for the cluster")?;
            std::os::unix::fs::chown(dir.path(), Some(user.uid.as_raw()), Some(user.gid.as_raw()))?;
            Some((user.uid.as_raw(), user.gid.as_raw()))
        } else {
            None
        };
        let data = dir.path().join("data");
        let mut initdb = Command::new(pg_bin("initdb"));
        initdb
            .args([
                "-A",
                "trust",
                "-U",
                "postgres",
                "--no-sync",
                "-E",
                "UTF8",
                "-D",
            ])
            .arg(&data)
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        if let Some((uid, gid)) = run_as {
            initdb.uid(uid).gid(gid);
        }
        let out = initdb.output().context("running initdb")?;
        if !out.status.success() {
            bail!("initdb failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        let mut pg = Postgres {
            port: free_port()?,
            dir,
            process: None,
            run_as,
            track_statements,
        };
        pg.run()?;
        Ok(pg)
    }

    /// Starts the server on the cluster (again, after `stop`).
    pub fn run(&mut self) -> anyhow::Result<()> {
        let data = self.dir.path().join("data");
        let mut cmd = Command::new(pg_bin("postgres"));
        cmd.arg("-D")
            .arg(&data)
            .args([
                "-p",
                &self.port.to_string(),
                "-c",
                "listen_addresses=127.0.0.1",
                "-c",
            ])
            .arg(format!(
                "unix_socket_directories={}",
                self.dir.path().display()
            ))
            .args([
                "-c",
                "fsync=off",
                "-c",
                "max_connections=300",
                "-c",
                "log_min_messages=warning",
            ])
            .args(if self.track_statements {
                &["-c", "shared_preload_libraries=pg_stat_statements"][..]
            } else {
                &[][..]
            })
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if let Some((uid, gid)) = self.run_as {
            cmd.uid(uid).gid(gid);
        }
        self.process = Some(spawn("postgres", &mut cmd)?);
        wait_for_port(
            SocketAddr::from(([127, 0, 0, 1], self.port)),
            Duration::from_secs(30),
            "postgres",
        )
    }

    /// Fast shutdown (SIGINT), as an operator's restart would do.
    pub fn stop(&mut self) {
        self.shut_down(Signal::SIGINT);
    }

    /// Immediate shutdown (SIGQUIT): no checkpoint, so the next start runs crash recovery, as
    /// after a crash of the server (the OS's buffers survive; that is all fsync=off risks).
    pub fn crash(&mut self) {
        self.shut_down(Signal::SIGQUIT);
    }

    /// The postmaster's shutdown modes are its signals; `run` starts it again.
    fn shut_down(&mut self, mode: Signal) {
        if let Some(mut p) = self.process.take() {
            p.stop(mode, Duration::from_secs(20));
        }
    }

    pub fn url(&self, database: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{database}", self.port)
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        self.stop();
    }
}

/// moto in server mode, as AWS.
pub struct Moto {
    pub port: u16,
    pub process: Managed,
}

impl Moto {
    /// Starts moto on a free port; tries a second port if the first start fails (the port may
    /// have been taken between picking and binding it).
    pub fn start() -> anyhow::Result<Self> {
        match Self::start_once() {
            Ok(moto) => Ok(moto),
            Err(first) => Self::start_once().with_context(|| format!("first try: {first:#}")),
        }
    }

    fn start_once() -> anyhow::Result<Self> {
        let port = free_port()?;
        let log_path = std::env::temp_dir().join(format!("hive-moto-{port}.log"));
        let log = std::fs::File::create(&log_path)?;
        let mut cmd =
            Command::new(std::env::var("HIVE_PYTHON").unwrap_or_else(|_| "python3".into()));
        cmd.args([
            "-m",
            "moto.server",
            "-H",
            "127.0.0.1",
            "-p",
            &port.to_string(),
        ])
        .stdout(Stdio::null())
        .stderr(log);
        let mut process = spawn("moto", &mut cmd)?;
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            if std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                return Ok(Moto { port, process });
            }
            if let Some(status) = process.try_wait() {
                let output = std::fs::read_to_string(&log_path).unwrap_or_default();
                bail!("moto exited ({status}) before listening on {addr}: {output}");
            }
            if Instant::now() > deadline {
                let output = std::fs::read_to_string(&log_path).unwrap_or_default();
                bail!("moto did not listen on {addr} within 90 s: {output}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

/// Starts one of our binaries with `env`; for hive-api, reads the address it printed.
pub fn spawn_ours(
    bin: &str,
    env: &[(String, String)],
    log: Option<&Path>,
) -> anyhow::Result<(Managed, Option<SocketAddr>)> {
    let mut cmd = Command::new(bin_path(bin)?);
    cmd.env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        // Only hive-api prints (one line, where it listens); nobody reads a worker's stdout.
        .stdout(if bin == "hive-api" {
            Stdio::piped()
        } else {
            Stdio::null()
        });
    match log {
        Some(path) => {
            let file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)?;
            cmd.stderr(file);
        }
        None => {
            cmd.stderr(Stdio::inherit());
        }
    }
    let mut managed = spawn(bin, &mut cmd)?;
    if bin != "hive-api" {
        return Ok((managed, None));
    }
    let stdout = managed
        .child
        .stdout
        .take()
        .context("child without stdout")?;
    let mut line = String::new();
    BufReader::new(stdout)
        .read_line(&mut line)
        .context("reading hive-api's first line")?;
    let addr = line
        .trim()
        .rsplit(' ')
        .next()
        .and_then(|a| a.parse().ok())
        .with_context(|| format!("hive-api did not say where it listens: `{}`", line.trim()))?;
    Ok((managed, Some(addr)))
}
