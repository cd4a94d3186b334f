//! The handlers, one module per part of the API. Each takes a routed
//! [`Request`](super::request::Request) and returns a response or an
//! [`ApiError`](super::ApiError).

pub mod admin;
pub mod admission;
pub mod ops;
pub mod orders;
pub mod public;
pub mod purchase;
