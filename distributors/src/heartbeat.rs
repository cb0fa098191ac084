//! A worker's heartbeat: who it is and which snapshot generation it serves, sent every
//! [`INTERVAL`]. The manager shows a worker silent for longer than its timeout as lost.

use std::{sync::Arc, time::Duration};

use ctpf_bus::Bus;
use ctpf_common::WorkerHeartbeat;
use tokio_util::sync::CancellationToken;

pub const INTERVAL: Duration = Duration::from_secs(2);

/// Heartbeats until `stop`; `generation` says what the worker serves at each beat. A failed
/// beat is logged and retried at the next interval (the bus may be down for a while).
pub async fn run(
    bus: Arc<dyn Bus>,
    mut heartbeat: WorkerHeartbeat,
    generation: impl Fn() -> Option<u64> + Send,
    stop: CancellationToken,
) {
    let mut failing = false;
    loop {
        heartbeat.generation = generation();
        match bus.heartbeat(&heartbeat).await {
            Ok(()) if failing => {
                tracing::info!("heartbeats reach the manager again");
                failing = false;
            }
            Ok(()) => {}
            Err(e) if !failing => {
                tracing::warn!(error = %e, "heartbeat failed; retrying every {} s", INTERVAL.as_secs());
                failing = true;
            }
            Err(_) => {}
        }
        tokio::select! {
            () = tokio::time::sleep(INTERVAL) => {}
            () = stop.cancelled() => return,
        }
    }
}
