//! A datacenter's boot network: its DHCP settings and reservations. Both go into the
//! datacenter's snapshot, which its distributors serve.

use ctpf_common::{
    Artifact, ArtifactKind, ArtifactName, Datacenter, DatacenterPatch, EventBody, MacAddr, Name,
    NewEvent, ParseError, Reservation,
};
use ctpf_store::state::{Commit, Precondition, StateError, Table, Write};

use crate::{Registry, RegistryError, encode};

fn kind_name(kind: ArtifactKind) -> String {
    serde_json::to_value(kind).ok().and_then(|v| v.as_str().map(str::to_owned)).unwrap_or_default()
}

fn reservation_key(datacenter: &Name, mac: MacAddr) -> String {
    format!("{datacenter}/{mac}")
}

fn reserved_ip_key(datacenter: &Name, ip: std::net::Ipv4Addr) -> String {
    format!("{datacenter}/{ip}")
}

impl Registry {
    /// Replaces a datacenter's tags, DHCP settings and/or PXE bundle (which must be a stored
    /// `pxe_bundle` artifact).
    pub async fn update_datacenter(
        &self,
        name: &Name,
        patch: DatacenterPatch,
    ) -> Result<Datacenter, RegistryError> {
        if let Some(dhcp) = &patch.dhcp {
            dhcp.validate()?;
        }
        if let Some(Some(bundle)) = &patch.pxe_bundle {
            self.expect_artifact("pxe_bundle", bundle, ArtifactKind::PxeBundle).await?;
        }
        for (arch, choice) in patch.discovery.iter().flatten() {
            for (name, kind) in
                [(&choice.kernel, ArtifactKind::Kernel), (&choice.initrd, ArtifactKind::Initrd)]
            {
                self.expect_artifact(&format!("discovery.{arch}"), name, kind).await?;
            }
        }
        loop {
            let Some((mut dc, version)) =
                self.get::<Datacenter>(Table::Datacenters, name.as_str()).await?
            else {
                return Err(RegistryError::NotFound { kind: "datacenter", id: name.to_string() });
            };
            if let Some(tags) = &patch.tags {
                dc.tags = tags.clone();
            }
            if let Some(dhcp) = &patch.dhcp {
                dc.dhcp = dhcp.clone();
            }
            if let Some(bundle) = &patch.pxe_bundle {
                dc.pxe_bundle = bundle.clone();
            }
            if let Some(discovery) = &patch.discovery {
                dc.discovery = discovery.clone();
            }
            let commit = Commit::new()
                .write(Write::put(
                    Table::Datacenters,
                    name.as_str(),
                    encode(&dc)?,
                    Precondition::Version(version),
                ))
                .event(NewEvent::new(
                    Some(name.clone()),
                    EventBody::DatacenterUpdated { name: name.clone() },
                ));
            match self.state.commit(commit).await {
                Ok(_) => return Ok(dc),
                Err(StateError::Conflict { .. }) => continue,
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Refuses `name` unless it is a stored artifact of `kind`; `field` names the setting.
    async fn expect_artifact(
        &self,
        field: &str,
        name: &ArtifactName,
        kind: ArtifactKind,
    ) -> Result<(), RegistryError> {
        match self.get::<Artifact>(Table::Artifacts, name.as_str()).await? {
            Some((artifact, _)) if artifact.kind == kind => Ok(()),
            Some((artifact, _)) => Err(RegistryError::Invalid(ParseError::new(
                field,
                name.as_str(),
                format!(
                    "artifact is of kind {}, not {}",
                    kind_name(artifact.kind),
                    kind_name(kind)
                ),
            ))),
            None => Err(RegistryError::NotFound { kind: "artifact", id: name.to_string() }),
        }
    }

    /// Reserves `reservation.ip` for `reservation.mac` in `datacenter`. A MAC has one
    /// reservation per datacenter and an address one MAC: both are claimed in one commit, so
    /// two racing reservations cannot take the same address.
    pub async fn add_reservation(
        &self,
        datacenter: &Name,
        reservation: Reservation,
    ) -> Result<Reservation, RegistryError> {
        let Some((_, dc_version)) =
            self.get::<Datacenter>(Table::Datacenters, datacenter.as_str()).await?
        else {
            return Err(RegistryError::NotFound { kind: "datacenter", id: datacenter.to_string() });
        };
        let ip = reservation.ip;
        if ip.is_unspecified() || ip.is_broadcast() || ip.is_multicast() || ip.is_loopback() {
            return Err(ParseError::new("ip", ip.to_string(), "not an address to lease").into());
        }
        let key = reservation_key(datacenter, reservation.mac);
        let event = NewEvent::new(
            Some(datacenter.clone()),
            EventBody::ReservationAdded { mac: reservation.mac, ip },
        );
        let commit = Commit::new()
            .write(Write::check(
                Table::Datacenters,
                datacenter.as_str(),
                Precondition::Version(dc_version),
            ))
            .write(Write::put(
                Table::Reservations,
                &key,
                encode(&reservation)?,
                Precondition::Absent,
            ))
            .write(Write::put(
                Table::ReservedIps,
                reserved_ip_key(datacenter, ip),
                reservation.mac.to_string().into_bytes(),
                Precondition::Absent,
            ))
            .event(event);
        match self.state.commit(commit).await {
            Ok(_) => Ok(reservation),
            Err(StateError::Conflict { .. }) => {
                let taken_by =
                    self.state.get(Table::ReservedIps, &reserved_ip_key(datacenter, ip)).await?;
                Err(RegistryError::AlreadyExists {
                    kind: "reservation",
                    id: match taken_by {
                        Some(mac) => {
                            format!("{ip} (reserved for {})", String::from_utf8_lossy(&mac.value))
                        }
                        None => format!("{} in {datacenter}", reservation.mac),
                    },
                })
            }
            Err(e) => Err(e.into()),
        }
    }

    pub async fn remove_reservation(
        &self,
        datacenter: &Name,
        mac: MacAddr,
    ) -> Result<(), RegistryError> {
        let key = reservation_key(datacenter, mac);
        let Some((reservation, version)) =
            self.get::<Reservation>(Table::Reservations, &key).await?
        else {
            return Err(RegistryError::NotFound { kind: "reservation", id: key });
        };
        let commit = Commit::new()
            .write(Write::delete(Table::Reservations, &key, Precondition::Version(version)))
            .write(Write::delete(
                Table::ReservedIps,
                reserved_ip_key(datacenter, reservation.ip),
                Precondition::Any,
            ))
            .event(NewEvent::new(Some(datacenter.clone()), EventBody::ReservationRemoved { mac }));
        self.state.commit(commit).await?;
        Ok(())
    }

    /// `datacenter`'s reservations, by MAC.
    pub async fn reservations(&self, datacenter: &Name) -> Result<Vec<Reservation>, RegistryError> {
        let prefix = format!("{datacenter}/");
        let mut list = Vec::new();
        for (key, record) in self.state.list(Table::Reservations).await? {
            if key.starts_with(&prefix) {
                list.push(crate::decode::<Reservation>(Table::Reservations, &key, &record)?);
            }
        }
        list.sort_by_key(|r| r.mac);
        Ok(list)
    }

    /// Adds the removal of `datacenter`'s reservations to `commit` (its forced deletion).
    pub(crate) async fn reservation_removals(
        &self,
        mut commit: Commit,
        datacenter: &Name,
    ) -> Result<Commit, RegistryError> {
        for reservation in self.reservations(datacenter).await? {
            commit = commit
                .write(Write::delete(
                    Table::Reservations,
                    reservation_key(datacenter, reservation.mac),
                    Precondition::Any,
                ))
                .write(Write::delete(
                    Table::ReservedIps,
                    reserved_ip_key(datacenter, reservation.ip),
                    Precondition::Any,
                ));
        }
        Ok(commit)
    }
}
