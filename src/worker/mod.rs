//! The Celery-compatible worker: fetches from Redis, runs tasks with bounded concurrency, settles
//! results and acks, restores abandoned messages, and shuts down without losing any.

pub mod autoscale;
pub mod control;
mod decide;
pub mod events;
mod inventory;
mod lifecycle;
mod revoked;
mod settle;
mod slots;
pub mod tuning;

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Result;
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::celery::message::PollOrder;
use crate::celery::redis::{redact_url, Backend, Broker};
use crate::config::TaskBlocks;
use crate::services::Services;
use crate::tasks::Registry;
use orbit_pipeline::secret::Secret;
use settle::{persist_unless, Action, Backoff, Completion, SettleMsg, SETTLE_QUEUE};

/// kombu's `BRPOP … 1`: how long one idle poll blocks, and so how fast a shutdown stops fetching.
const BRPOP_TIMEOUT: Duration = Duration::from_secs(1);
/// Messages taken per fetch round trip when the queue is busy: a burst drains in few round
/// trips, and the prefetch limit still caps what is held.
const FETCH_BATCH: usize = 64;

#[derive(Debug, Clone)]
pub struct WorkerOptions {
    /// URLs may carry a password: kept in the redacting type.
    pub broker_url: Secret,
    pub backend_url: Secret,
    pub result_expires: Duration,
    pub concurrency: usize,
    pub queues: Vec<String>,
    pub hostname: String,
    pub prefetch_multiplier: usize,
    pub visibility_timeout: Duration,
    pub events: bool,
    /// How long a warm shutdown waits for running tasks before giving them back.
    pub shutdown_grace: Duration,
    pub debug_tasks: bool,
    /// Where to serve /healthz, /metrics and the status endpoints; None: no HTTP.
    pub http: Option<std::net::SocketAddr>,
    /// `--autoscale MAX,MIN`: the pool starts at MIN and moves with the work; `concurrency` is
    /// then unused, as in Celery.
    pub autoscale: Option<autoscale::Range>,
    /// `AUTOSCALE_KEEPALIVE`: how long the pool stays grown after the last task or scale-up.
    pub autoscale_keepalive: Duration,
}

impl WorkerOptions {
    /// Messages held at once (running or waiting for a slot): Celery's prefetch count.
    /// Sized for the most slots the pool may have (autoscale's MAX), as Celery's consumer is.
    pub fn prefetch(&self) -> usize {
        let slots = self.autoscale.map_or(self.concurrency, |r| r.max);
        (slots * self.prefetch_multiplier).max(slots).max(1)
    }

    /// Slots at start: autoscale's MIN (which may be 0: the first task scales it up), else `-c`.
    fn initial_pool(&self) -> usize {
        self.autoscale.map_or(self.concurrency.max(1), |r| r.min)
    }

    /// How often held messages are refreshed and stale ones restored. Celery sweeps about every
    /// 100 s; a tenth of the visibility timeout keeps a short timeout (tests) responsive.
    fn sweep_interval(&self) -> Duration {
        (self.visibility_timeout / 10).clamp(Duration::from_millis(500), Duration::from_secs(60))
    }
}

/// State every part of the worker shares.
pub struct Shared {
    opts: WorkerOptions,
    broker: Broker,
    backend: Backend,
    registry: Registry,
    services: Arc<Services>,
    /// The task-only settings blocks; each task is given its own.
    blocks: TaskBlocks,
    /// Results live on the broker's Redis: results and acks share one atomic round trip.
    shared_redis: bool,
    /// Delivery tags this worker holds and has not settled.
    held: Mutex<HashSet<String>>,
    prefetch: Arc<Semaphore>,
    concurrency: Arc<Semaphore>,
    /// Warm shutdown: stop fetching, give back what has not started.
    stop_fetch: CancellationToken,
    /// The grace period is over: give back what still runs.
    abandon: CancellationToken,
    tracker: TaskTracker,
    settle_tx: mpsc::Sender<SettleMsg>,
    events: Arc<events::Events>,
    /// Held tasks by id, for remote control's `active`, `reserved`, `scheduled`, `query_task`.
    inventory: Arc<inventory::Inventory>,
    /// Ids revoked by remote control: discarded when they come up.
    revoked: revoked::Revoked,
    /// Stamps revoked by `revoke_by_stamped_headers`: a task carrying one is discarded too.
    revoked_stamps: revoked::RevokedStamps,
    /// Rate and time limits set at run time by remote control.
    tuning: tuning::Tuning,
    /// The queues consumed now: `-Q`, then `add_consumer` / `cancel_consumer`; the version
    /// rises with each change so the fetch loop rebuilds its poll order.
    consuming: Mutex<Vec<String>>,
    consuming_version: std::sync::atomic::AtomicU64,
    /// Concurrency now: `-c` (or autoscale's MIN), then moved by `pool_grow` / `pool_shrink`
    /// or the autoscaler. A shrink lowers it at once; the slots are taken as they come free.
    pool_size: std::sync::atomic::AtomicUsize,
    /// Messages that may be held now: the prefetch semaphore's size, for `stats`.
    prefetch_count: std::sync::atomic::AtomicUsize,
    /// `--autoscale`: its range and clock, behind the one lock every resize takes.
    autoscaler: Option<Mutex<autoscale::Autoscaler>>,
    /// The `ForkPoolWorker-N` names of the slots running tasks, for their log lines.
    slot_names: slots::SlotNames,
}

impl Shared {
    fn hold(&self, tag: Option<&str>) {
        if let (Some(t), Ok(mut h)) = (tag, self.held.lock()) {
            h.insert(t.to_string());
        }
    }

    fn release<'a>(&self, tags: impl Iterator<Item = &'a str>) {
        if let Ok(mut h) = self.held.lock() {
            for t in tags {
                h.remove(t);
            }
        }
    }

    fn held_tags(&self) -> Vec<String> {
        self.held
            .lock()
            .map(|h| h.iter().cloned().collect())
            .unwrap_or_default()
    }

    /// What `/metrics` shows of this worker now.
    fn snapshot(&self) -> crate::metrics::WorkerSnapshot {
        let (scheduled, reserved, active) = self.inventory.counts();
        let l = events::loadavg();
        crate::metrics::WorkerSnapshot {
            hostname: self.opts.hostname.clone(),
            online: !self.stop_fetch.is_cancelled(),
            active,
            reserved,
            scheduled,
            processed: self.events.processed(),
            pool_size: self.pool_size(),
            loadavg: [l[0], l[1], l[2]],
        }
    }

    /// Tasks running now. Counted in the inventory rather than from free slots: a shrink that
    /// waits for busy slots lowers the pool size before the tasks in them end.
    fn active(&self) -> usize {
        self.inventory.counts().2
    }

    fn queues(&self) -> Vec<String> {
        self.consuming.lock().map(|q| q.clone()).unwrap_or_default()
    }

    /// `add_consumer` (`on`) or `cancel_consumer`; returns whether it changed anything.
    fn consume(&self, queue: &str, on: bool) -> bool {
        let Ok(mut q) = self.consuming.lock() else {
            return false;
        };
        let has = q.iter().any(|x| x == queue);
        match (on, has) {
            (true, false) => q.push(queue.to_string()),
            (false, true) => q.retain(|x| x != queue),
            _ => return false,
        }
        self.consuming_version
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        true
    }

    fn pool_size(&self) -> usize {
        self.pool_size.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// `pool_grow`: `n` more slots, and the prefetch that goes with them, as Celery grows both.
    fn grow_pool(self: &Arc<Self>, n: usize) {
        self.add_slots(n);
        self.resize_prefetch((n * self.opts.prefetch_multiplier.max(1)) as isize);
    }

    /// `pool_shrink`: `n` fewer slots (never below one), and their prefetch. Running tasks are
    /// not stopped: the slots are taken as they come free.
    fn shrink_pool(self: &Arc<Self>, n: usize) -> usize {
        use std::sync::atomic::Ordering;
        let mut took = 0;
        let _ = self
            .pool_size
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |size| {
                took = n.min(size.saturating_sub(1));
                Some(size - took)
            });
        self.take_slots(took);
        self.resize_prefetch(-((took * self.opts.prefetch_multiplier.max(1)) as isize));
        took
    }

    fn add_slots(&self, n: usize) {
        self.pool_size
            .fetch_add(n, std::sync::atomic::Ordering::Relaxed);
        self.concurrency.add_permits(n);
    }

    /// Takes `n` slots out of the pool as they come free (the pool size is already lowered):
    /// the semaphore is fair, so tasks waiting for a slot queue behind the shrink.
    fn take_slots(self: &Arc<Self>, n: usize) {
        if n == 0 {
            return;
        }
        let slots = self.concurrency.clone();
        tokio::spawn(async move {
            if let Ok(p) = slots.acquire_many_owned(n as u32).await {
                p.forget();
            }
        });
    }

    /// Moves the prefetch by `delta` messages; a cut waits for held messages to settle.
    fn resize_prefetch(&self, delta: isize) {
        use std::sync::atomic::Ordering;
        let n = delta.unsigned_abs();
        if delta > 0 {
            self.prefetch_count.fetch_add(n, Ordering::Relaxed);
            self.prefetch.add_permits(n);
        } else if n > 0 {
            self.prefetch_count.fetch_sub(n, Ordering::Relaxed);
            let fetches = self.prefetch.clone();
            tokio::spawn(async move {
                if let Ok(p) = fetches.acquire_many_owned(n as u32).await {
                    p.forget();
                }
            });
        }
    }

    /// One look of the autoscaler: each tick, and on each task received while the pool is
    /// below its max (Celery looks on each task message too, so a burst needs no tick to start).
    fn autoscale_look(self: &Arc<Self>, received: bool) {
        let Some(Ok(mut a)) = self.autoscaler.as_ref().map(|a| a.lock()) else {
            return;
        };
        let now = std::time::Instant::now();
        if received {
            a.received(now);
            if self.pool_size() >= a.range().max {
                return;
            }
        }
        let (_, reserved, active) = self.inventory.counts();
        match a.step(self.pool_size(), reserved + active, now) {
            autoscale::Step::Grow(n) => self.scale_up(n),
            autoscale::Step::Shrink(n) => self.scale_down(n),
            autoscale::Step::Hold => {}
        }
    }

    /// The autoscaler's moves, with Celery's log lines. Its prefetch stays sized for max.
    fn scale_up(&self, n: usize) {
        tracing::info!("Scaling up {n} processes.");
        self.add_slots(n);
    }

    fn scale_down(self: &Arc<Self>, n: usize) {
        tracing::info!("Scaling down {n} processes.");
        self.pool_size
            .fetch_sub(n, std::sync::atomic::Ordering::Relaxed);
        self.take_slots(n);
    }

    /// The `autoscale` control command; None when the worker runs without `--autoscale`.
    fn autoscale_update(
        self: &Arc<Self>,
        max: Option<usize>,
        min: Option<usize>,
    ) -> Option<Result<autoscale::Range, autoscale::AutoscaleError>> {
        let mut a = self.autoscaler.as_ref()?.lock().ok()?;
        let u = match a.update(max, min, self.pool_size()) {
            Ok(u) => u,
            Err(e) => return Some(Err(e)),
        };
        if u.shrink > 0 {
            self.scale_down(u.shrink);
        }
        if u.grow > 0 {
            self.scale_up(u.grow);
        }
        self.resize_prefetch(u.max_delta * self.opts.prefetch_multiplier.max(1) as isize);
        Some(Ok(a.range()))
    }

    /// What `stats` shows of the autoscaler, in Celery's shape.
    fn autoscaler_info(&self) -> Option<serde_json::Value> {
        let a = self.autoscaler.as_ref()?.lock().ok()?;
        let (_, reserved, active) = self.inventory.counts();
        let r = a.range();
        Some(serde_json::json!({
            "max": r.max, "min": r.min, "current": self.pool_size(), "qty": reserved + active,
        }))
    }

    fn is_held(&self, tag: &str) -> bool {
        self.held.lock().map(|h| h.contains(tag)).unwrap_or(false)
    }

    async fn complete(&self, c: Completion) {
        // The settler outlives every sender; a failed send means the process is going down.
        let _ = self.settle_tx.send(SettleMsg::Done(c)).await;
    }

    async fn ack(
        &self,
        tag: String,
        result: Option<(String, String)>,
        permit: Option<OwnedSemaphorePermit>,
    ) {
        self.complete(Completion {
            delivery_tag: Some(tag),
            result,
            action: Action::Ack,
            permit,
        })
        .await
    }

    async fn give_back(&self, tag: String, permit: Option<OwnedSemaphorePermit>) {
        self.complete(Completion {
            delivery_tag: Some(tag),
            result: None,
            action: Action::GiveBack,
            permit,
        })
        .await
    }
}

/// `celery@%h` → `celery@thishost`.
pub fn expand_hostname(pattern: &str) -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "localhost".into());
    pattern.replace("%h", &host)
}

/// Runs until `shutdown` fires (warm) and everything held is settled or given back.
pub async fn run(
    opts: WorkerOptions,
    services: Arc<Services>,
    blocks: TaskBlocks,
    shutdown: CancellationToken,
) -> Result<()> {
    let mut broker = Broker::open(opts.broker_url.expose(), BRPOP_TIMEOUT)?;
    let limits = &services.settings.limits;
    broker.dead_letters = crate::celery::redis::DeadLetters {
        max_entries: limits.dead_letters,
        max_entry_bytes: limits.dead_letter_bytes,
    };
    let backend = Backend::open(opts.backend_url.expose(), opts.result_expires)?;
    let registry = Registry::new(opts.debug_tasks)?;
    let (settle_tx, settle_rx) = mpsc::channel(SETTLE_QUEUE);
    // Events have a connection of their own, so a burst of PUBLISHes never queues before acks.
    let events_conn = Arc::new(crate::redis_conn::RedisConn::open(
        opts.broker_url.expose(),
        Duration::from_secs(10),
    )?);
    let (events, events_rx) = events::Events::new(&opts.hostname, events_conn.db(), opts.events);
    let sh = Arc::new(Shared {
        shared_redis: opts.broker_url.expose() == opts.backend_url.expose(),
        prefetch: Arc::new(Semaphore::new(opts.prefetch())),
        concurrency: Arc::new(Semaphore::new(opts.initial_pool())),
        pool_size: opts.initial_pool().into(),
        prefetch_count: opts.prefetch().into(),
        autoscaler: opts
            .autoscale
            .map(|r| Mutex::new(autoscale::Autoscaler::new(r, opts.autoscale_keepalive))),
        slot_names: Default::default(),
        tuning: Default::default(),
        consuming: Mutex::new(opts.queues.clone()),
        consuming_version: Default::default(),
        opts,
        broker,
        backend,
        registry,
        services,
        blocks,
        held: Mutex::new(HashSet::new()),
        stop_fetch: CancellationToken::new(),
        abandon: CancellationToken::new(),
        tracker: TaskTracker::new(),
        settle_tx,
        events,
        inventory: Default::default(),
        revoked: Default::default(),
        revoked_stamps: Default::default(),
    });
    let o = &sh.opts;
    tracing::info!(
        hostname = %o.hostname,
        broker = %redact_url(o.broker_url.expose()),
        results = %redact_url(o.backend_url.expose()),
        queues = ?o.queues,
        concurrency = o.concurrency,
        autoscale = ?o.autoscale,
        prefetch = o.prefetch(),
        visibility_timeout_s = o.visibility_timeout.as_secs_f64(),
        tasks = ?sh.registry.names(),
        "{} starting", o.hostname
    );
    // Never a silent hang: each failed attempt to reach Redis logs, then we keep trying; but a
    // TLS refusal (a CA that does not sign the server's certificate, ssl_cert_reqs against a
    // self-signed server) is configuration, which no wait fixes: said once, and the worker stops.
    let tls_refused = |what: &str, e: crate::redis_conn::ConnError| {
        anyhow::anyhow!(
            "cannot connect to the {what} over TLS: {e}; check ssl_ca_certs and ssl_cert_reqs \
             in its rediss:// URL"
        )
    };
    for (what, conn) in [
        ("broker", &sh.broker.ops),
        ("result backend", &sh.backend.conn),
    ] {
        let doing = format!("connect to {what}");
        tokio::select! {
            r = persist_unless(&doing, || conn.ping(), |e| e.is_tls_refusal()) => {
                r.map_err(|e| tls_refused(what, e))?
            }
            _ = shutdown.cancelled() => return Ok(()),
        }
    }
    // The cache is not waited for (tasks that need it retry), but its URL is checked the same.
    if let Err(e) = sh.services.locks.ping().await {
        if e.is_tls_refusal() {
            return Err(tls_refused("cache", e));
        }
    }
    sweep(&sh).await;
    {
        // Its own connection: BRPOP for the answers must not hold the broker's.
        let conn = crate::redis_conn::RedisConn::open(
            sh.opts.broker_url.expose(),
            Duration::from_secs(5),
        )?;
        control::mingle(&sh, &conn).await;
    }

    let http_stop = CancellationToken::new();
    let http = match sh.opts.http {
        None => None,
        Some(addr) => {
            let state = Arc::new(crate::http::HttpState {
                services: sh.services.clone(),
                broker: crate::celery::redis::RedisConn::open(
                    sh.opts.broker_url.expose(),
                    Duration::from_secs(5),
                )?,
                queues: sh.opts.queues.clone(),
                worker: Some(Box::new({
                    let sh = sh.clone();
                    move || sh.snapshot()
                })),
            });
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|e| anyhow::anyhow!("--http {addr}: {e}"))?;
            let stop = http_stop.clone();
            Some(tokio::spawn(async move {
                if let Err(e) = crate::http::serve(listener, state, stop).await {
                    tracing::error!(error = %e, "HTTP server stopped");
                }
            }))
        }
    };
    let settler = tokio::spawn(settle::settler(sh.clone(), settle_rx));
    let events_stop = CancellationToken::new();
    let control_stop = CancellationToken::new();
    let control = tokio::spawn(control::serve(
        sh.clone(),
        // Its own connection: a subscribed connection carries nothing else.
        Arc::new(crate::redis_conn::RedisConn::open(
            sh.opts.broker_url.expose(),
            Duration::from_secs(10),
        )?),
        std::time::Instant::now(),
        shutdown.clone(),
        control_stop.clone(),
    ));
    let publisher = {
        let sh2 = sh.clone();
        tokio::spawn(events::publisher(
            sh.events.clone(),
            events_conn,
            events_rx,
            move || sh2.active(),
            events_stop.clone(),
        ))
    };
    let maintenance = tokio::spawn(maintain(sh.clone()));
    if sh.autoscaler.is_some() {
        tokio::spawn(autoscale_ticks(sh.clone()));
    }
    let fetcher = tokio::spawn(fetch_loop(sh.clone()));
    tracing::info!("{} ready.", sh.opts.hostname);

    shutdown.cancelled().await;
    tracing::warn!("worker: Warm shutdown ({})", sh.opts.hostname);
    sh.stop_fetch.cancel();
    let _ = fetcher.await;
    control_stop.cancel();
    let _ = control.await;
    sh.tracker.close();
    tokio::select! {
        _ = sh.tracker.wait() => {}
        _ = tokio::time::sleep(sh.opts.shutdown_grace) => {
            tracing::warn!(grace_s = sh.opts.shutdown_grace.as_secs_f64(), "shutdown grace period over: giving back running tasks");
            sh.abandon.cancel();
            sh.tracker.wait().await;
        }
    }
    let _ = sh.settle_tx.send(SettleMsg::Stop).await;
    let _ = settler.await;
    // Last: the task events still queued, then worker-offline.
    events_stop.cancel();
    let _ = publisher.await;
    maintenance.abort();
    http_stop.cancel();
    if let Some(h) = http {
        let _ = h.await;
    }
    tracing::info!("{} stopped: nothing held", sh.opts.hostname);
    Ok(())
}

/// Takes messages while prefetch slots are free: a batch through the fetch script when the
/// queue has work, else one blocking BRPOP.
async fn fetch_loop(sh: Arc<Shared>) {
    let mut order = PollOrder::new(&sh.opts.queues);
    let mut version = 0;
    let mut idle = sh.opts.queues.is_empty();
    let mut backoff = Backoff::default();
    loop {
        let now = sh
            .consuming_version
            .load(std::sync::atomic::Ordering::Relaxed);
        if now != version {
            let queues = sh.queues();
            tracing::info!(?queues, "consuming from");
            order = PollOrder::new(&queues);
            idle = queues.is_empty();
            version = now;
        }
        if idle {
            // Every queue cancelled: nothing to poll until add_consumer.
            tokio::select! {
                _ = tokio::time::sleep(BRPOP_TIMEOUT) => continue,
                _ = sh.stop_fetch.cancelled() => return,
            }
        }
        let first = tokio::select! {
            p = sh.prefetch.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => return },
            _ = sh.stop_fetch.cancelled() => return,
        };
        let mut permits = vec![first];
        while permits.len() < FETCH_BATCH {
            match sh.prefetch.clone().try_acquire_owned() {
                Ok(p) => permits.push(p),
                Err(_) => break,
            }
        }
        let keys = order.keys();
        let fetched = match sh.broker.fetch(keys, permits.len()).await {
            Ok(f) => f,
            Err(e) => {
                drop(permits);
                tokio::select! {
                    _ = backoff.wait("fetch", &e) => {}
                    _ = sh.stop_fetch.cancelled() => return,
                }
                continue;
            }
        };
        backoff.recovered("fetch");
        if !fetched.is_empty() {
            for (f, p) in fetched.into_iter().zip(permits.drain(..)) {
                lifecycle::accept(sh.clone(), f, p).await;
            }
            continue;
        }
        permits.truncate(1);
        // Never cancelled half-way: a BRPOP that returns has taken a message, which must be
        // registered; it ends within its timeout anyway.
        match sh.broker.brpop(keys, BRPOP_TIMEOUT).await {
            Ok(Some(f)) => {
                lifecycle::accept(sh.clone(), f, permits.remove(0)).await;
            }
            Ok(None) => {}
            Err(e) => {
                drop(permits);
                tokio::select! {
                    _ = backoff.wait("fetch", &e) => {}
                    _ = sh.stop_fetch.cancelled() => return,
                }
            }
        }
        if sh.stop_fetch.is_cancelled() {
            return;
        }
    }
}

/// The autoscaler's clock: a look every second until fetching stops.
async fn autoscale_ticks(sh: Arc<Shared>) {
    let mut every = tokio::time::interval(autoscale::TICK);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = every.tick() => sh.autoscale_look(false),
            _ = sh.stop_fetch.cancelled() => return,
        }
    }
}

/// Periodically keeps held messages fresh in `unacked_index` and restores stale ones.
async fn maintain(sh: Arc<Shared>) {
    let every = sh.opts.sweep_interval();
    loop {
        tokio::time::sleep(every).await;
        let held = sh.held_tags();
        if let Err(e) = sh.broker.refresh(&held).await {
            tracing::error!("cannot refresh held messages: {e}");
            continue;
        }
        sweep(&sh).await;
    }
}

async fn sweep(sh: &Shared) {
    let skip = |tag: &str| sh.is_held(tag);
    match sh
        .broker
        .restore_stale(sh.opts.visibility_timeout, &skip)
        .await
    {
        Ok(Some(n)) if n > 0 => {
            tracing::warn!(count = n, "Restoring {n} unacknowledged message(s)")
        }
        Ok(_) => {}
        Err(e) => tracing::error!("restore sweep failed: {e}"),
    }
}
