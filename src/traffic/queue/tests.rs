use std::sync::atomic::{AtomicUsize, Ordering};

use super::*;

fn queue(max_concurrency: usize, max_queue: usize, rate: Option<&str>) -> Arc<Queue> {
    Arc::new(Queue::new(
        Settings {
            max_concurrency,
            max_queue,
            queue_timeout: Duration::from_secs(10),
            rate: rate.map(|r| Rate::parse(r).unwrap()),
        },
        IntGauge::new("depth", "d").unwrap(),
        Histogram::with_opts(prometheus::HistogramOpts::new("wait", "w")).unwrap(),
    ))
}

fn never() -> std::future::Pending<()> {
    std::future::pending()
}

/// Starts `n` waiters of `team`, each recording its grant order in `order` and holding its
/// slot until `release` fires.
fn waiters(
    q: &Arc<Queue>,
    team: &'static str,
    weight: u32,
    n: usize,
    order: &Arc<Mutex<Vec<&'static str>>>,
    release: &tokio::sync::watch::Receiver<usize>,
    started: &Arc<AtomicUsize>,
) -> Vec<tokio::task::JoinHandle<()>> {
    (0..n)
        .map(|_| {
            let (q, order, mut release, started) =
                (q.clone(), order.clone(), release.clone(), started.clone());
            tokio::spawn(async move {
                let (permit, _) = q.acquire(team, weight, never()).await.unwrap().unwrap();
                let me = {
                    let mut o = order.lock().unwrap();
                    o.push(team);
                    o.len()
                };
                started.fetch_add(1, Ordering::SeqCst);
                // Held until the test releases this many slots.
                let _ = release.wait_for(|n| *n >= me).await;
                drop(permit);
            })
        })
        .collect()
}

#[tokio::test(start_paused = true)]
async fn a_backlogged_team_does_not_delay_another_teams_first_request() {
    let q = queue(2, 1000, None);
    let order = Arc::new(Mutex::new(Vec::new()));
    let (tx, rx) = tokio::sync::watch::channel(0usize);
    let started = Arc::new(AtomicUsize::new(0));
    let mut tasks = waiters(&q, "a", 1, 200, &order, &rx, &started);
    tokio::task::yield_now().await;
    while q.load().1 < 198 {
        tokio::task::yield_now().await;
    }
    tasks.extend(waiters(&q, "b", 1, 3, &order, &rx, &started));
    while q.load().1 < 201 {
        tokio::task::yield_now().await;
    }
    // Release slots one by one.
    for n in 1..=203 {
        tx.send(n).unwrap();
        while started.load(Ordering::SeqCst) < (n + 2).min(203) {
            tokio::task::yield_now().await;
        }
    }
    for t in tasks {
        t.await.unwrap();
    }
    let order = order.lock().unwrap();
    let b: Vec<usize> = order
        .iter()
        .enumerate()
        .filter(|(_, t)| **t == "b")
        .map(|(i, _)| i)
        .collect();
    // a, a in the slots; then turns alternate: b's requests are among the next few, not
    // behind a's 198.
    assert_eq!(b.len(), 3);
    assert!(b[0] <= 4 && b[2] <= 8, "b was granted at {b:?}");
    assert_eq!(q.load(), (0, 0));
}

#[tokio::test(start_paused = true)]
async fn weights_share_slots_in_proportion() {
    let q = queue(1, 1000, None);
    let order = Arc::new(Mutex::new(Vec::new()));
    let (tx, rx) = tokio::sync::watch::channel(0usize);
    let started = Arc::new(AtomicUsize::new(0));
    // A first holder, so both teams queue up behind it.
    let mut tasks = waiters(&q, "first", 1, 1, &order, &rx, &started);
    while started.load(Ordering::SeqCst) < 1 {
        tokio::task::yield_now().await;
    }
    tasks.extend(waiters(&q, "heavy", 3, 120, &order, &rx, &started));
    tasks.extend(waiters(&q, "light", 1, 120, &order, &rx, &started));
    while q.load().1 < 240 {
        tokio::task::yield_now().await;
    }
    for n in 1..=161 {
        tx.send(n).unwrap();
        while started.load(Ordering::SeqCst) < n + 1 {
            tokio::task::yield_now().await;
        }
    }
    let granted: Vec<&str> = order.lock().unwrap()[1..161].to_vec();
    let heavy = granted.iter().filter(|t| **t == "heavy").count();
    let light = granted.iter().filter(|t| **t == "light").count();
    assert_eq!((heavy, light), (120, 40), "3:1 while both wait");
    tx.send(usize::MAX).unwrap();
    for t in tasks {
        t.await.unwrap();
    }
}

#[tokio::test(start_paused = true)]
async fn a_full_queue_refuses_and_a_wait_times_out() {
    let q = queue(1, 2, None);
    let (held, _) = q.acquire("a", 1, never()).await.unwrap().unwrap();
    let q2 = q.clone();
    let w1 = tokio::spawn(async move { q2.acquire("a", 1, never()).await.map(|p| p.is_some()) });
    let q3 = q.clone();
    let w2 = tokio::spawn(async move { q3.acquire("b", 1, never()).await.map(|p| p.is_some()) });
    while q.load().1 < 2 {
        tokio::task::yield_now().await;
    }
    assert_eq!(q.acquire("c", 1, never()).await.err(), Some(Refused::Full));
    tokio::time::advance(Duration::from_secs(11)).await;
    assert_eq!(w1.await.unwrap().err(), Some(Refused::Timeout));
    assert_eq!(w2.await.unwrap().err(), Some(Refused::Timeout));
    assert_eq!(q.load(), (1, 0), "the timed-out waiters left the queue");
    drop(held);
    assert_eq!(q.load(), (0, 0));
}

#[tokio::test(start_paused = true)]
async fn a_waiter_whose_callers_left_takes_no_slot() {
    let q = queue(1, 10, None);
    let (held, _) = q.acquire("a", 1, never()).await.unwrap().unwrap();
    let (gone_tx, gone_rx) = tokio::sync::oneshot::channel::<()>();
    let q2 = q.clone();
    let w = tokio::spawn(async move {
        let gone = async {
            let _ = gone_rx.await;
        };
        q2.acquire("b", 1, gone).await.map(|p| p.is_some())
    });
    let q3 = q.clone();
    let next = tokio::spawn(async move { q3.acquire("c", 1, never()).await.map(|p| p.is_some()) });
    while q.load().1 < 2 {
        tokio::task::yield_now().await;
    }
    gone_tx.send(()).unwrap();
    assert_eq!(w.await.unwrap(), Ok(false));
    assert_eq!(q.load(), (1, 1));
    drop(held);
    assert_eq!(
        next.await.unwrap(),
        Ok(true),
        "the slot went to the next waiter"
    );
    assert_eq!(q.load(), (0, 0));
}

#[tokio::test(start_paused = true)]
async fn a_rate_spaces_the_starts() {
    let q = queue(100, 1000, Some("10/s"));
    let started_at = Instant::now();
    let mut starts = Vec::new();
    for _ in 0..5 {
        let (permit, _) = q.acquire("a", 1, never()).await.unwrap().unwrap();
        starts.push(started_at.elapsed());
        drop(permit);
    }
    let ms: Vec<u128> = starts.iter().map(|d| d.as_millis()).collect();
    assert_eq!(ms, vec![0, 100, 200, 300, 400]);
}

#[tokio::test(start_paused = true)]
async fn a_full_queue_refuses_the_biggest_teams_newest_waiter_not_a_small_teams_newcomer() {
    let q = queue(1, 4, None);
    let (held, _) = q.acquire("x", 1, never()).await.unwrap().unwrap();
    let mut bulk = Vec::new();
    for _ in 0..4 {
        let qb = q.clone();
        bulk.push(tokio::spawn(async move {
            qb.acquire("bulk", 1, never()).await.map(|p| p.is_some())
        }));
        while q.load().1 < bulk.len() {
            tokio::task::yield_now().await;
        }
    }
    // Full of bulk's waiters: a quiet team's request takes the newest one's place.
    let q2 = q.clone();
    let quiet =
        tokio::spawn(async move { q2.acquire("quiet", 1, never()).await.map(|p| p.is_some()) });
    let last = bulk.pop().unwrap();
    assert_eq!(last.await.unwrap(), Err(Refused::Full));
    while q.load().1 < 4 {
        tokio::task::yield_now().await;
    }
    // Bulk itself cannot push anyone out: it holds the most already.
    assert_eq!(
        q.acquire("bulk", 1, never()).await.err(),
        Some(Refused::Full)
    );
    drop(held);
    assert_eq!(quiet.await.unwrap(), Ok(true));
    for b in bulk {
        assert_eq!(b.await.unwrap(), Ok(true));
    }
    assert_eq!(q.load(), (0, 0));
}
