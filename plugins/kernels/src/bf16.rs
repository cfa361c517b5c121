//! Matrix products with bf16 weights and f32 activations, results and sums.
//!
//! A weight matrix (`[n, k]`, PyTorch's `Linear` layout) is rounded to bf16 once and packed
//! in panels of [`NR`] output columns whose pairs of consecutive `k` share a 32-bit word: the
//! operand layout of AVX512_BF16's `vdpbf16ps`, which multiplies 16 such pairs by one
//! broadcast pair of the activations and adds both products into 16 f32 sums, twice the
//! products of an f32 FMA per instruction. Activations are rounded to bf16 as they are packed
//! (once a block of rows), sums stay f32. Halving the weights' bytes is the other gain: they
//! are most of a UNet's memory and of its traffic at small batches.
//!
//! What it costs in accuracy: each factor keeps 8 significant bits (relative rounding up to
//! 2⁻⁸ ≈ 4e-3), so each product is off by up to about 8e-3 of itself; over a sum of `k`
//! products those errors mostly cancel, growing as √k times a term's. That is far above
//! f32's rounding, which is why the engines use it only as an option that says so.
//!
//! Three kernels run the same packed data, chosen at run time ([`Kernel::best`]): AMX tiles
//! where the CPU and OS have them (Intel Xeon from Sapphire Rapids on: 16 × 16 sums of 32
//! products an instruction), `vdpbf16ps`, and f32 FMAs on the widened values (bf16 widens to
//! f32 exactly) on any CPU. Their results agree to f32 rounding of the sums.

use rayon::prelude::*;

/// Output columns a packed panel holds: two vectors of 16 f32 sums.
pub const NR: usize = 32;
/// Rows of activations the kernel keeps in registers (12 × 2 vectors of sums).
const MR: usize = 12;
/// Pairs of `k` a pass over a panel takes: its slice of the panel (`KC · NR · 4` bytes,
/// 24 KiB) stays in L1 while the rows of a block go by.
const KC: usize = 192;
/// Rows of activations a task packs and runs (`MC · KC · 4` bytes = 72 KiB of L2).
const MC: usize = 96;
/// Pairs of `k` a panel is padded to a multiple of: one AMX tile's 16 rows (32 `k`).
const PAIR_STEP: usize = 16;

/// The pairs of `k` a packed panel holds: `k / 2` rounded up to whole AMX tiles (zeros).
fn padded_pairs(k: usize) -> usize {
    k.div_ceil(2 * PAIR_STEP) * PAIR_STEP
}

/// `x` rounded to the nearest bf16 (ties to even); NaN stays NaN.
#[inline(always)]
pub fn to_bf16(x: f32) -> u16 {
    let bits = x.to_bits();
    if x.is_nan() {
        return ((bits >> 16) | 0x40) as u16;
    }
    ((bits + 0x7fff + ((bits >> 16) & 1)) >> 16) as u16
}

/// The f32 a bf16 stands for (exact).
#[inline(always)]
pub fn from_bf16(b: u16) -> f32 {
    f32::from_bits((b as u32) << 16)
}

/// A weight matrix `[n, k]` in bf16, packed for [`matmul`].
#[derive(Clone, Debug)]
pub struct Bf16Matrix {
    n: usize,
    k: usize,
    /// Panels of NR columns: `[n / NR][padded_pairs(k)][NR]` words, each
    /// `(w[c][2p], w[c][2p + 1])` as (low, high) bf16: both the `vdpbf16ps` operand and AMX's
    /// B tile (16 pairs by 16 columns, rows 128 bytes apart). Past `n` and `k`: zeros.
    data: Vec<u32>,
}

impl Bf16Matrix {
    /// Packs `w`, `n` rows of `k` (row-major), rounding each value to bf16.
    pub fn from_rows(w: &[f32], n: usize, k: usize) -> Bf16Matrix {
        assert_eq!(w.len(), n * k, "a {n}×{k} matrix");
        let pairs = padded_pairs(k);
        let mut data = vec![0u32; n.div_ceil(NR) * pairs * NR];
        data.par_chunks_mut(pairs * NR).enumerate().for_each(|(panel, out)| {
            for c in 0..NR.min(n - panel * NR) {
                let row = &w[(panel * NR + c) * k..][..k];
                for p in 0..k.div_ceil(2) {
                    let lo = to_bf16(row[2 * p]) as u32;
                    let hi = if 2 * p + 1 < k { to_bf16(row[2 * p + 1]) as u32 } else { 0 };
                    out[p * NR + c] = lo | (hi << 16);
                }
            }
        });
        Bf16Matrix { n, k, data }
    }

    /// Output columns (PyTorch's `out_features`).
    pub fn n(&self) -> usize {
        self.n
    }

    /// Inputs a column sums over (`in_features`).
    pub fn k(&self) -> usize {
        self.k
    }

    /// Bytes the packed weights take.
    pub fn bytes(&self) -> usize {
        self.data.len() * 4
    }

    /// The matrix back as f32 rows (the bf16 values, exactly).
    pub fn to_rows(&self) -> Vec<f32> {
        let pairs = padded_pairs(self.k);
        let mut w = vec![0f32; self.n * self.k];
        w.par_chunks_mut(self.k).enumerate().for_each(|(r, row)| {
            let panel = &self.data[(r / NR) * pairs * NR..];
            for (i, v) in row.iter_mut().enumerate() {
                let word = panel[(i / 2) * NR + r % NR];
                *v = from_bf16((word >> (16 * (i % 2))) as u16);
            }
        });
        w
    }
}

/// The instructions a product runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kernel {
    /// AMX tiles (`tdpbf16ps`: 16 × 16 sums of 32 products an instruction; Intel Xeon from
    /// Sapphire Rapids on).
    Amx,
    /// AVX512_BF16's `vdpbf16ps` (16 sums of 2 products an instruction).
    Avx512Bf16,
    /// f32 FMAs on the widened values (any CPU).
    F32,
}

impl Kernel {
    /// Every kernel, fastest first.
    pub const ALL: [Kernel; 3] = [Kernel::Amx, Kernel::Avx512Bf16, Kernel::F32];

    /// The fastest kernel this CPU and OS run (found once).
    pub fn best() -> Kernel {
        static BEST: std::sync::OnceLock<Kernel> = std::sync::OnceLock::new();
        *BEST.get_or_init(|| {
            if amx::available() {
                Kernel::Amx
            } else if Kernel::Avx512Bf16.runs_here() {
                Kernel::Avx512Bf16
            } else {
                Kernel::F32
            }
        })
    }

    /// Whether this machine runs the kernel.
    pub fn runs_here(self) -> bool {
        match self {
            Kernel::Amx => amx::available(),
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx512Bf16 => std::arch::is_x86_feature_detected!("avx512f") && std::arch::is_x86_feature_detected!("avx512bf16"),
            #[cfg(not(target_arch = "x86_64"))]
            Kernel::Avx512Bf16 => false,
            Kernel::F32 => true,
        }
    }

    /// Its name in logs and benchmarks.
    pub fn name(self) -> &'static str {
        match self {
            Kernel::Amx => "AMX (tdpbf16ps)",
            Kernel::Avx512Bf16 => "AVX512_BF16 (vdpbf16ps)",
            Kernel::F32 => "f32 FMAs on widened bf16",
        }
    }
}

/// `x · wᵀ (+ bias)`: `x` is `m` rows of `w.k()`, the result `m` rows of `w.n()`.
pub fn matmul(x: &[f32], m: usize, w: &Bf16Matrix, bias: Option<&[f32]>) -> Vec<f32> {
    matmul_with(x, m, w, bias, Kernel::best())
}

/// [`matmul`] on a kernel the caller picks (one that [`Kernel::runs_here`]; tests run each).
pub fn matmul_with(x: &[f32], m: usize, w: &Bf16Matrix, bias: Option<&[f32]>, kernel: Kernel) -> Vec<f32> {
    let mut y = vec![0f32; m * w.n];
    matmul_into(x, m, w, bias, kernel, &mut y);
    y
}

/// [`matmul_with`] into `y` (`m` rows of `w.n()`), overwriting it.
pub fn matmul_into(x: &[f32], m: usize, w: &Bf16Matrix, bias: Option<&[f32]>, kernel: Kernel, y: &mut [f32]) {
    assert!(kernel.runs_here(), "{} does not run on this machine", kernel.name());
    let (n, k) = (w.n, w.k);
    assert_eq!(x.len(), m * k, "{m} rows of {k}");
    assert_eq!(y.len(), m * n, "{m} rows of {n}");
    match bias {
        Some(b) => {
            assert_eq!(b.len(), n, "a bias of {n}");
            y.par_chunks_mut(n).for_each(|row| row.copy_from_slice(b));
        }
        None => y.par_iter_mut().for_each(|v| *v = 0.0),
    }
    if m == 0 || n == 0 {
        return;
    }
    let panels = n.div_ceil(NR);
    let blocks = m.div_ceil(MC);
    // Enough tasks for every thread; a task is a block of rows by a run of panels.
    let threads = rayon::current_num_threads().max(1);
    let runs = (2 * threads).div_ceil(blocks).clamp(1, panels);
    let per_run = panels.div_ceil(runs);
    let out = SharedOut(y.as_mut_ptr());
    (0..blocks * runs).into_par_iter().for_each(|task| {
        let (block, run) = (task / runs, task % runs);
        let rows = block * MC..(block * MC + MC).min(m);
        let cols = run * per_run..((run + 1) * per_run).min(panels);
        if cols.is_empty() {
            return;
        }
        match kernel {
            Kernel::Amx => amx::block_product(x, k, rows, w, cols, &out),
            _ => block_product(x, k, rows, w, cols, &out, kernel == Kernel::Avx512Bf16),
        }
    });
}

/// The shape of a 2-D convolution on one NCHW image.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConvShape {
    pub channels: usize,
    pub height: usize,
    pub width: usize,
    pub kernel: usize,
    pub stride: usize,
    pub padding: usize,
}

impl ConvShape {
    /// Output rows and columns.
    pub fn output(&self) -> (usize, usize) {
        let out = |n: usize| (n + 2 * self.padding - self.kernel) / self.stride + 1;
        (out(self.height), out(self.width))
    }
}

/// Convolution weights in bf16: `[out][tap][channel]` (taps row by row, channels padded with
/// zeros to a multiple of 32, one AMX tile row), packed as a [`Bf16Matrix`] over
/// `k² · padded channels` inputs. Both convolution paths read this layout.
#[derive(Clone, Debug)]
pub struct Bf16Conv {
    out: usize,
    channels: usize,
    kernel: usize,
    padded: usize,
    matrix: Bf16Matrix,
}

impl Bf16Conv {
    /// Packs PyTorch's OIHW weights `[out, channels, k, k]`, rounding each to bf16.
    pub fn from_oihw(w: &[f32], out: usize, channels: usize, kernel: usize) -> Bf16Conv {
        let taps = kernel * kernel;
        assert_eq!(w.len(), out * channels * taps, "{out}×{channels}×{kernel}² weights");
        let padded = channels.div_ceil(32) * 32;
        let mut rows = vec![0f32; out * taps * padded];
        rows.par_chunks_mut(taps * padded).enumerate().for_each(|(o, row)| {
            for ci in 0..channels {
                for t in 0..taps {
                    row[t * padded + ci] = w[(o * channels + ci) * taps + t];
                }
            }
        });
        Bf16Conv { out, channels, kernel, padded, matrix: Bf16Matrix::from_rows(&rows, out, taps * padded) }
    }

    /// The weights back in OIHW order as f32 (the bf16 values, exactly).
    pub fn to_oihw(&self) -> Vec<f32> {
        let taps = self.kernel * self.kernel;
        let rows = self.matrix.to_rows();
        let mut w = vec![0f32; self.out * self.channels * taps];
        w.par_chunks_mut(self.channels * taps).enumerate().for_each(|(o, out)| {
            for ci in 0..self.channels {
                for t in 0..taps {
                    out[ci * taps + t] = rows[(o * taps + t) * self.padded + ci];
                }
            }
        });
        w
    }

    /// Bytes the packed weights take.
    pub fn bytes(&self) -> usize {
        self.matrix.bytes()
    }
}

/// A convolution of one NCHW image `x` by `w` plus `bias`, in bands of output rows whose
/// working copies of the input stay within `bytes`. Returns `[out, ho, wo]`.
///
/// With AMX the tiles read the input straight from a channels-last bf16 copy of the band
/// (each tap's 16 output pixels are 16 rows of input pixels, `stride · channels` apart: an
/// implicit im2col); elsewhere the band is unfolded (im2col) and multiplied.
pub fn conv2d(x: &[f32], shape: ConvShape, w: &Bf16Conv, bias: &[f32], bytes: usize) -> Vec<f32> {
    conv2d_with(x, shape, w, bias, bytes, Kernel::best())
}

/// [`conv2d`] on a kernel the caller picks.
pub fn conv2d_with(x: &[f32], shape: ConvShape, w: &Bf16Conv, bias: &[f32], bytes: usize, kernel: Kernel) -> Vec<f32> {
    let ConvShape { channels: c, height: h, width: wd, kernel: k, padding, .. } = shape;
    assert_eq!(x.len(), c * h * wd, "a {c}×{h}×{wd} image");
    assert!(w.channels == c && w.kernel == k, "weights of {}×{}² for a {c}×{k}² convolution", w.channels, w.kernel);
    assert_eq!(bias.len(), w.out, "a bias of {}", w.out);
    assert!(h + 2 * padding >= k && wd + 2 * padding >= k, "a {k}×{k} kernel on a {h}×{wd} image");
    // Rows narrower than a tile's 32 pixels would leave tile rows idle (three quarters at 8
    // pixels): their unfolded input is small, and the product fills every tile.
    if kernel == Kernel::Amx && shape.output().1 >= 32 {
        assert!(kernel.runs_here(), "AMX does not run on this machine");
        amx::conv2d(x, shape, w, bias, bytes)
    } else {
        im2col_conv(x, shape, w, bias, bytes, kernel)
    }
}

fn im2col_conv(x: &[f32], shape: ConvShape, w: &Bf16Conv, bias: &[f32], bytes: usize, kernel: Kernel) -> Vec<f32> {
    let ConvShape { channels: c, height: h, width: wd, kernel: k, stride, padding } = shape;
    let (ho, wo) = shape.output();
    let o = w.out;
    let (cp, taps) = (w.padded, k * k * w.padded);
    let rows = (bytes / (4 * taps * wo).max(1)).clamp(1, ho);
    let mut out = vec![0f32; o * ho * wo];
    let mut unfolded = Vec::new();
    let mut product = Vec::new();
    for r0 in (0..ho).step_by(rows) {
        let r1 = (r0 + rows).min(ho);
        let pixels = (r1 - r0) * wo;
        unfolded.resize(pixels * taps, 0.0);
        unfolded.par_chunks_mut(wo * taps).enumerate().for_each(|(i, row)| {
            let oy = r0 + i;
            for (ox, px) in row.chunks_mut(taps).enumerate() {
                for ky in 0..k {
                    let iy = (oy * stride + ky) as isize - padding as isize;
                    for kx in 0..k {
                        let ix = (ox * stride + kx) as isize - padding as isize;
                        let inside = iy >= 0 && (iy as usize) < h && ix >= 0 && (ix as usize) < wd;
                        let tap = &mut px[(ky * k + kx) * cp..][..cp];
                        for (ci, v) in tap.iter_mut().enumerate() {
                            *v = if inside && ci < c { x[(ci * h + iy as usize) * wd + ix as usize] } else { 0.0 };
                        }
                    }
                }
            }
        });
        product.resize(pixels * o, 0.0);
        matmul_into(&unfolded, pixels, &w.matrix, Some(bias), kernel, &mut product);
        // [pixels, out] → the band of each output channel's plane.
        out.par_chunks_mut(ho * wo).enumerate().for_each(|(j, plane)| {
            for (p, v) in plane[r0 * wo..r1 * wo].iter_mut().enumerate() {
                *v = product[p * o + j];
            }
        });
    }
    out
}

/// The result matrix, written by tasks that each own a disjoint block of it.
struct SharedOut(*mut f32);
// SAFETY: tasks write disjoint (row block × panel run) tiles; see `block_product`.
unsafe impl Sync for SharedOut {}

impl SharedOut {
    /// The pointer (a method, so closures capture the whole `Sync` wrapper, not its field).
    fn ptr(&self) -> *mut f32 {
        self.0
    }
}

/// Adds rows `rows` of `x · wᵀ`, for the columns of panels `panels`, into the result.
fn block_product(x: &[f32], k: usize, rows: std::ops::Range<usize>, w: &Bf16Matrix, panels: std::ops::Range<usize>, out: &SharedOut, native: bool) {
    let pairs = padded_pairs(k);
    let groups = rows.len().div_ceil(MR);
    // The rows as bf16 pairs, MR rows a group: `[group][pair][MR]` (zeros past the ends).
    let mut a = vec![0u32; groups * pairs * MR];
    for (g, group) in a.chunks_mut(pairs * MR).enumerate() {
        for r in 0..MR.min(rows.len() - g * MR) {
            let row = &x[(rows.start + g * MR + r) * k..][..k];
            for p in 0..k.div_ceil(2) {
                let lo = to_bf16(row[2 * p]) as u32;
                let hi = if 2 * p + 1 < k { to_bf16(row[2 * p + 1]) as u32 } else { 0 };
                group[p * MR + r] = lo | (hi << 16);
            }
        }
    }
    let n = w.n;
    for p0 in (0..pairs).step_by(KC) {
        let kc = KC.min(pairs - p0);
        for panel in panels.clone() {
            let b = &w.data[(panel * pairs + p0) * NR..][..kc * NR];
            let cols = NR.min(n - panel * NR);
            for g in 0..groups {
                let a = &a[(g * pairs + p0) * MR..][..kc * MR];
                let r0 = rows.start + g * MR;
                let tile = Tile { ptr: out.0, ld: n, row: r0, col: panel * NR, rows: MR.min(rows.end - r0), cols };
                kernel(a, b, kc, &tile, native);
            }
        }
    }
}

/// Where a kernel call adds its `rows × cols` sums: `ptr[(row + r) · ld + col + c]`.
struct Tile {
    ptr: *mut f32,
    ld: usize,
    row: usize,
    col: usize,
    rows: usize,
    cols: usize,
}

impl Tile {
    /// Adds an MR × NR block of sums, its valid part.
    fn add(&self, sums: &[[f32; NR]; MR]) {
        for (r, s) in sums.iter().enumerate().take(self.rows) {
            // SAFETY: the tile lies inside the result (row + rows ≤ m, col + cols ≤ n) and
            // only this task writes it.
            let dst = unsafe { std::slice::from_raw_parts_mut(self.ptr.add((self.row + r) * self.ld + self.col), self.cols) };
            for (d, v) in dst.iter_mut().zip(s) {
                *d += v;
            }
        }
    }
}

fn kernel(a: &[u32], b: &[u32], kc: usize, tile: &Tile, native: bool) {
    #[cfg(target_arch = "x86_64")]
    if native {
        // SAFETY: `native` is only true where the CPU has AVX-512F and AVX512_BF16
        // (`matmul_with` checked `runs_here`); the slices hold kc pairs.
        return unsafe { kernel_avx512bf16(a, b, kc, tile) };
    }
    let _ = native;
    kernel_f32(a, b, kc, tile)
}

crate::multiversion! {
    /// The portable kernel: each bf16 widened to f32 (exact), then f32 FMAs.
    fn kernel_f32(a: &[u32], b: &[u32], kc: usize, tile: &Tile) {
        let mut sums = [[0f32; NR]; MR];
        for p in 0..kc {
            let bp: &[u32; NR] = b[p * NR..][..NR].try_into().expect("NR words");
            let lo: [f32; NR] = std::array::from_fn(|c| f32::from_bits(bp[c] << 16));
            let hi: [f32; NR] = std::array::from_fn(|c| f32::from_bits(bp[c] & 0xffff_0000));
            for (r, s) in sums.iter_mut().enumerate() {
                let word = a[p * MR + r];
                let (x0, x1) = (f32::from_bits(word << 16), f32::from_bits(word & 0xffff_0000));
                for c in 0..NR {
                    s[c] += x0 * lo[c] + x1 * hi[c];
                }
            }
        }
        tile.add(&sums);
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn kernel_avx512bf16(a: &[u32], b: &[u32], kc: usize, tile: &Tile) {
    use std::arch::x86_64::*;
    debug_assert!(a.len() >= kc * MR && b.len() >= kc * NR);
    let mut s0 = [_mm512_setzero_ps(); MR];
    let mut s1 = [_mm512_setzero_ps(); MR];
    let (ap, bp) = (a.as_ptr(), b.as_ptr());
    for p in 0..kc {
        // SAFETY: p < kc, so p·NR + 32 ≤ b.len() and p·MR + MR ≤ a.len().
        let b0: __m512bh = std::mem::transmute(_mm512_loadu_si512(bp.add(p * NR) as *const _));
        let b1: __m512bh = std::mem::transmute(_mm512_loadu_si512(bp.add(p * NR + 16) as *const _));
        for r in 0..MR {
            let x: __m512bh = std::mem::transmute(_mm512_set1_epi32(*ap.add(p * MR + r) as i32));
            s0[r] = _mm512_dpbf16_ps(s0[r], x, b0);
            s1[r] = _mm512_dpbf16_ps(s1[r], x, b1);
        }
    }
    if tile.rows == MR && tile.cols == NR {
        for r in 0..MR {
            let dst = tile.ptr.add((tile.row + r) * tile.ld + tile.col);
            _mm512_storeu_ps(dst, _mm512_add_ps(_mm512_loadu_ps(dst), s0[r]));
            _mm512_storeu_ps(dst.add(16), _mm512_add_ps(_mm512_loadu_ps(dst.add(16)), s1[r]));
        }
    } else {
        let mut sums = [[0f32; NR]; MR];
        for r in 0..MR {
            _mm512_storeu_ps(sums[r].as_mut_ptr(), s0[r]);
            _mm512_storeu_ps(sums[r].as_mut_ptr().add(16), s1[r]);
        }
        tile.add(&sums);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::simd::noise;

    /// `x · wᵀ + bias` in f64 from the bf16-rounded factors, and each sum's Σ|term|.
    fn reference(x: &[f32], m: usize, w: &[f32], n: usize, k: usize, bias: &[f32]) -> (Vec<f64>, Vec<f64>) {
        let r = |v: f32| from_bf16(to_bf16(v)) as f64;
        let mut y = vec![0f64; m * n];
        let mut mag = vec![0f64; m * n];
        for i in 0..m {
            for j in 0..n {
                let (mut s, mut a) = (bias[j] as f64, bias[j].abs() as f64);
                for p in 0..k {
                    let t = r(x[i * k + p]) * r(w[j * k + p]);
                    s += t;
                    a += t.abs();
                }
                y[i * n + j] = s;
                mag[i * n + j] = a;
            }
        }
        (y, mag)
    }

    #[test]
    fn rounding_is_to_nearest_even() {
        assert_eq!(to_bf16(1.0), 0x3f80);
        assert_eq!(from_bf16(to_bf16(1.0 + 1.0 / 256.0)), 1.0, "a tie goes to the even mantissa");
        assert_eq!(from_bf16(to_bf16(1.0 + 3.0 / 256.0)), 1.0 + 4.0 / 256.0);
        assert_eq!(from_bf16(to_bf16(-2.5)), -2.5);
        assert!(from_bf16(to_bf16(f32::NAN)).is_nan());
        assert_eq!(from_bf16(to_bf16(f32::INFINITY)), f32::INFINITY);
        let worst = noise(10_000, 3, -100.0, 200.0).into_iter().map(|v| ((from_bf16(to_bf16(v)) - v) / v).abs()).fold(0f32, f32::max);
        assert!(worst <= 1.0 / 256.0, "relative rounding {worst}");
    }

    #[test]
    fn packing_round_trips_the_bf16_values() {
        let (n, k) = (45, 7);
        let w = noise(n * k, 5, -1.0, 2.0);
        let packed = Bf16Matrix::from_rows(&w, n, k);
        let back = packed.to_rows();
        for (a, b) in w.iter().zip(&back) {
            assert_eq!(from_bf16(to_bf16(*a)), *b);
        }
        assert_eq!(packed.bytes(), 2 * NR * PAIR_STEP * 4);
    }

    #[test]
    fn products_equal_the_reference_on_every_kernel_and_edge() {
        // Sizes that leave partial row groups, partial panels, an odd k and several k blocks.
        for &(m, n, k) in &[(1, 1, 1), (13, 33, 5), (25, 64, 2 * KC + 3), (MC + 7, 3 * NR + 1, 40), (2 * MC, 2 * NR, 2 * KC)] {
            let x = noise(m * k, 11, -2.0, 4.0);
            let w = noise(n * k, 12, -1.0, 2.0);
            let bias = noise(n, 13, -1.0, 2.0);
            let packed = Bf16Matrix::from_rows(&w, n, k);
            let (want, mag) = reference(&x, m, &w, n, k, &bias);
            for kernel in [Kernel::F32, Kernel::Avx512Bf16, Kernel::Amx] {
                if !kernel.runs_here() {
                    eprintln!("{} does not run here: not tested", kernel.name());
                    continue;
                }
                let got = matmul_with(&x, m, &packed, Some(&bias), kernel);
                for i in 0..m * n {
                    let err = (got[i] as f64 - want[i]).abs();
                    assert!(err <= 1e-6 * mag[i] + 1e-30, "{m}×{n}×{k}, {kernel:?}, [{i}]: {} against {}", got[i], want[i]);
                }
            }
        }
    }

    #[test]
    fn convolutions_equal_the_direct_sum_in_any_band() {
        // Small, then two blocks of channels, a partial second group of 32 pixels, two panels.
        for (c, h, wd, o) in [(3, 9, 7, 5), (40, 6, 37, 35)] {
        let x = noise(c * h * wd, 21, -1.0, 2.0);
        for (k, stride, padding) in [(3, 1, 1), (3, 2, 0), (1, 1, 0), (3, 2, 1)] {
            let w = noise(o * c * k * k, 22, -1.0, 2.0);
            let bias = noise(o, 23, -1.0, 2.0);
            let shape = ConvShape { channels: c, height: h, width: wd, kernel: k, stride, padding };
            let (ho, wo) = shape.output();
            let packed = Bf16Conv::from_oihw(&w, o, c, k);
            let back = packed.to_oihw();
            assert!(w.iter().zip(&back).all(|(a, b)| from_bf16(to_bf16(*a)) == *b), "weights round-trip");
            let r = |v: f32| from_bf16(to_bf16(v)) as f64;
            for (kernel, bytes) in Kernel::ALL.into_iter().filter(|k| k.runs_here()).flat_map(|k| [(k, 1), (k, 500), (k, 1 << 20)]) {
                let got = conv2d_with(&x, shape, &packed, &bias, bytes, kernel);
                for j in 0..o {
                    for oy in 0..ho {
                        for ox in 0..wo {
                            let mut want = bias[j] as f64;
                            for ci in 0..c {
                                for ky in 0..k {
                                    for kx in 0..k {
                                        let (iy, ix) = ((oy * stride + ky) as isize - padding as isize, (ox * stride + kx) as isize - padding as isize);
                                        if iy >= 0 && (iy as usize) < h && ix >= 0 && (ix as usize) < wd {
                                            want += r(x[(ci * h + iy as usize) * wd + ix as usize]) * r(w[((j * c + ci) * k + ky) * k + kx]);
                                        }
                                    }
                                }
                            }
                            let got = got[(j * ho + oy) * wo + ox] as f64;
                            assert!((got - want).abs() < 1e-5, "{kernel:?} k {k} s {stride} p {padding} bytes {bytes} [{j},{oy},{ox}]: {got} against {want}");
                        }
                    }
                }
            }
        }
        }
    }

    #[test]
    fn no_bias_and_no_rows() {
        let w = Bf16Matrix::from_rows(&[1.0, 2.0, 3.0, 4.0], 2, 2);
        assert_eq!(matmul(&[1.0, 1.0], 1, &w, None), vec![3.0, 7.0]);
        assert!(matmul(&[], 0, &w, None).is_empty());
    }
}

/// The AMX path: tiles of 16 rows by 64 bytes, `tdpbf16ps` on four 16 × 16 tiles of sums
/// (32 rows by one panel's 32 columns) at a time.
#[cfg(target_arch = "x86_64")]
mod amx {
    use rayon::prelude::*;

    use super::{padded_pairs, to_bf16, Bf16Conv, Bf16Matrix, ConvShape, SharedOut, NR};

    /// Whether the CPU has AMX-BF16 and the OS lets this process use the tile data (Linux
    /// asks each process to request it: `arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)`).
    pub fn available() -> bool {
        static AVAILABLE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *AVAILABLE.get_or_init(|| {
            #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
            {
                let max = std::arch::x86_64::__cpuid(0).eax;
                if max < 7 {
                    return false;
                }
                let edx = std::arch::x86_64::__cpuid_count(7, 0).edx;
                let (amx_bf16, amx_tile) = (edx & (1 << 22) != 0, edx & (1 << 24) != 0);
                if !(amx_bf16 && amx_tile) || std::env::var_os("TESSERA_NO_AMX").is_some() {
                    return false;
                }
                const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
                const XFEATURE_XTILEDATA: libc::c_long = 18;
                // SAFETY: a request for a permission; it changes nothing else.
                unsafe { libc::syscall(libc::SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0 }
            }
            #[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
            {
                false
            }
        })
    }

    /// The direct convolution (see [`super::conv2d`]): per band of output rows, the input
    /// rows it reads in bf16, channels-last, zero-padded; per output row, 32 pixels by one
    /// panel's 32 channels at a time, summed over taps and blocks of 32 channels in tiles.
    pub fn conv2d(x: &[f32], shape: ConvShape, w: &Bf16Conv, bias: &[f32], bytes: usize) -> Vec<f32> {
        let ConvShape { channels: c, height: h, width: wd, kernel: k, stride: s, padding: pad } = shape;
        let (ho, wo) = shape.output();
        let (o, cp) = (w.out, w.padded);
        let wp = wd + 2 * pad;
        let pairs = padded_pairs(k * k * cp);
        let panels = o.div_ceil(NR);
        // Output rows a band: its input rows' copy within `bytes`.
        let row_bytes = wp * cp * 2 * s;
        let band = (bytes / row_bytes.max(1)).clamp(1, ho);
        let mut out = vec![0f32; o * ho * wo];
        let shared = SharedOut(out.as_mut_ptr());
        let mut xp: Vec<u16> = Vec::new();
        for r0 in (0..ho).step_by(band) {
            let r1 = (r0 + band).min(ho);
            // Padded input rows r0·s .. (r1 − 1)·s + k; a tile past the last pixel of a row
            // reads on into the next (its sums are dropped), so one row and 32 pixels spare.
            let (y0, y1) = (r0 * s, (r1 - 1) * s + k);
            let spare = (32 * s + k) * cp;
            xp.clear();
            xp.resize((y1 - y0) * wp * cp + spare, 0);
            xp[..(y1 - y0) * wp * cp].par_chunks_mut(wp * cp).enumerate().for_each(|(i, row)| {
                let iy = (y0 + i) as isize - pad as isize;
                if iy < 0 || iy as usize >= h {
                    return;
                }
                for ci in 0..c {
                    let src = &x[(ci * h + iy as usize) * wd..][..wd];
                    for (ix, v) in src.iter().enumerate() {
                        row[(ix + pad) * cp + ci] = to_bf16(*v);
                    }
                }
            });
            let xp = &xp;
            (r0..r1).into_par_iter().for_each(|oy| {
                let mut sums = Sums([0f32; ROWS * NR]);
                // SAFETY: AMX is available (conv2d_with checked it).
                let _tiles = unsafe { Tiles::configure() };
                for panel in 0..panels {
                    let b = w.matrix.data[panel * pairs * NR..].as_ptr();
                    let cols = NR.min(o - panel * NR);
                    for ox0 in (0..wo).step_by(ROWS) {
                        let corner = ((oy * s - y0) * wp + ox0 * s) * cp;
                        // SAFETY: every tile row read lies in `xp` (its spare covers the last
                        // pixels' overrun), `b` holds the panel's `pairs` pairs.
                        unsafe {
                            zero();
                            for ky in 0..k {
                                for kx in 0..k {
                                    let tap = ky * k + kx;
                                    let a = xp.as_ptr().add(corner + (ky * wp + kx) * cp);
                                    let bt = b.add(tap * (cp / 2) * NR);
                                    accumulate(a, s * cp * 2, bt, cp / 32);
                                }
                            }
                            store(sums.0.as_mut_ptr(), NR * 4);
                        }
                        let valid = ROWS.min(wo - ox0);
                        for j in 0..cols {
                            let oc = panel * NR + j;
                            // SAFETY: rows oy of every channel belong to this task alone.
                            let dst = unsafe { std::slice::from_raw_parts_mut(shared.ptr().add((oc * ho + oy) * wo + ox0), valid) };
                            for (p, d) in dst.iter_mut().enumerate() {
                                *d = sums.0[p * NR + j] + bias[oc];
                            }
                        }
                    }
                }
            });
        }
        out
    }

    /// Sets the four tiles of sums (tmm0–3) to zero.
    ///
    /// # Safety
    /// Tiles configured.
    #[inline(always)]
    unsafe fn zero() {
        std::arch::asm!("tilezero tmm0", "tilezero tmm1", "tilezero tmm2", "tilezero tmm3", options(nostack, nomem));
    }

    /// Adds `steps` blocks of 32 bf16 to the four tiles of sums: the A tiles' rows `lda`
    /// bytes apart, the second tile 16 rows further; `b` a panel's pairs from where they
    /// start (128 bytes apart). The tiles keep their sums between calls: the compiler never
    /// uses AMX registers itself.
    ///
    /// # Safety
    /// Tiles configured, sums in tmm0–3; `a` readable for 32 rows, `b` for 16·steps pairs.
    #[inline(always)]
    unsafe fn accumulate(a: *const u16, lda: usize, b: *const u32, steps: usize) {
        debug_assert!(steps > 0, "the loop runs at least once");
        std::arch::asm!(
            "2:",
            "tileloadd tmm4, [{a} + {lda}]",
            "tileloadd tmm5, [{a2} + {lda}]",
            "tileloadd tmm6, [{b} + {ldb}]",
            "tileloadd tmm7, [{b1} + {ldb}]",
            "tdpbf16ps tmm0, tmm4, tmm6",
            "tdpbf16ps tmm1, tmm4, tmm7",
            "tdpbf16ps tmm2, tmm5, tmm6",
            "tdpbf16ps tmm3, tmm5, tmm7",
            "add {a}, 64",
            "add {a2}, 64",
            "add {b}, 2048",
            "add {b1}, 2048",
            "dec {steps}",
            "jnz 2b",
            a = inout(reg) a => _,
            a2 = inout(reg) a.byte_add(16 * lda) => _,
            lda = in(reg) lda,
            b = inout(reg) b => _,
            b1 = inout(reg) b.byte_add(64) => _,
            ldb = in(reg) NR * 4,
            steps = inout(reg) steps => _,
            options(nostack),
        );
    }

    /// Stores the four tiles of sums as 32 rows of 32 f32, `ldc` bytes apart.
    ///
    /// # Safety
    /// Tiles configured; `c` writable for 32 rows of 32 f32.
    #[inline(always)]
    unsafe fn store(c: *mut f32, ldc: usize) {
        std::arch::asm!(
            "tilestored [{c} + {ldc}], tmm0",
            "tilestored [{c1} + {ldc}], tmm1",
            "tilestored [{c2} + {ldc}], tmm2",
            "tilestored [{c3} + {ldc}], tmm3",
            c = in(reg) c,
            c1 = in(reg) c.byte_add(64),
            c2 = in(reg) c.byte_add(16 * ldc),
            c3 = in(reg) c.byte_add(16 * ldc + 64),
            ldc = in(reg) ldc,
            options(nostack),
        );
    }

    /// Rows a call of the tile kernel covers (two tiles of 16).
    const ROWS: usize = 32;

    /// The 64-byte tile configuration: palette 1, tiles 0–7 of 16 rows by 64 bytes.
    #[repr(C, align(64))]
    struct TileConfig([u8; 64]);

    impl TileConfig {
        fn new() -> TileConfig {
            let mut c = [0u8; 64];
            c[0] = 1;
            for t in 0..8 {
                c[16 + 2 * t] = 64; // bytes a row (u16, little-endian)
                c[48 + t] = 16; // rows
            }
            TileConfig(c)
        }
    }

    /// This thread's tiles, configured (16 rows by 64 bytes each) until dropped. Nothing
    /// between may make the thread run other AMX code (no rayon calls inside).
    struct Tiles;

    impl Tiles {
        /// # Safety
        /// The CPU and OS run AMX ([`available`]).
        unsafe fn configure() -> Tiles {
            let config = TileConfig::new();
            std::arch::asm!("ldtilecfg [{}]", in(reg) config.0.as_ptr(), options(nostack, readonly));
            Tiles
        }
    }

    impl Drop for Tiles {
        fn drop(&mut self) {
            // SAFETY: releases the configuration made in `configure`.
            unsafe { std::arch::asm!("tilerelease", options(nostack, nomem)) };
        }
    }

    /// Adds rows `rows` of `x · wᵀ`, for the columns of `panels`, into the result.
    pub fn block_product(x: &[f32], k: usize, rows: std::ops::Range<usize>, w: &Bf16Matrix, panels: std::ops::Range<usize>, out: &SharedOut) {
        let pairs = padded_pairs(k);
        let kp = 2 * pairs;
        let groups = rows.len().div_ceil(ROWS);
        // The rows in bf16, row-major with `kp` a row (AMX's A tiles), zeros past the ends.
        let mut a = vec![0u16; groups * ROWS * kp];
        for (r, dst) in a.chunks_mut(kp).take(rows.len()).enumerate() {
            let src = &x[(rows.start + r) * k..][..k];
            for (d, v) in dst.iter_mut().zip(src) {
                *d = to_bf16(*v);
            }
        }
        let n = w.n;
        // Sums go to a contiguous buffer, then are added into the result: tile loads and
        // stores with the result's row stride (n · 4 bytes, often a multiple of 4 KiB) map
        // a tile's rows onto a few cache sets and ran at a tenth of the speed.
        let mut sums = Sums([0f32; ROWS * NR]);
        // SAFETY: available() held, or `matmul_with` would not have chosen AMX.
        let _tiles = unsafe { Tiles::configure() };
        for panel in panels {
            let b = w.data[panel * pairs * NR..].as_ptr();
            let cols = NR.min(n - panel * NR);
            for g in 0..groups {
                let r0 = rows.start + g * ROWS;
                let valid = ROWS.min(rows.end - r0);
                // SAFETY: `a` holds the group's 32 rows of kp, `b` the panel's pairs, `sums`
                // 32 rows of NR.
                unsafe {
                    zero();
                    accumulate(a[g * ROWS * kp..].as_ptr(), kp * 2, b, pairs / 16);
                    store(sums.0.as_mut_ptr(), NR * 4);
                }
                for (r, s) in sums.0.chunks(NR).take(valid).enumerate() {
                    // SAFETY: `out` is the m × n result and only this task writes its rows
                    // `rows` × these panels' columns.
                    let dst = unsafe { std::slice::from_raw_parts_mut(out.0.add((r0 + r) * n + panel * NR), cols) };
                    for (d, v) in dst.iter_mut().zip(s) {
                        *d += v;
                    }
                }
            }
        }
    }

    /// A tile kernel's 32 × 32 sums, on a cache line of their own.
    #[repr(C, align(64))]
    struct Sums([f32; ROWS * NR]);
}

/// AMX is x86-64's: elsewhere it is never available, so never called.
#[cfg(not(target_arch = "x86_64"))]
mod amx {
    use super::{Bf16Conv, Bf16Matrix, ConvShape, SharedOut};

    pub fn available() -> bool {
        false
    }

    pub fn block_product(_: &[f32], _: usize, _: std::ops::Range<usize>, _: &Bf16Matrix, _: std::ops::Range<usize>, _: &SharedOut) {
        unreachable!("AMX runs on x86-64 only")
    }

    pub fn conv2d(_: &[f32], _: ConvShape, _: &Bf16Conv, _: &[f32], _: usize) -> Vec<f32> {
        unreachable!("AMX runs on x86-64 only")
    }
}
