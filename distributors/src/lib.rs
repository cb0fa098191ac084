//! Distributors: the per-datacenter worker. Today it takes jobs from the bus and runs them;
//! DHCP, TFTP and HTTP boot (issue 3) and the overlay and k3s distributors join it later.

pub mod jobs;
