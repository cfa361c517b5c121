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

/// The command that puts model `id` back whole: fetch for the catalog's models, import for
/// imported ones (PiSA-SR).
pub fn repair_command(id: &str) -> String {
    match catalog::find(id) {
        Some(_) => format!("tessera models fetch {id}"),
        None => imported::install_command(imported::PISA, id).unwrap_or_else(|| format!("tessera models remove {id}")),
    }
}
