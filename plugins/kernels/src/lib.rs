//! CPU kernels the engines share.
//!
//! - [`winograd`]: 3×3 convolutions by Winograd F(2,3) and F(4,3) on channels-last,
//!   zero-padded activations (the cnn engine keeps its activations in that layout).
//! - [`nchw`]: the same convolutions on NCHW tensors (the pisa engine's candle layout), in
//!   bands of rows whose channels-last copies stay within a byte budget.
//! - [`bf16`]: matrix products with bf16 weights (AVX512_BF16 where the CPU has it).
//! - [`attention`]: multi-head attention a block of queries at a time, scores kept in cache.
//! - [`elementwise`]: GroupNorm (+ SiLU) and GEGLU, one pass each, vectorised exponentials.
//! - [`device`]: the device an engine runs on (`cpu`, `cuda:N`) and what a build supports.
//! - [`simd`]: `multiversion!`, functions compiled for the CPU's widest vectors and chosen at
//!   run time.

#[macro_use]
pub mod simd;
pub mod attention;
pub mod bf16;
pub mod device;
pub mod elementwise;
pub mod nchw;
pub mod winograd;
