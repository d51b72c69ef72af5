//! The contract between the sluice front end and its workers, in one place both sides compile
//! against: how a request head is framed and what its target means (`request`, `target`,
//! `host`), which requests and responses the front end may cache (`cache`), the control
//! messages (`control`) and the access-log entries they carry (`access`), the handoff framing (`handoff`), the environment and fd names
//! (`env`), the size limits (`limits`), URL canonicalization and prefix routing
//! (`canonical`, `route`) and the sites routes belong to (`site`).
//!
//! Where the front end and a worker must agree on a rule, the rule is a function here and
//! both call it; the tests feed one side's output to the other side's parser.

pub mod access;
pub mod cache;
pub mod canonical;
pub mod control;
pub mod env;
pub mod handoff;
pub mod host;
pub mod limits;
pub mod outcomes;
pub mod ownership;
pub mod proxy;
pub mod request;
pub mod route;
pub mod site;
pub mod sockaddr;
pub mod target;
