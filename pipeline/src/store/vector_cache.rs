//! Per-user vectors kept in memory between searches: reading a user's 100 k vectors from SQLite
//! is ~150 MB per question, a dot product over them is milliseconds. Entries carry the user's
//! store version (bumped by every write to that user's points), so a stale entry is never used;
//! the least recently used users go first when the byte budget is reached.
//!
//! A large user is searched in two passes that return exactly what one f32 pass would: an 8-bit
//! copy of the vectors (a quarter of the bytes to stream per question) gives each row a score
//! with a proven error bound, and only rows whose bound reaches the k-th best lower bound are
//! scored again in f32.

use std::cmp::Reverse;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// Bytes of vectors the cache holds across users: a 100 k-chunk user at 384 dimensions is
/// 150 MB of f32 and 38 MB of its 8-bit copy, so two of the largest users fit on a worker sized
/// like ours; small users are KBs.
pub const VECTOR_CACHE_BYTES: usize = 512 << 20;

/// From this many rows a user is searched through the 8-bit copy first: below it the f32 pass is
/// already well under a millisecond and the copy is not worth its memory or its second pass.
pub const QUANTIZED_FROM_ROWS: usize = 4096;

/// What f32 arithmetic can add to a row's error bound, as a multiple of `dim · ε · max|x| · ‖q‖₁`
/// (the rounding of a sum of `dim` products, with room for the quantisation's own rounding):
/// keeps the bound a bound for vectors of any length.
const ROUNDING_FACTOR: f32 = 2.0;

/// One user's vectors as a row-major matrix, with the store rows they came from.
#[derive(Debug)]
pub struct UserVectors {
    pub version: i64,
    pub dim: usize,
    pub rowids: Vec<i64>,
    pub flat: Vec<f32>,
    /// The 8-bit copy (empty under `QUANTIZED_FROM_ROWS` rows): row r is `codes[r*dim..]` times
    /// `scales[r]`, each component within `scales[r] / 2` of the f32 one.
    codes: Vec<i8>,
    scales: Vec<f32>,
    /// Each row's L1 norm: what a question's rounding can move its score by.
    l1: Vec<f32>,
}

impl UserVectors {
    /// The matrix of `rowids.len()` rows of `dim`, with its 8-bit copy when it is large enough to
    /// pay for one.
    pub fn new(version: i64, dim: usize, rowids: Vec<i64>, flat: Vec<f32>) -> Self {
        let rows = rowids.len();
        let (mut codes, mut scales, mut l1) = (Vec::new(), Vec::new(), Vec::new());
        if dim > 0 && rows >= QUANTIZED_FROM_ROWS && flat.len() == rows * dim {
            codes.reserve_exact(rows * dim);
            scales.reserve_exact(rows);
            l1.reserve_exact(rows);
            for row in flat.chunks_exact(dim) {
                scales.push(quantize(row, &mut codes));
                l1.push(row.iter().map(|x| x.abs()).sum());
            }
        }
        Self {
            version,
            dim,
            rowids,
            flat,
            codes,
            scales,
            l1,
        }
    }

    pub fn bytes(&self) -> usize {
        self.flat.len() * 4 + self.rowids.len() * 8 + self.codes.len() + self.scales.len() * 8
    }

    /// The `k` rows nearest `query` by dot product (cosine for the unit vectors stored), best
    /// first, ties by row id: exactly what one f32 pass over every row gives, whichever path
    /// computes it.
    pub fn top(&self, query: &[f32], k: usize) -> Vec<(i64, f32)> {
        if k == 0 || self.dim == 0 || query.len() != self.dim {
            return Vec::new();
        }
        if self.codes.is_empty() || self.rowids.len() <= k || !query.iter().all(|x| x.is_finite()) {
            return self.exact_top(query, k);
        }
        self.two_pass_top(query, k).0
    }

    /// One f32 pass over the matrix with a k-sized heap: no score array, and the dot product in
    /// eight lanes so the compiler vectorises it.
    fn exact_top(&self, query: &[f32], k: usize) -> Vec<(i64, f32)> {
        let rows = self
            .flat
            .chunks_exact(self.dim)
            .zip(&self.rowids)
            .map(|(row, &rowid)| Scored(dot(row, query), Reverse(rowid)));
        best_k(rows, k)
    }

    /// The 8-bit pass bounds each row's f32 score within [lower, upper]; the k-th largest lower
    /// bound is a score the k-th best row reaches, so every row of the true top k has an upper
    /// bound at or above it. Those candidates (a few per cent of the rows) are scored in f32.
    /// Also returns how many rows the f32 pass scored.
    fn two_pass_top(&self, query: &[f32], k: usize) -> (Vec<(i64, f32)>, usize) {
        let codes = Codes {
            codes: &self.codes,
            scales: &self.scales,
            l1: &self.l1,
            dim: self.dim,
        };
        let bounds = approximate_bounds(&codes, &QuestionCodes::new(query));
        let mut lowers: Vec<f32> = bounds.iter().map(|b| b.0).collect();
        let (_, kth, _) = lowers.select_nth_unstable_by(k - 1, |a, b| b.total_cmp(a));
        let threshold = *kth;
        let mut scored = 0;
        let candidates = bounds
            .iter()
            .enumerate()
            .filter(|(_, b)| b.1 >= threshold)
            .map(|(r, _)| {
                scored += 1;
                let row = &self.flat[r * self.dim..(r + 1) * self.dim];
                Scored(dot(row, query), Reverse(self.rowids[r]))
            });
        let top = best_k(candidates, k);
        (top, scored)
    }
}

#[derive(PartialEq)]
struct Scored(f32, std::cmp::Reverse<i64>);
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

/// The best `k` of `rows`, best first, through a k-sized min-heap whose top is the one to beat.
fn best_k(rows: impl Iterator<Item = Scored>, k: usize) -> Vec<(i64, f32)> {
    use std::collections::BinaryHeap;
    let mut best: BinaryHeap<Reverse<Scored>> = BinaryHeap::with_capacity(k + 1);
    for s in rows {
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

/// Appends `v` as 8-bit codes and returns their scale: `v[i]` is within `scale / 2` of
/// `code[i] * scale`. A vector with a non-finite component gets an infinite scale (its bound
/// is then infinite and the f32 pass decides); a zero vector gets scale 0 and is exact.
fn quantize(v: &[f32], codes: &mut Vec<i8>) -> f32 {
    if !v.iter().all(|x| x.is_finite()) {
        codes.extend(std::iter::repeat_n(0, v.len()));
        return f32::INFINITY;
    }
    let max = v.iter().fold(0f32, |m, x| m.max(x.abs()));
    if max == 0.0 {
        codes.extend(std::iter::repeat_n(0, v.len()));
        return 0.0;
    }
    let scale = max / 127.0;
    codes.extend(
        v.iter()
            .map(|x| (x / scale).round().clamp(-127.0, 127.0) as i8),
    );
    scale
}

/// The 8-bit copy of a matrix, borrowed.
struct Codes<'a> {
    codes: &'a [i8],
    scales: &'a [f32],
    l1: &'a [f32],
    dim: usize,
}

/// A question in 8 bits (widened to 16 for the multiply-adds), with its scale and L1 norm.
struct QuestionCodes {
    codes: Vec<i16>,
    scale: f32,
    l1: f32,
}

impl QuestionCodes {
    fn new(query: &[f32]) -> Self {
        let mut q8 = Vec::with_capacity(query.len());
        let scale = quantize(query, &mut q8);
        Self {
            codes: q8.iter().map(|&c| c as i16).collect(),
            scale,
            l1: query.iter().map(|x| x.abs()).sum(),
        }
    }
}

/// Each row's (lower, upper) bound on its f32 dot with the question. With x = s·x̂ + e and
/// q = s_q·q̂ + f (|e_i| ≤ s/2, |f_i| ≤ s_q/2): x·q − s·s_q·(x̂·q̂) = x·f + e·q − e·f, so the
/// error is at most s_q/2·‖x‖₁ + s/2·‖q‖₁ + dim·s·s_q/4, plus rounding slack.
fn approximate_bounds(m: &Codes, q: &QuestionCodes) -> Vec<(f32, f32)> {
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU has just been seen to support AVX2, all the function requires.
            return unsafe { approximate_bounds_avx2(m, q) };
        }
    }
    bounds_with(dot_i8, m, q)
}

/// The same loop for AVX2, with the 8-bit dot in 16-lane multiply-adds.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn approximate_bounds_avx2(m: &Codes, q: &QuestionCodes) -> Vec<(f32, f32)> {
    bounds_with(|row, q| dot_i8_avx2(row, q), m, q)
}

#[inline(always)]
fn bounds_with(
    dot8: impl Fn(&[i8], &[i16]) -> i32,
    m: &Codes,
    q: &QuestionCodes,
) -> Vec<(f32, f32)> {
    let (qs, q_l1) = (q.scale, q.l1);
    let quarter_dim = m.dim as f32 / 4.0;
    // max|x| ≤ 127.5 · s for every row.
    let rounding = ROUNDING_FACTOR * m.dim as f32 * f32::EPSILON * 127.5 * q_l1;
    m.codes
        .chunks_exact(m.dim)
        .zip(m.scales.iter().zip(m.l1))
        .map(|(row, (&s, &x_l1))| {
            if !s.is_finite() {
                return (f32::NEG_INFINITY, f32::INFINITY);
            }
            // |dot| ≤ dim · 127 · 127 < 2^24: the integer is exact as an f32.
            let approx = dot8(row, &q.codes) as f32 * s * qs;
            let err = 0.5 * qs * x_l1 + 0.5 * s * q_l1 + quarter_dim * s * qs + rounding * s;
            (approx - err, approx + err)
        })
        .collect()
}

/// The 8-bit dot product, portably.
fn dot_i8(x: &[i8], q: &[i16]) -> i32 {
    x.iter().zip(q).map(|(&a, &b)| a as i32 * b as i32).sum()
}

/// The 8-bit dot product with AVX2: 16 codes widened to 16 bits, multiplied with the question
/// and summed in pairs (`vpmaddwd`), into eight 32-bit lanes.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn dot_i8_avx2(x: &[i8], q: &[i16]) -> i32 {
    use std::arch::x86_64::*;
    let n = x.len().min(q.len());
    let mut acc = _mm256_setzero_si256();
    let mut i = 0;
    while i + 16 <= n {
        // SAFETY: i + 16 <= n, so the 16 bytes of x and the 16 i16 of q read are in bounds;
        // both loads are unaligned ones.
        let (xv, qv) = unsafe {
            (
                _mm256_cvtepi8_epi16(_mm_loadu_si128(x.as_ptr().add(i) as *const __m128i)),
                _mm256_loadu_si256(q.as_ptr().add(i) as *const __m256i),
            )
        };
        acc = _mm256_add_epi32(acc, _mm256_madd_epi16(xv, qv));
        i += 16;
    }
    let s = _mm_add_epi32(
        _mm256_castsi256_si128(acc),
        _mm256_extracti128_si256::<1>(acc),
    );
    let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b01_00_11_10>(s));
    let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b10_11_00_01>(s));
    _mm_cvtsi128_si32(s) + dot_i8(&x[i..n], &q[i..n])
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

/// What a `UserCache` holds: a per-user value read at one store version.
pub trait Versioned {
    /// The user's store version it was read at.
    fn version(&self) -> i64;
    /// What it costs in memory.
    fn bytes(&self) -> usize;
}

impl Versioned for UserVectors {
    fn version(&self) -> i64 {
        self.version
    }
    fn bytes(&self) -> usize {
        UserVectors::bytes(self)
    }
}

#[derive(Debug)]
struct Entry<T> {
    value: Arc<T>,
    used: u64,
}

#[derive(Debug)]
struct Inner<T> {
    users: HashMap<i64, Entry<T>>,
    bytes: usize,
    clock: u64,
}

/// Per-user values under a byte budget, least recently used out first, each valid at exactly
/// the version it was read at.
#[derive(Debug)]
pub struct UserCache<T> {
    budget: usize,
    inner: Mutex<Inner<T>>,
}

/// The users' vectors.
pub type VectorCache = UserCache<UserVectors>;

impl<T: Versioned> UserCache<T> {
    pub fn new(budget: usize) -> Self {
        Self {
            budget,
            inner: Mutex::new(Inner {
                users: HashMap::new(),
                bytes: 0,
                clock: 0,
            }),
        }
    }

    /// The user's value if cached at exactly `version`.
    pub fn get(&self, user_id: i64, version: i64) -> Option<Arc<T>> {
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        g.clock += 1;
        let now = g.clock;
        let e = g.users.get_mut(&user_id)?;
        if e.value.version() != version {
            return None;
        }
        e.used = now;
        Some(e.value.clone())
    }

    /// Keeps `v` for `user_id`, replacing an older version and evicting the least recently used
    /// users past the budget. A user larger than the whole budget is not kept.
    pub fn put(&self, user_id: i64, v: Arc<T>) {
        if v.bytes() > self.budget {
            return;
        }
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        g.clock += 1;
        let used = g.clock;
        if let Some(old) = g.users.remove(&user_id) {
            g.bytes -= old.value.bytes();
        }
        g.bytes += v.bytes();
        g.users.insert(user_id, Entry { value: v, used });
        while g.bytes > self.budget {
            let Some((&oldest, _)) = g.users.iter().min_by_key(|(_, e)| e.used) else {
                break;
            };
            if let Some(e) = g.users.remove(&oldest) {
                g.bytes -= e.value.bytes();
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
        Arc::new(UserVectors::new(
            version,
            2,
            (0..rows as i64).collect(),
            vec![0.5; rows * 2],
        ))
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
        let v = UserVectors::new(1, dim, vec![10, 11, 12, 13, 14, 15], flat);
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

    /// Unit vectors sharing a common direction (as sentence embeddings do: their cosines
    /// crowd together), with exact duplicates, a zero row and a non-finite row.
    fn crowded_matrix(rows: usize, dim: usize, seed: u64) -> UserVectors {
        use rand::{RngExt, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let common: Vec<f32> = (0..dim).map(|_| rng.random::<f32>() - 0.5).collect();
        let mut flat = Vec::with_capacity(rows * dim);
        for r in 0..rows {
            let row: Vec<f32> = if r % 997 == 5 && r > 0 {
                flat[(r - 1) * dim..r * dim].to_vec() // a tie with the row before
            } else if r == 17 {
                vec![0.0; dim]
            } else {
                let v: Vec<f32> = common
                    .iter()
                    .map(|c| c + 0.6 * (rng.random::<f32>() - 0.5))
                    .collect();
                let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
                v.into_iter().map(|x| x / n).collect()
            };
            flat.extend(row);
        }
        flat[40 * dim + 3] = f32::NAN;
        UserVectors::new(1, dim, (0..rows as i64).map(|r| r * 3).collect(), flat)
    }

    #[test]
    fn the_eight_bit_pass_returns_exactly_the_f32_answer() {
        let dim = 384;
        let v = crowded_matrix(QUANTIZED_FROM_ROWS * 3, dim, 11);
        assert!(!v.codes.is_empty(), "a large user gets the 8-bit copy");
        use rand::{RngExt, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(5);
        let mut scored_total = 0;
        let mut asked = 0;
        for i in 0..60 {
            // Questions near rows (a real question's best passages stand out) and at random.
            let q: Vec<f32> = if i % 2 == 0 {
                let r = rng.random_range(0..v.rowids.len());
                v.flat[r * dim..(r + 1) * dim]
                    .iter()
                    .map(|x| x + 0.05 * (rng.random::<f32>() - 0.5))
                    .collect()
            } else {
                (0..dim).map(|_| rng.random::<f32>() - 0.5).collect()
            };
            if !q.iter().all(|x| x.is_finite()) {
                continue;
            }
            for k in [1, 5, 40] {
                // Compared bit for bit: the NaN row (first by total order) equals itself.
                let bits = |t: Vec<(i64, f32)>| -> Vec<(i64, u32)> {
                    t.into_iter().map(|(r, s)| (r, s.to_bits())).collect()
                };
                let (fast, scored) = v.two_pass_top(&q, k);
                let fast = bits(fast);
                assert_eq!(fast, bits(v.exact_top(&q, k)), "question {i}, k {k}");
                assert_eq!(bits(v.top(&q, k)), fast);
                scored_total += scored;
                asked += 1;
            }
        }
        let share = scored_total as f64 / (asked * v.rowids.len()) as f64;
        assert!(
            share < 0.25,
            "the bound must leave most rows out of the f32 pass: {share:.3} scored"
        );
    }

    #[test]
    fn the_error_bound_holds_where_rounding_is_worst() {
        // Components just under half a step past a code, all one sign, in rows and question:
        // every rounding error adds up, and the bound must still hold, and nearly be reached
        // (so a bound half as wide would fail here).
        use rand::{RngExt, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        let dim = 384;
        let half_stepped = |rng: &mut rand::rngs::StdRng| -> Vec<f32> {
            let step = 1.0 / 127.0;
            let mut v: Vec<f32> = (0..dim)
                .map(|_| (rng.random_range(1..120) as f32 + 0.499) * step)
                .collect();
            v[0] = 1.0; // fixes the scale at one step
            v
        };
        let mut worst = 0f32;
        for _ in 0..50 {
            let x = half_stepped(&mut rng);
            let q = half_stepped(&mut rng);
            let mut xc = Vec::new();
            let s = quantize(&x, &mut xc);
            let x_l1 = [x.iter().map(|v| v.abs()).sum()];
            let m = Codes {
                codes: &xc,
                scales: &[s],
                l1: &x_l1,
                dim,
            };
            let (lo, hi) = approximate_bounds(&m, &QuestionCodes::new(&q))[0];
            let exact = dot(&x, &q);
            assert!(lo <= exact && exact <= hi, "{lo} <= {exact} <= {hi}");
            let mid = (lo + hi) / 2.0;
            worst = worst.max((exact - mid).abs() / ((hi - lo) / 2.0));
        }
        assert!(worst > 0.8, "the bound is far from tight here: {worst}");
    }

    #[test]
    fn both_eight_bit_dots_agree() {
        use rand::{RngExt, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(9);
        for n in [0, 1, 15, 16, 17, 384, 391] {
            let x: Vec<i8> = (0..n).map(|_| rng.random_range(-127..=127)).collect();
            let q: Vec<i16> = (0..n).map(|_| rng.random_range(-127..=127)).collect();
            let want: i64 = x.iter().zip(&q).map(|(&a, &b)| a as i64 * b as i64).sum();
            assert_eq!(dot_i8(&x, &q) as i64, want, "portable, {n}");
            #[cfg(target_arch = "x86_64")]
            if std::is_x86_feature_detected!("avx2") {
                // SAFETY: AVX2 is present.
                assert_eq!(unsafe { dot_i8_avx2(&x, &q) } as i64, want, "avx2, {n}");
            }
        }
    }

    #[test]
    fn quantized_codes_stay_within_half_a_step() {
        let v = [0.3f32, -0.7, 0.0, 0.05, 0.7];
        let mut codes = Vec::new();
        let s = quantize(&v, &mut codes);
        assert_eq!(codes[1], -127);
        assert_eq!(codes[4], 127);
        for (x, c) in v.iter().zip(&codes) {
            assert!((x - *c as f32 * s).abs() <= s / 2.0 + 1e-7);
        }
        let mut z = Vec::new();
        assert_eq!(quantize(&[0.0; 3], &mut z), 0.0);
        assert_eq!(quantize(&[1.0, f32::INFINITY], &mut z), f32::INFINITY);
        assert_eq!(z.len(), 5);
        // Small users keep no copy.
        assert!(UserVectors::new(1, 2, vec![1], vec![0.5, 0.5])
            .codes
            .is_empty());
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
