//! Prometheus metrics of one worker process: tasks by name and state, task durations, pipeline
//! stage throughput, and (read at scrape time) queue depth, unacked messages and the worker
//! series Flower shows (online, active, prefetched, processed, pool size, load average).

use orbit_pipeline::BuildReport;
use prometheus::{
    Encoder, GaugeVec, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, Opts, Registry,
    TextEncoder,
};

/// Task durations run from a millisecond (echo, push) to the 300 s hard limit (a build).
const DURATION_BUCKETS: &[f64] = &[
    0.001, 0.005, 0.025, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
];

pub struct Metrics {
    registry: Registry,
    tasks: IntCounterVec,
    durations: HistogramVec,
    running: IntGauge,
    stage_items: IntCounterVec,
    stage_bytes: IntCounterVec,
    stage_requests: IntCounterVec,
    stage_busy: prometheus::CounterVec,
    stage_wait: prometheus::CounterVec,
    stage_rate: GaugeVec,
    builds: IntCounterVec,
    reused: prometheus::IntCounter,
    pub queue_depth: prometheus::IntGaugeVec,
    pub unacked: IntGauge,
    worker: WorkerSeries,
}

/// What a worker is doing now, read at scrape time, as its heartbeat and `inspect` tell Flower.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct WorkerSnapshot {
    /// The node name Flower lists (`celery@host`).
    pub hostname: String,
    /// False once a warm shutdown has begun.
    pub online: bool,
    pub active: usize,
    /// Taken from the queue and waiting for a pool slot (`inspect reserved`).
    pub reserved: usize,
    /// Waiting for an ETA (`inspect scheduled`).
    pub scheduled: usize,
    /// Tasks received since start: the heartbeat's `processed`.
    pub processed: u64,
    pub pool_size: usize,
    /// 1, 5 and 15 minutes.
    pub loadavg: [f64; 3],
}

/// The series of [`WorkerSnapshot`], each labelled `worker` with the node name, so a dashboard
/// can join them with Flower's (`flower_worker_online{worker}`, …).
struct WorkerSeries {
    online: prometheus::IntGaugeVec,
    active: prometheus::IntGaugeVec,
    reserved: prometheus::IntGaugeVec,
    scheduled: prometheus::IntGaugeVec,
    processed: IntCounterVec,
    pool_size: prometheus::IntGaugeVec,
    loadavg: GaugeVec,
}

impl WorkerSeries {
    fn new() -> Self {
        let gauge = |name: &str, help: &str| {
            prometheus::IntGaugeVec::new(Opts::new(name, help), &["worker"]).expect("valid metric")
        };
        WorkerSeries {
            online: gauge(
                "orbit_worker_online",
                "1 while the worker consumes, 0 from its shutdown",
            ),
            active: gauge(
                "orbit_worker_active_tasks",
                "Tasks running now (Flower's active)",
            ),
            reserved: gauge(
                "orbit_worker_reserved_tasks",
                "Tasks taken from the queue, waiting for a pool slot (inspect reserved)",
            ),
            scheduled: gauge(
                "orbit_worker_scheduled_tasks",
                "Tasks held until their ETA (inspect scheduled)",
            ),
            processed: IntCounterVec::new(
                Opts::new(
                    "orbit_worker_processed_total",
                    "Tasks received since the worker started (Flower's processed)",
                ),
                &["worker"],
            )
            .expect("valid metric"),
            pool_size: gauge(
                "orbit_worker_pool_size",
                "Concurrency now (-c, pool_grow, pool_shrink)",
            ),
            loadavg: GaugeVec::new(
                Opts::new("orbit_worker_load_average", "The machine's load average"),
                &["worker", "period"],
            )
            .expect("valid metric"),
        }
    }

    fn collectors(&self) -> Vec<Box<dyn prometheus::core::Collector>> {
        vec![
            Box::new(self.online.clone()),
            Box::new(self.active.clone()),
            Box::new(self.reserved.clone()),
            Box::new(self.scheduled.clone()),
            Box::new(self.processed.clone()),
            Box::new(self.pool_size.clone()),
            Box::new(self.loadavg.clone()),
        ]
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let tasks = IntCounterVec::new(
            Opts::new("orbit_tasks_total", "Tasks by name and state"),
            &["task", "state"],
        )
        .expect("valid metric");
        let durations = HistogramVec::new(
            HistogramOpts::new(
                "orbit_task_duration_seconds",
                "Run time of finished tasks by name and outcome",
            )
            .buckets(DURATION_BUCKETS.to_vec()),
            &["task", "state"],
        )
        .expect("valid metric");
        let running = IntGauge::new("orbit_tasks_running", "Tasks running now").expect("valid");
        let stage_items = IntCounterVec::new(
            Opts::new(
                "orbit_pipeline_stage_items_total",
                "Items each pipeline stage produced (documents, chunks, vectors)",
            ),
            &["stage"],
        )
        .expect("valid metric");
        let stage_bytes = IntCounterVec::new(
            Opts::new(
                "orbit_pipeline_stage_bytes_total",
                "Bytes of text each pipeline stage handed on (embed: the text it sent to the embedder)",
            ),
            &["stage"],
        )
        .expect("valid metric");
        let stage_requests = IntCounterVec::new(
            Opts::new(
                "orbit_pipeline_stage_requests_total",
                "Requests each pipeline stage made to an outside service (embedding calls, store lookups and transactions)",
            ),
            &["stage"],
        )
        .expect("metric");
        let stage_busy = prometheus::CounterVec::new(
            Opts::new(
                "orbit_pipeline_stage_busy_seconds_total",
                "Time each pipeline stage spent working",
            ),
            &["stage"],
        )
        .expect("valid metric");
        let stage_wait = prometheus::CounterVec::new(
            Opts::new(
                "orbit_pipeline_stage_wait_seconds_total",
                "Time each stage waited on the previous (upstream) or the next (downstream) stage",
            ),
            &["stage", "on"],
        )
        .expect("valid metric");
        let stage_rate = GaugeVec::new(
            Opts::new(
                "orbit_pipeline_stage_items_per_second",
                "Items per busy second of each stage in the last build",
            ),
            &["stage"],
        )
        .expect("valid metric");
        let builds = IntCounterVec::new(
            Opts::new("orbit_memory_builds_total", "Memory builds by outcome"),
            &["outcome"],
        )
        .expect("valid metric");
        let reused = prometheus::IntCounter::new(
            "orbit_memory_chunks_reused_total",
            "Chunks whose unchanged text kept its stored vector",
        )
        .expect("valid metric");
        let queue_depth = prometheus::IntGaugeVec::new(
            Opts::new(
                "orbit_queue_depth",
                "Messages waiting in each consumed queue",
            ),
            &["queue"],
        )
        .expect("valid metric");
        let worker = WorkerSeries::new();
        let unacked = IntGauge::new(
            "orbit_unacked_messages",
            "Messages taken by some worker and not yet acknowledged (all workers)",
        )
        .expect("valid metric");
        for c in [
            Box::new(tasks.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(durations.clone()),
            Box::new(running.clone()),
            Box::new(stage_items.clone()),
            Box::new(stage_bytes.clone()),
            Box::new(stage_requests.clone()),
            Box::new(stage_busy.clone()),
            Box::new(stage_wait.clone()),
            Box::new(stage_rate.clone()),
            Box::new(builds.clone()),
            Box::new(reused.clone()),
            Box::new(queue_depth.clone()),
            Box::new(unacked.clone()),
        ]
        .into_iter()
        .chain(worker.collectors())
        {
            registry.register(c).expect("unique metric names");
        }
        Metrics {
            registry,
            tasks,
            durations,
            running,
            stage_items,
            stage_bytes,
            stage_requests,
            stage_busy,
            stage_wait,
            stage_rate,
            builds,
            reused,
            queue_depth,
            unacked,
            worker,
        }
    }

    /// Sets the worker series from `w`, read at scrape time.
    pub fn observe_worker(&self, w: &WorkerSnapshot) {
        let s = &self.worker;
        let at = [w.hostname.as_str()];
        s.online.with_label_values(&at).set(i64::from(w.online));
        s.active.with_label_values(&at).set(w.active as i64);
        s.reserved.with_label_values(&at).set(w.reserved as i64);
        s.scheduled.with_label_values(&at).set(w.scheduled as i64);
        s.pool_size.with_label_values(&at).set(w.pool_size as i64);
        let processed = s.processed.with_label_values(&at);
        // A counter only rises: it follows the worker's own count by the difference.
        processed.inc_by(w.processed.saturating_sub(processed.get()));
        for (period, v) in ["1m", "5m", "15m"].iter().zip(w.loadavg) {
            s.loadavg
                .with_label_values(&[w.hostname.as_str(), period])
                .set(v);
        }
    }

    pub fn task_received(&self, task: &str) {
        self.tasks.with_label_values(&[task, "received"]).inc();
    }

    pub fn task_started(&self, task: &str) {
        self.tasks.with_label_values(&[task, "started"]).inc();
        self.running.inc();
    }

    /// `state`: succeeded, failed, retried, revoked, abandoned.
    pub fn task_finished(&self, task: &str, state: &str, secs: Option<f64>) {
        self.tasks.with_label_values(&[task, state]).inc();
        if let Some(s) = secs {
            self.running.dec();
            self.durations.with_label_values(&[task, state]).observe(s);
        }
    }

    pub fn build(&self, outcome: &str, report: Option<&BuildReport>) {
        self.builds.with_label_values(&[outcome]).inc();
        let Some(r) = report else { return };
        self.reused.inc_by(r.chunks_reused);
        for s in &r.stages {
            self.stage_items
                .with_label_values(&[s.name])
                .inc_by(s.items_out);
            self.stage_bytes
                .with_label_values(&[s.name])
                .inc_by(s.bytes_out);
            self.stage_requests
                .with_label_values(&[s.name])
                .inc_by(s.requests);
            self.stage_busy
                .with_label_values(&[s.name])
                .inc_by(s.busy_ms / 1000.0);
            self.stage_wait
                .with_label_values(&[s.name, "upstream"])
                .inc_by(s.wait_upstream_ms / 1000.0);
            self.stage_wait
                .with_label_values(&[s.name, "downstream"])
                .inc_by(s.wait_downstream_ms / 1000.0);
            if s.busy_ms > 0.0 {
                self.stage_rate
                    .with_label_values(&[s.name])
                    .set(s.items_out as f64 / (s.busy_ms / 1000.0));
            }
        }
    }

    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }
}
