//! orbit-worker: the Rust worker for OrbitingFox's Celery tasks (protocol 2 on kombu's Redis
//! transport), the CLI around the memory pipeline, and the services its tasks share. A library,
//! so tests run the worker in-process; `main.rs` is a thin binary over `cli`.

pub mod answer;
pub mod bench;
pub mod cache;
pub mod celery;
pub mod chat;
pub mod cli;
pub mod config;
pub mod db;
pub mod embedders;
pub mod eval;
pub mod http;
pub mod lock;
pub mod logging;
pub mod metrics;
pub mod outbound;
pub mod output;
pub mod pricing;
pub mod redis_conn;
pub mod reembed;
pub mod services;
pub mod tasks;
pub mod worker;
