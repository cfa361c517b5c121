//! Pixel buffer layouts and the limits checked before any buffer is allocated.

use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, Clone, Copy, PartialEq, Eq, Debug, Hash)]
#[serde(rename_all = "lowercase")]
pub enum SampleType {
    U8,
    U16,
    F16,
    F32,
}

impl SampleType {
    pub fn bytes(self) -> usize {
        match self {
            SampleType::U8 => 1,
            SampleType::U16 | SampleType::F16 => 2,
            SampleType::F32 => 4,
        }
    }
    pub fn is_integer(self) -> bool {
        matches!(self, SampleType::U8 | SampleType::U16)
    }
}

/// How sample values map to light. Engines work on the values as given; the tag travels so
/// adapters can put results back in the document's own space.
#[derive(Serialize, Deserialize, Clone, Copy, PartialEq, Eq, Debug, Default, Hash)]
#[serde(rename_all = "lowercase")]
pub enum ColorEncoding {
    /// sRGB transfer curve ("perceptual", "non-linear").
    #[default]
    Srgb,
    Linear,
}

/// The layout of one buffer: interleaved channels, rows `stride` bytes apart, native-endian
/// samples (all supported platforms are little-endian). With `alpha`, the last channel is
/// straight (not premultiplied) alpha.
#[derive(Serialize, Deserialize, Clone, Copy, PartialEq, Eq, Debug)]
pub struct Layout {
    pub width: u32,
    pub height: u32,
    pub channels: u8,
    pub sample: SampleType,
    /// Bytes from the start of one row to the next.
    pub stride: u64,
    #[serde(default)]
    pub encoding: ColorEncoding,
    #[serde(default)]
    pub alpha: bool,
}

/// What a client asks for in `alloc`: a layout whose stride may be left out (tightly packed).
#[derive(Serialize, Deserialize, Clone, Copy, PartialEq, Eq, Debug)]
pub struct LayoutRequest {
    pub width: u32,
    pub height: u32,
    pub channels: u8,
    pub sample: SampleType,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stride: Option<u64>,
    #[serde(default)]
    pub encoding: ColorEncoding,
    #[serde(default)]
    pub alpha: bool,
}

impl LayoutRequest {
    /// Checks the request against `limits` and returns the concrete layout. Nothing is allocated.
    pub fn resolve(&self, limits: &Limits) -> Result<Layout, LayoutError> {
        let layout = Layout {
            width: self.width,
            height: self.height,
            channels: self.channels,
            sample: self.sample,
            stride: self
                .stride
                .unwrap_or(self.width as u64 * self.channels as u64 * self.sample.bytes() as u64),
            encoding: self.encoding,
            alpha: self.alpha,
        };
        layout.validate(limits)?;
        Ok(layout)
    }
}

impl Layout {
    pub fn tight(width: u32, height: u32, channels: u8, sample: SampleType) -> Layout {
        Layout {
            width,
            height,
            channels,
            sample,
            stride: width as u64 * channels as u64 * sample.bytes() as u64,
            encoding: ColorEncoding::Srgb,
            alpha: channels == 2 || channels == 4,
        }
    }

    /// Bytes of one row's pixels (without stride padding).
    pub fn row_bytes(&self) -> u64 {
        self.width as u64 * self.channels as u64 * self.sample.bytes() as u64
    }

    /// Bytes the buffer must hold: every row's stride but the last, which needs only its pixels.
    pub fn byte_len(&self) -> u64 {
        if self.height == 0 {
            return 0;
        }
        self.stride * (self.height as u64 - 1) + self.row_bytes()
    }

    pub fn pixels(&self) -> u64 {
        self.width as u64 * self.height as u64
    }

    /// Channels that carry colour (all but alpha).
    pub fn color_channels(&self) -> usize {
        self.channels as usize - self.alpha as usize
    }

    /// The same layout `scale` times larger, tightly packed, with another sample type.
    pub fn scaled(&self, scale: u32, sample: SampleType) -> Layout {
        let mut l = Layout::tight(self.width * scale, self.height * scale, self.channels, sample);
        l.encoding = self.encoding;
        l.alpha = self.alpha;
        l
    }

    pub fn validate(&self, limits: &Limits) -> Result<(), LayoutError> {
        if self.width == 0 || self.height == 0 {
            return Err(LayoutError::Empty { width: self.width, height: self.height });
        }
        if !(1..=4).contains(&self.channels) {
            return Err(LayoutError::Channels(self.channels));
        }
        if self.alpha && !(self.channels == 2 || self.channels == 4) {
            return Err(LayoutError::AlphaChannels(self.channels));
        }
        if self.stride < self.row_bytes() {
            return Err(LayoutError::Stride { stride: self.stride, row_bytes: self.row_bytes() });
        }
        if !self.stride.is_multiple_of(self.sample.bytes() as u64) {
            return Err(LayoutError::StrideAlignment { stride: self.stride, sample: self.sample });
        }
        if self.width > limits.max_side || self.height > limits.max_side {
            return Err(LayoutError::TooWide {
                width: self.width,
                height: self.height,
                max: limits.max_side,
            });
        }
        if self.stride > limits.max_buffer_bytes {
            return Err(LayoutError::TooManyBytes { bytes: self.stride, max: limits.max_buffer_bytes });
        }
        if self.pixels() > limits.max_pixels {
            return Err(LayoutError::TooManyPixels { pixels: self.pixels(), max: limits.max_pixels });
        }
        if self.byte_len() > limits.max_buffer_bytes {
            return Err(LayoutError::TooManyBytes {
                bytes: self.byte_len(),
                max: limits.max_buffer_bytes,
            });
        }
        Ok(())
    }
}

/// Size limits for untrusted requests, in the manner of image-rs's `Limits`.
#[derive(Serialize, Deserialize, Clone, Copy, PartialEq, Eq, Debug)]
pub struct Limits {
    /// Largest width or height of any buffer, input or output.
    pub max_side: u32,
    pub max_pixels: u64,
    pub max_buffer_bytes: u64,
    /// All live buffers of one client together, results included.
    pub max_client_bytes: u64,
    /// Live buffers of one client, results included.
    pub max_client_buffers: u32,
    /// Jobs of one client queued or running at once.
    pub max_client_jobs: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_side: 65_536,
            max_pixels: 1 << 30,
            max_buffer_bytes: 8 << 30,
            max_client_bytes: 16 << 30,
            // Far above what an editor needs (a job holds four buffers), far below what
            // would slow the daemon for everyone else.
            max_client_buffers: 1024,
            max_client_jobs: 64,
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LayoutError {
    #[error("the buffer is empty ({width}×{height})")]
    Empty { width: u32, height: u32 },
    #[error("{0} channels: 1 (grey), 2 (grey + alpha), 3 (RGB) or 4 (RGBA) are supported")]
    Channels(u8),
    #[error("alpha needs 2 or 4 channels, not {0}")]
    AlphaChannels(u8),
    #[error("stride {stride} is smaller than a row's {row_bytes} bytes")]
    Stride { stride: u64, row_bytes: u64 },
    #[error("stride {stride} is not a multiple of the {sample:?} sample size")]
    StrideAlignment { stride: u64, sample: SampleType },
    #[error("{width}×{height} is larger than the limit of {max} pixels a side")]
    TooWide { width: u32, height: u32, max: u32 },
    #[error("{pixels} pixels is more than the limit of {max}")]
    TooManyPixels { pixels: u64, max: u64 },
    #[error("{bytes} bytes is more than the limit of {max} bytes per buffer")]
    TooManyBytes { bytes: u64, max: u64 },
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(w: u32, h: u32, c: u8, s: SampleType) -> LayoutRequest {
        LayoutRequest {
            width: w,
            height: h,
            channels: c,
            sample: s,
            stride: None,
            encoding: ColorEncoding::Srgb,
            alpha: false,
        }
    }

    #[test]
    fn tight_stride_and_byte_len() {
        let l = req(3, 2, 4, SampleType::F32).resolve(&Limits::default()).unwrap();
        assert_eq!(l.stride, 48);
        assert_eq!(l.byte_len(), 96);
        let mut r = req(3, 2, 3, SampleType::U8);
        r.stride = Some(12);
        assert_eq!(r.resolve(&Limits::default()).unwrap().byte_len(), 12 + 9);
    }

    #[test]
    fn refusals() {
        let lim = Limits::default();
        assert!(matches!(req(0, 5, 3, SampleType::U8).resolve(&lim), Err(LayoutError::Empty { .. })));
        assert_eq!(req(4, 4, 5, SampleType::U8).resolve(&lim), Err(LayoutError::Channels(5)));
        let mut a = req(4, 4, 3, SampleType::U8);
        a.alpha = true;
        assert_eq!(a.resolve(&lim), Err(LayoutError::AlphaChannels(3)));
        let mut s = req(4, 4, 3, SampleType::U16);
        s.stride = Some(25);
        assert!(matches!(s.resolve(&lim), Err(LayoutError::StrideAlignment { .. })));
        s.stride = Some(8);
        assert!(matches!(s.resolve(&lim), Err(LayoutError::Stride { .. })));
        // Overflow-proof: u32::MAX sides are refused by the side limit, not by arithmetic.
        assert!(matches!(
            req(u32::MAX, u32::MAX, 4, SampleType::F32).resolve(&lim),
            Err(LayoutError::TooWide { .. })
        ));
        let small = Limits { max_buffer_bytes: 100, ..lim };
        assert!(matches!(
            req(10, 10, 4, SampleType::U8).resolve(&small),
            Err(LayoutError::TooManyBytes { .. })
        ));
    }
}
