//! Prometheus metrics of one worker process: tasks by name and state, task durations, pipeline
//! stage throughput, and (read at scrape time) queue depth and unacked messages.

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
        ] {
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
