//! Media keys: reusable across machines, one host per machine, scoped to their datacenter,
//! counted, expiring and revocable; on the embedded store and on Redis (a real redis-server).

#![allow(clippy::unwrap_used)] // Tests fail loudly by design.

use std::{sync::Arc, time::Duration};

use ctpf_bus::{BusConfig, MemoryBus};
use ctpf_common::{
    Arch, EventBody, HostReport, MacAddr, MediaKeySecret, Name, NewDatacenter, NewMediaKey,
};
use ctpf_e2e::RedisServer;
use ctpf_registries::{Filter, Registry, RegistryError};
use ctpf_store::state::{RedbStateStore, RedisStateStore, StateStore};

fn name(s: &str) -> Name {
    s.parse().unwrap()
}

fn machine(mac: &str, uuid: Option<&str>) -> HostReport {
    HostReport {
        macs: vec![mac.parse::<MacAddr>().unwrap()],
        smbios_uuid: uuid.map(|u| u.parse().unwrap()),
        arch: Arch::X86_64,
        addresses: Vec::new(),
        inventory: Default::default(),
    }
}

fn new_key(key: &str, dc: &str, ttl_seconds: u64) -> NewMediaKey {
    NewMediaKey { name: name(key), datacenter: name(dc), ttl_seconds }
}

async fn registry(state: Arc<dyn StateStore>) -> Registry {
    let reg = Registry::new(state, Arc::new(MemoryBus::new(BusConfig::default())));
    for dc in ["home", "lab"] {
        reg.create_datacenter(NewDatacenter {
            name: name(dc),
            tags: Default::default(),
            dhcp: Default::default(),
        })
        .await
        .unwrap();
    }
    reg
}

fn forbidden(result: Result<impl std::fmt::Debug, RegistryError>, reason: &str) {
    match result {
        Err(RegistryError::Forbidden(r)) => assert!(r.contains(reason), "{r:?} lacks {reason:?}"),
        other => panic!("expected Forbidden({reason}), got {other:?}"),
    }
}

/// The whole life of a media key against one state store.
async fn media_key_contract(state: Arc<dyn StateStore>) {
    let reg = registry(state).await;
    let usb = reg.create_media_key(new_key("usb", "lab", 3600)).await.unwrap();
    let secret = usb.secret.expose().to_owned();
    assert!(secret.starts_with("ctpf_mk_") && secret.len() == 72);
    assert_eq!((usb.key.enrollments, usb.key.revoked_at), (0, None));

    // Retrievable: showing it again gives the same secret (byte-reproducible media).
    assert_eq!(reg.media_key(&name("usb")).await.unwrap().secret, usb.secret);

    // Reusable across machines, one identity each; the hosts land in the key's datacenter.
    let uuid = "4c4c4544-0042-3510-8051-b3c04f333231";
    let (a, new_a) = reg.enroll(&secret, machine("52:54:00:00:00:01", Some(uuid))).await.unwrap();
    let (b, new_b) = reg.enroll(&secret, machine("52:54:00:00:00:02", None)).await.unwrap();
    assert!(new_a && new_b);
    assert_ne!(a.id, b.id);
    assert_eq!((a.datacenter.as_str(), b.datacenter.as_str()), ("lab", "lab"));
    assert_eq!(a.media_key, Some(name("usb")));

    // The same machine again (same UUID, another NIC up) stays one host.
    let (again, new) = reg.enroll(&secret, machine("52:54:00:00:00:03", Some(uuid))).await.unwrap();
    assert!(!new);
    assert_eq!(again.id, a.id);
    let lab = Filter { datacenter: Some(name("lab")), ..Filter::default() };
    assert_eq!(reg.hosts(&lab).await.unwrap().len(), 2);
    assert!(
        reg.hosts(&Filter { datacenter: Some(name("home")), ..lab.clone() })
            .await
            .unwrap()
            .is_empty()
    );

    // Every enrollment counted, the same machine twice too.
    let shown = reg.media_key(&name("usb")).await.unwrap().key;
    assert_eq!(shown.enrollments, 3);
    assert!(shown.last_used_at.is_some());

    // Concurrent enrollments lose no counts (compare-and-swap on the key).
    let mut racers = Vec::new();
    for i in 0..8 {
        let (reg, secret) = (reg.clone(), secret.clone());
        let mac = format!("52:54:00:00:01:{i:02x}");
        racers.push(tokio::spawn(async move { reg.enroll(&secret, machine(&mac, None)).await }));
    }
    for r in racers {
        assert!(r.await.unwrap().unwrap().1);
    }
    assert_eq!(reg.media_key(&name("usb")).await.unwrap().key.enrollments, 11);
    assert_eq!(reg.hosts(&lab).await.unwrap().len(), 10);

    // Unknown and malformed secrets, and one-time-token look-alikes, are refused.
    let unknown = MediaKeySecret::from_bytes([7; 32]);
    forbidden(
        reg.enroll(unknown.expose(), machine("52:54:00:00:02:01", None)).await,
        "unknown media key",
    );
    forbidden(
        reg.enroll("ctpf_mk_nothex", machine("52:54:00:00:02:01", None)).await,
        "unknown media key",
    );
    // One hex digit off (never the same digit: a secret may end in '0').
    let last = if secret.ends_with('0') { '1' } else { '0' };
    let almost = format!("{}{last}", &secret[..secret.len() - 1]);
    forbidden(reg.check_enrollment(&almost).await, "unknown media key");
    assert_eq!(reg.check_enrollment(&secret).await.unwrap(), name("lab"));

    // Names are unique; a key needs an existing datacenter and a bounded TTL.
    assert!(matches!(
        reg.create_media_key(new_key("usb", "home", 60)).await,
        Err(RegistryError::AlreadyExists { kind: "media key", .. })
    ));
    assert!(matches!(
        reg.create_media_key(new_key("other", "nowhere", 60)).await,
        Err(RegistryError::NotFound { kind: "datacenter", .. })
    ));
    assert!(matches!(
        reg.create_media_key(new_key("other", "home", 0)).await,
        Err(RegistryError::Invalid(e)) if e.field == "ttl_seconds"
    ));

    // Listing: no secrets, filtered by datacenter, sorted by name.
    let home = reg.create_media_key(new_key("iso", "home", 3600)).await.unwrap();
    let all = reg.media_keys(None).await.unwrap();
    assert_eq!(all.iter().map(|k| k.name.as_str()).collect::<Vec<_>>(), ["iso", "usb"]);
    let only_home = reg.media_keys(Some(&name("home"))).await.unwrap();
    assert_eq!(only_home, std::slice::from_ref(&home.key));

    // Revocation: refused from then on, idempotent, one event.
    let revoked = reg.revoke_media_key(&name("usb")).await.unwrap();
    assert!(revoked.revoked_at.is_some());
    assert_eq!(reg.revoke_media_key(&name("usb")).await.unwrap(), revoked);
    forbidden(
        reg.enroll(&secret, machine("52:54:00:00:02:02", None)).await,
        "media key usb is revoked",
    );
    // A known machine is refused too: the key is what is checked, not the machine.
    forbidden(reg.enroll(&secret, machine("52:54:00:00:00:01", Some(uuid))).await, "revoked");
    assert_eq!(reg.media_key(&name("usb")).await.unwrap().key.enrollments, 11);
    assert!(matches!(
        reg.revoke_media_key(&name("nope")).await,
        Err(RegistryError::NotFound { kind: "media key", .. })
    ));

    // Deleting its datacenter ends a key, even when a datacenter of that name comes back.
    let home_secret = home.secret.expose().to_owned();
    reg.enroll(&home_secret, machine("52:54:00:00:03:01", None)).await.unwrap();
    reg.delete_datacenter(&name("home"), true).await.unwrap();
    forbidden(reg.enroll(&home_secret, machine("52:54:00:00:03:02", None)).await, "is gone");
    reg.create_datacenter(NewDatacenter {
        name: name("home"),
        tags: Default::default(),
        dhcp: Default::default(),
    })
    .await
    .unwrap();
    forbidden(reg.enroll(&home_secret, machine("52:54:00:00:03:02", None)).await, "is gone");

    // The event log names keys, never secrets.
    let (events, _) = reg.events(0, 10_000, &Filter::default()).await.unwrap();
    let created = events.iter().filter(|e| matches!(e.body, EventBody::MediaKeyCreated { .. }));
    assert_eq!(created.count(), 2);
    let revokes = events.iter().filter(|e| matches!(e.body, EventBody::MediaKeyRevoked { .. }));
    assert_eq!(revokes.count(), 1);
    let with_key = events
        .iter()
        .filter(|e| {
            matches!(&e.body, EventBody::HostEnrolled { media_key: Some(k), .. } if k.as_str() == "usb")
        })
        .count();
    assert_eq!(with_key, 11);
    let log = serde_json::to_string(&events).unwrap();
    assert!(!log.contains(&secret) && !log.contains(&home_secret));
    assert!(!log.contains(&secret["ctpf_mk_".len()..]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn media_keys_on_the_embedded_store() {
    let dir = tempfile::tempdir().unwrap();
    media_key_contract(Arc::new(RedbStateStore::open(&dir.path().join("s.redb")).unwrap())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn media_keys_on_redis() {
    let server = RedisServer::start().unwrap();
    media_key_contract(Arc::new(RedisStateStore::connect(&server.url(), "ctpf").await.unwrap()))
        .await;
}

#[tokio::test]
async fn expired_media_keys_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let reg = registry(Arc::new(RedbStateStore::open(&dir.path().join("s.redb")).unwrap())).await;
    let key = reg.create_media_key(new_key("short", "home", 1)).await.unwrap();
    let secret = key.secret.expose();
    reg.enroll(secret, machine("52:54:00:00:00:01", None)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    forbidden(
        reg.enroll(secret, machine("52:54:00:00:00:02", None)).await,
        "media key short expired",
    );
    forbidden(reg.check_enrollment(secret).await, "expired");
    assert_eq!(reg.media_key(&name("short")).await.unwrap().key.enrollments, 1);
}

/// One-time tokens keep working beside media keys, and neither passes for the other.
#[tokio::test]
async fn one_time_tokens_and_media_keys_stay_apart() {
    let dir = tempfile::tempdir().unwrap();
    let reg = registry(Arc::new(RedbStateStore::open(&dir.path().join("s.redb")).unwrap())).await;
    let (token, _) =
        reg.issue_enrollment_token(&name("home"), Duration::from_secs(60), 1).await.unwrap();
    let (host, _) = reg.enroll(&token, machine("52:54:00:00:00:01", None)).await.unwrap();
    assert_eq!(host.media_key, None);
    // A media key's secret is no API token, and a token with the media prefix is no key.
    let key = reg.create_media_key(new_key("usb", "home", 60)).await.unwrap();
    assert!(reg.verify_token(key.secret.expose()).await.unwrap().is_none());
    let fake = format!("ctpf_mk_{}", &token["ctpf_".len()..]);
    forbidden(reg.enroll(&fake, machine("52:54:00:00:00:02", None)).await, "unknown media key");
}
