use super::*;

fn gate(window: usize, min_exchanges: usize) -> Gate {
    Gate::new(
        Breaker {
            failure_ratio: 0.5,
            window,
            min_exchanges,
            open_for: Duration::from_secs(5),
        },
        IntGauge::new("paused", "p").unwrap(),
        IntGauge::new("open", "o").unwrap(),
    )
}

#[tokio::test(start_paused = true)]
async fn a_429_pauses_the_region_then_one_probe_goes() {
    let g = gate(20, 10);
    let t = g.admit().unwrap();
    assert!(!t.is_probe());
    t.report(Outcome::RateLimited(Duration::from_secs(2)));
    assert_eq!(g.shared.paused.get(), 1);
    assert_eq!(
        g.admit().err(),
        Some(Closed::Paused(Duration::from_secs(2)))
    );
    tokio::time::advance(Duration::from_millis(1500)).await;
    assert_eq!(
        g.admit().err(),
        Some(Closed::Paused(Duration::from_millis(500)))
    );
    tokio::time::advance(Duration::from_millis(500)).await;
    let probe = g.admit().unwrap();
    assert!(probe.is_probe());
    // One probe at a time: the others wait for it.
    assert!(matches!(g.admit(), Err(Closed::Paused(_))));
    probe.report(Outcome::Success);
    assert_eq!(g.shared.paused.get(), 0);
    assert!(!g.admit().unwrap().is_probe());
}

#[tokio::test(start_paused = true)]
async fn a_probe_answered_429_pauses_again_and_an_unsent_probe_frees_its_place() {
    let g = gate(20, 10);
    g.admit()
        .unwrap()
        .report(Outcome::RateLimited(Duration::from_secs(1)));
    tokio::time::advance(Duration::from_secs(1)).await;
    let probe = g.admit().unwrap();
    probe.report(Outcome::RateLimited(Duration::from_secs(3)));
    assert_eq!(
        g.admit().err(),
        Some(Closed::Paused(Duration::from_secs(3)))
    );
    tokio::time::advance(Duration::from_secs(3)).await;
    drop(g.admit().unwrap()); // a probe that was never sent
    let probe = g.admit().unwrap();
    assert!(probe.is_probe());
    // Retry-After is capped at a minute.
    probe.report(Outcome::RateLimited(Duration::from_secs(3600)));
    assert_eq!(g.admit().err(), Some(Closed::Paused(MAX_PAUSE)));
}

#[tokio::test(start_paused = true)]
async fn the_breaker_opens_on_the_failure_ratio_answers_fast_and_a_probe_closes_it() {
    let g = gate(20, 10);
    // Nine failures: below min_exchanges.
    for _ in 0..9 {
        g.admit().unwrap().report(Outcome::Failure);
    }
    assert!(g.admit().is_ok());
    g.admit().unwrap().report(Outcome::Failure);
    assert_eq!(g.shared.open.get(), 1);
    assert_eq!(g.admit().err(), Some(Closed::Open(Duration::from_secs(5))));
    tokio::time::advance(Duration::from_secs(5)).await;
    let probe = g.admit().unwrap();
    assert!(probe.is_probe());
    probe.report(Outcome::Failure);
    assert_eq!(g.admit().err(), Some(Closed::Open(Duration::from_secs(5))));
    tokio::time::advance(Duration::from_secs(5)).await;
    g.admit().unwrap().report(Outcome::Success);
    assert_eq!(g.shared.open.get(), 0);
    assert!(!g.admit().unwrap().is_probe());
}

#[tokio::test(start_paused = true)]
async fn successes_keep_the_breaker_closed_below_the_ratio() {
    let g = gate(20, 10);
    for i in 0..100 {
        let outcome = if i % 3 == 0 {
            Outcome::Failure
        } else {
            Outcome::Success
        };
        g.admit().unwrap().report(outcome);
    }
    assert_eq!(g.state(), (false, false));
    // The paused gauge drops back by itself when a pause runs out.
    g.admit()
        .unwrap()
        .report(Outcome::RateLimited(Duration::from_secs(1)));
    assert_eq!(g.shared.paused.get(), 1);
    tokio::time::sleep(Duration::from_millis(1001)).await;
    assert_eq!(g.shared.paused.get(), 0);
}
