//! paysync: batch export and polling daemon for payment data.
//!
//! Data flow: input files → [`input`] (validated order numbers, rejects) → [`state`]
//! (durable registry of orders, deduplicated) → [`pipeline`] claims due orders and
//! fetches them through a [`provider`] over the shared [`fetch`] transport (rate
//! limit, retries) → [`tracker`] decides settled / next poll / deadline → [`state`]
//! stages observation rows → [`output`] commits them as files with manifests.
//!
//! - [`cli`]: command-line arguments.
//! - [`config`]: the TOML config file, validated once into [`config::Settings`].
//! - [`model`]: order numbers, statuses, amounts, observation rows.
//! - [`input`]: CSV and queue-file readers, the rejects file.
//! - [`provider`]: the provider seam; PayProtocol and GenAuth.
//! - [`fetch`]: HTTP transport, rate limiting, the retry decision.
//! - [`tracker`]: settlement rules and the re-poll schedule.
//! - [`state`]: the state store interface and its SQLite implementation.
//! - [`output`]: JSONL/CSV writers, manifests, atomic commit.
//! - [`pipeline`]: `paysync run`: ingest, poll, export.
//! - [`daemon`]: `paysync daemon`: cron schedules, queue tailing, inbox, systemd.
//! - [`metrics`]: the daemon's Prometheus endpoint.
//! - [`mock`]: the bundled mock payment server (tests, demo, benchmarks).
//! - [`demo`]: `paysync demo`, the mock server plus a real run.
//! - [`failpoint`]: crash points for the crash-safety tests.
//! - [`telemetry`]: logging setup.
//! - `fuzzing`: entry points of the fuzz targets in `fuzz/` (hidden, not an API).

pub mod cli;
pub mod config;
pub mod daemon;
pub mod demo;
pub mod failpoint;
pub mod fetch;
#[doc(hidden)]
pub mod fuzzing;
pub mod input;
pub mod metrics;
pub mod mock;
pub mod model;
pub mod output;
pub mod pipeline;
pub mod provider;
pub mod schema;
pub mod state;
pub mod telemetry;
pub mod tls_server;
pub mod tracker;
