//! The worker's integration suite: the CLI as a user runs it, and the Celery worker against real
//! Redis, Postgres and the real Python Celery client and worker. The pipeline's own end-to-end
//! tests live in `pipeline/tests/e2e`.

#[path = "../../pipeline/tests/support/common.rs"]
mod helpers;
#[path = "../../pipeline/tests/support/openai_double.rs"]
mod openai_double;
#[path = "../../pipeline/tests/support/qdrant.rs"]
mod qdrant_server;

mod app;
mod app_harness;
mod bench;
mod celery;
mod celery_harness;
mod chaos;
mod cli;
mod in_process;
mod monitoring;
mod qdrant;
mod reembed;
mod security;
mod sentinel;
mod side;
mod tls;
