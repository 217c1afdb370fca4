//! The Qdrant server store (production): the same `VectorStore` as the embedded one, over gRPC,
//! with one collection per model version behind an alias the app always reads.
//!
//! - Points: the deterministic UUIDv5 id, a named dense vector (cosine) and a named sparse vector
//!   of the chunk's terms with the IDF modifier, so the server scores BM25-style and fuses both
//!   lists (RRF) in one `query` call.
//! - Tenancy: `user_id` is a keyword payload with an `is_tenant` index (Qdrant's multitenancy
//!   pattern: the user's points are stored together and every query is filtered by it first).
//! - The build-generation fence: `build_gen` is an integer payload with a range index. An upsert
//!   only overwrites a point whose stored generation is not newer (`update_filter`), and a sweep
//!   deletes only older generations, as the embedded store's `WHERE` clauses do.
//! - The collection's model, dimension and last generation live in one meta point with no
//!   vectors and no `user_id`, so no user filter ever matches it.
//! - The alias: reads and writes go through it; a re-embed builds another collection and moves
//!   the alias in one atomic `update_aliases` call (`swap_alias`).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use qdrant_client::qdrant::{
    alias_operations, point_id::PointIdOptions, value::Kind, vector_output::Vector as VectorKind,
    vectors_output::VectorsOptions, AliasOperations, ChangeAliases, Condition, CountPointsBuilder,
    CreateAlias, CreateCollectionBuilder, CreateFieldIndexCollectionBuilder, DeleteAlias,
    DeletePointsBuilder, Distance, FieldType, Filter, GetPointsBuilder, IntegerIndexParamsBuilder,
    KeywordIndexParamsBuilder, Modifier, NamedVectors, PayloadIncludeSelector, PointId,
    PointStruct, PrefetchQueryBuilder, Query, QueryPointsBuilder, Range, RrfBuilder, ScoredPoint,
    ScrollPointsBuilder, SetPayloadPointsBuilder, SparseVectorParamsBuilder,
    SparseVectorsConfigBuilder, UpsertPointsBuilder, Value, VectorInput, VectorParamsBuilder,
    VectorsConfigBuilder, VectorsSelector,
};
use qdrant_client::{Payload, Qdrant, QdrantError};
use uuid::Uuid;

use super::{chunk_terms, term_prefix, BuildGeneration, SearchHit, StoreError, VectorStore};
use crate::search::Fusion;
use crate::secret::Secret;
use crate::types::{BuildScope, EmbeddedChunk};

/// The alias the app reads when none is configured.
pub const DEFAULT_ALIAS: &str = "orbit_memory";
const DENSE: &str = "dense";
const LEXICAL: &str = "lexical";
/// The meta point's id: a fixed UUID no chunk id (UUIDv5 of user, sources, index) can take.
const META_ID: &str = "00000000-0000-0000-0000-00000000a11a";

/// Points per upsert call: 256 × (a 1,536-dim vector, 6 KB, plus text and payload, about 3 KB)
/// is about 2.3 MB, under the server's 32 MB request limit with room for long chunks, and large
/// enough that the round trip is a small share of the server's indexing work.
const UPSERT_POINTS_PER_CALL: usize = 256;
/// Points per scroll page (ids, or hashes with vectors): a page of 1,024 1,536-dim vectors is
/// 6 MB, a fraction of a second to read; fewer round trips for a user of 100 k points.
const SCROLL_PAGE: u32 = 1024;
/// Content hashes per reuse lookup: the filter's `match any` list stays small for the server,
/// and one page of results holds them (a hash shared by several points adds pages).
const HASHES_PER_LOOKUP: usize = 512;
/// BM25's saturation and length normalisation, the values FTS5's `bm25()` uses in the embedded
/// store, so both stores weigh a term alike.
const BM25_K1: f32 = 1.2;
const BM25_B: f32 = 0.75;
/// The average number of distinct terms in a chunk, BM25's `avgdl`: a sparse vector is written
/// once, so the collection's live average is not known then. A 512-token chunk of chat holds
/// about 150 distinct terms (the long-conversation evaluation set's mean was 140).
const BM25_AVG_TERMS: f32 = 150.0;

/// How long a read of the collection's shape is trusted: a worker sees an alias swapped by
/// another (a re-embed) within this, for the price of one small read per interval.
const SHAPE_TTL: Duration = Duration::from_secs(10);

/// How to reach the server and which alias to serve.
#[derive(Debug, Clone)]
pub struct QdrantSettings {
    /// The gRPC endpoint, `http://host:6334` (or `https://`).
    pub url: String,
    pub api_key: Option<Secret>,
    /// What the app reads (`orbit_memory`); collections are named after it.
    pub alias: String,
    /// Per call; a stalled server is then a retryable error, not a hung build.
    pub timeout: Duration,
    /// False: no sparse vectors are written, and lexical search finds nothing.
    pub lexical: bool,
    /// How a new collection is spread over a cluster (unset: the server's defaults).
    pub cluster: QdrantCluster,
}

/// A new collection's distribution over a Qdrant cluster (docs/scaling.md): shards (by default
/// one per node), copies of each shard, and how many copies confirm a write before it returns.
/// Users are kept apart inside shards by the `user_id` tenant index, not by shard keys: a user's
/// points are a few MB, far below a shard's worth.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct QdrantCluster {
    pub shards: Option<u32>,
    pub replication: Option<u32>,
    pub write_consistency: Option<u32>,
}

/// A Qdrant server or cluster, through `settings.alias`.
pub struct QdrantStore {
    client: Qdrant,
    settings: QdrantSettings,
    /// The recorded (model, dimension) and when it was read: a collection's shape never
    /// changes, but the alias may swap to another collection (`SHAPE_TTL`).
    shape: tokio::sync::RwLock<Option<((String, usize), std::time::Instant)>>,
    /// For `update_aliases` with several actions, which the client only sends one at a time.
    aliases: Arc<tokio::sync::OnceCell<tonic::transport::Channel>>,
    /// `settings.alias` names one collection, not an alias (a re-embed's target version): its
    /// shape is checked, never created, and no alias is touched.
    pinned: bool,
    /// The collection each build in progress began on: its writes and sweep stay there, so an
    /// alias swap in the middle of a build never sweeps the new version with the old one's build.
    builds: std::sync::Mutex<HashMap<BuildGeneration, String>>,
}

impl std::fmt::Debug for QdrantStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QdrantStore")
            .field("url", &self.settings.url)
            .field("alias", &self.settings.alias)
            .finish()
    }
}

/// What the server said, as a store error: configuration mistakes are never retried, transport
/// trouble always is. The API key is scrubbed from every message (the client quotes a malformed
/// key in its error).
fn store_error(e: QdrantError, key: Option<&Secret>) -> StoreError {
    use tonic::Code;
    let scrub = |m: String| match key {
        Some(k) if !k.expose().is_empty() => m.replace(k.expose(), "***"),
        _ => m,
    };
    match e {
        QdrantError::ResponseError { status } => {
            let text = scrub(format!("{}: {}", status.code(), status.message()));
            match status.code() {
                Code::Unauthenticated | Code::PermissionDenied => StoreError::Config(format!(
                    "the Qdrant server refused the API key (QDRANT_API_KEY): {text}"
                )),
                Code::InvalidArgument | Code::FailedPrecondition | Code::Unimplemented => {
                    StoreError::Config(format!("the Qdrant server refused the request: {text}"))
                }
                _ => StoreError::Backend(format!("Qdrant: {text}")),
            }
        }
        QdrantError::ResourceExhaustedError { status, .. } => {
            StoreError::Backend(scrub(format!("Qdrant is overloaded: {}", status.message())))
        }
        QdrantError::InvalidUri(e) => StoreError::Config(format!("QDRANT_URL is not a URL: {e}")),
        QdrantError::ConversionError(m) => StoreError::Config(scrub(m)),
        other => StoreError::Backend(scrub(format!("Qdrant: {other}"))),
    }
}

/// Whether the error says the alias (or its collection) does not exist: an empty store.
fn not_found(e: &QdrantError) -> bool {
    matches!(e, QdrantError::ResponseError { status } if status.code() == tonic::Code::NotFound)
}

/// A collection name for one model version: the alias, the model's name folded to what Qdrant
/// accepts in a name, the dimension, and a tag for a re-embed's new version.
pub fn collection_name(alias: &str, model: &str, dim: usize, tag: Option<&str>) -> String {
    let slug: String = model
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '_'
            }
        })
        .collect();
    let slug = slug.trim_matches('_');
    let mut name = format!("{alias}__{slug}_{dim}");
    if let Some(t) = tag {
        name.push_str("__");
        name.push_str(t);
    }
    name
}

/// The sparse vector of a chunk's distinct terms: each term (with the user's prefix, so document
/// frequencies are the user's own) hashed to a dimension, valued by BM25's term weight for a
/// term seen once in a chunk of this many terms. The server multiplies in the IDF.
pub fn document_sparse(user_id: i64, terms: &str) -> (Vec<u32>, Vec<f32>) {
    let prefix = term_prefix(user_id);
    let mut idx: Vec<u32> = terms
        .split(' ')
        .filter(|t| !t.is_empty())
        .map(|t| term_index(&prefix, t))
        .collect();
    idx.sort_unstable();
    // Two terms hashed alike (about one pair in 10^7 chunks) are one dimension: the server
    // refuses a vector that names a dimension twice.
    idx.dedup();
    let len = idx.len() as f32;
    let weight = (BM25_K1 + 1.0) / (1.0 + BM25_K1 * (1.0 - BM25_B + BM25_B * len / BM25_AVG_TERMS));
    let values = vec![weight; idx.len()];
    (idx, values)
}

/// The sparse query of a question: its terms (`lexical::query_terms`) each weighted 1.
pub fn query_sparse(user_id: i64, question: &str) -> (Vec<u32>, Vec<f32>) {
    let prefix = term_prefix(user_id);
    let mut idx: Vec<u32> = crate::lexical::query_terms(question)
        .iter()
        .map(|t| term_index(&prefix, t))
        .collect();
    idx.sort_unstable();
    idx.dedup();
    let values = vec![1.0; idx.len()];
    (idx, values)
}

fn term_index(prefix: &str, term: &str) -> u32 {
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    h.update(prefix.as_bytes());
    h.update(term.as_bytes());
    h.digest() as u32
}

fn user_filter(user_id: i64) -> Filter {
    Filter::must([Condition::matches("user_id", user_id.to_string())])
}

fn payload_str(p: &HashMap<String, Value>, key: &str) -> Option<String> {
    match p.get(key)?.kind.as_ref()? {
        Kind::StringValue(s) => Some(s.clone()),
        _ => None,
    }
}

fn payload_int(p: &HashMap<String, Value>, key: &str) -> Option<i64> {
    match p.get(key)?.kind.as_ref()? {
        Kind::IntegerValue(i) => Some(*i),
        Kind::DoubleValue(d) => Some(*d as i64),
        _ => None,
    }
}

fn payload_strings(p: &HashMap<String, Value>, key: &str) -> Vec<String> {
    match p.get(key).and_then(|v| v.kind.as_ref()) {
        Some(Kind::ListValue(l)) => l
            .values
            .iter()
            .filter_map(|v| match v.kind.as_ref()? {
                Kind::StringValue(s) => Some(s.clone()),
                _ => None,
            })
            .collect(),
        _ => Vec::new(),
    }
}

fn uuid_of(id: Option<&PointId>) -> Option<Uuid> {
    match id?.point_id_options.as_ref()? {
        PointIdOptions::Uuid(s) => Uuid::parse_str(s).ok(),
        PointIdOptions::Num(_) => None,
    }
}

fn dense_of(vectors: Option<qdrant_client::qdrant::VectorsOutput>) -> Option<Vec<f32>> {
    match vectors?.vectors_options? {
        VectorsOptions::Vectors(named) => match named.vectors.get(DENSE)?.vector.as_ref()? {
            VectorKind::Dense(d) => Some(d.data.clone()),
            _ => None,
        },
        VectorsOptions::Vector(_) => None,
    }
}

fn hit_of(p: ScoredPoint, user_id: i64) -> Option<SearchHit> {
    let pl = &p.payload;
    // Belt and braces: the filter already holds only this user's points.
    if payload_str(pl, "user_id")?.parse::<i64>().ok()? != user_id {
        return None;
    }
    Some(SearchHit {
        id: uuid_of(p.id.as_ref())?,
        score: p.score,
        dense_score: None,
        lexical_score: None,
        user_id,
        kind: payload_str(pl, "kind").unwrap_or_default(),
        source_ids: payload_strings(pl, "source_ids"),
        conversation_id: payload_str(pl, "conversation_id"),
        author: payload_str(pl, "author"),
        created_at: payload_str(pl, "created_at").unwrap_or_default(),
        text: payload_str(pl, "text").unwrap_or_default(),
    })
}

impl QdrantStore {
    /// Connects and checks the server answers (a wrong URL or key fails here, at start-up).
    pub async fn connect(settings: QdrantSettings) -> Result<Self, StoreError> {
        let mut b = Qdrant::from_url(&settings.url)
            .timeout(settings.timeout)
            .connect_timeout(settings.timeout.min(Duration::from_secs(10)))
            // The client's own check prints to stdout from a thread of its own; ours is below.
            .skip_compatibility_check();
        if let Some(k) = &settings.api_key {
            b = b.api_key(k.expose().to_string());
        }
        let client = b
            .build()
            .map_err(|e| store_error(e, settings.api_key.as_ref()))?;
        let store = QdrantStore {
            client,
            settings,
            shape: Default::default(),
            aliases: Default::default(),
            pinned: false,
            builds: Default::default(),
        };
        let reply = store
            .client
            .health_check()
            .await
            .map_err(|e| store.err(e))?;
        let minor = |v: &str| v.split('.').take(2).collect::<Vec<_>>().join(".");
        if minor(&reply.version) != "1.18" {
            tracing::warn!(
                server = %reply.version,
                client = "1.18",
                "the Qdrant server's version differs from the client's; tested with 1.18"
            );
        }
        Ok(store)
    }

    /// The store of one collection (a version a re-embed builds before the alias swaps to it),
    /// made with `create_version`.
    pub async fn connect_collection(
        settings: QdrantSettings,
        collection: &str,
    ) -> Result<Self, StoreError> {
        let mut store = Self::connect(QdrantSettings {
            alias: collection.to_string(),
            ..settings
        })
        .await?;
        store.pinned = true;
        Ok(store)
    }

    /// Deletes a collection the alias does not point to (an old version, after a swap).
    pub async fn drop_collection(&self, name: &str) -> Result<(), StoreError> {
        if self.aliased_collection().await?.as_deref() == Some(name) {
            return Err(StoreError::Config(format!(
                "{name} is what the alias {} points to",
                self.settings.alias
            )));
        }
        self.client
            .delete_collection(name)
            .await
            .map_err(|e| self.err(e))?;
        Ok(())
    }

    fn err(&self, e: QdrantError) -> StoreError {
        store_error(e, self.settings.api_key.as_ref())
    }

    /// Where a build's writes go: the collection it began on, else the alias.
    fn build_target(&self, gen: BuildGeneration) -> String {
        self.builds
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&gen)
            .cloned()
            .unwrap_or_else(|| self.settings.alias.clone())
    }

    pub fn alias(&self) -> &str {
        &self.settings.alias
    }

    /// The collection the alias points to, if the alias exists.
    pub async fn aliased_collection(&self) -> Result<Option<String>, StoreError> {
        let all = self.client.list_aliases().await.map_err(|e| self.err(e))?;
        Ok(all
            .aliases
            .into_iter()
            .find(|a| a.alias_name == self.settings.alias)
            .map(|a| a.collection_name))
    }

    /// Makes a collection for `model` at `dim` with its indexes and meta point; an existing one
    /// of the same name is kept (two workers may race to make it) if its shape matches.
    pub async fn create_version(
        &self,
        name: &str,
        model: &str,
        dim: usize,
    ) -> Result<(), StoreError> {
        let exists = self
            .client
            .collection_exists(name)
            .await
            .map_err(|e| self.err(e))?;
        if !exists {
            let mut dense = VectorsConfigBuilder::default();
            dense.add_named_vector_params(
                DENSE,
                VectorParamsBuilder::new(dim as u64, Distance::Cosine),
            );
            let mut sparse = SparseVectorsConfigBuilder::default();
            sparse.add_named_vector_params(
                LEXICAL,
                SparseVectorParamsBuilder::default().modifier(Modifier::Idf as i32),
            );
            let mut create = CreateCollectionBuilder::new(name)
                .vectors_config(dense)
                .sparse_vectors_config(sparse);
            let c = self.settings.cluster;
            if let Some(n) = c.shards {
                create = create.shard_number(n);
            }
            if let Some(n) = c.replication {
                create = create.replication_factor(n);
            }
            if let Some(n) = c.write_consistency {
                create = create.write_consistency_factor(n);
            }
            let made = self.client.create_collection(create).await;
            match made {
                Ok(_) => {}
                // Made by another worker between the check and the call.
                Err(QdrantError::ResponseError { status })
                    if status.code() == tonic::Code::AlreadyExists
                        || status.message().contains("already exists") => {}
                Err(e) => return Err(self.err(e)),
            }
            let indexes = [
                CreateFieldIndexCollectionBuilder::new(name, "user_id", FieldType::Keyword)
                    .field_index_params(KeywordIndexParamsBuilder::default().is_tenant(true))
                    .wait(true),
                CreateFieldIndexCollectionBuilder::new(name, "build_gen", FieldType::Integer)
                    .field_index_params(IntegerIndexParamsBuilder::new(false, true))
                    .wait(true),
                CreateFieldIndexCollectionBuilder::new(name, "content_hash", FieldType::Keyword)
                    .wait(true),
            ];
            for ix in indexes {
                self.client
                    .create_field_index(ix)
                    .await
                    .map_err(|e| self.err(e))?;
            }
        }
        match self.read_meta(name).await? {
            Some((m, d, _)) if m != model || d != dim => Err(StoreError::ModelMismatch {
                stored_model: m,
                stored_dim: d,
                model: model.into(),
                dim,
            }),
            Some(_) => Ok(()),
            None => {
                let meta = Payload::try_from(serde_json::json!({
                    "orbit_meta": true, "model": model, "dimension": dim, "last_gen": 0
                }))
                .map_err(|e| self.err(e))?;
                let point = PointStruct::new(META_ID.to_string(), NamedVectors::default(), meta);
                self.client
                    .upsert_points(UpsertPointsBuilder::new(name, vec![point]).wait(true))
                    .await
                    .map_err(|e| self.err(e))?;
                Ok(())
            }
        }
    }

    /// The meta point of `collection` (or the alias): model, dimension, last generation.
    async fn read_meta(
        &self,
        collection: &str,
    ) -> Result<Option<(String, usize, i64)>, StoreError> {
        let got = self
            .client
            .get_points(
                GetPointsBuilder::new(collection, vec![PointId::from(META_ID.to_string())])
                    .with_payload(true),
            )
            .await;
        let got = match got {
            Ok(g) => g,
            Err(e) if not_found(&e) => return Ok(None),
            Err(e) => return Err(self.err(e)),
        };
        let Some(p) = got.result.into_iter().next() else {
            return Ok(None);
        };
        let model = payload_str(&p.payload, "model");
        let dim = payload_int(&p.payload, "dimension");
        match (model, dim) {
            (Some(m), Some(d)) => Ok(Some((
                m,
                d.max(0) as usize,
                payload_int(&p.payload, "last_gen").unwrap_or(0),
            ))),
            _ => Err(StoreError::Config(format!(
                "Qdrant collection {collection} has a meta point without a model: not made by orbit-worker"
            ))),
        }
    }

    /// Points the alias at `collection` in one `update_aliases` call: readers see the old
    /// collection or the new one, never neither.
    // tonic's interceptor returns its `Status` by value, which clippy finds large.
    #[allow(clippy::result_large_err)]
    pub async fn swap_alias(&self, collection: &str) -> Result<(), StoreError> {
        let url = self.settings.url.clone();
        let timeout = self.settings.timeout;
        let channel = self
            .aliases
            .get_or_try_init(|| async move {
                tonic::transport::Channel::from_shared(url)
                    .map_err(|e| StoreError::Config(format!("QDRANT_URL is not a URL: {e}")))?
                    .timeout(timeout)
                    .connect_timeout(timeout.min(Duration::from_secs(10)))
                    .connect()
                    .await
                    .map_err(|e| StoreError::Backend(format!("Qdrant: cannot connect: {e}")))
            })
            .await?
            .clone();
        let key = self.settings.api_key.clone();
        let mut api =
            qdrant_client::qdrant::collections_client::CollectionsClient::with_interceptor(
                channel,
                move |mut req: tonic::Request<()>| {
                    if let Some(k) = &key {
                        let v = k.expose().parse().map_err(|_| {
                            tonic::Status::invalid_argument(
                                "QDRANT_API_KEY is not a valid header value",
                            )
                        })?;
                        req.metadata_mut().insert("api-key", v);
                    }
                    Ok(req)
                },
            );
        let alias = self.settings.alias.clone();
        let mut actions = Vec::new();
        if self.aliased_collection().await?.is_some() {
            actions.push(AliasOperations {
                action: Some(alias_operations::Action::DeleteAlias(DeleteAlias {
                    alias_name: alias.clone(),
                })),
            });
        }
        actions.push(AliasOperations {
            action: Some(alias_operations::Action::CreateAlias(CreateAlias {
                collection_name: collection.to_string(),
                alias_name: alias,
            })),
        });
        api.update_aliases(ChangeAliases {
            actions,
            timeout: None,
        })
        .await
        .map_err(|status| self.err(QdrantError::ResponseError { status }))?;
        self.set_shape(None).await;
        Ok(())
    }

    async fn set_shape(&self, shape: Option<(String, usize)>) {
        *self.shape.write().await = shape.map(|s| (s, std::time::Instant::now()));
    }

    /// The collection's (model, dimension), cached for `SHAPE_TTL` after a read.
    async fn shape(&self) -> Result<Option<(String, usize)>, StoreError> {
        if let Some((s, at)) = self.shape.read().await.clone() {
            if at.elapsed() < SHAPE_TTL {
                return Ok(Some(s));
            }
        }
        let got = self.read_meta(&self.settings.alias).await?;
        let shape = got.map(|(m, d, _)| (m, d));
        self.set_shape(shape.clone()).await;
        Ok(shape)
    }

    /// The nearest of `user_id`'s points to `input` in the vector `using`, each hit's list score
    /// set (dense or lexical).
    async fn one_list(
        &self,
        user_id: i64,
        input: impl Into<VectorInput>,
        using: &str,
        top_k: usize,
    ) -> Result<Vec<SearchHit>, StoreError> {
        let q = QueryPointsBuilder::new(&self.settings.alias)
            .query(Query::new_nearest(input))
            .using(using)
            .filter(user_filter(user_id))
            .limit(top_k as u64);
        let mut hits = self.query(q, user_id).await?;
        for h in &mut hits {
            if using == DENSE {
                h.dense_score = Some(h.score);
            } else {
                h.lexical_score = Some(h.score);
            }
        }
        Ok(hits)
    }

    async fn query(
        &self,
        q: QueryPointsBuilder,
        user_id: i64,
    ) -> Result<Vec<SearchHit>, StoreError> {
        match self.client.query(q.with_payload(true)).await {
            Ok(r) => Ok(r
                .result
                .into_iter()
                .filter_map(|p| hit_of(p, user_id))
                .collect()),
            // No collection yet: nothing was ever built.
            Err(e) if not_found(&e) => Ok(Vec::new()),
            Err(e) => Err(self.err(e)),
        }
    }

    /// Checks the question's vector against the collection's size, as the embedded store does.
    async fn check_dimension(&self, query: &[f32]) -> Result<bool, StoreError> {
        match self.shape().await? {
            None => Ok(false),
            Some((_, want)) if want != query.len() => Err(StoreError::Dimension {
                got: query.len(),
                want,
            }),
            Some(_) => Ok(true),
        }
    }

    fn point(&self, gen: BuildGeneration, p: &EmbeddedChunk) -> Result<PointStruct, StoreError> {
        let c = &p.chunk;
        let id = crate::hash::point_id(c.user_id, &c.source_ids, c.chunk_index);
        let payload = Payload::try_from(serde_json::json!({
            "user_id": c.user_id.to_string(),
            "build_gen": gen,
            "kind": c.kind.as_str(),
            "source_ids": c.source_ids,
            "conversation_id": c.conversation_id,
            "title": c.title,
            "author": c.author,
            "chunk_index": c.chunk_index,
            "byte_start": c.byte_start,
            "byte_end": c.byte_end,
            "token_start": c.token_start,
            "token_end": c.token_end,
            "token_count": c.token_count,
            "created_at": c.created_at.to_rfc3339(),
            "content_hash": c.content_hash,
            "text": c.text,
        }))
        .map_err(|e| self.err(e))?;
        let mut vectors = NamedVectors::default().add_vector(DENSE, p.vector.clone());
        if self.settings.lexical {
            let terms = chunk_terms(c.title.as_deref(), &c.text, &c.terms);
            let (idx, values) = document_sparse(c.user_id, &terms);
            if !idx.is_empty() {
                vectors = vectors.add_vector(
                    LEXICAL,
                    qdrant_client::qdrant::Vector::new_sparse(idx, values),
                );
            }
        }
        Ok(PointStruct::new(id.to_string(), vectors, payload))
    }

    /// Every point id of `filter`, page by page.
    async fn scroll_ids(&self, filter: Filter) -> Result<Vec<Uuid>, StoreError> {
        let mut out = Vec::new();
        let mut offset: Option<PointId> = None;
        loop {
            let mut req = ScrollPointsBuilder::new(&self.settings.alias)
                .filter(filter.clone())
                .limit(SCROLL_PAGE)
                .with_payload(false)
                .with_vectors(false);
            if let Some(o) = offset.take() {
                req = req.offset(o);
            }
            let page = match self.client.scroll(req).await {
                Ok(p) => p,
                Err(e) if not_found(&e) => return Ok(out),
                Err(e) => return Err(self.err(e)),
            };
            out.extend(page.result.iter().filter_map(|p| uuid_of(p.id.as_ref())));
            match page.next_page_offset {
                Some(next) => offset = Some(next),
                None => return Ok(out),
            }
        }
    }
}

#[async_trait]
impl VectorStore for QdrantStore {
    async fn ensure_model(&self, model: &str, dim: usize) -> Result<(), StoreError> {
        let current = if self.pinned {
            Some(self.settings.alias.clone())
        } else {
            self.aliased_collection().await?
        };
        if let Some(current) = current {
            return match self.read_meta(&current).await? {
                Some((m, d, _)) if m != model || d != dim => Err(StoreError::ModelMismatch {
                    stored_model: m,
                    stored_dim: d,
                    model: model.into(),
                    dim,
                }),
                Some((m, d, _)) => {
                    self.set_shape(Some((m, d))).await;
                    Ok(())
                }
                None => Err(StoreError::Config(format!(
                    "Qdrant alias {} points to {current}, which has no orbit-worker meta point",
                    self.settings.alias
                ))),
            };
        }
        let name = collection_name(&self.settings.alias, model, dim, None);
        self.create_version(&name, model, dim).await?;
        match self.aliased_collection().await? {
            // Another worker pointed it meanwhile: its collection must be of this model too.
            Some(_) => Box::pin(self.ensure_model(model, dim)).await,
            None => {
                self.swap_alias(&name).await?;
                self.set_shape(Some((model.to_string(), dim))).await;
                Ok(())
            }
        }
    }

    async fn model(&self) -> Result<Option<(String, usize)>, StoreError> {
        self.shape().await
    }

    async fn reset(&self) -> Result<(), StoreError> {
        if self.pinned {
            return Err(StoreError::Config(format!(
                "{} is one version: drop it with drop_collection",
                self.settings.alias
            )));
        }
        if let Some(current) = self.aliased_collection().await? {
            self.client
                .delete_alias(self.settings.alias.clone())
                .await
                .map_err(|e| self.err(e))?;
            self.client
                .delete_collection(current)
                .await
                .map_err(|e| self.err(e))?;
        }
        self.set_shape(None).await;
        Ok(())
    }

    async fn begin_build(&self) -> Result<BuildGeneration, StoreError> {
        // Strictly increasing on one server: the wall clock in microseconds, bumped past the
        // last generation handed out (kept in the meta point). Two workers reading the same
        // last generation in the same microsecond are kept apart by the build lock.
        let target = if self.pinned {
            Some(self.settings.alias.clone())
        } else {
            self.aliased_collection().await?
        };
        let Some(target) = target else {
            return Err(StoreError::Config(
                "begin_build before ensure_model: the Qdrant alias does not exist".into(),
            ));
        };
        let last = match self.read_meta(&target).await? {
            Some((_, _, last)) => last,
            None => {
                return Err(StoreError::Config(format!(
                    "{target} has no orbit-worker meta point"
                )))
            }
        };
        let gen = super::next_generation(last);
        let mut payload = HashMap::new();
        payload.insert("last_gen".to_string(), Value::from(gen));
        self.client
            .set_payload(
                SetPayloadPointsBuilder::new(&target, payload)
                    .points_selector(vec![PointId::from(META_ID.to_string())])
                    .wait(true),
            )
            .await
            .map_err(|e| self.err(e))?;
        self.builds
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(gen, target);
        Ok(gen)
    }

    async fn upsert(
        &self,
        gen: BuildGeneration,
        points: &[EmbeddedChunk],
    ) -> Result<(), StoreError> {
        // A stale build (one that lost its lock to a newer one) never overwrites a point the
        // newer build wrote: only points of this generation or older are updated.
        let fence = Filter::must([Condition::range(
            "build_gen",
            Range {
                lte: Some(gen as f64),
                ..Default::default()
            },
        )]);
        let target = self.build_target(gen);
        for part in points.chunks(UPSERT_POINTS_PER_CALL) {
            let batch = part
                .iter()
                .map(|p| self.point(gen, p))
                .collect::<Result<Vec<_>, _>>()?;
            // `wait`: the build's sweep must see every point it wrote.
            self.client
                .upsert_points(
                    UpsertPointsBuilder::new(&target, batch)
                        .wait(true)
                        .update_filter(fence.clone()),
                )
                .await
                .map_err(|e| self.err(e))?;
        }
        Ok(())
    }

    async fn finish_build(
        &self,
        gen: BuildGeneration,
        scope: &BuildScope,
    ) -> Result<u64, StoreError> {
        // Only older generations: a stale build finishing late never sweeps a newer one's. The
        // meta point has no `build_gen`, so no range matches it.
        let mut must = vec![Condition::range(
            "build_gen",
            Range {
                lt: Some(gen as f64),
                ..Default::default()
            },
        )];
        if let BuildScope::User(u) = scope {
            must.push(Condition::matches("user_id", u.to_string()));
        }
        let filter = Filter::must(must);
        let target = self.build_target(gen);
        self.builds
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&gen);
        let n = self
            .client
            .count(
                CountPointsBuilder::new(&target)
                    .filter(filter.clone())
                    .exact(true),
            )
            .await
            .map_err(|e| self.err(e))?
            .result
            .map(|r| r.count)
            .unwrap_or(0);
        if n > 0 {
            self.client
                .delete_points(DeletePointsBuilder::new(&target).points(filter).wait(true))
                .await
                .map_err(|e| self.err(e))?;
        }
        Ok(n)
    }

    async fn search_dense(
        &self,
        user_id: i64,
        query: &[f32],
        top_k: usize,
    ) -> Result<Vec<SearchHit>, StoreError> {
        if top_k == 0 || query.is_empty() || !self.check_dimension(query).await? {
            return Ok(Vec::new());
        }
        self.one_list(user_id, query.to_vec(), DENSE, top_k).await
    }

    async fn search_lexical(
        &self,
        user_id: i64,
        question: &str,
        top_k: usize,
    ) -> Result<Vec<SearchHit>, StoreError> {
        if top_k == 0 || !self.settings.lexical {
            return Ok(Vec::new());
        }
        let (idx, values) = query_sparse(user_id, question);
        if idx.is_empty() {
            return Ok(Vec::new());
        }
        self.one_list(
            user_id,
            VectorInput::new_sparse(idx, values),
            LEXICAL,
            top_k,
        )
        .await
    }

    /// Both lists fused on the server in one call (prefetch + weighted RRF); the hit's score is
    /// the fused one, and its per-list scores are not reported.
    async fn search_hybrid(
        &self,
        user_id: i64,
        query: &[f32],
        question: &str,
        top_k: usize,
        fusion: &Fusion,
    ) -> Result<Vec<SearchHit>, StoreError> {
        if top_k == 0 || query.is_empty() || !self.check_dimension(query).await? {
            return Ok(Vec::new());
        }
        let depth = fusion.depth.max(top_k) as u64;
        let mut q = QueryPointsBuilder::new(&self.settings.alias).add_prefetch(
            PrefetchQueryBuilder::default()
                .query(Query::new_nearest(query.to_vec()))
                .using(DENSE)
                .filter(user_filter(user_id))
                .limit(depth),
        );
        let mut weights = vec![fusion.dense_weight];
        let (idx, values) = if self.settings.lexical {
            query_sparse(user_id, question)
        } else {
            (Vec::new(), Vec::new())
        };
        if !idx.is_empty() {
            q = q.add_prefetch(
                PrefetchQueryBuilder::default()
                    .query(Query::new_nearest(VectorInput::new_sparse(idx, values)))
                    .using(LEXICAL)
                    .filter(user_filter(user_id))
                    .limit(depth),
            );
            weights.push(fusion.lexical_weight);
        }
        let rrf = RrfBuilder::with_k(fusion.rrf_k.round().max(1.0) as u32).weights(weights);
        let q = q
            .query(Query::new_rrf(rrf))
            .filter(user_filter(user_id))
            .limit(top_k as u64);
        self.query(q, user_id).await
    }

    async fn vectors_by_hash(
        &self,
        keys: &[(i64, &str)],
    ) -> Result<super::VectorsByHash, StoreError> {
        let mut by_user: std::collections::BTreeMap<i64, Vec<String>> = Default::default();
        for (u, h) in keys {
            by_user.entry(*u).or_default().push(h.to_string());
        }
        let mut out = super::VectorsByHash::new();
        for (user, hashes) in by_user {
            for part in hashes.chunks(HASHES_PER_LOOKUP) {
                let filter = Filter::must([
                    Condition::matches("user_id", user.to_string()),
                    Condition::matches("content_hash", part.to_vec()),
                ]);
                let mut offset: Option<PointId> = None;
                loop {
                    let mut req = ScrollPointsBuilder::new(&self.settings.alias)
                        .filter(filter.clone())
                        .limit(SCROLL_PAGE)
                        .with_payload(PayloadIncludeSelector {
                            fields: vec!["content_hash".to_string()],
                        })
                        .with_vectors(VectorsSelector {
                            names: vec![DENSE.to_string()],
                        });
                    if let Some(o) = offset.take() {
                        req = req.offset(o);
                    }
                    let page = match self.client.scroll(req).await {
                        Ok(p) => p,
                        Err(e) if not_found(&e) => return Ok(out),
                        Err(e) => return Err(self.err(e)),
                    };
                    for p in page.result {
                        let hash = payload_str(&p.payload, "content_hash");
                        if let (Some(h), Some(v)) = (hash, dense_of(p.vectors)) {
                            out.entry(user).or_default().insert(h, v);
                        }
                    }
                    match page.next_page_offset {
                        Some(next) => offset = Some(next),
                        None => break,
                    }
                }
            }
        }
        Ok(out)
    }

    async fn count(&self, user_id: i64) -> Result<u64, StoreError> {
        match self
            .client
            .count(
                CountPointsBuilder::new(&self.settings.alias)
                    .filter(user_filter(user_id))
                    .exact(true),
            )
            .await
        {
            Ok(r) => Ok(r.result.map(|r| r.count).unwrap_or(0)),
            Err(e) if not_found(&e) => Ok(0),
            Err(e) => Err(self.err(e)),
        }
    }

    async fn point_ids(&self, user_id: i64) -> Result<Vec<Uuid>, StoreError> {
        let mut ids = self.scroll_ids(user_filter(user_id)).await?;
        ids.sort();
        Ok(ids)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn collection_names_fold_the_model_and_keep_versions_apart() {
        assert_eq!(
            collection_name("orbit_memory", "text-embedding-3-small", 1536, None),
            "orbit_memory__text_embedding_3_small_1536"
        );
        assert_eq!(
            collection_name(
                "m",
                "sentence-transformers/all-MiniLM-L6-v2",
                384,
                Some("r7")
            ),
            "m__sentence_transformers_all_minilm_l6_v2_384__r7"
        );
    }

    #[test]
    fn sparse_vectors_are_sorted_distinct_and_per_user() {
        let (a, va) = document_sparse(1, "hotel flight hotel tp1352");
        assert_eq!(a.len(), 3, "a repeated term is one dimension");
        assert!(a.windows(2).all(|w| w[0] < w[1]), "sorted: {a:?}");
        assert_eq!(va.len(), 3);
        let (b, _) = document_sparse(2, "hotel flight tp1352");
        assert_ne!(a, b, "another user's terms are other dimensions");
        // A question's term lands on the dimension of the same stored term.
        let (q, qv) = query_sparse(1, "Which HOTEL?");
        assert_eq!(qv, vec![1.0]);
        assert!(a.contains(&q[0]));
        assert!(query_sparse(1, "").0.is_empty());
    }

    #[test]
    fn longer_chunks_weigh_each_term_less() {
        let short = document_sparse(1, "a1 b1 c1").1[0];
        let long_terms: Vec<String> = (0..600).map(|i| format!("t{i}")).collect();
        let long = document_sparse(1, &long_terms.join(" ")).1[0];
        assert!(short > long, "{short} {long}");
        assert!(short > 0.0 && long > 0.0);
    }

    #[test]
    fn the_api_key_never_reaches_an_error_message() {
        let key = Secret::new("sk-qdrant-123".to_string());
        let e = QdrantError::ConversionError("Malformed API key or token: sk-qdrant-123".into());
        let text = store_error(e, Some(&key)).to_string();
        assert!(!text.contains("sk-qdrant-123"), "{text}");
        let status = tonic::Status::unauthenticated("Invalid api-key sk-qdrant-123");
        let e = store_error(QdrantError::ResponseError { status }, Some(&key));
        assert!(matches!(e, StoreError::Config(_)), "{e:?}");
        assert!(!e.to_string().contains("sk-qdrant-123"));
    }

    #[test]
    fn transport_trouble_is_retryable_and_refusals_are_not() {
        use crate::retry::Retryable;
        let e = |code| {
            store_error(
                QdrantError::ResponseError {
                    status: tonic::Status::new(code, "x"),
                },
                None,
            )
        };
        assert!(e(tonic::Code::Unavailable).is_retryable());
        assert!(e(tonic::Code::DeadlineExceeded).is_retryable());
        assert!(e(tonic::Code::Internal).is_retryable());
        assert!(!e(tonic::Code::Unauthenticated).is_retryable());
        assert!(!e(tonic::Code::PermissionDenied).is_retryable());
        assert!(!e(tonic::Code::InvalidArgument).is_retryable());
    }
}
