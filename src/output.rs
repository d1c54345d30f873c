//! Human-readable rendering of run reports and check results for the terminal.
//!
//! Owns wording only; the same data is printed as JSON with `--json`.

use std::fmt::Write;

use crate::app::{CheckLine, CheckStatus};
use crate::lms::probe::{ProbeReport, RowStatus};
use crate::sync::mapping::{ACTIVE, EXTERNAL_ID, USER_NAME};
use crate::sync::plan::{Action, PlannedChange};
use crate::sync::reconcile::{RunOutcome, RunReport};
use crate::text::clip;

fn opt(v: &Option<crate::sync::mapping::AttrValue>) -> String {
    match v {
        Some(v) => clip(&v.to_string(), 60),
        None => "(none)".into(),
    }
}

/// One line per planned or applied change.
pub(crate) fn change_line(c: &PlannedChange) -> String {
    let detail = match c.action {
        Action::Create => c
            .changes
            .iter()
            .filter(|a| ![USER_NAME, EXTERNAL_ID, ACTIVE].contains(&a.key.as_str()))
            .map(|a| format!("{}={}", a.key, opt(&a.new)))
            .collect::<Vec<_>>()
            .join(", "),
        _ => {
            let diffs = c
                .changes
                .iter()
                .map(|a| format!("{}: {} → {}", a.key, opt(&a.old), opt(&a.new)))
                .collect::<Vec<_>>()
                .join("; ");
            match &c.reason {
                Some(r) => format!("{diffs} ({r})"),
                None => diffs,
            }
        }
    };
    format!(
        "  {:<10} {:<40} {}",
        c.action.as_str(),
        clip(&c.user_name, 40),
        clip(&detail, 400)
    )
}

/// The report of one run; `max_changes` limits the change lines (all for a dry run).
pub fn render_report(r: &RunReport, max_changes: usize) -> String {
    let mut s = String::new();
    let c = &r.counts;
    let kind = if r.dry_run {
        "dry run (nothing applied)"
    } else {
        "reconcile"
    };
    let _ = writeln!(s, "{}: {} {}", r.integration, kind, r.run_id);
    for g in &r.groups {
        let _ = writeln!(
            s,
            "  group {:?} ({}): {} user members",
            g.name, g.id, g.members
        );
    }
    let verb = if r.dry_run { "plan" } else { "applied" };
    let _ = writeln!(
        s,
        "  {verb}: {} create, {} update, {} deactivate, {} reactivate; {} unchanged, {} disabled and not in the LMS, {} failed, {} deferred (of {} members)",
        c.created, c.updated, c.deactivated, c.reactivated, c.unchanged, c.skipped, c.failed, c.deferred, c.members
    );
    for line in r.changes.iter().take(max_changes).map(|c| change_line(&c)) {
        let _ = writeln!(s, "{line}");
    }
    if max_changes > 0 && r.changes.len() > max_changes {
        let _ = writeln!(
            s,
            "  … and {} more changes (use --json for all)",
            r.changes.len() - max_changes
        );
    }
    for f in &r.failures {
        let who = f.user_name.as_deref().unwrap_or("?");
        let _ = writeln!(s, "  FAILED     {} ({}): {}", who, f.entra_id, f.reason);
    }
    for n in &r.notes {
        let _ = writeln!(s, "  note: {n}");
    }
    if let Some(g) = &r.guard {
        let _ = writeln!(s, "  GUARD: {g}");
    }
    if let Some(e) = &r.error {
        let _ = writeln!(s, "  ERROR: {e}");
    }
    let outcome = match r.outcome {
        RunOutcome::Ok => "ok",
        RunOutcome::Partial => "some users failed",
        RunOutcome::GuardTripped => "guard tripped",
        RunOutcome::Failed => "failed",
    };
    let secs = (r.finished_at - r.started_at).num_milliseconds() as f64 / 1000.0;
    let _ = writeln!(s, "  outcome: {outcome} in {secs:.1} s");
    s
}

pub fn render_checks(lines: &[CheckLine]) -> String {
    let mut s = String::new();
    for l in lines {
        let tag = match l.status {
            CheckStatus::Ok => "OK  ",
            CheckStatus::Warn => "WARN",
            CheckStatus::Fail => "FAIL",
        };
        let _ = writeln!(s, "{tag} {}: {}: {}", l.integration, l.what, l.detail);
        if let Some(p) = &l.probe {
            s.push_str(&render_probe(p));
        }
    }
    s
}

/// The probe's table: operation, what the LMS answered, what rostersync will do.
pub(crate) fn render_probe(p: &ProbeReport) -> String {
    let mut s = String::new();
    let w_op = p
        .rows
        .iter()
        .map(|r| r.operation.chars().count())
        .max()
        .unwrap_or(9)
        .clamp(9, 60);
    let w_ans = p
        .rows
        .iter()
        .map(|r| r.answer.chars().count())
        .max()
        .unwrap_or(12)
        .clamp(12, 70);
    let _ = writeln!(
        s,
        "       {:<w_op$}  {:<w_ans$}  rostersync will",
        "operation", "LMS answered"
    );
    for r in &p.rows {
        let tag = match r.status {
            RowStatus::Ok => "ok  ",
            RowStatus::Warn => "warn",
            RowStatus::Fail => "FAIL",
        };
        let _ = writeln!(
            s,
            "  {tag} {:<w_op$}  {:<w_ans$}  {}",
            clip(&r.operation, w_op),
            clip(&r.answer, w_ans),
            r.action
        );
    }
    let _ = writeln!(s, "  dialect now in force:");
    for d in &p.dialect {
        let _ = writeln!(s, "    {d}");
    }
    s
}

/// The process exit status for a set of reports: 1 if any failed or tripped the guard,
/// 2 if some users failed, else 0.
pub fn exit_code(reports: &[RunReport]) -> i32 {
    if reports
        .iter()
        .any(|r| matches!(r.outcome, RunOutcome::Failed | RunOutcome::GuardTripped))
    {
        1
    } else if reports.iter().any(|r| r.outcome == RunOutcome::Partial) {
        2
    } else {
        0
    }
}
