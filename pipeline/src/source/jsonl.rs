//! JSONL source: files, directories of them, and `.jsonl.gz`, read line by line on a blocking
//! thread so a file is never held whole in memory.

use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};

use flate2::read::MultiGzDecoder;
use tokio::sync::mpsc;

use super::{
    Rejection, Source, SourceBatch, SourceError, SourceStream, SOURCE_BATCH_BYTES,
    SOURCE_BATCH_DOCS,
};
use crate::types::BuildScope;
use crate::types::RawDocument;

/// Batches the reader may run ahead of the cleaner: enough to hide file-read latency, and at
/// 4 MB per batch it caps what the source holds at about 16 MB.
const READ_AHEAD_BATCHES: usize = 4;
/// Lines longer than this are rejected rather than parsed: no real message is 16 MiB.
const MAX_LINE_BYTES: usize = 16 << 20;
/// Read buffer for each file.
const READ_BUFFER_BYTES: usize = 256 << 10;

#[derive(Debug, Clone)]
pub struct JsonlSource {
    files: Vec<PathBuf>,
    total_bytes: u64,
}

impl JsonlSource {
    /// Resolves `paths` (files or directories, searched recursively for `*.jsonl` and
    /// `*.jsonl.gz`) up front, so a bad path fails before any work starts.
    pub fn new<P: AsRef<Path>>(paths: &[P]) -> Result<Self, SourceError> {
        let mut files = Vec::new();
        for p in paths {
            let p = p.as_ref();
            let meta = std::fs::metadata(p).map_err(|e| SourceError::BadPath {
                path: p.display().to_string(),
                reason: e.to_string(),
            })?;
            if meta.is_dir() {
                collect_dir(p, &mut files)?;
            } else {
                files.push(p.to_path_buf());
            }
        }
        if files.is_empty() {
            return Err(SourceError::BadPath {
                path: paths
                    .iter()
                    .map(|p| p.as_ref().display().to_string())
                    .collect::<Vec<_>>()
                    .join(", "),
                reason: "no .jsonl or .jsonl.gz files found".into(),
            });
        }
        let total_bytes = files
            .iter()
            .filter_map(|f| std::fs::metadata(f).ok())
            .map(|m| m.len())
            .sum();
        Ok(Self { files, total_bytes })
    }

    pub fn files(&self) -> &[PathBuf] {
        &self.files
    }
}

fn is_jsonl(p: &Path) -> bool {
    let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
    name.ends_with(".jsonl") || name.ends_with(".jsonl.gz")
}

fn collect_dir(dir: &Path, out: &mut Vec<PathBuf>) -> Result<(), SourceError> {
    let bad = |e: std::io::Error| SourceError::BadPath {
        path: dir.display().to_string(),
        reason: e.to_string(),
    };
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(bad)?
        .map(|e| e.map(|e| e.path()))
        .collect::<Result<_, _>>()
        .map_err(bad)?;
    // Sorted so that a build reads the same files in the same order every time: packing and
    // therefore point ids depend on document order.
    entries.sort();
    for e in entries {
        if e.is_dir() {
            collect_dir(&e, out)?;
        } else if is_jsonl(&e) {
            out.push(e);
        }
    }
    Ok(())
}

impl Source for JsonlSource {
    fn documents(&self, scope: &BuildScope) -> SourceStream {
        let (tx, rx) = mpsc::channel(READ_AHEAD_BATCHES);
        let files = self.files.clone();
        let scope = scope.clone();
        let reader_tx = tx.clone();
        let reader = tokio::task::spawn_blocking(move || {
            for f in files {
                if !read_file(&f, &scope, &reader_tx) {
                    return; // receiver gone: the build was cancelled
                }
            }
        });
        super::watch_reader(tx, reader);
        Box::pin(futures::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|item| (item, rx))
        }))
    }

    fn size_hint_bytes(&self) -> Option<u64> {
        Some(self.total_bytes)
    }

    fn describe(&self) -> String {
        format!("jsonl ({} files)", self.files.len())
    }
}

type Tx = mpsc::Sender<Result<SourceBatch, SourceError>>;

/// Reads one file into batches; returns false when the receiver has gone away.
fn read_file(path: &Path, scope: &BuildScope, tx: &Tx) -> bool {
    let display = path.display().to_string();
    let file = match File::open(path) {
        Ok(f) => f,
        Err(source) => {
            return tx
                .blocking_send(Err(SourceError::Io {
                    path: display,
                    source,
                }))
                .is_ok()
        }
    };
    let reader: Box<dyn Read + Send> = if display.ends_with(".gz") {
        Box::new(MultiGzDecoder::new(file))
    } else {
        Box::new(file)
    };
    let mut reader = BufReader::with_capacity(READ_BUFFER_BYTES, reader);
    let mut batch = SourceBatch::default();
    let mut batch_bytes = 0usize;
    let mut line = Vec::with_capacity(4096);
    let mut line_no = 0u64;
    let mut started = std::time::Instant::now();
    loop {
        line.clear();
        line_no += 1;
        let n = match read_line_limited(&mut reader, &mut line) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) => {
                // A truncated gzip or a disk error: what was read stays, the rest is reported.
                batch.rejected.push(Rejection {
                    location: format!("{display}:{line_no}"),
                    reason: format!("read error, rest of file skipped: {e}"),
                });
                break;
            }
        };
        batch.bytes += n as u64;
        batch_bytes += n;
        let body = trim_line(&line);
        if body.is_empty() {
            continue;
        }
        if n > MAX_LINE_BYTES {
            batch.rejected.push(Rejection {
                location: format!("{display}:{line_no}"),
                reason: format!("line longer than {MAX_LINE_BYTES} bytes"),
            });
            continue;
        }
        match parse_line(body) {
            Ok(doc) => {
                if scope.includes(doc.user_id) {
                    batch.docs.push(doc);
                }
            }
            Err(e) => batch.rejected.push(Rejection {
                location: format!("{display}:{line_no}"),
                reason: e.to_string(),
            }),
        }
        if batch.docs.len() >= SOURCE_BATCH_DOCS || batch_bytes >= SOURCE_BATCH_BYTES {
            batch.busy = started.elapsed();
            if tx.blocking_send(Ok(std::mem::take(&mut batch))).is_err() {
                return false;
            }
            batch_bytes = 0;
            started = std::time::Instant::now();
        }
    }
    if !batch.docs.is_empty() || !batch.rejected.is_empty() || batch.bytes > 0 {
        batch.busy = started.elapsed();
        return tx.blocking_send(Ok(batch)).is_ok();
    }
    true
}

/// One JSONL line (its trailing newline trimmed) as a document.
pub fn parse_line(body: &[u8]) -> Result<RawDocument, serde_json::Error> {
    serde_json::from_slice::<RawDocument>(body)
}

/// Like `read_until(b'\n')` but stops storing past `MAX_LINE_BYTES` (still consuming the line),
/// so one giant line cannot exhaust memory. Returns the bytes consumed.
fn read_line_limited<R: BufRead>(r: &mut R, out: &mut Vec<u8>) -> std::io::Result<usize> {
    let mut consumed = 0;
    loop {
        let buf = match r.fill_buf() {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if buf.is_empty() {
            return Ok(consumed);
        }
        let (take, done) = match memchr_nl(buf) {
            Some(i) => (i + 1, true),
            None => (buf.len(), false),
        };
        if out.len() <= MAX_LINE_BYTES {
            out.extend_from_slice(&buf[..take.min(MAX_LINE_BYTES + 1 - out.len())]);
        }
        r.consume(take);
        consumed += take;
        if done {
            return Ok(consumed);
        }
    }
}

fn memchr_nl(b: &[u8]) -> Option<usize> {
    b.iter().position(|&c| c == b'\n')
}

fn trim_line(l: &[u8]) -> &[u8] {
    let mut end = l.len();
    while end > 0 && matches!(l[end - 1], b'\n' | b'\r' | b' ' | b'\t') {
        end -= 1;
    }
    let mut start = 0;
    while start < end && matches!(l[start], b' ' | b'\t') {
        start += 1;
    }
    &l[start..end]
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt;
    use std::io::Write;

    async fn collect(src: &JsonlSource, scope: BuildScope) -> (Vec<RawDocument>, Vec<Rejection>) {
        let mut s = src.documents(&scope);
        let (mut docs, mut rej) = (vec![], vec![]);
        while let Some(b) = s.next().await {
            let b = b.unwrap();
            docs.extend(b.docs);
            rej.extend(b.rejected);
        }
        (docs, rej)
    }

    const GOOD: &str = r#"{"user_id":1,"kind":"message","source_id":"m1","text":"hi","created_at":"2026-01-01T00:00:00Z","conversation_id":"c1"}"#;

    #[tokio::test]
    async fn reads_plain_and_gz_and_reports_bad_lines() {
        let dir = tempfile::tempdir().unwrap();
        let plain = dir.path().join("a.jsonl");
        std::fs::write(
            &plain,
            format!(
                "{GOOD}\nnot json\n\n{}\n",
                GOOD.replace("\"user_id\":1", "\"user_id\":2")
            ),
        )
        .unwrap();
        let gz = dir.path().join("b.jsonl.gz");
        let mut enc =
            flate2::write::GzEncoder::new(File::create(&gz).unwrap(), flate2::Compression::fast());
        writeln!(enc, "{}", GOOD.replace("m1", "m9")).unwrap();
        writeln!(enc, r#"{{"user_id":1,"kind":"nope","source_id":"x","text":"t","created_at":"2026-01-01T00:00:00Z"}}"#).unwrap();
        enc.finish().unwrap();

        let src = JsonlSource::new(&[dir.path()]).unwrap();
        let (docs, rej) = collect(&src, BuildScope::AllUsers).await;
        assert_eq!(docs.len(), 3);
        assert_eq!(rej.len(), 2);
        assert!(rej[0].location.ends_with("a.jsonl:2"), "{:?}", rej[0]);
        assert!(rej[1].location.ends_with("b.jsonl.gz:2"), "{:?}", rej[1]);
        assert!(rej[1].reason.contains("unknown variant"), "{:?}", rej[1]);

        let (docs, _) = collect(&src, BuildScope::User(2)).await;
        assert_eq!(docs.len(), 1);
        assert_eq!(docs[0].user_id, 2);
    }

    #[tokio::test]
    async fn truncated_gzip_keeps_what_was_read() {
        let dir = tempfile::tempdir().unwrap();
        let gz = dir.path().join("t.jsonl.gz");
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        for i in 0..2000 {
            writeln!(enc, "{}", GOOD.replace("m1", &format!("m{i}"))).unwrap();
        }
        let bytes = enc.finish().unwrap();
        std::fs::write(&gz, &bytes[..bytes.len() / 2]).unwrap();
        let src = JsonlSource::new(&[&gz]).unwrap();
        let (docs, rej) = collect(&src, BuildScope::AllUsers).await;
        assert!(!docs.is_empty() && docs.len() < 2000);
        assert_eq!(rej.len(), 1, "{rej:?}");
        assert!(rej[0].reason.contains("read error"));
    }

    #[test]
    fn bad_paths_fail_up_front() {
        let e = JsonlSource::new(&["/nonexistent/x.jsonl"]).unwrap_err();
        assert!(e.to_string().contains("/nonexistent/x.jsonl"));
        let dir = tempfile::tempdir().unwrap();
        assert!(JsonlSource::new(&[dir.path()]).is_err());
    }
}
