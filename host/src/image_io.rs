//! Files in and out of the command line: decode PNG/JPEG/TIFF into a buffer layout, encode
//! buffers as PNG (8- or 16-bit) for OpenRaster layers.

use std::io::Write;

use image::{DynamicImage, ExtendedColorType, ImageEncoder};
use tessera_protocol::{ColorEncoding, Layout, LayoutRequest, SampleType};

/// A decoded image: its layout and tightly packed native-endian samples.
pub struct Pixels {
    pub layout: Layout,
    pub data: Vec<u8>,
}

pub fn load(path: &std::path::Path) -> anyhow::Result<Pixels> {
    let cannot = |e: &dyn std::fmt::Display| anyhow::anyhow!("cannot read {}: {e}", path.display());
    let img = image::ImageReader::open(path)
        .map_err(|e| cannot(&e))?
        .with_guessed_format()
        .map_err(|e| cannot(&e))?
        .decode()
        .map_err(|e| cannot(&e))?;
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
    Ok(Pixels { layout, data: img.as_bytes().to_vec() })
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

/// Encodes an integer buffer as PNG. Samples stay native-endian: the encoder converts 16-bit
/// samples to PNG's big-endian order itself.
pub fn write_png(out: impl Write, layout: &Layout, data: &[u8]) -> anyhow::Result<()> {
    let ct = color_type(layout)?;
    let row = layout.row_bytes() as usize;
    let mut packed = Vec::with_capacity(row * layout.height as usize);
    for y in 0..layout.height as usize {
        packed.extend_from_slice(&data[y * layout.stride as usize..][..row]);
    }
    let enc = image::codecs::png::PngEncoder::new_with_quality(
        out,
        image::codecs::png::CompressionType::Fast,
        image::codecs::png::FilterType::Adaptive,
    );
    enc.write_image(&packed, layout.width, layout.height, ct)?;
    Ok(())
}
