//! PiSA-SR's networks in candle (DESIGN.md §4): the Stable Diffusion 2.1 UNet and VAE built
//! from diffusers `config.json` files, LoRA-aware layers (merged at load, or applied at run
//! time with a scale per batch item), memory-bounded attention, the CLIP text encoder for the
//! empty-prompt embedding, and the importer that turns an SD2.1 folder and a `pisa_sr.pkl`
//! into verified model-store files.

pub mod clip;
pub mod config;
pub mod error;
pub mod nn;
pub mod norm;
pub mod unet;
pub mod vae;
pub mod weights;

pub use error::{ModelError, Result};
pub mod checkpoint;
pub mod import;
pub mod store;
pub mod torch;
