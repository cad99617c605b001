//! Examples of each rule, and property tests of the invariants over random logs (definitions
//! anywhere, retries, users claiming with several keys, unordered timestamps, redemptions).

use std::collections::{BTreeMap, HashMap, HashSet};

use proptest::prelude::*;

use super::*;

const C: &str = "c-1";

fn def(stock: u32) -> Definition {
    Definition { title: "t".into(), discount_percent: 10, stock, opens_at: 100, closes_at: 200, valid_for: 50 }
}

fn claim(user: &str, key: &str) -> Request {
    Request::Claim { claim_id: key.into(), user_id: user.into() }
}

fn redeem(user: &str, code: &str, order: &str) -> Request {
    Request::Redeem { user_id: user.into(), code: code.into(), order_id: order.into() }
}

fn reason(d: &Decided) -> Option<RejectReason> {
    match d.decision {
        Decision::Rejected { reason, .. } => Some(reason),
        _ => None,
    }
}

#[test]
fn each_rule_with_its_reason() {
    let mut s = CouponState::default();
    assert_eq!(reason(&s.decide(C, &claim("a", "k"), 150)), Some(RejectReason::UnknownCoupon));
    assert_eq!(s.decide(C, &Request::Define(def(1)), 0).decision, Decision::Defined);
    // Remembered: the same claim stays rejected as it was, with the same event id.
    let again = s.decide(C, &claim("a", "k"), 150);
    assert_eq!((reason(&again), again.changed), (Some(RejectReason::UnknownCoupon), false));
    assert_eq!(reason(&s.decide(C, &claim("a", "k2"), 99)), Some(RejectReason::NotOpen));
    assert_eq!(reason(&s.decide(C, &claim("a", "k3"), 200)), Some(RejectReason::Closed));
    let issued = s.decide(C, &claim("a", "k4"), 100);
    let Decision::Issued { issue, .. } = &issued.decision else { panic!("{issued:?}") };
    assert_eq!((issue.code.clone(), issue.expires_at), (code_for(C, "a"), 150));
    assert_eq!(s.decide(C, &claim("a", "k4"), 199).decision, issued.decision, "a retry gets the same issue");
    assert_eq!(reason(&s.decide(C, &claim("a", "k5"), 120)), Some(RejectReason::AlreadyClaimed));
    assert_eq!(reason(&s.decide(C, &claim("b", "k"), 120)), Some(RejectReason::SoldOut));
    assert_eq!(s.stock_left(), 0);

    let code = code_for(C, "a");
    let refused = |d: Decided| match d.decision {
        Decision::Refused { reason, .. } => Some(reason),
        _ => None,
    };
    assert_eq!(refused(s.decide(C, &redeem("b", &code, "o1"), 120)), Some(RefuseReason::UnknownCode));
    assert_eq!(refused(s.decide(C, &redeem("a", &code, "o1"), 150)), Some(RefuseReason::Expired));
    assert!(matches!(s.decide(C, &redeem("a", &code, "o1"), 149).decision, Decision::Redeemed { .. }));
    let retried = s.decide(C, &redeem("a", &code, "o1"), 300);
    assert!(matches!(retried.decision, Decision::Redeemed { .. }) && !retried.changed, "{retried:?}");
    assert_eq!(refused(s.decide(C, &redeem("a", &code, "o2"), 120)), Some(RefuseReason::AlreadyRedeemed));
    assert_eq!(
        refused(CouponState::default().decide(C, &redeem("a", &code, "o1"), 0)),
        Some(RefuseReason::UnknownCoupon)
    );
}

#[test]
fn definitions_are_checked_and_the_first_holds() {
    assert!(def(3).check(1).is_ok());
    assert!(def(3).check(2).unwrap_err().contains("per_user_limit"));
    assert!(Definition { opens_at: 200, ..def(3) }.check(1).is_err());
    assert!(Definition { valid_for: 0, ..def(3) }.check(1).is_err());
    assert!(Definition { discount_percent: 101, ..def(3) }.check(1).is_err());
    let mut s = CouponState::default();
    assert!(s.decide(C, &Request::Define(def(3)), 0).changed);
    let same = s.decide(C, &Request::Define(def(3)), 5);
    assert_eq!((same.decision, same.changed), (Decision::Defined, false));
    assert!(matches!(s.decide(C, &Request::Define(def(4)), 5).decision, Decision::DefinitionRefused(_)));
    assert_eq!(s.definition, Some(def(3)));
}

#[test]
fn event_ids_name_the_claim_or_the_redemption_outcome() {
    let issued = Decision::Issued {
        user_id: "a".into(),
        issue: Issue { claim_id: "k".into(), code: "X".into(), expires_at: 1 },
    };
    let rejected = Decision::Rejected { user_id: "a".into(), claim_id: "k".into(), reason: RejectReason::SoldOut };
    assert_eq!(issued.event_id(C), rejected.event_id(C), "one claim has one decision, so one id");
    assert_ne!(issued.event_id(C), issued.event_id("c-2"));
    let redeemed = Decision::Redeemed { user_id: "a".into(), code: "X".into(), order_id: "o".into() };
    let refused = Decision::Refused {
        user_id: "a".into(),
        code: "X".into(),
        order_id: "o".into(),
        reason: RefuseReason::UnknownCode,
    };
    assert_ne!(redeemed.event_id(C), refused.event_id(C));
    assert_eq!(Decision::Defined.event_id(C), None);
}

/// One generated record: what it is, and its timestamp.
#[derive(Debug, Clone)]
enum Step {
    Define(u32),
    Claim {
        user: u8,
        key: u8,
    },
    /// Redeems the code of `owner` (issued or not) in the name of `user`.
    Redeem {
        user: u8,
        owner: u8,
        order: u8,
    },
}

fn step() -> impl Strategy<Value = (Step, i64)> {
    let s = prop_oneof![
        1 => (0u32..6).prop_map(Step::Define),
        12 => (0u8..10, 0u8..3).prop_map(|(user, key)| Step::Claim { user, key }),
        3 => (0u8..10, 0u8..10, 0u8..3).prop_map(|(user, owner, order)| Step::Redeem { user, owner, order }),
    ];
    (s, 50i64..260)
}

fn request(step: &Step) -> Request {
    match step {
        Step::Define(stock) => Request::Define(def(*stock)),
        Step::Claim { user, key } => claim(&format!("u{user}"), &format!("k{key}")),
        Step::Redeem { user, owner, order } => {
            redeem(&format!("u{user}"), &code_for(C, &format!("u{owner}")), &format!("o{order}"))
        }
    }
}

fn run(state: &mut CouponState, log: &[(Step, i64)]) -> Vec<Decided> {
    log.iter().map(|(s, at)| state.decide(C, &request(s), *at)).collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn invariants_hold_on_any_log(log in proptest::collection::vec(step(), 0..80), cut in 0usize..80) {
        let mut state = CouponState::default();
        let decided = run(&mut state, &log);
        prop_assert_eq!(decided.len(), log.len(), "every record exactly one decision");

        // The reference: which users must hold the coupon. A claim counts at the first record of
        // its (user, key); it is eligible if a definition came before it and it is in the window.
        let mut stock = None;
        let mut first_of_claim = HashSet::new();
        let mut eligible_in_order = Vec::new();
        for (s, at) in &log {
            match s {
                Step::Define(n) if stock.is_none() => stock = Some(*n as usize),
                // `insert` runs first: every first record of a claim is marked, eligible or not.
                Step::Claim { user, key }
                    if first_of_claim.insert((*user, *key))
                        && stock.is_some()
                        && (100..200).contains(at)
                        && !eligible_in_order.contains(user) =>
                {
                    eligible_in_order.push(*user);
                }
                _ => {}
            }
        }
        let expected: Vec<String> = eligible_in_order
            .iter()
            .take(stock.unwrap_or(0))
            .map(|u| format!("u{u}"))
            .collect();
        let mut issued_to = Vec::new();
        let mut per_claim: HashMap<(String, String), Decision> = HashMap::new();
        let mut redeemed_for: BTreeMap<String, HashSet<String>> = BTreeMap::new();
        for d in &decided {
            match &d.decision {
                Decision::Issued { user_id, issue } => {
                    if d.changed {
                        issued_to.push(user_id.clone());
                    }
                    let prev = per_claim.insert((user_id.clone(), issue.claim_id.clone()), d.decision.clone());
                    prop_assert!(prev.is_none_or(|p| p == d.decision), "a retried claim got another decision");
                }
                Decision::Rejected { user_id, claim_id, .. } => {
                    let prev = per_claim.insert((user_id.clone(), claim_id.clone()), d.decision.clone());
                    prop_assert!(prev.is_none_or(|p| p == d.decision), "a retried claim got another decision");
                }
                Decision::Redeemed { code, order_id, .. } => {
                    redeemed_for.entry(code.clone()).or_default().insert(order_id.clone());
                }
                _ => {}
            }
        }
        // issued = min(stock, distinct eligible claimants), to the first ones in log order, no
        // user twice, never more than stock.
        prop_assert_eq!(&issued_to, &expected);
        let distinct: HashSet<_> = issued_to.iter().collect();
        prop_assert_eq!(distinct.len(), issued_to.len());
        prop_assert!(issued_to.len() <= stock.unwrap_or(0));
        prop_assert_eq!(state.holders.len(), issued_to.len());
        for (code, orders) in &redeemed_for {
            prop_assert_eq!(orders.len(), 1, "code {} redeemed for {:?}", code, orders);
        }

        // Deciding the same log again, from scratch or from the state at any point (a restart
        // from the last commit), gives the same decisions with the same event ids.
        let cut = cut.min(log.len());
        let mut again = CouponState::default();
        let head = run(&mut again, &log[..cut]);
        let snapshot = again.clone();
        let tail = run(&mut again, &log[cut..]);
        prop_assert_eq!(&head[..], &decided[..cut]);
        prop_assert_eq!(&tail[..], &decided[cut..]);
        let mut restarted = snapshot;
        let replayed = run(&mut restarted, &log[cut..]);
        for (a, b) in replayed.iter().zip(&decided[cut..]) {
            prop_assert_eq!(a.decision.event_id(C), b.decision.event_id(C));
        }
        prop_assert_eq!(restarted, state);
    }
}
