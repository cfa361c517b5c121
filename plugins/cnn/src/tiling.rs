//! Overlapping tiles along one axis, with weights that cross-fade neighbours (raised cosine
//! over each overlap, summing to exactly 1), so a tile's borders, where zero padding makes the
//! network see less context, count little and no seam shows.

use std::f32::consts::PI;

#[derive(Clone, Debug, PartialEq)]
pub struct Window {
    pub start: usize,
    pub end: usize,
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
