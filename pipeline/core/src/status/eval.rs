//! A group's state from its lag sampled over a window, as Burrow evaluates it: lag that keeps
//! growing while offsets advance is `lagging`, lag that stays while the committed offset does not
//! move is `stalled`, and a group nobody consumes while records wait is `stopped`.

use serde::{Deserialize, Serialize};

/// Worst last: the group's state is the worst of its partitions'.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    Ok,
    Lagging,
    Stalled,
    Stopped,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            State::Ok => "OK",
            State::Lagging => "lagging",
            State::Stalled => "stalled",
            State::Stopped => "stopped",
        }
    }
}

/// One partition in one sample.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Point {
    /// The group's committed offset then (`None`: none).
    pub committed: Option<i64>,
    /// Records behind then.
    pub lag: i64,
}

/// Samples needed before growth counts as lagging: two points are one noisy step.
pub const MIN_LAGGING_POINTS: usize = 3;

/// A partition's state from its points in time order, for a group that has live consumers.
/// Stalled: behind in every point and the committed offset never moved (two points at least).
/// Lagging: the committed offset moved, yet the lag never fell and ended higher than it began.
pub fn partition(points: &[Point]) -> State {
    let (Some(first), Some(last)) = (points.first(), points.last()) else { return State::Ok };
    if points.len() >= 2 && points.iter().all(|p| p.lag > 0) && first.committed == last.committed {
        return State::Stalled;
    }
    let advanced = matches!((first.committed, last.committed), (Some(a), Some(b)) if b > a)
        || (first.committed.is_none() && last.committed.is_some());
    let never_fell = points.windows(2).all(|w| w[1].lag >= w[0].lag);
    if points.len() >= MIN_LAGGING_POINTS && advanced && never_fell && last.lag > first.lag {
        return State::Lagging;
    }
    State::Ok
}

/// What is known of a group besides its partitions' points.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Liveness {
    /// Live processes announcing the group.
    pub instances: usize,
    /// Members the broker lists in the group.
    pub members: usize,
}

/// The group's state and why, from each partition's points (time order; empty for a partition
/// whose lag is not tracked). Stopped: no live instance announces it, or none is a member while
/// records wait. Otherwise the worst partition's state.
pub fn group(live: Liveness, partitions: &[Vec<Point>]) -> (State, Option<String>) {
    let waiting: i64 = partitions.iter().filter_map(|p| p.last()).map(|p| p.lag).sum();
    if live.instances == 0 {
        return (State::Stopped, Some("no live instance runs it".into()));
    }
    if live.members == 0 && waiting > 0 {
        return (State::Stopped, Some(format!("no member in the group and {waiting} record(s) waiting")));
    }
    let states: Vec<State> = partitions.iter().map(|p| partition(p)).collect();
    let worst = states.iter().copied().max().unwrap_or(State::Ok);
    let n = states.iter().filter(|s| **s == worst).count();
    let why = match worst {
        State::Ok => None,
        State::Lagging => Some(format!("lag grew through the window on {n} partition(s) while offsets advanced")),
        State::Stalled => Some(format!("committed offset did not move on {n} partition(s) with records waiting")),
        State::Stopped => None,
    };
    (worst, why)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn pts(v: &[(i64, i64)]) -> Vec<Point> {
        v.iter().map(|&(c, lag)| Point { committed: Some(c), lag }).collect()
    }

    const LIVE: Liveness = Liveness { instances: 1, members: 1 };

    #[test]
    fn the_four_states() {
        assert_eq!(partition(&pts(&[(10, 0), (20, 0), (30, 0)])), State::Ok);
        assert_eq!(partition(&pts(&[(10, 5), (20, 8), (30, 12)])), State::Lagging);
        assert_eq!(partition(&pts(&[(10, 5), (10, 8), (10, 12)])), State::Stalled);
        assert_eq!(partition(&pts(&[(10, 5), (20, 3), (30, 12)])), State::Ok, "lag fell once: catching up");
        assert_eq!(partition(&pts(&[(10, 5), (20, 9)])), State::Ok, "two points are not a trend");
        assert_eq!(partition(&pts(&[(10, 5), (10, 0)])), State::Ok, "caught up without a commit");
        let none = [Point { committed: None, lag: 7 }, Point { committed: None, lag: 7 }];
        assert_eq!(partition(&none), State::Stalled, "never committed, records waiting");

        let behind = vec![pts(&[(10, 5), (20, 5)])];
        assert_eq!(group(Liveness { instances: 0, members: 1 }, &behind).0, State::Stopped);
        assert_eq!(group(Liveness { instances: 0, members: 0 }, &[pts(&[(1, 0)])]).0, State::Stopped);
        assert_eq!(group(Liveness { instances: 1, members: 0 }, &behind).0, State::Stopped);
        assert_eq!(group(Liveness { instances: 1, members: 0 }, &[pts(&[(1, 0)])]).0, State::Ok);
        let mixed = vec![pts(&[(1, 0), (2, 0), (3, 0)]), pts(&[(10, 5), (10, 6), (10, 9)])];
        let (state, why) = group(LIVE, &mixed);
        assert_eq!(state, State::Stalled);
        assert!(why.unwrap().contains("1 partition"));
    }

    fn arb_points() -> impl Strategy<Value = Vec<Point>> {
        prop::collection::vec((0i64..1000, 0i64..1000), 0..12).prop_map(|v| {
            // Committed offsets never go back within a window.
            let mut c = 0;
            v.into_iter()
                .map(|(step, lag)| {
                    c += step % 3;
                    Point { committed: Some(c), lag }
                })
                .collect()
        })
    }

    proptest! {
        /// A partition that is caught up at the end is never stalled, and one caught up
        /// throughout is OK.
        #[test]
        fn caught_up_is_never_stalled(mut points in arb_points()) {
            if let Some(last) = points.last_mut() { last.lag = 0; }
            prop_assert_ne!(partition(&points), State::Stalled);
            for p in &mut points { p.lag = 0; }
            prop_assert_eq!(partition(&points), State::Ok);
        }

        /// Lagging means the lag ended higher than it began and the offset moved; stalled means
        /// it did not move.
        #[test]
        fn verdicts_match_their_definitions(points in arb_points()) {
            match partition(&points) {
                State::Lagging => {
                    prop_assert!(points.last().unwrap().lag > points[0].lag);
                    prop_assert!(points.last().unwrap().committed > points[0].committed);
                }
                State::Stalled => {
                    prop_assert_eq!(points.last().unwrap().committed, points[0].committed);
                    prop_assert!(points.iter().all(|p| p.lag > 0));
                }
                State::Ok => {}
                State::Stopped => prop_assert!(false, "a partition alone is never stopped"),
            }
        }

        /// The group is the worst of its partitions while it has live consumers, and stopped
        /// without any instance whatever its partitions say.
        #[test]
        fn group_is_the_worst_partition(parts in prop::collection::vec(arb_points(), 0..6)) {
            let worst = parts.iter().map(|p| partition(p)).max().unwrap_or(State::Ok);
            prop_assert_eq!(group(LIVE, &parts).0, worst);
            prop_assert_eq!(group(Liveness { instances: 0, members: 3 }, &parts).0, State::Stopped);
        }
    }
}
