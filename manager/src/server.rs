//! Wiring: which engines back a run (embedded or external), and the long-running tasks of
//! `ctpf up`, `ctpf manager` and `ctpf worker`. Every piece is a library call; this module only
//! connects them and handles start-up and shutdown.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use anyhow::{Context as _, Result, bail};
use ctpf_builders::{Builder, BuilderConfig};
use ctpf_bus::{Bus, BusConfig, MemoryBus, RedisBus};
use ctpf_common::{Arch, WorkerIdentity};
use ctpf_distributors::{
    boot_events::{self, BootEvents},
    boot_service::{BootService, BootServiceConfig, TftpArtifacts},
    jobs::WorkerConfig,
    site::origin::{FileOrigin, ManagerOrigin, StoreOrigin},
};
use ctpf_packagers::service::{Packager, PackagerConfig};
use ctpf_registries::{Registry, TokenRole, generate_token};
use ctpf_store::{
    artifacts::{ArtifactStore, FsArtifactStore, S3ArtifactStore, S3Config},
    state::{RedbStateStore, RedisStateStore, StateStore},
};
use tokio_util::sync::CancellationToken;

use crate::api::{self, AppState};
use crate::boot_artifacts;

/// The external engines, when a site uses them instead of the embedded ones.
#[derive(Debug, Clone, Default)]
pub struct Engines {
    pub redis: Option<String>,
    pub s3: Option<S3Config>,
    /// Prefix for every Redis key, so installations can share a server.
    pub namespace: String,
    pub bus: BusConfig,
}

pub async fn open_state(data_dir: &Path, engines: &Engines) -> Result<Arc<dyn StateStore>> {
    Ok(match &engines.redis {
        Some(url) => Arc::new(
            RedisStateStore::connect(url, &engines.namespace)
                .await
                .with_context(|| format!("connecting to Redis at {url}"))?,
        ),
        None => Arc::new(RedbStateStore::open(&data_dir.join("state.redb"))?),
    })
}

pub async fn open_bus(engines: &Engines) -> Result<Arc<dyn Bus>> {
    Ok(match &engines.redis {
        Some(url) => Arc::new(
            RedisBus::connect_with_namespace(url, &engines.namespace, engines.bus.clone())
                .await
                .with_context(|| format!("connecting the bus to Redis at {url}"))?,
        ),
        None => Arc::new(MemoryBus::new(engines.bus.clone())),
    })
}

pub async fn open_artifacts(data_dir: &Path, engines: &Engines) -> Result<Arc<dyn ArtifactStore>> {
    Ok(match &engines.s3 {
        Some(config) => Arc::new(
            S3ArtifactStore::connect(config.clone())
                .await
                .with_context(|| format!("connecting to S3 at {}", config.endpoint))?,
        ),
        None => Arc::new(FsArtifactStore::open(data_dir.join("artifacts")).await?),
    })
}

/// Makes sure an admin token exists: creates `DATA_DIR/admin.token` (mode 0600) on first
/// start and registers it. Returns the file's path.
pub async fn ensure_admin_token(registry: &Registry, data_dir: &Path) -> Result<PathBuf> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let path = data_dir.join("admin.token");
    let token = match std::fs::read_to_string(&path) {
        Ok(t) => t.trim().to_owned(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let token = generate_token();
            let mut file = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&path)
                .with_context(|| format!("creating {}", path.display()))?;
            std::io::Write::write_all(&mut file, format!("{token}\n").as_bytes())?;
            file.sync_all()?;
            token
        }
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    registry.register_token(&token, "admin", TokenRole::Admin).await?;
    Ok(path)
}

/// Applies workers' reports to the registries; acknowledges each report only after it is
/// applied, so none is lost if the manager stops in between. When `stop` is cancelled it
/// drains the reports already sent (the local worker's last ones) and returns.
pub async fn ingest_reports(registry: Registry, consumer: String, stop: CancellationToken) {
    let bus = registry.bus().clone();
    loop {
        let stopping = stop.is_cancelled();
        let wait = if stopping { Duration::ZERO } else { Duration::from_secs(1) };
        let batch = tokio::select! {
            b = bus.next_reports(&consumer, 256, wait) => b,
            () = stop.cancelled(), if !stopping => continue,
        };
        let reports = match batch {
            Ok(r) if r.is_empty() && stopping => return,
            Ok(r) => r,
            Err(e) if stopping => {
                tracing::warn!(error = %e, "cannot read reports while stopping; they stay on the bus");
                return;
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot read reports; retrying in 1 s");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        let mut applied = Vec::with_capacity(reports.len());
        let mut failed = false;
        for report in reports {
            match registry.apply_report_from(report.event, report.datacenter.as_ref()).await {
                Ok(_) => applied.push(report.receipt),
                Err(e) => {
                    // Leave it unacknowledged; it comes back on the next read.
                    tracing::warn!(error = %e, "could not apply a report; will retry");
                    failed = true;
                    break;
                }
            }
        }
        if !applied.is_empty()
            && let Err(e) = bus.ack_reports(&applied).await
        {
            tracing::warn!(error = %e, "could not acknowledge reports; they will be applied again");
        }
        if failed && stopping {
            return;
        }
    }
}

/// Serves the API on `listener` until shutdown, finishing requests in flight.
pub async fn serve_api(
    listener: tokio::net::TcpListener,
    state: AppState,
    shutdown: CancellationToken,
) -> Result<()> {
    let app = api::router(state).layer(tower_http::trace::TraceLayer::new_for_http());
    // hyper directly rather than `axum::serve`, for one setting: header names in title case
    // (`Content-Length`). GRUB's HTTP client matches header names case-sensitively; without
    // the length it reads a kept-alive connection until it times out.
    let mut http = hyper::server::conn::http1::Builder::new();
    http.title_case_headers(true).timer(hyper_util::rt::TokioTimer::new());
    let connections = hyper_util::server::graceful::GracefulShutdown::new();
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Out of file descriptors and the like: pause instead of spinning.
                    tracing::warn!(%error, "accepting an API connection failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = shutdown.cancelled() => break,
        };
        // Boot events name the client, as `axum::serve` with connect info would.
        let app = tower::ServiceExt::map_request(
            app.clone(),
            move |mut request: hyper::Request<hyper::body::Incoming>| {
                request.extensions_mut().insert(axum::extract::ConnectInfo(peer));
                request
            },
        );
        let service = hyper_util::service::TowerToHyperService::new(app);
        let io = hyper_util::rt::TokioIo::new(stream);
        let connection = connections.watch(http.serve_connection(io, service));
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::debug!(%error, "API connection ended with an error");
            }
        });
    }
    drop(listener);
    // In-flight requests finish (long polls end on the same shutdown signal); idle
    // keep-alive connections are closed.
    if tokio::time::timeout(Duration::from_secs(10), connections.shutdown()).await.is_err() {
        tracing::warn!("API connections still open 10 s after shutdown; closing them");
    }
    Ok(())
}

pub async fn bind(addr: SocketAddr, what: &str) -> Result<tokio::net::TcpListener> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding {what} to {addr}"))?;
    // A stable line that scripts and tests read to learn the real port (e.g. after :0).
    println!("listening on http://{} ({what})", listener.local_addr()?);
    tracing::info!(addr = %listener.local_addr()?, "{what} listening");
    Ok(listener)
}

/// Cancels `token` on SIGINT or SIGTERM.
pub fn cancel_on_signals(token: CancellationToken) -> Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
            _ = int.recv() => tracing::info!("SIGINT: shutting down"),
        }
        token.cancel();
    });
    Ok(())
}

/// Everything `ctpf up` and `ctpf manager` run.
#[derive(Debug)]
pub struct ControlPlane {
    pub api: SocketAddr,
    /// The URL booting machines use; `None`: `http://` and the bound address.
    pub public_url: Option<String>,
    /// Where machines booting from this control plane enroll.
    pub boot_datacenter: ctpf_common::Name,
    pub data_dir: PathBuf,
    pub engines: Engines,
    /// The in-process worker of `ctpf up`; `None` for `ctpf manager`.
    pub local_worker: Option<WorkerIdentity>,
    /// Inputs and kernel parameters of the discovery image.
    pub discovery: crate::boot_artifacts::DiscoveryArgs,
    /// iPXE or ctpf-built GRUB images for PXE clients (with a boot service only).
    pub pxe_loader: crate::boot_flags::PxeLoader,
    /// DHCP and TFTP on the boot interface (`ctpf up --boot-interface`). Its boot URLs are
    /// set here once the API is bound, because its port may only be known then.
    pub boot_service: Option<BootServiceConfig>,
    /// How workers are judged (lost after how long).
    pub sites: api::sites::SiteSettings,
}

/// Publishes each datacenter's snapshot when something changed (at once for changes made
/// through this manager, within [`SNAPSHOT_RECHECK`] for anything else, such as another
/// manager's changes or a Redis that lost the published snapshot).
pub async fn publish_snapshots(
    registry: Registry,
    settings: ctpf_registries::SnapshotSettings,
    stop: CancellationToken,
) {
    let mut changes = registry.changes();
    // The first pass and every timed one also make sure the bus still holds each snapshot.
    let mut full = true;
    loop {
        changes.borrow_and_update();
        let pass = match full {
            true => registry.publish_snapshots(&settings).await,
            false => registry.publish_changed_snapshots(&settings).await,
        };
        if let Err(e) = pass {
            tracing::warn!(error = %e, "cannot publish snapshots; retrying");
        }
        full = tokio::select! {
            changed = changes.changed() => if changed.is_err() { return } else { false },
            () = tokio::time::sleep(SNAPSHOT_RECHECK) => true,
            () = stop.cancelled() => return,
        };
    }
}

/// How often the manager looks for changes it was not told about.
const SNAPSHOT_RECHECK: Duration = Duration::from_secs(5);
/// How often worker credentials are handed to the bus again (a restarted Redis without an
/// ACL file forgets them) and worker health is looked at.
const WORKER_CHECK: Duration = Duration::from_secs(2);

/// Keeps the bus's worker credentials in line with the registry and records workers
/// joining, going silent and coming back.
pub async fn watch_workers(registry: Registry, lost_after: Duration, stop: CancellationToken) {
    loop {
        if let Err(e) = registry.authorize_workers().await {
            tracing::warn!(error = %e, "cannot hand worker credentials to the bus; retrying");
        }
        if let Err(e) = registry.observe_workers(lost_after).await {
            tracing::warn!(error = %e, "cannot look at worker health; retrying");
        }
        tokio::select! {
            () = tokio::time::sleep(WORKER_CHECK) => {}
            () = stop.cancelled() => return,
        }
    }
}

pub async fn run_control_plane(plane: ControlPlane, shutdown: CancellationToken) -> Result<()> {
    std::fs::create_dir_all(&plane.data_dir)
        .with_context(|| format!("creating data dir {}", plane.data_dir.display()))?;
    let state = open_state(&plane.data_dir, &plane.engines).await?;
    let bus = open_bus(&plane.engines).await?;
    let artifacts = open_artifacts(&plane.data_dir, &plane.engines).await?;
    let registry = Registry::new(state, bus.clone());

    let token_path = ensure_admin_token(&registry, &plane.data_dir).await?;
    println!("admin token in {}", token_path.display());
    if !bus.is_durable() {
        let n = registry.requeue_unfinished_jobs().await?;
        if n > 0 {
            tracing::info!(jobs = n, "re-queued unfinished jobs from the state store");
        }
    }

    let discovery_cmdline = plane.discovery.discovery_cmdline.clone();
    ctpf_scripts::KernelCmdline::parse("--discovery-cmdline", &discovery_cmdline)?;
    // One discovery image per architecture with inputs: x86_64 from the defaults or flags,
    // arm64 only when its inputs are named.
    let mut discovery_sources = Vec::new();
    match plane.discovery.sources() {
        Ok(sources) => discovery_sources.push((Arch::X86_64, sources)),
        Err(why) if plane.discovery.asked_for() => bail!("discovery image: {why}"),
        Err(why) => {
            tracing::warn!("discovery image not built, PXE-booted machines cannot enroll: {why}");
        }
    }
    match plane.discovery.arm64_sources() {
        Ok(Some(sources)) => discovery_sources.push((Arch::Arm64, sources)),
        Ok(None) => {}
        Err(why) => bail!("discovery image: {why}"),
    }

    // The report loop and the local worker run before anything below submits build jobs.
    let stop_ingest = CancellationToken::new();
    let consumer = format!("manager-{}", std::process::id());
    let ingest = tokio::spawn(ingest_reports(registry.clone(), consumer, stop_ingest.clone()));
    let snapshot_settings =
        ctpf_registries::SnapshotSettings { discovery_cmdline: discovery_cmdline.clone() };
    tokio::spawn(publish_snapshots(registry.clone(), snapshot_settings, shutdown.clone()));
    tokio::spawn(watch_workers(registry.clone(), plane.sites.worker_lost_after, shutdown.clone()));
    let has_local_builder =
        plane.local_worker.as_ref().is_some_and(|w| w.roles.contains(&ctpf_common::Role::Builder));
    // The boot service's DHCP and TFTP activity is reported like a site worker's.
    let boot_events_source = match &plane.local_worker {
        Some(identity) => identity.id.clone(),
        None => format!("manager-{}", std::process::id()),
    };
    let worker = match plane.local_worker {
        Some(identity) => {
            let builder = if identity.roles.contains(&ctpf_common::Role::Builder) {
                Some(open_builder(&plane.data_dir, artifacts.clone())?)
            } else {
                None
            };
            let packager = if identity.roles.contains(&ctpf_common::Role::Packager) {
                Some(open_packager(&plane.data_dir, artifacts.clone())?)
            } else {
                None
            };
            let lease = plane.engines.bus.lease;
            tokio::spawn(ctpf_distributors::heartbeat::run(
                bus.clone(),
                heartbeat_of(&identity, Vec::new()),
                || None,
                shutdown.clone(),
            ));
            let mut config = WorkerConfig::new(identity, lease, builder);
            config.packager = packager;
            Some(tokio::spawn(ctpf_distributors::jobs::run(config, bus.clone(), shutdown.clone())))
        }
        None => None,
    };

    // Every image is submitted before any is waited for, so builders make them at once.
    let mut discovery_jobs = Vec::new();
    for (arch, sources) in &discovery_sources {
        discovery_jobs
            .push((*arch, boot_artifacts::submit_discovery(&registry, *arch, sources).await?));
    }
    for (arch, job) in discovery_jobs {
        if has_local_builder {
            // `ctpf up` serves nothing before its discovery images are ready.
            let job =
                boot_artifacts::wait_for_job(&registry, job.id, Duration::from_secs(1800)).await?;
            match &job.manifest {
                Some(m) => {
                    tracing::info!(%arch, key = %m.key, cached = m.cached, duration_ms = m.duration_ms, "discovery image ready")
                }
                None => bail!(
                    "building the {arch} discovery image: {}",
                    job.error.as_deref().unwrap_or("failed")
                ),
            }
        } else {
            tracing::info!(%arch, job = %job.id, "discovery image build submitted to the builders");
        }
    }
    let mut boot_service = plane.boot_service;

    let listener = bind(plane.api, "api").await?;
    let public_url = match (&plane.public_url, &boot_service) {
        (Some(url), _) => url.clone(),
        // Bound to all addresses for the boot network: machines there use the interface's.
        (None, Some(boot)) if listener.local_addr()?.ip().is_unspecified() => {
            format!("http://{}:{}", boot.address, listener.local_addr()?.port())
        }
        (None, _) => format!("http://{}", listener.local_addr()?),
    };
    let base_url = ctpf_scripts::BaseUrl::parse("public_url", &public_url)?;
    let grub = plane.pxe_loader == crate::boot_flags::PxeLoader::Grub;
    if let Some(boot) = &mut boot_service {
        let mut files =
            boot_artifacts::import_boot_files(&registry, artifacts.as_ref(), &boot.tftp_root)
                .await
                .context("storing the boot files")?;
        if grub {
            let images = boot_artifacts::build_grub_images(&registry, &base_url)
                .await
                .context("building the GRUB boot images (--pxe-loader grub)")?;
            files.extend(images);
        }
        boot.tftp_artifacts = Some(TftpArtifacts { store: artifacts.clone(), files, bundle: None });
    }
    // What the boot service and the HTTP boot routes do for machines, as events.
    let (boot_events, recorded) =
        BootEvents::channel(&boot_events_source, Some(plane.boot_datacenter.clone()));
    tokio::spawn(boot_events::forward(recorded, bus.clone(), shutdown.clone()));
    let boot_service = match boot_service {
        Some(config) => {
            let mut boot = crate::boot_flags::boot_config(config.address, &public_url);
            if grub {
                boot = boot.with_grub(&public_url);
            }
            let events = boot_events.clone();
            let service = BootService::bind(BootServiceConfig { boot, events, ..config }).await?;
            let stop_all = shutdown.clone();
            // A failed boot socket stops `ctpf up` rather than leaving it half-working.
            Some(tokio::spawn(async move {
                let served = service.run(stop_all.clone()).await;
                stop_all.cancel();
                served
            }))
        }
        None => None,
    };
    let boot =
        api::boot::BootSettings { base_url, datacenter: plane.boot_datacenter, discovery_cmdline };
    let state = AppState {
        registry,
        artifacts,
        shutdown: shutdown.clone(),
        boot,
        sites: plane.sites,
        boot_events,
    };
    let served = serve_api(listener, state, shutdown.clone()).await;
    // Stop in order: no new requests, the local worker finishes its job and reports, then the
    // report loop applies what is left before the process exits.
    shutdown.cancel();
    if let Some(worker) = worker {
        let _ = worker.await;
    }
    stop_ingest.cancel();
    let _ = ingest.await;
    if let Some(boot_service) = boot_service {
        boot_service.await.context("boot service task")??;
    }
    served?;
    tracing::info!("stopped");
    Ok(())
}

/// The builder of a process with the `builder` role: builds in `DATA_DIR/builds`, with
/// `SOURCE_DATE_EPOCH` from the environment (default 0).
pub fn open_builder(data_dir: &Path, artifacts: Arc<dyn ArtifactStore>) -> Result<Builder> {
    let mut config = BuilderConfig::new(data_dir.join("builds"));
    // GRUB module directories to search before Debian's /usr/lib/grub, e.g. an unpacked
    // grub-efi-arm64-bin:arm64 (usr/lib/grub) for arm64 media on an amd64 builder.
    if let Some(path) = std::env::var_os("CTPF_GRUB_LIB_PATH") {
        let mut libs: Vec<PathBuf> =
            std::env::split_paths(&path).filter(|dir| !dir.as_os_str().is_empty()).collect();
        libs.append(&mut config.grub_libs);
        config.grub_libs = libs;
    }
    config.source_date_epoch =
        ctpf_builders::parse_source_date_epoch(std::env::var("SOURCE_DATE_EPOCH").ok().as_deref())?;
    Ok(Builder::new(config, artifacts)?)
}

fn open_packager(data_dir: &Path, artifacts: Arc<dyn ArtifactStore>) -> Result<Packager> {
    let config = PackagerConfig { work_dir: data_dir.join("packages") };
    Ok(Packager::new(config, artifacts)?)
}

/// What a worker announces about itself.
fn heartbeat_of(identity: &WorkerIdentity, addresses: Vec<String>) -> ctpf_common::WorkerHeartbeat {
    ctpf_common::WorkerHeartbeat {
        identity: identity.clone(),
        version: env!("CARGO_PKG_VERSION").to_owned(),
        addresses,
        generation: None,
        started_at: ctpf_common::OffsetDateTime::now_utc(),
    }
}

/// The worker's bus. A refused credential stops the worker at once; an unreachable Redis
/// does not: the worker starts (a distributor serves its stored snapshot) and connects when
/// Redis is back.
async fn connect_worker_bus(
    redis: &str,
    engines: &Engines,
    identity: &WorkerIdentity,
    token: Option<&ctpf_common::WorkerToken>,
) -> Result<Arc<dyn Bus>> {
    let connect = {
        let (redis, namespace, config) =
            (redis.to_owned(), engines.namespace.clone(), engines.bus.clone());
        let (datacenter, token) = (identity.datacenter.clone(), token.cloned());
        move || {
            let (redis, namespace, config) = (redis.clone(), namespace.clone(), config.clone());
            let (datacenter, token) = (datacenter.clone(), token.clone());
            async move {
                let bus = match &token {
                    Some(t) => {
                        RedisBus::connect_as_worker(
                            &redis,
                            &namespace,
                            &datacenter,
                            &t.id,
                            &t.secret,
                            config,
                        )
                        .await?
                    }
                    None => RedisBus::connect_with_namespace(&redis, &namespace, config).await?,
                };
                Ok(Arc::new(bus) as Arc<dyn Bus>)
            }
        }
    };
    match connect().await {
        Ok(bus) => Ok(bus),
        Err(e @ ctpf_bus::BusError::Denied(_)) => {
            Err(e).with_context(|| format!("connecting to Redis at {redis}"))
        }
        Err(e) => {
            tracing::warn!(error = %e, %redis, "Redis is unreachable; starting anyway and connecting when it is back");
            Ok(Arc::new(ctpf_bus::LazyBus::new(connect, true)))
        }
    }
}

/// A worker process: how it reaches the bus and what it serves.
#[derive(Debug)]
pub struct WorkerRun {
    pub redis: String,
    pub engines: Engines,
    pub data_dir: PathBuf,
    pub identity: WorkerIdentity,
    /// A site worker's credential (`ctpf worker token create`); without one the worker uses
    /// the Redis URL's own user and is trusted like the manager.
    pub token: Option<ctpf_common::WorkerToken>,
    /// Fetch snapshot files from this manager with `token` instead of from S3.
    pub manager_url: Option<String>,
    /// The distributor's network side (distributor role only).
    pub site: Option<ctpf_distributors::site::SiteConfig>,
}

pub async fn run_worker(run: WorkerRun, shutdown: CancellationToken) -> Result<()> {
    let WorkerRun { redis, engines, data_dir, identity, token, manager_url, site } = run;
    std::fs::create_dir_all(&data_dir)
        .with_context(|| format!("creating data dir {}", data_dir.display()))?;
    let bus = connect_worker_bus(&redis, &engines, &identity, token.as_ref()).await?;
    let roles = &identity.roles;
    let stores =
        roles.contains(&ctpf_common::Role::Builder) || roles.contains(&ctpf_common::Role::Packager);
    let artifacts = match &engines.s3 {
        Some(_) => Some(open_artifacts(&data_dir, &engines).await?),
        None if stores => bail!(
            "a worker with the builder or packager role stores its output in S3: pass --s3 URL"
        ),
        None => None,
    };
    let builder = match &artifacts {
        Some(artifacts) if roles.contains(&ctpf_common::Role::Builder) => {
            Some(open_builder(&data_dir, artifacts.clone())?)
        }
        _ => None,
    };
    let packager = match &artifacts {
        Some(artifacts) if roles.contains(&ctpf_common::Role::Packager) => {
            Some(open_packager(&data_dir, artifacts.clone())?)
        }
        _ => None,
    };

    let mut tasks = tokio::task::JoinSet::new();
    let addresses: Vec<String> =
        site.iter().flat_map(|s| s.boot_interface.iter().map(|i| i.address.to_string())).collect();
    // The manager checks the worker's credential and serves only its datacenter's files;
    // S3 credentials would let it read everything.
    let origin: Option<Arc<dyn FileOrigin>> = match (&manager_url, &token, &artifacts) {
        (Some(url), Some(token), _) => Some(Arc::new(
            ManagerOrigin::new(url, token.clone()).context("the HTTP client for --manager-url")?,
        )),
        (Some(_), None, _) => bail!("--manager-url needs --worker-token"),
        (None, _, Some(artifacts)) => Some(Arc::new(StoreOrigin(artifacts.clone()))),
        (None, _, None) => None,
    };
    let holder = match &site {
        Some(site) => Some(Arc::new(
            ctpf_distributors::site::SnapshotHolder::open(
                identity.datacenter.clone(),
                &site.data_dir,
                origin,
            )
            .await?,
        )),
        None => None,
    };
    {
        let holder = holder.clone();
        let generation = move || holder.as_ref().map(|h| h.generation()).filter(|g| *g > 0);
        let beat = heartbeat_of(&identity, addresses);
        let (bus, stop) = (bus.clone(), shutdown.clone());
        tasks.spawn(async move {
            ctpf_distributors::heartbeat::run(bus, beat, generation, stop).await;
            Ok(())
        });
    }
    if let (Some(site), Some(holder)) = (site, holder) {
        let (bus, stop) = (bus.clone(), shutdown.clone());
        tasks.spawn(async move {
            let served = ctpf_distributors::site::run(site, holder, bus, stop.clone()).await;
            // The worker is no use to its site without its distributor.
            stop.cancel();
            served.context("the distributor stopped")
        });
    }
    println!("worker {} ready (datacenter {})", identity.id, identity.datacenter);
    let lease = engines.bus.lease;
    let mut config = WorkerConfig::new(identity, lease, builder);
    config.packager = packager;
    ctpf_distributors::jobs::run(config, bus, shutdown.clone()).await;
    shutdown.cancel();
    let mut result = Ok(());
    while let Some(joined) = tasks.join_next().await {
        match joined {
            Ok(Err(e)) if result.is_ok() => result = Err(e),
            Ok(_) => {}
            Err(e) => tracing::error!(error = %e, "a worker task panicked"),
        }
    }
    result
}
