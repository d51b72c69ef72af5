//! How a worker's answers went: counts by status class and a histogram of how long its
//! handler took, cumulative since the worker started. The worker counts them, reports them
//! in its `stats` control message, and the front end sums them per pool for `/metrics`; the
//! buckets are defined once, here.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// Upper bounds of the duration buckets, in microseconds; one more bucket takes the rest.
pub const DURATION_BUCKETS_US: [u64; 10] = [
    500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 500_000, 1_000_000,
];
/// Status classes 1xx to 5xx.
pub const CLASSES: usize = 5;
const BUCKETS: usize = DURATION_BUCKETS_US.len() + 1;

/// Counts by class, per duration bucket (not cumulative; the last is over every bound), and
/// the sum of the durations.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Outcomes {
    pub classes: [u64; CLASSES],
    pub buckets: [u64; BUCKETS],
    pub sum_us: u64,
}

fn class_of(status: u16) -> usize {
    (usize::from(status / 100)).clamp(1, CLASSES) - 1
}

fn bucket_of(us: u64) -> usize {
    DURATION_BUCKETS_US
        .iter()
        .position(|&b| us <= b)
        .unwrap_or(BUCKETS - 1)
}

impl Outcomes {
    pub fn count(&self) -> u64 {
        self.buckets.iter().sum()
    }

    pub fn add(&mut self, other: &Outcomes) {
        for (a, b) in self.classes.iter_mut().zip(other.classes) {
            *a = a.saturating_add(b);
        }
        for (a, b) in self.buckets.iter_mut().zip(other.buckets) {
            *a = a.saturating_add(b);
        }
        self.sum_us = self.sum_us.saturating_add(other.sum_us);
    }

    /// `classes=a,b,c,d,e buckets=..., sum_us=N` (the `stats` message's tail).
    pub fn encode(&self) -> String {
        let join = |v: &[u64]| v.iter().map(u64::to_string).collect::<Vec<_>>().join(",");
        format!(
            "classes={} buckets={} sum_us={}",
            join(&self.classes),
            join(&self.buckets),
            self.sum_us
        )
    }

    /// The whole text [`Outcomes::encode`] makes.
    pub fn parse(text: &str) -> Option<Outcomes> {
        let mut words = text.split(' ');
        let (c, b, s) = (words.next()?, words.next()?, words.next()?);
        if words.next().is_some() {
            return None;
        }
        Outcomes::decode(c, b, s)
    }

    /// The three words [`Outcomes::encode`] makes, each checked; None if any is not.
    pub fn decode(classes: &str, buckets: &str, sum: &str) -> Option<Outcomes> {
        fn list<const N: usize>(s: &str, name: &str) -> Option<[u64; N]> {
            let v = s.strip_prefix(name)?.strip_prefix('=')?;
            let mut out = [0u64; N];
            let mut parts = v.split(',');
            for o in &mut out {
                let p = parts.next()?;
                if p.is_empty() || p.len() > 20 || !p.bytes().all(|b| b.is_ascii_digit()) {
                    return None;
                }
                *o = p.parse().ok()?;
            }
            parts.next().is_none().then_some(out)
        }
        let [sum_us] = list::<1>(sum, "sum_us")?;
        Some(Outcomes {
            classes: list(classes, "classes")?,
            buckets: list(buckets, "buckets")?,
            sum_us,
        })
    }
}

impl std::iter::Sum for Outcomes {
    fn sum<I: Iterator<Item = Outcomes>>(iter: I) -> Outcomes {
        iter.fold(Outcomes::default(), |mut sum, o| {
            sum.add(&o);
            sum
        })
    }
}

/// One worker thread's counts: written by that thread only (a load and a store, no locked
/// instruction), read by the thread that reports.
#[derive(Debug, Default)]
pub struct Cells {
    classes: [AtomicU64; CLASSES],
    buckets: [AtomicU64; BUCKETS],
    sum_us: AtomicU64,
}

fn bump(cell: &AtomicU64, by: u64) {
    cell.store(cell.load(Relaxed).wrapping_add(by), Relaxed);
}

impl Cells {
    /// An answer with `status` whose handler took `us` microseconds. Only its own thread
    /// calls this.
    pub fn record(&self, status: u16, us: u64) {
        bump(&self.classes[class_of(status)], 1);
        bump(&self.buckets[bucket_of(us)], 1);
        bump(&self.sum_us, us);
    }

    pub fn read(&self) -> Outcomes {
        let mut o = Outcomes::default();
        for (a, c) in o.classes.iter_mut().zip(&self.classes) {
            *a = c.load(Relaxed);
        }
        for (a, c) in o.buckets.iter_mut().zip(&self.buckets) {
            *a = c.load(Relaxed);
        }
        o.sum_us = self.sum_us.load(Relaxed);
        o
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recorded_answers_land_in_their_class_and_bucket_and_survive_the_message() {
        let c = Cells::default();
        c.record(200, 100);
        c.record(204, 700);
        c.record(404, 2_000_000);
        c.record(503, 1_000);
        c.record(99, 0);
        let o = c.read();
        assert_eq!(o.classes, [1, 2, 0, 1, 1]);
        assert_eq!(o.buckets[0], 2, "100 µs and 0 µs");
        assert_eq!(o.buckets[1], 2, "700 µs and 1000 µs (bounds are inclusive)");
        assert_eq!(o.buckets[10], 1, "over every bound");
        assert_eq!(o.count(), 5);
        assert_eq!(o.sum_us, 2_001_800);
        assert_eq!(Outcomes::parse(&o.encode()), Some(o));
        assert_eq!([o, o].into_iter().sum::<Outcomes>().count(), 10);
    }

    #[test]
    fn malformed_outcomes_are_refused() {
        let ok = (
            "classes=1,2,3,4,5",
            "buckets=0,0,0,0,0,0,0,0,0,0,1",
            "sum_us=3",
        );
        assert!(Outcomes::decode(ok.0, ok.1, ok.2).is_some());
        for (c, b, s) in [
            ("classes=1,2,3,4", ok.1, ok.2),
            ("classes=1,2,3,4,5,6", ok.1, ok.2),
            (ok.0, "buckets=0,0,0,0,0,0,0,0,0,0", ok.2),
            (ok.0, ok.1, "sum_us=-3"),
            (ok.0, ok.1, "sum=3"),
            ("classes=1,,3,4,5", ok.1, ok.2),
            ("classes=1,2,3,4,99999999999999999999999", ok.1, ok.2),
        ] {
            assert_eq!(Outcomes::decode(c, b, s), None, "{c} {b} {s}");
        }
    }
}
