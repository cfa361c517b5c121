//! Colour correction of a decoded image against the bicubic image it started from (PiSA-SR's
//! `--align_method`), with statistics of the whole image, never of a tile, so tiles cannot
//! take different tints.

use crate::pipeline::Planes;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ColourFix {
    /// Per channel, the image's mean and standard deviation moved to the reference's.
    AdaIn,
    /// The image's high frequencies over the reference's low frequencies (5 levels).
    Wavelet,
    None,
}

impl ColourFix {
    pub fn parse(s: &str) -> Option<ColourFix> {
        match s {
            "adain" => Some(ColourFix::AdaIn),
            "wavelet" => Some(ColourFix::Wavelet),
            "none" => Some(ColourFix::None),
            _ => None,
        }
    }

    pub fn apply(self, x: &mut Planes, reference: &Planes) {
        match self {
            ColourFix::AdaIn => adain(x, reference),
            ColourFix::Wavelet => wavelet(x, reference),
            ColourFix::None => {}
        }
    }
}

/// Mean and `sqrt(unbiased variance + 1e-5)`, as PiSA-SR's `calc_mean_std`.
fn mean_std(v: &[f32]) -> (f64, f64) {
    let n = v.len() as f64;
    let mean = v.iter().map(|&x| x as f64).sum::<f64>() / n;
    let var = v.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / (n - 1.0).max(1.0);
    (mean, (var + 1e-5).sqrt())
}

pub fn adain(x: &mut Planes, reference: &Planes) {
    for ch in 0..3 {
        let (mx, sx) = mean_std(x.plane(ch));
        let (mr, sr) = mean_std(reference.plane(ch));
        for v in x.plane_mut(ch) {
            *v = (((*v as f64 - mx) / sx * sr + mr) as f32).clamp(0.0, 1.0);
        }
    }
}

/// One level of the wavelet: a 3×3 binomial blur with taps `radius` apart, edges replicated.
fn blur(p: &[f32], w: usize, h: usize, radius: usize) -> Vec<f32> {
    let k = [0.25f32, 0.5, 0.25];
    let r = radius as isize;
    let clamp = |v: isize, n: usize| v.clamp(0, n as isize - 1) as usize;
    let mut horiz = vec![0f32; w * h];
    for y in 0..h {
        for x in 0..w {
            horiz[y * w + x] = (0..3).map(|i| k[i] * p[y * w + clamp(x as isize + (i as isize - 1) * r, w)]).sum();
        }
    }
    let mut out = vec![0f32; w * h];
    for y in 0..h {
        for x in 0..w {
            out[y * w + x] = (0..3).map(|i| k[i] * horiz[clamp(y as isize + (i as isize - 1) * r, h) * w + x]).sum();
        }
    }
    out
}

/// (high, low): the sum of 5 levels' details and the last blur.
fn decompose(p: &[f32], w: usize, h: usize) -> (Vec<f32>, Vec<f32>) {
    let mut high = vec![0f32; p.len()];
    let mut image = p.to_vec();
    for level in 0..5 {
        let low = blur(&image, w, h, 1 << level);
        for ((hi, im), lo) in high.iter_mut().zip(&image).zip(&low) {
            *hi += im - lo;
        }
        image = low;
    }
    (high, image)
}

pub fn wavelet(x: &mut Planes, reference: &Planes) {
    let (w, h) = (x.width, x.height);
    for ch in 0..3 {
        let (high, _) = decompose(x.plane(ch), w, h);
        let (_, low) = decompose(reference.plane(ch), w, h);
        for ((v, hi), lo) in x.plane_mut(ch).iter_mut().zip(&high).zip(&low) {
            *v = (hi + lo).clamp(0.0, 1.0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn noise(w: usize, h: usize, seed: u32) -> Planes {
        let mut s = seed;
        let data = (0..3 * w * h)
            .map(|_| {
                s = s.wrapping_mul(1664525).wrapping_add(1013904223);
                (s >> 8) as f32 / (1u32 << 24) as f32
            })
            .collect();
        Planes { width: w, height: h, data }
    }

    #[test]
    fn adain_moves_the_statistics_to_the_reference() {
        // A reference narrower than [0, 1], so the clamp after the transfer changes nothing.
        let mut reference = noise(20, 10, 1);
        for v in &mut reference.data {
            *v = *v * 0.5 + 0.25;
        }
        let mut x = noise(20, 10, 2);
        for v in x.plane_mut(0) {
            *v = *v * 0.2 + 0.1;
        }
        adain(&mut x, &reference);
        for ch in 0..3 {
            let (a, b) = (mean_std(x.plane(ch)), mean_std(reference.plane(ch)));
            assert!((a.0 - b.0).abs() < 1e-3 && (a.1 - b.1).abs() < 1e-3, "{ch}: {a:?} {b:?}");
        }
    }

    #[test]
    fn wavelet_of_an_image_against_itself_is_the_image() {
        // high + low telescopes back to the input.
        let reference = noise(33, 17, 3);
        let mut x = reference.clone();
        wavelet(&mut x, &reference);
        let d = x.data.iter().zip(&reference.data).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(d < 1e-5, "{d}");
    }
}
