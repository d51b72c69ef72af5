//! The sluice front end as a library: the `sluice` binary is a thin CLI over it, and the
//! fuzz targets reach the parsers through it.

pub mod access_log;
pub mod activation;
pub mod admin;
pub mod answers;
pub mod cache;
pub mod canonical;
pub mod config;
pub mod dates;
pub mod delivery;
pub mod diag;
pub mod direct;
pub mod dispatcher;
pub mod epoll;
pub mod eventfd;
pub mod fdstore;
pub mod held;
pub mod metrics;
pub mod pipeline;
pub mod pool;
pub mod relay;
pub mod route;
pub mod server;
pub mod sockets;
pub mod status;
pub mod steering;
pub mod sysctl;
pub mod table;
pub mod tls;
