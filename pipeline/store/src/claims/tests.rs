//! The claim stage's commits on both backends: an assignment fences the owner before it, and a
//! batch's rows and next offset are written together or not at all.

use super::*;

on_both_backends!(
    a_stale_owner_cannot_commit,
    rows_and_offset_commit_together,
    the_first_partition_count_holds,
    rejections_are_found_by_claim,
);

const GROUP: &str = "tidings-claims";

fn rows(coupon: &str, users: &[&str]) -> ClaimRows {
    ClaimRows {
        definitions: vec![DefinitionRow {
            coupon_id: coupon.into(),
            title: "10% off".into(),
            discount_percent: 10,
            stock: 2,
            opens_at: 0,
            closes_at: 100,
            valid_for: 10,
        }],
        holders: users
            .iter()
            .map(|u| HolderRow {
                coupon_id: coupon.into(),
                user_id: (*u).into(),
                claim_id: format!("k-{u}"),
                code: format!("CODE-{u}"),
                expires_at: 60,
            })
            .collect(),
        rejections: vec![RejectionRow {
            coupon_id: coupon.into(),
            user_id: "late".into(),
            claim_id: "k".into(),
            reason: "sold_out".into(),
        }],
        redemptions: users
            .first()
            .map(|u| RedemptionRow { coupon_id: coupon.into(), code: format!("CODE-{u}"), order_id: "o-1".into() })
            .into_iter()
            .collect(),
    }
}

async fn a_stale_owner_cannot_commit(store: &Store) {
    let first = store.assign_claim_partition(GROUP, 3).await.unwrap();
    assert_eq!(first, ClaimOwnership { epoch: 1, next_offset: None });
    let batch = rows("c-1", &["a", "b"]);
    assert_eq!(store.commit_claims(GROUP, 3, first.epoch, &batch, 10).await.unwrap(), ClaimCommit::Committed);
    assert_eq!(store.load_claim_rows(3).await.unwrap(), batch);
    assert!(store.load_claim_rows(4).await.unwrap().is_empty(), "rows are loaded by partition");

    // The partition is assigned again (a rebalance): the new owner sees the committed offset, and
    // the old owner's next batch is refused whole, offset included.
    let second = store.assign_claim_partition(GROUP, 3).await.unwrap();
    assert_eq!(second, ClaimOwnership { epoch: 2, next_offset: Some(10) });
    let stale = rows("c-2", &["a"]);
    assert_eq!(store.commit_claims(GROUP, 3, first.epoch, &stale, 20).await.unwrap(), ClaimCommit::Fenced);
    assert_eq!(store.load_claim_rows(3).await.unwrap(), batch, "a fenced batch writes nothing");
    let again = store.assign_claim_partition(GROUP, 3).await.unwrap();
    assert_eq!(again, ClaimOwnership { epoch: 3, next_offset: Some(10) }, "a fenced batch moves no offset");
    assert_eq!(store.commit_claims(GROUP, 3, 2, &stale, 20).await.unwrap(), ClaimCommit::Fenced);
    assert_eq!(store.commit_claims(GROUP, 3, again.epoch, &stale, 20).await.unwrap(), ClaimCommit::Committed);
    assert_eq!(store.load_claim_rows(3).await.unwrap().holders.len(), 3);
    // Epochs are per consumer group and partition.
    assert_eq!(store.assign_claim_partition("other", 3).await.unwrap().epoch, 1);
}

async fn rows_and_offset_commit_together(store: &Store) {
    let owner = store.assign_claim_partition(GROUP, 0).await.unwrap();
    let batch = rows("c-1", &["a"]);
    store.commit_claims(GROUP, 0, owner.epoch, &batch, 5).await.unwrap();
    // A batch that issues to a user holding the coupon already violates the table's key: the whole
    // transaction fails, its other rows and its offset with it.
    let mut bad = ClaimRows { holders: rows("c-1", &["b", "a"]).holders, ..ClaimRows::default() };
    bad.rejections.push(RejectionRow {
        coupon_id: "c-1".into(),
        user_id: "x".into(),
        claim_id: "k".into(),
        reason: "closed".into(),
    });
    let err = store.commit_claims(GROUP, 0, owner.epoch, &bad, 9).await.unwrap_err();
    assert!(err.rejection().is_some(), "{err}");
    assert_eq!(store.load_claim_rows(0).await.unwrap(), batch);
    let reread = store.assign_claim_partition(GROUP, 0).await.unwrap();
    assert_eq!(reread.next_offset, Some(5));
    // A redeemed code cannot be redeemed again, for any order.
    let twice = ClaimRows {
        redemptions: vec![RedemptionRow { coupon_id: "c-1".into(), code: "CODE-a".into(), order_id: "o-2".into() }],
        ..ClaimRows::default()
    };
    assert!(store.commit_claims(GROUP, 0, reread.epoch, &twice, 9).await.unwrap_err().rejection().is_some());
    // Many rows in one batch (more than one statement's worth).
    let users: Vec<String> = (0..4_500).map(|i| format!("u{i}")).collect();
    let many = ClaimRows {
        holders: users
            .iter()
            .map(|u| HolderRow {
                coupon_id: "c-big".into(),
                user_id: u.clone(),
                claim_id: "k".into(),
                code: format!("C-{u}"),
                expires_at: 1,
            })
            .collect(),
        ..ClaimRows::default()
    };
    assert_eq!(store.commit_claims(GROUP, 0, reread.epoch, &many, 12).await.unwrap(), ClaimCommit::Committed);
    assert_eq!(store.load_claim_rows(0).await.unwrap().holders.len(), 1 + users.len());
}

async fn the_first_partition_count_holds(store: &Store) {
    assert_eq!(store.pin_claim_partitions(GROUP, 6).await.unwrap(), 6);
    assert_eq!(store.pin_claim_partitions(GROUP, 6).await.unwrap(), 6);
    assert_eq!(store.pin_claim_partitions(GROUP, 12).await.unwrap(), 6, "a later count does not replace it");
    assert_eq!(store.pin_claim_partitions("other", 12).await.unwrap(), 12);
}

/// An owner loads a partition without its rejections and finds those of a batch's claims by key,
/// on any partition, many claims at once (more than one statement's worth).
async fn rejections_are_found_by_claim(store: &Store) {
    let owner = store.assign_claim_partition(GROUP, 2).await.unwrap();
    let mut batch = rows("c-1", &["a"]);
    batch.rejections.extend((0..2_500).map(|i| RejectionRow {
        coupon_id: "c-1".into(),
        user_id: format!("u{i}"),
        claim_id: "k".into(),
        reason: "closed".into(),
    }));
    store.commit_claims(GROUP, 2, owner.epoch, &batch, 3).await.unwrap();
    let coupons = store.load_claim_coupons(2).await.unwrap();
    assert_eq!(coupons, ClaimRows { rejections: Vec::new(), ..batch.clone() });
    let key = |c: &str, u: &str, k: &str| (c.to_string(), u.to_string(), k.to_string());
    let mut asked =
        vec![key("c-1", "late", "k"), key("c-1", "late", "k2"), key("c-2", "late", "k"), key("c-1", "a", "k-a")];
    asked.extend((0..2_500).rev().map(|i| key("c-1", &format!("u{i}"), "k")));
    let mut found = store.find_claim_rejections(&asked).await.unwrap();
    found.sort_by(|a, b| (&a.user_id, &a.claim_id).cmp(&(&b.user_id, &b.claim_id)));
    let mut expected = batch.rejections.clone();
    expected.sort_by(|a, b| (&a.user_id, &a.claim_id).cmp(&(&b.user_id, &b.claim_id)));
    assert_eq!(found, expected);
    assert!(store.find_claim_rejections(&[]).await.unwrap().is_empty());
}
