use super::*;
use std::collections::BTreeSet;

fn rules() -> CsvRules {
    CsvRules::default()
}

/// Every batch of `text` read with `rules`, 2 ids per batch.
fn read_all(text: &str, rules: CsvRules) -> Result<(Vec<String>, Vec<BadRow>), SegmentError> {
    let mut ids = CsvIds::new(text.as_bytes(), rules)?;
    let (mut good, mut bad) = (Vec::new(), Vec::new());
    while let Some(b) = ids.next_batch(2)? {
        assert!(b.ids.len() <= 2);
        good.extend(b.ids);
        bad.extend(b.bad);
    }
    Ok((good, bad))
}

fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

#[test]
fn csv_finds_the_id_column_by_header_name_or_position() {
    let text = "\u{feff}name,user_id\nAda,u1\n\"Lovelace, Ada\", u2 \n\nBob,u3";
    let (good, bad) = read_all(text, rules()).unwrap();
    assert_eq!(good, strings(&["u1", "u2", "u3"]));
    assert!(bad.is_empty(), "{bad:?}");

    let by_name = CsvRules { column: Column::Name("name".into()), ..rules() };
    assert_eq!(read_all(text, by_name).unwrap().0, strings(&["Ada", "Lovelace, Ada", "Bob"]));
    let by_index = CsvRules { column: Column::Index(1), ..rules() };
    assert_eq!(read_all(text, by_index).unwrap().0, strings(&["u1", "u2", "u3"]));
    let no_header = CsvRules { column: Column::Index(0), header: false, ..rules() };
    assert_eq!(read_all("a\nb\n", no_header).unwrap().0, strings(&["a", "b"]));

    let missing = read_all("id,name\n1,a\n", rules()).unwrap_err().to_string();
    assert!(missing.contains("no column \"user_id\"") && missing.contains("\"id\", \"name\""), "{missing}");
    assert!(read_all("", rules()).unwrap_err().to_string().contains("empty"));
    let too_far = CsvRules { column: Column::Index(2), ..rules() };
    assert!(read_all("a,b\n", too_far).unwrap_err().to_string().contains("no column 3"));
    let name_without_header = CsvRules { header: false, ..rules() };
    assert!(matches!(read_all("a\n", name_without_header), Err(SegmentError::Header(_))));
}

#[test]
fn csv_reports_each_bad_row_by_its_line() {
    let long = "x".repeat(11);
    // Line 3's quoted field spans two lines, so later rows are found by line, not by row count.
    let text = format!("user_id,plan\nu1,a\n\"u2\",\"multi\nline\"\n,empty\nu\0nul,b\n{long},c\n\n\nonly-one\nu3,d,extra\nu4,e\n\n,last");
    let short = CsvRules { max_id_bytes: 10, ..rules() };
    let (good, bad) = read_all(&text, short).unwrap();
    assert_eq!(good, strings(&["u1", "u2", "u4"]));
    let lines: Vec<u64> = bad.iter().map(|b| b.line).collect();
    assert_eq!(lines, [5, 6, 7, 10, 11, 14], "{bad:?}");
    assert!(bad[0].problem.contains("empty"), "{bad:?}");
    assert!(bad[1].problem.contains("NUL"), "{bad:?}");
    assert!(bad[2].problem.contains("11 bytes"), "{bad:?}");
    assert!(bad[3].problem.contains("1 column(s), expected 2"), "{bad:?}");
    assert!(bad[4].problem.contains("3 column(s), expected 2"), "{bad:?}");

    let mut not_utf8 = b"user_id\nok\n".to_vec();
    not_utf8.extend_from_slice(b"\xff\xfe\n");
    let mut ids = CsvIds::new(not_utf8.as_slice(), rules()).unwrap();
    let b = ids.next_batch(10).unwrap().unwrap();
    assert_eq!(
        (b.ids, b.bad),
        (strings(&["ok"]), vec![BadRow { line: 3, problem: "the user id is not UTF-8".into() }])
    );
}

#[test]
fn segment_names_are_checked() {
    for ok in ["vip", "a.b_c:d-1", &"n".repeat(MAX_NAME_BYTES)] {
        assert!(check_name(ok).is_ok(), "{ok}");
    }
    for bad in ["", "a/b", "a b", "é", &"n".repeat(MAX_NAME_BYTES + 1)] {
        assert!(matches!(check_name(bad), Err(SegmentError::BadName(_))), "{bad}");
    }
}

/// An endless CSV of 14-byte rows: an import that held its input whole would never end.
struct Endless {
    produced: std::sync::Arc<std::sync::atomic::AtomicU64>,
    next: u64,
}

impl std::io::Read for Endless {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let mut n = 0;
        if self.next == 0 {
            buf[..8].copy_from_slice(b"user_id\n");
            n = 8;
            self.next = 1;
        }
        while n + 14 <= buf.len() {
            buf[n..n + 14].copy_from_slice(format!("user-{:08}\n", self.next).as_bytes());
            self.next += 1;
            n += 14;
        }
        self.produced.fetch_add(n as u64, std::sync::atomic::Ordering::SeqCst);
        Ok(n)
    }
}

/// The reader runs at most two batches ahead of the loader, whatever the input's size: memory
/// for a million-row file is a few batches, not the file.
#[tokio::test]
async fn reading_runs_at_most_two_batches_ahead_of_the_loader() {
    let produced = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let input = Endless { produced: produced.clone(), next: 0 };
    let mut batches = read_in_background(input, rules(), 1_000);
    let first = batches.recv().await.unwrap().unwrap();
    assert_eq!((first.ids.len(), first.ids[0].as_str()), (1_000, "user-00000001"));
    // Long enough for an unbounded reader to produce megabytes.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let read = produced.load(std::sync::atomic::Ordering::SeqCst);
    // The batch taken, two queued, one being filled, and the CSV reader's buffer.
    let bound = 4 * 1_000 * 14 + 64 * 1024;
    assert!(read < bound, "{read} bytes read ahead of the loader (bound {bound})");
    drop(batches);
}

/// Imports `text` into `segment` as `change` says, 3 ids per batch.
async fn import_text(
    store: &Store,
    segment: &str,
    change: SegmentChange,
    text: &str,
    on_error: OnError,
) -> Result<Imported, SegmentError> {
    let batches = read_in_background(std::io::Cursor::new(text.to_string().into_bytes()), rules(), 3);
    import(store, segment, change, batches, on_error, 100, DEFAULT_KEEP_REPLACED, |_| {}).await
}

async fn members(store: &Store, segment: &str) -> Vec<String> {
    store.segment_members_page(segment, None, u32::MAX).await.unwrap()
}

async fn version_count(store: &Store) -> i64 {
    on_pool!(store, |pool, _Db| sqlx::query_scalar("SELECT count(*) FROM segment_versions")
        .fetch_one(pool)
        .await
        .unwrap())
}

async fn replace_append_remove_list_show(store: &Store) {
    let r =
        import_text(store, "vip", SegmentChange::Replace, "user_id\nc\na\nb\na\nd\n", OnError::Refuse).await.unwrap();
    assert_eq!((r.rows, r.changed.changed, r.changed.info.size), (5, 4, 4));
    assert_eq!(members(store, "vip").await, strings(&["a", "b", "c", "d"]));

    let r = import_text(store, "vip", SegmentChange::Append, "user_id\nd\ne\nf\n", OnError::Refuse).await.unwrap();
    assert_eq!((r.changed.changed, r.changed.info.size), (2, 6));
    let r = import_text(store, "vip", SegmentChange::Remove, "user_id\na\nzz\nf\n", OnError::Refuse).await.unwrap();
    assert_eq!((r.changed.changed, r.changed.info.size), (2, 4));
    assert_eq!(members(store, "vip").await, strings(&["b", "c", "d", "e"]));
    let unknown = import_text(store, "nobody", SegmentChange::Remove, "user_id\na\n", OnError::Refuse).await;
    assert!(matches!(unknown, Err(SegmentError::Unknown(_))), "{unknown:?}");

    // Append creates; replace swaps the whole membership.
    import_text(store, "new", SegmentChange::Append, "user_id\nx\n", OnError::Refuse).await.unwrap();
    import_text(store, "vip", SegmentChange::Replace, "user_id\nq\n", OnError::Refuse).await.unwrap();
    assert_eq!(members(store, "vip").await, strings(&["q"]));
    assert_eq!(store.add_segment_members("new", &strings(&["y", "x"])).await.unwrap(), 1);

    let show = store.segment("vip").await.unwrap().unwrap();
    assert_eq!((show.name.as_str(), show.size), ("vip", 1));
    let age = chrono::Utc::now().timestamp_micros() - show.updated_at;
    assert!((0..60_000_000).contains(&age), "updated_at {} is not now", show.updated_at);
    let names = |l: Vec<SegmentInfo>| l.into_iter().map(|i| (i.name, i.size)).collect::<Vec<_>>();
    assert_eq!(names(store.segments(None, 10).await.unwrap()), [("new".to_string(), 2), ("vip".to_string(), 1)]);
    assert_eq!(names(store.segments(Some("new"), 10).await.unwrap()), [("vip".to_string(), 1)]);
    assert_eq!(names(store.segments(None, 1).await.unwrap()), [("new".to_string(), 2)]);

    assert!(store.delete_segment("vip", DEFAULT_KEEP_REPLACED).await.unwrap());
    assert!(!store.delete_segment("vip", DEFAULT_KEEP_REPLACED).await.unwrap());
    assert!(store.segment("vip").await.unwrap().is_none());
    assert!(members(store, "vip").await.is_empty());
}

async fn bad_rows_refuse_the_import_and_change_nothing(store: &Store) {
    import_text(store, "s", SegmentChange::Replace, "user_id\nold1\nold2\n", OnError::Refuse).await.unwrap();
    let before = store.segment("s").await.unwrap().unwrap();
    let versions = version_count(store).await;
    // Bad rows in the first and in a later batch (3 ids per batch).
    let text = "user_id\nn1\n\nn2,x\nn3\nn4\nn5\nn6\n\"\"\nn7\n";
    for change in [SegmentChange::Replace, SegmentChange::Append, SegmentChange::Remove] {
        match import_text(store, "s", change, text, OnError::Refuse).await {
            Err(SegmentError::BadRows { total, first }) => {
                assert_eq!(total, 2);
                assert_eq!(first.iter().map(|b| b.line).collect::<Vec<_>>(), [4, 9], "{first:?}");
            }
            other => panic!("{change:?}: {other:?}"),
        }
        assert_eq!(store.segment("s").await.unwrap().unwrap(), before, "{change:?}");
        assert_eq!(members(store, "s").await, strings(&["old1", "old2"]), "{change:?}");
        assert_eq!(version_count(store).await, versions, "{change:?}: a version was left behind");
    }
    // A file without the column is refused before anything loads.
    let r = import_text(store, "s", SegmentChange::Replace, "id\nx\n", OnError::Refuse).await;
    assert!(matches!(r, Err(SegmentError::Header(_))), "{r:?}");
    assert_eq!(members(store, "s").await, strings(&["old1", "old2"]));
    assert_eq!(version_count(store).await, versions);
}

async fn skip_mode_loads_the_good_rows(store: &Store) {
    let text = "user_id\nn1\n\nn2,x\nn3\n\"\"\nn4\n";
    let r = import_text(store, "s", SegmentChange::Replace, text, OnError::Skip).await.unwrap();
    assert_eq!((r.rows, r.bad_total, r.changed.info.size), (3, 2, 3));
    assert_eq!(r.bad.iter().map(|b| b.line).collect::<Vec<_>>(), [4, 6]);
    assert_eq!(members(store, "s").await, strings(&["n1", "n3", "n4"]));
}

/// Two disjoint memberships, a reader paging while a replace loads and switches: each full read is
/// all of one, never a mix; the replaced version stays readable to a reader that pinned it.
async fn a_replace_is_seen_whole_or_not_at_all(store: &Store) {
    let csv = |prefix: &str| {
        let mut s = String::from("user_id\n");
        for i in 0..3_000 {
            s.push_str(&format!("{prefix}{i:05}\n"));
        }
        s
    };
    let (old, new) = (csv("old-"), csv("new-"));
    let set = |text: &str| text.lines().skip(1).map(str::to_string).collect::<BTreeSet<_>>();
    let (old_set, new_set) = (set(&old), set(&new));
    import_text(store, "s", SegmentChange::Replace, &old, OnError::Refuse).await.unwrap();

    // Pinned before the replace, read after it: still all of the old version.
    let pinned = store.segment("s").await.unwrap().unwrap().version;
    let first = store.segment_version_page(pinned, None, 10).await.unwrap().unwrap();
    let reader = store.clone();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop_reader = stop.clone();
    // Reads the whole segment again and again, 500 users a page, each read pinned to one version.
    let reads = tokio::spawn(async move {
        let mut reads = Vec::new();
        while !stop_reader.load(std::sync::atomic::Ordering::SeqCst) {
            let version = reader.segment("s").await.unwrap().unwrap().version;
            let (mut all, mut after) = (BTreeSet::new(), None::<String>);
            while let Some(page) = reader.segment_version_page(version, after.as_deref(), 500).await.unwrap() {
                if page.is_empty() {
                    break;
                }
                after = page.last().cloned();
                all.extend(page);
                tokio::task::yield_now().await;
            }
            reads.push(all);
        }
        reads
    });
    for text in [&new, &old, &new] {
        import_text(store, "s", SegmentChange::Replace, text, OnError::Refuse).await.unwrap();
    }
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let reads = reads.await.unwrap();
    assert!(!reads.is_empty());
    for (i, read) in reads.iter().enumerate() {
        assert!(*read == old_set || *read == new_set, "read {i} mixes versions: {} users", read.len());
    }
    assert_eq!(members(store, "s").await.into_iter().collect::<BTreeSet<_>>(), new_set);

    let mut rest = store.segment_version_page(pinned, first.last().map(String::as_str), 10_000).await.unwrap().unwrap();
    rest.splice(0..0, first);
    assert_eq!(rest.into_iter().collect::<BTreeSet<_>>(), old_set, "the pinned old version changed");

    // Kept for nothing: the old versions go at the next change, and their reader learns it.
    import_text(store, "other", SegmentChange::Replace, "user_id\nx\n", OnError::Refuse).await.unwrap();
    assert!(store.drop_expired_segment_versions(Duration::ZERO).await.unwrap() >= 3);
    assert_eq!(store.segment_version_page(pinned, None, 10).await.unwrap(), None);
    let current = store.segment("s").await.unwrap().unwrap().version;
    assert_eq!(store.segment_version_page(current, None, 10_000).await.unwrap().unwrap().len(), 3_000);
}

async fn an_abandoned_load_is_cleaned_up(store: &Store) {
    let mut load = store.begin_segment_load("s").await.unwrap();
    load.add(&strings(&["a", "b"])).await.unwrap();
    let abandoned = load.version();
    drop(load);
    assert!(store.segment("s").await.unwrap().is_none(), "an unfinished load is visible");
    store.add_segment_members("t", &strings(&["x"])).await.unwrap();
    assert_eq!(store.segment_version_page(abandoned, None, 10).await.unwrap().map(|p| p.len()), Some(2));
    store.drop_expired_segment_versions(Duration::ZERO).await.unwrap();
    assert_eq!(store.segment_version_page(abandoned, None, 10).await.unwrap(), None);
    assert_eq!(members(store, "t").await, strings(&["x"]));
}

on_both_backends!(
    replace_append_remove_list_show,
    bad_rows_refuse_the_import_and_change_nothing,
    skip_mode_loads_the_good_rows,
    a_replace_is_seen_whole_or_not_at_all,
    an_abandoned_load_is_cleaned_up,
);
