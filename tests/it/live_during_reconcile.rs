//! Live updates are not held up by a full reconcile: `serve`'s incremental worker runs beside
//! a reconcile of the same integration (`sync::gate` keeps their writes of one user apart),
//! its Graph reads are sent at normal priority while the reconcile's are low and paced
//! (`graph::pacer`). The Graph simulator charges resource units with a small bucket and
//! answers slowly, so the first reconcile (which reads every member's manager) takes tens of
//! seconds; the assertions are about order, not time.

use std::time::Duration;

use crate::common::serve::*;
use crate::common::{lms_differences, spawn, upn, EnvOptions, ManagerLink};
use rostersync_sim::graph::{CostModel, Latency};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_change_reaches_the_lms_while_a_throttled_reconcile_still_runs_and_is_not_undone() {
    let env = spawn(EnvOptions {
        users: 1200,
        ..Default::default()
    })
    .await;
    // 400 RU per 10 s: the first reconcile's ~1,200 manager reads alone need about half a
    // minute of the bucket; each Graph request takes 20 ms more.
    env.graph.set_cost_model(Some(CostModel {
        ru_limit: Some(400),
        ..Default::default()
    }));
    env.graph.set_latency(Some(Latency {
        fixed: Duration::from_millis(20),
        jitter: Duration::ZERO,
        seed: 16,
    }));
    let members = env.member_ids();
    let changed: Vec<String> = [0, members.len() / 2, members.len() - 1]
        .iter()
        .map(|&i| members[i].clone())
        .collect();
    let s = launch_unready(env).await;
    let env = &s.env;
    wait_for("subscriptions", 30_000, || {
        env.graph.subscriptions().len() >= 2
    })
    .await;
    // The first reconcile has started reading (its reads are the only low-priority ones).
    wait_for("the first reconcile under way", 30_000, || {
        env.graph.cost_stats().ru_low_priority > 0
    })
    .await;
    assert_eq!(
        s.runs(),
        0,
        "the first reconcile ended too early for this test"
    );
    for (n, id) in changed.iter().enumerate() {
        env.graph
            .update_user(id, |u| u.job_title = Some(format!("Live {n}")));
    }
    for (n, id) in changed.iter().enumerate() {
        let want = format!("Live {n}");
        wait_for("a live change in the LMS", 60_000, || {
            title(env, id).as_deref() == Some(want.as_str())
        })
        .await;
    }
    // Order, not time: the changes are in the LMS and the reconcile has not ended.
    assert_eq!(
        s.runs(),
        0,
        "the live changes reached the LMS only once the reconcile was over"
    );
    let stats = env.graph.cost_stats();
    assert!(
        stats.ru_total > stats.ru_low_priority,
        "the worker's reads are sent at normal priority: {stats:?}"
    );

    // Let the reconcile finish: it listed these users before they changed, and must not write
    // their old titles back; afterwards the LMS equals the tenant.
    env.graph.set_cost_model(None);
    env.graph.set_latency(None);
    wait_for("the first reconcile recorded", 120_000, || s.runs() >= 1).await;
    let mut last = Vec::new();
    let settled = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            last = lms_differences(
                &env.graph,
                &env.scim,
                &env.fx.all_group_id,
                upn,
                ManagerLink::Active,
            );
            if last.is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await;
    assert!(
        settled.is_ok(),
        "the LMS differs from the tenant after the run:\n  {}",
        last.join("\n  ")
    );
    for (n, id) in changed.iter().enumerate() {
        assert_eq!(
            title(env, id),
            Some(format!("Live {n}")),
            "undone by the run"
        );
    }
    s.stop().await;
}
