//! Files in and out of the command line: decode PNG/JPEG/TIFF into a buffer layout, encode
//! buffers as PNG (8- or 16-bit) for OpenRaster layers.

use std::io::Write;

use image::{DynamicImage, ExtendedColorType, ImageDecoder, ImageEncoder};
use tessera_protocol::{ColorEncoding, Layout, LayoutRequest, SampleType};

/// A decoded image: its layout, tightly packed native-endian samples, and the ICC profile
/// the file carried (the outputs carry it on: their samples are in the input's encoding).
pub struct Pixels {
    pub layout: Layout,
    pub data: Vec<u8>,
    pub icc: Option<Vec<u8>>,
}

pub fn load(path: &std::path::Path) -> anyhow::Result<Pixels> {
    let cannot = |e: &dyn std::fmt::Display| anyhow::anyhow!("cannot read {}: {e}", path.display());
    let mut decoder = image::ImageReader::open(path)
        .map_err(|e| cannot(&e))?
        .with_guessed_format()
        .map_err(|e| cannot(&e))?
        .into_decoder()
        .map_err(|e| cannot(&e))?;
    // A profile that cannot be read is left behind, as a viewer would: the pixels still are.
    let icc = decoder.icc_profile().ok().flatten();
    let img = DynamicImage::from_decoder(decoder).map_err(|e| cannot(&e))?;
    let (channels, sample, img) = match img {
        DynamicImage::ImageLuma8(_) => (1, SampleType::U8, img),
        DynamicImage::ImageLumaA8(_) => (2, SampleType::U8, img),
        DynamicImage::ImageRgb8(_) => (3, SampleType::U8, img),
        DynamicImage::ImageRgba8(_) => (4, SampleType::U8, img),
        DynamicImage::ImageLuma16(_) => (1, SampleType::U16, img),
        DynamicImage::ImageLumaA16(_) => (2, SampleType::U16, img),
        DynamicImage::ImageRgb16(_) => (3, SampleType::U16, img),
        DynamicImage::ImageRgba16(_) => (4, SampleType::U16, img),
        DynamicImage::ImageRgb32F(_) => (3, SampleType::F32, img),
        DynamicImage::ImageRgba32F(_) => (4, SampleType::F32, img),
        other => (4, SampleType::F32, DynamicImage::ImageRgba32F(other.to_rgba32f())),
    };
    let mut layout = Layout::tight(img.width(), img.height(), channels, sample);
    layout.encoding = ColorEncoding::Srgb;
    Ok(Pixels { layout, data: img.as_bytes().to_vec(), icc })
}

pub fn request(layout: &Layout) -> LayoutRequest {
    LayoutRequest {
        width: layout.width,
        height: layout.height,
        channels: layout.channels,
        sample: layout.sample,
        stride: Some(layout.stride),
        encoding: layout.encoding,
        alpha: layout.alpha,
    }
}

fn color_type(layout: &Layout) -> anyhow::Result<ExtendedColorType> {
    use ExtendedColorType::*;
    Ok(match (layout.channels, layout.sample) {
        (1, SampleType::U8) => L8,
        (2, SampleType::U8) => La8,
        (3, SampleType::U8) => Rgb8,
        (4, SampleType::U8) => Rgba8,
        (1, SampleType::U16) => L16,
        (2, SampleType::U16) => La16,
        (3, SampleType::U16) => Rgb16,
        (4, SampleType::U16) => Rgba16,
        (c, s) => anyhow::bail!("no PNG form for {c} channels of {s:?}"),
    })
}

/// The ICC profile an output PNG of `sample` type embeds: the input's, else for 16-bit samples
/// sRGB (untagged 16-bit PNGs are ambiguous, see `icc`), else none.
pub fn output_profile(input: Option<&[u8]>, sample: SampleType) -> Option<Vec<u8>> {
    match input {
        Some(icc) => Some(icc.to_vec()),
        None if sample == SampleType::U16 => Some(crate::icc::srgb()),
        None => None,
    }
}

/// Encodes an integer buffer as PNG, with `icc` as its iCCP chunk when given. Samples stay
/// native-endian: the encoder converts 16-bit samples to PNG's big-endian order itself.
pub fn write_png(out: impl Write, layout: &Layout, data: &[u8], icc: Option<&[u8]>) -> anyhow::Result<()> {
    let ct = color_type(layout)?;
    let row = layout.row_bytes() as usize;
    let mut packed = Vec::with_capacity(row * layout.height as usize);
    for y in 0..layout.height as usize {
        packed.extend_from_slice(&data[y * layout.stride as usize..][..row]);
    }
    let mut enc = image::codecs::png::PngEncoder::new_with_quality(
        out,
        image::codecs::png::CompressionType::Fast,
        image::codecs::png::FilterType::Adaptive,
    );
    if let Some(icc) = icc {
        enc.set_icc_profile(icc.to_vec()).map_err(|e| anyhow::anyhow!("cannot embed the ICC profile: {e}"))?;
    }
    enc.write_image(&packed, layout.width, layout.height, ct)?;
    Ok(())
}
