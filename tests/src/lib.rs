//! Real servers for tests. Each guard starts the server on a free loopback port in its own
//! temporary directory and kills it on drop, so tests never share state or leave processes.
//! The servers must be installed (`.ci/run` installs them); a missing one fails the test with
//! a message saying what to install, never a silent skip.

use std::{
    net::{TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

/// A free TCP port on 127.0.0.1 (the listener is closed again; servers that cannot bind
/// port 0 themselves need this).
pub fn free_port() -> Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    Ok(listener.local_addr()?.port())
}

/// Waits until something accepts TCP connections on `port` or the child exits.
fn wait_for_port(child: &mut Child, port: u16, what: &str, log: &Path) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Ok(());
        }
        if let Some(status) = child.try_wait()? {
            let log = std::fs::read_to_string(log).unwrap_or_default();
            bail!("{what} exited with {status} before listening on {port}:\n{log}");
        }
        if Instant::now() > deadline {
            bail!("{what} did not listen on {port} within 30 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn which(program: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|dir| Path::new(dir).join(program))
        .find(|p| p.is_file())
}

/// A child process killed (and reaped) when the guard is dropped.
#[derive(Debug)]
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A private `redis-server` with AOF on (fsync always), so restart tests see every write.
#[derive(Debug)]
pub struct RedisServer {
    proc: Option<Proc>,
    port: u16,
    dir: tempfile::TempDir,
}

impl RedisServer {
    pub fn start() -> Result<Self> {
        let dir = tempfile::tempdir()?;
        let port = free_port()?;
        let mut server = Self { proc: None, port, dir };
        server.spawn()?;
        Ok(server)
    }

    fn spawn(&mut self) -> Result<()> {
        let binary = which("redis-server")
            .context("redis-server is not installed (apt-get install redis-server; .ci/run does this)")?;
        let log = self.dir.path().join("redis.log");
        let mut child = Command::new(binary)
            .args(["--bind", "127.0.0.1", "--port", &self.port.to_string()])
            .args(["--save", "", "--appendonly", "yes", "--appendfsync", "always"])
            .args(["--dir", &self.dir.path().to_string_lossy()])
            .args(["--logfile", &log.to_string_lossy()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting redis-server")?;
        wait_for_port(&mut child, self.port, "redis-server", &log)?;
        self.proc = Some(Proc(child));
        Ok(())
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Kills the server hard and starts it again on the same port and data directory.
    pub fn restart(&mut self) -> Result<()> {
        self.proc = None;
        self.spawn()
    }
}

/// A private S3-compatible server: `s3s-fs` if installed (it checks SigV4 signatures),
/// otherwise `moto_server`.
#[derive(Debug)]
pub struct S3Server {
    _proc: Proc,
    port: u16,
    _dir: tempfile::TempDir,
    pub flavor: &'static str,
}

impl S3Server {
    pub const ACCESS_KEY: &'static str = "testing";
    pub const SECRET_KEY: &'static str = "testingsecret";

    pub fn start() -> Result<Self> {
        let dir = tempfile::tempdir()?;
        let port = free_port()?;
        let log = dir.path().join("s3.log");
        let log_file = std::fs::File::create(&log)?;
        let (mut cmd, flavor) = if let Some(s3s) = which("s3s-fs") {
            let root = dir.path().join("data");
            std::fs::create_dir_all(&root)?;
            let mut cmd = Command::new(s3s);
            cmd.args(["--host", "127.0.0.1", "--port", &port.to_string()])
                .args(["--access-key", Self::ACCESS_KEY, "--secret-key", Self::SECRET_KEY])
                .arg(root);
            (cmd, "s3s-fs")
        } else if let Some(moto) = which("moto_server") {
            let mut cmd = Command::new(moto);
            cmd.args(["-H", "127.0.0.1", "-p", &port.to_string()]);
            (cmd, "moto")
        } else {
            bail!("no S3 test server: install s3s-fs (cargo install s3s-fs) or moto (pip install 'moto[server]'); .ci/run does this");
        };
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(log_file.try_clone()?)
            .stderr(log_file)
            .spawn()
            .with_context(|| format!("starting {flavor}"))?;
        wait_for_port(&mut child, port, flavor, &log)?;
        Ok(Self { _proc: Proc(child), port, _dir: dir, flavor })
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}
