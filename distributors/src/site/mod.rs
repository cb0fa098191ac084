//! The distributor role of a site worker: it serves its datacenter's desired state (DHCP,
//! TFTP and HTTP boot) from snapshots the manager publishes, and keeps serving the last good
//! one while the manager or Redis is out of reach.
//!
//! Five tasks:
//! - the **follower** waits on the bus for a newer generation, checks it
//!   ([`DatacenterSnapshot::decode`]), fetches every file it names by digest into the local
//!   cache, stores it on disk and only then swaps it in (a `watch` channel: readers see the
//!   old snapshot or the new one, whole);
//! - the **boot service** (DHCP/proxyDHCP, PXE, TFTP) is bound for the current snapshot and
//!   bound again when a snapshot changes what it serves;
//! - the **HTTP** boot server ([`http`]) reads the current snapshot per request;
//! - the **forwarder** sends queued host callbacks ([`local::Outbox`]) to the manager as
//!   reports, deleting each only once the bus accepted it;
//! - the **boot event forwarder** ([`boot_events::forward`]) reports what DHCP, TFTP and
//!   HTTP did for machines, holding a bounded backlog while the bus is unreachable.

use std::{
    net::{Ipv4Addr, SocketAddr},
    path::PathBuf,
    sync::Arc,
    time::Duration,
};

use ctpf_bus::Bus;
use ctpf_common::{DatacenterSnapshot, DesiredState, DhcpMode, Name, Sha256Digest};
use ctpf_store::artifacts::{ArtifactStore, FsArtifactStore};
use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;

use crate::boot_events::{self, BootEvents};
use crate::boot_service::{BootService, BootServiceConfig, DhcpSetting, TftpArtifacts};
use crate::bundle::{BundleCache, BundleError, BundleIndex};
use crate::dhcp::{BootConfig, NetworkConfig};

pub mod http;
pub mod local;
pub mod origin;

/// How long one wait for a new snapshot lasts before the follower looks at shutdown again.
const SNAPSHOT_WAIT: Duration = Duration::from_secs(5);
/// Pause after the bus failed, growing to [`MAX_BACKOFF`] while it stays down.
const FIRST_BACKOFF: Duration = Duration::from_millis(250);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// The interface machines boot on.
#[derive(Debug, Clone)]
pub struct BootInterface {
    pub name: String,
    pub address: Ipv4Addr,
    pub netmask: Ipv4Addr,
}

#[derive(Debug, Clone)]
pub struct SiteConfig {
    pub datacenter: Name,
    pub worker_id: String,
    /// Snapshot, cache, outbox, lease journal and site token live here.
    pub data_dir: PathBuf,
    /// DHCP and TFTP run here; without one, only HTTP boot runs.
    pub boot_interface: Option<BootInterface>,
    /// The HTTP boot server's address.
    pub http_listen: SocketAddr,
    /// The URL machines reach the HTTP boot server at.
    pub public_url: String,
    /// Files TFTP serves that no snapshot names (an empty directory is fine).
    pub tftp_root: PathBuf,
    /// Send IPv6 router advertisements on the boot interface (see
    /// [`crate::router_advert`]).
    pub ipv6_router_adverts: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum SiteError {
    #[error(transparent)]
    Local(#[from] local::LocalError),
    #[error("local artifact cache: {0}")]
    Cache(#[from] ctpf_store::artifacts::ArtifactError),
    #[error("public URL: {0}")]
    PublicUrl(#[from] ctpf_common::ParseError),
    #[error("binding the HTTP boot server to {addr}: {source}")]
    HttpBind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("HTTP boot server: {0}")]
    Http(#[source] std::io::Error),
}

/// Why a published snapshot was not taken (the last good one keeps being served).
#[derive(Debug, thiserror::Error)]
pub enum RefusedSnapshot {
    #[error(transparent)]
    Invalid(#[from] ctpf_common::SnapshotError),
    #[error("fetching {digest}: {reason}")]
    Fetch { digest: Sha256Digest, reason: String },
    #[error(transparent)]
    Store(#[from] local::LocalError),
    #[error("storing the snapshot stopped: {0}")]
    StoreTask(String),
    #[error(transparent)]
    Bundle(#[from] BundleError),
}

/// The snapshot a site serves and where it came from; shared by the tasks.
#[derive(Debug)]
pub struct SnapshotHolder {
    datacenter: Name,
    file: local::SnapshotFile,
    cache: Arc<dyn ArtifactStore>,
    /// Where files the cache lacks are fetched from; `None`: the cache must have them.
    origin: Option<Arc<dyn origin::FileOrigin>>,
    current: watch::Sender<Option<Arc<DatacenterSnapshot>>>,
    bundles: BundleCache,
}

impl SnapshotHolder {
    /// Opens the cache in `DATA_DIR/cache` and loads the last good snapshot, if any.
    pub async fn open(
        datacenter: Name,
        data_dir: &std::path::Path,
        origin: Option<Arc<dyn origin::FileOrigin>>,
    ) -> Result<Self, SiteError> {
        let file = local::SnapshotFile::new(data_dir);
        let fs_cache = Arc::new(FsArtifactStore::open(data_dir.join("cache")).await?);
        let bundles = BundleCache::new(fs_cache.clone());
        let cache: Arc<dyn ArtifactStore> = fs_cache;
        let stored = file.load(&datacenter)?;
        if let Some(snapshot) = &stored {
            tracing::info!(generation = snapshot.generation, "serving the stored snapshot");
        }
        let (current, _) = watch::channel(stored.map(Arc::new));
        Ok(Self { datacenter, file, cache, origin, current, bundles })
    }

    pub fn generation(&self) -> u64 {
        self.current.borrow().as_ref().map_or(0, |s| s.generation)
    }

    pub fn subscribe(&self) -> watch::Receiver<Option<Arc<DatacenterSnapshot>>> {
        self.current.subscribe()
    }

    pub fn cache(&self) -> Arc<dyn ArtifactStore> {
        self.cache.clone()
    }

    /// Indexes of the PXE bundle served (see [`crate::bundle`]).
    pub fn bundles(&self) -> BundleCache {
        self.bundles.clone()
    }

    /// Checks a published snapshot, fetches its files, stores it and swaps it in. Returns its
    /// generation.
    pub async fn accept(&self, body: &[u8]) -> Result<u64, RefusedSnapshot> {
        let snapshot = DatacenterSnapshot::decode(body, &self.datacenter, self.generation())?;
        for file in snapshot.state.files() {
            self.fetch(file.digest).await?;
        }
        // A bundle that cannot be served refuses the snapshot, like a missing file.
        if let Some(bundle) = &snapshot.state.boot.pxe_bundle {
            let index = self.bundles.index(bundle.file.digest).await?;
            tracing::info!(bundle = %bundle.name, files = index.len(), "PXE bundle indexed");
        }
        let (file, to_store) = (self.file.clone(), snapshot.clone());
        tokio::task::spawn_blocking(move || file.store(&to_store))
            .await
            .map_err(|e| RefusedSnapshot::StoreTask(e.to_string()))??;
        let generation = snapshot.generation;
        self.current.send_replace(Some(Arc::new(snapshot)));
        Ok(generation)
    }

    /// Makes sure the cache holds `digest`, copying it from the source (hash-checked on the way
    /// in) when it does not.
    async fn fetch(&self, digest: Sha256Digest) -> Result<(), RefusedSnapshot> {
        let failed = |reason: String| RefusedSnapshot::Fetch { digest, reason };
        if self.cache.stat(&digest).await.map_err(|e| failed(e.to_string()))?.is_some() {
            return Ok(());
        }
        let Some(origin) = &self.origin else {
            return Err(failed(
                "not in the local cache, and nowhere to fetch from (--manager-url or --s3)".into(),
            ));
        };
        let reader = origin.fetch(&digest).await.map_err(failed)?;
        self.cache.put(reader, Some(digest)).await.map_err(|e| failed(e.to_string()))?;
        Ok(())
    }

    /// Follows the bus until `stop`: every newer generation is accepted or refused (logged).
    pub async fn follow(&self, bus: Arc<dyn Bus>, stop: CancellationToken) {
        let mut backoff = FIRST_BACKOFF;
        loop {
            let waited = tokio::select! {
                w = bus.snapshot_after(&self.datacenter, self.generation(), SNAPSHOT_WAIT) => w,
                () = stop.cancelled() => return,
            };
            match waited {
                Ok(Some(published)) => {
                    backoff = FIRST_BACKOFF;
                    match self.accept(&published.body).await {
                        Ok(generation) => tracing::info!(generation, "snapshot swapped in"),
                        Err(e) => {
                            tracing::warn!(generation = published.generation, error = %e,
                                "snapshot refused; serving the last good one");
                            // Not again at once: wait for the next generation or a while.
                            tokio::select! {
                                () = tokio::time::sleep(MAX_BACKOFF) => {}
                                () = stop.cancelled() => return,
                            }
                        }
                    }
                }
                Ok(None) => backoff = FIRST_BACKOFF,
                Err(e) => {
                    tracing::warn!(error = %e, generation = self.generation(),
                        "cannot reach the bus; serving the last snapshot");
                    tokio::select! {
                        () = tokio::time::sleep(backoff) => {}
                        () = stop.cancelled() => return,
                    }
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
    }
}

/// The parts of a snapshot the boot service is bound with; a change here rebinds it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct BootBinding {
    dhcp: ctpf_common::DhcpSettings,
    reservations: Vec<ctpf_common::Reservation>,
    loaders: std::collections::BTreeMap<String, ctpf_common::SnapshotFile>,
    pxe_bundle: Option<ctpf_common::BundleFile>,
}

impl BootBinding {
    fn of(state: &DesiredState) -> Self {
        Self {
            dhcp: state.dhcp.clone(),
            reservations: state.reservations.clone(),
            loaders: state.boot.loaders.clone(),
            pxe_bundle: state.boot.pxe_bundle.clone(),
        }
    }
}

/// How `state` becomes a boot service on `interface`; a DHCP setting that does not fit the
/// interface's network is an error naming the setting.
fn boot_service_config(
    config: &SiteConfig,
    interface: &BootInterface,
    state: &DesiredState,
    cache: &Arc<dyn ArtifactStore>,
    bundle: Option<Arc<BundleIndex>>,
    events: &BootEvents,
) -> Result<BootServiceConfig, String> {
    let netmask = match state.dhcp.prefix_len {
        Some(len) => Ipv4Addr::from(u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0)),
        None => interface.netmask,
    };
    let in_subnet = |ip: Ipv4Addr| {
        u32::from(ip) & u32::from(netmask) == u32::from(interface.address) & u32::from(netmask)
    };
    let dhcp = match state.dhcp.mode {
        DhcpMode::Off => DhcpSetting::Off,
        DhcpMode::Proxy => DhcpSetting::Proxy,
        DhcpMode::Authoritative => {
            let (first, last) = state.dhcp.range.ok_or("dhcp.range: missing")?;
            if !in_subnet(first) || !in_subnet(last) {
                return Err(format!(
                    "dhcp.range {first}-{last} is not in {}'s network {}/{netmask}",
                    interface.name, interface.address
                ));
            }
            let mut reservations = std::collections::BTreeMap::new();
            for r in &state.reservations {
                if in_subnet(r.ip) {
                    reservations.insert(r.mac, r.ip);
                } else {
                    tracing::warn!(mac = %r.mac, ip = %r.ip, "reservation outside the boot network skipped");
                }
            }
            DhcpSetting::Authoritative {
                range: first..=last,
                reservations,
                network: NetworkConfig {
                    subnet_mask: netmask,
                    routers: state.dhcp.router.into_iter().collect(),
                    dns_servers: state.dhcp.dns.clone(),
                    domain_name: None,
                },
                journal: config.data_dir.join("dhcp-leases.journal"),
            }
        }
    };
    let files = state.boot.loaders.iter().map(|(name, f)| (name.clone(), f.digest)).collect();
    Ok(BootServiceConfig {
        events: events.clone(),
        interface: interface.name.clone(),
        address: interface.address,
        dhcp,
        tftp_root: config.tftp_root.clone(),
        boot: BootConfig::ipxe_chain(interface.address, &config.public_url),
        ipv6_router_adverts: config.ipv6_router_adverts,
        tftp_artifacts: Some(TftpArtifacts { store: cache.clone(), files, bundle }),
    })
}

/// Keeps a boot service bound for the current snapshot until `stop`.
async fn supervise_boot_service(
    config: SiteConfig,
    interface: BootInterface,
    cache: Arc<dyn ArtifactStore>,
    bundles: BundleCache,
    mut snapshots: watch::Receiver<Option<Arc<DatacenterSnapshot>>>,
    events: BootEvents,
    stop: CancellationToken,
) {
    loop {
        let current = snapshots.borrow_and_update().clone();
        let Some(snapshot) = current else {
            tracing::info!("no snapshot yet: DHCP and TFTP wait for the first one");
            tokio::select! {
                changed = snapshots.changed() => if changed.is_err() { return },
                () = stop.cancelled() => return,
            }
            continue;
        };
        let binding = BootBinding::of(&snapshot.state);
        let running = stop.child_token();
        let bundle = match &snapshot.state.boot.pxe_bundle {
            Some(bundle) => match bundles.index(bundle.file.digest).await {
                Ok(index) => Some(index),
                Err(e) => {
                    tracing::error!(error = %e, "PXE bundle not served over TFTP");
                    None
                }
            },
            None => None,
        };
        let config_for_state =
            boot_service_config(&config, &interface, &snapshot.state, &cache, bundle, &events);
        let task = match config_for_state {
            Ok(boot) => match BootService::bind(boot).await {
                Ok(service) => {
                    tracing::info!(generation = snapshot.generation, "boot service bound");
                    Some(tokio::spawn(service.run(running.clone())))
                }
                Err(e) => {
                    tracing::error!(error = %e, "cannot bind the boot service");
                    None
                }
            },
            Err(reason) => {
                tracing::error!(generation = snapshot.generation, %reason, "snapshot not servable on this interface");
                None
            }
        };
        // Rebind only when what the service was bound with changes; hosts and the
        // discovery image are read per request.
        let outcome = loop {
            tokio::select! {
                changed = snapshots.changed() => {
                    if changed.is_err() { break None; }
                    let next = snapshots.borrow().clone();
                    if next.as_ref().map(|s| BootBinding::of(&s.state)) != Some(binding.clone()) {
                        break Some(());
                    }
                }
                () = stop.cancelled() => break None,
            }
        };
        running.cancel();
        if let Some(task) = task {
            match task.await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::error!(error = %e, "boot service failed"),
                Err(e) => tracing::error!(error = %e, "boot service task panicked"),
            }
        }
        if outcome.is_none() {
            return;
        }
        tracing::info!("the snapshot changed what DHCP/TFTP serve: rebinding");
    }
}

/// Sends queued callbacks to the manager until `stop`; each leaves the outbox only after the
/// bus took it.
async fn forward_callbacks(
    outbox: local::Outbox,
    ready: Arc<Notify>,
    bus: Arc<dyn Bus>,
    stop: CancellationToken,
) {
    let mut backoff = FIRST_BACKOFF;
    loop {
        let pending = {
            let outbox = outbox.clone();
            tokio::task::spawn_blocking(move || outbox.pending()).await
        };
        let pending = match pending {
            Ok(Ok(pending)) => pending,
            Ok(Err(e)) => {
                tracing::error!(error = %e, "cannot read the callback outbox");
                Vec::new()
            }
            Err(e) => {
                tracing::error!(error = %e, "reading the outbox panicked");
                Vec::new()
            }
        };
        let mut failed = false;
        for (path, event) in pending {
            match bus.report(&event).await {
                Ok(()) => {
                    if let Err(e) = outbox.remove(&path) {
                        tracing::error!(error = %e, "cannot remove a forwarded callback");
                    }
                    tracing::info!("host callback forwarded to the manager");
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot forward a host callback yet; it stays queued");
                    failed = true;
                    break;
                }
            }
        }
        let wait = if failed { backoff } else { Duration::from_secs(30) };
        backoff = if failed { (backoff * 2).min(MAX_BACKOFF) } else { FIRST_BACKOFF };
        tokio::select! {
            () = ready.notified() => {}
            () = tokio::time::sleep(wait) => {}
            () = stop.cancelled() => return,
        }
    }
}

/// Runs the distributor until `shutdown`: the follower, the boot service, the HTTP boot
/// server and the forwarder, all around `holder` (whose generation the heartbeats report).
pub async fn run(
    config: SiteConfig,
    holder: Arc<SnapshotHolder>,
    bus: Arc<dyn Bus>,
    shutdown: CancellationToken,
) -> Result<(), SiteError> {
    let site_token: Arc<str> = local::site_enroll_token(&config.data_dir)?.into();
    let outbox = local::Outbox::open(&config.data_dir)?;
    let outbox_ready = Arc::new(Notify::new());
    let base_url = ctpf_scripts::BaseUrl::parse("public_url", &config.public_url)?;
    let listener = tokio::net::TcpListener::bind(config.http_listen)
        .await
        .map_err(|source| SiteError::HttpBind { addr: config.http_listen, source })?;
    let bound = listener.local_addr().map_err(SiteError::Http)?;
    println!("listening on http://{bound} (site http)");

    let mut tasks = tokio::task::JoinSet::new();
    {
        let (holder, bus, stop) = (holder.clone(), bus.clone(), shutdown.clone());
        tasks.spawn(async move { holder.follow(bus, stop).await });
    }
    let (events, recorded) =
        BootEvents::channel(&config.worker_id, Some(config.datacenter.clone()));
    tasks.spawn(boot_events::forward(recorded, bus.clone(), shutdown.clone()));
    if let Some(interface) = config.boot_interface.clone() {
        let (config, cache, bundles, snapshots, events, stop) = (
            config.clone(),
            holder.cache(),
            holder.bundles(),
            holder.subscribe(),
            events.clone(),
            shutdown.clone(),
        );
        tasks.spawn(supervise_boot_service(
            config, interface, cache, bundles, snapshots, events, stop,
        ));
    }
    {
        let (outbox, ready, bus, stop) =
            (outbox.clone(), outbox_ready.clone(), bus.clone(), shutdown.clone());
        tasks.spawn(forward_callbacks(outbox, ready, bus, stop));
    }
    let state = http::SiteHttp {
        snapshot: holder.subscribe(),
        cache: holder.cache(),
        bundles: holder.bundles(),
        base_url,
        site_token,
        outbox,
        outbox_ready,
        worker: config.worker_id.clone(),
        datacenter: config.datacenter.clone(),
        events,
    };
    let app = http::router(state).into_make_service_with_connect_info::<SocketAddr>();
    let stop = shutdown.clone();
    let served = axum::serve(listener, app)
        .with_graceful_shutdown(async move { stop.cancelled().await })
        .await
        .map_err(SiteError::Http);
    shutdown.cancel();
    while tasks.join_next().await.is_some() {}
    served
}
