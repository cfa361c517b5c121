//! Separable resampling with Pillow's conventions (pixel centres at +0.5, kernels truncated at
//! the image edge and renormalised), so `base` equals the PIL bicubic image that PiSA-SR-style
//! pipelines start from. Filters: Keys bicubic with a = −0.5 (support 2) and Lanczos-3.

use std::f64::consts::PI;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Filter {
    Bicubic,
    Lanczos3,
}

impl Filter {
    pub fn parse(name: &str) -> Option<Filter> {
        match name {
            "bicubic" => Some(Filter::Bicubic),
            "lanczos3" => Some(Filter::Lanczos3),
            _ => None,
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            Filter::Bicubic => "bicubic",
            Filter::Lanczos3 => "lanczos3",
        }
    }
    fn support(self) -> f64 {
        match self {
            Filter::Bicubic => 2.0,
            Filter::Lanczos3 => 3.0,
        }
    }
    pub fn weight(self, x: f64) -> f64 {
        match self {
            Filter::Bicubic => {
                const A: f64 = -0.5;
                let x = x.abs();
                if x < 1.0 {
                    ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
                } else if x < 2.0 {
                    (((x - 5.0) * x + 8.0) * x - 4.0) * A
                } else {
                    0.0
                }
            }
            Filter::Lanczos3 => {
                if (-3.0..3.0).contains(&x) {
                    sinc(x) * sinc(x / 3.0)
                } else {
                    0.0
                }
            }
        }
    }
}

fn sinc(x: f64) -> f64 {
    if x == 0.0 {
        1.0
    } else {
        (PI * x).sin() / (PI * x)
    }
}

/// For each output position along one axis: the first input index and the weights of the
/// contiguous input samples it reads.
#[derive(Clone, Debug)]
pub struct Taps {
    pub start: Vec<usize>,
    pub weights: Vec<Vec<f32>>,
}

impl Taps {
    pub fn new(filter: Filter, in_len: usize, out_len: usize) -> Taps {
        let scale = in_len as f64 / out_len as f64;
        let filterscale = scale.max(1.0);
        let support = filter.support() * filterscale;
        let mut start = Vec::with_capacity(out_len);
        let mut weights = Vec::with_capacity(out_len);
        for xx in 0..out_len {
            let center = (xx as f64 + 0.5) * scale;
            // Pillow truncates toward zero here (C's (int) cast), then clamps.
            let xmin = ((center - support + 0.5).trunc() as i64).max(0) as usize;
            let xmax = ((center + support + 0.5).trunc() as i64).min(in_len as i64) as usize;
            let mut w: Vec<f64> = (xmin..xmax)
                .map(|x| filter.weight((x as f64 - center + 0.5) / filterscale))
                .collect();
            let sum: f64 = w.iter().sum();
            if sum != 0.0 {
                w.iter_mut().for_each(|v| *v /= sum);
            }
            start.push(xmin);
            weights.push(w.into_iter().map(|v| v as f32).collect());
        }
        Taps { start, weights }
    }

    /// The input range that output positions `range` read.
    pub fn input_span(&self, range: std::ops::Range<usize>) -> std::ops::Range<usize> {
        let lo = range.clone().map(|i| self.start[i]).min().unwrap_or(0);
        let hi = range.map(|i| self.start[i] + self.weights[i].len()).max().unwrap_or(0);
        lo..hi
    }
}

/// Resamples one row of interleaved pixels (`channels` values each) along x.
pub fn resample_row(taps: &Taps, channels: usize, input: &[f32], out: &mut [f32]) {
    // A fixed channel count lets the compiler keep each pixel's sums in registers and unroll
    // the channel loop: about twice as fast as a runtime count.
    match channels {
        1 => resample_row_c::<1>(taps, input, out),
        2 => resample_row_c::<2>(taps, input, out),
        3 => resample_row_c::<3>(taps, input, out),
        4 => resample_row_c::<4>(taps, input, out),
        c => panic!("{c} channels"),
    }
}

fn resample_row_c<const C: usize>(taps: &Taps, input: &[f32], out: &mut [f32]) {
    for ((&s, w), o) in taps.start.iter().zip(&taps.weights).zip(out.chunks_exact_mut(C)) {
        let src = &input[s * C..(s + w.len()) * C];
        let mut acc = [0f32; C];
        for (&wk, px) in w.iter().zip(src.chunks_exact(C)) {
            for c in 0..C {
                acc[c] += px[c] * wk;
            }
        }
        o.copy_from_slice(&acc);
    }
}

/// Combines rows along y: `out = Σ w_k · rows[k]`.
pub fn blend_rows(weights: &[f32], rows: &[&[f32]], out: &mut [f32]) {
    out.fill(0.0);
    for (&w, row) in weights.iter().zip(rows) {
        for (o, &v) in out.iter_mut().zip(row.iter()) {
            *o += w * v;
        }
    }
}

/// An image in memory: interleaved f32, `width * channels` values a row.
#[derive(Clone, Debug, PartialEq)]
pub struct Planar {
    pub width: usize,
    pub height: usize,
    pub channels: usize,
    pub data: Vec<f32>,
}

/// Resamples a whole in-memory image to `out_w × out_h` (no alpha handling: every channel
/// alike). The tiled engine path and other engines' base/down-sampling share the same maths.
pub fn resize(img: &Planar, out_w: usize, out_h: usize, filter: Filter) -> Planar {
    let c = img.channels;
    let tx = Taps::new(filter, img.width, out_w);
    let ty = Taps::new(filter, img.height, out_h);
    let mut horiz = vec![0f32; img.height * out_w * c];
    for y in 0..img.height {
        resample_row(&tx, c, &img.data[y * img.width * c..(y + 1) * img.width * c], &mut horiz[y * out_w * c..(y + 1) * out_w * c]);
    }
    let mut data = vec![0f32; out_h * out_w * c];
    for yo in 0..out_h {
        let s = ty.start[yo];
        let rows: Vec<&[f32]> = (0..ty.weights[yo].len()).map(|k| &horiz[(s + k) * out_w * c..(s + k + 1) * out_w * c]).collect();
        blend_rows(&ty.weights[yo], &rows, &mut data[yo * out_w * c..(yo + 1) * out_w * c]);
    }
    Planar { width: out_w, height: out_h, channels: c, data }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernels_at_known_points() {
        // Keys a=−0.5: w(0)=1, w(1)=0, w(0.5)=0.5625, w(1.5)=−0.0625.
        let b = Filter::Bicubic;
        assert_eq!(b.weight(0.0), 1.0);
        assert_eq!(b.weight(1.0), 0.0);
        assert!((b.weight(0.5) - 0.5625).abs() < 1e-12);
        assert!((b.weight(-1.5) + 0.0625).abs() < 1e-12);
        assert_eq!(b.weight(2.0), 0.0);
        let l = Filter::Lanczos3;
        assert_eq!(l.weight(0.0), 1.0);
        assert!(l.weight(1.0).abs() < 1e-15 && l.weight(2.0).abs() < 1e-15);
        // sinc(0.5)·sinc(1/6) = (2/π)·(sin(π/6)/(π/6)) = (2/π)(3/π)
        assert!((l.weight(0.5) - 6.0 / (PI * PI)).abs() < 1e-12);
    }

    /// Hand-checked ×2 bicubic of a 1-D signal [0, 1, 0, 0], worked out on paper from Keys'
    /// kernel (a = −0.5). Output x sits at input coordinate (x + 0.5)/2 − 0.5.
    #[test]
    fn hand_checked_bicubic_x2() {
        let t = Taps::new(Filter::Bicubic, 4, 8);
        let mut out = [0f32; 8];
        resample_row(&t, 1, &[0.0, 1.0, 0.0, 0.0], &mut out);
        // Output 4 at 1.75: inputs 0..3 at distances 1.75, 0.75, 0.25, 1.25 → weights
        // −0.0234375, 0.2265625, 0.8671875, −0.0703125 (sum 1) → the value is input 1's weight.
        assert!((out[4] - 0.2265625).abs() < 1e-7, "{out:?}");
        // Output 2 at 0.75: input −1 (distance 1.75) lies outside, so the in-image weights
        // 0.2265625, 0.8671875, −0.0703125 (sum 1.0234375) are renormalised.
        assert!((out[2] - 0.8671875 / 1.0234375).abs() < 1e-7, "{out:?}");
        // Output 0 sits at input −0.25: taps 0..2 truncated at the edge and renormalised:
        // w(0.25)=0.8671875, w(1.25)=−0.0703125, w(2.25)=0 → (0·w0 + 1·w1)/(w0 + w1).
        let expect = -0.0703125 / (0.8671875 - 0.0703125);
        assert!((out[0] - expect).abs() < 1e-6, "{out:?}");
    }

    #[test]
    fn constants_stay_constant_and_scale_one_is_identity() {
        for f in [Filter::Bicubic, Filter::Lanczos3] {
            let img = Planar { width: 5, height: 4, channels: 2, data: vec![0.3; 40] };
            let up = resize(&img, 15, 12, f);
            assert!(up.data.iter().all(|v| (v - 0.3).abs() < 1e-6));
            let ramp = Planar { width: 6, height: 1, channels: 1, data: (0..6).map(|v| v as f32).collect() };
            assert_eq!(resize(&ramp, 6, 1, f).data, ramp.data);
        }
    }

    #[test]
    fn input_span_covers_taps() {
        let t = Taps::new(Filter::Lanczos3, 10, 40);
        assert_eq!(t.input_span(0..4), 0..4);
        assert_eq!(t.input_span(36..40), 6..10);
    }
}
