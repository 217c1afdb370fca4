//! What tasks share inside one worker process: the shared settings, the app's database and cache, the
//! chat model, the HTTP client, metrics, and the embedder and vector store, built once on first
//! use (the local model takes seconds to load).

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use orbit_pipeline::embed::Embedder;
use orbit_pipeline::source::{JsonlSource, PostgresSource, Source};
use orbit_pipeline::store::VectorStore;
use orbit_pipeline::{Pipeline, PipelineSettings};
use tokio::sync::OnceCell;

use crate::cache::Cache;
use crate::chat::ChatClient;
use crate::config::SharedSettings;
use crate::db::Db;
use crate::embedders;
use crate::metrics::Metrics;
use crate::redis_conn::RedisConn;

/// Replies from the cache's Redis: its commands are single-key and quick.
const CACHE_REPLY_TIMEOUT: Duration = Duration::from_secs(5);

pub struct Services {
    /// The shared blocks only; a task's own block comes in its `TaskContext`.
    pub settings: SharedSettings,
    /// None when DATABASE_URL is unset: builds read files and keep no records.
    pub db: Option<Db>,
    pub cache: Cache,
    pub chat: Option<ChatClient>,
    /// The one outgoing HTTP client (push services, audio downloads, the OpenAI APIs): one
    /// connection pool; each call sets its own timeout.
    pub http: reqwest::Client,
    /// The client for URLs from user data (push endpoints, recording downloads): the outbound
    /// policy on every name and redirect (`outbound`).
    pub user_urls: reqwest::Client,
    pub metrics: Arc<Metrics>,
    /// The Postgres source's per-kind queries, read (and any override file checked) at start-up.
    source_queries: Vec<orbit_pipeline::source::KindQuery>,
    /// Where build locks live: the cache's Redis, which every worker of the app shares.
    pub locks: Arc<RedisConn>,
    embedder: OnceCell<Arc<dyn Embedder>>,
    store: OnceCell<Arc<dyn VectorStore>>,
    /// The clean/chunk pool every build of this process shares.
    cpu_pool: OnceCell<orbit_pipeline::CpuPool>,
}

impl Services {
    pub fn new(settings: SharedSettings) -> Result<Self> {
        let db = settings
            .database_url
            .as_ref()
            .map(Db::connect_lazy)
            .transpose()?;
        let cache_conn = Arc::new(RedisConn::open(
            settings.cache.url.expose(),
            CACHE_REPLY_TIMEOUT,
        )?);
        let cache = Cache::new(
            cache_conn.clone(),
            settings.cache.key_prefix.clone(),
            settings.cache.version,
        );
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .build()
            .context("building HTTP client")?;
        let user_urls = crate::outbound::client(settings.http.allow_private_urls)
            .context("building the HTTP client for user URLs")?;
        let chat = settings.chat.model.as_ref().map(|m| {
            ChatClient::new(
                http.clone(),
                &settings.chat.base_url,
                settings.chat.api_key.clone(),
                m,
                settings.chat.timeout,
                settings.http.max_inline_wait,
            )
        });
        let source_queries =
            crate::db::source_queries(settings.pipeline.source_queries.as_deref())?;
        Ok(Services {
            source_queries,
            settings,
            db,
            cache,
            chat,
            http,
            user_urls,
            metrics: Arc::new(Metrics::new()),
            locks: cache_conn,
            embedder: OnceCell::new(),
            store: OnceCell::new(),
            cpu_pool: OnceCell::new(),
        })
    }

    /// Uses `embedder` instead of the configured one: for a program embedding the worker as a
    /// library with an embedder of its own (and for tests of how the worker treats one).
    pub fn with_embedder(self, embedder: Arc<dyn Embedder>) -> Self {
        let _ = self.embedder.set(embedder);
        self
    }

    pub async fn embedder(&self) -> Result<Arc<dyn Embedder>> {
        let s = &self.settings;
        self.embedder
            .get_or_try_init(|| async move {
                // Loading the model is CPU work: keep it off the runtime's threads.
                let (p, http, wait) = (
                    s.pipeline.clone(),
                    self.http.clone(),
                    s.http.max_inline_wait,
                );
                let e = tokio::task::spawn_blocking(move || embedders::embedder(&p, http, wait))
                    .await??;
                Ok(embedders::cached(&s.pipeline, self.db.as_ref().map(|d| d.pool()), e).await)
            })
            .await
            .cloned()
    }

    /// Where a build reads: the app's Postgres when DATABASE_URL is set, else ORBIT_SOURCE files.
    pub fn source(&self) -> Result<Arc<dyn Source>> {
        if let Some(db) = &self.db {
            return Ok(Arc::new(PostgresSource::new(
                db.pool().clone(),
                self.source_queries.clone(),
            )));
        }
        let paths = &self.settings.pipeline.source_paths;
        if paths.is_empty() {
            anyhow::bail!("no memory source configured: set DATABASE_URL or ORBIT_SOURCE");
        }
        Ok(Arc::new(JsonlSource::new(paths)?))
    }

    /// The embedder of the store's live model: the configured one; or, once a re-embed has
    /// switched the store to another OpenAI model, one for that model with the same key and
    /// base URL, so builds and answers follow the switch before the workers' ORBIT_EMBED_MODEL
    /// is changed (said once in the log).
    pub async fn live_embedder(&self) -> Result<Arc<dyn Embedder>> {
        let configured = self.embedder().await?;
        if self.settings.pipeline.resolved_embedder() != crate::config::EmbedderKind::OpenAi {
            return Ok(configured);
        }
        match self.store().await?.model().await? {
            Some((m, d)) if m != configured.model_id() || d != configured.dimension() => {
                static SAID: std::sync::Once = std::sync::Once::new();
                SAID.call_once(|| {
                    tracing::warn!(
                        store_model = %m, dimensions = d, configured = %configured.model_id(),
                        "the store's live version is another model (a re-embed switched it): \
                         embedding with it; set ORBIT_EMBED_MODEL and ORBIT_EMBED_DIMENSIONS to match"
                    )
                });
                Ok(crate::reembed::parts(self, &m, Some(d)).await?.embedder)
            }
            _ => Ok(configured),
        }
    }

    /// A pipeline over `source` with the live model's embedder, the shared store and the
    /// configured chunking.
    pub async fn pipeline(&self, source: Arc<dyn Source>) -> Result<Pipeline> {
        let embedder = self.live_embedder().await?;
        let store = self.store().await?;
        let chunk = self
            .settings
            .pipeline
            .chunk_settings(embedder.preferred_chunk_tokens())?;
        let threads = self.settings.pipeline.cpu_threads;
        let pool = self
            .cpu_pool
            .get_or_try_init(|| async { orbit_pipeline::cpu_pool(threads) })
            .await?
            .clone();
        Ok(Pipeline {
            source,
            embedder,
            store,
            settings: PipelineSettings {
                chunk,
                cpu_threads: threads,
                reuse_vectors: true,
                limits: orbit_pipeline::BuildLimits {
                    max_document_bytes: self.settings.limits.document_bytes,
                    max_documents: self.settings.limits.documents_per_build,
                },
            },
            pool,
        })
    }

    /// Writes a usage row and drops the month's cached usage so the app recomputes it. Failing
    /// to log never fails the call the user already paid for; it is logged loudly instead.
    pub async fn log_usage(&self, row: crate::db::UsageRow) {
        let Some(db) = &self.db else { return };
        if let Err(e) = db.log_usage(&row).await {
            tracing::error!(error = %e, feature = row.feature, "cannot write the AI usage row");
        }
        if let Some(u) = row.user_id {
            let key = Cache::usage_key(u, chrono::Utc::now());
            if let Err(e) = self.cache.delete(&[key]).await {
                tracing::warn!(error = %e, "cannot invalidate the usage cache");
            }
        }
    }

    pub async fn store(&self) -> Result<Arc<dyn VectorStore>> {
        self.store
            .get_or_try_init(|| embedders::store(&self.settings.pipeline))
            .await
            .cloned()
    }
}
