//! The pipeline's own end-to-end suite (`cargo test -p orbit-pipeline`): builds on real files
//! and SQLite, the OpenAI embedder against a local double, Python tiktoken parity, and the local
//! model against its reference.

#[path = "../support/common.rs"]
mod helpers;

#[path = "../support/qdrant.rs"]
mod qdrant_server;

#[path = "../support/openai_double.rs"]
mod openai_double;

mod conformance;
mod env;
mod local_model;
mod openai;
mod pipeline;
mod retrieval;
mod tokens;
