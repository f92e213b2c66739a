//! The gateway's HTTP API (poem + poem-openapi).

pub mod auth;
pub mod embedded;
pub mod error;
pub mod routes;
pub mod startup;
pub mod state;
pub mod views;
