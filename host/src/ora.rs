//! OpenRaster output: the layer contract's layers in a group, the composite the editors will
//! show, and a thumbnail. GIMP and Krita both open `.ora`.

use std::io::{Seek, Write};

use tessera_protocol::{Blend, Layout, SampleType};
use zip::write::SimpleFileOptions;

use crate::image_io::write_png;

pub struct OraLayer<'a> {
    pub name: String,
    /// File stem inside `data/`.
    pub file: String,
    pub blend: Blend,
    pub opacity: f32,
    /// Hidden layers are stored but left out of the composite.
    pub visible: bool,
    pub layout: Layout,
    pub data: &'a [u8],
}

/// ORA composite-op names: the SVG ones where they exist; Krita's for grain merge.
pub fn composite_op(blend: Blend) -> &'static str {
    match blend {
        Blend::Normal => "svg:src-over",
        Blend::Addition => "svg:plus",
        Blend::GrainMerge => "krita:grain_merge",
    }
}

fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

/// The stack.xml for one group holding `layers` (given bottom first, as the contract orders them).
pub fn stack_xml(width: u32, height: u32, group: &str, layers: &[OraLayer<'_>]) -> String {
    let mut xml = format!(
        "<?xml version='1.0' encoding='UTF-8'?>\n<image version=\"0.0.3\" w=\"{width}\" h=\"{height}\" xres=\"72\" yres=\"72\">\n <stack>\n  <stack name=\"{}\" isolation=\"isolate\" composite-op=\"svg:src-over\" opacity=\"1.000\" visibility=\"visible\">\n",
        xml_escape(group)
    );
    // ORA lists the topmost layer first.
    for l in layers.iter().rev() {
        xml.push_str(&format!(
            "   <layer name=\"{}\" src=\"data/{}.png\" composite-op=\"{}\" opacity=\"{:.3}\" visibility=\"{}\" x=\"0\" y=\"0\"/>\n",
            xml_escape(&l.name),
            l.file,
            composite_op(l.blend),
            l.opacity,
            if l.visible { "visible" } else { "hidden" }
        ));
    }
    xml.push_str("  </stack>\n </stack>\n</image>\n");
    xml
}

/// What the editors show for `layers` at their opacities: base, then each residual blended
/// on top (grain merge: below + layer − 0.5, clamped; addition: below + layer), colour only.
/// As the editors composite a detail layer clipped to what is below it (GIMP's
/// clip-to-backdrop, Krita's inherit alpha, which the adapters set): the blend is weighed by
/// the layer's own alpha as well as its opacity, and the alpha is the base's.
/// Integer layers of one sample type in, the same type out.
pub fn composite(layers: &[OraLayer<'_>]) -> Vec<u8> {
    let base = &layers[0];
    let l = base.layout;
    let c = l.channels as usize;
    let colour = c - l.alpha as usize;
    let (max, bytes) = match l.sample {
        SampleType::U8 => (255.0f32, 1),
        _ => (65535.0f32, 2),
    };
    let read = |d: &[u8], i: usize| -> f32 {
        if bytes == 1 { d[i] as f32 / max } else { u16::from_ne_bytes([d[2 * i], d[2 * i + 1]]) as f32 / max }
    };
    let mut out = vec![0u8; (l.width * l.height) as usize * c * bytes];
    let stride_px = |layer: &OraLayer<'_>| layer.layout.stride as usize / bytes;
    for y in 0..l.height as usize {
        for x in 0..l.width as usize {
            for ch in 0..c {
                let mut v = read(base.data, y * stride_px(base) + x * c + ch);
                if ch < colour {
                    for r in layers[1..].iter().filter(|r| r.visible) {
                        let at = y * stride_px(r) + x * c;
                        let s = read(r.data, at + ch);
                        let alpha = if l.alpha { read(r.data, at + colour) } else { 1.0 };
                        let blended = match r.blend {
                            Blend::GrainMerge => (v + s - 0.5).clamp(0.0, 1.0),
                            Blend::Addition => v + s,
                            Blend::Normal => s,
                        };
                        v += r.opacity * alpha * (blended - v);
                    }
                }
                let q = (v * max + 0.5).clamp(0.0, max);
                let i = (y * l.width as usize + x) * c + ch;
                if bytes == 1 {
                    out[i] = q as u8;
                } else {
                    out[2 * i..2 * i + 2].copy_from_slice(&(q as u16).to_ne_bytes());
                }
            }
        }
    }
    out
}

/// Writes the .ora: mimetype (first, stored), stack.xml, data/*.png, mergedimage.png, thumbnail;
/// every PNG embeds `icc` when given.
pub fn write_ora(out: impl Write + Seek, group: &str, layers: &[OraLayer<'_>], merged: &[u8], icc: Option<&[u8]>) -> anyhow::Result<()> {
    let l = layers[0].layout;
    let stored = SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    let mut zip = zip::ZipWriter::new(out);
    zip.start_file("mimetype", stored)?;
    zip.write_all(b"image/openraster")?;
    zip.start_file("stack.xml", stored)?;
    zip.write_all(stack_xml(l.width, l.height, group, layers).as_bytes())?;
    for layer in layers {
        zip.start_file(format!("data/{}.png", layer.file), stored.large_file(layer.data.len() > (1 << 31)))?;
        write_png(&mut zip, &layer.layout, layer.data, icc)?;
    }
    let merged_layout = Layout::tight(l.width, l.height, l.channels, l.sample);
    zip.start_file("mergedimage.png", stored.large_file(merged.len() > (1 << 31)))?;
    write_png(&mut zip, &merged_layout, merged, icc)?;
    zip.start_file("Thumbnails/thumbnail.png", stored)?;
    write_png(&mut zip, &thumbnail_layout(&merged_layout).0, &thumbnail(&merged_layout, merged), icc)?;
    zip.finish()?;
    Ok(())
}

fn thumbnail_layout(l: &Layout) -> (Layout, u32) {
    let step = l.width.max(l.height).div_ceil(256).max(1);
    (Layout::tight(l.width.div_ceil(step), l.height.div_ceil(step), l.channels, l.sample), step)
}

/// Nearest-neighbour reduction to at most 256 pixels a side: a thumbnail needs no more.
fn thumbnail(l: &Layout, data: &[u8]) -> Vec<u8> {
    let (t, step) = thumbnail_layout(l);
    let px = l.channels as usize * l.sample.bytes();
    let mut out = Vec::with_capacity((t.width * t.height) as usize * px);
    for y in 0..t.height {
        for x in 0..t.width {
            let i = ((y * step) as usize * l.width as usize + (x * step) as usize) * px;
            out.extend_from_slice(&data[i..i + px]);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layer<'a>(name: &str, file: &str, blend: Blend, opacity: f32, layout: Layout, data: &'a [u8]) -> OraLayer<'a> {
        OraLayer { name: name.into(), file: file.into(), blend, opacity, visible: true, layout, data }
    }

    #[test]
    fn grain_merge_adds_the_residual_scaled_by_opacity() {
        // One RGBA pixel: base 100, pixel detail +20 (stored 128 + 20), semantic −40 at 50 %.
        let l = Layout::tight(1, 1, 4, SampleType::U8);
        let base = [100u8, 100, 100, 200];
        let pix = [148u8, 148, 148, 255];
        let sem = [88u8, 88, 88, 255];
        let layers = [
            layer("b", "base", Blend::Normal, 1.0, l, &base),
            layer("p", "pixel_detail", Blend::GrainMerge, 1.0, l, &pix),
            layer("s", "semantic_detail", Blend::GrainMerge, 0.5, l, &sem),
        ];
        let out = composite(&layers);
        // 100 + (148 − 128) = 120; then 120 + 0.5·(88 − 128) = 100. Alpha stays the base's.
        let expect = |v: f32| ((v / 255.0) * 255.0 + 0.5) as u8;
        assert!(out[..3].iter().all(|&v| v.abs_diff(expect(100.0)) <= 1), "{out:?}");
        assert_eq!(out[3], 200);
    }

    #[test]
    fn a_residual_is_weighed_by_its_own_alpha() {
        // A half-transparent edge pixel (alpha 102 = 0.4, the base's, which residuals carry):
        // the editors add 0.4 of the +40 detail and keep the base's alpha.
        let l = Layout::tight(1, 1, 2, SampleType::U8);
        let base = [100u8, 102];
        let pix = [168u8, 102];
        let layers = [layer("b", "base", Blend::Normal, 1.0, l, &base), layer("p", "p", Blend::GrainMerge, 1.0, l, &pix)];
        assert_eq!(composite(&layers), [116, 102]);
    }

    #[test]
    fn grain_merge_clamps_like_the_editors() {
        let l = Layout::tight(1, 1, 1, SampleType::U16);
        let base = 60000u16.to_ne_bytes();
        let up = 60000u16.to_ne_bytes();
        let layers = [layer("b", "base", Blend::Normal, 1.0, l, &base), layer("p", "p", Blend::GrainMerge, 1.0, l, &up)];
        assert_eq!(u16::from_ne_bytes(composite(&layers)[..2].try_into().unwrap()), 65535);
    }

    #[test]
    fn stack_lists_the_top_layer_first_with_escaped_names() {
        let l = Layout::tight(2, 2, 3, SampleType::U8);
        let d = [0u8; 12];
        let layers = [
            layer("Tessera ×4 · base", "base", Blend::Normal, 1.0, l, &d),
            layer("Tessera ×4 · pixel detail", "pixel_detail", Blend::GrainMerge, 0.75, l, &d),
        ];
        let xml = stack_xml(2, 2, "a & <b>", &layers);
        let pix = xml.find("pixel detail").unwrap();
        let base = xml.find("· base").unwrap();
        assert!(pix < base, "{xml}");
        assert!(xml.contains("name=\"a &amp; &lt;b&gt;\""));
        assert!(xml.contains("composite-op=\"krita:grain_merge\" opacity=\"0.750\""));
    }
}
