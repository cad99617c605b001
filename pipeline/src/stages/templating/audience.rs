//! A campaign's audience as one stream of user ids in ascending order, each once: a k-way merge of
//! its segments (each read a page at a time from its pinned version) and its inline list, so the
//! whole audience is never in memory, only one page per source and the page being built.

use std::collections::VecDeque;

/// One sorted source of user ids: a segment read page by page, or the inline list.
#[derive(Debug)]
struct Source {
    /// The segment it reads, `None` for the inline list (whole from the start).
    segment: Option<String>,
    /// Read but not yet merged, ascending.
    buffer: VecDeque<String>,
    /// The last id read from the store: the next page starts after it.
    after: Option<String>,
    /// The store has nothing after `after`.
    drained: bool,
}

/// A refill the merge needs before it can go on: the next page of `segment` after `after`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refill {
    pub source: usize,
    pub segment: String,
    pub after: Option<String>,
}

/// The merge of a campaign's audience sources in user id order, starting after a cursor.
#[derive(Debug)]
pub struct Merge {
    sources: Vec<Source>,
    /// Everything up to here was merged already (resuming after a checkpoint, or the last id given).
    cursor: Option<String>,
}

impl Merge {
    /// The merge of `segments` (read through [`Merge::refill`]) and `inline` (any order, duplicates
    /// allowed), giving only ids after `cursor`.
    pub fn new(segments: &[String], inline: &[String], cursor: Option<String>) -> Self {
        let mut inline: Vec<String> =
            inline.iter().filter(|u| cursor.as_ref().is_none_or(|c| *u > c) && !u.is_empty()).cloned().collect();
        inline.sort_unstable();
        inline.dedup();
        let mut sources: Vec<Source> = segments
            .iter()
            .map(|s| Source {
                segment: Some(s.clone()),
                buffer: VecDeque::new(),
                after: cursor.clone(),
                drained: false,
            })
            .collect();
        sources.push(Source { segment: None, buffer: inline.into(), after: None, drained: true });
        Merge { sources, cursor }
    }

    /// The first source that must be read from the store before the merge can go on.
    pub fn needs(&self) -> Option<Refill> {
        self.sources.iter().enumerate().find_map(|(i, s)| {
            (s.buffer.is_empty() && !s.drained).then(|| Refill {
                source: i,
                segment: s.segment.clone().unwrap_or_default(),
                after: s.after.clone(),
            })
        })
    }

    /// The page read for `refill` (sorted ascending); `full`: it was as long as asked, so more may follow.
    pub fn refill(&mut self, refill: &Refill, page: Vec<String>, full: bool) {
        let s = &mut self.sources[refill.source];
        if let Some(last) = page.last() {
            s.after = Some(last.clone());
        }
        s.drained = !full || page.is_empty();
        // Ids at or before the cursor were merged already (a source read after a restart).
        let cursor = self.cursor.as_ref();
        s.buffer.extend(page.into_iter().filter(|u| cursor.is_none_or(|c| u > c)));
    }

    /// Whether every source is read and merged.
    pub fn is_done(&self) -> bool {
        self.sources.iter().all(|s| s.buffer.is_empty() && s.drained)
    }

    /// Up to `limit` next ids, ascending, each once. Stops early (possibly with none) when a
    /// source must be refilled first ([`Merge::needs`]), so a shorter page is not the end.
    pub fn take(&mut self, limit: usize, out: &mut Vec<String>) {
        while out.len() < limit && self.needs().is_none() {
            let Some(min) = self.sources.iter().filter_map(|s| s.buffer.front()).min().cloned() else { return };
            for s in &mut self.sources {
                if s.buffer.front() == Some(&min) {
                    s.buffer.pop_front();
                }
            }
            self.cursor = Some(min.clone());
            out.push(min);
        }
    }

    /// The last id merged (or the cursor it resumed after): where a checkpoint resumes.
    pub fn cursor(&self) -> Option<&str> {
        self.cursor.as_deref()
    }

    /// The segments this merge reads, in the order given.
    pub fn segments(&self) -> impl Iterator<Item = &str> {
        self.sources.iter().filter_map(|s| s.segment.as_deref())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    /// Runs `merge` to the end with `segments` as the store, `page` ids per read and per taken page.
    fn drain(mut merge: Merge, segments: &[Vec<String>], page: usize) -> (Vec<Vec<String>>, usize) {
        let (mut pages, mut most_buffered) = (Vec::new(), 0);
        let mut current = Vec::new();
        loop {
            while let Some(r) = merge.needs() {
                let all = &segments[r.source];
                let rest: Vec<String> =
                    all.iter().filter(|u| r.after.as_ref().is_none_or(|a| *u > a)).take(page).cloned().collect();
                let full = rest.len() == page;
                merge.refill(&r, rest, full);
            }
            most_buffered = most_buffered.max(merge.sources.iter().map(|s| s.buffer.len()).max().unwrap_or(0));
            if merge.is_done() {
                break;
            }
            merge.take(page, &mut current);
            if current.len() == page {
                pages.push(std::mem::take(&mut current));
            }
        }
        if !current.is_empty() {
            pages.push(current);
        }
        (pages, most_buffered)
    }

    fn ids(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn overlapping_segments_and_inline_users_merge_once_each_in_order() {
        let a = ids(&["a", "c", "e", "g"]);
        let b = ids(&["b", "c", "d", "g", "h"]);
        let merge = Merge::new(&ids(&["A", "B"]), &ids(&["z", "c", "a", "z"]), None);
        let (pages, _) = drain(merge, &[a, b], 2);
        assert_eq!(pages, vec![ids(&["a", "b"]), ids(&["c", "d"]), ids(&["e", "g"]), ids(&["h", "z"])]);
    }

    #[test]
    fn resuming_after_a_cursor_gives_only_the_rest() {
        let a = ids(&["a", "c", "e", "g"]);
        let b = ids(&["b", "c", "d", "g", "h"]);
        let merge = Merge::new(&ids(&["A", "B"]), &ids(&["z", "c", "a"]), Some("d".into()));
        let (pages, _) = drain(merge, &[a, b], 2);
        assert_eq!(pages, vec![ids(&["e", "g"]), ids(&["h", "z"])]);
    }

    #[test]
    fn no_sources_is_done_at_once() {
        let mut merge = Merge::new(&[], &[], None);
        assert!(merge.is_done() && merge.needs().is_none());
        let mut out = Vec::new();
        merge.take(10, &mut out);
        assert!(out.is_empty());
    }

    proptest! {
        /// Any segments and inline list, any page size, any cursor: the pages concatenate to the
        /// sorted union after the cursor, each id once, and no source ever buffers more than a page.
        #[test]
        fn pages_concatenate_to_the_sorted_union(
            segments in prop::collection::vec(prop::collection::btree_set("[a-f]{1,3}", 0..40), 0..4),
            inline in prop::collection::vec("[a-f]{1,3}", 0..20),
            page in 1usize..7,
            cursor in prop::option::of("[a-f]{1,3}"),
        ) {
            let names: Vec<String> = (0..segments.len()).map(|i| format!("s{i}")).collect();
            let segments: Vec<Vec<String>> = segments.into_iter().map(|s| s.into_iter().collect()).collect();
            let merge = Merge::new(&names, &inline, cursor.clone());
            let (pages, most_buffered) = drain(merge, &segments, page);
            let want: Vec<String> = segments
                .iter()
                .flatten()
                .chain(&inline)
                .filter(|u| cursor.as_ref().is_none_or(|c| *u > c))
                .cloned()
                .collect::<BTreeSet<_>>()
                .into_iter()
                .collect();
            let got: Vec<String> = pages.iter().flatten().cloned().collect();
            prop_assert_eq!(got, want);
            prop_assert!(pages.iter().all(|p| p.len() <= page));
            prop_assert!(pages.iter().rev().skip(1).all(|p| p.len() == page), "only the last page is short");
            // The inline list is one source read whole; segments are read a page at a time.
            prop_assert!(most_buffered <= page.max(inline.len()));
        }
    }
}
