//! Retrieval: dense (vector), lexical (BM25 over `lexical` terms) or hybrid, where both candidate
//! lists are fused by weighted reciprocal rank. The fusion is a pure function over ranked lists,
//! so a store that fuses on its own server (Qdrant's `prefetch` + RRF) and the embedded one rank
//! alike, and the defaults are the ones the eval set chose (docs/retrieval.md).

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use crate::store::{SearchHit, StoreError, VectorStore};

/// How a question is matched against a user's memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum SearchMode {
    /// Both lists, fused.
    #[default]
    Hybrid,
    /// Nearest vectors only.
    Dense,
    /// BM25 over the words only; needs no embedding of the question.
    Lexical,
}

impl SearchMode {
    pub const ALL: [SearchMode; 3] = [SearchMode::Dense, SearchMode::Lexical, SearchMode::Hybrid];

    pub fn as_str(self) -> &'static str {
        match self {
            SearchMode::Hybrid => "hybrid",
            SearchMode::Dense => "dense",
            SearchMode::Lexical => "lexical",
        }
    }

    /// Whether the question's vector is needed.
    pub fn needs_vector(self) -> bool {
        self != SearchMode::Lexical
    }
}

impl std::str::FromStr for SearchMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "hybrid" => Ok(SearchMode::Hybrid),
            "dense" => Ok(SearchMode::Dense),
            "lexical" => Ok(SearchMode::Lexical),
            other => Err(format!(
                "unknown search mode {other:?}: expected hybrid, dense or lexical"
            )),
        }
    }
}

/// Weighted reciprocal-rank fusion: a hit at rank r (1-based) of a list adds
/// `weight / (k + r)`. Defaults chosen on `fixtures/eval/` by `orbit-worker eval --sweep`
/// (docs/retrieval.md): equal weights with k 10 sat in the middle of the plateau at recall@5 and
/// @10 (lexical weighted 2x lost 2 points at @5 there, k 1 lost 1-2 points at @5).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Fusion {
    pub rrf_k: f32,
    pub dense_weight: f32,
    pub lexical_weight: f32,
    /// Candidates taken from each list before fusing: deeper than any top_k asked, so a passage
    /// second in one list and tenth in the other can still come first.
    pub depth: usize,
}

impl Default for Fusion {
    fn default() -> Self {
        Self {
            rrf_k: DEFAULT_RRF_K,
            dense_weight: 1.0,
            lexical_weight: DEFAULT_LEXICAL_WEIGHT,
            depth: DEFAULT_DEPTH,
        }
    }
}

/// RRF's k: see `Fusion`.
pub const DEFAULT_RRF_K: f32 = 10.0;
/// The lexical list's weight against the dense list's 1.
pub const DEFAULT_LEXICAL_WEIGHT: f32 = 1.0;
/// Candidates per list: see `Fusion::depth`.
pub const DEFAULT_DEPTH: usize = 40;

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum FusionError {
    #[error("{0}")]
    Invalid(String),
}

impl Fusion {
    pub fn validate(&self) -> Result<(), FusionError> {
        let finite = |x: f32| x.is_finite() && x >= 0.0;
        if !finite(self.rrf_k) || !finite(self.dense_weight) || !finite(self.lexical_weight) {
            return Err(FusionError::Invalid(
                "fusion k and weights must be finite and not negative".into(),
            ));
        }
        if self.dense_weight + self.lexical_weight == 0.0 {
            return Err(FusionError::Invalid(
                "at least one fusion weight must be positive".into(),
            ));
        }
        if self.depth == 0 || self.depth > MAX_DEPTH {
            return Err(FusionError::Invalid(format!(
                "fusion depth must be between 1 and {MAX_DEPTH}"
            )));
        }
        Ok(())
    }
}

/// Deepest candidate list a search reads: each candidate is a row fetched.
pub const MAX_DEPTH: usize = 500;

/// Fuses two ranked lists (best first) into the best `top_k`. A hit in both lists keeps both
/// scores; ties break on the dense rank, then the id, so the order is deterministic.
pub fn fuse(
    dense: Vec<SearchHit>,
    lexical: Vec<SearchHit>,
    f: &Fusion,
    top_k: usize,
) -> Vec<SearchHit> {
    struct Entry {
        hit: SearchHit,
        fused: f64,
        best_rank: usize,
    }
    let mut by_id: HashMap<uuid::Uuid, Entry> = HashMap::new();
    for (list, weight) in [(dense, f.dense_weight), (lexical, f.lexical_weight)] {
        for (i, hit) in list.into_iter().enumerate() {
            let add = weight as f64 / (f.rrf_k as f64 + i as f64 + 1.0);
            match by_id.get_mut(&hit.id) {
                Some(e) => {
                    e.fused += add;
                    e.best_rank = e.best_rank.min(i);
                    e.hit.dense_score = e.hit.dense_score.or(hit.dense_score);
                    e.hit.lexical_score = e.hit.lexical_score.or(hit.lexical_score);
                }
                None => {
                    by_id.insert(
                        hit.id,
                        Entry {
                            hit,
                            fused: add,
                            best_rank: i,
                        },
                    );
                }
            }
        }
    }
    let mut all: Vec<Entry> = by_id.into_values().collect();
    all.sort_by(|a, b| {
        b.fused
            .total_cmp(&a.fused)
            .then(a.best_rank.cmp(&b.best_rank))
            .then(a.hit.id.cmp(&b.hit.id))
    });
    all.truncate(top_k);
    all.into_iter()
        .map(|mut e| {
            e.hit.score = e.fused as f32;
            e.hit
        })
        .collect()
}

/// One question to search.
#[derive(Debug, Clone)]
pub struct SearchRequest<'a> {
    pub user_id: i64,
    pub text: &'a str,
    /// The question's embedding; needed unless the mode is lexical.
    pub vector: Option<&'a [f32]>,
    pub mode: SearchMode,
    pub top_k: usize,
    pub fusion: Fusion,
}

/// Searches `store` as `req.mode` says.
pub async fn search(
    store: &dyn VectorStore,
    req: &SearchRequest<'_>,
) -> Result<Vec<SearchHit>, StoreError> {
    let vector = || {
        req.vector.ok_or_else(|| {
            StoreError::Backend(format!(
                "a {} search needs the question's vector",
                req.mode.as_str()
            ))
        })
    };
    match req.mode {
        SearchMode::Dense => store.search_dense(req.user_id, vector()?, req.top_k).await,
        SearchMode::Lexical => store.search_lexical(req.user_id, req.text, req.top_k).await,
        SearchMode::Hybrid => {
            store
                .search_hybrid(req.user_id, vector()?, req.text, req.top_k, &req.fusion)
                .await
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hit(n: u8) -> SearchHit {
        SearchHit {
            id: uuid::Uuid::from_bytes([n; 16]),
            score: 0.0,
            dense_score: None,
            lexical_score: None,
            user_id: 1,
            kind: "message".into(),
            source_ids: vec![format!("s{n}")],
            conversation_id: None,
            author: None,
            created_at: String::new(),
            text: String::new(),
        }
    }

    fn ids(h: &[SearchHit]) -> Vec<u8> {
        h.iter().map(|h| h.id.as_bytes()[0]).collect()
    }

    fn list(ns: &[u8], dense: bool) -> Vec<SearchHit> {
        ns.iter()
            .map(|&n| {
                let mut h = hit(n);
                if dense {
                    h.dense_score = Some(1.0 / n as f32);
                } else {
                    h.lexical_score = Some(10.0 / n as f32);
                }
                h
            })
            .collect()
    }

    #[test]
    fn fusion_table() {
        let eq = Fusion {
            rrf_k: 60.0,
            dense_weight: 1.0,
            lexical_weight: 1.0,
            depth: 10,
        };
        let lex2 = Fusion {
            rrf_k: 10.0,
            lexical_weight: 2.0,
            ..eq
        };
        // name, dense ids, lexical ids, fusion, top_k, fused ids
        type Case = (
            &'static str,
            &'static [u8],
            &'static [u8],
            Fusion,
            usize,
            &'static [u8],
        );
        let cases: &[Case] = &[
            ("only dense", &[1, 2, 3], &[], eq, 2, &[1, 2]),
            ("only lexical", &[], &[4, 5], eq, 5, &[4, 5]),
            ("both lists agree", &[1, 2], &[1, 2], eq, 2, &[1, 2]),
            // 2 is second in both: 2/(62) beats 1/(61) for either list's winner.
            (
                "shared second beats single firsts",
                &[1, 2],
                &[3, 2],
                eq,
                3,
                &[2, 1, 3],
            ),
            // Weighted 2x, lexical's second (4: 2/12) still beats dense's first (1: 1/11).
            ("lexical weight", &[1, 2], &[3, 4], lex2, 4, &[3, 4, 1, 2]),
            ("top_k zero", &[1], &[2], eq, 0, &[]),
            ("empty", &[], &[], eq, 3, &[]),
        ];
        for (name, d, l, f, k, want) in cases {
            let got = fuse(list(d, true), list(l, false), f, *k);
            assert_eq!(ids(&got), *want, "{name}");
            for w in got.windows(2) {
                assert!(w[0].score >= w[1].score, "{name}: scores descend");
            }
        }
    }

    #[test]
    fn a_hit_in_both_lists_keeps_both_scores() {
        let got = fuse(list(&[7], true), list(&[7], false), &Fusion::default(), 1);
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].dense_score, Some(1.0 / 7.0));
        assert_eq!(got[0].lexical_score, Some(10.0 / 7.0));
        let want = (1.0 + DEFAULT_LEXICAL_WEIGHT) / (DEFAULT_RRF_K + 1.0);
        assert!((got[0].score - want).abs() < 1e-6);
    }

    #[test]
    fn modes_parse_and_settings_validate() {
        assert_eq!("Hybrid".parse::<SearchMode>(), Ok(SearchMode::Hybrid));
        assert_eq!(" lexical".parse::<SearchMode>(), Ok(SearchMode::Lexical));
        assert!("bm25".parse::<SearchMode>().is_err());
        assert!(Fusion::default().validate().is_ok());
        for bad in [
            Fusion {
                rrf_k: f32::NAN,
                ..Default::default()
            },
            Fusion {
                dense_weight: -1.0,
                ..Default::default()
            },
            Fusion {
                dense_weight: 0.0,
                lexical_weight: 0.0,
                ..Default::default()
            },
            Fusion {
                depth: 0,
                ..Default::default()
            },
            Fusion {
                depth: MAX_DEPTH + 1,
                ..Default::default()
            },
        ] {
            assert!(bad.validate().is_err(), "{bad:?}");
        }
    }
}
