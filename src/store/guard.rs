//! The mass-deactivation guard's memory (`<integration>/guard`): every deactivation written,
//! by whichever path (reconcile, worker, `sync-user`), with its time, so that one budget per
//! integration holds over a rolling window and across restarts; and the trip, once the budget
//! was exceeded, which holds further deactivations until it is cleared.

use chrono::{DateTime, Duration, Utc};
use serde::{Deserialize, Serialize};

use super::{decode, encode, IntegrationStore, StoreError};
use crate::sync::plan::GuardTrip;

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
    /// Records `n` deactivations written now.
    pub fn record_deactivations(&self, n: u64) -> Result<(), StoreError> {
        if n == 0 {
            return Ok(());
        }
        let seq = self.db.generate_id()?;
        self.guard.insert(key(Utc::now(), seq), encode(&n)?)?;
        Ok(())
    }

    /// Deactivations written since `since`; older records are dropped on the way.
    pub fn deactivations_since(&self, since: DateTime<Utc>) -> Result<u64, StoreError> {
        let tree = format!("{}/guard", self.name);
        let cut = key(since, 0);
        let mut old = Vec::new();
        let mut total = 0u64;
        for r in self.guard.iter() {
            let (k, v) = r?;
            if k.as_ref() < &cut[..] {
                old.push(k);
                continue;
            }
            let n: u64 = decode(&tree, &k, &v)?;
            total = total.saturating_add(n);
        }
        for k in old {
            self.guard.remove(k)?;
        }
        Ok(total)
    }

    /// The trip that holds deactivations now, if one was recorded within `window`.
    pub fn guard_trip(&self, window: Duration) -> Result<Option<StoredTrip>, StoreError> {
        let t: Option<StoredTrip> = self.get_meta(TRIP)?;
        Ok(t.filter(|t| t.at > Utc::now() - window))
    }

    pub fn put_guard_trip(&self, trip: &GuardTrip) -> Result<(), StoreError> {
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
    fn deactivations_are_summed_over_the_window_and_the_trip_expires() {
        let (_s, a) = store_a();
        a.record_deactivations(20).unwrap();
        a.record_deactivations(0).unwrap();
        a.record_deactivations(5).unwrap();
        let hour_ago = Utc::now() - Duration::hours(1);
        assert_eq!(a.deactivations_since(hour_ago).unwrap(), 25);
        assert_eq!(
            a.deactivations_since(Utc::now() + Duration::seconds(1))
                .unwrap(),
            0
        );
        // The second call dropped the old records.
        assert_eq!(a.deactivations_since(hour_ago).unwrap(), 0);
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
