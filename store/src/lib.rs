//! Where ctpf keeps things.
//!
//! - [`artifacts`]: content-addressed blobs (boot images, kernels, media), on the local
//!   filesystem or in S3/MinIO.
//! - [`state`]: small records (datacenters, hosts, keys, tokens, jobs) and the event log, in an
//!   embedded redb file or in Redis.
//!
//! Each is a trait with two real backends and one contract test suite run against both
//! (`tests/artifact_contract.rs`, `tests/state_contract.rs`).

pub mod artifacts;
pub mod state;
