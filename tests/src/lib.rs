//! The local stack (a private Postgres cluster, moto, the Cloudflare stand-in, hive-api and
//! hive-worker) as a library, shared by the end-to-end tests and the `hive-stack` command.

pub mod aws_fixture;
pub mod aws_proxy;
pub mod cloudflare_standin;
pub mod process;
pub mod stack;
pub mod stripe_events;
