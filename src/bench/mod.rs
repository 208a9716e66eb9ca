//! `eventra bench …`: benchmarks that drive Eventra's real components and, in the
//! same run, the raw engines (and reference systems) doing the same work, so every
//! figure comes with its baseline. Results go to BENCHMARKS.md with the command.

pub mod jobs;
pub mod pipeline;
pub mod search;
