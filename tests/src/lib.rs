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

pub mod qemu;
pub mod qemu_arm64;

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
        let binary = which("redis-server").context(
            "redis-server is not installed (apt-get install redis-server; .ci/run does this)",
        )?;
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

    /// Kills the server hard; `restart` brings it back.
    pub fn stop(&mut self) {
        self.proc = None;
    }
}

/// A private S3-compatible server: `s3s-fs`, a filesystem-backed S3 implementation that
/// checks SigV4 signatures and supports multipart uploads. (moto 5.2 was tried too: it answers
/// CompleteMultipartUpload with a `CompleteMultipartUploadResponse` root that aws-sdk-s3
/// rejects, so it cannot stand in for MinIO here.)
#[derive(Debug)]
pub struct S3Server {
    _proc: Proc,
    port: u16,
    _dir: tempfile::TempDir,
}

impl S3Server {
    pub const ACCESS_KEY: &'static str = "testing";
    pub const SECRET_KEY: &'static str = "testingsecret";

    pub fn start() -> Result<Self> {
        let binary = which("s3s-fs").context(
            "s3s-fs is not installed (cargo install --locked s3s-fs@0.14.1 --features binary; .ci/run does this)",
        )?;
        let dir = tempfile::tempdir()?;
        let port = free_port()?;
        let log = dir.path().join("s3.log");
        let log_file = std::fs::File::create(&log)?;
        let root = dir.path().join("data");
        std::fs::create_dir_all(&root)?;
        let mut child = Command::new(binary)
            .args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .args(["--access-key", Self::ACCESS_KEY, "--secret-key", Self::SECRET_KEY])
            .arg(root)
            .stdin(Stdio::null())
            .stdout(log_file.try_clone()?)
            .stderr(log_file)
            .spawn()
            .context("starting s3s-fs")?;
        wait_for_port(&mut child, port, "s3s-fs", &log)?;
        Ok(Self { _proc: Proc(child), port, _dir: dir })
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

/// The `ctpf` binary under test: `$CTPF_BIN`, or the one cargo built next to this test
/// executable (`target/<profile>/ctpf`; `cargo test --workspace` builds it).
pub fn ctpf_binary() -> Result<PathBuf> {
    if let Some(bin) = std::env::var_os("CTPF_BIN") {
        return Ok(PathBuf::from(bin));
    }
    let exe = std::env::current_exe()?;
    // target/<profile>/deps/<test>-<hash> -> target/<profile>/ctpf
    let profile_dir = exe.parent().and_then(Path::parent).context("odd test executable path")?;
    let bin = profile_dir.join("ctpf");
    if !bin.is_file() {
        bail!("{} not found; build it first (cargo build -p ctpf) or set CTPF_BIN", bin.display());
    }
    Ok(bin)
}

/// A running `ctpf` server process (`up`, `manager` or `worker`). Its stdout is read for the
/// "listening on" line; stderr goes to a log file that failed tests print. Killed on drop.
#[derive(Debug)]
pub struct CtpfProcess {
    child: Option<Child>,
    pub api: Option<String>,
    pub log: PathBuf,
    stdout: std::sync::mpsc::Receiver<String>,
}

impl CtpfProcess {
    /// Starts `ctpf ARGS...` with extra environment; waits for `ready` on stdout (e.g.
    /// "listening on" for servers, "ready" for workers).
    pub fn start(args: &[&str], env: &[(&str, &str)], log: PathBuf, ready: &str) -> Result<Self> {
        let mut cmd = Command::new(ctpf_binary()?);
        cmd.args(args);
        Self::spawn(cmd, env, log, ready)
    }

    /// Like [`CtpfProcess::start`], inside network namespace `netns` (`ip netns exec` execs
    /// ctpf in place, so the child's pid is ctpf's and signals reach it).
    pub fn start_in_netns(
        netns: &Netns,
        args: &[&str],
        env: &[(&str, &str)],
        log: PathBuf,
        ready: &str,
    ) -> Result<Self> {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", netns.name()]).arg(ctpf_binary()?).args(args);
        Self::spawn(cmd, env, log, ready)
    }

    fn spawn(mut cmd: Command, env: &[(&str, &str)], log: PathBuf, ready: &str) -> Result<Self> {
        cmd.envs(env.iter().copied())
            .env("RUST_LOG", std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log)?);
        let mut child = cmd.spawn().context("starting ctpf")?;
        let stdout = child.stdout.take().context("no stdout")?;
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            use std::io::BufRead as _;
            for line in std::io::BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut process = Self { child: Some(child), api: None, log, stdout: rx };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match process.stdout.recv_timeout(left.min(Duration::from_millis(200))) {
                Ok(line) => {
                    if let Some(rest) = line.strip_prefix("listening on ")
                        && rest.ends_with("(api)")
                    {
                        process.api = rest.split_whitespace().next().map(str::to_owned);
                    }
                    if line.contains(ready) {
                        return Ok(process);
                    }
                }
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                    let status = process.child.as_mut().map(|c| c.wait()).transpose()?;
                    bail!("ctpf exited ({status:?}) before {ready:?}:\n{}", process.log_text());
                }
            }
            if Instant::now() >= deadline {
                bail!("ctpf did not print {ready:?} within 60 s:\n{}", process.log_text());
            }
        }
    }

    pub fn api(&self) -> &str {
        self.api.as_deref().unwrap_or_default()
    }

    /// Waits up to `limit` for a stdout line (printed after start-up) containing `text`.
    pub fn wait_for_output(&mut self, text: &str, limit: Duration) -> Result<String> {
        let deadline = Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.stdout.recv_timeout(left.min(Duration::from_millis(200))) {
                Ok(line) if line.contains(text) => return Ok(line),
                Ok(_) | Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                    bail!("ctpf exited before printing {text:?}:\n{}", self.log_text());
                }
            }
            if Instant::now() >= deadline {
                bail!("ctpf did not print {text:?} within {limit:?}:\n{}", self.log_text());
            }
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Sends SIGTERM and waits for a clean exit; returns whether the exit status was success.
    pub fn terminate(&mut self) -> Result<bool> {
        let Some(mut child) = self.child.take() else { return Ok(true) };
        Command::new("kill").args(["-TERM", &child.id().to_string()]).status()?;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = child.try_wait()? {
                return Ok(status.success());
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!("ctpf did not stop within 30 s of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL: no chance to flush or clean up, like a power cut of the process.
    pub fn kill9(&mut self) -> Result<()> {
        if let Some(mut child) = self.child.take() {
            child.kill()?;
            child.wait()?;
        }
        Ok(())
    }
}

impl Drop for CtpfProcess {
    fn drop(&mut self) {
        let _ = self.kill9();
    }
}

/// Runs a `ctpf` client command to completion.
pub fn ctpf_cli(args: &[&str], env: &[(&str, &str)]) -> Result<std::process::Output> {
    Ok(Command::new(ctpf_binary()?)
        .args(args)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .output()?)
}

/// A running `ctpf up` and its admin token: runs the CLI against it as an operator would.
#[derive(Debug)]
pub struct UpAdmin {
    pub process: CtpfProcess,
    pub token: String,
}

impl UpAdmin {
    /// `process` runs `ctpf up --data-dir data`; the admin token is read from there.
    pub fn new(process: CtpfProcess, data: &Path) -> Result<Self> {
        let token = std::fs::read_to_string(data.join("admin.token"))
            .context("reading the admin token")?
            .trim()
            .to_owned();
        Ok(Self { process, token })
    }

    /// Runs `ctpf ARGS` against this `ctpf up`.
    pub fn run(&self, args: &[&str]) -> Result<std::process::Output> {
        ctpf_cli(args, &[("CTPF_API", self.process.api()), ("CTPF_TOKEN", self.token.as_str())])
    }

    /// The stdout of a command that must succeed (the test fails with its stderr otherwise).
    pub fn cli(&self, args: &[&str]) -> Vec<u8> {
        let out = self.run(args).expect("the ctpf binary runs");
        assert!(out.status.success(), "ctpf {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        out.stdout
    }

    /// The stderr of a command that must fail.
    pub fn refused(&self, args: &[&str]) -> String {
        let out = self.run(args).expect("the ctpf binary runs");
        assert!(!out.status.success(), "ctpf {args:?} should fail");
        String::from_utf8_lossy(&out.stderr).into_owned()
    }
}

/// [`ctpf_cli`] inside a namespace (where a `ctpf up --boot-interface` API listens).
pub fn ctpf_cli_in(
    netns: &Netns,
    args: &[&str],
    env: &[(&str, &str)],
) -> Result<std::process::Output> {
    Ok(netns
        .command(ctpf_binary()?.to_str().context("binary path")?)
        .args(args)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .output()?)
}

/// A network namespace of a test's own, deleted on drop (also when the test panics), which
/// also destroys every interface in it and the veth peers of those. Tests only ever touch
/// interfaces inside namespaces they created.
#[derive(Debug)]
pub struct Netns {
    name: String,
}

impl Netns {
    /// Creates `PREFIX-<random>` with its loopback up.
    pub fn create(prefix: &str) -> Result<Self> {
        let name = format!("{prefix}-{}", unique_suffix());
        run_checked(Command::new("ip").args(["netns", "add", &name]))
            .context("creating a network namespace (needs root and iproute2)")?;
        let netns = Self { name };
        netns.ip(&["link", "set", "lo", "up"])?;
        Ok(netns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `ip -n NAME ARGS...`, failing with its stderr.
    pub fn ip(&self, args: &[&str]) -> Result<()> {
        run_checked(Command::new("ip").args(["-n", &self.name]).args(args))
    }

    /// A command that runs `program` inside the namespace.
    pub fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name, program]);
        cmd
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let deleted = Command::new("ip")
            .args(["netns", "delete", &self.name])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        if !deleted.is_ok_and(|s| s.success()) {
            eprintln!("could not delete network namespace {}", self.name);
        }
    }
}

impl Netns {
    /// Starts `cmd` (built with [`Netns::command`]) with stdout and stderr appended to
    /// `log`; the guard stops it on drop.
    pub fn spawn(&self, cmd: &mut Command, log: &Path) -> Result<Daemon> {
        let out = std::fs::OpenOptions::new().create(true).append(true).open(log)?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .with_context(|| format!("starting {cmd:?}"))?;
        Ok(Daemon { child: Some(child), log: log.to_owned() })
    }

    /// Waits until something in the namespace listens on `port` (`udp` or `tcp`, any
    /// address), or fails with `daemon`'s log if it exits first.
    pub fn wait_listening(&self, proto: &str, port: u16, daemon: &mut Daemon) -> Result<()> {
        let flag = if proto == "udp" { "-uanH" } else { "-tlnH" };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let out = self.command("ss").args([flag, &format!("sport = :{port}")]).output()?;
            if !String::from_utf8_lossy(&out.stdout).trim().is_empty() {
                return Ok(());
            }
            if let Some(status) = daemon.child.as_mut().map(Child::try_wait).transpose()?.flatten()
            {
                bail!(
                    "exited with {status} before listening on {proto}/{port}:\n{}",
                    daemon.log_text()
                );
            }
            if Instant::now() > deadline {
                bail!("nothing listens on {proto}/{port} after 30 s:\n{}", daemon.log_text());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// A server started with [`Netns::spawn`]. Dropping it sends SIGTERM (so servers with
/// worker processes, like nginx, take them down too), then SIGKILL after 10 s.
#[derive(Debug)]
pub struct Daemon {
    child: Option<Child>,
    log: PathBuf,
}

impl Daemon {
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let Some(mut child) = self.child.take() else { return };
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .stderr(Stdio::null())
            .status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if !matches!(child.try_wait(), Ok(None)) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// A loop device over a file (`losetup --find --show`), detached on drop, also when a test
/// panics. Needs root and util-linux.
#[derive(Debug)]
pub struct LoopDevice {
    path: PathBuf,
}

impl LoopDevice {
    /// Attaches `file` with extra `losetup` options (`--partscan`, `--direct-io=on`).
    pub fn attach(file: &Path, options: &[&str]) -> Result<Self> {
        let output = Command::new("losetup")
            .args(["--find", "--show"])
            .args(options)
            .arg(file)
            .stdin(Stdio::null())
            .output()
            .context("running losetup (apt-get install mount; needs root)")?;
        if !output.status.success() {
            bail!("losetup {} failed: {}", file.display(), String::from_utf8_lossy(&output.stderr));
        }
        let path = PathBuf::from(String::from_utf8(output.stdout)?.trim());
        Ok(Self { path })
    }

    /// `/dev/loopN`.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `/dev/loopNpK`, after `partx -u` has told the kernel the partition table it was just
    /// given (kernels built without the MS-DOS/GPT parsers do not read it themselves).
    pub fn partition(&self, number: u32) -> Result<PathBuf> {
        run_checked(Command::new("partx").arg("-u").arg(&self.path))?;
        let partition = PathBuf::from(format!("{}p{number}", self.path.display()));
        let deadline = Instant::now() + Duration::from_secs(10);
        while !partition.exists() {
            if Instant::now() > deadline {
                bail!("{} did not appear", partition.display());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(partition)
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let quiet = |cmd: &mut Command| {
            cmd.arg(&self.path).stdout(Stdio::null()).stderr(Stdio::null()).status()
        };
        // Partitions added with partx go first; the detach fails while one is in use.
        let _ = quiet(Command::new("partx").arg("-d"));
        if !quiet(Command::new("losetup").arg("-d")).is_ok_and(|s| s.success()) {
            eprintln!("could not detach {}", self.path.display());
        }
    }
}

/// Short and random enough that parallel test runs do not collide: 6 hex digits from the
/// clock and the process id.
pub fn unique_suffix() -> String {
    use std::hash::{BuildHasher as _, Hasher as _};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u32(std::process::id());
    hasher.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos(),
    );
    format!("{:06x}", hasher.finish() & 0xff_ffff)
}

/// Runs a command to completion, failing with its stderr.
pub fn run_checked(cmd: &mut Command) -> Result<()> {
    let output = cmd.stdin(Stdio::null()).output().with_context(|| format!("running {cmd:?}"))?;
    if !output.status.success() {
        bail!("{cmd:?} failed: {}", String::from_utf8_lossy(&output.stderr).trim());
    }
    Ok(())
}
