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

    /// The `k` rows nearest `query` by dot product (cosine for the unit vectors stored), best
    /// first, ties by row id. One pass over the matrix with a k-sized heap: no score array, and
    /// the dot product in eight lanes so the compiler vectorises it.
    pub fn top(&self, query: &[f32], k: usize) -> Vec<(i64, f32)> {
        use std::cmp::Reverse;
        use std::collections::BinaryHeap;
        #[derive(PartialEq)]
        struct Scored(f32, Reverse<i64>);
        impl Eq for Scored {}
        impl PartialOrd for Scored {
            fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
                Some(self.cmp(o))
            }
        }
        impl Ord for Scored {
            fn cmp(&self, o: &Self) -> std::cmp::Ordering {
                self.0.total_cmp(&o.0).then(self.1.cmp(&o.1))
            }
        }
        if k == 0 || self.dim == 0 || query.len() != self.dim {
            return Vec::new();
        }
        // A min-heap of the best k so far: its top is the one to beat.
        let mut best: BinaryHeap<Reverse<Scored>> = BinaryHeap::with_capacity(k + 1);
        for (row, &rowid) in self.flat.chunks_exact(self.dim).zip(&self.rowids) {
            let s = Scored(dot(row, query), Reverse(rowid));
            if best.len() < k {
                best.push(Reverse(s));
            } else if best.peek().is_some_and(|Reverse(worst)| s > *worst) {
                best.pop();
                best.push(Reverse(s));
            }
        }
        let mut out: Vec<Scored> = best.into_iter().map(|Reverse(s)| s).collect();
        out.sort_by(|a, b| b.cmp(a));
        out.into_iter()
            .map(|Scored(s, Reverse(r))| (r, s))
            .collect()
    }
}

/// Dot product in eight independent lanes (the compiler keeps them in vector registers).
fn dot(a: &[f32], b: &[f32]) -> f32 {
    const LANES: usize = 8;
    let mut acc = [0f32; LANES];
    let (ac, ar) = a.split_at(a.len() - a.len() % LANES);
    let (bc, br) = b.split_at(ac.len());
    for (x, y) in ac.chunks_exact(LANES).zip(bc.chunks_exact(LANES)) {
        for i in 0..LANES {
            acc[i] += x[i] * y[i];
        }
    }
    let tail: f32 = ar.iter().zip(br).map(|(x, y)| x * y).sum();
    acc.iter().sum::<f32>() + tail
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
    fn top_is_the_exact_nearest_rows_in_order() {
        // Rows at known dot products with q = (1, 0, …): row i scores i / 10, two rows tie.
        let dim = 11; // not a multiple of the lanes: the tail is summed too
        let scores = [0.3f32, 0.9, 0.1, 0.9, 0.5, -0.2];
        let mut flat = Vec::new();
        for s in scores {
            let mut row = vec![0.0; dim];
            row[0] = s;
            row[dim - 1] = 0.25; // q is 0 there: must not count
            flat.extend(row);
        }
        let v = UserVectors {
            version: 1,
            dim,
            rowids: vec![10, 11, 12, 13, 14, 15],
            flat,
        };
        let mut q = vec![0.0; dim];
        q[0] = 1.0;
        let top = v.top(&q, 3);
        assert_eq!(top, vec![(11, 0.9), (13, 0.9), (14, 0.5)]);
        assert_eq!(v.top(&q, 10).len(), 6);
        assert_eq!(v.top(&q, 10).last(), Some(&(15, -0.2)));
        assert!(v.top(&q, 0).is_empty());
        assert!(
            v.top(&q[..3], 2).is_empty(),
            "a wrong dimension finds nothing"
        );
        assert!((dot(&[1.0; 19], &[2.0; 19]) - 38.0).abs() < 1e-6);
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
