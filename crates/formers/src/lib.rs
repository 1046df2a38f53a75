//! formers: efficient Transformer variants as interchangeable parts of one MetaFormer block.
//!
//! A model is a stack of blocks `x + TokenMixer(Norm(x))`, `x + ChannelMixer(Norm(x))`
//! (MetaFormer, Yu et al. 2022) whose parts are values in a [`config::ModelConfig`].
//! Every public type has one path: the module that defines it (a directory's `mod.rs`
//! re-exports its private files' public items); [`Error`] and [`Result`] are at the root.
//! This crate holds the model, its parts, the training loop and checkpoints; it holds no
//! command-line code (see `formers-cli`) and no benchmark tasks beyond the toy ones in
//! [`tasks`].

pub mod block;
pub mod bounds;
pub mod compress;
pub mod config;
pub mod embed;
mod error;
pub mod ffn;
pub mod fsio;
#[cfg(any(test, feature = "fuzzing"))]
pub mod fuzzing;
pub mod generate;
pub mod kernels;
pub mod limits;
pub mod linear;
pub mod lm;
pub mod loss;
pub mod mixer;
pub mod model;
pub mod norm;
pub mod params;
pub mod position;
pub mod pretrained;
pub mod rng;
pub mod tasks;
pub mod train;

pub use error::{Error, Result};

#[cfg(test)]
pub(crate) mod testutil;

/// The README, whose library example `cargo test --doc` compiles (its other blocks are `sh`).
#[cfg(doctest)]
#[doc = include_str!("../../../README.md")]
pub struct Readme;
