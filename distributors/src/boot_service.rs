//! Network boot on one interface: the DHCP (or proxyDHCP) loop and the TFTP server, bound
//! and run together until shutdown. `ctpf up --boot-interface` is its one caller.
//!
//! Sockets: DHCP listens on 0.0.0.0:67 because requests arrive broadcast, so it is tied to
//! the interface with SO_BINDTODEVICE (otherwise it would answer on every interface and its
//! broadcasts would leave by the default route). The PXE boot-server port 4011 (proxy mode)
//! and TFTP are unicast and bind the interface address.

use std::collections::BTreeMap;
use std::io;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::ops::RangeInclusive;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use ctpf_common::{MacAddr, Sha256Digest};
use ctpf_store::artifacts::ArtifactStore;
use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::UdpSocket;
use tokio_util::sync::CancellationToken;

use crate::boot_events::BootEvents;
use crate::bundle::{BundleIndex, BundleSource};
use crate::dhcp::{
    self, BootConfig, DhcpCore, LeaseLog, LogError, NetworkConfig, PoolConfig, RequestPort,
    server::Options,
};
use crate::router_advert::{RouterAdvertConfig, RouterAdvertError, RouterAdvertiser};
use crate::tftp::{self, ArtifactSource, DirSource, FileSource, TftpConfig};

/// The well-known TFTP port.
pub const TFTP_PORT: u16 = 69;

/// Lease timings of authoritative mode: half a day per lease, as home routers do.
const LEASE_SECS: u32 = 12 * 60 * 60;
const OFFER_HOLD_SECS: u32 = 60;
const DECLINE_SECS: u32 = 10 * 60;

/// Which DHCP role to play on the interface.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DhcpSetting {
    /// No DHCP at all: another server hands out addresses and boot files; only TFTP runs.
    Off,
    /// proxyDHCP: the site's DHCP server hands out addresses, we add boot information.
    Proxy,
    /// We hand out addresses from `range` ourselves; leases survive restarts in `journal`.
    Authoritative {
        range: RangeInclusive<Ipv4Addr>,
        reservations: BTreeMap<MacAddr, Ipv4Addr>,
        /// Subnet mask, routers and DNS servers handed out with each lease.
        network: NetworkConfig,
        journal: PathBuf,
    },
}

#[derive(Debug, Clone)]
pub struct BootServiceConfig {
    /// The interface DHCP is bound to (SO_BINDTODEVICE).
    pub interface: String,
    /// Its IPv4 address: PXE and TFTP bind it.
    pub address: Ipv4Addr,
    pub dhcp: DhcpSetting,
    pub tftp_root: PathBuf,
    pub boot: BootConfig,
    /// Also send IPv6 router advertisements on the interface (see [`router_advert`]).
    pub ipv6_router_adverts: bool,
    /// Files TFTP serves from the artifact store by name (before looking in `tftp_root`).
    pub tftp_artifacts: Option<TftpArtifacts>,
    /// Where DHCP replies and TFTP transfers are recorded for the event stream.
    pub events: BootEvents,
}

/// See [`BootServiceConfig::tftp_artifacts`].
#[derive(Debug, Clone)]
pub struct TftpArtifacts {
    pub store: Arc<dyn ArtifactStore>,
    pub files: BTreeMap<String, Sha256Digest>,
    /// A PXE bundle served after `files` and before the TFTP root.
    pub bundle: Option<Arc<BundleIndex>>,
}

#[derive(Debug, thiserror::Error)]
pub enum BootServiceError {
    #[error("binding udp://{addr} ({what}) on interface {interface}: {source}")]
    Bind {
        what: &'static str,
        addr: SocketAddrV4,
        interface: String,
        #[source]
        source: io::Error,
    },
    #[error("TFTP root {path}: {source}")]
    TftpRoot {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("lease journal {path}: {source}")]
    Journal {
        path: PathBuf,
        #[source]
        source: LogError,
    },
    #[error(transparent)]
    RouterAdvert(#[from] RouterAdvertError),
    #[error("{what} socket failed: {source}")]
    Serve {
        what: &'static str,
        #[source]
        source: io::Error,
    },
}

/// The bound sockets and opened state, ready to [`BootService::run`]. Binding first lets the
/// caller fail start-up on a busy port instead of discovering it later.
#[derive(Debug)]
pub struct BootService {
    dhcp: Option<DhcpSockets>,
    tftp_socket: UdpSocket,
    tftp_source: Arc<dyn FileSource>,
    router_adverts: Option<RouterAdvertiser>,
    events: BootEvents,
}

#[derive(Debug)]
struct DhcpSockets {
    core: Arc<Mutex<DhcpCore>>,
    journal: Option<Arc<LeaseLog>>,
    dhcp: UdpSocket,
    /// PXE firmware asks the boot server there after its DHCP exchange.
    pxe: Option<UdpSocket>,
}

impl BootService {
    /// Opens the TFTP root and the lease journal and binds every socket, printing a
    /// `listening on udp://ADDR:PORT (dhcp|pxe|tftp)` line for each (scripts and tests
    /// wait for them).
    pub async fn bind(config: BootServiceConfig) -> Result<Self, BootServiceError> {
        let tftp_source = DirSource::new(&config.tftp_root).map_err(|source| {
            BootServiceError::TftpRoot { path: config.tftp_root.clone(), source }
        })?;
        let dhcp = match config.dhcp {
            DhcpSetting::Off => None,
            DhcpSetting::Proxy => {
                let core = DhcpCore::proxy(config.boot.clone());
                let dhcp = bind_dhcp(&config.interface)?;
                let pxe_addr = SocketAddrV4::new(config.address, dhcp::PXE_PORT);
                let pxe = bind_udp(pxe_addr, &config.interface, "pxe")?;
                Some(DhcpSockets {
                    core: Arc::new(Mutex::new(core)),
                    journal: None,
                    dhcp,
                    pxe: Some(pxe),
                })
            }
            DhcpSetting::Authoritative { range, reservations, network, journal } => {
                let (log, records) = LeaseLog::open(&journal)
                    .map_err(|source| BootServiceError::Journal { path: journal, source })?;
                let pool = PoolConfig {
                    first: *range.start(),
                    last: *range.end(),
                    lease_secs: LEASE_SECS,
                    offer_hold_secs: OFFER_HOLD_SECS,
                    decline_secs: DECLINE_SECS,
                    reservations,
                };
                let table = dhcp::restore_table(pool, &records, unix_now());
                let core = DhcpCore::with_table(config.boot.clone(), network, table);
                let dhcp = bind_dhcp(&config.interface)?;
                // UEFI PXE takes an offer with "PXEClient" but no PXE options (option 43) as a
                // "BINL" offer and asks port 4011 for its boot file even from the DHCP server.
                let pxe_addr = SocketAddrV4::new(config.address, dhcp::PXE_PORT);
                let pxe = bind_udp(pxe_addr, &config.interface, "pxe")?;
                Some(DhcpSockets {
                    core: Arc::new(Mutex::new(core)),
                    journal: Some(Arc::new(log)),
                    dhcp,
                    pxe: Some(pxe),
                })
            }
        };
        let tftp_addr = SocketAddrV4::new(config.address, TFTP_PORT);
        let tftp_socket = bind_udp(tftp_addr, &config.interface, "tftp")?;
        let router_adverts = match config.ipv6_router_adverts {
            true => Some(RouterAdvertiser::open(RouterAdvertConfig::new(&config.interface))?),
            false => None,
        };
        let tftp_source: Arc<dyn FileSource> = match config.tftp_artifacts {
            Some(TftpArtifacts { store, files, bundle }) => {
                let fallback: Arc<dyn FileSource> = match bundle {
                    Some(index) => {
                        Arc::new(BundleSource { index, fallback: Arc::new(tftp_source) })
                    }
                    None => Arc::new(tftp_source),
                };
                Arc::new(ArtifactSource::new(files, store, fallback))
            }
            None => Arc::new(tftp_source),
        };
        Ok(Self { dhcp, tftp_socket, tftp_source, router_adverts, events: config.events })
    }

    /// Serves DHCP (and PXE) and TFTP until `shutdown` is cancelled, then closes the lease
    /// journal once everything queued is on disk. If one socket fails the others stop too.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), BootServiceError> {
        let stop = shutdown.child_token();
        let mut tasks = tokio::task::JoinSet::new();
        let mut journal = None;
        if let Some(sockets) = self.dhcp {
            let options = Options {
                journal: sockets.journal.clone(),
                events: self.events.clone(),
                ..Options::default()
            };
            let loop_stop = stop.clone();
            let core = sockets.core.clone();
            tasks.spawn(async move {
                let served = dhcp::server::run_with(
                    sockets.dhcp,
                    RequestPort::Dhcp,
                    core,
                    options,
                    loop_stop,
                )
                .await;
                ("dhcp", served)
            });
            if let Some(pxe) = sockets.pxe {
                let (core, pxe_stop) = (sockets.core.clone(), stop.clone());
                let options = Options { events: self.events.clone(), ..Options::default() };
                tasks.spawn(async move {
                    let served = dhcp::server::run_with(
                        pxe,
                        RequestPort::PxeBootServer,
                        core,
                        options,
                        pxe_stop,
                    )
                    .await;
                    ("pxe", served)
                });
            }
            journal = sockets.journal;
        }
        let (source, tftp_stop) = (self.tftp_source, stop.clone());
        let (socket, events) = (self.tftp_socket, self.events);
        tasks.spawn(async move {
            let config = TftpConfig::default();
            let served = tftp::run_with_events(socket, source, config, events, tftp_stop);
            ("tftp", served.await)
        });
        if let Some(adverts) = self.router_adverts {
            let ra_stop = stop.clone();
            tasks.spawn(async move {
                ("ipv6-ra", adverts.run(ra_stop).await.map_err(io::Error::other))
            });
        }

        let mut result = Ok(());
        while let Some(joined) = tasks.join_next().await {
            // Any loop returning before shutdown means its socket failed: stop the rest.
            stop.cancel();
            match joined {
                Ok((what, Err(source))) if result.is_ok() => {
                    result = Err(BootServiceError::Serve { what, source });
                }
                Ok(_) => {}
                Err(error) => tracing::error!(%error, "boot service task panicked"),
            }
        }
        if let Some(journal) = journal {
            close_journal(journal).await;
        }
        result
    }
}

/// Binds and runs; see [`BootService::bind`] and [`BootService::run`].
pub async fn run(
    config: BootServiceConfig,
    shutdown: CancellationToken,
) -> Result<(), BootServiceError> {
    BootService::bind(config).await?.run(shutdown).await
}

/// The lease journal flushes what is queued when closed; closing blocks on its writer thread.
async fn close_journal(journal: Arc<LeaseLog>) {
    match Arc::try_unwrap(journal) {
        Ok(journal) => {
            if tokio::task::spawn_blocking(move || journal.close()).await.is_err() {
                tracing::error!("closing the lease journal panicked");
            }
        }
        // Still shared (an ACK task holding it): dropping lets the writer finish on its own.
        Err(shared) => drop(shared),
    }
}

fn bind_dhcp(interface: &str) -> Result<UdpSocket, BootServiceError> {
    bind_udp(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, dhcp::SERVER_PORT), interface, "dhcp")
}

/// A UDP socket on `addr` that only sees `interface`, with SO_BROADCAST (DHCP replies to
/// clients without an address are broadcast) and SO_REUSEADDR (a restart must not wait).
fn bind_udp(
    addr: SocketAddrV4,
    interface: &str,
    what: &'static str,
) -> Result<UdpSocket, BootServiceError> {
    let bind = || -> io::Result<UdpSocket> {
        let socket = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))?;
        socket.bind_device(Some(interface.as_bytes()))?;
        socket.set_broadcast(true)?;
        socket.set_reuse_address(true)?;
        socket.set_nonblocking(true)?;
        socket.bind(&SocketAddr::V4(addr).into())?;
        UdpSocket::from_std(socket.into())
    };
    let socket = bind().map_err(|source| BootServiceError::Bind {
        what,
        addr,
        interface: interface.to_owned(),
        source,
    })?;
    // A stable line, like the API's `listening on http://... (api)`.
    println!("listening on udp://{addr} ({what})");
    tracing::info!(%addr, interface, "{what} listening");
    Ok(socket)
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[tokio::test]
    async fn missing_tftp_root_is_a_clear_error() {
        let config = BootServiceConfig {
            interface: "lo".into(),
            address: Ipv4Addr::LOCALHOST,
            dhcp: DhcpSetting::Off,
            tftp_root: PathBuf::from("/nonexistent/ctpf-tftp-root"),
            boot: BootConfig::standard(Ipv4Addr::LOCALHOST, 7480),
            ipv6_router_adverts: false,
            tftp_artifacts: None,
            events: BootEvents::off(),
        };
        let error = BootService::bind(config).await.unwrap_err();
        assert!(error.to_string().contains("/nonexistent/ctpf-tftp-root"), "{error}");
    }
}
