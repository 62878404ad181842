//! taskql: a GraphQL server that tracks users' background tasks.
pub mod auth;
pub mod db;
pub mod error;
pub mod events;
pub mod pg_listener;
pub mod service;
