//! Stable-toolchain smoke run of the fuzz targets (`bash .ci/fuzz-smoke`): each target gets the
//! files in corpus-seed/<target>/, random inputs and random mutations of the seeds. No coverage
//! guidance, so it only catches shallow bugs; the real fuzzing is `cargo fuzz run` on nightly.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;

use super::*;

/// Records the largest single allocation per thread, so a test can bound what decoding allocates.
struct PeakAlloc;

thread_local! {
    static LARGEST: Cell<usize> = const { Cell::new(0) };
}

#[allow(unsafe_code)]
// SAFETY: forwards every call unchanged to the system allocator; the bookkeeping is a
// const-initialised thread-local Cell, which never allocates.
unsafe impl GlobalAlloc for PeakAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        System.alloc(layout)
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        System.alloc_zeroed(layout)
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note(new_size);
        System.realloc(ptr, layout, new_size)
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout)
    }
}

fn note(size: usize) {
    let _ = LARGEST.try_with(|l| l.set(l.get().max(size)));
}

#[global_allocator]
static ALLOC: PeakAlloc = PeakAlloc;

/// The largest single allocation `f` made on this thread.
fn largest_allocation(f: impl FnOnce()) -> usize {
    LARGEST.with(|l| l.set(0));
    f();
    LARGEST.with(|l| l.get())
}

/// Inputs per kind (random, mutated seeds); `TIDINGS_FUZZ_SMOKE_ITERS` raises it for longer runs.
fn iterations() -> usize {
    std::env::var("TIDINGS_FUZZ_SMOKE_ITERS").ok().and_then(|v| v.parse().ok()).unwrap_or(3000)
}

/// xorshift64*: deterministic, so a failure reproduces; `TIDINGS_FUZZ_SMOKE_SEED` varies it.
struct Rng(u64);

impl Rng {
    fn new(target: &str) -> Rng {
        let base = std::env::var("TIDINGS_FUZZ_SMOKE_SEED").ok().and_then(|v| v.parse().ok()).unwrap_or(0x7d1d_1265);
        let mixed = target.bytes().fold(base, |h: u64, b| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3));
        Rng(mixed | 1)
    }
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
    fn byte(&mut self) -> u8 {
        // Bytes that matter to the formats (varint continuation, zigzag signs, JSON/YAML syntax)
        // are picked far more often than uniform sampling would.
        const INTERESTING: &[u8] = b"\x00\x01\x02\x7f\x80\xff\"{}[],:-0 \n\t#&*|>!%@`'\\";
        if self.below(2) == 0 {
            INTERESTING[self.below(INTERESTING.len())]
        } else {
            self.next() as u8
        }
    }
}

fn random_input(rng: &mut Rng) -> Vec<u8> {
    let max = if rng.below(4) == 0 { 2048 } else { 64 };
    let len = rng.below(max);
    (0..len).map(|_| rng.byte()).collect()
}

fn mutate(seed: &[u8], rng: &mut Rng) -> Vec<u8> {
    let mut out = seed.to_vec();
    for _ in 0..1 + rng.below(8) {
        let at = rng.below(out.len() + 1);
        match rng.below(7) {
            0 if at < out.len() => out[at] ^= 1 << rng.below(8),
            1 if at < out.len() => out[at] = rng.byte(),
            2 => out.insert(at, rng.byte()),
            3 if at < out.len() => {
                out.remove(at);
            }
            4 => out.truncate(at),
            5 if at < out.len() => {
                // Duplicate a chunk: grows arrays, nesting and repeated keys.
                let end = (at + 1 + rng.below(32)).min(out.len());
                let chunk = out[at..end].to_vec();
                out.splice(at..at, chunk);
            }
            _ if !out.is_empty() => {
                let len = out.len();
                out.swap(at.min(len - 1), rng.below(len));
            }
            _ => out.push(rng.byte()),
        }
    }
    out
}

fn seed_dir(target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus-seed").join(target)
}

fn seeds(target: &str) -> Vec<(String, Vec<u8>)> {
    let dir = seed_dir(target);
    let mut out: Vec<(String, Vec<u8>)> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| {
            let path = entry.expect("directory entry").path();
            let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            (path.file_name().expect("file name").to_string_lossy().into_owned(), bytes)
        })
        .collect();
    out.sort();
    assert!(!out.is_empty(), "no seeds in {}", dir.display());
    out
}

/// Runs `f` on an input; on a panic, saves the input under fuzz/artifacts/ (where cargo-fuzz
/// keeps its crashes, so `cargo fuzz run <target> <file>` replays it) and fails with its bytes.
fn run_one(target: &str, what: &str, input: &[u8], f: fn(&[u8])) {
    if catch_unwind(AssertUnwindSafe(|| f(input))).is_err() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("artifacts").join(target);
        let file =
            dir.join(format!("smoke-crash-{}", input.iter().fold(0u64, |h, b| h.rotate_left(5) ^ u64::from(*b))));
        let saved = std::fs::create_dir_all(&dir).and_then(|_| std::fs::write(&file, input));
        panic!(
            "{target} panicked on {what} ({} bytes, saved: {saved:?} {}):\n{:?}\nas text: {:?}",
            input.len(),
            file.display(),
            input,
            String::from_utf8_lossy(input)
        );
    }
}

/// Seeds, then random inputs, then mutated seeds.
fn smoke(target: &str, f: fn(&[u8])) {
    let seeds = seeds(target);
    for (name, bytes) in &seeds {
        run_one(target, &format!("seed {name}"), bytes, f);
    }
    let mut rng = Rng::new(target);
    for i in 0..iterations() {
        run_one(target, &format!("random input #{i}"), &random_input(&mut rng), f);
    }
    for i in 0..iterations() {
        let (name, seed) = &seeds[rng.below(seeds.len())];
        run_one(target, &format!("mutation #{i} of seed {name}"), &mutate(seed, &mut rng), f);
    }
}

#[test]
fn smoke_wire_split() {
    smoke("wire_split", wire_split);
}

#[test]
fn smoke_json_to_avro() {
    smoke("json_to_avro", json_to_avro);
}

#[test]
fn smoke_avro_decode() {
    smoke("avro_decode", avro_decode);
}

#[test]
fn smoke_topology_parse() {
    smoke("topology_parse", topology_parse);
}

#[test]
fn smoke_traceparent() {
    smoke("traceparent", traceparent);
    for _ in 0..100 {
        traceparent(trace::new_traceparent().as_bytes());
    }
}

#[test]
fn smoke_sse_request() {
    smoke("sse_request", sse_request);
}

/// The seeds are valid inputs, so the targets get past the first checks from the start.
#[test]
fn seeds_are_valid() {
    let schemas = codecs();
    for (name, bytes) in seeds("json_to_avro") {
        let json: Json = serde_json::from_slice(&bytes).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(schemas.iter().any(|c| json_avro::json_to_avro(c.schema, &json).is_ok()), "{name} fits no schema");
    }
    for (name, bytes) in seeds("avro_decode") {
        assert!(
            schemas.iter().any(|c| c.reader.read_value(&mut &bytes[..]).is_ok_and(|v| v.validate(c.schema))),
            "{name} decodes under no schema"
        );
    }
    for (name, bytes) in seeds("wire_split") {
        assert!(wire::split(&bytes).is_ok(), "{name} is not framed");
    }
    for (name, bytes) in seeds("topology_parse") {
        let yaml = String::from_utf8(bytes).expect("UTF-8");
        if let Err(e) = Topology::from_str(&yaml, checkout_dir()) {
            panic!("{name}: {e}");
        }
    }
    let accepted = seeds("traceparent")
        .iter()
        .filter(|(_, b)| std::str::from_utf8(b).ok().and_then(trace::parse_traceparent).is_some())
        .count();
    assert_eq!(accepted, 2, "valid_sampled and valid_unsampled parse, the rest are rejected");
    for (name, bytes) in seeds("sse_request") {
        let taken = tidings_gateway::front::stream_request(&bytes).is_some();
        assert_eq!(taken, name.starts_with("stream_"), "{name}");
    }
}

fn zigzag(n: i64) -> Vec<u8> {
    let mut v = ((n << 1) ^ (n >> 63)) as u64;
    let mut out = Vec::new();
    loop {
        let b = (v & 0x7f) as u8;
        v >>= 7;
        if v == 0 {
            out.push(b);
            return out;
        }
        out.push(b | 0x80);
    }
}

/// A datum claiming a huge string or array fails without allocating past the cap.
#[test]
fn decoding_allocates_at_most_the_cap() {
    let chat = codecs().iter().find(|c| c.name == "chat_event").expect("chat schema");
    let huge_string = zigzag(1 << 40);
    let just_under = zigzag(MAX_AVRO_ALLOCATION as i64 - 1);
    // event_id "e", occurred_at 0, room_id "r", payload branch 0 (RoomCreated), name "", creator "",
    // then a members array block claiming 2^40 / cap-sized item counts.
    let prefix = [&[2, b'e', 0, 2, b'r', 0, 0, 0][..]].concat();
    for claim in [huge_string.clone(), just_under.clone(), zigzag(MAX_AVRO_ALLOCATION as i64 / 8)] {
        let as_string = [&claim[..], b"abc"].concat();
        let as_array = [&prefix[..], &claim[..], &[0, 0]].concat();
        for data in [as_string, as_array] {
            let mut result = None;
            let peak = largest_allocation(|| result = Some(chat.reader.read_value(&mut &data[..])));
            assert!(result.expect("ran").is_err(), "{data:?} claims more than it holds");
            assert!(peak <= MAX_AVRO_ALLOCATION, "decoding {data:?} allocated {peak} bytes at once");
        }
    }
    // The tracker does see decoder allocations: a string claiming just under the cap gets its
    // buffer before the read finds the input short.
    let claim = [&just_under[..], b"abc"].concat();
    let peak = largest_allocation(|| drop(chat.reader.read_value(&mut &claim[..])));
    assert!(peak >= MAX_AVRO_ALLOCATION - 1, "largest allocation {peak}");
    // And the whole target, on the seeds' mutations, stays under the cap too.
    let mut rng = Rng::new("decoding_allocates_at_most_the_cap");
    let seeds = seeds("avro_decode");
    for _ in 0..iterations() {
        let data = mutate(&seeds[rng.below(seeds.len())].1, &mut rng);
        let peak = largest_allocation(|| avro_decode(&data));
        assert!(peak <= MAX_AVRO_ALLOCATION, "avro_decode({data:?}) allocated {peak} bytes at once");
    }
}

/// Pins the apache-avro quirk `avro_decode` works around: when this starts failing, apache-avro
/// rejects truncated strings itself and the `validate` skip (and the check in production) can go.
#[test]
fn apache_avro_reads_a_truncated_trailing_string_as_null() {
    let chat = codecs().iter().find(|c| c.name == "chat_event").expect("chat schema");
    // MessageSent (branch 3) whose `text`, the last field, claims 10 bytes but has 3.
    let data = [&[2, b'e', 0, 2, b'r', 6, 2, b'm', 2, b's'][..], &zigzag(10), b"abc"].concat();
    let value = chat.reader.read_value(&mut &data[..]).expect("apache-avro accepts the truncated datum");
    assert!(!value.validate(chat.schema), "{value:?}");
    let Value::Record(fields) = &value else { panic!("{value:?}") };
    let Value::Union(3, sent) = &fields[3].1 else { panic!("{value:?}") };
    assert_eq!(
        **sent,
        Value::Record(vec![
            ("message_id".into(), Value::String("m".into())),
            ("sender_id".into(), Value::String("s".into())),
            ("text".into(), Value::Null),
        ])
    );
}

/// The JSON round trip may move a value to an earlier identical branch (chat MemberLeft comes
/// back as MemberJoined) but nothing else.
#[test]
fn round_trip_comparison_allows_only_an_earlier_equal_branch() {
    let chat = codecs().iter().find(|c| c.name == "chat_event").expect("chat schema");
    let left: Json =
        serde_json::from_slice(&std::fs::read(seed_dir("json_to_avro").join("chat_member_left.json")).expect("seed"))
            .expect("JSON");
    let first = json_avro::json_to_avro(chat.schema, &left).expect("valid");
    let again = json_avro::json_to_avro(chat.schema, &json_avro::avro_to_json(&first)).expect("valid");
    assert_eq!(json_avro::union_branch_name(chat.schema, &first, "payload"), Some("MemberLeft"));
    assert_eq!(json_avro::union_branch_name(chat.schema, &again, "payload"), Some("MemberJoined"));
    assert!(same_up_to_earlier_branch(&first, &again));
    assert!(!same_up_to_earlier_branch(&again, &first), "a later branch is a change");
    let Value::Record(mut fields) = first.clone() else { panic!() };
    fields[0].1 = Value::String("other".into());
    assert!(!same_up_to_earlier_branch(&first, &Value::Record(fields)), "a changed field is a change");
}

/// Writes the binary seeds (framed records for wire_split, bare datums for avro_decode) from the
/// JSON seeds: `cargo test --manifest-path fuzz/Cargo.toml -- --ignored regenerate_binary_seeds`.
#[test]
#[ignore = "rewrites corpus-seed/; run by hand after changing the JSON seeds or schemas"]
fn regenerate_binary_seeds() {
    for (name, bytes) in seeds("json_to_avro") {
        let json: Json = serde_json::from_slice(&bytes).expect("JSON seed");
        let stem = name.trim_end_matches(".json");
        let (id, c) = codecs()
            .iter()
            .enumerate()
            .find(|(_, c)| json_avro::json_to_avro(c.schema, &json).is_ok())
            .unwrap_or_else(|| panic!("{name} fits no schema"));
        let value = json_avro::json_to_avro(c.schema, &json).expect("checked");
        let datum = c.writer.write_value_to_vec(value).expect("encodes");
        std::fs::write(seed_dir("avro_decode").join(format!("{stem}.avro")), &datum).expect("write");
        let framed = wire::frame(id as u32 + 1, &datum);
        std::fs::write(seed_dir("wire_split").join(format!("{stem}.framed")), framed).expect("write");
    }
}
