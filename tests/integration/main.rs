//! The integration suite: the pipeline end to end on real files and SQLite, Python tiktoken
//! parity, the local model against its reference, and the CLI as a user runs it.

mod cli;
mod helpers;
mod local_model;
mod openai;
mod pipeline;
mod tokens;
