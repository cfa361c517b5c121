//! Multi-head scaled dot-product attention on row-major activations, a block of queries at a
//! time: each block's scores (a few rows against every key) stay in cache, go through the
//! softmax in place and straight into the product with the values. Nothing image-sized is
//! allocated beyond the output, no head is copied out of the interleaved `[tokens, heads·d]`
//! layout (the products read it through strides), and the exponentials are vectorised — the
//! three costs of attention done as separate tensor operations (a fresh score matrix per
//! chunk, four transposed copies, a scalar `expf` per score).

use rayon::prelude::*;

use crate::simd::{exp_lanes, LANES};

/// The shapes of one attention call: `batch` items of `n_q` queries and `n_k` keys, `heads`
/// heads of `d` channels each, interleaved as `[tokens, heads·d]` (diffusers' layout).
#[derive(Clone, Copy, Debug)]
pub struct Shape {
    pub batch: usize,
    pub n_q: usize,
    pub n_k: usize,
    pub heads: usize,
    pub d: usize,
}

/// `softmax(scale·q·kᵀ)·v` per item and head: `q` `[batch, n_q, heads·d]`, `k` and `v`
/// `[batch, n_k, heads·d]`, all contiguous; returns `[batch, n_q, heads·d]`. Queries run in
/// blocks whose scores, one block per thread, stay within `score_bytes` (at least one row).
pub fn attention(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    s: Shape,
    scale: f32,
    score_bytes: usize,
) -> Vec<f32> {
    let inner = s.heads * s.d;
    assert_eq!(q.len(), s.batch * s.n_q * inner, "q's size");
    assert_eq!(k.len(), s.batch * s.n_k * inner, "k's size");
    assert_eq!(v.len(), s.batch * s.n_k * inner, "v's size");
    let mut out = vec![0f32; q.len()];
    if s.n_q == 0 || inner == 0 {
        return out;
    }
    let threads = rayon::current_num_threads().max(1);
    // 64 rows fill the GEMM's micro-kernel and keep a block of 4096 keys' scores at 1 MiB;
    // fewer where the budget or the count of queries (enough blocks for every thread) ask it.
    let by_budget = score_bytes / (threads * s.n_k.max(1) * 4);
    let by_threads = s.n_q.div_ceil(2 * threads).max(8);
    let block = 64.min(by_budget).min(by_threads).max(1);
    for b in 0..s.batch {
        let (qb, kb, vb) = (
            &q[b * s.n_q * inner..][..s.n_q * inner],
            &k[b * s.n_k * inner..][..s.n_k * inner],
            &v[b * s.n_k * inner..][..s.n_k * inner],
        );
        out[b * s.n_q * inner..][..s.n_q * inner]
            .par_chunks_mut(block * inner)
            .enumerate()
            .for_each(|(i, dst)| {
                let rows = dst.len() / inner;
                let mut scores = vec![0f32; rows * s.n_k];
                let mut sums = vec![0f32; rows];
                for h in 0..s.heads {
                    block_of_head(
                        &qb[i * block * inner + h * s.d..],
                        &kb[h * s.d..],
                        &vb[h * s.d..],
                        &mut dst[h * s.d..],
                        &mut scores,
                        &mut sums,
                        rows,
                        s,
                        scale,
                    );
                }
            });
    }
    out
}

/// One block of `rows` queries of one head: `q`, `k`, `v` and `dst` start at the head's first
/// channel of the block's first row; rows are `heads·d` apart.
#[allow(clippy::too_many_arguments)]
fn block_of_head(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    dst: &mut [f32],
    scores: &mut [f32],
    sums: &mut [f32],
    rows: usize,
    s: Shape,
    scale: f32,
) {
    let inner = (s.heads * s.d) as isize;
    let (n_k, d) = (s.n_k, s.d);
    // The furthest element each operand's strides reach, so the raw products stay in bounds.
    let last = |rows: usize| (rows - 1) * inner as usize + d;
    assert!(
        q.len() >= last(rows)
            && k.len() >= last(n_k)
            && v.len() >= last(n_k)
            && dst.len() >= last(rows)
    );
    assert!(scores.len() >= rows * n_k && sums.len() >= rows);
    // SAFETY: every operand holds the elements its sizes and strides reach (checked above);
    // `scores` and `dst` are `&mut` and alias nothing.
    unsafe {
        // scores [rows, n_k] = q [rows, d] · kᵀ [d, n_k] (kᵀ read through k's strides)
        gemm::gemm(
            rows,
            n_k,
            d,
            scores.as_mut_ptr(),
            1,
            n_k as isize,
            false,
            q.as_ptr(),
            1,
            inner,
            k.as_ptr(),
            inner,
            1,
            0.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
    for (row, sum) in scores[..rows * n_k].chunks_mut(n_k).zip(sums.iter_mut()) {
        exp_shifted(row, scale, sum);
    }
    // SAFETY: as above.
    unsafe {
        // dst [rows, d] = exp-scores [rows, n_k] · v [n_k, d]
        gemm::gemm(
            rows,
            d,
            n_k,
            dst.as_mut_ptr(),
            1,
            inner,
            false,
            scores.as_ptr(),
            1,
            n_k as isize,
            v.as_ptr(),
            1,
            inner,
            0.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
    for (r, sum) in sums[..rows].iter().enumerate() {
        let inv = 1.0 / sum;
        for x in &mut dst[r * inner as usize..][..d] {
            *x *= inv;
        }
    }
}

multiversion! {
    /// `row[j] = exp(scale·(row[j] − max))` and `sum` = their sum: the softmax's numerators,
    /// normalised after the product with the values (on `d` numbers a row, not `n_k`).
    fn exp_shifted(row: &mut [f32], scale: f32, sum: &mut f32) {
        let max = row.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
        let mut acc = [0f32; LANES];
        let mut chunks = row.chunks_exact_mut(LANES);
        for c in &mut chunks {
            let e = exp_lanes(std::array::from_fn(|i| scale * (c[i] - max)));
            c.copy_from_slice(&e);
            for i in 0..LANES {
                acc[i] += e[i];
            }
        }
        let mut total: f32 = acc.iter().sum();
        for x in chunks.into_remainder() {
            *x = (scale * (*x - max)).exp();
            total += *x;
        }
        *sum = total;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The same attention by the book: per head, scores, softmax over keys, weighted values.
    fn naive(q: &[f32], k: &[f32], v: &[f32], s: Shape, scale: f32) -> Vec<f32> {
        let inner = s.heads * s.d;
        let mut out = vec![0f32; q.len()];
        for b in 0..s.batch {
            for h in 0..s.heads {
                for i in 0..s.n_q {
                    let qi = &q[(b * s.n_q + i) * inner + h * s.d..][..s.d];
                    let sc: Vec<f64> = (0..s.n_k)
                        .map(|j| {
                            let kj = &k[(b * s.n_k + j) * inner + h * s.d..][..s.d];
                            scale as f64
                                * qi.iter()
                                    .zip(kj)
                                    .map(|(a, b)| *a as f64 * *b as f64)
                                    .sum::<f64>()
                        })
                        .collect();
                    let m = sc.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let e: Vec<f64> = sc.iter().map(|x| (x - m).exp()).collect();
                    let total: f64 = e.iter().sum();
                    for c in 0..s.d {
                        let o: f64 = (0..s.n_k)
                            .map(|j| e[j] * v[(b * s.n_k + j) * inner + h * s.d + c] as f64)
                            .sum();
                        out[(b * s.n_q + i) * inner + h * s.d + c] = (o / total) as f32;
                    }
                }
            }
        }
        out
    }

    fn noise(n: usize, seed: u64) -> Vec<f32> {
        crate::simd::noise(n, seed, -2.0, 4.0)
    }

    #[test]
    fn blocks_equal_attention_by_the_book() {
        // Odd sizes: a last block shorter than the rest, key counts that are not whole lanes.
        for (s, bytes) in [
            (
                Shape {
                    batch: 1,
                    n_q: 3,
                    n_k: 4,
                    heads: 1,
                    d: 2,
                },
                1 << 20,
            ),
            (
                Shape {
                    batch: 1,
                    n_q: 3,
                    n_k: 4,
                    heads: 2,
                    d: 2,
                },
                1 << 20,
            ),
            (
                Shape {
                    batch: 2,
                    n_q: 37,
                    n_k: 29,
                    heads: 3,
                    d: 5,
                },
                1 << 20,
            ),
            (
                Shape {
                    batch: 1,
                    n_q: 130,
                    n_k: 77,
                    heads: 2,
                    d: 8,
                },
                1,
            ),
            (
                Shape {
                    batch: 2,
                    n_q: 9,
                    n_k: 300,
                    heads: 1,
                    d: 16,
                },
                4000,
            ),
        ] {
            let inner = s.heads * s.d;
            let q = noise(s.batch * s.n_q * inner, 1);
            let k = noise(s.batch * s.n_k * inner, 2);
            let v = noise(s.batch * s.n_k * inner, 3);
            let scale = (s.d as f32).powf(-0.5);
            let want = naive(&q, &k, &v, s, scale);
            for level in [2u8, 1, 0] {
                crate::simd::MAX_LEVEL.store(level, std::sync::atomic::Ordering::Relaxed);
                let got = attention(&q, &k, &v, s, scale, bytes);
                let worst = got
                    .iter()
                    .zip(&want)
                    .map(|(a, b)| (a - b).abs())
                    .fold(0f32, f32::max);
                assert!(worst < 2e-6, "{s:?}, {bytes} bytes, level {level}: {worst}");
            }
            crate::simd::MAX_LEVEL.store(2, std::sync::atomic::Ordering::Relaxed);
        }
    }
}
