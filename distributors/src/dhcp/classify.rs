//! Who is asking: PXE firmware, UEFI HTTP boot, iPXE or an ordinary DHCP client, on which
//! architecture, with which MAC and SMBIOS UUID.

use std::fmt;

use ctpf_common::MacAddr;
use dhcproto::v4::{DhcpOption, HType, Message, MessageType, Opcode, OptionCode};

/// iPXE marks its requests with this option (its "feature indicator" space).
const IPXE_ENCAP_OPTION: u8 = 175;

/// Client system architecture from option 93 (RFC 4578 and the IANA registry).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ClientArch {
    /// 0: legacy BIOS x86 PXE.
    BiosX86,
    /// 6: UEFI IA32.
    EfiIa32,
    /// 7 and 9: UEFI x86-64 (9 is what some firmware calls "EFI BC").
    EfiX64,
    /// 11: UEFI arm64.
    EfiArm64,
    /// 16: UEFI x86-64 HTTP boot.
    EfiX64Http,
    /// 19: UEFI arm64 HTTP boot.
    EfiArm64Http,
    /// Anything else; kept so the log can say what arrived.
    Unknown(u16),
}

impl ClientArch {
    pub fn from_code(code: u16) -> Self {
        match code {
            0 => Self::BiosX86,
            6 => Self::EfiIa32,
            7 | 9 => Self::EfiX64,
            11 => Self::EfiArm64,
            16 => Self::EfiX64Http,
            19 => Self::EfiArm64Http,
            other => Self::Unknown(other),
        }
    }

    /// True for the architecture types that mean "UEFI HTTP boot".
    pub fn is_http(self) -> bool {
        matches!(self, Self::EfiX64Http | Self::EfiArm64Http)
    }
}

/// The client GUID from option 97: the machine's SMBIOS UUID as its firmware stores it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ClientUuid(pub [u8; 16]);

impl fmt::Display for ClientUuid {
    /// Printed like `dmidecode -s system-uuid`: the first three fields are little-endian in
    /// SMBIOS, so the same machine has the same text whether we learn it here or from an agent.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        write!(
            f,
            "{:02x}{:02x}{:02x}{:02x}-{:02x}{:02x}-{:02x}{:02x}-{:02x}{:02x}-{:02x}{:02x}{:02x}{:02x}{:02x}{:02x}",
            b[3],
            b[2],
            b[1],
            b[0],
            b[5],
            b[4],
            b[7],
            b[6],
            b[8],
            b[9],
            b[10],
            b[11],
            b[12],
            b[13],
            b[14],
            b[15]
        )
    }
}

/// What a request tells us about its sender.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientInfo {
    pub message_type: MessageType,
    /// Only for Ethernet (htype 1, hlen 6); other link types have no MAC we can key on.
    pub mac: Option<MacAddr>,
    /// Option 60 starts with `PXEClient`.
    pub pxe: bool,
    /// Option 60 starts with `HTTPClient`, or the architecture is an HTTP boot type.
    pub http: bool,
    /// iPXE: option 77 contains "iPXE" or option 175 is present.
    pub ipxe: bool,
    /// From option 93, or failing that from the `:Arch:NNNNN` part of option 60.
    pub arch: Option<ClientArch>,
    pub uuid: Option<ClientUuid>,
}

impl ClientInfo {
    /// Whether this client wants to network boot at all (the only ones proxyDHCP answers).
    pub fn is_boot_client(&self) -> bool {
        self.pxe || self.http || self.ipxe
    }
}

/// Why a datagram is not a request we can reason about.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Reject {
    #[error("not a BOOTREQUEST")]
    NotRequest,
    #[error("no DHCP message type (plain BOOTP is not served)")]
    NoMessageType,
    #[error("hardware address length {0} is larger than chaddr")]
    BadHardwareLength(u8),
}

/// Classifies a decoded request. Never panics, whatever the message holds.
pub fn classify(msg: &Message) -> Result<ClientInfo, Reject> {
    if msg.opcode() != Opcode::BootRequest {
        return Err(Reject::NotRequest);
    }
    // dhcproto slices chaddr by hlen and would panic past 16.
    if msg.hlen() > 16 {
        return Err(Reject::BadHardwareLength(msg.hlen()));
    }
    let message_type = msg.opts().msg_type().ok_or(Reject::NoMessageType)?;

    let mac = if msg.htype() == HType::Eth && msg.hlen() == 6 {
        let c = msg.chaddr();
        Some(MacAddr::new([c[0], c[1], c[2], c[3], c[4], c[5]]))
    } else {
        None
    };

    let vendor_class = match msg.opts().get(OptionCode::ClassIdentifier) {
        Some(DhcpOption::ClassIdentifier(v)) => v.as_slice(),
        _ => &[],
    };
    let pxe = vendor_class.starts_with(b"PXEClient");
    let http_class = vendor_class.starts_with(b"HTTPClient");

    let arch = match msg.opts().get(OptionCode::ClientSystemArchitecture) {
        Some(DhcpOption::ClientSystemArchitecture(a)) => Some(ClientArch::from_code(u16::from(*a))),
        _ => arch_from_vendor_class(vendor_class),
    };

    let user_class = match msg.opts().get(OptionCode::UserClass) {
        Some(DhcpOption::UserClass(v)) => v.as_slice(),
        _ => &[],
    };
    // iPXE sends the bare string rather than RFC 3004's length-prefixed list, so search.
    let ipxe = user_class.windows(4).any(|w| w == b"iPXE")
        || msg.opts().get(OptionCode::from(IPXE_ENCAP_OPTION)).is_some();

    let uuid = match msg.opts().get(OptionCode::ClientMachineIdentifier) {
        // RFC 4578: type 0 followed by the 16-byte GUID.
        Some(DhcpOption::ClientMachineIdentifier(v)) if v.len() == 17 && v[0] == 0 => {
            let mut id = [0u8; 16];
            id.copy_from_slice(&v[1..]);
            Some(ClientUuid(id))
        }
        Some(DhcpOption::ClientMachineIdentifier(v)) => {
            tracing::debug!(len = v.len(), "ignoring malformed client GUID (option 97)");
            None
        }
        _ => None,
    };

    Ok(ClientInfo {
        message_type,
        mac,
        pxe,
        http: http_class || arch.is_some_and(ClientArch::is_http),
        ipxe,
        arch,
        uuid,
    })
}

/// `PXEClient:Arch:00007:UNDI:003016` -> 7. Used only when option 93 is missing.
fn arch_from_vendor_class(vendor_class: &[u8]) -> Option<ClientArch> {
    let text = std::str::from_utf8(vendor_class).ok()?;
    let mut parts = text.split(':');
    parts.next()?;
    if parts.next()? != "Arch" {
        return None;
    }
    let code = parts.next()?;
    if code.len() != 5 {
        return None;
    }
    code.parse::<u16>().ok().map(ClientArch::from_code)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arch_codes() {
        assert_eq!(ClientArch::from_code(0), ClientArch::BiosX86);
        assert_eq!(ClientArch::from_code(7), ClientArch::EfiX64);
        assert_eq!(ClientArch::from_code(9), ClientArch::EfiX64);
        assert_eq!(ClientArch::from_code(11), ClientArch::EfiArm64);
        assert_eq!(ClientArch::from_code(16), ClientArch::EfiX64Http);
        assert_eq!(ClientArch::from_code(19), ClientArch::EfiArm64Http);
        assert_eq!(ClientArch::from_code(42), ClientArch::Unknown(42));
    }

    #[test]
    fn arch_from_class_text() {
        assert_eq!(
            arch_from_vendor_class(b"PXEClient:Arch:00007:UNDI:003016"),
            Some(ClientArch::EfiX64)
        );
        assert_eq!(
            arch_from_vendor_class(b"HTTPClient:Arch:00016:UNDI:003001"),
            Some(ClientArch::EfiX64Http)
        );
        assert_eq!(arch_from_vendor_class(b"PXEClient"), None);
        assert_eq!(arch_from_vendor_class(b"PXEClient:Arch:7"), None);
        assert_eq!(arch_from_vendor_class(b"MSFT 5.0"), None);
        assert_eq!(arch_from_vendor_class(&[0xff, 0xfe]), None);
    }

    #[test]
    fn uuid_prints_like_dmidecode() {
        let raw = [
            0x78, 0x56, 0x34, 0x12, 0x34, 0x12, 0x78, 0x56, 0x9a, 0xbc, 0xde, 0xf0, 0x12, 0x34,
            0x56, 0x78,
        ];
        assert_eq!(ClientUuid(raw).to_string(), "12345678-1234-5678-9abc-def012345678");
    }
}
