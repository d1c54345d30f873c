//! The changes a run reports (`RunReport::changes`), kept compactly.
//!
//! A first reconcile of 100,000 members applies about 100,000 changes, and `reconcile --json`
//! prints every one, so the run holds them all until it ends. As `PlannedChange` values they
//! took about 350 bytes each in four or five small allocations, and the vector holding them
//! doubled as it grew: measured with the binary, a third of a first reconcile's peak RSS.
//! Here each change is kept as the JSON the report prints (about 160 bytes for a create), one
//! after another in blocks of [`BLOCK`] bytes, and decoded again when it is read. What the
//! report does not print (`record`, `manager`, `linked`) is not kept.

use std::fmt;

use serde::{Deserialize, Serialize, Serializer};

use super::plan::PlannedChange;

/// Bytes per block; a change never spans two (one larger than this gets a block of its own).
const BLOCK: usize = 1 << 20;

/// A list of changes in the order they were pushed.
#[derive(Clone, Default)]
pub struct Changes {
    blocks: Vec<Vec<u8>>,
    /// Each change's block and byte range in it.
    spans: Vec<Span>,
}

#[derive(Clone, Copy)]
struct Span {
    block: u32,
    start: u32,
    end: u32,
}

impl Changes {
    pub(crate) fn new() -> Changes {
        Changes::default()
    }

    pub fn len(&self) -> usize {
        self.spans.len()
    }

    pub fn is_empty(&self) -> bool {
        self.spans.is_empty()
    }

    #[cfg(test)]
    pub(crate) fn clear(&mut self) {
        self.blocks.clear();
        self.spans.clear();
    }

    /// Appends `c` as the report shows it.
    pub(crate) fn push(&mut self, c: &PlannedChange) {
        let json = match serde_json::to_vec(c) {
            Ok(j) => j,
            // Strings, numbers and enums only: encoding cannot fail; were it to, the change
            // is left out of the list rather than the run failing over its report.
            Err(e) => {
                tracing::error!(user = %c.entra_id, error = %e, "could not keep a change for the report");
                return;
            }
        };
        let fits = self
            .blocks
            .last()
            .is_some_and(|b| b.len() + json.len() <= b.capacity());
        if !fits {
            self.blocks.push(Vec::with_capacity(BLOCK.max(json.len())));
        }
        let block = self.blocks.len() - 1;
        let b = &mut self.blocks[block];
        let start = b.len();
        b.extend_from_slice(&json);
        self.spans.push(Span {
            block: block as u32,
            start: start as u32,
            end: b.len() as u32,
        });
    }

    pub(crate) fn extend(&mut self, changes: impl IntoIterator<Item = PlannedChange>) {
        for c in changes {
            self.push(&c);
        }
    }

    /// The `i`th change, as the report shows it (`record` empty, no `manager`).
    pub fn get(&self, i: usize) -> Option<PlannedChange> {
        let s = self.spans.get(i)?;
        let bytes = &self.blocks[s.block as usize][s.start as usize..s.end as usize];
        // Written by `push` from a `PlannedChange`: it reads back.
        serde_json::from_slice(bytes).ok()
    }

    /// The changes from the `from`th on.
    pub(crate) fn iter_from(&self, from: usize) -> impl Iterator<Item = PlannedChange> + '_ {
        (from..self.len()).filter_map(|i| self.get(i))
    }

    pub fn iter(&self) -> impl Iterator<Item = PlannedChange> + '_ {
        self.iter_from(0)
    }

    /// The Entra ids of the changes, in order (only the id is decoded).
    pub(crate) fn entra_ids(&self) -> impl Iterator<Item = String> + '_ {
        #[derive(Deserialize)]
        struct IdOnly {
            entra_id: String,
        }
        self.spans.iter().filter_map(|s| {
            let bytes = &self.blocks[s.block as usize][s.start as usize..s.end as usize];
            serde_json::from_slice::<IdOnly>(bytes)
                .ok()
                .map(|i| i.entra_id)
        })
    }

    /// All of them, decoded (tests and small reports).
    #[cfg(test)]
    pub(crate) fn to_vec(&self) -> Vec<PlannedChange> {
        self.iter().collect()
    }
}

impl From<Vec<PlannedChange>> for Changes {
    fn from(v: Vec<PlannedChange>) -> Changes {
        let mut c = Changes::new();
        c.extend(v);
        c
    }
}

impl fmt::Debug for Changes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.iter()).finish()
    }
}

/// A JSON array of the changes, exactly as a `Vec<PlannedChange>` is written.
impl Serialize for Changes {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(self.iter())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sync::mapping::{AttrChange, AttrValue, Record};
    use crate::sync::plan::Action;

    fn change(i: usize, action: Action) -> PlannedChange {
        let mut record = Record::new();
        record.insert("title".into(), AttrValue::Str("Engineer".into()));
        PlannedChange {
            action,
            entra_id: format!("u{i}"),
            user_name: format!("user{i}@example.com"),
            target_id: (action != Action::Create).then(|| format!("t{i}")),
            changes: vec![AttrChange {
                key: "title".into(),
                old: None,
                new: Some(AttrValue::Str(format!("Title {i} \"quoted\" ünïcode"))),
            }],
            reason: (action == Action::Deactivate).then(|| "left all groups".into()),
            record,
            manager: Some("m1".into()),
            linked: true,
        }
    }

    /// What the report keeps of a change: everything it prints.
    fn as_reported(mut c: PlannedChange) -> PlannedChange {
        c.record = Record::new();
        c.manager = None;
        c.linked = false;
        c
    }

    #[test]
    fn changes_read_back_in_order_and_serialize_as_a_vec_would() {
        let all: Vec<PlannedChange> = (0..20_000)
            .map(|i| {
                let a = [
                    Action::Create,
                    Action::Update,
                    Action::Deactivate,
                    Action::Reactivate,
                ][i % 4];
                change(i, a)
            })
            .collect();
        let mut kept = Changes::new();
        for c in &all[..10] {
            kept.push(c);
        }
        kept.extend(all[10..].iter().cloned());
        assert_eq!(kept.len(), all.len());
        assert!(kept.blocks.len() > 1, "spans several blocks");
        let want: Vec<PlannedChange> = all.iter().cloned().map(as_reported).collect();
        assert_eq!(kept.to_vec(), want);
        assert_eq!(kept.get(12_345), Some(want[12_345].clone()));
        assert_eq!(kept.get(all.len()), None);
        assert_eq!(kept.iter_from(19_998).count(), 2);
        assert!(kept.entra_ids().eq(all.iter().map(|c| c.entra_id.clone())));
        assert_eq!(
            serde_json::to_string_pretty(&kept).unwrap(),
            serde_json::to_string_pretty(&all).unwrap()
        );
        assert_eq!(format!("{kept:?}"), format!("{want:?}"));
        let mut empty = kept.clone();
        empty.clear();
        assert!(empty.is_empty());
        assert_eq!(serde_json::to_string(&empty).unwrap(), "[]");
    }

    #[test]
    fn a_change_larger_than_a_block_gets_one_of_its_own() {
        let mut big = change(1, Action::Update);
        big.changes[0].new = Some(AttrValue::Str("x".repeat(BLOCK + 10)));
        let mut kept = Changes::new();
        kept.push(&change(0, Action::Create));
        kept.push(&big);
        kept.push(&change(2, Action::Create));
        assert_eq!(kept.blocks.len(), 3);
        assert_eq!(kept.get(1), Some(as_reported(big)));
        assert_eq!(kept.get(2), Some(as_reported(change(2, Action::Create))));
    }
}
