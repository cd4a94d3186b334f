//! The integration suite: one binary, every test against real Redis and real
//! PostgreSQL. Each test spawns its own gateway on port 0 with its own Redis
//! key prefix and its own database, so tests run in parallel.

mod cluster_procs;
mod helpers;
mod procs;

mod accounts;
mod admin;
mod browser;
mod buckets;
mod cluster;
mod compose;
mod copy;
mod docs;
mod faults;
mod fuzz;
mod input;
mod lifecycle;
mod lost_state;
mod nginx;
mod nginx_web;
mod openapi;
mod ops;
mod orders_and_limits;
mod pools;
mod protection;
mod purchase;
mod races;
mod shutdown;
mod traces;
mod web;
mod workers;
