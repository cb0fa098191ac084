//! One identity per machine, even when registrations race: on the embedded store and on
//! Redis (a real redis-server).

#![allow(clippy::unwrap_used)] // Tests fail loudly by design.

use std::sync::Arc;

use ctpf_bus::{BusConfig, MemoryBus};
use ctpf_common::{MacAddr, NewDatacenter, NewHost, NewSshKey};
use ctpf_e2e::RedisServer;
use ctpf_registries::{Filter, Registry, RegistryError};
use ctpf_store::state::{RedbStateStore, RedisStateStore, StateStore};

const KEY: &str =
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl admin@laptop";

fn host(dc: &str, macs: &[&str], uuid: Option<&str>) -> NewHost {
    NewHost {
        datacenter: dc.parse().unwrap(),
        hostname: None,
        macs: macs.iter().map(|m| m.parse::<MacAddr>().unwrap()).collect(),
        smbios_uuid: uuid.map(|u| u.parse().unwrap()),
        arch: None,
        addresses: Vec::new(),
        labels: Default::default(),
    }
}

async fn identity_contract(state: Arc<dyn StateStore>) {
    let reg = Registry::new(state, Arc::new(MemoryBus::new(BusConfig::default())));
    reg.create_datacenter(NewDatacenter {
        name: "home".parse().unwrap(),
        tags: Default::default(),
        dhcp: Default::default(),
    })
    .await
    .unwrap();

    // Eight registrations of the same machine at once: exactly one wins.
    let mut racers = Vec::new();
    for i in 0..8 {
        let reg = reg.clone();
        let extra = format!("52:54:00:00:01:{i:02x}");
        racers.push(tokio::spawn(async move {
            reg.create_host(host("home", &["52:54:00:00:00:01", &extra], None)).await
        }));
    }
    let mut won = 0;
    for r in racers {
        match r.await.unwrap() {
            Ok(_) => won += 1,
            Err(RegistryError::AlreadyExists { id, .. }) => assert_eq!(id, "52:54:00:00:00:01"),
            Err(e) => panic!("{e}"),
        }
    }
    assert_eq!(won, 1);
    assert_eq!(reg.hosts(&Filter::default()).await.unwrap().len(), 1);

    // Different machines registering at once all get in (they only race on the datacenter).
    let mut racers = Vec::new();
    for i in 0..8 {
        let reg = reg.clone();
        let mac = format!("52:54:00:00:02:{i:02x}");
        racers
            .push(tokio::spawn(async move { reg.create_host(host("home", &[&mac], None)).await }));
    }
    for r in racers {
        r.await.unwrap().unwrap();
    }
    assert_eq!(reg.hosts(&Filter::default()).await.unwrap().len(), 9);

    // The SMBIOS UUID is an identity too.
    let uuid = "4c4c4544-0042-3510-8051-b3c04f333231";
    let first = reg.create_host(host("home", &["52:54:00:00:03:01"], Some(uuid))).await.unwrap();
    let again = reg.create_host(host("home", &["52:54:00:00:03:02"], Some(uuid))).await;
    assert!(matches!(
        again,
        Err(RegistryError::AlreadyExists { kind: "host with SMBIOS UUID", .. })
    ));
    // The failed attempt claimed nothing: its MAC is still free.
    reg.create_host(host("home", &["52:54:00:00:03:02"], None)).await.unwrap();

    // Deleting a host frees its identity.
    reg.delete_host(first.id).await.unwrap();
    reg.create_host(host("home", &["52:54:00:00:03:01"], Some(uuid))).await.unwrap();
    assert!(matches!(reg.delete_host(first.id).await, Err(RegistryError::NotFound { .. })));

    // A forced datacenter delete takes its hosts and scoped keys, and frees the identities.
    let key = NewSshKey {
        name: "admin".parse().unwrap(),
        public_key: KEY.parse().unwrap(),
        datacenter: Some("home".parse().unwrap()),
        tags: Default::default(),
    };
    reg.add_key(key).await.unwrap();
    let dc = "home".parse().unwrap();
    assert!(matches!(reg.delete_datacenter(&dc, false).await, Err(RegistryError::Refused(_))));
    reg.delete_datacenter(&dc, true).await.unwrap();
    assert!(reg.hosts(&Filter::default()).await.unwrap().is_empty());
    assert!(reg.keys(&Filter::default()).await.unwrap().is_empty());
    assert!(matches!(
        reg.create_host(host("home", &["52:54:00:00:00:01"], None)).await,
        Err(RegistryError::NotFound { kind: "datacenter", .. })
    ));
    reg.create_datacenter(NewDatacenter {
        name: "home".parse().unwrap(),
        tags: Default::default(),
        dhcp: Default::default(),
    })
    .await
    .unwrap();
    reg.create_host(host("home", &["52:54:00:00:00:01"], Some(uuid))).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn identities_hold_on_the_embedded_store() {
    let dir = tempfile::tempdir().unwrap();
    identity_contract(Arc::new(RedbStateStore::open(&dir.path().join("s.redb")).unwrap())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn identities_hold_on_redis() {
    let server = RedisServer::start().unwrap();
    identity_contract(Arc::new(RedisStateStore::connect(&server.url(), "ctpf").await.unwrap()))
        .await;
}
