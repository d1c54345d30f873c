//! SCIM bulk (RFC 7644 §3.7): used when the LMS advertises it, never otherwise, and the LMS
//! ends up exactly as with one request per user.

use crate::common::{spawn, upn, EnvOptions, TestEnv};
use rostersync::sync::reconcile::{RunOutcome, RunReport};
use rostersync_sim::scim::{ScimFaults, SimBulk, UserFault, UserFaultKind};

fn bulk(max_operations: usize) -> Option<SimBulk> {
    Some(SimBulk {
        max_operations,
        ..Default::default()
    })
}

/// A first sync in a fresh environment, counted from its start: it succeeds, nobody fails,
/// and the LMS equals the directory.
async fn first_sync(opts: EnvOptions) -> (TestEnv, RunReport) {
    let env = spawn(opts).await;
    env.scim.reset_counts();
    let r = env.reconcile().await;
    assert_eq!(r.outcome, RunOutcome::Ok, "{:?} {:?}", r.error, r.failures);
    assert_eq!(r.counts.failed, 0);
    env.assert_lms_matches_tenant(upn);
    (env, r)
}

/// A first sync against an LMS offering bulk (50 operations a request): every create goes in
/// a bulk request (no POST /Users of its own), the LMS equals the directory with every
/// manager linked, and a no-change run sends nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_first_sync_goes_in_bulk_requests_and_ends_as_without() {
    let (env, r) = first_sync(EnvOptions {
        users: 300,
        scim_bulk: bulk(50),
        ..Default::default()
    })
    .await;
    let members = env.member_ids().len() as u64;
    let (bulks, ops, posts) = (
        env.scim.request_count("bulk"),
        env.scim.request_count("bulk_op"),
        env.scim.request_count("POST"),
    );
    assert_eq!(
        posts, bulks,
        "every POST was a bulk request ({ops} operations)"
    );
    assert!(
        bulks >= members / 50 && bulks <= members / 5,
        "{bulks} bulk requests for {members} members"
    );
    assert!(
        ops >= r.counts.created && r.counts.created > members / 2,
        "{ops} operations for {} creates",
        r.counts.created
    );
    assert!(env.linked_managers() > 0, "the fixture has managers");
    assert!(
        r.notes.iter().any(|n| n.contains("SCIM bulk")),
        "the run says it used bulk: {:?}",
        r.notes
    );

    // Updates go in bulk too; a no-change run writes nothing.
    let movers: Vec<String> = env.member_ids().into_iter().take(40).collect();
    for id in &movers {
        env.graph
            .update_user(id, |u| u.job_title = Some("Moved".into()));
    }
    env.scim.reset_counts();
    let r = env.reconcile().await;
    assert_eq!(r.outcome, RunOutcome::Ok, "{:?}", r.error);
    assert_eq!(r.counts.updated, movers.len() as u64);
    assert_eq!(
        env.scim.request_count("PATCH"),
        0,
        "the updates went in bulk"
    );
    assert!(env.scim.request_count("bulk") >= 1);
    env.assert_lms_matches_tenant(upn);
    env.scim.reset_counts();
    let r = env.reconcile().await;
    assert_eq!(r.counts.updated + r.counts.created, 0);
    assert_eq!(env.scim.request_count("bulk"), 0);
}

/// One user's operation fails inside a bulk request (the LMS answers it 400): that user is
/// reported failed, and everyone else is written.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failed_operation_is_that_users_failure_only() {
    let env = spawn(EnvOptions {
        users: 120,
        scim_bulk: bulk(100),
        ..Default::default()
    })
    .await;
    let victim = env.member_ids()[7].clone();
    env.scim.set_faults(ScimFaults {
        users: vec![UserFault {
            external_id: victim.clone(),
            kind: UserFaultKind::Status(400),
        }],
        ..Default::default()
    });
    let r = env.reconcile().await;
    assert_eq!(r.counts.failed, 1, "{:?}", r.failures);
    assert!(
        r.failures.iter().any(|f| f.entra_id == victim),
        "{:?}",
        r.failures
    );
    assert!(env.scim.request_count("bulk") >= 1);
    // The next run, the fault gone, creates that user and links its reports to it, and
    // writes nobody else: everyone else was written by the first.
    let reports = env
        .fx
        .tenant
        .users
        .iter()
        .filter(|u| u.manager_id.as_deref() == Some(victim.as_str()))
        .filter(|u| env.member_ids().contains(&u.id))
        .count() as u64;
    env.scim.set_faults(ScimFaults::default());
    let r = env.reconcile().await;
    assert_eq!(
        (r.counts.created, r.counts.updated, r.counts.failed),
        (1, reports, 0)
    );
    env.assert_lms_matches_tenant(upn);
}

/// Bulk is never used when it is not advertised, nor when `target.bulk = false`.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bulk_is_used_only_when_advertised_and_allowed() {
    for (scim_bulk, extra) in [(None, ""), (bulk(50), "bulk = false")] {
        let (env, r) = first_sync(EnvOptions {
            users: 60,
            scim_bulk,
            target_extra: extra.into(),
            ..Default::default()
        })
        .await;
        assert_eq!(env.scim.request_count("bulk"), 0, "{extra:?}");
        assert!(env.scim.request_count("POST") >= r.counts.created);
    }
}

/// An LMS that advertises bulk but answers `/Bulk` with 501: the writes go alone, once each,
/// the run says so, and nobody fails. One that refuses a request as too large (413) gets
/// smaller ones, the refused operations among them (not one request per user).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_lms_that_refuses_bulk_gets_single_requests_and_one_that_refuses_a_size_gets_smaller_ones(
) {
    let (env, r) = first_sync(EnvOptions {
        users: 80,
        scim_bulk: Some(SimBulk {
            broken: true,
            ..Default::default()
        }),
        ..Default::default()
    })
    .await;
    let members = r.counts.created;
    let posts = env.scim.request_count("POST");
    assert!(
        posts <= members + 2,
        "bulk refused once, then one POST per user: {posts} POSTs for {members}"
    );
    assert!(
        r.notes.iter().any(|n| n.contains("refused POST /Bulk")),
        "{:?}",
        r.notes
    );

    let (env, r) = first_sync(EnvOptions {
        users: 200,
        scim_bulk: Some(SimBulk {
            max_operations: 1000,
            enforced_max_operations: Some(20),
            ..Default::default()
        }),
        ..Default::default()
    })
    .await;
    let (bulks, refused, posts) = (
        env.scim.request_count("bulk"),
        env.scim.request_count("413"),
        env.scim.request_count("POST"),
    );
    assert!(
        refused >= 1 && bulks * 2 >= posts && posts <= 40,
        "bulk went on in smaller requests: {bulks} answered, {refused} refused, {posts} POSTs for {} creates",
        r.counts.created
    );
    assert!(env.scim.request_count("413") >= 1);
}

/// A first sync in bulk links each new user to its manager in the user's own create, also
/// when the manager is created in the same request (`bulkId` references, RFC 7644 §3.7.2):
/// no PATCH at all, one operation per user, and no request waits for the answer of the one
/// before it level by level down the management chain (7 bulk requests before, for 300 users
/// that fit in one).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn managers_created_in_the_same_bulk_request_are_referenced_by_bulk_id() {
    for max_operations in [1000, 50] {
        let (env, r) = first_sync(EnvOptions {
            users: 300,
            scim_bulk: bulk(max_operations),
            ..Default::default()
        })
        .await;
        let c = |k: &str| env.scim.request_count(k);
        let what = format!(
            "{max_operations} a request: {} bulk requests, {} operations, {} references, {} PATCH operations, {} PATCH requests, {} creates",
            c("bulk"),
            c("bulk_op"),
            c("bulk_ref"),
            c("bulk_patch"),
            c("PATCH"),
            r.counts.created
        );
        assert!(env.linked_managers() > 100, "{what}");
        assert!(c("bulk_ref") > 50, "managers referenced by bulkId: {what}");
        assert_eq!(
            c("bulk_patch") + c("PATCH"),
            0,
            "no link afterwards: {what}"
        );
        assert!(
            c("bulk_op") * 100 <= r.counts.created * 102,
            "one operation per user: {what}"
        );
        // Before: 7 requests, one per level of the management chain. (With 50 a request,
        // what is queued is shared among the sending slots, and a report cut off from its
        // manager's request waits for its answer: the count varies, 11-14, as before.)
        if max_operations >= 1000 {
            assert!(c("bulk") <= 3, "{what}");
        }
        // The index holds what the LMS holds: a second run has nothing to do.
        env.scim.reset_counts();
        let r = env.reconcile().await;
        assert_eq!(r.counts.created + r.counts.updated + r.counts.failed, 0);
        assert_eq!(c("bulk") + c("PATCH") + c("POST"), 0);
    }
}

/// An LMS that offers bulk but keeps a `bulkId` reference as the literal string it is: the
/// client reads back one user so created, sees it, says so once and stops referencing; every
/// manager ends up linked all the same (afterwards, for the users of that first request).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_lms_that_keeps_bulk_ids_as_they_are_gets_its_managers_linked_all_the_same() {
    let (env, r) = first_sync(EnvOptions {
        users: 300,
        scim_bulk: Some(SimBulk {
            max_operations: 40,
            literal_references: true,
            ..Default::default()
        }),
        ..Default::default()
    })
    .await;
    // first_sync: the LMS equals the directory, managers included.
    assert!(env.linked_managers() > 100);
    assert!(
        r.notes
            .iter()
            .any(|n| n.contains("does not resolve a SCIM bulk bulkId reference")),
        "{:?}",
        r.notes
    );
    // References stop after the first request read back: at most what the four requests out
    // together held (of the ~250 users with a manager), and one read back.
    let kept = env.scim.request_count("bulk_ref_kept");
    assert!(
        kept > 0 && kept <= 4 * 40,
        "{kept} references kept literally"
    );
    // A second run finds nothing to do.
    let r = env.reconcile().await;
    assert_eq!(r.counts.created + r.counts.updated + r.counts.failed, 0);
}
