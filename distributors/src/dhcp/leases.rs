//! The address book of authoritative mode: a pure, in-memory lease table. Time is always a
//! parameter (seconds since the Unix epoch) so tests need no clock and a restored table
//! behaves the same as the one that was saved.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use ctpf_common::MacAddr;

/// Seconds since the Unix epoch.
pub type Seconds = u64;

/// How the pool is configured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolConfig {
    /// First address handed out dynamically.
    pub first: Ipv4Addr,
    /// Last address handed out dynamically (inclusive).
    pub last: Ipv4Addr,
    /// Length of a binding.
    pub lease_secs: u32,
    /// How long an offered address stays held for the client that was offered it.
    pub offer_hold_secs: u32,
    /// How long a declined address (someone else answers ARP for it) stays out of use.
    pub decline_secs: u32,
    /// MAC -> address; the address is never offered or bound to any other MAC.
    pub reservations: BTreeMap<MacAddr, Ipv4Addr>,
}

/// A binding, plain data so the caller can persist it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lease {
    pub mac: MacAddr,
    pub ip: Ipv4Addr,
    /// The binding ends at this instant (exclusive).
    pub expires: Seconds,
}

/// What the table knows about one address. Plain data for persistence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Entry {
    Offered { mac: MacAddr, until: Seconds },
    Bound(Lease),
    Declined { until: Seconds },
}

impl Entry {
    fn until(&self) -> Seconds {
        match self {
            Entry::Offered { until, .. } | Entry::Declined { until } => *until,
            Entry::Bound(lease) => lease.expires,
        }
    }

    fn mac(&self) -> Option<MacAddr> {
        match self {
            Entry::Offered { mac, .. } => Some(*mac),
            Entry::Bound(lease) => Some(lease.mac),
            Entry::Declined { .. } => None,
        }
    }

    fn live(&self, now: Seconds) -> bool {
        now < self.until()
    }
}

/// Why a REQUEST is refused (the server answers DHCPNAK).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Nak {
    #[error("{0} is outside the pool")]
    OutOfRange(Ipv4Addr),
    #[error("{0} is reserved for another machine")]
    ReservedForOther(Ipv4Addr),
    #[error("{0} is in use by another machine")]
    InUse(Ipv4Addr),
    #[error("{0} was declined recently")]
    Declined(Ipv4Addr),
}

/// What the DHCP logic needs from the table for one request (see `decide::lease_query`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaseQuery {
    Offer {
        mac: MacAddr,
    },
    Request {
        mac: MacAddr,
        ip: Ipv4Addr,
    },
    Decline {
        mac: MacAddr,
        ip: Ipv4Addr,
    },
    Release {
        mac: MacAddr,
        ip: Ipv4Addr,
    },
    /// A REQUEST naming another server: the client declined our offer.
    OtherServerChosen {
        mac: MacAddr,
    },
}

/// The table's answer, which `decide::decide` turns into OFFER, ACK or NAK.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaseAnswer {
    Offer { ip: Ipv4Addr, lease_secs: u32 },
    Ack { ip: Ipv4Addr, lease_secs: u32 },
    Nak,
}

/// In-memory lease table. Invariant: an address has at most one entry, a MAC holds at most
/// one offered or bound address, and a reserved address only ever goes to its MAC.
#[derive(Debug, Clone)]
pub struct LeaseTable {
    config: PoolConfig,
    /// Reverse of `config.reservations`.
    reserved: BTreeMap<Ipv4Addr, MacAddr>,
    entries: BTreeMap<Ipv4Addr, Entry>,
    /// MAC -> the address of its entry (possibly expired; `entries` is the truth).
    by_mac: BTreeMap<MacAddr, Ipv4Addr>,
    /// Where the search for a free address starts: just after the last address handed out
    /// from the range (next fit, like Kea's iterative allocator). Starting from the bottom
    /// each time would make every new client scan past all the bindings before it, which is
    /// quadratic in the number of clients.
    next: u32,
}

impl LeaseTable {
    pub fn new(config: PoolConfig) -> Self {
        let reserved = config.reservations.iter().map(|(mac, ip)| (*ip, *mac)).collect();
        let next = u32::from(config.first);
        Self { config, reserved, entries: BTreeMap::new(), by_mac: BTreeMap::new(), next }
    }

    /// Rebuilds a table from persisted entries (see `lease_log::restore_table`). Entries that would
    /// break the invariants (a reserved address held by someone else, a second address for
    /// one MAC) are dropped rather than trusted.
    pub fn restore(
        config: PoolConfig,
        entries: impl IntoIterator<Item = (Ipv4Addr, Entry)>,
    ) -> Self {
        let mut table = Self::new(config);
        for (ip, entry) in entries {
            if let Some(mac) = entry.mac()
                && (table.reserved_for_other(ip, mac) || table.by_mac.contains_key(&mac))
            {
                continue;
            }
            table.put(ip, entry);
        }
        table
    }

    pub fn config(&self) -> &PoolConfig {
        &self.config
    }

    /// All entries, for persistence and inspection.
    pub fn entries(&self) -> impl Iterator<Item = (Ipv4Addr, Entry)> + '_ {
        self.entries.iter().map(|(ip, e)| (*ip, *e))
    }

    /// The entry of `ip`, live or not.
    pub fn entry(&self, ip: Ipv4Addr) -> Option<Entry> {
        self.entries.get(&ip).copied()
    }

    /// The live binding of `mac`, if any.
    pub fn lease_of(&self, mac: MacAddr, now: Seconds) -> Option<Lease> {
        let ip = self.by_mac.get(&mac)?;
        match self.entries.get(ip) {
            Some(Entry::Bound(lease)) if lease.mac == mac && now < lease.expires => Some(*lease),
            _ => None,
        }
    }

    /// Proposes an address for `mac` and holds it for `offer_hold_secs`. The same MAC asking
    /// again gets the same address; its reservation wins over everything.
    pub fn offer(&mut self, mac: MacAddr, now: Seconds) -> Option<Ipv4Addr> {
        let ip = self.candidate(mac, now)?;
        if self.in_range(ip) {
            self.next = u32::from(ip).saturating_add(1);
        }
        let hold_until = now.saturating_add(u64::from(self.config.offer_hold_secs));
        match self.entries.get_mut(&ip) {
            // Already bound to this MAC: the offer must neither shorten the binding nor lapse
            // before the hold does, or the REQUEST that follows could find it given away.
            Some(Entry::Bound(lease)) if lease.mac == mac && lease.live(now) => {
                lease.expires = lease.expires.max(hold_until);
            }
            _ => self.put(ip, Entry::Offered { mac, until: hold_until }),
        }
        Some(ip)
    }

    /// Binds (or renews) `ip` for `mac`.
    pub fn request(&mut self, mac: MacAddr, ip: Ipv4Addr, now: Seconds) -> Result<Lease, Nak> {
        if self.reserved_for_other(ip, mac) {
            return Err(Nak::ReservedForOther(ip));
        }
        let is_reservation = self.config.reservations.get(&mac) == Some(&ip);
        if !is_reservation && !self.in_range(ip) {
            return Err(Nak::OutOfRange(ip));
        }
        if let Some(entry) = self.entries.get(&ip)
            && entry.live(now)
        {
            match entry.mac() {
                None => return Err(Nak::Declined(ip)),
                Some(holder) if holder != mac => return Err(Nak::InUse(ip)),
                Some(_) => {}
            }
        }
        // A MAC with a reservation gets that address and no other.
        if let Some(own) = self.config.reservations.get(&mac)
            && *own != ip
        {
            return Err(Nak::ReservedForOther(ip));
        }
        let lease =
            Lease { mac, ip, expires: now.saturating_add(u64::from(self.config.lease_secs)) };
        self.put(ip, Entry::Bound(lease));
        Ok(lease)
    }

    /// The client found `ip` in use on the wire: keep it out of circulation for a while.
    /// Ignored unless the address is free or was `mac`'s, so nobody can decline others' leases.
    pub fn decline(&mut self, mac: MacAddr, ip: Ipv4Addr, now: Seconds) {
        if self.reserved_for_other(ip, mac)
            || !(self.in_range(ip) || self.reserved.contains_key(&ip))
        {
            return;
        }
        if let Some(entry) = self.entries.get(&ip)
            && entry.live(now)
            && entry.mac().is_some_and(|holder| holder != mac)
        {
            return;
        }
        let until = now.saturating_add(u64::from(self.config.decline_secs));
        self.put(ip, Entry::Declined { until });
    }

    /// The client gives `ip` back.
    pub fn release(&mut self, mac: MacAddr, ip: Ipv4Addr) {
        if self.entries.get(&ip).and_then(Entry::mac) == Some(mac) {
            self.clear(ip);
        }
    }

    /// The client took another server's offer: drop our pending offer (RFC 2131 4.3.2).
    pub fn forget_offer(&mut self, mac: MacAddr) {
        if let Some(ip) = self.by_mac.get(&mac).copied()
            && matches!(self.entries.get(&ip), Some(Entry::Offered { mac: m, .. }) if *m == mac)
        {
            self.clear(ip);
        }
    }

    /// Removes everything that has run out and returns the bindings that expired, so the
    /// caller can log or persist them. Lookups already treat stale entries as free; this
    /// only keeps memory bounded.
    pub fn expire(&mut self, now: Seconds) -> Vec<Lease> {
        let stale: Vec<Ipv4Addr> =
            self.entries.iter().filter(|(_, e)| !e.live(now)).map(|(ip, _)| *ip).collect();
        let mut expired = Vec::new();
        for ip in stale {
            if let Some(Entry::Bound(lease)) = self.clear(ip) {
                expired.push(lease);
            }
        }
        expired
    }

    /// Applies a query and says how to answer; None means no reply (DECLINE, RELEASE, an
    /// exhausted pool, another server chosen).
    pub fn answer(&mut self, query: LeaseQuery, now: Seconds) -> Option<LeaseAnswer> {
        match query {
            LeaseQuery::Offer { mac } => {
                let ip = self.offer(mac, now)?;
                // What the ACK will grant, even for a client renewing an existing binding.
                Some(LeaseAnswer::Offer { ip, lease_secs: self.config.lease_secs })
            }
            LeaseQuery::Request { mac, ip } => match self.request(mac, ip, now) {
                Ok(lease) => {
                    Some(LeaseAnswer::Ack { ip: lease.ip, lease_secs: self.config.lease_secs })
                }
                Err(nak) => {
                    tracing::debug!(%mac, %nak, "DHCPNAK");
                    Some(LeaseAnswer::Nak)
                }
            },
            LeaseQuery::Decline { mac, ip } => {
                tracing::info!(%mac, %ip, "client declined address (in use on the wire?)");
                self.decline(mac, ip, now);
                None
            }
            LeaseQuery::Release { mac, ip } => {
                self.release(mac, ip);
                None
            }
            LeaseQuery::OtherServerChosen { mac } => {
                self.forget_offer(mac);
                None
            }
        }
    }

    /// The address `mac` should be offered: its reservation, its current or last address if
    /// still free, else the first free address at or after `next`, wrapping around once.
    fn candidate(&self, mac: MacAddr, now: Seconds) -> Option<Ipv4Addr> {
        if let Some(ip) = self.config.reservations.get(&mac) {
            return match self.entries.get(ip) {
                Some(Entry::Declined { until }) if now < *until => None,
                _ => Some(*ip),
            };
        }
        if let Some(ip) = self.by_mac.get(&mac)
            && self.in_range(*ip)
            && self.free_for(*ip, mac, now)
        {
            return Some(*ip);
        }
        let (first, last) = (u32::from(self.config.first), u32::from(self.config.last));
        let start = if (first..=last).contains(&self.next) { self.next } else { first };
        (start..=last)
            .chain(first..start)
            .map(Ipv4Addr::from)
            .find(|ip| self.free_for(*ip, mac, now))
    }

    /// Not reserved for someone else, and no live entry of another MAC or a decline on it.
    fn free_for(&self, ip: Ipv4Addr, mac: MacAddr, now: Seconds) -> bool {
        if self.reserved_for_other(ip, mac) {
            return false;
        }
        match self.entries.get(&ip) {
            Some(entry) if entry.live(now) => entry.mac() == Some(mac),
            _ => true,
        }
    }

    fn reserved_for_other(&self, ip: Ipv4Addr, mac: MacAddr) -> bool {
        self.reserved.get(&ip).is_some_and(|owner| *owner != mac)
    }

    fn in_range(&self, ip: Ipv4Addr) -> bool {
        (u32::from(self.config.first)..=u32::from(self.config.last)).contains(&u32::from(ip))
    }

    /// Sets the entry of `ip`, keeping `by_mac` consistent: the previous holder of `ip` loses
    /// it, and the new holder's previous address (if any) is freed.
    fn put(&mut self, ip: Ipv4Addr, entry: Entry) {
        self.clear(ip);
        if let Some(mac) = entry.mac() {
            if let Some(old) = self.by_mac.get(&mac).copied() {
                self.clear(old);
            }
            self.by_mac.insert(mac, ip);
        }
        self.entries.insert(ip, entry);
    }

    fn clear(&mut self, ip: Ipv4Addr) -> Option<Entry> {
        let entry = self.entries.remove(&ip)?;
        if let Some(mac) = entry.mac()
            && self.by_mac.get(&mac) == Some(&ip)
        {
            self.by_mac.remove(&mac);
        }
        Some(entry)
    }

    /// Internal consistency, for tests.
    #[cfg(test)]
    fn check_consistency(&self) {
        for (mac, ip) in &self.by_mac {
            assert_eq!(
                self.entries.get(ip).and_then(Entry::mac),
                Some(*mac),
                "by_mac {mac} -> {ip}"
            );
        }
        for (ip, entry) in &self.entries {
            if let Some(mac) = entry.mac() {
                assert_eq!(self.by_mac.get(&mac), Some(ip), "entry {ip} of {mac} not indexed");
                assert!(!self.reserved_for_other(*ip, mac), "{ip} reserved but held by {mac}");
            }
        }
    }
}

impl Lease {
    fn live(&self, now: Seconds) -> bool {
        now < self.expires
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mac(n: u8) -> MacAddr {
        MacAddr::new([0x52, 0x54, 0, 0, 0, n])
    }

    fn ip(n: u8) -> Ipv4Addr {
        Ipv4Addr::new(10, 77, 0, n)
    }

    fn config() -> PoolConfig {
        PoolConfig {
            first: ip(100),
            last: ip(103),
            lease_secs: 600,
            offer_hold_secs: 30,
            decline_secs: 300,
            reservations: BTreeMap::from([(mac(50), ip(101)), (mac(51), ip(10))]),
        }
    }

    #[test]
    fn allocation_continues_after_the_last_address_and_wraps() {
        let mut t = LeaseTable::new(config());
        assert_eq!(t.offer(mac(1), 0), Some(ip(100)));
        assert_eq!(t.offer(mac(2), 0), Some(ip(102)));
        t.forget_offer(mac(1));
        // Next fit: the freed 100 waits until the search wraps around.
        assert_eq!(t.offer(mac(3), 0), Some(ip(103)));
        assert_eq!(t.offer(mac(4), 0), Some(ip(100)));
        assert_eq!(t.offer(mac(5), 0), None);
        t.check_consistency();
    }

    #[test]
    fn offer_is_sticky_and_skips_reservations() {
        let mut t = LeaseTable::new(config());
        assert_eq!(t.offer(mac(1), 0), Some(ip(100)));
        assert_eq!(t.offer(mac(1), 5), Some(ip(100)));
        // 101 is reserved for mac 50.
        assert_eq!(t.offer(mac(2), 5), Some(ip(102)));
        assert_eq!(t.offer(mac(50), 5), Some(ip(101)));
        assert_eq!(t.offer(mac(51), 5), Some(ip(10)));
        assert_eq!(t.offer(mac(3), 5), Some(ip(103)));
        // Pool exhausted while the offers are held...
        assert_eq!(t.offer(mac(4), 6), None);
        // ...and usable again once they lapse (mac 1's hold ended at 30).
        assert_eq!(t.offer(mac(4), 40), Some(ip(100)));
        t.check_consistency();
    }

    #[test]
    fn request_binds_renews_and_naks() {
        let mut t = LeaseTable::new(config());
        let offered = t.offer(mac(1), 0).unwrap();
        let lease = t.request(mac(1), offered, 1).unwrap();
        assert_eq!(lease.expires, 601);
        assert_eq!(t.request(mac(1), offered, 300).unwrap().expires, 900);
        assert_eq!(t.request(mac(2), offered, 301), Err(Nak::InUse(offered)));
        assert_eq!(t.request(mac(2), ip(101), 301), Err(Nak::ReservedForOther(ip(101))));
        assert_eq!(t.request(mac(2), ip(200), 301), Err(Nak::OutOfRange(ip(200))));
        assert_eq!(t.request(mac(50), ip(102), 301), Err(Nak::ReservedForOther(ip(102))));
        assert!(t.request(mac(51), ip(10), 301).is_ok());
        // Another MAC may take it once the binding has run out.
        assert!(t.request(mac(2), offered, 900).is_ok());
        assert_eq!(t.lease_of(mac(1), 900), None);
        t.check_consistency();
    }

    #[test]
    fn re_offer_does_not_shorten_a_binding() {
        let mut t = LeaseTable::new(config());
        let ip = t.offer(mac(1), 0).unwrap();
        t.request(mac(1), ip, 0).unwrap();
        assert_eq!(t.offer(mac(1), 10), Some(ip));
        assert_eq!(t.lease_of(mac(1), 100).map(|l| l.expires), Some(600));
    }

    #[test]
    fn decline_and_release() {
        let mut t = LeaseTable::new(config());
        let a = t.offer(mac(1), 0).unwrap();
        t.decline(mac(1), a, 0);
        assert_ne!(t.offer(mac(1), 1), Some(a));
        assert_eq!(t.request(mac(3), a, 2), Err(Nak::Declined(a)));
        // Somebody else's binding cannot be declined or released away.
        let b = t.offer(mac(2), 3).unwrap();
        t.request(mac(2), b, 3).unwrap();
        t.decline(mac(9), b, 4);
        t.release(mac(9), b);
        assert_eq!(t.lease_of(mac(2), 5).map(|l| l.ip), Some(b));
        t.release(mac(2), b);
        assert_eq!(t.lease_of(mac(2), 5), None);
        // The declined address returns after decline_secs.
        assert!(t.request(mac(3), a, 300).is_ok());
        t.check_consistency();
    }

    #[test]
    fn expire_returns_bindings() {
        let mut t = LeaseTable::new(config());
        let a = t.offer(mac(1), 0).unwrap();
        t.request(mac(1), a, 0).unwrap();
        t.offer(mac(2), 0).unwrap();
        assert!(t.expire(599).is_empty());
        assert_eq!(t.expire(600), vec![Lease { mac: mac(1), ip: a, expires: 600 }]);
        assert_eq!(t.entries().count(), 0);
        t.check_consistency();
    }

    #[test]
    fn restore_drops_conflicting_entries() {
        let good = Lease { mac: mac(1), ip: ip(100), expires: 600 };
        let entries = vec![
            (ip(100), Entry::Bound(good)),
            // A second address for the same MAC.
            (ip(102), Entry::Bound(Lease { mac: mac(1), ip: ip(102), expires: 600 })),
            // A reserved address held by a stranger.
            (ip(101), Entry::Offered { mac: mac(7), until: 600 }),
        ];
        let t = LeaseTable::restore(config(), entries);
        assert_eq!(t.entries().collect::<Vec<_>>(), vec![(ip(100), Entry::Bound(good))]);
        t.check_consistency();
    }

    /// Tiny deterministic PRNG so the random walk needs no extra crates.
    struct XorShift(u64);

    impl XorShift {
        fn next(&mut self) -> u64 {
            let mut x = self.0;
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            self.0 = x;
            x
        }

        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }

    /// Random walk over offer/request/decline/release/forget/expire with a small pool and
    /// more clients than addresses. A model of what was handed out checks that no address is
    /// ever held by two MACs at once and reservations never go to others.
    #[test]
    fn random_walk_never_double_allocates() {
        for seed in 1..=40u64 {
            let mut rng = XorShift(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
            let mut t = LeaseTable::new(config());
            // mac -> (ip, until) for what the table told each client it holds.
            let mut granted: BTreeMap<MacAddr, (Ipv4Addr, Seconds)> = BTreeMap::new();
            let mut now: Seconds = 1_000;
            let check_grant = |granted: &BTreeMap<MacAddr, (Ipv4Addr, Seconds)>,
                               m: MacAddr,
                               a: Ipv4Addr,
                               now: Seconds| {
                for (other, (oip, until)) in granted {
                    assert!(
                        *other == m || *oip != a || now >= *until,
                        "seed {seed}: {a} given to {m} while {other} holds it until {until} (now {now})"
                    );
                }
                if let Some(owner) = t_reserved_owner(a) {
                    assert_eq!(owner, m, "seed {seed}: reserved {a} given to {m}");
                }
            };
            for _ in 0..3_000 {
                let m = match rng.below(10) {
                    0 => mac(50),
                    1 => mac(51),
                    n => mac(n as u8),
                };
                let any_ip = ip(98 + rng.below(8) as u8);
                match rng.below(8) {
                    0 | 1 => {
                        if let Some(a) = t.offer(m, now) {
                            check_grant(&granted, m, a, now);
                            let until = t.lease_of(m, now).map_or(now + 30, |l| l.expires);
                            assert!(
                                until >= now + 30,
                                "seed {seed}: offer to {m} held too briefly"
                            );
                            granted.insert(m, (a, until));
                        }
                    }
                    2 | 3 => {
                        // Mostly the address this client was offered, sometimes any address.
                        let want = match granted.get(&m) {
                            Some((a, _)) if rng.below(4) != 0 => *a,
                            _ => any_ip,
                        };
                        if let Ok(lease) = t.request(m, want, now) {
                            check_grant(&granted, m, lease.ip, now);
                            granted.insert(m, (lease.ip, lease.expires));
                        }
                    }
                    4 => {
                        let a = granted.get(&m).map_or(any_ip, |(a, _)| *a);
                        t.decline(m, a, now);
                        if granted.get(&m).is_some_and(|(g, _)| *g == a) {
                            granted.remove(&m);
                        }
                    }
                    5 => {
                        let a = granted.get(&m).map_or(any_ip, |(a, _)| *a);
                        t.release(m, a);
                        if granted.get(&m).is_some_and(|(g, _)| *g == a) {
                            granted.remove(&m);
                        }
                    }
                    6 => {
                        now += rng.below(200);
                        if rng.below(4) == 0 {
                            t.expire(now);
                        }
                    }
                    _ => {
                        // Only a pending offer is dropped; a live binding stays.
                        t.forget_offer(m);
                        if t.lease_of(m, now).is_none() {
                            granted.remove(&m);
                        }
                    }
                }
                t.check_consistency();
                // The table itself never shows two MACs on one live address.
                let mut seen = BTreeMap::new();
                for (a, e) in t.entries() {
                    if let Some(holder) = e.mac()
                        && e.live(now)
                    {
                        assert!(
                            seen.insert(holder, a).is_none(),
                            "seed {seed}: {holder} holds two"
                        );
                    }
                }
            }
        }
    }

    fn t_reserved_owner(a: Ipv4Addr) -> Option<MacAddr> {
        config().reservations.into_iter().find(|(_, r)| *r == a).map(|(m, _)| m)
    }
}
