//! The mass-deactivation guard's memory (`<integration>/guard`): every deactivation written,
//! by whichever path (reconcile, worker, `sync-user`), with its time and user, so that one
//! budget per integration holds over a rolling window and across restarts (a user deactivated
//! twice within it counts once); and the trip, once the budget was exceeded, which holds
//! further deactivations until it is cleared.

use std::collections::HashSet;

use chrono::{DateTime, Duration, Utc};
use serde::{Deserialize, Serialize};

use super::{decode, encode, IntegrationStore, StoreError};
use crate::model::change::GuardTrip;

/// Meta key of the current trip.
const TRIP: &str = "guard_trip";

/// A trip as stored: what it said, when, under which limit.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StoredTrip {
    pub at: DateTime<Utc>,
    pub trip: GuardTrip,
}

fn key(at: DateTime<Utc>, seq: u64) -> [u8; 16] {
    let mut k = [0u8; 16];
    k[..8].copy_from_slice(&at.timestamp_millis().to_be_bytes());
    k[8..].copy_from_slice(&seq.to_be_bytes());
    k
}

impl IntegrationStore {
    /// Records the users deactivated now.
    pub(crate) fn record_deactivations(&self, users: &[String]) -> Result<(), StoreError> {
        if users.is_empty() {
            return Ok(());
        }
        let seq = self.db.generate_id()?;
        self.guard.insert(key(Utc::now(), seq), encode(&users)?)?;
        Ok(())
    }

    /// The users deactivated since `since`; older records are dropped on the way.
    pub(crate) fn deactivated_since(
        &self,
        since: DateTime<Utc>,
    ) -> Result<HashSet<String>, StoreError> {
        let tree = format!("{}/guard", self.name);
        let cut = key(since, 0);
        let mut old = Vec::new();
        let mut users = HashSet::new();
        for r in self.guard.iter() {
            let (k, v) = r?;
            if k.as_ref() < &cut[..] {
                old.push(k);
                continue;
            }
            let these: Vec<String> = decode(&tree, &k, &v)?;
            users.extend(these);
        }
        for k in old {
            self.guard.remove(k)?;
        }
        Ok(users)
    }

    /// The trip that holds deactivations now, if one was recorded within `window`.
    pub fn guard_trip(&self, window: Duration) -> Result<Option<StoredTrip>, StoreError> {
        let t: Option<StoredTrip> = self.get_meta(TRIP)?;
        Ok(t.filter(|t| t.at > Utc::now() - window))
    }

    pub(crate) fn put_guard_trip(&self, trip: &GuardTrip) -> Result<(), StoreError> {
        self.put_meta(
            TRIP,
            &StoredTrip {
                at: Utc::now(),
                trip: trip.clone(),
            },
        )
    }

    /// An operator allowed the held deactivations (`--allow-mass-deactivation`).
    pub fn clear_guard_trip(&self) -> Result<(), StoreError> {
        self.meta.remove(TRIP.as_bytes())?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use crate::store::tests::store_a;

    use super::*;

    #[test]
    fn deactivated_users_are_counted_once_over_the_window_and_the_trip_expires() {
        let (_s, a) = store_a();
        let users =
            |r: std::ops::Range<u32>| -> Vec<String> { r.map(|i| format!("u{i}")).collect() };
        a.record_deactivations(&users(0..20)).unwrap();
        a.record_deactivations(&[]).unwrap();
        a.record_deactivations(&users(15..25)).unwrap();
        let hour_ago = Utc::now() - Duration::hours(1);
        assert_eq!(a.deactivated_since(hour_ago).unwrap().len(), 25);
        assert!(a
            .deactivated_since(Utc::now() + Duration::seconds(1))
            .unwrap()
            .is_empty());
        // The second call dropped the old records.
        assert!(a.deactivated_since(hour_ago).unwrap().is_empty());
        let trip = GuardTrip {
            would_deactivate: 30,
            allowed: 25,
            active_before: 250,
            limit: "10%".into(),
            used: 20,
        };
        a.put_guard_trip(&trip).unwrap();
        assert_eq!(
            a.guard_trip(Duration::hours(24)).unwrap().unwrap().trip,
            trip
        );
        assert!(a.guard_trip(Duration::zero()).unwrap().is_none());
        a.clear_guard_trip().unwrap();
        assert!(a.guard_trip(Duration::hours(24)).unwrap().is_none());
    }
}
