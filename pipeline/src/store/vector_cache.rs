//! Per-user vectors kept in memory between searches: reading a user's 100 k vectors from SQLite
//! is ~150 MB per question, a dot product over them is milliseconds. Entries carry the user's
//! store version (bumped by every write to that user's points), so a stale entry is never used;
//! the least recently used users go first when the byte budget is reached.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// Bytes of vectors the cache holds across users: a 100 k-chunk user at 384 dimensions is
/// 150 MB, so three of the largest users fit on a worker sized like ours; small users are KBs.
pub const VECTOR_CACHE_BYTES: usize = 512 << 20;

/// One user's vectors as a row-major matrix, with the store rows they came from.
#[derive(Debug)]
pub struct UserVectors {
    pub version: i64,
    pub dim: usize,
    pub rowids: Vec<i64>,
    pub flat: Vec<f32>,
}

impl UserVectors {
    pub fn bytes(&self) -> usize {
        self.flat.len() * 4 + self.rowids.len() * 8
    }
}

#[derive(Debug)]
struct Entry {
    vectors: Arc<UserVectors>,
    used: u64,
}

#[derive(Debug, Default)]
struct Inner {
    users: HashMap<i64, Entry>,
    bytes: usize,
    clock: u64,
}

#[derive(Debug)]
pub struct VectorCache {
    budget: usize,
    inner: Mutex<Inner>,
}

impl VectorCache {
    pub fn new(budget: usize) -> Self {
        Self {
            budget,
            inner: Mutex::new(Inner::default()),
        }
    }

    /// The user's vectors if cached at exactly `version`.
    pub fn get(&self, user_id: i64, version: i64) -> Option<Arc<UserVectors>> {
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        g.clock += 1;
        let now = g.clock;
        let e = g.users.get_mut(&user_id)?;
        if e.vectors.version != version {
            return None;
        }
        e.used = now;
        Some(e.vectors.clone())
    }

    /// Keeps `v` for `user_id`, replacing an older version and evicting the least recently used
    /// users past the budget. A user larger than the whole budget is not kept.
    pub fn put(&self, user_id: i64, v: Arc<UserVectors>) {
        if v.bytes() > self.budget {
            return;
        }
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        g.clock += 1;
        let used = g.clock;
        if let Some(old) = g.users.remove(&user_id) {
            g.bytes -= old.vectors.bytes();
        }
        g.bytes += v.bytes();
        g.users.insert(user_id, Entry { vectors: v, used });
        while g.bytes > self.budget {
            let Some((&oldest, _)) = g.users.iter().min_by_key(|(_, e)| e.used) else {
                break;
            };
            if let Some(e) = g.users.remove(&oldest) {
                g.bytes -= e.vectors.bytes();
            }
        }
    }

    /// Bytes held now.
    pub fn bytes(&self) -> usize {
        self.inner.lock().unwrap_or_else(|p| p.into_inner()).bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vecs(version: i64, rows: usize) -> Arc<UserVectors> {
        Arc::new(UserVectors {
            version,
            dim: 2,
            rowids: (0..rows as i64).collect(),
            flat: vec![0.5; rows * 2],
        })
    }

    #[test]
    fn hit_only_at_the_same_version() {
        let c = VectorCache::new(1 << 20);
        assert!(c.get(1, 1).is_none());
        c.put(1, vecs(1, 3));
        assert!(c.get(1, 1).is_some());
        assert!(c.get(1, 2).is_none(), "a newer version is a miss");
        c.put(1, vecs(2, 5));
        assert_eq!(c.get(1, 2).unwrap().rowids.len(), 5);
        assert_eq!(
            c.bytes(),
            vecs(2, 5).bytes(),
            "the old version's bytes are released"
        );
    }

    #[test]
    fn least_recently_used_go_first_and_giants_are_not_kept() {
        let one = vecs(1, 10).bytes();
        let c = VectorCache::new(one * 2);
        c.put(1, vecs(1, 10));
        c.put(2, vecs(1, 10));
        assert!(c.get(1, 1).is_some()); // 2 is now the least recently used
        c.put(3, vecs(1, 10));
        assert!(c.get(2, 1).is_none());
        assert!(c.get(1, 1).is_some() && c.get(3, 1).is_some());
        assert!(c.bytes() <= one * 2);
        c.put(4, vecs(1, 1000));
        assert!(c.get(4, 1).is_none());
        assert!(c.get(1, 1).is_some(), "a giant does not evict the others");
    }
}
