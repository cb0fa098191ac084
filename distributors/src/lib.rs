//! Distributors: the per-datacenter worker. It takes jobs from the bus and serves network
//! boot on its site: DHCP/proxyDHCP ([`dhcp`]) and TFTP ([`tftp`]) today; HTTP boot, DNS,
//! SSH, WireGuard and k3s distributors join it in later steps.

pub mod boot_events;
pub mod boot_service;
pub mod bundle;
pub mod dhcp;
pub mod heartbeat;
pub mod jobs;
pub mod router_advert;
pub mod site;
pub mod tftp;
