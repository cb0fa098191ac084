//! scripts-svc's rendering core: the iPXE scripts machines boot with, rendered from askama
//! templates (`templates/*.ipxe`).
//!
//! Every value placed in a script is validated first ([`escape`]): a value that could change
//! what iPXE executes (a newline, `${...}`, `||`, a quote, ...) is an error naming the field,
//! never a script. Behind that, [`IpxeEscaper`] fails any render that would interpolate such
//! text, so a template mistake cannot open an injection either.
//!
//! Flow: DHCP points iPXE at the entry script ([`render_entry`]); it chains
//! `{base_url}/boot/ipxe?mac=..&uuid=..&arch=..&platform=..`, which the HTTP layer parses
//! with [`BootQuery::into_request`], decides a [`Profile`] for, and renders with
//! [`render_machine`].

pub mod escape;
mod grub;
mod render;
mod request;

pub use escape::{BaseUrl, EnrollmentToken, GrubEscaper, HttpUrl, IpxeEscaper, KernelCmdline};
pub use grub::{
    render_grub_chain_ipxe, render_grub_entry, render_grub_local_disk, render_grub_machine,
};
pub use render::{
    ENTRY_MAX_NICS, ENTRY_MAX_ROUNDS, ENTRY_RETRY_DELAY_SECS, Profile, ScriptContext, ScriptError,
    render_entry, render_local_disk, render_machine,
};
pub use request::{BootQuery, BootRequest, ScriptArch};
