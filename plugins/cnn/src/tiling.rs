//! Overlapping tiles along one axis, with weights that cross-fade neighbours (raised cosine
//! over each overlap, summing to exactly 1), so a tile's borders, where zero padding makes the
//! network see less context, count little and no seam shows.

use std::f32::consts::PI;

#[derive(Clone, Debug, PartialEq)]
pub struct Window {
    pub start: usize,
    pub end: usize,
}

/// Windows of at most `tile` covering `0..len`, neighbours overlapping by at least `overlap`.
pub fn windows(len: usize, tile: usize, overlap: usize) -> Vec<Window> {
    let tile = tile.max(overlap + 1).max(1);
    if len <= tile {
        return vec![Window { start: 0, end: len }];
    }
    let n = (len - overlap).div_ceil(tile - overlap);
    (0..n)
        .map(|i| {
            // Spread the starts evenly so every overlap is about the same size (≥ overlap).
            let start = ((i * (len - tile)) as f64 / (n - 1) as f64).round() as usize;
            Window { start, end: start + tile }
        })
        .collect()
}

/// The weight of window `i` at each of its output samples (`scale` per input sample).
pub fn weights(wins: &[Window], i: usize, scale: usize) -> Vec<f32> {
    let w = &wins[i];
    let n = (w.end - w.start) * scale;
    let mut out = vec![1f32; n];
    // Output sample k of this window sits at input coordinate start + (k + 0.5) / scale.
    let at = |k: usize| w.start as f32 + (k as f32 + 0.5) / scale as f32;
    if i > 0 {
        let (lo, hi) = (w.start as f32, wins[i - 1].end as f32);
        for (k, v) in out.iter_mut().enumerate() {
            *v *= ramp((at(k) - lo) / (hi - lo));
        }
    }
    if i + 1 < wins.len() {
        let (lo, hi) = (wins[i + 1].start as f32, w.end as f32);
        for (k, v) in out.iter_mut().enumerate() {
            *v *= 1.0 - ramp((at(k) - lo) / (hi - lo));
        }
    }
    out
}

/// 0 before the overlap, 1 after it, a raised cosine across it.
fn ramp(t: f32) -> f32 {
    let t = t.clamp(0.0, 1.0);
    0.5 - 0.5 * (PI * t).cos()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_cover_with_the_overlap() {
        assert_eq!(windows(100, 128, 16), [Window { start: 0, end: 100 }]);
        let w = windows(300, 128, 32);
        assert_eq!(w.first().unwrap().start, 0);
        assert_eq!(w.last().unwrap().end, 300);
        for pair in w.windows(2) {
            assert!(pair[0].end >= pair[1].start + 32, "{w:?}");
        }
    }

    #[test]
    fn weights_sum_to_one_everywhere() {
        for (len, tile, overlap) in [(300, 128, 32), (1000, 200, 48), (129, 128, 8)] {
            let wins = windows(len, tile, overlap);
            let mut sum = vec![0f32; len * 4];
            for i in 0..wins.len() {
                for (k, v) in weights(&wins, i, 4).into_iter().enumerate() {
                    sum[wins[i].start * 4 + k] += v;
                }
            }
            assert!(sum.iter().all(|s| (s - 1.0).abs() < 1e-5), "{len} {tile} {overlap}");
        }
    }
}
