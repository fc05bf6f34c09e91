//! # edgetally-bench
//!
//! The merger launcher (`launcher`): starts `edgetally serve` as a child process and reads
//! what it prints at start-up. Shared by the demo (`edgetally-bench demo`, run by `cargo xtask demo`) and the benchmarks of the
//! `edgetally-bench` binary (`loadgen`, `clusterbench`, `statusbench`, `soak`), which live in
//! this package so that the product binary keeps only what operators and producers run.

pub mod launcher;
