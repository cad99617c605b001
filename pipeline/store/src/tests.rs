//! Store operations checked against both backends (a fresh PostgreSQL database and a fresh SQLite
//! file per test), plus PostgreSQL-only checks of large batches and transactional failure.

use super::*;
use std::time::Instant;
use tidings_core::Notification;

on_both_backends!(
    write_batch_inserts_rows,
    same_batch_twice_inserts_nothing,
    offsets_are_saved_and_never_move_backward,
    offsets_are_set_backward_for_a_reset,
    large_batches_go_through,
    segments_are_idempotent,
    segment_pages_concatenate_to_the_sorted_members,
    rooms_add_and_remove,
    inbox_pages_with_cursor,
    unread_and_mark_read,
    mark_all_read_stops_at_the_position_seen,
    archive_leaves_the_inbox_and_the_unread_count,
    unread_counts_per_category,
    notifications_after_resumes_oldest_first,
    nul_characters_do_not_fail_a_batch,
    chat_rooms_search_history_unread_and_edits,
    chat_outbox_and_room_pages,
);

fn notification(user: &str, event: &str, stream_partition: i32, stream_offset: i64) -> StoredNotification {
    StoredNotification {
        notification: Notification {
            notification_id: Notification::id_for(event, user),
            user_id: user.into(),
            kind: "order.placed".into(),
            title: format!("Order {event} placed"),
            body: "Thanks for your order — ünïcödé 😀".into(),
            link: Some(format!("/orders/{event}")),
            source_event_id: event.into(),
            occurred_at: 1_700_000_000_123_456 + stream_offset,
            source_topic: "orders".into(),
            source_partition: 1,
            source_offset: 1000 + stream_offset,
            data: None,
            inbox: true,
            category: String::new(),
            recipients: vec![],
        },
        stream_partition,
        stream_offset,
    }
}

fn chat(id: &str, room: &str, text: &str, offset: i64) -> ChatMessage {
    ChatMessage {
        message_id: id.into(),
        room_id: room.into(),
        sender_id: "alice".into(),
        text: text.into(),
        occurred_at: 1_700_000_000_000_001 + offset,
        source_partition: 0,
        source_offset: offset,
    }
}

fn offset(topic: &str, partition: i32, next_offset: i64) -> OffsetUpdate {
    OffsetUpdate { topic: topic.into(), partition, next_offset }
}

/// Chat rows as stored, ordered by id (the timestamp read back with backend-specific SQL).
async fn stored_chat(store: &Store) -> Vec<ChatMessage> {
    let micros = match store {
        Store::Postgres(_) => "(extract(epoch FROM occurred_at) * 1000000)::int8",
        Store::Sqlite(_) => "occurred_at",
    };
    let sql = format!(
        "SELECT message_id, room_id, sender_id, text, source_partition, source_offset, {micros} \
         FROM chat_messages ORDER BY message_id"
    );
    let rows: Vec<(String, String, String, String, i32, i64, i64)> =
        on_pool!(store, |pool, _Db| sqlx::query_as(&sql).fetch_all(pool).await.unwrap());
    rows.into_iter()
        .map(|(message_id, room_id, sender_id, text, source_partition, source_offset, occurred_at)| ChatMessage {
            message_id,
            room_id,
            sender_id,
            text,
            occurred_at,
            source_partition,
            source_offset,
        })
        .collect()
}

async fn write_batch_inserts_rows(store: &Store) {
    let mut no_link = notification("bob", "e3", 0, 7);
    no_link.notification.link = None;
    no_link.notification.title = String::new();
    let batch = Batch {
        notifications: vec![notification("alice", "e1", 0, 5), notification("alice", "e2", 0, 6), no_link.clone()],
        chat_messages: vec![chat("m2", "r1", "hi 👋", 11), chat("m1", "r1", "", 10)],
        chat_changes: Vec::new(),
        offsets: vec![offset("notifications", 0, 8), offset("chat", 0, 12)],
    };
    let stats = store.write_batch("sink", &batch).await.unwrap();
    assert_eq!(stats, WriteStats { notifications_inserted: 3, chat_inserted: 2 });
    assert_eq!(store.count_notifications().await.unwrap(), 3);

    // Every field comes back as written, including the timestamp to the microsecond and the NULL link.
    let alice = store.inbox("alice", None, 10).await.unwrap();
    let expected: Vec<InboxItem> = batch.notifications[..2]
        .iter()
        .rev()
        .map(|s| InboxItem {
            notification: s.notification.clone(),
            stream_partition: s.stream_partition,
            stream_offset: s.stream_offset,
            read: false,
        })
        .collect();
    assert_eq!(alice, expected);
    let bob = store.inbox("bob", None, 10).await.unwrap();
    assert_eq!(bob.len(), 1);
    assert_eq!(bob[0].notification, no_link.notification);

    let mut chats = batch.chat_messages.clone();
    chats.sort_by(|a, b| a.message_id.cmp(&b.message_id));
    assert_eq!(stored_chat(store).await, chats);
}

async fn same_batch_twice_inserts_nothing(store: &Store) {
    let batch = Batch {
        notifications: (0..50).map(|i| notification(&format!("u{}", i % 7), &format!("e{i}"), 0, i)).collect(),
        chat_messages: (0..20).map(|i| chat(&format!("m{i}"), "r", "text", i)).collect(),
        chat_changes: Vec::new(),
        offsets: vec![offset("notifications", 0, 50)],
    };
    let first = store.write_batch("sink", &batch).await.unwrap();
    assert_eq!(first, WriteStats { notifications_inserted: 50, chat_inserted: 20 });
    let second = store.write_batch("sink", &batch).await.unwrap();
    assert_eq!(second, WriteStats { notifications_inserted: 0, chat_inserted: 0 });
    assert_eq!(store.count_notifications().await.unwrap(), 50);
    assert_eq!(stored_chat(store).await.len(), 20);

    // Overlapping redelivery plus a duplicate inside one batch: only the genuinely new rows count.
    let mut overlap = Batch {
        notifications: batch.notifications[40..].to_vec(),
        chat_messages: vec![chat("m19", "r", "changed", 19), chat("m20", "r", "new", 20)],
        chat_changes: Vec::new(),
        offsets: vec![],
    };
    overlap.notifications.push(notification("u1", "e50", 0, 50));
    overlap.notifications.push(notification("u1", "e50", 0, 50));
    let third = store.write_batch("sink", &overlap).await.unwrap();
    assert_eq!(third, WriteStats { notifications_inserted: 1, chat_inserted: 1 });
    assert_eq!(store.count_notifications().await.unwrap(), 51);
    // The first write wins: a redelivered id never overwrites the stored row.
    let m19 = stored_chat(store).await.into_iter().find(|m| m.message_id == "m19").unwrap();
    assert_eq!(m19.text, "text");
}

async fn offsets_are_saved_and_never_move_backward(store: &Store) {
    assert!(store.load_offsets("sink", "notifications").await.unwrap().is_empty());
    let batch = Batch {
        notifications: vec![notification("a", "e1", 0, 9)],
        offsets: vec![offset("notifications", 0, 10), offset("notifications", 1, 5), offset("chat", 0, 3)],
        ..Batch::default()
    };
    store.write_batch("sink", &batch).await.unwrap();
    let saved = store.load_offsets("sink", "notifications").await.unwrap();
    assert_eq!(saved, HashMap::from([(0, 10), (1, 5)]));
    assert_eq!(store.load_offsets("sink", "chat").await.unwrap(), HashMap::from([(0, 3)]));
    assert!(store.load_offsets("other-consumer", "notifications").await.unwrap().is_empty());

    // Partition 0 goes back (ignored), 1 goes forward; repeated entries for one partition keep the max.
    let offsets_only = Batch {
        offsets: vec![
            offset("notifications", 0, 7),
            offset("notifications", 1, 9),
            offset("notifications", 1, 8),
            offset("notifications", 2, 1),
        ],
        ..Batch::default()
    };
    assert_eq!(store.write_batch("sink", &offsets_only).await.unwrap(), WriteStats::default());
    let saved = store.load_offsets("sink", "notifications").await.unwrap();
    assert_eq!(saved, HashMap::from([(0, 10), (1, 9), (2, 1)]));

    // Forgetting is per consumer, over every topic.
    store.write_batch("other", &Batch { offsets: vec![offset("chat", 0, 4)], ..Batch::default() }).await.unwrap();
    assert_eq!(store.forget_offsets("sink").await.unwrap(), 4);
    assert!(store.load_offsets("sink", "notifications").await.unwrap().is_empty());
    assert_eq!(store.load_offsets("other", "chat").await.unwrap(), HashMap::from([(0, 4)]));
}

/// `tidings offsets reset`: offsets set backward and forward, a partition without a row created, other
/// consumers untouched; the claim stage's offsets are read without bumping an epoch.
async fn offsets_are_set_backward_for_a_reset(store: &Store) {
    let batch =
        Batch { offsets: vec![offset("notifications", 0, 10), offset("notifications", 1, 5)], ..Batch::default() };
    store.write_batch("sink", &batch).await.unwrap();
    store.write_batch("other", &batch).await.unwrap();
    let reset = [("notifications".to_string(), 0, 2), ("notifications".to_string(), 1, 7), ("chat".to_string(), 3, 0)];
    store.set_offsets("sink", &reset).await.unwrap();
    assert_eq!(store.load_offsets("sink", "notifications").await.unwrap(), HashMap::from([(0, 2), (1, 7)]));
    assert_eq!(store.load_offsets("sink", "chat").await.unwrap(), HashMap::from([(3, 0)]));
    assert_eq!(store.load_offsets("other", "notifications").await.unwrap(), HashMap::from([(0, 10), (1, 5)]));

    assert!(store.claim_offsets("claims").await.unwrap().is_empty());
    let owner = store.assign_claim_partition("claims", 4).await.unwrap();
    assert!(store.claim_offsets("claims").await.unwrap().is_empty(), "no offset committed yet");
    let rows = claims::ClaimRows::default();
    store.commit_claims("claims", 4, owner.epoch, &rows, 17).await.unwrap();
    assert_eq!(store.claim_offsets("claims").await.unwrap(), vec![(4, 17)]);
    assert_eq!(
        store.assign_claim_partition("claims", 4).await.unwrap().epoch,
        owner.epoch + 1,
        "reads bumped no epoch"
    );
}

/// Many notifications over many users in one transaction, then 20k-row batches with the rate printed
/// (informational only: `cargo test … -- --nocapture`).
async fn large_batches_go_through(store: &Store) {
    let make = |from: i64, n: i64| Batch {
        notifications: (from..from + n)
            .map(|i| notification(&format!("user-{}", i % 5000), &format!("ev-{i}"), (i % 4) as i32, i))
            .collect(),
        offsets: vec![offset("notifications", 0, from + n)],
        ..Batch::default()
    };
    let big = make(0, 100_000);
    let stats = store.write_batch("sink", &big).await.unwrap();
    assert_eq!(stats.notifications_inserted, 100_000);
    assert_eq!(store.count_notifications().await.unwrap(), 100_000);
    assert_eq!(store.load_offsets("sink", "notifications").await.unwrap(), HashMap::from([(0, 100_000)]));

    let batches: Vec<Batch> = (0..5).map(|b| make(100_000 + b * 20_000, 20_000)).collect();
    let started = Instant::now();
    for batch in &batches {
        assert_eq!(store.write_batch("sink", batch).await.unwrap().notifications_inserted, 20_000);
    }
    let secs = started.elapsed().as_secs_f64();
    println!(
        "{}: 5 x 20000-row batches in {secs:.2}s = {:.0} rows/s (debug build of this crate)",
        store.backend(),
        100_000.0 / secs
    );
    assert_eq!(store.count_notifications().await.unwrap(), 200_000);
}

async fn segments_are_idempotent(store: &Store) {
    let users = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    assert_eq!(store.add_segment_members("vip", &users(&["c", "a", "b"])).await.unwrap(), 3);
    assert_eq!(store.add_segment_members("vip", &users(&["b", "d", "d", "c"])).await.unwrap(), 1);
    assert_eq!(store.add_segment_members("vip", &[]).await.unwrap(), 0);
    assert_eq!(all_members(store, "vip").await.unwrap(), users(&["a", "b", "c", "d"]));
    assert!(all_members(store, "nobody").await.unwrap().is_empty());

    // Larger than one SQLite statement chunk and one COPY chunk.
    let many: Vec<String> = (0..60_000).map(|i| format!("segment-user-{i:06}")).collect();
    assert_eq!(store.add_segment_members("all", &many).await.unwrap(), 60_000);
    assert_eq!(store.add_segment_members("all", &many).await.unwrap(), 0);
    assert_eq!(all_members(store, "all").await.unwrap(), many);
    assert_eq!(all_members(store, "vip").await.unwrap().len(), 4);
}

async fn segment_pages_concatenate_to_the_sorted_members(store: &Store) {
    let users: Vec<String> = (0..23).rev().map(|i| format!("u{i:02}")).collect();
    store.add_segment_members("s", &users).await.unwrap();
    store.add_segment_members("other", &["u05".to_string(), "u50".to_string()]).await.unwrap();
    let mut sorted = users.clone();
    sorted.sort();

    for limit in [1, 5, 23, 100] {
        let mut all = Vec::new();
        let mut after: Option<String> = None;
        let mut pages = 0;
        loop {
            let page = store.segment_members_page("s", after.as_deref(), limit).await.unwrap();
            assert!(page.len() <= limit as usize, "limit {limit}: {page:?}");
            if page.is_empty() {
                break;
            }
            pages += 1;
            after = page.last().cloned();
            all.extend(page);
        }
        assert_eq!(all, sorted, "limit {limit}");
        assert_eq!(pages, 23_usize.div_ceil(limit as usize), "limit {limit}");
    }
    assert_eq!(all_members(store, "s").await.unwrap(), sorted);

    let page = |after: Option<&'static str>, limit| store.segment_members_page("s", after, limit);
    assert_eq!(page(None, 1).await.unwrap(), ["u00"]);
    // Strictly after the cursor, whether or not the cursor is a member.
    assert_eq!(page(Some("u10"), 2).await.unwrap(), ["u11", "u12"]);
    assert_eq!(page(Some("u105"), 2).await.unwrap(), ["u11", "u12"]);
    assert_eq!(page(Some("u21"), 10).await.unwrap(), ["u22"]);
    assert!(page(Some("u22"), 10).await.unwrap().is_empty());
    assert!(page(Some("v"), 10).await.unwrap().is_empty());
    assert!(store.segment_members_page("nobody", None, 10).await.unwrap().is_empty());
    assert!(store.segment_members_page("nobody", Some("u00"), 10).await.unwrap().is_empty());
}

/// A whole segment, through its pages.
async fn all_members(store: &Store, segment: &str) -> Result<Vec<String>, StoreError> {
    store.segment_members_page(segment, None, u32::MAX).await
}

/// Joins then leaves, as the chat API does one user at a time.
async fn update_room(store: &Store, room: &str, add: &[String], remove: &[String]) -> Result<(), StoreError> {
    for u in add {
        store.join_room(room, u, 1).await?;
    }
    for u in remove {
        store.leave_room(room, u).await?;
    }
    Ok(())
}

async fn rooms_add_and_remove(store: &Store) {
    let users = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    update_room(store, "r1", &users(&["carol", "alice", "bob"]), &[]).await.unwrap();
    update_room(store, "r2", &users(&["alice"]), &[]).await.unwrap();
    assert_eq!(store.room_members("r1").await.unwrap(), users(&["alice", "bob", "carol"]));

    // Adding an existing member is fine; removing a non-member is fine; a user in both ends up removed.
    update_room(store, "r1", &users(&["dave", "bob", "erin"]), &users(&["alice", "zed", "erin"])).await.unwrap();
    assert_eq!(store.room_members("r1").await.unwrap(), users(&["bob", "carol", "dave"]));
    assert_eq!(store.room_members("r2").await.unwrap(), users(&["alice"]));

    let crowd: Vec<String> = (0..2500).map(|i| format!("guest-{i:04}")).collect();
    update_room(store, "r1", &crowd, &[]).await.unwrap();
    assert_eq!(store.room_members("r1").await.unwrap().len(), 2503);
    update_room(store, "r1", &[], &crowd).await.unwrap();
    assert_eq!(store.room_members("r1").await.unwrap(), users(&["bob", "carol", "dave"]));
    assert!(store.room_members("empty").await.unwrap().is_empty());
}

async fn inbox_pages_with_cursor(store: &Store) {
    // alice: 25 notifications on partition 2 plus 2 older ones on partition 1; bob interleaved.
    let mut notifications: Vec<StoredNotification> =
        (0..25).map(|i| notification("alice", &format!("a{i}"), 2, 100 + 2 * i)).collect();
    notifications.extend((0..25).map(|i| notification("bob", &format!("b{i}"), 2, 101 + 2 * i)));
    notifications.push(notification("alice", "old0", 1, 500));
    notifications.push(notification("alice", "old1", 1, 501));
    store.write_batch("sink", &Batch { notifications, ..Batch::default() }).await.unwrap();

    let mut seen = Vec::new();
    let mut cursor = None;
    let mut pages = 0;
    loop {
        let page = store.inbox("alice", cursor, 10).await.unwrap();
        if page.is_empty() {
            break;
        }
        pages += 1;
        assert!(page.len() <= 10);
        assert!(page.iter().all(|i| i.notification.user_id == "alice"));
        let last = page.last().unwrap();
        cursor = Some((last.stream_partition, last.stream_offset));
        seen.extend(page.into_iter().map(|i| (i.stream_partition, i.stream_offset)));
    }
    assert_eq!(pages, 3);
    let mut expected: Vec<(i32, i64)> = (0..25).rev().map(|i| (2, 100 + 2 * i)).collect();
    expected.extend([(1, 501), (1, 500)]);
    assert_eq!(seen, expected);

    // A cursor in the middle of a page resumes strictly after it.
    let page = store.inbox("alice", Some((2, 110)), 3).await.unwrap();
    let offsets: Vec<i64> = page.iter().map(|i| i.stream_offset).collect();
    assert_eq!(offsets, vec![108, 106, 104]);
    assert!(store.inbox("nobody", None, 10).await.unwrap().is_empty());
}

async fn unread_and_mark_read(store: &Store) {
    let batch = Batch {
        notifications: vec![
            notification("alice", "e1", 0, 1),
            notification("alice", "e2", 0, 2),
            notification("alice", "e3", 0, 3),
            notification("bob", "e1", 0, 4),
        ],
        ..Batch::default()
    };
    store.write_batch("sink", &batch).await.unwrap();
    assert_eq!(store.unread_count("alice").await.unwrap(), 3);
    assert_eq!(store.unread_count("bob").await.unwrap(), 1);
    assert_eq!(store.unread_count("nobody").await.unwrap(), 0);

    let e2 = Notification::id_for("e2", "alice");
    assert!(store.mark_read("alice", e2).await.unwrap());
    assert_eq!(store.unread_count("alice").await.unwrap(), 2);
    // Marking again still reports the notification as the user's and changes nothing.
    assert!(store.mark_read("alice", e2).await.unwrap());
    assert_eq!(store.unread_count("alice").await.unwrap(), 2);

    // Someone else's notification, or an unknown id: false, and nothing changes.
    let bobs = Notification::id_for("e1", "bob");
    assert!(!store.mark_read("alice", bobs).await.unwrap());
    assert!(!store.mark_read("alice", uuid::Uuid::new_v4()).await.unwrap());
    assert_eq!(store.unread_count("bob").await.unwrap(), 1);

    let inbox = store.inbox("alice", None, 10).await.unwrap();
    let read: Vec<(i64, bool)> = inbox.iter().map(|i| (i.stream_offset, i.read)).collect();
    assert_eq!(read, vec![(3, false), (2, true), (1, false)]);
    assert!(!store.inbox("bob", None, 10).await.unwrap()[0].read);
}

async fn mark_all_read_stops_at_the_position_seen(store: &Store) {
    let mut notifications: Vec<StoredNotification> =
        (0..5).map(|i| notification("alice", &format!("a{i}"), 1, 10 + i)).collect();
    notifications.push(notification("bob", "b0", 1, 12));
    store.write_batch("sink", &Batch { notifications, ..Batch::default() }).await.unwrap();
    let id = |event: &str, user: &str| Notification::id_for(event, user);
    assert!(store.mark_read("alice", id("a1", "alice")).await.unwrap());
    assert!(store.archive("alice", id("a0", "alice")).await.unwrap());

    // The client showed a3 as newest; a4 arrived meanwhile. a1 was read, a0 archived: neither counts.
    assert_eq!(store.mark_all_read("alice", id("a3", "alice")).await.unwrap(), Some(2));
    assert_eq!(store.unread_count("alice").await.unwrap(), 1);
    let read: Vec<(i64, bool)> =
        store.inbox("alice", None, 10).await.unwrap().iter().map(|i| (i.stream_offset, i.read)).collect();
    assert_eq!(read, vec![(14, false), (13, true), (12, true), (11, true)]);
    assert!(!store.archived("alice", None, 10).await.unwrap()[0].read, "archived ones are left as they are");
    assert_eq!(store.unread_count("bob").await.unwrap(), 1, "another user's rows at the same positions");

    // Again changes nothing; another user's id or an unknown one is no position of alice's.
    assert_eq!(store.mark_all_read("alice", id("a3", "alice")).await.unwrap(), Some(0));
    assert_eq!(store.mark_all_read("alice", id("b0", "bob")).await.unwrap(), None);
    assert_eq!(store.mark_all_read("alice", uuid::Uuid::new_v4()).await.unwrap(), None);
    assert_eq!(store.unread_count("alice").await.unwrap(), 1);
    assert_eq!(store.mark_all_read("alice", id("a4", "alice")).await.unwrap(), Some(1));
    assert_eq!(store.unread_count("alice").await.unwrap(), 0);
}

async fn archive_leaves_the_inbox_and_the_unread_count(store: &Store) {
    let mut notifications: Vec<StoredNotification> =
        (0..12).map(|i| notification("alice", &format!("a{i}"), 2, 100 + i)).collect();
    notifications.push(notification("bob", "a3", 2, 50));
    store.write_batch("sink", &Batch { notifications, ..Batch::default() }).await.unwrap();
    let id = |i: i64| Notification::id_for(&format!("a{i}"), "alice");
    let archived = [1, 4, 5, 8, 11];
    for &i in &archived {
        assert!(store.archive("alice", id(i)).await.unwrap());
    }
    assert!(store.archive("alice", id(4)).await.unwrap(), "archiving again still finds it");
    assert!(!store.archive("alice", Notification::id_for("a3", "bob")).await.unwrap());
    assert!(!store.unarchive("alice", Notification::id_for("a3", "bob")).await.unwrap());
    assert!(!store.archive("alice", uuid::Uuid::new_v4()).await.unwrap());
    assert_eq!(store.unread_count("alice").await.unwrap(), 7);
    assert_eq!(store.inbox("bob", None, 10).await.unwrap().len(), 1);

    // Both lists page by cursor, newest first, and split alice's rows between them.
    let all = |archived_list: bool| async move {
        let (mut seen, mut cursor) = (Vec::new(), None);
        loop {
            let page = if archived_list {
                store.archived("alice", cursor, 2).await.unwrap()
            } else {
                store.inbox("alice", cursor, 2).await.unwrap()
            };
            let Some(last) = page.last() else { return seen };
            cursor = Some((last.stream_partition, last.stream_offset));
            seen.extend(page.iter().map(|i| i.stream_offset - 100));
        }
    };
    assert_eq!(all(true).await, vec![11, 8, 5, 4, 1]);
    assert_eq!(all(false).await, vec![10, 9, 7, 6, 3, 2, 0]);

    assert!(store.unarchive("alice", id(8)).await.unwrap());
    assert!(store.unarchive("alice", id(8)).await.unwrap(), "unarchiving again still finds it");
    assert_eq!(all(true).await, vec![11, 5, 4, 1]);
    assert_eq!(all(false).await, vec![10, 9, 8, 7, 6, 3, 2, 0]);
    assert_eq!(store.unread_count("alice").await.unwrap(), 8);
    assert_eq!(store.unread_count("bob").await.unwrap(), 1);
}

async fn unread_counts_per_category(store: &Store) {
    let categorized = |user: &str, event: &str, offset: i64, category: &str| {
        let mut n = notification(user, event, 0, offset);
        n.notification.category = category.into();
        n
    };
    let notifications = vec![
        categorized("alice", "o1", 1, "orders"),
        categorized("alice", "o2", 2, "orders"),
        categorized("alice", "o3", 3, "orders"),
        categorized("alice", "m1", 4, "marketing"),
        categorized("alice", "m2", 5, "marketing"),
        categorized("alice", "old", 6, ""),
        categorized("bob", "p1", 7, "payment"),
    ];
    store.write_batch("sink", &Batch { notifications, ..Batch::default() }).await.unwrap();
    assert!(store.mark_read("alice", Notification::id_for("o1", "alice")).await.unwrap());
    assert!(store.archive("alice", Notification::id_for("m2", "alice")).await.unwrap());

    let counts = store.unread_counts("alice").await.unwrap();
    let by = |v: &[(&str, u64)]| v.iter().map(|(c, n)| (c.to_string(), *n)).collect::<Vec<_>>();
    // The row without a category counts in the total only; read and archived ones nowhere.
    assert_eq!(counts, UnreadCounts { total: 4, by_category: by(&[("marketing", 1), ("orders", 2)]) });
    assert_eq!(counts.total, store.unread_count("alice").await.unwrap());
    assert_eq!(
        store.unread_counts("bob").await.unwrap(),
        UnreadCounts { total: 1, by_category: by(&[("payment", 1)]) }
    );
    assert_eq!(store.unread_counts("nobody").await.unwrap(), UnreadCounts::default());
}

async fn notifications_after_resumes_oldest_first(store: &Store) {
    let mut notifications: Vec<StoredNotification> =
        (0..10).map(|i| notification("alice", &format!("a{i}"), 3, 10 * i)).collect();
    notifications.push(notification("alice", "elsewhere", 1, 1000));
    notifications.push(notification("bob", "b", 3, 55));
    store.write_batch("sink", &Batch { notifications, ..Batch::default() }).await.unwrap();

    let after = store.notifications_after("alice", 3, 40, 100).await.unwrap();
    let offsets: Vec<i64> = after.iter().map(|i| i.stream_offset).collect();
    assert_eq!(offsets, vec![50, 60, 70, 80, 90]);
    assert!(after.iter().all(|i| i.notification.user_id == "alice" && i.stream_partition == 3));
    let limited = store.notifications_after("alice", 3, 35, 2).await.unwrap();
    assert_eq!(limited.iter().map(|i| i.stream_offset).collect::<Vec<_>>(), vec![40, 50]);
    assert!(store.notifications_after("alice", 3, 90, 10).await.unwrap().is_empty());
    assert_eq!(store.notifications_after("alice", 1, -1, 10).await.unwrap().len(), 1);
}

async fn nul_characters_do_not_fail_a_batch(store: &Store) {
    let mut n = notification("alice", "nul", 0, 1);
    n.notification.body = "a\0b".into();
    let batch = Batch {
        notifications: vec![n],
        chat_messages: vec![chat("m\0", "r", "x\0y", 1)],
        chat_changes: Vec::new(),
        offsets: vec![offset("chat", 0, 2)],
    };
    let stats = store.write_batch("sink", &batch).await.unwrap();
    assert_eq!(stats, WriteStats { notifications_inserted: 1, chat_inserted: 1 });
    let body = store.inbox("alice", None, 1).await.unwrap().remove(0).notification.body;
    // PostgreSQL text cannot hold NUL, so the store keeps U+FFFD there; SQLite keeps the text as is.
    match store {
        Store::Postgres(_) => assert_eq!(body, "a\u{FFFD}b"),
        Store::Sqlite(_) => assert_eq!(body, "a\0b"),
    }
    // The replacement is deterministic, so a redelivery still deduplicates.
    assert_eq!(store.write_batch("sink", &batch).await.unwrap(), WriteStats::default());
}

/// A batch that PostgreSQL rejects mid-COPY stores neither rows nor offsets, is not retriable, and
/// leaves the pool usable.
#[tokio::test]
async fn postgres_failed_batch_leaves_nothing() {
    let (store, _url) = crate::testing::fresh_postgres().await.unwrap();
    let mut bad = notification("alice", "bad", 0, 2);
    // Before 4713 BC, and so far back that the shift to PostgreSQL's epoch overflows: must not turn
    // into `-infinity` (which PostgreSQL would accept).
    bad.notification.occurred_at = i64::MIN;
    let batch = Batch {
        notifications: vec![notification("alice", "good", 0, 1), bad],
        chat_messages: vec![chat("m1", "r", "hi", 1)],
        chat_changes: Vec::new(),
        offsets: vec![offset("notifications", 0, 3)],
    };
    // More attempts than pooled connections: every connection must come back usable.
    for _ in 0..10 {
        let err = store.write_batch("sink", &batch).await.unwrap_err();
        assert!(!err.is_retriable(), "{err}");
    }
    assert_eq!(store.count_notifications().await.unwrap(), 0);
    assert!(stored_chat(&store).await.is_empty());
    assert!(store.load_offsets("sink", "notifications").await.unwrap().is_empty());

    let good = Batch { notifications: vec![notification("alice", "good", 0, 1)], ..Batch::default() };
    assert_eq!(store.write_batch("sink", &good).await.unwrap().notifications_inserted, 1);
}

fn message(room: &str, id: &str, sender: &str, seq: i64) -> ChatMessage {
    ChatMessage {
        message_id: id.into(),
        room_id: room.into(),
        sender_id: sender.into(),
        text: format!("text of {id}"),
        occurred_at: 1_700_000_000_000_000 + seq,
        source_partition: 0,
        source_offset: seq,
    }
}

async fn chat_rooms_search_history_unread_and_edits(store: &Store) {
    use super::chat::{ChatChange, NewRoom, RoomAccess};
    let tags = |t: &[&str]| t.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let (tea, both, alice) = (tags(&["tea"]), tags(&["green", "tea"]), tags(&["alice"]));
    let room = |id: &'static str, t: &'static str| NewRoom {
        room_id: id,
        kind: "group",
        name: "Room",
        creator_id: "alice",
        product_id: None,
        tags: if t == "both" { &both } else { &tea },
        members: &alice,
        created_at: 1,
    };
    assert!(store.create_room(&room("r1", "both")).await.unwrap());
    assert!(!store.create_room(&room("r1", "tea")).await.unwrap(), "the same id twice creates nothing");
    assert!(store.create_room(&room("r2", "tea")).await.unwrap());
    let r1 = store.room("r1").await.unwrap().unwrap();
    assert_eq!((r1.tags.clone(), r1.members, r1.closed), (tags(&["green", "tea"]), 1, false));
    assert_eq!(store.room("nope").await.unwrap(), None);

    // Search: every asked tag, paged by room id.
    let found = |rooms: Vec<super::chat::Room>| rooms.into_iter().map(|r| r.room_id).collect::<Vec<_>>();
    assert_eq!(found(store.search_rooms(&tags(&["tea"]), None, 10).await.unwrap()), ["r1", "r2"]);
    assert_eq!(found(store.search_rooms(&tags(&["tea", "green"]), None, 10).await.unwrap()), ["r1"]);
    assert_eq!(found(store.search_rooms(&tags(&["tea"]), Some("r1"), 10).await.unwrap()), ["r2"]);
    assert_eq!(found(store.search_rooms(&tags(&["tea"]), None, 1).await.unwrap()), ["r1"]);
    // A later page with several tags: the tags' binds follow the tag count, limit and cursor.
    let page = store.search_rooms(&tags(&["green", "tea"]), Some("r0"), 1).await.unwrap();
    assert_eq!(page.iter().map(|r| (r.room_id.as_str(), r.tags.clone())).collect::<Vec<_>>(), [("r1", both.clone())]);
    assert_eq!(found(store.search_rooms(&tags(&["tea"]), Some("r0"), 1).await.unwrap()), ["r1"]);
    store.close_room("r2").await.unwrap();
    assert_eq!(
        found(store.search_rooms(&tags(&["tea"]), None, 10).await.unwrap()),
        ["r1"],
        "closed rooms are not found"
    );

    // Membership and access.
    assert_eq!(
        store.room_access("r1", "bob", None).await.unwrap(),
        Some(RoomAccess { closed: false, member: false, members: 1, stored_at: None })
    );
    assert!(store.join_room("r1", "bob", 2).await.unwrap());
    assert!(!store.join_room("r1", "bob", 3).await.unwrap());
    assert_eq!(
        store.room_access("r1", "bob", None).await.unwrap(),
        Some(RoomAccess { closed: false, member: true, members: 2, stored_at: None })
    );
    assert_eq!(
        store.room_access("r2", "alice", None).await.unwrap(),
        Some(RoomAccess { closed: true, member: true, members: 1, stored_at: None })
    );
    assert_eq!(store.room_access("nope", "alice", None).await.unwrap(), None);

    // History, unread counts (others' messages after the read position) and the room list.
    let batch = Batch {
        chat_messages: vec![
            message("r1", "m1", "alice", 10),
            message("r1", "m2", "bob", 11),
            message("r1", "m3", "bob", 12),
        ],
        ..Batch::default()
    };
    store.write_batch("sink", &batch).await.unwrap();
    let seqs = |m: Vec<super::chat::StoredMessage>| m.into_iter().map(|m| m.seq).collect::<Vec<_>>();
    assert_eq!(seqs(store.room_messages("r1", None, 10).await.unwrap()), [12, 11, 10]);
    // A send retried with the same message id learns where the first one is stored.
    let found = store.room_access("r1", "bob", Some("m2")).await.unwrap().unwrap();
    assert_eq!(found.stored_at.map(|(_, o)| o), Some(11));
    assert!(store.room_access("r1", "bob", Some("m9")).await.unwrap().unwrap().stored_at.is_none());
    assert!(store.room_access("r2", "alice", Some("m2")).await.unwrap().unwrap().stored_at.is_none(), "other room");
    assert_eq!(seqs(store.room_messages("r1", Some(12), 1).await.unwrap()), [11]);
    assert_eq!(store.room_unread("r1", "alice").await.unwrap(), Some((-1, 2)));
    assert_eq!(store.room_unread("r1", "bob").await.unwrap(), Some((-1, 1)));
    assert_eq!(store.mark_room_read("r1", "alice", 11).await.unwrap(), Some((11, 1)));
    assert_eq!(store.mark_room_read("r1", "alice", 5).await.unwrap(), Some((11, 1)), "never moves back");
    assert_eq!(store.mark_room_read("r1", "carol", 11).await.unwrap(), None, "not a member");
    let mine = store.my_rooms("alice", 10).await.unwrap();
    assert_eq!(mine.iter().map(|r| r.room.room_id.as_str()).collect::<Vec<_>>(), ["r1", "r2"], "active first");
    let last = mine[0].last_message.clone().unwrap();
    assert_eq!((last.message_id.as_str(), last.seq, mine[0].unread), ("m3", 12, 1));
    assert!(mine[1].last_message.is_none());
    assert_eq!((mine[0].room.tags.clone(), mine[1].room.tags.clone()), (both.clone(), tea.clone()), "each its own");

    // Edits and deletes: the sender's only; a delete stops counting as unread.
    let change = |id: &str, sender: &str, text: Option<&str>| ChatChange {
        message_id: id.into(),
        sender_id: sender.into(),
        text: text.map(str::to_string),
        at: 99,
    };
    let batch = Batch {
        chat_changes: vec![
            change("m3", "alice", Some("not hers")),
            change("m2", "bob", Some("edited")),
            change("m3", "bob", None),
            // An edit that raced the delete and arrives after it changes nothing.
            change("m3", "bob", Some("edited after its delete")),
        ],
        ..Batch::default()
    };
    store.write_batch("sink", &batch).await.unwrap();
    let m2 = store.chat_message("m2").await.unwrap().unwrap();
    assert_eq!((m2.text.as_str(), m2.edited, m2.deleted), ("edited", true, false));
    let m3 = store.chat_message("m3").await.unwrap().unwrap();
    assert_eq!((m3.text.as_str(), m3.deleted), ("", true), "deleted; not edited by another nor after the delete");
    assert_eq!(store.room_unread("r1", "alice").await.unwrap(), Some((11, 0)));
    assert!(store.leave_room("r1", "bob").await.unwrap());
    assert!(!store.leave_room("r1", "bob").await.unwrap());
}

/// Membership changes write their event to the outbox in the same transaction, only when they
/// change something; a member's room list pages with a cursor, ties broken by room id.
async fn chat_outbox_and_room_pages(store: &Store) {
    use super::chat::NewRoom;
    let zed = vec!["zed".to_string()];
    for id in ["a", "b", "c", "d", "e"] {
        let room = NewRoom {
            room_id: id,
            kind: "group",
            name: "Room",
            creator_id: "zed",
            product_id: None,
            tags: &[],
            members: &zed,
            created_at: 7,
        };
        assert!(store.create_room_and_event(&room, Some(&format!("created {id}"))).await.unwrap());
    }
    assert!(store.join_room_and_event("a", "amy", 10, Some("joined")).await.unwrap());
    assert!(!store.join_room_and_event("a", "amy", 11, Some("joined again")).await.unwrap());
    assert!(store.leave_room_and_event("a", "amy", 12, Some("left")).await.unwrap());
    assert!(!store.leave_room_and_event("a", "amy", 13, Some("left again")).await.unwrap());
    assert!(store.close_room_and_event("a", 14, Some("closed")).await.unwrap());
    assert!(!store.close_room_and_event("a", 15, Some("closed again")).await.unwrap());
    let events = |rows: Vec<super::chat::OutboxEvent>| rows.into_iter().map(|r| r.event).collect::<Vec<_>>();
    let pending = store.outbox_of_room("a", 10).await.unwrap();
    assert_eq!(events(pending.clone()), ["created a", "joined", "left", "closed"], "in order, changes only");
    assert_eq!(store.outbox_rooms(8, 10).await.unwrap(), ["a", "b", "c", "d", "e"], "written before 8");
    assert!(store.outbox_rooms(7, 10).await.unwrap().is_empty(), "none written before 7");
    for row in &pending[..2] {
        store.outbox_delete(row.id).await.unwrap();
    }
    assert_eq!(events(store.outbox_of_room("a", 10).await.unwrap()), ["left", "closed"]);

    // Five rooms alike but for their id, two a page.
    let (mut seen, mut after) = (Vec::new(), None);
    loop {
        let page = store.my_rooms_after("zed", after.as_ref(), 2).await.unwrap();
        seen.extend(page.iter().map(|r| r.room.room_id.clone()));
        match page.last() {
            Some(last) if page.len() == 2 => after = Some(last.cursor()),
            _ => break,
        }
    }
    assert_eq!(seen, ["e", "d", "c", "b", "a"]);
}

/// A statement's generated bind list is numbered after its fixed binds, in the file's text.
#[test]
fn bind_lists_are_numbered_after_the_fixed_binds() {
    assert_eq!(
        with_bind_list("SELECT 1 WHERE x = $1 AND y IN (/* generated */) LIMIT $2", 3, 3),
        "SELECT 1 WHERE x = $1 AND y IN ($3, $4, $5) LIMIT $2"
    );
    assert_eq!(with_bind_list("IN (/* generated */)", 1, 1), "IN ($1)");
    let (head, tail) = around_generated(UPSERT_OFFSETS);
    assert!(head.trim_end().ends_with("next_offset)") && tail.trim_start().starts_with("ON CONFLICT"));
}
