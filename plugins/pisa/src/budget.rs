//! Tile sizes from a memory budget (DESIGN.md §5): the working memory of one tile's pass,
//! estimated from the networks' configs, stays within the budget, so a job's peak follows the
//! budget and not the layer's size. The images themselves (the bicubic base, the decoded
//! pictures: some 60 bytes an output pixel) come on top.

use tessera_pisa_model::config::{UNetConfig, VaeConfig};

use crate::pipeline::{Tiling, VaeNorm};

const F32: usize = 4;

/// What the user chose; zeros leave the choice to the budget.
#[derive(Clone, Debug)]
pub struct Request {
    pub memory_mb: usize,
    pub unet_tile: usize,
    pub unet_overlap: usize,
    pub vae_tile: usize,
    pub vae_norm: VaeNorm,
}

/// The default budget: half the memory the device has free now (the card's, or the
/// machine's for the CPU), at least 1 GiB.
pub fn default_memory_mb(device: &candle_core::Device) -> usize {
    if let Some(free) = tessera_kernels::device::free_memory(device) {
        return ((free / 2) >> 20).max(1024) as usize;
    }
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let available_kib = meminfo
        .lines()
        .find(|l| l.starts_with("MemAvailable:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse::<usize>().ok())
        .unwrap_or(4 << 20);
    ((available_kib / 2) >> 10).max(1024)
}

/// The smallest budget a job that ran out of device memory is retried with.
pub const MIN_RETRY_MB: usize = 256;

/// The request to retry a job with after `error`: half the budget (so smaller tiles) when the
/// error is the device running out of memory (CUDA's, cuBLAS's) and the half is not below
/// [`MIN_RETRY_MB`]; `None` for any other error.
pub fn after_out_of_memory(r: &Request, error: &str) -> Option<Request> {
    let oom = ["OUT_OF_MEMORY", "out of memory", "ALLOC_FAILED"].iter().any(|s| error.contains(s));
    let half = r.memory_mb / 2;
    // Fixed tile sizes are the user's; a retry leaves the budget to choose.
    (oom && half >= MIN_RETRY_MB).then(|| Request { memory_mb: half, vae_tile: 0, ..r.clone() })
}

/// Peak bytes of the UNet over a latent window `h × w` at `batch`, besides the weights: the
/// largest level's activations (the transformer's GEGLU holds 8 channels' worth per channel),
/// the skip connections every level keeps for the way up, and the attention and convolution
/// scratch bounded by the context.
pub fn unet_bytes(c: &UNetConfig, h: usize, w: usize, batch: usize, scratch: usize) -> usize {
    let px = h * w * batch;
    let levels = c.block_out_channels.iter().enumerate();
    let widest = levels.clone().map(|(l, ch)| px / (1 << (2 * l)) * ch * 14).max().unwrap_or(0);
    let skips: usize = levels.map(|(l, ch)| px / (1 << (2 * l)) * ch * 3).sum();
    (widest + skips) * F32 + scratch
}

/// Peak bytes of the VAE decoder over a latent window `h × w`: at each of its resolutions
/// (×1 … ×8), the block's input and output, the residual and GroupNorm's temporaries.
pub fn decoder_bytes(c: &VaeConfig, h: usize, w: usize, scratch: usize) -> usize {
    let ch = &c.block_out_channels;
    let n = ch.len();
    (0..n)
        .map(|l| {
            // Level l works at 2^l × the latent: its input is the block above's output.
            let c_in = if l == 0 { ch[n - 1] } else { ch[n - l] };
            h * w * (1 << (2 * l)) * (3 * c_in + 3 * ch[n - 1 - l])
        })
        .max()
        .unwrap_or(0)
        * F32
        + scratch
}

/// Peak bytes of the VAE encoder over a latent window `h × w` (8h × 8w pixels).
pub fn encoder_bytes(c: &VaeConfig, h: usize, w: usize, scratch: usize) -> usize {
    let ch = &c.block_out_channels;
    (0..ch.len())
        .map(|l| 64 * h * w / (1 << (2 * l)) * (3 * ch[l.saturating_sub(1)] + 3 * ch[l]))
        .max()
        .unwrap_or(0)
        * F32
        + scratch
}

/// The largest square window side whose cost stays within `budget` (at least 8).
fn largest(budget: usize, cost: impl Fn(usize) -> usize) -> usize {
    let mut t = 8;
    while t < 4096 && cost(t + 8) <= budget {
        t += 8;
    }
    t
}

/// The VAE tiles' halos, in latent pixels, (encoder, decoder): PiSA-SR's 32 px and 11 latent
/// with estimated statistics; with exact ones, as far as the SD VAE's convolutions reach
/// (about 14 and 17 latent pixels in theory; tiles of the small test model equal the whole
/// image to 110 dB and more with 12 and 16).
pub fn halos(norm: VaeNorm) -> (usize, usize) {
    match norm {
        VaeNorm::Exact => (12, 16),
        VaeNorm::Estimate(_) => (4, 11),
    }
}

/// Tiles for an image of `width × height` output pixels.
pub fn plan(unet: &UNetConfig, vae: &VaeConfig, width: usize, height: usize, r: &Request, scratch: usize) -> Tiling {
    let budget = r.memory_mb << 20;
    let (h, w) = (height.div_ceil(8), width.div_ceil(8));
    let unet_fit = largest(budget, |t| unet_bytes(unet, t, t, 2, scratch));
    let unet_tile = r.unet_tile.min(unet_fit).max(r.unet_overlap + 8);
    let vae_tile = |halo: usize, cost: &dyn Fn(usize, usize) -> usize| -> usize {
        if r.vae_tile > 0 {
            r.vae_tile
        } else if cost(h, w) <= budget {
            0
        } else {
            largest(budget, |t| cost(t, t)).saturating_sub(2 * halo).max(8)
        }
    };
    let (encoder_halo, decoder_halo) = halos(r.vae_norm);
    Tiling {
        unet_tile,
        unet_overlap: r.unet_overlap,
        encoder_tile: vae_tile(encoder_halo, &|a, b| encoder_bytes(vae, a, b, scratch)),
        encoder_halo,
        decoder_tile: vae_tile(decoder_halo, &|a, b| decoder_bytes(vae, a, b, scratch)),
        decoder_halo,
        vae_norm: r.vae_norm,
        global_attention_tokens: crate::pipeline::GLOBAL_ATTENTION_TOKENS,
    }
}

/// The context and tiles a job runs with: attention chunks and convolution bands take an
/// eighth of the budget each, the rest sizes the tiles.
pub fn settle(unet: &UNetConfig, vae: &VaeConfig, width: usize, height: usize, r: &Request, attention_mb: usize) -> (tessera_pisa_model::nn::Ctx, Tiling) {
    let budget = r.memory_mb << 20;
    let base = tessera_pisa_model::nn::Ctx::default();
    let ctx = tessera_pisa_model::nn::Ctx { attention_bytes: (attention_mb << 20).min(budget / 8), conv_bytes: base.conv_bytes.min(budget / 8), ..base };
    let scratch = ctx.attention_bytes * 2 + ctx.conv_bytes * 2;
    let tiling = plan(unet, vae, width, height, r, scratch);
    (ctx, tiling)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(memory_mb: usize) -> Request {
        Request { memory_mb, unet_tile: 96, unet_overlap: 32, vae_tile: 40, vae_norm: VaeNorm::Estimate(1) }
    }

    #[test]
    fn out_of_device_memory_halves_the_budget_down_to_a_floor() {
        let oom = "DriverError(CUDA_ERROR_OUT_OF_MEMORY, \"out of memory\")";
        let smaller = after_out_of_memory(&request(4096), oom).unwrap();
        assert_eq!((smaller.memory_mb, smaller.vae_tile, smaller.unet_tile), (2048, 0, 96));
        assert_eq!(after_out_of_memory(&request(4096), "cuBLAS: CUBLAS_STATUS_ALLOC_FAILED").unwrap().memory_mb, 2048);
        assert!(after_out_of_memory(&request(2 * MIN_RETRY_MB - 1), oom).is_none());
        assert!(after_out_of_memory(&request(4096), "shape mismatch in matmul").is_none());
    }
}
