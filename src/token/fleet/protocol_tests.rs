//! The fleet protocol under a simulated store with paused time: a thousand members at once,
//! random fleets (proptest), the store down or behind; fetches counted, the store inspected.

mod support {
    //! A simulated store and members for the protocol's tests (paused time).
    #![allow(clippy::unwrap_used)]
    pub(super) use super::super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Mutex;
    use tokio::time::Instant;

    use crate::config::Secret;

    #[derive(Default)]
    pub(super) struct State {
        entry: Option<(Entry, Instant)>,
        claim: Option<(String, Instant)>,
        floor: Option<Instant>,
        pub(super) down: bool,
    }

    pub(super) struct Sim {
        pub(super) state: Mutex<State>,
        announce: watch::Sender<u64>,
    }

    impl Sim {
        pub(super) fn new() -> Arc<Sim> {
            Arc::new(Sim {
                state: Mutex::new(State::default()),
                announce: watch::channel(0).0,
            })
        }

        fn lock(&self) -> Result<std::sync::MutexGuard<'_, State>, BackendError> {
            let state = self.state.lock().unwrap();
            if state.down {
                return Err(BackendError("Connection refused".into()));
            }
            Ok(state)
        }

        pub(super) fn generation(&self) -> u64 {
            let s = self.state.lock().unwrap();
            s.entry.as_ref().map_or(0, |(e, _)| e.generation)
        }
    }

    impl Backend for Sim {
        fn read(&self, _: &str) -> BoxFuture<'_, Result<Option<Entry>, BackendError>> {
            let r = self.lock().map(|s| {
                let now = Instant::now();
                s.entry
                    .as_ref()
                    .filter(|(_, exp)| *exp > now)
                    .map(|(e, exp)| Entry {
                        remaining: *exp - now,
                        ..e.clone()
                    })
            });
            Box::pin(async move { r })
        }

        fn claim(
            &self,
            _: &str,
            holder: &str,
            ttl: Duration,
            take_over: Option<&str>,
        ) -> BoxFuture<'_, Result<Claim, BackendError>> {
            let r = self.lock().map(|mut s| {
                let now = Instant::now();
                match &s.claim {
                    Some((h, exp))
                        if *exp > now && h != holder && Some(h.as_str()) != take_over =>
                    {
                        Claim::HeldBy(h.clone())
                    }
                    _ => {
                        s.claim = Some((holder.to_owned(), now + ttl));
                        Claim::Won
                    }
                }
            });
            Box::pin(async move { r })
        }

        fn release(&self, _: &str, holder: &str) -> BoxFuture<'_, Result<(), BackendError>> {
            let r = self.lock().map(|mut s| {
                if s.claim.as_ref().is_some_and(|(h, _)| h == holder) {
                    s.claim = None;
                }
            });
            Box::pin(async move { r })
        }

        fn floor(&self, _: &str, ttl: Duration) -> BoxFuture<'_, Result<bool, BackendError>> {
            let r = self.lock().map(|mut s| {
                let now = Instant::now();
                if s.floor.is_some_and(|until| until > now) {
                    return false;
                }
                s.floor = Some(now + ttl);
                true
            });
            Box::pin(async move { r })
        }

        fn publish(
            &self,
            _: &str,
            expect: u64,
            entry: Entry,
            holder: &str,
        ) -> BoxFuture<'_, Result<Result<(), u64>, BackendError>> {
            let r = self.lock().map(|mut s| {
                let now = Instant::now();
                let current = s
                    .entry
                    .as_ref()
                    .filter(|(_, exp)| *exp > now)
                    .map_or(0, |(e, _)| e.generation);
                if current != expect {
                    return Err(current);
                }
                let generation = entry.generation;
                s.entry = Some((entry.clone(), now + entry.remaining));
                if s.claim.as_ref().is_some_and(|(h, _)| h == holder) {
                    s.claim = None;
                }
                self.announce.send_modify(|g| *g = (*g).max(generation));
                Ok(())
            });
            Box::pin(async move { r })
        }
    }

    pub(super) fn member(sim: &Arc<Sim>, n: usize, wait_for_peer: Duration) -> Member {
        Member {
            backend: sim.clone(),
            id: "fleet".into(),
            holder: format!("m{n}").into(),
            sealer: Sealer::new("secret", "fleet"),
            wait_for_peer,
            on_unavailable: OnUnavailable::FetchLocally,
            claim_ttl: Duration::from_secs(15),
            notified: sim.announce.subscribe(),
        }
    }

    pub(super) const LIFETIME: Duration = Duration::from_secs(60);

    /// A token endpoint that takes `delay` and counts its calls.
    pub(super) fn endpoint(
        fetches: &Arc<AtomicUsize>,
        delay: Duration,
    ) -> impl FnOnce() -> BoxFuture<'static, Result<(Issued, Duration), FetchError>> {
        let fetches = fetches.clone();
        move || {
            Box::pin(async move {
                let n = fetches.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(delay).await;
                let issued = Issued {
                    access_token: Secret::new(format!("token-{n}")),
                    expires_in: Some(LIFETIME),
                    capped: false,
                    clock_skew: None,
                    status: http::StatusCode::OK,
                };
                Ok((issued, LIFETIME))
            })
        }
    }

    pub(super) fn generation_of(outcome: &Outcome) -> Option<u64> {
        match outcome {
            Outcome::Adopted { generation, .. } | Outcome::Fetched { generation, .. } => {
                Some(*generation)
            }
            _ => None,
        }
    }

    pub(super) fn held(generation: u64, remaining: Duration) -> Held {
        Held {
            generation,
            lifetime: LIFETIME,
            remaining,
            token: "held".into(),
        }
    }

    /// `n` members that all need `need` at (nearly) once; their outcomes.
    pub(super) async fn all_at_once(
        members: &Arc<Vec<Member>>,
        need: Need,
        held: Option<Held>,
        fetches: &Arc<AtomicUsize>,
        delay: Duration,
        stagger: Duration,
    ) -> Vec<Outcome> {
        let tasks: Vec<_> = (0..members.len())
            .map(|i| {
                let members = members.clone();
                let held = held.clone();
                let fetch = endpoint(fetches, delay);
                tokio::spawn(async move {
                    tokio::time::sleep(stagger * (i % 7) as u32).await;
                    members[i].acquire(need, held, &|_| {}, fetch).await
                })
            })
            .collect();
        let mut out = Vec::new();
        for t in tasks {
            out.push(t.await.unwrap());
        }
        out
    }
}

mod scenarios {
    //! The protocol under a simulated store with paused time: many members at once, fetches
    //! counted, the store's state inspected.
    use super::support::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[tokio::test(start_paused = true)]
    async fn a_member_that_took_over_publishes_on_top_and_a_stalled_one_adopts() {
        let sim = Sim::new();
        let fetches = Arc::new(AtomicUsize::new(0));
        let wait = Duration::from_secs(1);
        let (a, b) = (member(&sim, 0, wait), member(&sim, 1, wait));
        // A claims and its token endpoint answers after 1.2 s, longer than B waits: B takes
        // the claim over and fetches in 0.5 s. A's token (token-0) was issued first, so on a
        // server that revokes the previous token B's (token-1) is the live one.
        let slow = endpoint(&fetches, Duration::from_millis(1200));
        let fast = endpoint(&fetches, Duration::from_millis(500));
        let a_run = a.acquire(Need::Startup, None, &|_| {}, slow);
        let b_run = async {
            tokio::time::sleep(Duration::from_millis(10)).await;
            b.acquire(Need::Startup, None, &|_| {}, fast).await
        };
        let (a_out, b_out) = tokio::join!(a_run, b_run);
        assert_eq!(fetches.load(Ordering::SeqCst), 2);
        // A was stalled past B's patience: it adopted nothing newer yet (B had not published
        // when A finished) and published generation 1; B, not stalled, published on top.
        assert!(
            matches!(a_out, Outcome::Fetched { generation: 1, .. }),
            "{a_out:?}"
        );
        assert!(
            matches!(b_out, Outcome::Fetched { generation: 2, .. }),
            "{b_out:?}"
        );
        assert_eq!(sim.generation(), 2, "the newest token is the fleet's");

        // A stopped claimer (3 s) whose taker published first: it adopts the fleet's token
        // instead of overwriting it with its older one.
        let sim = Sim::new();
        let (a, b) = (member(&sim, 0, wait), member(&sim, 1, wait));
        let stopped = endpoint(&fetches, Duration::from_secs(3));
        let fast = endpoint(&fetches, Duration::from_millis(200));
        let a_run = a.acquire(Need::Startup, None, &|_| {}, stopped);
        let b_run = async {
            tokio::time::sleep(Duration::from_millis(10)).await;
            b.acquire(Need::Startup, None, &|_| {}, fast).await
        };
        let (a_out, b_out) = tokio::join!(a_run, b_run);
        assert!(
            matches!(b_out, Outcome::Fetched { generation: 1, .. }),
            "{b_out:?}"
        );
        assert!(
            matches!(a_out, Outcome::Adopted { generation: 1, .. }),
            "{a_out:?}"
        );
        assert_eq!(sim.generation(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_thousand_members_fetch_once_per_generation_and_the_floor_is_fleet_wide() {
        let sim = Sim::new();
        let fetches = Arc::new(AtomicUsize::new(0));
        let members: Arc<Vec<Member>> = Arc::new(
            (0..1000)
                .map(|n| member(&sim, n, Duration::from_secs(3)))
                .collect(),
        );
        let ms = Duration::from_millis;
        let out = all_at_once(&members, Need::Startup, None, &fetches, ms(200), ms(1)).await;
        assert_eq!(fetches.load(Ordering::SeqCst), 1);
        assert!(out.iter().all(|o| generation_of(o) == Some(1)));

        // Everyone meets a 401 for generation 1: one forced fetch for the fleet.
        let out = all_at_once(
            &members,
            Need::Refused(1),
            Some(held(1, LIFETIME / 2)),
            &fetches,
            ms(200),
            ms(1),
        )
        .await;
        assert_eq!(fetches.load(Ordering::SeqCst), 2);
        assert!(out.iter().all(|o| generation_of(o) == Some(2)));

        // Revoked again at once: within the fleet-wide floor nobody fetches.
        let out = all_at_once(
            &members,
            Need::Refused(2),
            Some(held(2, LIFETIME)),
            &fetches,
            ms(200),
            ms(0),
        )
        .await;
        assert_eq!(
            fetches.load(Ordering::SeqCst),
            2,
            "the floor holds fleet-wide"
        );
        assert!(out.iter().all(|o| matches!(o, Outcome::Unchanged { .. })));

        // After the floor, one fetch again.
        tokio::time::advance(FORCE_FLOOR).await;
        let out = all_at_once(
            &members,
            Need::Refused(2),
            Some(held(2, LIFETIME)),
            &fetches,
            ms(200),
            ms(1),
        )
        .await;
        assert_eq!(fetches.load(Ordering::SeqCst), 3);
        assert!(out.iter().all(|o| generation_of(o) == Some(3)));

        // A 401 for an older generation while a newer one is visible: adopt, no fetch.
        let out = all_at_once(
            &members,
            Need::Refused(1),
            Some(held(1, LIFETIME)),
            &fetches,
            ms(200),
            ms(0),
        )
        .await;
        assert_eq!(fetches.load(Ordering::SeqCst), 3);
        assert!(out
            .iter()
            .all(|o| matches!(o, Outcome::Adopted { generation: 3, .. })));
        assert_eq!(sim.generation(), 3);
    }
}

mod unavailable {
    use super::support::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[tokio::test(start_paused = true)]
    async fn with_the_store_down_a_member_fetches_alone_only_in_the_last_10_percent() {
        let sim = Sim::new();
        sim.state.lock().unwrap().down = true;
        let fetches = Arc::new(AtomicUsize::new(0));
        let mut m = member(&sim, 0, Duration::from_secs(3));
        async fn attempt(
            m: &Member,
            fetches: &Arc<AtomicUsize>,
            need: Need,
            held: Option<Held>,
        ) -> Outcome {
            let fetch = endpoint(fetches, Duration::from_millis(10));
            m.acquire(need, held, &|_| {}, fetch).await
        }
        for remaining in [LIFETIME / 2, LIFETIME / 9] {
            let out = attempt(&m, &fetches, Need::Scheduled, Some(held(4, remaining))).await;
            assert!(
                matches!(out, Outcome::Unchanged { give_up: false, .. }),
                "{out:?}"
            );
        }
        assert_eq!(
            fetches.load(Ordering::SeqCst),
            0,
            "most of its life left: keep it"
        );
        let out = attempt(&m, &fetches, Need::Scheduled, Some(held(4, LIFETIME / 11))).await;
        assert!(
            matches!(
                out,
                Outcome::Fetched {
                    local: true,
                    generation: 5,
                    ..
                }
            ),
            "{out:?}"
        );
        let out = attempt(&m, &fetches, Need::Refused(5), Some(held(5, LIFETIME))).await;
        assert!(
            matches!(out, Outcome::Fetched { local: true, .. }),
            "{out:?}"
        );
        assert_eq!(fetches.load(Ordering::SeqCst), 2);

        m.on_unavailable = OnUnavailable::Hold;
        let out = attempt(&m, &fetches, Need::Scheduled, Some(held(6, LIFETIME / 20))).await;
        assert!(
            matches!(out, Outcome::Unchanged { give_up: false, .. }),
            "{out:?}"
        );
        let out = attempt(&m, &fetches, Need::Refused(6), Some(held(6, LIFETIME))).await;
        assert!(
            matches!(out, Outcome::Unchanged { give_up: true, .. }),
            "{out:?}"
        );
        let out = attempt(&m, &fetches, Need::Startup, None).await;
        assert!(matches!(out, Outcome::Unchanged { .. }), "{out:?}");
        assert_eq!(
            fetches.load(Ordering::SeqCst),
            2,
            "hold never fetches alone"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_store_that_lost_the_newest_entry_gets_the_held_token_back() {
        let sim = Sim::new();
        let fetches = Arc::new(AtomicUsize::new(0));
        let m = member(&sim, 0, Duration::from_secs(3));
        // A failover kept generation 1; this member holds generation 3.
        let old = m
            .acquire(
                Need::Startup,
                None,
                &|_| {},
                endpoint(&fetches, Duration::ZERO),
            )
            .await;
        assert!(
            matches!(old, Outcome::Fetched { generation: 1, .. }),
            "{old:?}"
        );
        let out = m
            .acquire(
                Need::Sync,
                Some(held(3, LIFETIME / 2)),
                &|_| {},
                endpoint(&fetches, Duration::ZERO),
            )
            .await;
        assert!(matches!(out, Outcome::Unchanged { .. }), "{out:?}");
        assert_eq!(sim.generation(), 3, "written back over the older entry");
        assert_eq!(fetches.load(Ordering::SeqCst), 1, "no fetch to converge");
    }
}

mod properties {
    //! Random fleets: sizes, token endpoint latencies, `wait_for_peer`, start spreads.
    use super::support::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig { cases: 12, ..ProptestConfig::default() })]

        #[test]
        fn one_fetch_per_generation_unless_the_endpoint_is_slower_than_wait_for_peer(
            n in 1usize..1000,
            delay_ms in 0u64..6000,
            wait_ms in 100u64..4000,
            stagger_ms in 0u64..500,
        ) {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_time()
                .start_paused(true)
                .build()
                .unwrap();
            rt.block_on(async {
                let sim = Sim::new();
                let fetches = Arc::new(std::sync::atomic::AtomicUsize::new(0));
                let members: Arc<Vec<Member>> = Arc::new(
                    (0..n).map(|i| member(&sim, i, Duration::from_millis(wait_ms))).collect(),
                );
                let ms = Duration::from_millis;
                let out = all_at_once(&members, Need::Startup, None, &fetches, ms(delay_ms), ms(stagger_ms)).await;
                let fetched = fetches.load(std::sync::atomic::Ordering::SeqCst);
                // A claimer slower than wait_for_peer looks stuck: one member takes over per
                // wait_for_peer it keeps everyone waiting.
                let bound = 1 + (delay_ms / wait_ms) as usize;
                prop_assert!(fetched >= 1 && fetched <= bound, "{fetched} fetches (bound {bound})");
                if delay_ms < wait_ms {
                    prop_assert_eq!(fetched, 1);
                }
                // Everyone converged on a token, and on the store's when nothing raced.
                prop_assert!(out.iter().all(|o| generation_of(o).is_some()));
                if fetched == 1 {
                    prop_assert!(out.iter().all(|o| generation_of(o) == Some(1)));
                }
                Ok(())
            })?;
        }
    }
}
