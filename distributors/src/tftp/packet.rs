//! TFTP packets (RFC 1350) with options (RFC 2347): parsing and encoding only.
//!
//! Parsing never panics and never indexes: every read goes through `split_first`/`get`
//! style accessors, so a truncated or hostile datagram becomes a [`PacketError`].

use bytes::{BufMut, Bytes, BytesMut};
use thiserror::Error;

/// Opcodes (RFC 1350, RFC 2347).
const OP_RRQ: u16 = 1;
const OP_WRQ: u16 = 2;
const OP_DATA: u16 = 3;
const OP_ACK: u16 = 4;
const OP_ERROR: u16 = 5;
const OP_OACK: u16 = 6;

/// TFTP error codes (RFC 1350 + RFC 2347 code 8).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    NotDefined,
    FileNotFound,
    AccessViolation,
    DiskFull,
    IllegalOperation,
    UnknownTransferId,
    FileExists,
    NoSuchUser,
    OptionNegotiation,
    /// A code outside the RFCs, kept so a client's error can be logged as sent.
    Other(u16),
}

impl ErrorCode {
    pub fn from_u16(code: u16) -> Self {
        match code {
            0 => Self::NotDefined,
            1 => Self::FileNotFound,
            2 => Self::AccessViolation,
            3 => Self::DiskFull,
            4 => Self::IllegalOperation,
            5 => Self::UnknownTransferId,
            6 => Self::FileExists,
            7 => Self::NoSuchUser,
            8 => Self::OptionNegotiation,
            other => Self::Other(other),
        }
    }

    pub fn as_u16(self) -> u16 {
        match self {
            Self::NotDefined => 0,
            Self::FileNotFound => 1,
            Self::AccessViolation => 2,
            Self::DiskFull => 3,
            Self::IllegalOperation => 4,
            Self::UnknownTransferId => 5,
            Self::FileExists => 6,
            Self::NoSuchUser => 7,
            Self::OptionNegotiation => 8,
            Self::Other(code) => code,
        }
    }
}

/// Transfer mode of a request. Only `Octet` is served (see `session::decide`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Netascii,
    Octet,
    Mail,
}

/// An option from a request or OACK. Names are lower-cased at parse time because RFC 2347
/// makes them case-insensitive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TftpOption {
    pub name: String,
    pub value: String,
}

impl TftpOption {
    pub fn new(name: impl Into<String>, value: impl Into<String>) -> Self {
        Self { name: name.into(), value: value.into() }
    }
}

/// A read or write request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub filename: String,
    pub mode: Mode,
    pub options: Vec<TftpOption>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Packet {
    Rrq(Request),
    Wrq(Request),
    Data { block: u16, data: Bytes },
    Ack { block: u16 },
    Error { code: ErrorCode, message: String },
    Oack { options: Vec<TftpOption> },
}

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum PacketError {
    #[error("packet too short: {0} bytes")]
    TooShort(usize),
    #[error("unknown opcode {0}")]
    UnknownOpcode(u16),
    #[error("{0} is not NUL-terminated")]
    Unterminated(&'static str),
    #[error("{0} is not valid UTF-8")]
    InvalidUtf8(&'static str),
    #[error("empty filename")]
    EmptyFilename,
    #[error("unknown transfer mode {0:?}")]
    UnknownMode(String),
    #[error("option {0:?} has no value")]
    OptionWithoutValue(String),
    #[error("{0} trailing bytes after the packet")]
    TrailingBytes(usize),
}

impl Packet {
    pub fn parse(datagram: &[u8]) -> Result<Self, PacketError> {
        let (opcode, body) = split_u16(datagram).ok_or(PacketError::TooShort(datagram.len()))?;
        match opcode {
            OP_RRQ => parse_request(body).map(Packet::Rrq),
            OP_WRQ => parse_request(body).map(Packet::Wrq),
            OP_DATA => {
                let (block, data) = split_u16(body).ok_or(PacketError::TooShort(datagram.len()))?;
                Ok(Packet::Data { block, data: Bytes::copy_from_slice(data) })
            }
            OP_ACK => {
                let (block, rest) = split_u16(body).ok_or(PacketError::TooShort(datagram.len()))?;
                if !rest.is_empty() {
                    return Err(PacketError::TrailingBytes(rest.len()));
                }
                Ok(Packet::Ack { block })
            }
            OP_ERROR => {
                let (code, rest) = split_u16(body).ok_or(PacketError::TooShort(datagram.len()))?;
                // Messages are only logged, so be lenient: lossy UTF-8, and some clients omit
                // the final NUL.
                let (message, rest) = match rest.iter().position(|&byte| byte == 0) {
                    Some(nul) => rest.split_at(nul),
                    None => (rest, &[0u8][..]),
                };
                if rest.len() > 1 {
                    return Err(PacketError::TrailingBytes(rest.len() - 1));
                }
                let message = String::from_utf8_lossy(message).into_owned();
                Ok(Packet::Error { code: ErrorCode::from_u16(code), message })
            }
            OP_OACK => Ok(Packet::Oack { options: parse_options(body)? }),
            other => Err(PacketError::UnknownOpcode(other)),
        }
    }

    pub fn encode(&self) -> Bytes {
        let mut out = BytesMut::new();
        self.encode_into(&mut out);
        out.freeze()
    }

    /// Appends the encoded packet to `out`; with a reused buffer, sending allocates nothing.
    pub fn encode_into(&self, out: &mut impl BufMut) {
        match self {
            Packet::Rrq(request) => encode_request(out, OP_RRQ, request),
            Packet::Wrq(request) => encode_request(out, OP_WRQ, request),
            Packet::Data { block, data } => {
                out.put_u16(OP_DATA);
                out.put_u16(*block);
                out.put_slice(data);
            }
            Packet::Ack { block } => {
                out.put_u16(OP_ACK);
                out.put_u16(*block);
            }
            Packet::Error { code, message } => {
                out.put_u16(OP_ERROR);
                out.put_u16(code.as_u16());
                put_cstr(out, message);
            }
            Packet::Oack { options } => {
                out.put_u16(OP_OACK);
                put_options(out, options);
            }
        }
    }

    pub fn error(code: ErrorCode, message: impl Into<String>) -> Self {
        Packet::Error { code, message: message.into() }
    }
}

fn parse_request(body: &[u8]) -> Result<Request, PacketError> {
    let (filename, rest) = split_cstr(body, "filename")?;
    if filename.is_empty() {
        return Err(PacketError::EmptyFilename);
    }
    let (mode, rest) = split_cstr(rest, "mode")?;
    let mode = match mode.to_ascii_lowercase().as_str() {
        "netascii" => Mode::Netascii,
        "octet" => Mode::Octet,
        "mail" => Mode::Mail,
        _ => return Err(PacketError::UnknownMode(mode)),
    };
    Ok(Request { filename, mode, options: parse_options(rest)? })
}

fn parse_options(mut rest: &[u8]) -> Result<Vec<TftpOption>, PacketError> {
    let mut options = Vec::new();
    while !rest.is_empty() {
        let (name, after_name) = split_cstr(rest, "option name")?;
        let (value, after_value) = match split_cstr(after_name, "option value") {
            Ok(parts) => parts,
            Err(PacketError::Unterminated(_)) => {
                return Err(PacketError::OptionWithoutValue(name));
            }
            Err(other) => return Err(other),
        };
        options.push(TftpOption { name: name.to_ascii_lowercase(), value });
        rest = after_value;
    }
    Ok(options)
}

fn encode_request(out: &mut impl BufMut, opcode: u16, request: &Request) {
    out.put_u16(opcode);
    put_cstr(out, &request.filename);
    put_cstr(
        out,
        match request.mode {
            Mode::Netascii => "netascii",
            Mode::Octet => "octet",
            Mode::Mail => "mail",
        },
    );
    put_options(out, &request.options);
}

fn put_options(out: &mut impl BufMut, options: &[TftpOption]) {
    for option in options {
        put_cstr(out, &option.name);
        put_cstr(out, &option.value);
    }
}

/// Writes `text` NUL-terminated; an embedded NUL would end the string early on the wire,
/// so such bytes are dropped rather than producing a packet that parses differently.
fn put_cstr(out: &mut impl BufMut, text: &str) {
    for byte in text.bytes().filter(|&byte| byte != 0) {
        out.put_u8(byte);
    }
    out.put_u8(0);
}

fn split_u16(bytes: &[u8]) -> Option<(u16, &[u8])> {
    let (&high, rest) = bytes.split_first()?;
    let (&low, rest) = rest.split_first()?;
    Some((u16::from_be_bytes([high, low]), rest))
}

fn split_cstr<'a>(bytes: &'a [u8], what: &'static str) -> Result<(String, &'a [u8]), PacketError> {
    let nul = bytes.iter().position(|&byte| byte == 0).ok_or(PacketError::Unterminated(what))?;
    let (text, rest) = bytes.split_at(nul);
    let rest = rest.get(1..).unwrap_or_default();
    let text = std::str::from_utf8(text).map_err(|_| PacketError::InvalidUtf8(what))?;
    Ok((text.to_owned(), rest))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn parses_rrq_with_options() {
        let bytes = b"\x00\x01pxelinux.0\x00octet\x00BLKSIZE\x001468\x00tsize\x000\x00";
        let packet = Packet::parse(bytes).unwrap();
        assert_eq!(
            packet,
            Packet::Rrq(Request {
                filename: "pxelinux.0".into(),
                mode: Mode::Octet,
                options: vec![TftpOption::new("blksize", "1468"), TftpOption::new("tsize", "0"),],
            })
        );
    }

    #[test]
    fn parses_rrq_without_options_and_mode_case_insensitively() {
        let packet = Packet::parse(b"\x00\x01/ipxe.efi\x00OCTET\x00").unwrap();
        assert_eq!(
            packet,
            Packet::Rrq(Request {
                filename: "/ipxe.efi".into(),
                mode: Mode::Octet,
                options: vec![],
            })
        );
        let Packet::Rrq(request) = Packet::parse(b"\x00\x01f\x00netascii\x00").unwrap() else {
            panic!("not an RRQ");
        };
        assert_eq!(request.mode, Mode::Netascii);
    }

    #[test]
    fn parses_wrq_data_ack_error_oack() {
        assert!(matches!(Packet::parse(b"\x00\x02up\x00octet\x00").unwrap(), Packet::Wrq(_)));
        assert_eq!(
            Packet::parse(b"\x00\x03\xff\xffabc").unwrap(),
            Packet::Data { block: 65535, data: Bytes::from_static(b"abc") }
        );
        assert_eq!(
            Packet::parse(b"\x00\x03\x00\x07").unwrap(),
            Packet::Data { block: 7, data: Bytes::new() }
        );
        assert_eq!(Packet::parse(b"\x00\x04\x01\x02").unwrap(), Packet::Ack { block: 0x0102 });
        assert_eq!(
            Packet::parse(b"\x00\x05\x00\x08tsize only\x00").unwrap(),
            Packet::error(ErrorCode::OptionNegotiation, "tsize only")
        );
        assert_eq!(
            Packet::parse(b"\x00\x05\x00\x01no nul").unwrap(),
            Packet::error(ErrorCode::FileNotFound, "no nul")
        );
        assert_eq!(
            Packet::parse(b"\x00\x06blksize\x00512\x00").unwrap(),
            Packet::Oack { options: vec![TftpOption::new("blksize", "512")] }
        );
    }

    #[test]
    fn encodes_byte_exact() {
        assert_eq!(&Packet::Ack { block: 258 }.encode()[..], b"\x00\x04\x01\x02");
        assert_eq!(
            &Packet::Data { block: 1, data: Bytes::from_static(b"hi") }.encode()[..],
            b"\x00\x03\x00\x01hi"
        );
        assert_eq!(
            &Packet::error(ErrorCode::AccessViolation, "no").encode()[..],
            b"\x00\x05\x00\x02no\x00"
        );
        assert_eq!(
            &Packet::Oack {
                options: vec![TftpOption::new("blksize", "1468"), TftpOption::new("tsize", "42")]
            }
            .encode()[..],
            b"\x00\x06blksize\x001468\x00tsize\x0042\x00"
        );
        assert_eq!(
            &Packet::Rrq(Request {
                filename: "a/b".into(),
                mode: Mode::Octet,
                options: vec![TftpOption::new("windowsize", "16")],
            })
            .encode()[..],
            b"\x00\x01a/b\x00octet\x00windowsize\x0016\x00"
        );
    }

    #[test]
    fn encoding_drops_embedded_nul() {
        let encoded = Packet::error(ErrorCode::NotDefined, "a\0b").encode();
        assert_eq!(&encoded[..], b"\x00\x05\x00\x00ab\x00");
    }

    #[test]
    fn round_trips() {
        let packets = [
            Packet::Rrq(Request {
                filename: "bios/undionly.kpxe".into(),
                mode: Mode::Octet,
                options: vec![TftpOption::new("tsize", "0")],
            }),
            Packet::Wrq(Request { filename: "x".into(), mode: Mode::Netascii, options: vec![] }),
            Packet::Data { block: 9, data: Bytes::from_static(&[0, 1, 2, 0]) },
            Packet::Ack { block: 0 },
            Packet::error(ErrorCode::Other(99), "weird"),
            Packet::Oack { options: vec![] },
        ];
        for packet in packets {
            assert_eq!(Packet::parse(&packet.encode()).unwrap(), packet);
        }
    }

    #[test]
    fn rejects_malformed_packets_with_typed_errors() {
        let cases: &[(&[u8], PacketError)] = &[
            (b"", PacketError::TooShort(0)),
            (b"\x00", PacketError::TooShort(1)),
            (b"\x00\x04\x00", PacketError::TooShort(3)),
            (b"\x00\x03\x01", PacketError::TooShort(3)),
            (b"\x00\x04\x00\x01\x00", PacketError::TrailingBytes(1)),
            (b"\x00\x09", PacketError::UnknownOpcode(9)),
            (b"\x00\x01", PacketError::Unterminated("filename")),
            (b"\x00\x01\x00octet\x00", PacketError::EmptyFilename),
            (b"\x00\x01file", PacketError::Unterminated("filename")),
            (b"\x00\x01file\x00octet", PacketError::Unterminated("mode")),
            (b"\x00\x01file\x00binary\x00", PacketError::UnknownMode("binary".into())),
            (
                b"\x00\x01file\x00octet\x00blksize\x00",
                PacketError::OptionWithoutValue("blksize".into()),
            ),
            (
                b"\x00\x01file\x00octet\x00blksize\x00512",
                PacketError::OptionWithoutValue("blksize".into()),
            ),
            (b"\x00\x01\xff\xfe\x00octet\x00", PacketError::InvalidUtf8("filename")),
            (b"\x00\x05\x00\x01a\x00b", PacketError::TrailingBytes(1)),
        ];
        for (bytes, expected) in cases {
            assert_eq!(Packet::parse(bytes).as_ref(), Err(expected), "{bytes:?}");
        }
    }

    /// Every prefix of valid packets, and pseudo-random garbage, must parse or fail cleanly.
    #[test]
    fn truncations_and_garbage_never_panic() {
        let valid: &[&[u8]] = &[
            b"\x00\x01pxelinux.0\x00octet\x00blksize\x001468\x00tsize\x000\x00",
            b"\x00\x05\x00\x02message\x00",
            b"\x00\x06windowsize\x0016\x00",
            b"\x00\x03\x00\x01data",
        ];
        for packet in valid {
            for end in 0..=packet.len() {
                let _ = Packet::parse(packet.get(..end).unwrap());
            }
        }
        // xorshift: deterministic, no extra crate.
        let mut state: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for _ in 0..20_000 {
            let len = usize::try_from(next() % 64).unwrap();
            let mut bytes: Vec<u8> = (0..len).map(|_| (next() % 256) as u8).collect();
            // Bias towards valid opcodes and NULs so the deeper parsers get exercised.
            if let Some(first) = bytes.first_mut() {
                *first = 0;
            }
            if let Some(second) = bytes.get_mut(1) {
                *second %= 8;
            }
            for byte in bytes.iter_mut().skip(2) {
                if *byte % 5 == 0 {
                    *byte = 0;
                }
            }
            if let Ok(packet) = Packet::parse(&bytes) {
                // Whatever parses must re-encode to something that parses the same way.
                assert_eq!(Packet::parse(&packet.encode()).unwrap(), packet);
            }
        }
    }
}
