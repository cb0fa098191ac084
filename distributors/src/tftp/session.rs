//! The protocol decisions of the server, without sockets or clocks: which requests to serve,
//! option negotiation (RFC 2347/2348/2349/7440), and the sending side of one read transfer.
//!
//! The caller (see `server.rs`) drives a [`Transfer`] like this:
//! 1. while [`Transfer::wants_block`], read the next `blksize` bytes of the file and
//!    [`Transfer::supply_block`] them (a short block ends the file);
//! 2. send every packet of [`Transfer::take_transmission`];
//! 3. wait for a packet ([`Transfer::on_packet`]) or the retransmission timeout
//!    ([`Transfer::on_timeout`]), and act on the returned [`Step`].

use std::collections::VecDeque;
use std::time::Duration;

use bytes::Bytes;

use super::TftpConfig;
use super::packet::{ErrorCode, Mode, Packet, TftpOption};

/// RFC 2348 bounds for blksize.
pub const MIN_BLKSIZE: u16 = 8;
pub const MAX_BLKSIZE: u16 = 65464;
/// RFC 1350 block size, used when the client does not negotiate one.
pub const DEFAULT_BLKSIZE: u16 = 512;

/// What to do with a datagram received on the server's main port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RequestDecision {
    /// Serve this file, negotiating these options once its size is known.
    Read { filename: String, options: Vec<TftpOption> },
    /// Answer with this ERROR and do nothing else.
    Refuse(Packet),
    /// Not a request (stray DATA/ACK/...): drop it silently.
    Ignore,
}

/// Only octet-mode reads are served. Netascii is refused rather than treated as octet:
/// silently sending binary to a client that asked for line-ending conversion would corrupt its
/// file, and boot ROMs always ask for octet, so nobody legitimate needs it.
pub fn decide(packet: Packet) -> RequestDecision {
    match packet {
        Packet::Rrq(request) => match request.mode {
            Mode::Octet => {
                RequestDecision::Read { filename: request.filename, options: request.options }
            }
            Mode::Netascii | Mode::Mail => RequestDecision::Refuse(Packet::error(
                ErrorCode::IllegalOperation,
                "only octet mode is supported",
            )),
        },
        Packet::Wrq(_) => {
            RequestDecision::Refuse(Packet::error(ErrorCode::AccessViolation, "read-only server"))
        }
        Packet::Data { .. } | Packet::Ack { .. } | Packet::Error { .. } | Packet::Oack { .. } => {
            RequestDecision::Ignore
        }
    }
}

/// The outcome of option negotiation for one read request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Negotiation {
    pub blksize: u16,
    pub windowsize: u16,
    /// Retransmission timeout.
    pub timeout: Duration,
    /// Accepted options in the client's order; empty means "send DATA 1, no OACK".
    pub oack: Vec<TftpOption>,
}

/// Negotiates the client's options against `config`. Unknown, malformed, out-of-range and
/// repeated options are left out of the OACK, which RFC 2347 defines as declining them.
pub fn negotiate(options: &[TftpOption], file_size: u64, config: &TftpConfig) -> Negotiation {
    let max_blksize = config.max_blksize.clamp(MIN_BLKSIZE, MAX_BLKSIZE);
    let max_windowsize = config.max_windowsize.max(1);
    let mut negotiation = Negotiation {
        blksize: DEFAULT_BLKSIZE.min(max_blksize),
        windowsize: 1,
        timeout: config.timeout,
        oack: Vec::new(),
    };
    let mut seen: Vec<&str> = Vec::new();
    for option in options {
        let name = option.name.as_str();
        if seen.contains(&name) {
            continue;
        }
        seen.push(name);
        let Some(value) = parse_decimal(&option.value) else {
            continue;
        };
        let accepted = match name {
            "blksize" if (u64::from(MIN_BLKSIZE)..=u64::from(MAX_BLKSIZE)).contains(&value) => {
                let blksize = u16::try_from(value).unwrap_or(MAX_BLKSIZE).min(max_blksize);
                negotiation.blksize = blksize;
                Some(blksize.to_string())
            }
            // The client sends 0 in an RRQ; the answer is the size we will send.
            "tsize" => Some(file_size.to_string()),
            "timeout" if (1..=255).contains(&value) => {
                negotiation.timeout = Duration::from_secs(value);
                Some(value.to_string())
            }
            "windowsize" if (1..=65535).contains(&value) => {
                let windowsize = u16::try_from(value).unwrap_or(u16::MAX).min(max_windowsize);
                negotiation.windowsize = windowsize;
                Some(windowsize.to_string())
            }
            _ => None,
        };
        if let Some(value) = accepted {
            negotiation.oack.push(TftpOption::new(name, value));
        }
    }
    negotiation
}

/// Plain ASCII digits only (no sign, no spaces); at most 20 digits so it cannot overflow
/// into a misleading value.
fn parse_decimal(text: &str) -> Option<u64> {
    if text.is_empty() || text.len() > 20 || !text.bytes().all(|byte| byte.is_ascii_digit()) {
        return None;
    }
    text.parse().ok()
}

/// What the caller does after feeding an event to a [`Transfer`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Refill, transmit whatever is pending, and wait again.
    Continue,
    /// The client acknowledged the last block.
    Complete,
    /// The client sent an ERROR: stop without answering.
    ClientError { code: ErrorCode, message: String },
    /// The client broke the protocol: send this ERROR and stop.
    Violation(Packet),
    /// No progress after all retries.
    GaveUp,
}

/// The sending side of one read transfer, with RFC 7440 windows.
///
/// Blocks are counted with an absolute `u64` index; only the wire uses the 16-bit number,
/// which rolls over from 65535 to 0. Only the blocks of the current window are held.
#[derive(Debug)]
pub struct Transfer {
    blksize: usize,
    windowsize: usize,
    max_retries: u32,
    retries_used: u32,
    /// The OACK until the client's ACK 0 confirms it.
    pending_oack: Option<Vec<TftpOption>>,
    /// Absolute index of the first block of `window`; block 1 is the first data block.
    first_unacked: u64,
    window: VecDeque<Bytes>,
    last_block_loaded: bool,
    transmit_pending: bool,
    acknowledged_bytes: u64,
}

impl Transfer {
    pub fn new(negotiation: &Negotiation, max_retries: u32) -> Self {
        Self {
            blksize: usize::from(negotiation.blksize),
            windowsize: usize::from(negotiation.windowsize.max(1)),
            max_retries,
            retries_used: 0,
            pending_oack: (!negotiation.oack.is_empty()).then(|| negotiation.oack.clone()),
            first_unacked: 1,
            window: VecDeque::new(),
            last_block_loaded: false,
            transmit_pending: true,
            acknowledged_bytes: 0,
        }
    }

    pub fn blksize(&self) -> usize {
        self.blksize
    }

    /// File bytes the client has acknowledged so far.
    pub fn acknowledged_bytes(&self) -> u64 {
        self.acknowledged_bytes
    }

    /// Whether the window has room for the next block of the file.
    pub fn wants_block(&self) -> bool {
        !self.last_block_loaded && self.window.len() < self.windowsize
    }

    /// The next `blksize` bytes of the file; fewer (possibly none) marks the last block.
    /// Longer input is cut to `blksize` so a caller bug cannot produce oversized packets.
    pub fn supply_block(&mut self, mut data: Bytes) {
        if self.last_block_loaded {
            return;
        }
        data.truncate(self.blksize);
        if data.len() < self.blksize {
            self.last_block_loaded = true;
        }
        self.window.push_back(data);
    }

    /// The packets to send now: the OACK, or the whole current window, or nothing.
    pub fn take_transmission(&mut self) -> Vec<Packet> {
        let mut packets = Vec::new();
        self.take_transmission_into(&mut packets);
        packets
    }

    /// [`Transfer::take_transmission`] into a reused vector (cleared first), so a transfer
    /// allocates nothing per window: DATA packets share the supplied blocks' bytes.
    pub fn take_transmission_into(&mut self, packets: &mut Vec<Packet>) {
        packets.clear();
        if !std::mem::take(&mut self.transmit_pending) {
            return;
        }
        if let Some(options) = &self.pending_oack {
            packets.push(Packet::Oack { options: options.clone() });
            return;
        }
        packets.extend(
            (self.first_unacked..)
                .zip(&self.window)
                .map(|(index, data)| Packet::Data { block: wire_block(index), data: data.clone() }),
        );
    }

    pub fn on_packet(&mut self, packet: Packet) -> Step {
        match packet {
            Packet::Ack { block } => self.on_ack(block),
            Packet::Error { code, message } => Step::ClientError { code, message },
            Packet::Rrq(_) | Packet::Wrq(_) | Packet::Data { .. } | Packet::Oack { .. } => {
                Step::Violation(Packet::error(
                    ErrorCode::IllegalOperation,
                    "only ACK or ERROR expected",
                ))
            }
        }
    }

    /// The retransmission timer expired without progress: resend, or give up.
    pub fn on_timeout(&mut self) -> Step {
        self.retries_used = self.retries_used.saturating_add(1);
        if self.retries_used > self.max_retries {
            return Step::GaveUp;
        }
        self.transmit_pending = true;
        Step::Continue
    }

    fn on_ack(&mut self, block: u16) -> Step {
        if self.pending_oack.is_some() {
            if block == 0 {
                self.pending_oack = None;
                self.made_progress();
            }
            return Step::Continue;
        }
        // Map the 16-bit number onto the window: 0 is the block before the window (a
        // duplicate), 1..=len are blocks inside it. Anything else is stale or bogus. Windows
        // hold at most 65535 blocks, so the mapping is unambiguous.
        let last_acked = self.first_unacked.wrapping_sub(1);
        let advance = usize::from(block.wrapping_sub(wire_block(last_acked)));
        if advance == 0 || advance > self.window.len() {
            // Duplicate ACKs are not answered, which avoids the Sorcerer's Apprentice
            // bug; the timer resends if the window really got lost.
            return Step::Continue;
        }
        for data in self.window.drain(..advance) {
            self.acknowledged_bytes = self.acknowledged_bytes.saturating_add(data.len() as u64);
        }
        self.first_unacked = self.first_unacked.saturating_add(advance as u64);
        if self.window.is_empty() && self.last_block_loaded {
            return Step::Complete;
        }
        // Either the whole window arrived (send the next) or the client acknowledged a block
        // inside it, meaning it lost the one after: RFC 7440 resends from there.
        self.made_progress();
        Step::Continue
    }

    fn made_progress(&mut self) {
        self.retries_used = 0;
        self.transmit_pending = true;
    }
}

/// The on-wire block number of an absolute block index (rolls over 65535 -> 0).
pub fn wire_block(index: u64) -> u16 {
    (index & 0xFFFF) as u16
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::tftp::packet::Request;

    fn config() -> TftpConfig {
        TftpConfig { max_blksize: 1468, max_windowsize: 64, ..TftpConfig::default() }
    }

    fn options(pairs: &[(&str, &str)]) -> Vec<TftpOption> {
        pairs.iter().map(|(name, value)| TftpOption::new(*name, *value)).collect()
    }

    #[test]
    fn decide_serves_octet_and_refuses_the_rest() {
        let rrq = |mode| {
            Packet::Rrq(Request {
                filename: "pxelinux.0".into(),
                mode,
                options: options(&[("tsize", "0")]),
            })
        };
        assert_eq!(
            decide(rrq(Mode::Octet)),
            RequestDecision::Read {
                filename: "pxelinux.0".into(),
                options: options(&[("tsize", "0")]),
            }
        );
        assert!(matches!(
            decide(rrq(Mode::Netascii)),
            RequestDecision::Refuse(Packet::Error { code: ErrorCode::IllegalOperation, .. })
        ));
        let wrq = Packet::Wrq(Request { filename: "x".into(), mode: Mode::Octet, options: vec![] });
        assert_eq!(
            decide(wrq),
            RequestDecision::Refuse(Packet::error(ErrorCode::AccessViolation, "read-only server"))
        );
        assert_eq!(decide(Packet::Ack { block: 1 }), RequestDecision::Ignore);
    }

    #[test]
    fn no_options_means_no_oack() {
        let negotiation = negotiate(&[], 100, &config());
        assert_eq!(negotiation.blksize, 512);
        assert_eq!(negotiation.windowsize, 1);
        assert_eq!(negotiation.timeout, config().timeout);
        assert!(negotiation.oack.is_empty());
        let mut transfer = Transfer::new(&negotiation, 3);
        transfer.supply_block(Bytes::from_static(b"hello"));
        assert_eq!(
            transfer.take_transmission(),
            vec![Packet::Data { block: 1, data: Bytes::from_static(b"hello") }]
        );
    }

    #[test]
    fn negotiation_clamps_answers_tsize_and_ignores_unknown() {
        let negotiation = negotiate(
            &options(&[
                ("blksize", "65464"),
                ("multicast", ""),
                ("tsize", "0"),
                ("timeout", "7"),
                ("windowsize", "65535"),
                ("blksize", "8"),
            ]),
            123_456,
            &config(),
        );
        assert_eq!(negotiation.blksize, 1468);
        assert_eq!(negotiation.windowsize, 64);
        assert_eq!(negotiation.timeout, Duration::from_secs(7));
        assert_eq!(
            negotiation.oack,
            options(&[
                ("blksize", "1468"),
                ("tsize", "123456"),
                ("timeout", "7"),
                ("windowsize", "64"),
            ])
        );
    }

    #[test]
    fn negotiation_accepts_in_range_values_and_declines_bad_ones() {
        let accepted =
            negotiate(&options(&[("blksize", "1024"), ("windowsize", "16")]), 0, &config());
        assert_eq!((accepted.blksize, accepted.windowsize), (1024, 16));
        assert_eq!(accepted.oack, options(&[("blksize", "1024"), ("windowsize", "16")]));

        let declined = negotiate(
            &options(&[
                ("blksize", "7"),
                ("blksize2", "9"),
                ("timeout", "0"),
                ("timeout", "256"),
                ("windowsize", "0"),
                ("windowsize", "+3"),
                ("tsize", "-1"),
                ("tsize", "99999999999999999999999"),
            ]),
            10,
            &config(),
        );
        assert_eq!(declined.blksize, 512);
        assert_eq!(declined.windowsize, 1);
        assert!(declined.oack.is_empty(), "{:?}", declined.oack);
    }

    /// Simulates a well-behaved client and returns the reassembled file.
    fn run_transfer(
        file: &[u8],
        negotiation: &Negotiation,
        mut on_data: impl FnMut(u16),
    ) -> Vec<u8> {
        let blksize = usize::from(negotiation.blksize);
        let mut chunks = file.chunks(blksize);
        let exact_multiple = file.len().is_multiple_of(blksize);
        let mut empty_tail_sent = false;
        let mut transfer = Transfer::new(negotiation, 3);
        let mut received = Vec::new();
        let mut expected_index: u64 = 1;
        loop {
            while transfer.wants_block() {
                let block = match chunks.next() {
                    Some(chunk) => Bytes::copy_from_slice(chunk),
                    None => {
                        assert!(exact_multiple && !empty_tail_sent);
                        empty_tail_sent = true;
                        Bytes::new()
                    }
                };
                transfer.supply_block(block);
            }
            let packets = transfer.take_transmission();
            assert!(!packets.is_empty());
            let mut last_block = None;
            for packet in packets {
                match packet {
                    Packet::Oack { .. } => last_block = Some(0),
                    Packet::Data { block, data } => {
                        assert_eq!(block, wire_block(expected_index));
                        on_data(block);
                        expected_index += 1;
                        received.extend_from_slice(&data);
                        last_block = Some(block);
                    }
                    other => panic!("unexpected {other:?}"),
                }
            }
            match transfer.on_packet(Packet::Ack { block: last_block.unwrap() }) {
                Step::Continue => {}
                Step::Complete => return received,
                other => panic!("unexpected {other:?}"),
            }
        }
    }

    #[test]
    fn block_numbers_roll_over_past_65535() {
        let blocks = 70_000usize;
        let file: Vec<u8> = (0..blocks * 8 + 3).map(|i| (i % 251) as u8).collect();
        let negotiation = negotiate(
            &options(&[("blksize", "8"), ("windowsize", "4")]),
            file.len() as u64,
            &config(),
        );
        assert_eq!(negotiation.blksize, 8);
        let mut wire_numbers = Vec::new();
        let received = run_transfer(&file, &negotiation, |block| wire_numbers.push(block));
        assert_eq!(received, file);
        assert_eq!(wire_numbers.len(), blocks + 1);
        assert_eq!(wire_numbers.get(65534..65537), Some(&[65535, 0, 1][..]));
        assert_eq!(wire_numbers.last(), Some(&wire_block(blocks as u64 + 1)));
    }

    #[test]
    fn exact_multiple_ends_with_an_empty_block_and_empty_file_works() {
        let negotiation = negotiate(&options(&[("blksize", "8")]), 0, &config());
        let file = vec![7u8; 32];
        let mut numbers = Vec::new();
        assert_eq!(run_transfer(&file, &negotiation, |b| numbers.push(b)), file);
        assert_eq!(numbers, vec![1, 2, 3, 4, 5]);

        let no_oack = negotiate(&[], 0, &config());
        let mut numbers = Vec::new();
        assert_eq!(run_transfer(&[], &no_oack, |b| numbers.push(b)), Vec::<u8>::new());
        assert_eq!(numbers, vec![1]);
    }

    fn data_blocks(packets: &[Packet]) -> Vec<u16> {
        packets
            .iter()
            .map(|packet| match packet {
                Packet::Data { block, .. } => *block,
                other => panic!("unexpected {other:?}"),
            })
            .collect()
    }

    fn fill(transfer: &mut Transfer, next_byte: &mut u8, total_blocks: u8) {
        while transfer.wants_block() {
            if *next_byte >= total_blocks {
                transfer.supply_block(Bytes::new());
            } else {
                transfer.supply_block(Bytes::from(vec![*next_byte; 8]));
                *next_byte += 1;
            }
        }
    }

    #[test]
    fn window_slides_resends_on_partial_ack_and_timeout_ignores_stale_acks() {
        let negotiation =
            negotiate(&options(&[("blksize", "8"), ("windowsize", "4")]), 0, &config());
        let mut transfer = Transfer::new(&negotiation, 2);
        let mut next = 0u8;
        // 10 full blocks then an empty one: blocks 1..=11.
        fill(&mut transfer, &mut next, 10);
        assert!(matches!(transfer.take_transmission().as_slice(), [Packet::Oack { .. }]));
        // Not ACK 0: ignored, nothing to send.
        assert_eq!(transfer.on_packet(Packet::Ack { block: 3 }), Step::Continue);
        assert!(transfer.take_transmission().is_empty());
        assert_eq!(transfer.on_packet(Packet::Ack { block: 0 }), Step::Continue);
        assert_eq!(data_blocks(&transfer.take_transmission()), vec![1, 2, 3, 4]);

        // Full window acknowledged: next window.
        assert_eq!(transfer.on_packet(Packet::Ack { block: 4 }), Step::Continue);
        fill(&mut transfer, &mut next, 10);
        assert_eq!(data_blocks(&transfer.take_transmission()), vec![5, 6, 7, 8]);

        // Stale and duplicate ACKs change nothing and trigger no resend.
        for stale in [4, 2, 0, 9, 60000] {
            assert_eq!(transfer.on_packet(Packet::Ack { block: stale }), Step::Continue);
            assert!(transfer.take_transmission().is_empty(), "ack {stale}");
        }

        // ACK inside the window: the client lost block 7, resend from 7 with a full window.
        assert_eq!(transfer.on_packet(Packet::Ack { block: 6 }), Step::Continue);
        fill(&mut transfer, &mut next, 10);
        assert_eq!(data_blocks(&transfer.take_transmission()), vec![7, 8, 9, 10]);

        // Timeouts resend the same window until the retries run out.
        assert_eq!(transfer.on_timeout(), Step::Continue);
        assert_eq!(data_blocks(&transfer.take_transmission()), vec![7, 8, 9, 10]);
        assert_eq!(transfer.on_timeout(), Step::Continue);
        assert_eq!(data_blocks(&transfer.take_transmission()), vec![7, 8, 9, 10]);
        assert_eq!(transfer.on_timeout(), Step::GaveUp);
    }

    #[test]
    fn progress_resets_retries_and_last_ack_completes() {
        let negotiation =
            negotiate(&options(&[("blksize", "8"), ("windowsize", "2")]), 0, &config());
        let mut transfer = Transfer::new(&negotiation, 1);
        let mut next = 0u8;
        fill(&mut transfer, &mut next, 3);
        transfer.take_transmission();
        assert_eq!(transfer.on_timeout(), Step::Continue);
        assert_eq!(transfer.on_packet(Packet::Ack { block: 0 }), Step::Continue);
        fill(&mut transfer, &mut next, 3);
        assert_eq!(data_blocks(&transfer.take_transmission()), vec![1, 2]);
        assert_eq!(transfer.on_timeout(), Step::Continue);
        assert_eq!(transfer.on_packet(Packet::Ack { block: 2 }), Step::Continue);
        fill(&mut transfer, &mut next, 3);
        // Block 3 full, block 4 empty (the file is an exact multiple of blksize).
        assert_eq!(data_blocks(&transfer.take_transmission()), vec![3, 4]);
        assert_eq!(transfer.acknowledged_bytes(), 16);
        assert_eq!(transfer.on_packet(Packet::Ack { block: 4 }), Step::Complete);
        assert_eq!(transfer.acknowledged_bytes(), 24);
    }

    #[test]
    fn client_error_and_protocol_violations_end_the_transfer() {
        let negotiation = negotiate(&[], 0, &config());
        let mut transfer = Transfer::new(&negotiation, 1);
        assert_eq!(
            transfer.on_packet(Packet::error(ErrorCode::OptionNegotiation, "size only")),
            Step::ClientError { code: ErrorCode::OptionNegotiation, message: "size only".into() }
        );
        assert!(matches!(
            transfer.on_packet(Packet::Data { block: 1, data: Bytes::new() }),
            Step::Violation(Packet::Error { code: ErrorCode::IllegalOperation, .. })
        ));
    }

    #[test]
    fn oversized_supplied_block_is_cut_to_blksize() {
        let negotiation = negotiate(&options(&[("blksize", "8")]), 0, &config());
        let mut transfer = Transfer::new(&negotiation, 1);
        transfer.supply_block(Bytes::from(vec![1u8; 100]));
        assert_eq!(transfer.window.front().map(Bytes::len), Some(8));
        assert!(!transfer.last_block_loaded, "a full block is not the last one");
    }
}
