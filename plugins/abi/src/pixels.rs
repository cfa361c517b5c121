//! Safe views of host-lent buffers and the conversions between any supported sample type and
//! f32, so an engine computes in f32 and never touches raw layouts.

use tessera_protocol::{ColorEncoding, Layout, SampleType};

use crate::ffi::{self, TsBuffer};

/// Converts one row of samples to f32 in [0, 1] (floats pass through unchanged).
pub fn decode_row(sample: SampleType, row: &[u8], out: &mut [f32]) {
    match sample {
        SampleType::U8 => {
            for (o, &b) in out.iter_mut().zip(row) {
                *o = b as f32 * (1.0 / 255.0);
            }
        }
        SampleType::U16 => {
            for (o, b) in out.iter_mut().zip(row.chunks_exact(2)) {
                *o = u16::from_ne_bytes([b[0], b[1]]) as f32 * (1.0 / 65535.0);
            }
        }
        SampleType::F16 => {
            for (o, b) in out.iter_mut().zip(row.chunks_exact(2)) {
                *o = half::f16::from_ne_bytes([b[0], b[1]]).to_f32();
            }
        }
        SampleType::F32 => {
            for (o, b) in out.iter_mut().zip(row.chunks_exact(4)) {
                *o = f32::from_ne_bytes([b[0], b[1], b[2], b[3]]);
            }
        }
    }
}

/// Converts f32 values to one row of samples, adding `offset` to colour channels first (a
/// residual's alpha is plain coverage, never offset). Integer samples are rounded to nearest
/// and clamped; floats are stored as they are.
pub fn encode_pixels(layout: &Layout, offset: f32, values: &[f32], row: &mut [u8]) {
    if offset == 0.0 || !layout.alpha {
        return encode_row(layout.sample, offset, values, row);
    }
    let c = layout.channels as usize;
    let b = layout.sample.bytes();
    for (px, out) in values.chunks_exact(c).zip(row.chunks_exact_mut(c * b)) {
        encode_row(layout.sample, offset, &px[..c - 1], &mut out[..(c - 1) * b]);
        encode_row(layout.sample, 0.0, &px[c - 1..], &mut out[(c - 1) * b..]);
    }
}

/// Converts f32 values to samples, adding `offset` to every value first. Integer samples are
/// rounded to nearest and clamped; floats are stored as they are.
pub fn encode_row(sample: SampleType, offset: f32, values: &[f32], row: &mut [u8]) {
    match sample {
        SampleType::U8 => {
            for (b, &v) in row.iter_mut().zip(values) {
                *b = ((v + offset) * 255.0 + 0.5).clamp(0.0, 255.0) as u8;
            }
        }
        SampleType::U16 => {
            for (b, &v) in row.chunks_exact_mut(2).zip(values) {
                let q = ((v + offset) * 65535.0 + 0.5).clamp(0.0, 65535.0) as u16;
                b.copy_from_slice(&q.to_ne_bytes());
            }
        }
        SampleType::F16 => {
            for (b, &v) in row.chunks_exact_mut(2).zip(values) {
                b.copy_from_slice(&half::f16::from_f32(v + offset).to_ne_bytes());
            }
        }
        SampleType::F32 => {
            for (b, &v) in row.chunks_exact_mut(4).zip(values) {
                b.copy_from_slice(&(v + offset).to_ne_bytes());
            }
        }
    }
}

pub(crate) fn layout_of(buf: &TsBuffer) -> Result<Layout, String> {
    let sample = match buf.sample {
        ffi::SAMPLE_U8 => SampleType::U8,
        ffi::SAMPLE_U16 => SampleType::U16,
        ffi::SAMPLE_F16 => SampleType::F16,
        ffi::SAMPLE_F32 => SampleType::F32,
        s => return Err(format!("unknown sample type code {s}")),
    };
    let channels = u8::try_from(buf.channels).map_err(|_| "too many channels".to_string())?;
    let layout = Layout {
        width: buf.width,
        height: buf.height,
        channels,
        sample,
        stride: buf.stride,
        encoding: if buf.encoding == ffi::ENCODING_LINEAR { ColorEncoding::Linear } else { ColorEncoding::Srgb },
        alpha: buf.alpha != 0,
    };
    if buf.data.is_null() || (buf.len as u64) < layout.byte_len() || layout.stride < layout.row_bytes() {
        return Err(format!("buffer of {} bytes is too small for its {}×{} layout", buf.len, buf.width, buf.height));
    }
    Ok(layout)
}

/// A read-only image lent by the host.
pub struct ImageRef<'a> {
    pub layout: Layout,
    data: &'a [u8],
}

impl<'a> ImageRef<'a> {
    pub fn new(layout: Layout, data: &'a [u8]) -> ImageRef<'a> {
        assert!(data.len() as u64 >= layout.byte_len(), "buffer smaller than its layout");
        ImageRef { layout, data }
    }
    pub fn width(&self) -> usize {
        self.layout.width as usize
    }
    pub fn height(&self) -> usize {
        self.layout.height as usize
    }
    pub fn channels(&self) -> usize {
        self.layout.channels as usize
    }
    /// Row `y`'s bytes as stored.
    pub fn row_bytes(&self, y: usize) -> &[u8] {
        let start = y * self.layout.stride as usize;
        &self.data[start..start + self.layout.row_bytes() as usize]
    }
    /// Row `y` as f32, `width * channels` values.
    pub fn read_row(&self, y: usize, out: &mut [f32]) {
        let start = y * self.layout.stride as usize;
        let row = &self.data[start..start + self.layout.row_bytes() as usize];
        decode_row(self.layout.sample, row, &mut out[..self.width() * self.channels()]);
    }
}

/// A writable image lent by the host, split into bands of rows that threads can fill apart.
pub struct ImageMut<'a> {
    pub layout: Layout,
    /// Added to every value before it is stored (0.5 for residuals in integer buffers).
    pub offset: f32,
    data: &'a mut [u8],
}

impl<'a> ImageMut<'a> {
    pub fn new(layout: Layout, offset: f32, data: &'a mut [u8]) -> ImageMut<'a> {
        assert!(data.len() as u64 >= layout.byte_len(), "buffer smaller than its layout");
        ImageMut { layout, offset, data }
    }
    pub fn width(&self) -> usize {
        self.layout.width as usize
    }
    pub fn height(&self) -> usize {
        self.layout.height as usize
    }
    pub fn write_row(&mut self, y: usize, values: &[f32]) {
        let start = y * self.layout.stride as usize;
        let row = &mut self.data[start..start + self.layout.row_bytes() as usize];
        encode_pixels(&self.layout, self.offset, values, row);
    }
    /// Disjoint bands of `rows` rows each (the last may be shorter), top to bottom.
    pub fn bands(&mut self, rows: usize) -> Vec<Band<'_>> {
        let rows = rows.max(1);
        let stride = self.layout.stride as usize;
        let len = self.layout.byte_len() as usize;
        self.data[..len]
            .chunks_mut(stride * rows)
            .enumerate()
            .map(|(i, data)| Band {
                y0: i * rows,
                rows: rows.min(self.layout.height as usize - i * rows),
                layout: self.layout,
                offset: self.offset,
                data,
            })
            .collect()
    }
}

/// Rows `y0 .. y0 + rows` of an output image.
pub struct Band<'a> {
    pub y0: usize,
    pub rows: usize,
    layout: Layout,
    offset: f32,
    data: &'a mut [u8],
}

impl Band<'_> {
    /// The layout and offset rows are stored with.
    pub fn format(&self) -> (&Layout, f32) {
        (&self.layout, self.offset)
    }
    /// Writes row `y0 + dy` from bytes already in the band's layout.
    pub fn copy_row_bytes(&mut self, dy: usize, bytes: &[u8]) {
        let start = dy * self.layout.stride as usize;
        self.data[start..start + self.layout.row_bytes() as usize].copy_from_slice(bytes);
    }
    /// Writes row `y0 + dy`.
    pub fn write_row(&mut self, dy: usize, values: &[f32]) {
        let start = dy * self.layout.stride as usize;
        let row = &mut self.data[start..start + self.layout.row_bytes() as usize];
        encode_pixels(&self.layout, self.offset, values, row);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_sample_type_round_trips() {
        let values = [0.0f32, 0.25, 0.5, 1.0];
        for s in [SampleType::U8, SampleType::U16, SampleType::F16, SampleType::F32] {
            let mut row = vec![0u8; 4 * s.bytes()];
            encode_row(s, 0.0, &values, &mut row);
            let mut back = [0f32; 4];
            decode_row(s, &row, &mut back);
            let tol = if s == SampleType::U8 { 0.5 / 255.0 + 1e-6 } else { 1e-4 };
            for (a, b) in values.iter().zip(back) {
                assert!((a - b).abs() <= tol, "{s:?}: {a} -> {b}");
            }
        }
    }

    #[test]
    fn integers_round_clamp_and_offset() {
        let mut row = [0u8; 4];
        encode_row(SampleType::U8, 0.0, &[-0.2, 1.3, 0.5 / 255.0, 0.49 / 255.0], &mut row);
        assert_eq!(row, [0, 255, 1, 0]);
        // A residual of −0.25 stored with offset 0.5 → 0.25 → 64 (63.75 rounds up).
        encode_row(SampleType::U8, 0.5, &[-0.25], &mut row[..1]);
        assert_eq!(row[0], 64);
    }

    #[test]
    fn residual_offset_spares_alpha() {
        let mut layout = Layout::tight(2, 1, 2, SampleType::U8);
        layout.alpha = true;
        let mut row = [0u8; 4];
        encode_pixels(&layout, 0.5, &[-0.5, 1.0, 0.25, 0.0], &mut row);
        assert_eq!(row, [0, 255, 191, 0]);
    }

    #[test]
    fn bands_cover_every_row_once() {
        let layout = Layout::tight(3, 7, 1, SampleType::U8);
        let mut data = vec![0u8; 21];
        let mut img = ImageMut::new(layout, 0.0, &mut data);
        let bands = img.bands(3);
        assert_eq!(bands.iter().map(|b| (b.y0, b.rows)).collect::<Vec<_>>(), [(0, 3), (3, 3), (6, 1)]);
        for mut b in bands {
            for dy in 0..b.rows {
                let v = (b.y0 + dy) as f32 / 255.0;
                b.write_row(dy, &[v, v, v]);
            }
        }
        assert_eq!(data.chunks(3).map(|r| r[0]).collect::<Vec<_>>(), [0, 1, 2, 3, 4, 5, 6]);
    }
}
