//! The integration suite: the pipeline end to end on real files and SQLite, Python tiktoken
//! parity, the local model against its reference, the CLI as a user runs it, and the Celery
//! worker against real Redis and the real Python Celery client and worker.

mod app;
mod app_harness;
mod celery;
mod celery_harness;
mod cli;
mod helpers;
mod local_model;
mod openai;
mod pipeline;
mod side;
mod tokens;
