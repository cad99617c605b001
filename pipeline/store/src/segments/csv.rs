//! User ids from a CSV file, row by row into batches of bounded size: a header row naming the id
//! column (or a column by position), and every bad row (wrong column count, empty, too long, NUL,
//! not UTF-8) reported with its line instead of loaded.

use std::io::Read;

use super::SegmentError;

/// Where the user id is in each row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Column {
    /// The column the header row names so.
    Name(String),
    /// The column at this position, counted from 0.
    Index(usize),
}

impl Default for Column {
    fn default() -> Self {
        Column::Name("user_id".into())
    }
}

/// How rows are read and which are bad.
#[derive(Debug, Clone)]
pub struct CsvRules {
    pub column: Column,
    /// Whether the first row is a header (required to find a column by name).
    pub header: bool,
    /// Longest user id accepted, in bytes.
    pub max_id_bytes: usize,
}

/// Default longest user id, in bytes.
pub const DEFAULT_MAX_ID_BYTES: usize = 256;

impl Default for CsvRules {
    fn default() -> Self {
        CsvRules { column: Column::default(), header: true, max_id_bytes: DEFAULT_MAX_ID_BYTES }
    }
}

/// A row that was not loaded, by its line in the file (1 = the first line).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadRow {
    pub line: u64,
    pub problem: String,
}

/// Ids of consecutive rows, with the bad rows among them.
#[derive(Debug, Default)]
pub struct IdBatch {
    pub ids: Vec<String>,
    pub bad: Vec<BadRow>,
    /// Rows read for this batch (good and bad).
    pub rows: u64,
    /// Bytes of the input read so far.
    pub bytes: u64,
}

/// Reads user ids from CSV, one batch at a time.
pub struct CsvIds<R> {
    reader: ::csv::Reader<EndsWithNewline<R>>,
    rules: CsvRules,
    index: usize,
    /// Columns every row must have: the header's, else the first row's.
    columns: Option<usize>,
    record: ::csv::ByteRecord,
}

impl<R: Read> CsvIds<R> {
    /// Reads the header row, if `rules` says there is one, and finds the id column.
    pub fn new(input: R, rules: CsvRules) -> Result<Self, SegmentError> {
        // Rows of any length are read, so a short or long one is reported by line, not a read error.
        let reader = ::csv::ReaderBuilder::new().has_headers(false).flexible(true).from_reader(EndsWithNewline {
            inner: input,
            last: b'\n',
            done: false,
        });
        let mut ids = CsvIds { reader, index: 0, columns: None, record: ::csv::ByteRecord::new(), rules };
        match (ids.rules.column.clone(), ids.rules.header) {
            (Column::Name(name), false) => {
                return Err(SegmentError::Header(format!("column {name:?} is a name, which needs a header row")))
            }
            (Column::Index(i), false) => ids.index = i,
            (column, true) => {
                if !ids.read_record()? {
                    return Err(SegmentError::Header("the file is empty: no header row".into()));
                }
                let header: Vec<String> = ids
                    .record
                    .iter()
                    .enumerate()
                    .map(|(i, f)| {
                        let f = String::from_utf8_lossy(f);
                        // A byte-order mark some spreadsheets write before the first name.
                        let f = if i == 0 { f.trim_start_matches('\u{feff}') } else { &f };
                        f.trim().to_string()
                    })
                    .collect();
                ids.index = match column {
                    Column::Name(name) => header.iter().position(|h| *h == name).ok_or_else(|| {
                        SegmentError::Header(format!(
                            "the header row has no column {name:?} (it has {})",
                            header.iter().map(|h| format!("{h:?}")).collect::<Vec<_>>().join(", ")
                        ))
                    })?,
                    Column::Index(i) if i < header.len() => i,
                    Column::Index(i) => {
                        return Err(SegmentError::Header(format!(
                            "the header row has {} column(s); there is no column {}",
                            header.len(),
                            i + 1
                        )))
                    }
                };
                ids.columns = Some(header.len());
            }
        }
        Ok(ids)
    }

    fn read_record(&mut self) -> Result<bool, SegmentError> {
        self.reader.read_byte_record(&mut self.record).map_err(|e| SegmentError::Read(e.to_string()))
    }

    /// The next rows, until `max_ids` good ones; `None` at the end of the input.
    pub fn next_batch(&mut self, max_ids: usize) -> Result<Option<IdBatch>, SegmentError> {
        let mut batch = IdBatch::default();
        while batch.ids.len() < max_ids.max(1) && self.read_record()? {
            batch.rows += 1;
            // The record's own position counts the blank lines before it as its own; the reader's
            // position after it, less the record's lines, does not (every record ends with a newline).
            let newlines = self.record.iter().map(|f| f.iter().filter(|&&b| b == b'\n').count() as u64).sum::<u64>();
            let line = self.reader.position().line().saturating_sub(1 + newlines).max(1);
            match self.id() {
                Ok(id) => batch.ids.push(id),
                Err(problem) => batch.bad.push(BadRow { line, problem }),
            }
        }
        batch.bytes = self.reader.position().byte();
        Ok((batch.rows > 0).then_some(batch))
    }

    /// The current row's user id, or what is wrong with the row.
    fn id(&mut self) -> Result<String, String> {
        let n = self.record.len();
        let columns = *self.columns.get_or_insert(n);
        if n != columns {
            return Err(format!("{n} column(s), expected {columns}"));
        }
        let Some(field) = self.record.get(self.index) else {
            return Err(format!("{n} column(s); there is no column {}", self.index + 1));
        };
        let id = std::str::from_utf8(field).map_err(|_| "the user id is not UTF-8".to_string())?.trim();
        check_id(id, self.rules.max_id_bytes)?;
        Ok(id.to_string())
    }
}

/// What is wrong with user id `id`, if anything: empty, a NUL character, longer than `max_bytes`.
pub fn check_id(id: &str, max_bytes: usize) -> Result<(), String> {
    if id.is_empty() {
        return Err("empty user id".into());
    }
    if id.contains('\0') {
        return Err("the user id contains a NUL character".into());
    }
    if id.len() > max_bytes {
        return Err(format!("user id of {} bytes, longer than {max_bytes}", id.len()));
    }
    Ok(())
}

/// `inner`, with a newline added at the end if it has none, so the last record ends like the others.
struct EndsWithNewline<R> {
    inner: R,
    last: u8,
    done: bool,
}

impl<R: Read> Read for EndsWithNewline<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.done || buf.is_empty() {
            return Ok(0);
        }
        let n = self.inner.read(buf)?;
        if n > 0 {
            self.last = buf[n - 1];
            return Ok(n);
        }
        self.done = true;
        if self.last == b'\n' {
            return Ok(0);
        }
        buf[0] = b'\n';
        Ok(1)
    }
}

/// Reads `input` on a blocking thread into batches of at most `batch_ids` ids, handed over a
/// channel of two: reading runs ahead of the loader by two batches at most.
pub fn read_in_background<R: Read + Send + 'static>(
    input: R,
    rules: CsvRules,
    batch_ids: usize,
) -> tokio::sync::mpsc::Receiver<Result<IdBatch, SegmentError>> {
    let (tx, rx) = tokio::sync::mpsc::channel(2);
    tokio::task::spawn_blocking(move || {
        let mut ids = match CsvIds::new(input, rules) {
            Ok(ids) => ids,
            Err(e) => {
                let _ = tx.blocking_send(Err(e));
                return;
            }
        };
        loop {
            let next = match ids.next_batch(batch_ids) {
                Ok(Some(b)) => Ok(b),
                Ok(None) => return,
                Err(e) => Err(e),
            };
            let failed = next.is_err();
            // A closed channel: the loader gave up; stop reading.
            if tx.blocking_send(next).is_err() || failed {
                return;
            }
        }
    });
    rx
}
