//! The `ctpf` command line. Every flag can also come from an environment variable.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use anyhow::{Context as _, Result, bail};
use clap::{Args, Parser, Subcommand};
use comfy_table::{Table, presets::NOTHING};
use ctpf_bus::BusConfig;
use ctpf_common::{
    Artifact, ArtifactKind, ArtifactName, Datacenter, Event, Host, HostPatch, HostState, Job,
    JobSpec, Name, NewDatacenter, NewJob, NewSshKey, Role, Sha256Digest, SshKey, SshPublicKey, Tag,
    TagSelector, WorkerIdentity,
};
use ctpf_store::artifacts::S3Config;
use tokio_util::sync::CancellationToken;

use crate::{boot_flags::BootArgs, client::ApiClient, server};

#[derive(Debug, Parser)]
#[command(name = "ctpf", version, about = "Turn bare machines into cluster nodes.")]
pub struct Cli {
    /// URL of the manager API; `ctpf up` and `ctpf manager` serve it there.
    #[arg(long, global = true, env = "CTPF_API", default_value = "http://127.0.0.1:7480")]
    pub api: String,
    /// API token (default: the admin token file in the default data dir).
    #[arg(long, global = true, env = "CTPF_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Print JSON instead of tables.
    #[arg(long, global = true, env = "CTPF_JSON")]
    pub json: bool,
    /// More log output (-v debug, -vv trace); RUST_LOG overrides.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    /// Log as JSON lines (one object per event, for log collectors) instead of text.
    #[arg(long, global = true, env = "CTPF_LOG_JSON")]
    pub log_json: bool,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run everything on this machine: API, registries, scripts, a local worker, builders and
    /// packagers, with embedded storage (or Redis/S3 when given).
    Up(UpArgs),
    /// Run the control plane only (API, registries) against Redis and S3; workers run apart.
    Manager(ManagerArgs),
    /// Run a worker for one datacenter (it dials out to Redis, serves its site's boots and
    /// takes matching jobs), or manage worker credentials (`ctpf worker token ...`).
    Worker(WorkerCommand),
    /// Workers that dialled in, per datacenter, alive or lost.
    #[command(subcommand, alias = "worker-list")]
    Workers(WorkersCmd),
    /// Datacenters: where machines live.
    #[command(subcommand, alias = "datacenters", alias = "dc")]
    Datacenter(DatacenterCmd),
    /// Hosts known to ctpf.
    #[command(subcommand, alias = "host")]
    Hosts(HostsCmd),
    /// SSH public keys deployed to hosts.
    #[command(subcommand, alias = "key")]
    Keys(KeysCmd),
    /// Stored artifacts.
    #[command(subcommand, alias = "artifact")]
    Artifacts(ArtifactsCmd),
    /// Jobs run by workers.
    #[command(subcommand, alias = "job")]
    Jobs(JobsCmd),
    /// Build boot artifacts (GRUB, iPXE, SYSLINUX, the discovery image) and follow the build.
    #[command(subcommand)]
    Build(crate::build_cli::BuildCmd),
    /// Builds: list, show, logs.
    #[command(subcommand)]
    Builds(crate::build_cli::BuildsCmd),
    /// The event log.
    Events(EventsArgs),
    /// Enrollment tokens, with which booted machines register themselves.
    #[command(subcommand, alias = "token")]
    Tokens(TokensCmd),
    /// Boot media from image definitions (images/*.toml): build, list, download.
    #[command(subcommand, alias = "images")]
    Image(crate::image_cli::ImageCmd),
    /// Media keys: reusable, revocable enrollment credentials for boot media (USB sticks, ISOs).
    #[command(subcommand, alias = "media-key")]
    MediaKeys(crate::media_key_cli::MediaKeysCmd),
    /// Write an image to a USB stick, an SD card, a loop device or a file, then read it back
    /// and compare SHA-256 digests.
    Flash(crate::flash_cli::FlashArgs),
}

#[derive(Debug, Args)]
pub struct DataDirArg {
    /// Where all data lives (default: $XDG_DATA_HOME/ctpf or ~/.local/share/ctpf).
    #[arg(long, env = "CTPF_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct EngineArgs {
    /// Use Redis (redis://HOST:PORT/) for state and the bus instead of the embedded ones.
    #[arg(long, env = "CTPF_REDIS")]
    pub redis: Option<String>,
    /// Use S3/MinIO (http://HOST:PORT) for artifacts; bucket and keys from the env.
    #[arg(long, env = "CTPF_S3")]
    pub s3: Option<String>,
    #[arg(long, env = "CTPF_S3_BUCKET", default_value = "ctpf")]
    pub s3_bucket: String,
    #[arg(long, env = "CTPF_S3_REGION", default_value = "us-east-1")]
    pub s3_region: String,
    #[arg(long, env = "AWS_ACCESS_KEY_ID", hide_env_values = true)]
    pub s3_access_key: Option<String>,
    #[arg(long, env = "AWS_SECRET_ACCESS_KEY", hide_env_values = true)]
    pub s3_secret_key: Option<String>,
    /// Prefix of every Redis key.
    #[arg(long, env = "CTPF_NAMESPACE", default_value = "ctpf")]
    pub namespace: String,
    /// Seconds a worker may hold a job without renewing before it is handed to another.
    #[arg(long, env = "CTPF_JOB_LEASE", default_value_t = 30)]
    pub job_lease: u64,
    /// Deliveries after which a job is dead-lettered.
    #[arg(long, env = "CTPF_JOB_MAX_DELIVERIES", default_value_t = 3)]
    pub job_max_deliveries: u32,
}

impl EngineArgs {
    fn engines(&self) -> Result<server::Engines> {
        let s3 = match &self.s3 {
            None => None,
            Some(endpoint) => Some(S3Config {
                endpoint: endpoint.clone(),
                bucket: self.s3_bucket.clone(),
                region: self.s3_region.clone(),
                access_key: self.s3_access_key.clone().context("--s3 needs AWS_ACCESS_KEY_ID")?,
                secret_key: self
                    .s3_secret_key
                    .clone()
                    .context("--s3 needs AWS_SECRET_ACCESS_KEY")?,
            }),
        };
        if self.job_lease == 0 || self.job_max_deliveries == 0 {
            bail!("--job-lease and --job-max-deliveries must be at least 1");
        }
        Ok(server::Engines {
            redis: self.redis.clone(),
            s3,
            namespace: self.namespace.clone(),
            bus: BusConfig {
                lease: Duration::from_secs(self.job_lease),
                max_deliveries: self.job_max_deliveries,
            },
        })
    }
}

/// Where a control plane serves its API, and how booting machines reach it.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Address to serve the API on (default: the host and port of --api; port 0 picks one).
    #[arg(long, env = "CTPF_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// The URL booting machines reach ctpf at (default: http:// and the bound address).
    #[arg(long, env = "CTPF_PUBLIC_URL")]
    pub public_url: Option<String>,
    #[command(flatten)]
    pub discovery: crate::boot_artifacts::DiscoveryArgs,
}

#[derive(Debug, Args)]
pub struct UpArgs {
    #[command(flatten)]
    pub data: DataDirArg,
    #[command(flatten)]
    pub serve: ServeArgs,
    /// Datacenter of the built-in worker.
    #[arg(long, env = "CTPF_DATACENTER", default_value = "local")]
    pub datacenter: String,
    #[command(flatten)]
    pub engines: EngineArgs,
    #[command(flatten)]
    pub boot: BootArgs,
}

#[derive(Debug, Args)]
pub struct ManagerArgs {
    #[command(flatten)]
    pub data: DataDirArg,
    #[command(flatten)]
    pub serve: ServeArgs,
    #[command(flatten)]
    pub engines: EngineArgs,
    /// Seconds without a heartbeat after which a worker is shown as lost.
    #[arg(long, env = "CTPF_WORKER_LOST_AFTER", default_value_t = 15)]
    pub worker_lost_after: u64,
}

#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct WorkerCommand {
    #[command(subcommand)]
    pub action: Option<WorkerAction>,
    #[command(flatten)]
    pub run: WorkerArgs,
}

#[derive(Debug, Subcommand)]
pub enum WorkerAction {
    /// Credentials site workers connect with (one datacenter each).
    #[command(subcommand, alias = "tokens")]
    Token(WorkerTokenCmd),
}

#[derive(Debug, Subcommand)]
pub enum WorkerTokenCmd {
    /// Issue a credential for a worker of DATACENTER; prints the token once.
    Create {
        #[arg(long)]
        datacenter: String,
    },
    /// List credentials (never their secrets).
    List {
        #[arg(long)]
        datacenter: Option<String>,
    },
    /// Revoke a credential: Redis drops its user and disconnects it.
    Revoke { id: String },
}

#[derive(Debug, Subcommand)]
pub enum WorkersCmd {
    /// List workers with their datacenter, roles, state and served snapshot generation.
    List {
        #[arg(long = "tag")]
        tags: Vec<String>,
        #[arg(long)]
        datacenter: Option<String>,
    },
}

#[derive(Debug, Args)]
pub struct WorkerArgs {
    /// The datacenter this worker serves (required to run a worker).
    #[arg(long, env = "CTPF_DATACENTER")]
    pub datacenter: Option<String>,
    /// Extra routing tags (k=v), repeatable.
    #[arg(long = "tag", env = "CTPF_TAGS", value_delimiter = ',')]
    pub tags: Vec<String>,
    /// Roles: distributor, builder, packager (comma-separated).
    #[arg(long = "role", env = "CTPF_ROLES", value_delimiter = ',', default_value = "distributor")]
    pub roles: Vec<String>,
    /// Worker id (default: host name and process id).
    #[arg(long, env = "CTPF_WORKER_ID")]
    pub id: Option<String>,
    /// This site worker's credential (`ctpf worker token create`): Redis then lets it see only
    /// its datacenter. Without one the Redis URL's user is used, trusted like the manager.
    #[arg(long, env = "CTPF_WORKER_TOKEN", hide_env_values = true)]
    pub worker_token: Option<String>,
    /// Fetch the files snapshots name from this manager (its API URL), authenticated with
    /// --worker-token, instead of from S3: no S3 credentials on the site, and only this
    /// datacenter's files.
    #[arg(long, env = "CTPF_MANAGER_URL", requires = "worker_token")]
    pub manager_url: Option<String>,
    /// Serve the datacenter's network boot (DHCP, TFTP) on this interface (distributor role).
    #[arg(long, env = "CTPF_BOOT_INTERFACE", value_name = "IFACE")]
    pub boot_interface: Option<String>,
    /// Address of the distributor's HTTP boot server [default: 0.0.0.0:8080].
    #[arg(long, env = "CTPF_HTTP_LISTEN")]
    pub http_listen: Option<SocketAddr>,
    /// The URL machines reach the HTTP boot server at [default: http://IFACE_ADDR:PORT].
    #[arg(long, env = "CTPF_PUBLIC_URL")]
    pub public_url: Option<String>,
    /// Directory TFTP also serves (files no snapshot names) [default: DATA_DIR/tftp].
    #[arg(long, env = "CTPF_TFTP_ROOT", value_name = "DIR")]
    pub tftp_root: Option<PathBuf>,
    /// Send IPv6 router advertisements (as no router: lifetime 0, no prefixes) on the boot
    /// interface, so iPXE does not wait ~13 s for one on every boot. Leave it off on a LAN
    /// with an IPv6 router of its own.
    #[arg(long, env = "CTPF_IPV6_RA", requires = "boot_interface")]
    pub ipv6_ra: bool,
    #[command(flatten)]
    pub engines: EngineArgs,
    #[command(flatten)]
    pub data: DataDirArg,
}

#[derive(Debug, Subcommand)]
pub enum DatacenterCmd {
    /// Add a datacenter.
    Add {
        name: String,
        #[arg(long = "tag")]
        tags: Vec<String>,
    },
    /// List datacenters.
    List {
        #[arg(long = "tag")]
        tags: Vec<String>,
    },
    /// Delete a datacenter (refused while it has hosts, SSH keys, workers or worker
    /// credentials, unless --force).
    Delete {
        name: String,
        #[arg(long)]
        force: bool,
    },
    /// Replace a datacenter's tags.
    Tag {
        name: String,
        #[arg(long = "tag")]
        tags: Vec<String>,
    },
    /// Set the DHCP role of the datacenter's distributors.
    Dhcp {
        name: String,
        #[arg(long, value_enum)]
        mode: crate::boot_flags::DhcpMode,
        /// Addresses handed out in authoritative mode: FIRST-LAST.
        #[arg(long, value_name = "FIRST-LAST")]
        range: Option<String>,
        /// Prefix length of the boot network [default: the boot interface's].
        #[arg(long)]
        prefix_len: Option<u8>,
        #[arg(long)]
        router: Option<std::net::Ipv4Addr>,
        #[arg(long = "dns", value_delimiter = ',')]
        dns: Vec<std::net::Ipv4Addr>,
    },
    /// Serve a PXE bundle (an artifact of kind pxe_bundle, e.g. from `ctpf image build`) from
    /// the datacenter's distributors over TFTP and HTTP, by its paths.
    PxeBundle {
        name: String,
        /// The bundle artifact's name.
        #[arg(required_unless_present = "none", conflicts_with = "none")]
        artifact: Option<String>,
        /// Serve no bundle.
        #[arg(long)]
        none: bool,
    },
    /// Boot a chosen discovery image (kernel and initrd artifacts) on one architecture
    /// instead of the latest built one.
    Discovery {
        name: String,
        #[arg(long, default_value = "x86_64")]
        arch: String,
        #[arg(long, required_unless_present = "latest", requires = "initrd")]
        kernel: Option<String>,
        #[arg(long, required_unless_present = "latest", requires = "kernel")]
        initrd: Option<String>,
        /// Back to the latest built image.
        #[arg(long, conflicts_with_all = ["kernel", "initrd"])]
        latest: bool,
    },
    /// Reserve an address for a MAC (authoritative DHCP).
    Reserve {
        name: String,
        mac: String,
        ip: std::net::Ipv4Addr,
        #[arg(long)]
        hostname: Option<String>,
    },
    /// Remove a MAC's reservation.
    Unreserve { name: String, mac: String },
    /// List the datacenter's reservations.
    Reservations { name: String },
    /// Show the snapshot its distributors serve (JSON).
    Snapshot { name: String },
}

#[derive(Debug, Subcommand)]
pub enum HostsCmd {
    /// List hosts.
    List {
        #[arg(long = "tag")]
        tags: Vec<String>,
        #[arg(long)]
        datacenter: Option<String>,
    },
    /// Change a host's state or hostname, e.g. mark it installed so it boots its disk.
    Set {
        /// The host's id (see `ctpf hosts list`).
        id: uuid::Uuid,
        /// discovered, assigned, installing, installed, ready, failed or retired.
        #[arg(long)]
        state: Option<String>,
        #[arg(long)]
        hostname: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
pub enum KeysCmd {
    /// Register the public key in FILE (e.g. ~/.ssh/id_ed25519.pub).
    Add {
        file: PathBuf,
        /// Name of the key (default: the file name without extension).
        #[arg(long)]
        name: Option<String>,
        /// Only for hosts of this datacenter.
        #[arg(long)]
        datacenter: Option<String>,
        #[arg(long = "tag")]
        tags: Vec<String>,
    },
    /// List keys.
    List {
        #[arg(long = "tag")]
        tags: Vec<String>,
    },
}

#[derive(Debug, Subcommand)]
pub enum ArtifactsCmd {
    /// List artifacts.
    List {
        #[arg(long = "tag")]
        tags: Vec<String>,
    },
    /// Upload FILE (streamed; the server hashes it on the way in).
    Push {
        file: PathBuf,
        /// Artifact name (default: the file name).
        #[arg(long)]
        name: Option<String>,
        /// kernel, initrd, bootloader, iso, disk_image, pxe_bundle, script, source, manifest,
        /// other.
        #[arg(long, default_value = "other")]
        kind: String,
        #[arg(long = "tag")]
        tags: Vec<String>,
    },
    /// Download an artifact, checking its SHA-256 while writing.
    Pull {
        name: String,
        /// Where to write it (default: ./NAME).
        #[arg(long, short)]
        output: Option<PathBuf>,
    },
}

#[derive(Debug, Subcommand)]
pub enum JobsCmd {
    /// List jobs.
    List {
        #[arg(long = "tag")]
        tags: Vec<String>,
    },
    /// Submit a probe job (sleeps, then succeeds or fails), to check that workers take jobs.
    Probe {
        /// Tags the worker must carry (k=v,k=v).
        #[arg(long, default_value = "")]
        selector: String,
        #[arg(long, default_value_t = 0)]
        sleep_ms: u64,
        #[arg(long)]
        fail: bool,
    },
    /// Stop a queued or running job.
    Cancel { id: String },
}

#[derive(Debug, Subcommand)]
pub enum TokensCmd {
    /// Issue an enrollment token for machines joining DATACENTER.
    Create {
        #[arg(long)]
        datacenter: String,
        /// Seconds it stays valid.
        #[arg(long, default_value_t = 3600)]
        ttl_seconds: u64,
        /// How many machines may enroll with it (1 for a one-time token).
        #[arg(long, default_value_t = 1)]
        uses: u32,
    },
}

#[derive(Debug, Args)]
pub struct EventsArgs {
    /// Only events after this sequence number.
    #[arg(long, default_value_t = 0)]
    after: u64,
    /// Keep printing new events.
    #[arg(long, short)]
    follow: bool,
    #[arg(long)]
    datacenter: Option<String>,
    #[arg(long = "tag")]
    tags: Vec<String>,
}

/// `$XDG_DATA_HOME/ctpf`, else `~/.local/share/ctpf`, else `./ctpf-data`.
pub fn default_data_dir() -> PathBuf {
    if let Some(xdg) = std::env::var_os("XDG_DATA_HOME").filter(|v| !v.is_empty()) {
        return PathBuf::from(xdg).join("ctpf");
    }
    if let Some(home) = std::env::var_os("HOME").filter(|v| !v.is_empty()) {
        return PathBuf::from(home).join(".local/share/ctpf");
    }
    PathBuf::from("ctpf-data")
}

/// Where a server listens: `--listen`, else the `host:port` of `--api` (`http://` optional).
fn listen_addr(listen: Option<SocketAddr>, api: &str) -> Result<SocketAddr> {
    if let Some(addr) = listen {
        return Ok(addr);
    }
    let host_port = api.strip_prefix("http://").unwrap_or(api).trim_end_matches('/');
    host_port.parse().with_context(|| {
        format!(
            "--api {api:?} is not an http://IP:PORT address to listen on; pass --listen IP:PORT"
        )
    })
}

pub(crate) fn tag_query(tags: &[String]) -> Result<Vec<(&'static str, String)>> {
    tags.iter().map(|t| Ok(("tag", t.parse::<Tag>()?.to_string()))).collect()
}

pub(crate) fn client(cli: &Cli) -> Result<ApiClient> {
    let token = match &cli.token {
        Some(t) => Some(t.clone()),
        None => std::fs::read_to_string(default_data_dir().join("admin.token"))
            .ok()
            .map(|t| t.trim().to_owned()),
    };
    ApiClient::new(&cli.api, token)
}

pub(crate) fn print<T: serde::Serialize>(
    json: bool,
    items: &[T],
    header: &[&str],
    row: impl Fn(&T) -> Vec<String>,
) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(items)?);
        return Ok(());
    }
    let mut table = Table::new();
    table.load_preset(NOTHING).set_header(header.to_vec());
    for item in items {
        table.add_row(row(item));
    }
    println!("{table}");
    Ok(())
}

/// The snake_case name an enum has in JSON (`disk_image`, `dead_lettered`).
pub(crate) fn label<T: serde::Serialize>(value: &T) -> String {
    serde_json::to_value(value).ok().and_then(|v| v.as_str().map(str::to_owned)).unwrap_or_default()
}

pub(crate) fn or_dash<T: ToString>(v: Option<T>) -> String {
    v.map(|v| v.to_string()).unwrap_or_else(|| "-".into())
}

pub async fn run(cli: Cli) -> Result<()> {
    match &cli.command {
        Command::Up(args) => {
            let data_dir = args.data.data_dir.clone().unwrap_or_else(default_data_dir);
            let datacenter = Name::parse("datacenter", &args.datacenter)?;
            let identity = WorkerIdentity {
                id: format!("local-{}", std::process::id()),
                datacenter,
                tags: Default::default(),
                roles: vec![Role::Distributor, Role::Builder, Role::Packager],
            };
            let boot_service = args.boot.service_config(&data_dir)?;
            let mut api = listen_addr(args.serve.listen, &cli.api)?;
            // Booting machines cannot reach a loopback API (the default --api): serve it on
            // every address instead, so the local CLI and the boot network both reach it.
            if boot_service.is_some() && args.serve.listen.is_none() && api.ip().is_loopback() {
                api.set_ip(std::net::Ipv4Addr::UNSPECIFIED.into());
            }
            let plane = server::ControlPlane {
                api,
                public_url: args.serve.public_url.clone(),
                boot_datacenter: identity.datacenter.clone(),
                data_dir,
                engines: args.engines.engines()?,
                local_worker: Some(identity),
                discovery: args.serve.discovery.clone(),
                pxe_loader: args.boot.pxe_loader,
                boot_service,
                sites: Default::default(),
            };
            let shutdown = CancellationToken::new();
            server::cancel_on_signals(shutdown.clone())?;
            server::run_control_plane(plane, shutdown).await
        }
        Command::Manager(args) => {
            if args.worker_lost_after == 0 {
                bail!("--worker-lost-after must be at least 1 second");
            }
            let engines = args.engines.engines()?;
            if engines.redis.is_none() {
                bail!("ctpf manager runs against Redis (--redis URL); for one machine use ctpf up");
            }
            let data_dir = args.data.data_dir.clone().unwrap_or_else(default_data_dir);
            let plane = server::ControlPlane {
                api: listen_addr(args.serve.listen, &cli.api)?,
                public_url: args.serve.public_url.clone(),
                boot_datacenter: Name::parse("datacenter", "local")?,
                data_dir,
                engines,
                local_worker: None,
                discovery: args.serve.discovery.clone(),
                pxe_loader: crate::boot_flags::PxeLoader::Ipxe,
                boot_service: None,
                sites: crate::api::sites::SiteSettings {
                    worker_lost_after: Duration::from_secs(args.worker_lost_after),
                },
            };
            let shutdown = CancellationToken::new();
            server::cancel_on_signals(shutdown.clone())?;
            server::run_control_plane(plane, shutdown).await
        }
        Command::Worker(WorkerCommand { action: Some(WorkerAction::Token(cmd)), .. }) => {
            worker_tokens(&cli, cmd).await
        }
        Command::Worker(WorkerCommand { action: None, run: args }) => {
            let engines = args.engines.engines()?;
            let redis = engines.redis.clone().context("ctpf worker needs --redis URL")?;
            let roles =
                args.roles.iter().map(|r| r.parse::<Role>()).collect::<Result<Vec<_>, _>>()?;
            let tags = args.tags.iter().map(|t| t.parse::<Tag>()).collect::<Result<_, _>>()?;
            let host = nix::unistd::gethostname()
                .ok()
                .and_then(|h| h.into_string().ok())
                .unwrap_or_else(|| "worker".into());
            let identity = WorkerIdentity {
                id: args.id.clone().unwrap_or_else(|| format!("{host}-{}", std::process::id())),
                datacenter: Name::parse(
                    "datacenter",
                    args.datacenter.as_deref().context("ctpf worker needs --datacenter NAME")?,
                )?,
                tags,
                roles,
            };
            let token = args
                .worker_token
                .as_deref()
                .map(str::parse::<ctpf_common::WorkerToken>)
                .transpose()?;
            let data_dir = args.data.data_dir.clone().unwrap_or_else(default_data_dir);
            let site = site_config(args, &identity, &data_dir)?;
            let shutdown = CancellationToken::new();
            server::cancel_on_signals(shutdown.clone())?;
            let manager_url = args.manager_url.clone();
            let run =
                server::WorkerRun { redis, engines, data_dir, identity, token, manager_url, site };
            server::run_worker(run, shutdown).await
        }
        Command::Workers(WorkersCmd::List { tags, datacenter }) => {
            let mut query = tag_query(tags)?;
            if let Some(dc) = datacenter {
                query.push(("datacenter", Name::parse("datacenter", dc)?.to_string()));
            }
            let workers: Vec<ctpf_common::WorkerStatus> =
                client(&cli)?.get("/v1/workers", &query).await?;
            print(
                cli.json,
                &workers,
                &["DATACENTER", "ID", "STATE", "ROLES", "GENERATION", "ADDRESSES", "LAST SEEN"],
                |w| {
                    let identity = &w.heartbeat.identity;
                    let roles: Vec<&str> = identity.roles.iter().map(|r| r.as_str()).collect();
                    vec![
                        identity.datacenter.to_string(),
                        identity.id.clone(),
                        label(&w.state),
                        roles.join(","),
                        or_dash(w.heartbeat.generation),
                        w.heartbeat.addresses.join(","),
                        w.last_seen.to_string(),
                    ]
                },
            )
        }
        Command::Datacenter(cmd) => datacenter(&cli, cmd).await,
        Command::Hosts(HostsCmd::List { tags, datacenter }) => {
            let mut query = tag_query(tags)?;
            if let Some(dc) = datacenter {
                query.push(("datacenter", Name::parse("datacenter", dc)?.to_string()));
            }
            let hosts: Vec<Host> = client(&cli)?.get("/v1/hosts", &query).await?;
            print(
                cli.json,
                &hosts,
                &["ID", "DATACENTER", "HOSTNAME", "STATE", "MACS", "ADDRESSES"],
                |h| {
                    vec![
                        h.id.to_string(),
                        h.datacenter.to_string(),
                        or_dash(h.hostname.as_ref()),
                        label(&h.state),
                        h.macs.iter().map(|m| m.to_string()).collect::<Vec<_>>().join(","),
                        h.addresses.iter().map(|a| a.to_string()).collect::<Vec<_>>().join(","),
                    ]
                },
            )
        }
        Command::Hosts(HostsCmd::Set { id, state, hostname }) => {
            let state = state
                .as_deref()
                .map(|s| {
                    serde_json::from_value::<HostState>(serde_json::Value::String(s.to_owned()))
                        .map_err(|_| anyhow::anyhow!(
                            "--state {s:?}: expected discovered, assigned, installing, installed, ready, failed or retired"
                        ))
                })
                .transpose()?;
            let hostname = hostname.as_deref().map(|h| Name::parse("--hostname", h)).transpose()?;
            if state.is_none() && hostname.is_none() {
                bail!("nothing to change: pass --state or --hostname");
            }
            let patch = HostPatch { state, hostname, labels: None };
            let host: Host = client(&cli)?.patch(&format!("/v1/hosts/{id}"), &patch).await?;
            print(cli.json, &[host], &["ID", "STATE", "HOSTNAME"], |h| {
                vec![h.id.to_string(), label(&h.state), or_dash(h.hostname.as_ref())]
            })
        }
        Command::Keys(cmd) => keys(&cli, cmd).await,
        Command::Artifacts(cmd) => artifacts(&cli, cmd).await,
        Command::Jobs(cmd) => jobs(&cli, cmd).await,
        Command::Build(cmd) => crate::build_cli::build(&cli, cmd).await,
        Command::Builds(cmd) => crate::build_cli::builds(&cli, cmd).await,
        Command::Events(args) => events(&cli, args).await,
        Command::Flash(args) => crate::flash_cli::flash(&cli, args).await,
        Command::Image(cmd) => crate::image_cli::image(&cli, cmd).await,
        Command::MediaKeys(cmd) => crate::media_key_cli::media_keys(&cli, cmd).await,
        Command::Tokens(TokensCmd::Create { datacenter, ttl_seconds, uses }) => {
            let body = serde_json::json!({
                "datacenter": Name::parse("datacenter", datacenter)?,
                "ttl_seconds": ttl_seconds,
                "uses": uses,
            });
            let issued: serde_json::Value =
                client(&cli)?.post("/v1/enrollment-tokens", &body).await?;
            if cli.json {
                println!("{}", serde_json::to_string_pretty(&issued)?);
            } else {
                // The token alone on stdout, so scripts can capture it; details on stderr.
                println!("{}", issued["token"].as_str().unwrap_or_default());
                eprintln!(
                    "enrollment token for {datacenter}: {uses} use(s), expires {}",
                    issued["expires_at"].as_str().unwrap_or("?")
                );
            }
            Ok(())
        }
    }
}

async fn datacenter(cli: &Cli, cmd: &DatacenterCmd) -> Result<()> {
    let api = client(cli)?;
    match cmd {
        DatacenterCmd::Add { name, tags } => {
            let new = NewDatacenter {
                name: Name::parse("name", name)?,
                tags: tags.iter().map(|t| t.parse::<Tag>()).collect::<Result<_, _>>()?,
                dhcp: Default::default(),
            };
            let dc: Datacenter = api.post("/v1/datacenters", &new).await?;
            if cli.json {
                println!("{}", serde_json::to_string_pretty(&dc)?);
            } else {
                println!("datacenter {} added", dc.name);
            }
            Ok(())
        }
        DatacenterCmd::List { tags } => {
            let list: Vec<Datacenter> = api.get("/v1/datacenters", &tag_query(tags)?).await?;
            print(cli.json, &list, &["NAME", "TAGS", "CREATED"], |d| {
                vec![d.name.to_string(), d.tags.to_string(), d.created_at.to_string()]
            })
        }
        DatacenterCmd::Delete { name, force } => {
            let name = Name::parse("name", name)?;
            api.delete(&format!("/v1/datacenters/{name}"), &[("force", force.to_string())]).await?;
            println!("datacenter {name} deleted");
            Ok(())
        }
        DatacenterCmd::Tag { name, tags } => {
            let name = Name::parse("name", name)?;
            let tags: ctpf_common::Tags =
                tags.iter().map(|t| t.parse::<Tag>()).collect::<Result<_, _>>()?;
            let patch = ctpf_common::DatacenterPatch { tags: Some(tags), ..Default::default() };
            let dc: Datacenter = api.patch(&format!("/v1/datacenters/{name}"), &patch).await?;
            println!("datacenter {} tags: {}", dc.name, dc.tags);
            Ok(())
        }
        DatacenterCmd::Dhcp { name, mode, range, prefix_len, router, dns } => {
            let name = Name::parse("name", name)?;
            let range = match range {
                Some(text) => {
                    let (first, last) = text
                        .split_once('-')
                        .context("--range is FIRST-LAST, e.g. 10.0.0.100-10.0.0.199")?;
                    let parse = |ip: &str| {
                        ip.trim()
                            .parse::<std::net::Ipv4Addr>()
                            .with_context(|| format!("--range: {ip:?} is not an IPv4 address"))
                    };
                    Some((parse(first)?, parse(last)?))
                }
                None => None,
            };
            let mode = match mode {
                crate::boot_flags::DhcpMode::Proxy => ctpf_common::DhcpMode::Proxy,
                crate::boot_flags::DhcpMode::Authoritative => ctpf_common::DhcpMode::Authoritative,
                crate::boot_flags::DhcpMode::Off => ctpf_common::DhcpMode::Off,
            };
            let dhcp = ctpf_common::DhcpSettings {
                mode,
                range,
                prefix_len: *prefix_len,
                router: *router,
                dns: dns.clone(),
            };
            dhcp.validate()?;
            let patch = ctpf_common::DatacenterPatch { dhcp: Some(dhcp), ..Default::default() };
            let dc: Datacenter = api.patch(&format!("/v1/datacenters/{name}"), &patch).await?;
            println!("datacenter {} DHCP: {}", dc.name, label(&dc.dhcp.mode));
            Ok(())
        }
        DatacenterCmd::PxeBundle { name, artifact, none: _ } => {
            let name = Name::parse("name", name)?;
            let bundle =
                artifact.as_deref().map(|a| ArtifactName::parse("artifact", a)).transpose()?;
            let patch =
                ctpf_common::DatacenterPatch { pxe_bundle: Some(bundle), ..Default::default() };
            let dc: Datacenter = api.patch(&format!("/v1/datacenters/{name}"), &patch).await?;
            match &dc.pxe_bundle {
                Some(bundle) => println!("datacenter {} serves PXE bundle {bundle}", dc.name),
                None => println!("datacenter {} serves no PXE bundle", dc.name),
            }
            Ok(())
        }
        DatacenterCmd::Discovery { name, arch, kernel, initrd, latest: _ } => {
            let name = Name::parse("name", name)?;
            let arch: ctpf_common::Arch = arch.parse()?;
            let path = format!("/v1/datacenters/{name}");
            let mut choices = api.get::<Datacenter>(&path, &[]).await?.discovery;
            match (kernel, initrd) {
                (Some(kernel), Some(initrd)) => {
                    let choice = ctpf_common::DiscoveryChoice {
                        kernel: ArtifactName::parse("kernel", kernel)?,
                        initrd: ArtifactName::parse("initrd", initrd)?,
                    };
                    choices.insert(arch, choice);
                }
                _ => {
                    choices.remove(&arch);
                }
            }
            let patch =
                ctpf_common::DatacenterPatch { discovery: Some(choices), ..Default::default() };
            let dc: Datacenter = api.patch(&path, &patch).await?;
            match dc.discovery.get(&arch) {
                Some(c) => println!(
                    "datacenter {} boots {arch} discovery from {} and {}",
                    dc.name, c.kernel, c.initrd
                ),
                None => {
                    println!("datacenter {} boots the latest built {arch} discovery image", dc.name)
                }
            }
            Ok(())
        }
        DatacenterCmd::Reserve { name, mac, ip, hostname } => {
            let name = Name::parse("name", name)?;
            let reservation = ctpf_common::Reservation {
                mac: ctpf_common::MacAddr::parse("mac", mac)?,
                ip: *ip,
                hostname: hostname.as_deref().map(|h| Name::parse("hostname", h)).transpose()?,
            };
            let added: ctpf_common::Reservation =
                api.post(&format!("/v1/datacenters/{name}/reservations"), &reservation).await?;
            println!("{} reserved for {} in {name}", added.ip, added.mac);
            Ok(())
        }
        DatacenterCmd::Unreserve { name, mac } => {
            let name = Name::parse("name", name)?;
            let mac = ctpf_common::MacAddr::parse("mac", mac)?;
            api.delete(&format!("/v1/datacenters/{name}/reservations/{mac}"), &[]).await?;
            println!("reservation of {mac} in {name} removed");
            Ok(())
        }
        DatacenterCmd::Reservations { name } => {
            let name = Name::parse("name", name)?;
            let list: Vec<ctpf_common::Reservation> =
                api.get(&format!("/v1/datacenters/{name}/reservations"), &[]).await?;
            print(cli.json, &list, &["MAC", "IP", "HOSTNAME"], |r| {
                vec![r.mac.to_string(), r.ip.to_string(), or_dash(r.hostname.as_ref())]
            })
        }
        DatacenterCmd::Snapshot { name } => {
            let name = Name::parse("name", name)?;
            let snapshot: serde_json::Value =
                api.get(&format!("/v1/datacenters/{name}/snapshot"), &[]).await?;
            println!("{}", serde_json::to_string_pretty(&snapshot)?);
            Ok(())
        }
    }
}

/// The distributor's side of a worker, when it has the distributor role.
fn site_config(
    args: &WorkerArgs,
    identity: &WorkerIdentity,
    data_dir: &std::path::Path,
) -> Result<Option<ctpf_distributors::site::SiteConfig>> {
    if !identity.roles.contains(&Role::Distributor) {
        let stray = [
            ("--boot-interface", args.boot_interface.is_some()),
            ("--http-listen", args.http_listen.is_some()),
            ("--public-url", args.public_url.is_some()),
            ("--tftp-root", args.tftp_root.is_some()),
            ("--ipv6-ra", args.ipv6_ra),
        ];
        if let Some((flag, _)) = stray.iter().find(|(_, given)| *given) {
            bail!("{flag} is for workers with the distributor role");
        }
        return Ok(None);
    }
    let boot_interface = match &args.boot_interface {
        Some(name) => {
            let (address, netmask) = crate::boot_flags::interface_ipv4(name)?;
            Some(ctpf_distributors::site::BootInterface { name: name.clone(), address, netmask })
        }
        None => None,
    };
    let http_listen = args.http_listen.unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 8080)));
    let public_url = match (&args.public_url, &boot_interface) {
        (Some(url), _) => url.clone(),
        (None, Some(interface)) => format!("http://{}:{}", interface.address, http_listen.port()),
        (None, None) if !http_listen.ip().is_unspecified() => format!("http://{http_listen}"),
        (None, None) => bail!("a distributor without --boot-interface needs --public-url"),
    };
    let tftp_root = match &args.tftp_root {
        Some(root) => root.clone(),
        None => {
            let root = data_dir.join("tftp");
            std::fs::create_dir_all(&root)
                .with_context(|| format!("creating the TFTP root {}", root.display()))?;
            root
        }
    };
    Ok(Some(ctpf_distributors::site::SiteConfig {
        datacenter: identity.datacenter.clone(),
        worker_id: identity.id.clone(),
        data_dir: data_dir.to_owned(),
        boot_interface,
        http_listen,
        public_url,
        tftp_root,
        ipv6_router_adverts: args.ipv6_ra,
    }))
}

async fn worker_tokens(cli: &Cli, cmd: &WorkerTokenCmd) -> Result<()> {
    let api = client(cli)?;
    match cmd {
        WorkerTokenCmd::Create { datacenter } => {
            let body = serde_json::json!({ "datacenter": Name::parse("datacenter", datacenter)? });
            let issued: serde_json::Value = api.post("/v1/worker-credentials", &body).await?;
            if cli.json {
                println!("{}", serde_json::to_string_pretty(&issued)?);
            } else {
                let token = issued["token"].as_str().context("the answer has no token")?;
                eprintln!(
                    "worker credential {} for datacenter {datacenter} (shown once):",
                    issued["id"].as_str().unwrap_or("?")
                );
                println!("{token}");
            }
            Ok(())
        }
        WorkerTokenCmd::List { datacenter } => {
            let mut query = Vec::new();
            if let Some(dc) = datacenter {
                query.push(("datacenter", Name::parse("datacenter", dc)?.to_string()));
            }
            let list: Vec<ctpf_common::WorkerCredential> =
                api.get("/v1/worker-credentials", &query).await?;
            print(cli.json, &list, &["ID", "DATACENTER", "CREATED", "REVOKED"], |c| {
                vec![
                    c.id.clone(),
                    c.datacenter.to_string(),
                    c.created_at.to_string(),
                    or_dash(c.revoked_at),
                ]
            })
        }
        WorkerTokenCmd::Revoke { id } => {
            let revoked: ctpf_common::WorkerCredential = api
                .post(&format!("/v1/worker-credentials/{id}/revoke"), &serde_json::json!({}))
                .await?;
            println!("worker credential {} revoked", revoked.id);
            Ok(())
        }
    }
}

async fn keys(cli: &Cli, cmd: &KeysCmd) -> Result<()> {
    let api = client(cli)?;
    match cmd {
        KeysCmd::Add { file, name, datacenter, tags } => {
            let text = std::fs::read_to_string(file)
                .with_context(|| format!("reading {}", file.display()))?;
            let public_key: SshPublicKey = text.trim().parse()?;
            let name = match name {
                Some(n) => Name::parse("name", n)?,
                None => {
                    let stem = file.file_stem().and_then(|s| s.to_str()).unwrap_or("key");
                    let cleaned: String = stem
                        .to_lowercase()
                        .chars()
                        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
                        .collect();
                    Name::parse("name", cleaned.trim_matches('-'))
                        .context("cannot derive a key name from the file name; pass --name")?
                }
            };
            let new = NewSshKey {
                name,
                public_key,
                datacenter: datacenter
                    .as_deref()
                    .map(|d| Name::parse("datacenter", d))
                    .transpose()?,
                tags: tags.iter().map(|t| t.parse::<Tag>()).collect::<Result<_, _>>()?,
            };
            let key: SshKey = api.post("/v1/keys", &new).await?;
            if cli.json {
                println!("{}", serde_json::to_string_pretty(&key)?);
            } else {
                println!("key {} added ({})", key.name, key.fingerprint);
            }
            Ok(())
        }
        KeysCmd::List { tags } => {
            let list: Vec<SshKey> = api.get("/v1/keys", &tag_query(tags)?).await?;
            print(cli.json, &list, &["NAME", "TYPE", "FINGERPRINT", "DATACENTER", "COMMENT"], |k| {
                vec![
                    k.name.to_string(),
                    k.public_key.algorithm().to_owned(),
                    k.fingerprint.clone(),
                    or_dash(k.datacenter.as_ref()),
                    k.public_key.comment().unwrap_or("-").to_owned(),
                ]
            })
        }
    }
}

async fn artifacts(cli: &Cli, cmd: &ArtifactsCmd) -> Result<()> {
    let api = client(cli)?;
    match cmd {
        ArtifactsCmd::List { tags } => {
            let list: Vec<Artifact> = api.get("/v1/artifacts", &tag_query(tags)?).await?;
            print(cli.json, &list, &["NAME", "KIND", "SIZE", "DIGEST", "TAGS"], |a| {
                vec![
                    a.name.to_string(),
                    label(&a.kind),
                    a.size.to_string(),
                    a.digest.to_string(),
                    a.tags.to_string(),
                ]
            })
        }
        ArtifactsCmd::Push { file, name, kind, tags } => {
            let name = match name {
                Some(n) => n.clone(),
                None => file
                    .file_name()
                    .and_then(|n| n.to_str())
                    .context("cannot take a name from the file name; pass --name")?
                    .to_owned(),
            };
            let name = ArtifactName::parse("name", &name)?;
            let kind: ArtifactKind = kind.parse()?;
            let mut query = tag_query(tags)?;
            query.push(("kind", label(&kind)));
            let opened = tokio::fs::File::open(file)
                .await
                .with_context(|| format!("opening {}", file.display()))?;
            let stream = tokio_util::io::ReaderStream::with_capacity(opened, 256 * 1024);
            let body = reqwest::Body::wrap_stream(stream);
            let art: Artifact =
                api.put_stream(&format!("/v1/artifacts/{name}"), &query, body).await?;
            if cli.json {
                println!("{}", serde_json::to_string_pretty(&art)?);
            } else {
                println!("artifact {} stored: {} bytes, {}", art.name, art.size, art.digest);
            }
            Ok(())
        }
        ArtifactsCmd::Pull { name, output } => {
            let name = ArtifactName::parse("name", name)?;
            let output = output.clone().unwrap_or_else(|| PathBuf::from(name.as_str()));
            let (size, digest) = download_artifact(&api, &name, &output).await?;
            println!("{} written: {size} bytes, {digest} verified", output.display());
            Ok(())
        }
    }
}

/// Downloads artifact `name` to `output`, verified against the digest the server sends (the
/// ETag); returns its size and digest.
pub(crate) async fn download_artifact(
    api: &ApiClient,
    name: &ArtifactName,
    output: &std::path::Path,
) -> Result<(u64, Sha256Digest)> {
    let response = api.get_stream(&format!("/v1/artifacts/{name}/content")).await?;
    let expected = response
        .headers()
        .get(reqwest::header::ETAG)
        .and_then(|v| v.to_str().ok())
        .map(|v| Sha256Digest::parse("etag", v.trim_matches('"')))
        .transpose()?
        .context("the server sent no digest (ETag) to verify against")?;
    let size = pull_verified(response, output, expected).await?;
    Ok((size, expected))
}

/// Streams a download into a temporary file next to `output` while hashing it; renames it
/// into place only when the digest matches, so a corrupt download never looks finished.
async fn pull_verified(
    mut response: reqwest::Response,
    output: &std::path::Path,
    expected: Sha256Digest,
) -> Result<u64> {
    use sha2::Digest as _;
    use tokio::io::AsyncWriteExt as _;
    let dir =
        output.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(std::path::Path::new("."));
    let temp = tempfile::NamedTempFile::new_in(dir)
        .with_context(|| format!("creating a temporary file in {}", dir.display()))?;
    let (file, temp_path) = temp.into_parts();
    let mut file = tokio::io::BufWriter::with_capacity(1 << 20, tokio::fs::File::from_std(file));
    let mut hasher = sha2::Sha256::new();
    let mut size = 0u64;
    while let Some(chunk) = response.chunk().await.context("download interrupted")? {
        hasher.update(&chunk);
        size += chunk.len() as u64;
        file.write_all(&chunk).await?;
    }
    file.flush().await?;
    file.into_inner().sync_all().await?;
    let actual = Sha256Digest::from_bytes(hasher.finalize().into());
    if actual != expected {
        bail!("download corrupted: got {actual}, expected {expected}; nothing was written");
    }
    temp_path.persist(output).with_context(|| format!("writing {}", output.display()))?;
    Ok(size)
}

async fn jobs(cli: &Cli, cmd: &JobsCmd) -> Result<()> {
    let api = client(cli)?;
    match cmd {
        JobsCmd::List { tags } => {
            let list: Vec<Job> = api.get("/v1/jobs", &tag_query(tags)?).await?;
            print(
                cli.json,
                &list,
                &["ID", "KIND", "STATUS", "SELECTOR", "ATTEMPTS", "WORKER", "ERROR"],
                |j| {
                    vec![
                        j.id.to_string(),
                        j.spec.kind().to_owned(),
                        label(&j.status),
                        if j.selector.tags().is_empty() {
                            "*".into()
                        } else {
                            j.selector.to_string()
                        },
                        j.attempts.to_string(),
                        or_dash(j.worker.as_ref()),
                        // A queued job no live worker would take says so here.
                        or_dash(j.error.as_ref().or(j.waiting_for.as_ref())),
                    ]
                },
            )
        }
        JobsCmd::Probe { selector, sleep_ms, fail } => {
            let new = NewJob {
                spec: JobSpec::Probe { sleep_ms: *sleep_ms, fail: *fail },
                selector: selector.parse::<TagSelector>()?,
            };
            let job: Job = api.post("/v1/jobs", &new).await?;
            if cli.json {
                println!("{}", serde_json::to_string_pretty(&job)?);
            } else {
                println!("job {} queued", job.id);
            }
            Ok(())
        }
        JobsCmd::Cancel { id } => cancel_job(cli, &api, id).await,
    }
}

/// Asks the manager to stop job `id` and says what happens next.
pub(crate) async fn cancel_job(cli: &Cli, api: &ApiClient, id: &str) -> Result<()> {
    let id: uuid::Uuid = id.parse().with_context(|| format!("{id:?} is not a job id"))?;
    let job: Job = api.post(&format!("/v1/jobs/{id}/cancel"), &serde_json::json!({})).await?;
    if cli.json {
        println!("{}", serde_json::to_string_pretty(&job)?);
    } else if job.status.is_final() {
        println!("job {id} cancelled before a worker started it");
    } else {
        println!("job {id}: cancel requested; its worker stops it within a second");
    }
    Ok(())
}

async fn events(cli: &Cli, args: &EventsArgs) -> Result<()> {
    let api = client(cli)?;
    let mut after = args.after;
    loop {
        let mut query = tag_query(&args.tags)?;
        if let Some(dc) = &args.datacenter {
            query.push(("datacenter", Name::parse("datacenter", dc)?.to_string()));
        }
        query.push(("after", after.to_string()));
        query.push(("limit", "1000".into()));
        if args.follow {
            query.push(("wait", "30".into()));
        }
        let events: Vec<Event> = api.get("/v1/events", &query).await?;
        for e in &events {
            if cli.json {
                println!("{}", serde_json::to_string(e)?);
            } else {
                let body = serde_json::to_value(&e.body)?;
                println!(
                    "{:>6} {} {:<10} {} {}",
                    e.seq,
                    e.at,
                    or_dash(e.datacenter.as_ref()),
                    e.body.type_name(),
                    body
                );
            }
            after = after.max(e.seq);
        }
        if !args.follow && events.len() < 1000 {
            return Ok(());
        }
    }
}
