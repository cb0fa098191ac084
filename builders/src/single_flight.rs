//! One build per key at a time: concurrent requests for the same build key share the
//! first one's build and its result, instead of racing to produce identical bytes. (The
//! cache hit for a key that already has a stored result is checked by the caller before it
//! gets here; this covers the requests that arrive while that result is being made.)

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex, PoisonError};

use ctpf_common::Sha256Digest;
use futures::FutureExt as _;
use futures::future::{BoxFuture, Shared};

type SharedBuild<T, E> = Shared<BoxFuture<'static, Result<T, Arc<E>>>>;

/// The builds in flight, by key.
pub struct SingleFlight<T, E> {
    in_flight: Arc<Mutex<HashMap<Sha256Digest, SharedBuild<T, E>>>>,
}

impl<T, E> std::fmt::Debug for SingleFlight<T, E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let n = self.in_flight.lock().unwrap_or_else(PoisonError::into_inner).len();
        f.debug_struct("SingleFlight").field("in_flight", &n).finish()
    }
}

impl<T, E> Default for SingleFlight<T, E> {
    fn default() -> Self {
        Self { in_flight: Arc::new(Mutex::new(HashMap::new())) }
    }
}

impl<T, E> SingleFlight<T, E>
where
    T: Clone + Send + Sync + 'static,
    E: Send + Sync + 'static,
{
    /// Runs `build` for `key`, unless a build for `key` is already running: then waits for
    /// that one and returns its result. The second element is true for the caller whose
    /// `build` ran. A failure is shared with the waiters but not remembered: the next request
    /// builds again. The build runs as its own task, so it completes even if every caller
    /// goes away; its entry is cleared by whichever caller sees it finish, so a caller that
    /// went away leaves no key stuck (the next request gets the finished result at once).
    pub async fn run<F, Fut>(&self, key: Sha256Digest, build: F) -> (Result<T, Arc<E>>, bool)
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<T, E>> + Send + 'static,
    {
        let (shared, leader) = {
            let mut in_flight = self.in_flight.lock().unwrap_or_else(PoisonError::into_inner);
            match in_flight.get(&key) {
                Some(shared) => (shared.clone(), false),
                None => {
                    let task = tokio::spawn(build());
                    let registry = self.in_flight.clone();
                    let shared = async move {
                        let joined = task.await;
                        // Done: later requests for this key start afresh (or, once the result
                        // is stored, are cache hits). Removed by whoever polls this first, not
                        // by the first caller, so a caller that goes away leaves nothing stuck.
                        registry.lock().unwrap_or_else(PoisonError::into_inner).remove(&key);
                        match joined {
                            Ok(result) => result.map_err(Arc::new),
                            // The build panicked: resume the panic in every waiter.
                            Err(join) => std::panic::resume_unwind(join.into_panic()),
                        }
                    }
                    .boxed()
                    .shared();
                    in_flight.insert(key, shared.clone());
                    (shared, true)
                }
            }
        };
        (shared.await, leader)
    }

    /// Keys being built now.
    pub fn in_flight(&self) -> usize {
        self.in_flight.lock().unwrap_or_else(PoisonError::into_inner).len()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use super::*;

    fn key(n: u8) -> Sha256Digest {
        Sha256Digest::of(&[n])
    }

    #[tokio::test]
    async fn concurrent_requests_for_one_key_share_one_build() {
        let flights = Arc::new(SingleFlight::<u32, String>::default());
        let builds = Arc::new(AtomicUsize::new(0));
        let mut requests = Vec::new();
        for _ in 0..8 {
            let (flights, builds) = (flights.clone(), builds.clone());
            requests.push(tokio::spawn(async move {
                flights
                    .run(key(1), move || async move {
                        builds.fetch_add(1, Ordering::SeqCst);
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        Ok(42)
                    })
                    .await
            }));
        }
        let mut leaders = 0;
        for request in requests {
            let (result, leader) = request.await.unwrap();
            assert_eq!(result.unwrap(), 42);
            leaders += usize::from(leader);
        }
        assert_eq!((builds.load(Ordering::SeqCst), leaders), (1, 1));
        assert_eq!(flights.in_flight(), 0);
    }

    #[tokio::test]
    async fn different_keys_build_separately_and_failures_are_not_remembered() {
        let flights = SingleFlight::<u32, String>::default();
        let (a, _) = flights.run(key(1), || async { Ok(1) }).await;
        let (b, _) = flights.run(key(2), || async { Ok(2) }).await;
        assert_eq!((a.unwrap(), b.unwrap()), (1, 2));
        let (failed, _) =
            flights.run(key(3), || async { Err("make: *** Error 2".to_owned()) }).await;
        assert_eq!(failed.unwrap_err().as_str(), "make: *** Error 2");
        let (retried, leader) = flights.run(key(3), || async { Ok(3) }).await;
        assert_eq!((retried.unwrap(), leader), (3, true));
    }

    #[tokio::test]
    async fn a_caller_that_goes_away_neither_stops_the_build_nor_leaves_the_key_stuck() {
        let flights = Arc::new(SingleFlight::<u32, String>::default());
        let finished = Arc::new(AtomicUsize::new(0));
        let done = finished.clone();
        let leader = {
            let flights = flights.clone();
            tokio::spawn(async move {
                flights
                    .run(key(9), move || async move {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        done.fetch_add(1, Ordering::SeqCst);
                        Ok(9)
                    })
                    .await
            })
        };
        tokio::time::sleep(Duration::from_millis(10)).await;
        leader.abort();
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(finished.load(Ordering::SeqCst), 1, "the build ran to its end");
        // Nobody polled the shared future to its end, so the key may still be listed; a new
        // request must still get a result rather than hang.
        let (result, _) =
            tokio::time::timeout(Duration::from_secs(2), flights.run(key(9), || async { Ok(10) }))
                .await
                .unwrap();
        assert!(matches!(result, Ok(9) | Ok(10)), "{result:?}");
    }
}
