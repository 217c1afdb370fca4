//! Versions of the embedded store: each a SQLite file of its own in the data dir, the live one
//! named by the `LIVE` file (replaced atomically), so a re-embed builds a new version beside the
//! one answering and switches once, as a Qdrant alias does. `LiveSqliteStore` follows the switch
//! in a running process, and pins each build to the version it began on.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use tokio::sync::RwLock;
use uuid::Uuid;

use super::{BuildGeneration, SearchHit, SqliteStore, StoreError, VectorStore, VectorsByHash};
use crate::search::Fusion;
use crate::types::{BuildScope, EmbeddedChunk};

/// The one version a data dir has until a re-embed makes another.
pub const DEFAULT_FILE: &str = "vectors.sqlite";
const POINTER: &str = "LIVE";

fn io(what: &str, path: &Path, e: std::io::Error) -> StoreError {
    StoreError::Backend(format!("{what} {}: {e}", path.display()))
}

/// A version's file name: letters, digits, `_`, `-` and `.`, ending `.sqlite` (what `LIVE` may
/// name; anything else in it is refused, never opened).
fn valid(file: &str) -> bool {
    file.ends_with(".sqlite")
        && !file.starts_with('.')
        && file
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
}

/// The file of the version for `model` at `dim` (`tag` tells two runs of one model apart).
pub fn version_file(model: &str, dim: usize, tag: Option<&str>) -> String {
    format!(
        "{}.sqlite",
        super::qdrant_collection_name("vectors", model, dim, tag)
    )
}

/// The live version's file in `dir`.
pub fn live_file(dir: &Path) -> Result<String, StoreError> {
    let p = dir.join(POINTER);
    match std::fs::read_to_string(&p) {
        Ok(s) => {
            let f = s.trim();
            if !valid(f) {
                return Err(StoreError::Config(format!(
                    "{} names {f:?}, which is not a store version file",
                    p.display()
                )));
            }
            Ok(f.to_string())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(DEFAULT_FILE.to_string()),
        Err(e) => Err(io("reading", &p, e)),
    }
}

/// Makes `file` the live version: written beside, synced, renamed over `LIVE` (a reader sees
/// the old name or the new, never part of one).
pub fn set_live(dir: &Path, file: &str) -> Result<(), StoreError> {
    use std::io::Write;
    if !valid(file) {
        return Err(StoreError::Config(format!(
            "{file:?} is not a store version file"
        )));
    }
    let tmp = dir.join(format!("{POINTER}.tmp"));
    let mut f = std::fs::File::create(&tmp).map_err(|e| io("writing", &tmp, e))?;
    f.write_all(file.as_bytes())
        .and_then(|_| f.sync_all())
        .map_err(|e| io("writing", &tmp, e))?;
    let p = dir.join(POINTER);
    std::fs::rename(&tmp, &p).map_err(|e| io("renaming", &p, e))?;
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// Deletes a version that is not live (its file and SQLite's WAL and shared-memory files).
pub fn remove_version(dir: &Path, file: &str) -> Result<(), StoreError> {
    if !valid(file) {
        return Err(StoreError::Config(format!(
            "{file:?} is not a store version file"
        )));
    }
    if live_file(dir)? == file {
        return Err(StoreError::Config(format!("{file} is the live version")));
    }
    for suffix in ["", "-wal", "-shm"] {
        let p = dir.join(format!("{file}{suffix}"));
        match std::fs::remove_file(&p) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io("removing", &p, e)),
        }
    }
    Ok(())
}

/// The live version of a data dir, whichever it is now: every call looks at `LIVE` (a small
/// read from the page cache) and opens the new version once after a switch.
pub struct LiveSqliteStore {
    dir: std::path::PathBuf,
    lexical: bool,
    current: RwLock<(String, Arc<SqliteStore>)>,
    /// The version each build in progress began on: its writes and sweep stay there, so a
    /// switch in the middle of a build never sweeps the new version with the old one's build.
    builds: Mutex<HashMap<BuildGeneration, Arc<SqliteStore>>>,
}

impl LiveSqliteStore {
    pub async fn open(dir: &Path, lexical: bool) -> Result<Self, StoreError> {
        std::fs::create_dir_all(dir).map_err(|e| io("creating data dir", dir, e))?;
        let file = live_file(dir)?;
        let store = Arc::new(SqliteStore::open_file(dir, &file, lexical).await?);
        Ok(Self {
            dir: dir.to_path_buf(),
            lexical,
            current: RwLock::new((file, store)),
            builds: Mutex::default(),
        })
    }

    /// The live version now.
    pub async fn live(&self) -> Result<Arc<SqliteStore>, StoreError> {
        let file = live_file(&self.dir)?;
        {
            let cur = self.current.read().await;
            if cur.0 == file {
                return Ok(cur.1.clone());
            }
        }
        let mut cur = self.current.write().await;
        if cur.0 != file {
            let store = Arc::new(SqliteStore::open_file(&self.dir, &file, self.lexical).await?);
            tracing::info!(version = %file, "the embedded store's live version changed");
            *cur = (file, store);
        }
        Ok(cur.1.clone())
    }

    fn pinned(&self, gen: BuildGeneration) -> Option<Arc<SqliteStore>> {
        self.builds
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&gen)
            .cloned()
    }

    async fn for_build(&self, gen: BuildGeneration) -> Result<Arc<SqliteStore>, StoreError> {
        match self.pinned(gen) {
            Some(s) => Ok(s),
            None => self.live().await,
        }
    }
}

#[async_trait]
impl VectorStore for LiveSqliteStore {
    async fn ensure_model(&self, model: &str, dim: usize) -> Result<(), StoreError> {
        self.live().await?.ensure_model(model, dim).await
    }
    async fn model(&self) -> Result<Option<(String, usize)>, StoreError> {
        self.live().await?.model().await
    }
    async fn reset(&self) -> Result<(), StoreError> {
        self.live().await?.reset().await
    }
    async fn begin_build(&self) -> Result<BuildGeneration, StoreError> {
        let store = self.live().await?;
        let gen = store.begin_build().await?;
        self.builds
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(gen, store);
        Ok(gen)
    }
    async fn upsert(
        &self,
        gen: BuildGeneration,
        points: &[EmbeddedChunk],
    ) -> Result<(), StoreError> {
        self.for_build(gen).await?.upsert(gen, points).await
    }
    async fn finish_build(
        &self,
        gen: BuildGeneration,
        scope: &BuildScope,
    ) -> Result<u64, StoreError> {
        let r = self.for_build(gen).await?.finish_build(gen, scope).await;
        self.builds
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&gen);
        r
    }
    async fn search_dense(
        &self,
        user_id: i64,
        query: &[f32],
        top_k: usize,
    ) -> Result<Vec<SearchHit>, StoreError> {
        self.live().await?.search_dense(user_id, query, top_k).await
    }
    async fn search_lexical(
        &self,
        user_id: i64,
        question: &str,
        top_k: usize,
    ) -> Result<Vec<SearchHit>, StoreError> {
        self.live()
            .await?
            .search_lexical(user_id, question, top_k)
            .await
    }
    async fn search_hybrid(
        &self,
        user_id: i64,
        query: &[f32],
        question: &str,
        top_k: usize,
        fusion: &Fusion,
    ) -> Result<Vec<SearchHit>, StoreError> {
        self.live()
            .await?
            .search_hybrid(user_id, query, question, top_k, fusion)
            .await
    }
    async fn vectors_by_hash(&self, keys: &[(i64, &str)]) -> Result<VectorsByHash, StoreError> {
        self.live().await?.vectors_by_hash(keys).await
    }
    async fn count(&self, user_id: i64) -> Result<u64, StoreError> {
        self.live().await?.count(user_id).await
    }
    async fn point_ids(&self, user_id: i64) -> Result<Vec<Uuid>, StoreError> {
        self.live().await?.point_ids(user_id).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_plain_version_file_names_are_opened() {
        for (name, ok) in [
            ("vectors.sqlite", true),
            ("vectors__text_embedding_3_small_1536__r1.sqlite", true),
            ("../etc/passwd.sqlite", false),
            ("a/b.sqlite", false),
            (".hidden.sqlite", false),
            ("vectors.db", false),
            ("", false),
        ] {
            assert_eq!(valid(name), ok, "{name}");
        }
    }

    #[tokio::test]
    async fn a_switch_is_seen_by_a_running_store_and_a_build_stays_on_its_version() {
        use crate::embed::Embedder;
        let dir = tempfile::tempdir().unwrap();
        let live = LiveSqliteStore::open(dir.path(), true).await.unwrap();
        let e = crate::embed::HashingEmbedder::new(4);
        live.ensure_model(e.model_id(), 4).await.unwrap();
        let point = |user: i64, text: &str| EmbeddedChunk {
            chunk: crate::types::Chunk::note(user, text, text),
            vector: e.embed_one(text),
        };
        let g = live.begin_build().await.unwrap();
        live.upsert(g, &[point(1, "old version")]).await.unwrap();
        live.finish_build(g, &BuildScope::User(1)).await.unwrap();

        // The new version is built; then a user's build begins on the old one (a newer
        // generation than the new version's points), and the switch happens meanwhile.
        let file = version_file("m", 4, Some("r1"));
        let new = SqliteStore::open_file(dir.path(), &file, true)
            .await
            .unwrap();
        new.ensure_model(e.model_id(), 4).await.unwrap();
        let g2 = new.begin_build().await.unwrap();
        new.upsert(g2, &[point(1, "new version")]).await.unwrap();
        new.finish_build(g2, &BuildScope::User(1)).await.unwrap();
        let pinned = live.begin_build().await.unwrap();
        set_live(dir.path(), &file).unwrap();

        // The build in progress writes and sweeps the old version: unpinned, its write would land
        // in the new one and its sweep (a newer generation) delete the new version's point.
        live.upsert(pinned, &[point(1, "late write")])
            .await
            .unwrap();
        live.finish_build(pinned, &BuildScope::User(1))
            .await
            .unwrap();
        let hits = live
            .search_dense(1, &e.embed_one("new version"), 5)
            .await
            .unwrap();
        assert_eq!(hits.len(), 1, "{hits:?}");
        assert_eq!(hits[0].text, "new version");
        remove_version(dir.path(), DEFAULT_FILE).unwrap();
        assert!(remove_version(dir.path(), &file).is_err(), "the live one");
        assert!(!dir.path().join(DEFAULT_FILE).exists());
    }
}
