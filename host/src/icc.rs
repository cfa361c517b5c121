//! An sRGB ICC profile (v2, display class, matrix/TRC) for the PNGs Tessera writes.
//!
//! Untagged 8-bit PNGs are sRGB to every reader; untagged 16-bit ones are not: Krita asks which
//! profile each 16-bit PNG layer of an .ora is in (once per layer) and proposes a linear one,
//! which shows the picture far too bright. So 16-bit outputs without a profile of their own
//! say they are sRGB. Written here rather than shipped as a file: it is a few fixed numbers
//! (IEC 61966-2-1 colorants adapted to the D50 connection space, the sRGB curve) and this
//! way carries no third-party licence.

const HEADER: usize = 128;
/// Entries of the tone curve: lcms interpolates between them; 1024 keeps a 16-bit round trip
/// within a level or two.
const CURVE_POINTS: usize = 1024;

fn s15_16(v: f64) -> [u8; 4] {
    ((v * 65536.0).round() as i32).to_be_bytes()
}

fn xyz(x: f64, y: f64, z: f64) -> Vec<u8> {
    let mut t = b"XYZ \0\0\0\0".to_vec();
    for v in [x, y, z] {
        t.extend_from_slice(&s15_16(v));
    }
    t
}

/// textDescriptionType: the ASCII name, empty Unicode and ScriptCode parts.
fn description(text: &str) -> Vec<u8> {
    let mut t = b"desc\0\0\0\0".to_vec();
    t.extend_from_slice(&(text.len() as u32 + 1).to_be_bytes());
    t.extend_from_slice(text.as_bytes());
    t.push(0);
    t.extend_from_slice(&[0; 4 + 4 + 2 + 1 + 67]);
    t
}

fn text(s: &str) -> Vec<u8> {
    let mut t = b"text\0\0\0\0".to_vec();
    t.extend_from_slice(s.as_bytes());
    t.push(0);
    t
}

/// The sRGB transfer function (encoded → linear).
fn srgb_to_linear(v: f64) -> f64 {
    if v <= 0.04045 { v / 12.92 } else { ((v + 0.055) / 1.055).powf(2.4) }
}

fn curve() -> Vec<u8> {
    let mut t = b"curv\0\0\0\0".to_vec();
    t.extend_from_slice(&(CURVE_POINTS as u32).to_be_bytes());
    for i in 0..CURVE_POINTS {
        let y = srgb_to_linear(i as f64 / (CURVE_POINTS - 1) as f64);
        t.extend_from_slice(&((y * 65535.0).round() as u16).to_be_bytes());
    }
    t
}

/// The profile's bytes.
pub fn srgb() -> Vec<u8> {
    // Colorants: sRGB's primaries and D65 white, Bradford-adapted to D50, as the ICC's sRGB
    // profiles carry them. A shared tone curve serves the three channels.
    let tags: [(&[u8; 4], Vec<u8>); 9] = [
        (b"desc", description("sRGB (Tessera)")),
        (b"cprt", text("No copyright, use freely")),
        (b"wtpt", xyz(0.9642, 1.0, 0.8249)),
        (b"rXYZ", xyz(0.436_074_7, 0.222_504_5, 0.013_932_2)),
        (b"gXYZ", xyz(0.385_064_9, 0.716_878_6, 0.097_104_5)),
        (b"bXYZ", xyz(0.143_080_4, 0.060_616_9, 0.714_173_3)),
        (b"rTRC", curve()),
        (b"gTRC", Vec::new()),
        (b"bTRC", Vec::new()),
    ];
    let table = 4 + 12 * tags.len();
    let mut data = Vec::new();
    let mut entries = Vec::new();
    let mut curve_at = (0, 0);
    for (sig, body) in &tags {
        let (offset, size) = if body.is_empty() {
            curve_at
        } else {
            let offset = HEADER + table + data.len();
            data.extend_from_slice(body);
            data.resize(data.len().next_multiple_of(4), 0);
            (offset, body.len())
        };
        if *sig == b"rTRC" {
            curve_at = (offset, size);
        }
        entries.extend_from_slice(*sig);
        entries.extend_from_slice(&(offset as u32).to_be_bytes());
        entries.extend_from_slice(&(size as u32).to_be_bytes());
    }
    let size = HEADER + table + data.len();
    let mut p = Vec::with_capacity(size);
    p.extend_from_slice(&(size as u32).to_be_bytes());
    p.extend_from_slice(&[0; 4]); // preferred CMM: none
    p.extend_from_slice(&[2, 0x10, 0, 0]); // version 2.1
    p.extend_from_slice(b"mntrRGB XYZ ");
    for part in [2026u16, 1, 1, 0, 0, 0] {
        p.extend_from_slice(&part.to_be_bytes());
    }
    p.extend_from_slice(b"acsp");
    p.extend_from_slice(&[0; 24]); // platform, flags, manufacturer, model, attributes
    p.extend_from_slice(&[0; 4]); // rendering intent: perceptual
    for v in [0.9642, 1.0, 0.8249] {
        p.extend_from_slice(&s15_16(v)); // the connection space's illuminant, D50
    }
    p.resize(HEADER, 0); // creator, profile ID (v4 only), reserved
    p.extend_from_slice(&(tags.len() as u32).to_be_bytes());
    p.extend_from_slice(&entries);
    p.extend_from_slice(&data);
    debug_assert_eq!(p.len(), size);
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    fn u32_at(p: &[u8], at: usize) -> usize {
        u32::from_be_bytes(p[at..at + 4].try_into().unwrap()) as usize
    }

    #[test]
    fn header_and_tag_table_describe_the_bytes() {
        let p = srgb();
        assert_eq!(u32_at(&p, 0), p.len());
        assert_eq!(&p[36..40], b"acsp");
        assert_eq!(&p[12..24], b"mntrRGB XYZ ");
        let count = u32_at(&p, HEADER);
        assert_eq!(count, 9);
        for i in 0..count {
            let e = HEADER + 4 + 12 * i;
            let (offset, size) = (u32_at(&p, e + 4), u32_at(&p, e + 8));
            assert_eq!(offset % 4, 0);
            assert!(offset + size <= p.len(), "tag {i} runs past the end");
            let kind = &p[offset..offset + 4];
            let want: &[u8] = match &p[e..e + 4] {
                b"desc" => b"desc",
                b"cprt" => b"text",
                b"rTRC" | b"gTRC" | b"bTRC" => b"curv",
                _ => b"XYZ ",
            };
            assert_eq!(kind, want);
        }
    }

    #[test]
    fn the_curve_is_srgbs() {
        let c = curve();
        let at = |i: usize| u16::from_be_bytes([c[12 + 2 * i], c[13 + 2 * i]]);
        assert_eq!((at(0), at(CURVE_POINTS - 1)), (0, 65535));
        // Encoded 0.5 (entry 511.5 of 1023) is 21.4 % linear.
        let mid = (at(511) as f64 + at(512) as f64) / 2.0 / 65535.0;
        assert!((mid - 0.214_041).abs() < 1e-4, "{mid}");
        assert!((1..CURVE_POINTS).all(|i| at(i) >= at(i - 1)));
    }
}
