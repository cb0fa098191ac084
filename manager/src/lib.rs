//! The `ctpf` binary's library: the manager API, the CLI and the wiring of `ctpf up`,
//! `ctpf manager` and `ctpf worker`. `main.rs` only parses arguments and calls [`cli::run`].

pub mod api;
pub mod boot_artifacts;
pub mod boot_flags;
mod build_cli;
pub mod cli;
pub mod client;
mod flash_cli;
mod image_cli;
mod media_key_cli;
pub mod server;
