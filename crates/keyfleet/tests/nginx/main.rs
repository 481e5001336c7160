//! nginx in front of keyfleet, with the real nginx binary (Debian's `nginx` package, which
//! `.ci/run` installs): `auth_request` to a verifier's `GET /auth` guarding an app, and
//! `grpc_pass` balancing `keyfleet.v1.Verifier` over three verifiers, one killed mid-load. The
//! nginx configurations are the examples of deploy/nginx/, filled in: the examples are the
//! tested ones.
//!
//! Each test starts its own nginx (one process, `master_process off`, loopback ports, a
//! temporary prefix) and kills it at the end. Without an nginx binary the tests print a loud
//! note and pass, so that a machine with only Rust still runs `cargo test`; with
//! `KEYFLEET_REQUIRE_NGINX=1` (as `.ci/run` sets) they fail instead.

mod auth_request;
mod fleet;
mod grpc_balancer;
mod nginx;
