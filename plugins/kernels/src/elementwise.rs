//! The elementwise steps between the products, each one pass over memory with vectorised
//! exponentials: GroupNorm with its SiLU (statistics, then normalise, scale, shift and
//! activate in one write), and GEGLU (the value half times GELU of the gate half). As
//! separate tensor operations they were six to eight passes each, most with a fresh
//! allocation, and a scalar `expf`/`erff` per element.

use rayon::prelude::*;

use crate::simd::{exp_lanes, LANES};

/// PyTorch's GroupNorm of `x` `[batch, channels, pixels]` (biased variance over each group's
/// channels and pixels, statistics in f64), then the per-channel `weight` and `bias`, then
/// SiLU if `silu`.
#[allow(clippy::too_many_arguments)]
pub fn group_norm(
    x: &[f32],
    batch: usize,
    channels: usize,
    pixels: usize,
    groups: usize,
    eps: f64,
    weight: &[f32],
    bias: &[f32],
    silu: bool,
) -> Vec<f32> {
    assert_eq!(x.len(), batch * channels * pixels, "x's size");
    assert!(
        groups > 0 && channels.is_multiple_of(groups) && weight.len() == channels && bias.len() == channels
    );
    let group_len = channels / groups * pixels;
    let stats: Vec<(f64, f64)> = x.par_chunks(group_len.max(1)).map(mean_var).collect();
    let (mut scale, mut shift) = (
        Vec::with_capacity(batch * channels),
        Vec::with_capacity(batch * channels),
    );
    for b in 0..batch {
        for ch in 0..channels {
            let (mean, var) = stats[b * groups + ch / (channels / groups)];
            let s = weight[ch] as f64 / (var + eps).sqrt();
            scale.push(s as f32);
            shift.push((bias[ch] as f64 - mean * s) as f32);
        }
    }
    channel_affine(x, pixels, &scale, &shift, silu)
}

/// `x·scale + shift` per channel (`x` `[planes, pixels]`, `scale` and `shift` one a plane),
/// then SiLU if `silu`.
pub fn channel_affine(
    x: &[f32],
    pixels: usize,
    scale: &[f32],
    shift: &[f32],
    silu: bool,
) -> Vec<f32> {
    assert_eq!(x.len(), scale.len() * pixels, "x's size");
    assert_eq!(scale.len(), shift.len());
    let mut out = vec![0f32; x.len()];
    if pixels == 0 {
        return out;
    }
    // Planes in parallel, split further where there are few large ones (the VAE's 512² levels).
    let piece = pixels.div_ceil(pixels.div_ceil(1 << 16));
    out.par_chunks_mut(pixels)
        .zip(x.par_chunks(pixels))
        .zip(scale.par_iter().zip(shift))
        .for_each(|((dst, src), (&a, &b))| {
            dst.par_chunks_mut(piece)
                .zip(src.par_chunks(piece))
                .for_each(|(d, s)| affine_run(s, d, a, b, silu));
        });
    out
}

/// The mean and biased variance of `x`, in f64 (two passes: no cancellation).
fn mean_var(x: &[f32]) -> (f64, f64) {
    let n = x.len().max(1) as f64;
    let mean = sum_f64(x, 0.0, false) / n;
    (mean, sum_f64(x, mean, true) / n)
}

/// `Σ (x − centre)` or `Σ (x − centre)²` in f64, in lane-sized partial sums.
fn sum_f64(x: &[f32], centre: f64, square: bool) -> f64 {
    let mut total = 0f64;
    sum_lanes(x, centre, square, &mut total);
    total
}

multiversion! {
    fn sum_lanes(x: &[f32], centre: f64, square: bool, total: &mut f64) {
        let mut acc = [0f64; LANES];
        let mut chunks = x.chunks_exact(LANES);
        for c in &mut chunks {
            for i in 0..LANES {
                let d = c[i] as f64 - centre;
                acc[i] += if square { d * d } else { d };
            }
        }
        let mut t: f64 = acc.iter().sum();
        for &v in chunks.remainder() {
            let d = v as f64 - centre;
            t += if square { d * d } else { d };
        }
        *total = t;
    }
}

multiversion! {
    fn affine_run(src: &[f32], dst: &mut [f32], a: f32, b: f32, silu: bool) {
        let mut d = dst.chunks_exact_mut(LANES);
        let mut s = src.chunks_exact(LANES);
        for (dc, sc) in (&mut d).zip(&mut s) {
            let y: [f32; LANES] = std::array::from_fn(|i| sc[i] * a + b);
            let y = if silu {
                let e = exp_lanes(std::array::from_fn(|i| -y[i]));
                std::array::from_fn(|i| y[i] / (1.0 + e[i]))
            } else {
                y
            };
            dc.copy_from_slice(&y);
        }
        for (dv, &sv) in d.into_remainder().iter_mut().zip(s.remainder()) {
            let y = sv * a + b;
            *dv = if silu { y / (1.0 + (-y).exp()) } else { y };
        }
    }
}

/// GEGLU: `x` `[rows, 2·inner]` is value and gate halves per row; returns `[rows, inner]` of
/// `value · GELU(gate)` (the erf form, as diffusers' `GEGLU`).
pub fn geglu(x: &[f32], inner: usize) -> Vec<f32> {
    assert!(
        inner > 0 && x.len().is_multiple_of(2 * inner),
        "GEGLU's input is [rows, 2·inner]"
    );
    let mut out = vec![0f32; x.len() / 2];
    out.par_chunks_mut(inner)
        .zip(x.par_chunks(2 * inner))
        .for_each(|(dst, row)| {
            let (value, gate) = row.split_at(inner);
            geglu_run(value, gate, dst)
        });
    out
}

multiversion! {
    fn geglu_run(value: &[f32], gate: &[f32], dst: &mut [f32]) {
        let mut d = dst.chunks_exact_mut(LANES);
        let (mut v, mut g) = (value.chunks_exact(LANES), gate.chunks_exact(LANES));
        for ((dc, vc), gc) in (&mut d).zip(&mut v).zip(&mut g) {
            let x: [f32; LANES] = std::array::from_fn(|i| gc[i]);
            let e = erf_lanes(std::array::from_fn(|i| x[i] * std::f32::consts::FRAC_1_SQRT_2));
            let y: [f32; LANES] = std::array::from_fn(|i| vc[i] * 0.5 * x[i] * (1.0 + e[i]));
            dc.copy_from_slice(&y);
        }
        for ((dv, &vv), &gv) in d.into_remainder().iter_mut().zip(v.remainder()).zip(g.remainder()) {
            let e = erf_lanes([gv * std::f32::consts::FRAC_1_SQRT_2; LANES])[0];
            *dv = vv * 0.5 * gv * (1.0 + e);
        }
    }
}

/// `erf` of every lane: Abramowitz and Stegun 7.1.26 (absolute error under 1.5e-7, about
/// the spacing of f32 near 1).
#[inline(always)]
fn erf_lanes(x: [f32; LANES]) -> [f32; LANES] {
    let e = exp_lanes(std::array::from_fn(|i| -x[i] * x[i]));
    std::array::from_fn(|i| {
        let a = x[i].abs();
        let t = 1.0 / (1.0 + 0.327_591_1 * a);
        let p = ((((1.061_405_4 * t - 1.453_152_1) * t + 1.421_413_8) * t - 0.284_496_74) * t
            + 0.254_829_6)
            * t;
        let y = 1.0 - p * e[i];
        if x[i] < 0.0 {
            -y
        } else {
            y
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn noise(n: usize, seed: u64) -> Vec<f32> {
        crate::simd::noise(n, seed, -3.0, 8.0)
    }

    fn worst(a: &[f32], b: &[f64]) -> f64 {
        a.iter()
            .zip(b)
            .map(|(x, y)| (*x as f64 - y).abs())
            .fold(0.0, f64::max)
    }

    #[test]
    fn group_norm_and_silu_equal_the_definition() {
        let (batch, channels, pixels, groups) = (2, 6, 37, 3);
        let x = noise(batch * channels * pixels, 1);
        let weight = noise(channels, 2);
        let bias = noise(channels, 3);
        for silu in [false, true] {
            let mut want = vec![0f64; x.len()];
            for b in 0..batch {
                for g in 0..groups {
                    let per = channels / groups;
                    let part = &x[(b * channels + g * per) * pixels..][..per * pixels];
                    let mean = part.iter().map(|&v| v as f64).sum::<f64>() / part.len() as f64;
                    let var = part.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>()
                        / part.len() as f64;
                    for c in g * per..(g + 1) * per {
                        for p in 0..pixels {
                            let i = (b * channels + c) * pixels + p;
                            let y = (x[i] as f64 - mean) / (var + 1e-5).sqrt() * weight[c] as f64
                                + bias[c] as f64;
                            want[i] = if silu { y / (1.0 + (-y).exp()) } else { y };
                        }
                    }
                }
            }
            for level in [2u8, 1, 0] {
                crate::simd::MAX_LEVEL.store(level, std::sync::atomic::Ordering::Relaxed);
                let got = group_norm(
                    &x, batch, channels, pixels, groups, 1e-5, &weight, &bias, silu,
                );
                assert!(
                    worst(&got, &want) < 4e-6,
                    "silu {silu} level {level}: {}",
                    worst(&got, &want)
                );
            }
            crate::simd::MAX_LEVEL.store(2, std::sync::atomic::Ordering::Relaxed);
        }
    }

    #[test]
    fn geglu_equals_the_definition() {
        let (rows, inner) = (5, 21);
        let x = noise(rows * 2 * inner, 4);
        let erf = |v: f64| {
            // erf by its series (|v| ≤ 4 here: 60 terms reach f64's precision).
            let (mut term, mut sum) = (v, v);
            for n in 1..80 {
                term *= -v * v / n as f64;
                sum += term / (2 * n + 1) as f64;
            }
            sum * 2.0 / std::f64::consts::PI.sqrt()
        };
        let want: Vec<f64> = (0..rows)
            .flat_map(|r| {
                let row = &x[r * 2 * inner..][..2 * inner];
                (0..inner)
                    .map(move |j| (row[j] as f64, row[inner + j] as f64))
                    .collect::<Vec<_>>()
            })
            .map(|(v, g)| v * 0.5 * g * (1.0 + erf(g / 2f64.sqrt())))
            .collect();
        for level in [2u8, 1, 0] {
            crate::simd::MAX_LEVEL.store(level, std::sync::atomic::Ordering::Relaxed);
            let got = geglu(&x, inner);
            assert!(
                worst(&got, &want) < 3e-6,
                "level {level}: {}",
                worst(&got, &want)
            );
        }
        crate::simd::MAX_LEVEL.store(2, std::sync::atomic::Ordering::Relaxed);
    }
}
