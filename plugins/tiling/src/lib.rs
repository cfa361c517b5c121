//! Tessera's one tiler: overlapping windows along one axis and the weights that blend them,
//! so a tile's borders, where zero padding makes a network see less context, count little and
//! no seam shows. Two blends: a raised cosine over each overlap (the cnn engine's: it sums to
//! exactly 1), and PiSA-SR's Gaussian over the whole window (σ = 0.1·size, normalised by the
//! sum of the weights where windows meet). An image tiles as the product of its two axes'.

use std::f32::consts::PI;

#[derive(Clone, Debug, PartialEq)]
pub struct Window {
    pub start: usize,
    pub end: usize,
}

impl Window {
    pub fn len(&self) -> usize {
        self.end - self.start
    }
    pub fn is_empty(&self) -> bool {
        self.end == self.start
    }
}

/// As few windows of at most `tile` as cover `0..len` with neighbours overlapping by at least
/// `overlap`, each only as large as that needs: full-size windows spread over the length
/// overlapped by up to a tile (1024 px in tiles of 512 took three, 1.5× the work; now three
/// of 374, 1.1×).
pub fn windows(len: usize, tile: usize, overlap: usize) -> Vec<Window> {
    let tile = tile.max(overlap + 1).max(1);
    if len <= tile {
        return vec![Window { start: 0, end: len }];
    }
    let n = (len - overlap).div_ceil(tile - overlap);
    // n·size ≥ len + (n − 1)·overlap, so with the starts spread evenly (rounded down) every
    // neighbour overlaps by at least `overlap`; n was chosen so that size ≤ tile.
    let size = (len + (n - 1) * overlap).div_ceil(n);
    (0..n)
        .map(|i| {
            let start = i * (len - size) / (n - 1);
            Window { start, end: start + size }
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

/// PiSA-SR's latent-tile weight along one axis of window `w`: a Gaussian centred on the
/// window with σ = 0.1·size (`research/reference-models.md` §2.1), computed for the window's own
/// size, so short windows (an image smaller than the tile) get a profile that fits them.
/// Callers divide by the sum of the weights at each sample.
pub fn gaussian(w: &Window) -> Vec<f32> {
    let n = w.end - w.start;
    let mid = (n as f64 - 1.0) / 2.0;
    let sigma = 0.1 * n as f64;
    (0..n).map(|i| (-(i as f64 - mid).powi(2) / (2.0 * sigma * sigma)).exp() as f32).collect()
}

/// `0..len` cut into as few nearly equal windows of at most `tile` as cover it, without
/// overlap: the cores of tiles that carry their context as a halo.
pub fn cores(len: usize, tile: usize) -> Vec<Window> {
    let n = len.div_ceil(tile.max(1)).max(1);
    (0..n).map(|i| Window { start: i * len / n, end: (i + 1) * len / n }).collect()
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
    fn windows_are_no_larger_than_they_need_be() {
        for len in 129..1200 {
            for (tile, overlap) in [(128, 32), (256, 48), (512, 48), (200, 8)] {
                let w = windows(len, tile, overlap);
                let size = w[0].end - w[0].start;
                assert!(w.iter().all(|x| x.end - x.start == size && size <= tile), "{len} {tile} {w:?}");
                assert_eq!((w[0].start, w.last().unwrap().end), (0, len), "{len} {tile} {w:?}");
                for pair in w.windows(2) {
                    assert!(pair[0].end >= pair[1].start + overlap, "{len} {tile} {w:?}");
                }
                // One pixel less per window and the overlaps would not fit.
                assert!(w.len() * (size - 1) < len + (w.len() - 1) * overlap, "{len} {tile} {w:?}");
            }
        }
        let w = windows(1024, 512, 48);
        assert_eq!((w.len(), w[0].end), (3, 374));
    }

    #[test]
    fn gaussian_is_centred_and_small_at_the_edges() {
        let g = gaussian(&Window { start: 10, end: 106 });
        assert_eq!(g.len(), 96);
        assert!((g[47] - g[48]).abs() < 1e-6 && g[47] > 0.99);
        assert!(g[0] < 1e-5 && (g[0] - g[95]).abs() < 1e-9);
    }

    #[test]
    fn cores_partition_the_axis() {
        for (len, tile) in [(1, 8), (100, 128), (300, 128), (1000, 224), (97, 32)] {
            let c = cores(len, tile);
            assert_eq!((c[0].start, c.last().unwrap().end), (0, len));
            assert!(c.windows(2).all(|p| p[0].end == p[1].start));
            assert!(c.iter().all(|w| w.end > w.start && w.end - w.start <= tile), "{len} {tile} {c:?}");
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
