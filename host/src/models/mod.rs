//! Model weights on disk: the catalog of models Tessera knows how to fetch, the converters
//! from foreign formats, and the model store the engines load from (DESIGN.md §6).

pub mod catalog;
pub mod convert;
pub mod fetch;
pub mod imported;
pub mod ncnn;
mod srgan_h5;
pub mod store;

/// Lower-case hex SHA-256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}
