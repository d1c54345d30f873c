//! The LMS at its own limit: against a SCIM simulator that rate-limits (429 + `Retry-After`),
//! sheds load (503 + `Retry-After`) or keeps throttling, rostersync fails no user, waits what
//! the LMS asks, and a first sync costs about one request per user.

use std::time::Duration;

use crate::common::serve::*;
use crate::common::{spawn, upn, EnvOptions};
use rostersync::sync::reconcile::RunOutcome;
use rostersync_sim::scim::{ConcurrencyLimit, RateLimit, ScimFaults, UserFault, UserFaultKind};

/// Every request the simulator received, whatever it answered.
fn requests(env: &crate::common::TestEnv) -> u64 {
    ["GET", "POST", "PATCH", "PUT", "DELETE"]
        .iter()
        .map(|m| env.scim.request_count(m))
        .sum()
}

/// A first sync against an LMS allowing 150 requests a second (a bucket of one second) with
/// 10 ms latency: nobody fails, the LMS equals the directory, every manager link is set in
/// the create (members whose manager is listed on a later page wait for it), and the run
/// costs at most 1.02 answered requests per user.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_first_sync_at_the_lms_rate_limit_fails_nobody_and_costs_one_request_per_user() {
    let env = spawn(EnvOptions {
        users: 600,
        ..Default::default()
    })
    .await;
    env.scim.set_faults(ScimFaults {
        latency: Duration::from_millis(10),
        rate_limit: Some(RateLimit::per_second(150.0)),
        ..Default::default()
    });
    env.scim.reset_counts();
    let r = env.reconcile().await;
    assert_eq!(r.outcome, RunOutcome::Ok, "{:?} {:?}", r.error, r.failures);
    assert_eq!((r.counts.failed, r.counts.deferred), (0, 0));
    env.assert_lms_matches_tenant(upn);
    let members = env.member_ids().len() as f64;
    let throttled = env.scim.request_count("429");
    assert!(
        throttled > 0,
        "the limit was never reached: the test proves nothing"
    );
    let answered = (requests(&env) - throttled) as f64;
    assert!(
        answered / members <= 1.02,
        "{answered} answered requests for {members} members ({} POST, {} PATCH, {} GET)",
        env.scim.request_count("POST"),
        env.scim.request_count("PATCH"),
        env.scim.request_count("GET")
    );
    assert!(env.linked_managers() > 0, "the fixture has managers");
    let pace = env.integration.target.pacer().stats();
    assert!(pace.rate.is_some(), "the pacer learnt a rate: {pace:?}");
}

/// The directory's top managers report to someone outside the group (the fixture's CEO): they
/// are parked while the listing goes on, in case their manager turns up on a later page, and
/// everyone below them waits for their creates. Once a hundred times as many members wait
/// behind them as are parked, they are created without waiting, so the LMS writes overlap
/// the listing instead of starting once it has ended (when the whole directory was held in
/// memory: 700 MiB for 100,000 members). With Graph answering in 100 ms, the first POST
/// reaches the LMS before the last member page is read; the result and the cost per user stay
/// those of the test above.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn creates_start_while_the_listing_goes_on_when_top_managers_are_outside_the_group() {
    let env = spawn(EnvOptions {
        users: 6000,
        ..Default::default()
    })
    .await;
    env.graph.set_latency(Some(rostersync_sim::graph::Latency {
        fixed: Duration::from_millis(100),
        ..Default::default()
    }));
    env.scim.reset_counts();
    let pages_before = env.graph.request_count("transitiveMembers");
    let run = env.reconcile();
    tokio::pin!(run);
    // (member pages requested, POSTs answered) whenever the POSTs began.
    let mut first_posts: Option<(u64, u64)> = None;
    let r = loop {
        tokio::select! {
            r = &mut run => break r,
            () = tokio::time::sleep(Duration::from_millis(10)) => {
                let posts = env.scim.request_count("POST");
                if first_posts.is_none() && posts > 0 {
                    let pages = env.graph.request_count("transitiveMembers") - pages_before;
                    first_posts = Some((pages, posts));
                }
            }
        }
    };
    assert_eq!(r.outcome, RunOutcome::Ok, "{:?} {:?}", r.error, r.failures);
    env.assert_lms_matches_tenant(upn);
    let pages = env.graph.request_count("transitiveMembers") - pages_before;
    // The member reader runs up to three pages ahead of planning (one being read, two queued).
    assert!(pages >= 6, "the test needs several member pages: {pages}");
    let (pages_then, _) = first_posts.expect("POSTs were seen");
    assert!(
        pages_then < pages,
        "the first POST came after all {pages} member pages were requested: creates waited for the listing to end"
    );
    eprintln!("first POST after {pages_then} of {pages} member pages were requested");
    let answered = requests(&env) as f64;
    let members = env.member_ids().len() as f64;
    assert!(
        answered / members <= 1.02,
        "{answered} requests for {members} members ({} PATCH)",
        env.scim.request_count("PATCH")
    );
}

/// A POST answered 503 with `Retry-After: 2` is looked up and sent again no sooner than two
/// seconds later, and the user is created once; no user fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_post_answered_503_with_retry_after_is_sent_again_after_the_wait() {
    let env = spawn(EnvOptions {
        users: 30,
        ..Default::default()
    })
    .await;
    let victim = env.member_ids()[5].clone();
    env.scim.set_faults(ScimFaults {
        users: vec![UserFault {
            external_id: victim.clone(),
            kind: UserFaultKind::Unavailable {
                times: 1,
                retry_after_secs: 2,
            },
        }],
        ..Default::default()
    });
    env.scim.record_writes(true);
    let r = env.reconcile().await;
    assert_eq!(r.outcome, RunOutcome::Ok, "{:?} {:?}", r.error, r.failures);
    assert_eq!((r.counts.failed, r.counts.deferred), (0, 0));
    env.assert_lms_matches_tenant(upn);
    let refused = env.scim.throttles();
    assert_eq!(refused.len(), 1, "{refused:?}");
    assert_eq!(
        (refused[0].status, refused[0].method.as_str()),
        (503, "POST")
    );
    let created: Vec<_> = env
        .scim
        .writes()
        .into_iter()
        .filter(|w| w.external_id.as_deref() == Some(victim.as_str()) && w.method == "POST")
        .collect();
    assert_eq!(created.len(), 1, "created once");
    let waited = created[0].at.duration_since(refused[0].at);
    assert!(
        waited >= Duration::from_secs(2),
        "sent again after {waited:?}, before Retry-After"
    );
}

/// A load-shedding LMS (at most 4 requests at once, 503 + `Retry-After: 1` above) fails
/// nobody either: the window shrinks to what it takes.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_load_shedding_lms_fails_nobody() {
    let env = spawn(EnvOptions {
        users: 200,
        ..Default::default()
    })
    .await;
    env.scim.set_faults(ScimFaults {
        latency: Duration::from_millis(20),
        concurrency_limit: Some(ConcurrencyLimit {
            max: 4,
            retry_after_secs: 1,
        }),
        ..Default::default()
    });
    let r = env.reconcile().await;
    assert_eq!(r.outcome, RunOutcome::Ok, "{:?} {:?}", r.error, r.failures);
    assert_eq!((r.counts.failed, r.counts.deferred), (0, 0));
    env.assert_lms_matches_tenant(upn);
    assert!(env.scim.request_count("503") > 0, "the limit was reached");
    let pace = env.integration.target.pacer().stats();
    assert!(pace.window <= 8.0, "the window shrank: {pace:?}");
}

/// An LMS that keeps throttling one user's create past `target.throttle_wait_secs`: that user
/// is deferred (not failed), the others are synced, and the next run creates it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_write_throttled_past_the_wait_is_deferred_not_failed() {
    let env = spawn(EnvOptions {
        users: 30,
        target_extra: "throttle_wait_secs = 2".into(),
        ..Default::default()
    })
    .await;
    let victim = env.member_ids()[3].clone();
    env.scim.set_faults(ScimFaults {
        users: vec![UserFault {
            external_id: victim.clone(),
            kind: UserFaultKind::Unavailable {
                times: 1_000,
                retry_after_secs: 1,
            },
        }],
        ..Default::default()
    });
    let r = env.reconcile().await;
    assert_eq!(r.outcome, RunOutcome::Ok, "{:?} {:?}", r.error, r.failures);
    assert_eq!(
        (r.counts.failed, r.counts.deferred),
        (0, 1),
        "{:?}",
        r.notes
    );
    assert!(env.scim.user_by_external_id(&victim).is_none());
    assert!(
        r.notes.iter().any(|n| n.contains("deferred")),
        "{:?}",
        r.notes
    );

    env.scim.set_faults(ScimFaults::default());
    let r = env.reconcile().await;
    assert_eq!((r.counts.failed, r.counts.deferred), (0, 0));
    assert_eq!(r.counts.created, 1);
    env.assert_lms_matches_tenant(upn);
}

/// A burst of live changes while the LMS allows 20 requests a second: the worker applies all
/// of them, nothing goes to the dead letters, and the LMS equals the directory.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_worker_burst_against_a_rate_limited_lms_fails_nobody() {
    let s = start(60, "").await;
    let env = &s.env;
    wait_for("the first reconcile", 10_000, || s.runs() >= 1).await;
    env.scim.set_faults(ScimFaults {
        latency: Duration::from_millis(20),
        rate_limit: Some(RateLimit::per_second(20.0)),
        ..Default::default()
    });
    // Enabled members (the disabled ones are not in the LMS).
    let members: Vec<String> = env
        .member_ids()
        .into_iter()
        .filter(|m| env.graph.user(m).is_some_and(|u| u.account_enabled))
        .collect();
    for (i, id) in members.iter().take(40).enumerate() {
        env.graph
            .update_user(id, |u| u.job_title = Some(format!("Burst {i}")));
    }
    for n in 0..20 {
        env.graph.upsert_user(new_user(500 + n, None));
        env.graph
            .add_member(&env.fx.all_group_id, &new_user(500 + n, None).id);
    }
    wait_for("every change applied", 60_000, || {
        members
            .iter()
            .take(40)
            .enumerate()
            .all(|(i, id)| title(env, id) == Some(format!("Burst {i}")))
            && (0..20).all(|n| active(env, &new_user(500 + n, None).id) == Some(true))
    })
    .await;
    wait_for("queue drained", 30_000, || s.integ_store().queue_len() == 0).await;
    assert!(
        env.scim.request_count("429") > 0,
        "the limit was never reached: the test proves nothing"
    );
    let dead = s.integ_store().dead_letters().unwrap();
    assert!(dead.is_empty(), "dead letters: {dead:?}");
    env.scim.set_faults(ScimFaults::default());
    env.assert_lms_matches_tenant(upn);
    s.stop().await;
}
