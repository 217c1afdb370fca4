//! Celery protocol 2 on kombu's Redis transport: messages, results and the Redis operations.

pub mod message;
pub mod redis;
pub mod result;
