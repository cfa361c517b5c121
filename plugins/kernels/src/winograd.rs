//! 3×3 convolutions by Winograd's minimal filtering F(2×2, 3×3) and F(4×4, 3×3) (Lavin &
//! Gray 2016) on channels-last padded activations: a (h+3)·(w+2) × C matrix, one pixel of zeros around
//! and a spare row (the cnn engine's `layers::Padded`, [`crate::nchw`]'s bands).
//!
//! Each m×m block of outputs is computed from an (m+2)×(m+2) block of inputs as
//! `Aᵀ [(G g Gᵀ) ⊙ (Bᵀ d B)] A`: the element-wise product becomes (m+2)² matrix products
//! (tiles × C)·(C × O). F(2,3) takes 16 multiplies per 4 outputs instead of 36 (2.25× fewer);
//! its transforms use only 0, ±1 and ±½, so it stays within float rounding of the direct
//! convolution. F(4,3) takes 36 per 16 outputs (4× fewer) with ±2, ±4, ±5, ⅙ and 1/24 in its
//! transforms, about a digit less precise. The transforms run over channels, which are
//! contiguous here, so they vectorise; bias and the activation are applied in the output
//! transform.

use candle_core::{DType, Device, Result, Storage, Tensor};
use rayon::prelude::*;

/// Channels handled together: fixed-size arrays the compiler turns into vector registers.
const LANES: usize = 16;
type Lanes = [f32; LANES];

/// `n` values of `src` from `at` (zeros past its end). Whole lane vectors are copied as
/// fixed-size arrays: a `copy_from_slice` of run-time length is a call to memmove, which took
/// a third of RRDBNet's time.
#[inline(always)]
fn load(src: &[f32], at: usize, n: usize) -> Lanes {
    if n == LANES {
        return src.get(at..at + LANES).map_or([0.0; LANES], |s| s.try_into().expect("LANES values"));
    }
    let mut v = [0f32; LANES];
    if let Some(s) = src.get(at..at + n) {
        v[..n].copy_from_slice(s);
    }
    v
}

/// The first `n` values of `v` into `dst` at `at`.
#[inline(always)]
fn store(dst: &mut [f32], at: usize, v: &Lanes, n: usize) {
    if n == LANES {
        let d: &mut Lanes = (&mut dst[at..at + LANES]).try_into().expect("LANES values");
        *d = *v;
    } else {
        dst[at..at + n].copy_from_slice(&v[..n]);
    }
}

/// A lane vector from its values by index, built in place (`array::from_fn` left memmoves
/// of its result in the hot loops).
#[inline(always)]
fn lanes(f: impl Fn(usize) -> f32) -> Lanes {
    let mut v = [0f32; LANES];
    for (i, x) in v.iter_mut().enumerate() {
        *x = f(i);
    }
    v
}

#[inline(always)]
fn add(a: &Lanes, b: &Lanes) -> Lanes {
    lanes(|i| a[i] + b[i])
}

#[inline(always)]
fn sub(a: &Lanes, b: &Lanes) -> Lanes {
    lanes(|i| a[i] - b[i])
}

/// What the output transform applies after the bias.
#[derive(Clone, Copy)]
pub enum Activation<'a> {
    None,
    /// max(x, slope·x), for slopes below 1.
    LeakyRelu(f32),
    /// Per-channel PReLU slopes.
    PRelu(&'a [f32]),
}

/// Borrows a contiguous CPU f32 tensor's values.
pub fn with_slice<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
    let t = t.contiguous()?;
    let (storage, layout) = t.storage_and_layout();
    match &*storage {
        Storage::Cpu(cpu) => {
            let all = cpu.as_slice::<f32>()?;
            Ok(f(&all[layout.start_offset()..layout.start_offset() + t.elem_count()]))
        }
        _ => candle_core::bail!("Winograd convolutions run on the CPU"),
    }
}

/// Bias, activation, and the store of `n` outputs at `at`.
#[inline(always)]
fn emit(v: &Lanes, bias: &[f32], o0: usize, n: usize, act: Activation<'_>, dst: &mut [f32], at: usize) {
    let b = load(bias, o0, n);
    let v = match act {
        Activation::None => add(v, &b),
        Activation::LeakyRelu(slope) => lanes(|i| {
            let x = v[i] + b[i];
            x.max(x * slope)
        }),
        Activation::PRelu(alpha) => {
            let a = load(alpha, o0, n);
            lanes(|i| {
                let x = v[i] + b[i];
                if x < 0.0 { x * a[i] } else { x }
            })
        }
    };
    store(dst, at, &v, n);
}

/// A 3×3 convolution's weights in the Winograd domain, `U = G g Gᵀ`: (m+2)² row-major (C × O)
/// matrices for output tiles of m×m.
pub struct Winograd {
    /// The output tile side m: 2 for F(2,3), 4 for F(4,3).
    m: usize,
    u: Vec<f32>,
    bias: Vec<f32>,
    c: usize,
    o: usize,
}

/// F(2,3)'s G.
const G2: [[f64; 3]; 4] = [[1.0, 0.0, 0.0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0.0, 0.0, 1.0]];
/// F(4,3)'s G.
const G4: [[f64; 3]; 6] = [
    [0.25, 0.0, 0.0],
    [-1.0 / 6.0, -1.0 / 6.0, -1.0 / 6.0],
    [-1.0 / 6.0, 1.0 / 6.0, -1.0 / 6.0],
    [1.0 / 24.0, 1.0 / 12.0, 1.0 / 6.0],
    [1.0 / 24.0, -1.0 / 12.0, 1.0 / 6.0],
    [0.0, 0.0, 1.0],
];

impl Winograd {
    /// F(2,3) for `weight` (O, C, 3, 3), `bias` (O).
    pub fn f2(weight: &Tensor, bias: &Tensor) -> Result<Winograd> {
        Winograd::new(weight, bias, &G2)
    }

    /// F(4,3) for `weight` (O, C, 3, 3), `bias` (O).
    pub fn f4(weight: &Tensor, bias: &Tensor) -> Result<Winograd> {
        Winograd::new(weight, bias, &G4)
    }

    fn new(weight: &Tensor, bias: &Tensor, g: &[[f64; 3]]) -> Result<Winograd> {
        let (o, c, kh, kw) = weight.dims4()?;
        if (kh, kw) != (3, 3) {
            candle_core::bail!("Winograd F(m,3) is for 3×3 kernels, not {kh}×{kw}");
        }
        let weight = weight.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        let bias = bias.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        Ok(Winograd::from_oihw(&weight, bias, o, c, g))
    }

    /// F(4,3) for an (O, C, 3, 3) weight given as values, transformed on every call (the pisa
    /// engine's convolutions: kept transformed, its weights would take 4× their memory).
    pub fn f4_from_oihw(weight: &[f32], bias: Vec<f32>, o: usize, c: usize) -> Winograd {
        Winograd::from_oihw(weight, bias, o, c, &G4)
    }

    /// `U = G g Gᵀ` as two products (G g, then · Gᵀ) in f64, since F(4,3)'s G has sixths and
    /// 24ths; input channels in parallel, each giving its (m+2)² rows of O values.
    fn from_oihw(weight: &[f32], bias: Vec<f32>, o: usize, c: usize, g: &[[f64; 3]]) -> Winograd {
        assert!(weight.len() == o * c * 9 && bias.len() == o, "the weights do not match the convolution");
        let n = g.len();
        let rows: Vec<Vec<f32>> = (0..c)
            .into_par_iter()
            .map(|ic| {
                let mut rows = vec![0f32; n * n * o];
                for oc in 0..o {
                    let k = &weight[(oc * c + ic) * 9..][..9];
                    let mut gk = [[0f64; 3]; 6];
                    for (a, gk) in gk.iter_mut().enumerate().take(n) {
                        for (j, v) in gk.iter_mut().enumerate() {
                            *v = (0..3).map(|i| g[a][i] * k[i * 3 + j] as f64).sum();
                        }
                    }
                    for a in 0..n {
                        for b in 0..n {
                            let s: f64 = (0..3).map(|j| gk[a][j] * g[b][j]).sum();
                            rows[(a * n + b) * o + oc] = s as f32;
                        }
                    }
                }
                rows
            })
            .collect();
        let mut u = vec![0f32; n * n * c * o];
        for (ic, rows) in rows.iter().enumerate() {
            for ab in 0..n * n {
                u[(ab * c + ic) * o..][..o].copy_from_slice(&rows[ab * o..][..o]);
            }
        }
        Winograd { m: n - 2, u, bias, c, o }
    }

    pub fn in_channels(&self) -> usize {
        self.c
    }

    /// Convolves the padded `(h + 3)·(w + 2) × C` activations `x` (zero border, interior at
    /// rows and columns 1..) and returns the output in the same padded layout, zero border
    /// included, with the bias and `act` applied.
    pub fn forward(&self, x: &Tensor, h: usize, w: usize, act: Activation<'_>) -> Result<Tensor> {
        let out = with_slice(x, |p| self.forward_slice(p, self.c, h, w, act))?;
        Tensor::from_vec(out, ((h + 3) * (w + 2), self.o), &Device::Cpu)
    }

    /// [`forward`](Self::forward) on a padded buffer whose pixels are `stride` values apart,
    /// of which this convolution reads the first C (the start of a dense block's concatenation).
    pub fn forward_slice(&self, p: &[f32], stride: usize, h: usize, w: usize, act: Activation<'_>) -> Vec<f32> {
        assert!(stride >= self.c && p.len() >= (h + 3) * (w + 2) * stride, "the activations do not match the convolution");
        let src = Source { p, h, pw: w + 2, stride, c: self.c };
        let mut out = vec![0f32; output_len(h, w, self.m, self.o)];
        match self.m {
            2 => self.run::<2>(Input::Pixels(&src), h, w, act, 0..h.div_ceil(2), &mut out),
            _ => self.run::<4>(Input::Pixels(&src), h, w, act, 0..h.div_ceil(4), &mut out),
        }
        out.truncate((h + 3) * (w + 2) * self.o);
        out
    }

    /// Work is split by rows of M×M output tiles across threads; each thread takes its row in
    /// blocks of `BLOCK` tiles through all three steps (input transform, (M+2)² products,
    /// output transform) so the intermediate matrices stay in its cache and are reused, never
    /// allocated per call. One instantiation per tile size, each with only its transforms.
    /// Computes the tile rows `rows` into `out`, a zeroed padded buffer of [`output_len`].
    #[allow(clippy::too_many_arguments)]
    fn run<const M: usize>(&self, input: Input<'_>, h: usize, w: usize, act: Activation<'_>, rows: std::ops::Range<usize>, out: &mut [f32]) {
        let (o, pw) = (self.o, w + 2);
        let ty = h.div_ceil(M);
        assert!(rows.end <= ty && out.len() >= output_len(h, w, M, o), "the output does not match the convolution");
        // Tile row t_y writes padded rows M·t_y + 1 ..= M·t_y + M.
        let body = &mut out[(M * rows.start + 1) * pw * o..(M * rows.end + 1) * pw * o];
        body.par_chunks_mut(M * pw * o).enumerate().for_each(|(i, dst)| {
            let t_y = rows.start + i;
            let input = match input {
                Input::Pixels(src) => RowInput::Pixels(src),
                Input::Transformed(t) => RowInput::Slot(&t.v[t.slot(t_y) * t.row_len()..][..t.row_len()], t.channels),
            };
            self.tile_row::<M>(input, t_y, h, w, act, dst);
        });
    }

    /// One row of M×M output tiles into its padded output rows `dst`, in blocks of BLOCK tiles.
    #[allow(clippy::too_many_arguments)]
    fn tile_row<const M: usize>(&self, input: RowInput<'_>, t_y: usize, h: usize, w: usize, act: Activation<'_>, dst: &mut [f32]) {
        let (c, o) = (self.c, self.o);
        let nn = (M + 2) * (M + 2);
        let tx = w.div_ceil(M);
        SCRATCH.with_borrow_mut(|(v, mm)| {
            mm.resize(nn * BLOCK * o, 0.0);
            for (b, x0) in (0..tx).step_by(BLOCK).enumerate() {
                let nb = BLOCK.min(tx - x0);
                // V for this block, its rows `v_row` values apart: transformed here (with the
                // transforms compiled for the CPU's widest vectors, `simd`), or beforehand.
                let (v, v_row): (&[f32], usize) = match input {
                    RowInput::Pixels(src) => {
                        v.resize(nn * BLOCK * c, 0.0);
                        if M == 2 {
                            input_transform2(src, t_y, x0, nb, v, c);
                        } else {
                            input_transform4(src, t_y, x0, nb, v, c);
                        }
                        (v, c)
                    }
                    RowInput::Slot(row, channels) => (&row[b * nn * BLOCK * channels..], channels),
                };
                for kl in 0..nn {
                    matmul(&v[kl * BLOCK * v_row..], v_row, &self.u[kl * c * o..][..c * o], &mut mm[kl * BLOCK * o..][..nb * o], nb, c, o);
                }
                if M == 2 {
                    output_transform2(self, mm, nb, x0, t_y, h, w, act, dst);
                } else {
                    output_transform4(self, mm, nb, x0, t_y, h, w, act, dst);
                }
            }
        });
    }
}

multiversion! {
    /// Y = Aᵀ M A with Aᵀ = [[1, 1, 1, 0], [0, 1, −1, −1]], plus bias and activation, into the
    /// two padded output rows `dst` of tile row `t_y`, for tiles `x0 .. x0 + nb`.
    #[allow(clippy::too_many_arguments)]
    fn output_transform2(wino: &Winograd, m: &[f32], nb: usize, x0: usize, t_y: usize, h: usize, w: usize, act: Activation<'_>, dst: &mut [f32]) {
        let o = wino.o;
        let pw = w + 2;
        for t in 0..nb {
            for o0 in (0..o).step_by(LANES) {
                let n = LANES.min(o - o0);
                let mm: [[Lanes; 4]; 4] = std::array::from_fn(|k| std::array::from_fn(|l| load(&m[((k * 4 + l) * BLOCK + t) * o..][..o], o0, n)));
                let s: [[Lanes; 4]; 2] = [
                    std::array::from_fn(|l| add(&add(&mm[0][l], &mm[1][l]), &mm[2][l])),
                    std::array::from_fn(|l| sub(&sub(&mm[1][l], &mm[2][l]), &mm[3][l])),
                ];
                for (a, s) in s.iter().enumerate() {
                    if 2 * t_y + a >= h {
                        continue;
                    }
                    let ys = [add(&add(&s[0], &s[1]), &s[2]), sub(&sub(&s[1], &s[2]), &s[3])];
                    for (b, v) in ys.iter().enumerate() {
                        let xo = 2 * (x0 + t) + b;
                        if xo >= w {
                            continue;
                        }
                        emit(v, &wino.bias, o0, n, act, dst, (a * pw + xo + 1) * o + o0);
                    }
                }
            }
        }
    }
}

multiversion! {
    /// F(4,3)'s Y = Aᵀ M A, Aᵀ = [[1, 1, 1, 1, 1, 0], [0, 1, −1, 2, −2, 0], [0, 1, 1, 4, 4, 0],
    /// [0, 1, −1, 8, −8, 1]], into the four padded output rows `dst` of tile row `t_y`.
    #[allow(clippy::too_many_arguments)]
    fn output_transform4(wino: &Winograd, m: &[f32], nb: usize, x0: usize, t_y: usize, h: usize, w: usize, act: Activation<'_>, dst: &mut [f32]) {
        let o = wino.o;
        let pw = w + 2;
        for t in 0..nb {
            for o0 in (0..o).step_by(LANES) {
                let n = LANES.min(o - o0);
                // Rows first: s[a][l] = (Aᵀ M)[a][l].
                let mut s = [[[0f32; LANES]; 6]; 4];
                for l in 0..6 {
                    let mut col = [[0f32; LANES]; 6];
                    for k in 0..6 {
                        col[k] = load(&m[((k * 6 + l) * BLOCK + t) * o..][..o], o0, n);
                    }
                    let y = at4(&col);
                    for a in 0..4 {
                        s[a][l] = y[a];
                    }
                }
                for (a, sa) in s.iter().enumerate() {
                    if 4 * t_y + a >= h {
                        continue;
                    }
                    let ys = at4(sa);
                    for (b, v) in ys.iter().enumerate() {
                        let xo = 4 * (x0 + t) + b;
                        if xo < w {
                            emit(v, &wino.bias, o0, n, act, dst, (a * pw + xo + 1) * o + o0);
                        }
                    }
                }
            }
        }
    }
}

/// F(4,3)'s transformed input, V = Bᵀ d B, of every tile of a padded h×w image, for up to
/// `channels` channels filled in as they become known: a dense block transforms each channel
/// once and every later convolution reads its first C, where transforming the growing
/// concatenation for each convolution did 3.3× the work (a third of RRDBNet's time).
/// Laid out per tile row and block of BLOCK tiles as the products read it: 36 matrices of
/// BLOCK × `channels`.
pub struct Transformed {
    v: Vec<f32>,
    h: usize,
    w: usize,
    channels: usize,
    /// Tile rows held: tile row t_y lives in slot t_y mod `slots` (a ring when fewer than the
    /// image's tile rows, for a dense block run band by band).
    slots: usize,
}

impl Transformed {
    /// Every tile row of a padded h×w image.
    pub fn new(h: usize, w: usize, channels: usize) -> Transformed {
        Transformed::ring(h, w, channels, h.div_ceil(4))
    }

    /// Room for `slots` tile rows at a time.
    pub fn ring(h: usize, w: usize, channels: usize, slots: usize) -> Transformed {
        let slots = slots.clamp(1, h.div_ceil(4).max(1));
        let mut t = Transformed { v: Vec::new(), h, w, channels, slots };
        t.v = vec![0f32; slots * t.row_len()];
        t
    }

    fn slot(&self, t_y: usize) -> usize {
        t_y % self.slots
    }

    fn row_len(&self) -> usize {
        self.w.div_ceil(4).div_ceil(BLOCK) * 36 * BLOCK * self.channels
    }

    /// Transforms the first `c` channels of the padded activations `p` (pixels `stride` values
    /// apart) into channels `c0 .. c0 + c`, for every tile row (all must be held).
    pub fn add(&mut self, p: &[f32], stride: usize, c: usize, c0: usize) {
        let src = self.source(p, stride, c, c0);
        let (w, channels) = (self.w, self.channels);
        let (row_len, slots) = self.slots_mut(0..self.h.div_ceil(4));
        slots.par_chunks_mut(row_len).enumerate().for_each(|(t_y, slot)| transform_row(&src, t_y, w, slot, c0, channels));
    }

    /// `p`'s first `c` channels as the input transforms read them, for channels `c0 .. c0 + c`.
    fn source<'a>(&self, p: &'a [f32], stride: usize, c: usize, c0: usize) -> Source<'a> {
        assert!(c0 + c <= self.channels && stride >= c && p.len() >= (self.h + 3) * (self.w + 2) * stride, "the activations do not match the transformed input");
        Source { p, h: self.h, pw: self.w + 2, stride, c }
    }

    /// The slots of tile rows `rows`, which must lie in consecutive slots, and a slot's length.
    fn slots_mut(&mut self, rows: std::ops::Range<usize>) -> (usize, &mut [f32]) {
        assert!(rows.end <= self.h.div_ceil(4) && self.slot(rows.start) + rows.len() <= self.slots, "tile rows {rows:?} wrap the ring");
        let (row_len, first) = (self.row_len(), self.slot(rows.start));
        (row_len, &mut self.v[first * row_len..(first + rows.len()) * row_len])
    }
}

/// Tile row `t_y` of `src` (an image `w` wide), transformed into channels `c0..` of its slot.
fn transform_row(src: &Source<'_>, t_y: usize, w: usize, slot: &mut [f32], c0: usize, channels: usize) {
    let tx = w.div_ceil(4);
    for (b, x0) in (0..tx).step_by(BLOCK).enumerate() {
        input_transform4(src, t_y, x0, BLOCK.min(tx - x0), &mut slot[b * 36 * BLOCK * channels + c0..], channels);
    }
}

impl Winograd {
    /// The convolution of the first C channels of `t`, which holds every tile row (F(4,3)
    /// only); output as `forward_slice`.
    pub fn forward_transformed(&self, t: &Transformed, act: Activation<'_>) -> Vec<f32> {
        let ty = t.h.div_ceil(4);
        assert!(self.m == 4 && self.c <= t.channels && t.slots >= ty, "the transformed input does not match the convolution");
        let mut out = vec![0f32; output_len(t.h, t.w, 4, self.o)];
        self.run::<4>(Input::Transformed(t), t.h, t.w, act, 0..ty, &mut out);
        out.truncate((t.h + 3) * (t.w + 2) * self.o);
        out
    }

    /// [`Transformed::add`] of `new` = (activations, stride, c, c0), then the convolution, for
    /// tile rows `rows` (consecutive slots of `t`) into `out`, a zeroed buffer of
    /// [`output_len`] that the other tile rows leave alone. Row by row in one parallel loop (a
    /// row's products read only its own slot): a dense block's wavefront makes half the loops,
    /// and each row's new channels are still in the cache when its products read them.
    pub fn forward_adding_rows(&self, t: &mut Transformed, new: (&[f32], usize, usize, usize), act: Activation<'_>, rows: std::ops::Range<usize>, out: &mut [f32]) {
        let (p, stride, c, c0) = new;
        assert!(self.m == 4 && self.c <= t.channels, "the transformed input does not match the convolution");
        let (h, w, o, pw, channels) = (t.h, t.w, self.o, t.w + 2, t.channels);
        assert!(out.len() >= output_len(h, w, 4, o), "the output does not match the convolution");
        let src = t.source(p, stride, c, c0);
        let (row_len, slots) = t.slots_mut(rows.clone());
        let body = &mut out[(4 * rows.start + 1) * pw * o..(4 * rows.end + 1) * pw * o];
        body.par_chunks_mut(4 * pw * o).zip(slots.par_chunks_mut(row_len)).enumerate().for_each(|(i, (dst, slot))| {
            let t_y = rows.start + i;
            transform_row(&src, t_y, w, slot, c0, channels);
            self.tile_row::<4>(RowInput::Slot(slot, channels), t_y, h, w, act, dst);
        });
    }

    pub fn out_channels(&self) -> usize {
        self.o
    }
}

/// Values of a padded h×w output of O channels with room for whole tile rows of side m (rows
/// past the padded image stay zero).
pub fn output_len(h: usize, w: usize, m: usize, o: usize) -> usize {
    (h + 3).max(m * h.div_ceil(m) + 1) * (w + 2) * o
}

/// Where a convolution's transformed input V comes from.
#[derive(Clone, Copy)]
enum Input<'a> {
    /// Padded activations, transformed block by block as the products need them.
    Pixels(&'a Source<'a>),
    /// Transformed beforehand, all channels of all tiles ([`Transformed`]).
    Transformed(&'a Transformed),
}

/// A tile row's V source: padded activations, or its slot of a [`Transformed`] (with its
/// channel count).
#[derive(Clone, Copy)]
enum RowInput<'a> {
    Pixels(&'a Source<'a>),
    Slot(&'a [f32], usize),
}

/// Tiles per block: the block's transformed inputs and products stay in a core's L2 (with 32, V
/// alone took 885 KiB of its 1 MiB at 192 channels, and RRDBNet ran 5-10 % slower).
const BLOCK: usize = 16;

thread_local! {
    /// Per-thread V ((m+2)² × BLOCK × C) and M ((m+2)² × BLOCK × O), reused across calls.
    static SCRATCH: std::cell::RefCell<(Vec<f32>, Vec<f32>)> = const { std::cell::RefCell::new((Vec::new(), Vec::new())) };
}

/// Padded activations as the input transforms read them.
struct Source<'a> {
    p: &'a [f32],
    h: usize,
    pw: usize,
    stride: usize,
    c: usize,
}

impl Source<'_> {
    /// The C channels of padded pixel (row, col); empty (zeros) outside the padded image,
    /// where the last tiles of an odd size reach.
    #[inline(always)]
    fn at(&self, row: usize, col: usize) -> &[f32] {
        if row >= self.h + 3 || col >= self.pw {
            return &[];
        }
        &self.p[(row * self.pw + col) * self.stride..][..self.c]
    }
}

multiversion! {
    /// F(2,3)'s V = Bᵀ d B for tiles `x0 .. x0 + nb` of tile row `t_y`, with
    /// Bᵀ = [[1, 0, −1, 0], [0, 1, 1, 0], [0, −1, 1, 0], [0, 1, 0, −1]]; V holds 16 matrices of
    /// BLOCK × C.
    fn input_transform2(src: &Source<'_>, t_y: usize, x0: usize, nb: usize, v: &mut [f32], v_row: usize) {
        let c = src.c;
        for t in 0..nb {
            let t_x = x0 + t;
            let px: [[&[f32]; 4]; 4] = std::array::from_fn(|i| std::array::from_fn(|j| src.at(2 * t_y + i, 2 * t_x + j)));
            for c0 in (0..c).step_by(LANES) {
                let n = LANES.min(c - c0);
                let d: [[Lanes; 4]; 4] = std::array::from_fn(|i| std::array::from_fn(|j| load(px[i][j], c0, n)));
                // Rows first (Bᵀ d), then columns (· B).
                let rows: [[Lanes; 4]; 4] = [
                    std::array::from_fn(|j| sub(&d[0][j], &d[2][j])),
                    std::array::from_fn(|j| add(&d[1][j], &d[2][j])),
                    std::array::from_fn(|j| sub(&d[2][j], &d[1][j])),
                    std::array::from_fn(|j| sub(&d[1][j], &d[3][j])),
                ];
                for (k, r) in rows.iter().enumerate() {
                    let q = [sub(&r[0], &r[2]), add(&r[1], &r[2]), sub(&r[2], &r[1]), sub(&r[1], &r[3])];
                    for (l, val) in q.iter().enumerate() {
                        let at = ((k * 4 + l) * BLOCK + t) * v_row + c0;
                        store(v, at, val, n);
                    }
                }
            }
        }
    }
}

/// F(4,3)'s Aᵀ applied to six lane vectors.
#[inline(always)]
fn at4(m: &[Lanes; 6]) -> [Lanes; 4] {
    let (a, b) = (add(&m[1], &m[2]), sub(&m[1], &m[2]));
    let (c, d) = (add(&m[3], &m[4]), sub(&m[3], &m[4]));
    [
        add(&add(&m[0], &a), &c),
        lanes(|i| b[i] + 2.0 * d[i]),
        lanes(|i| a[i] + 4.0 * c[i]),
        lanes(|i| b[i] + 8.0 * d[i] + m[5][i]),
    ]
}

/// F(4,3)'s Bᵀ applied to six lane vectors: Bᵀ = [[4, 0, −5, 0, 1, 0], [0, −4, −4, 1, 1, 0],
/// [0, 4, −4, −1, 1, 0], [0, −2, −1, 2, 1, 0], [0, 2, −1, −2, 1, 0], [0, 4, 0, −5, 0, 1]].
#[inline(always)]
fn bt4(d: &[Lanes; 6]) -> [Lanes; 6] {
    let t1: Lanes = lanes(|i| d[4][i] - 4.0 * d[2][i]);
    let t2: Lanes = lanes(|i| d[3][i] - 4.0 * d[1][i]);
    let t3 = sub(&d[4], &d[2]);
    let t4: Lanes = lanes(|i| 2.0 * (d[3][i] - d[1][i]));
    [
        lanes(|i| 4.0 * d[0][i] - 5.0 * d[2][i] + d[4][i]),
        add(&t1, &t2),
        sub(&t1, &t2),
        add(&t3, &t4),
        sub(&t3, &t4),
        lanes(|i| 4.0 * d[1][i] - 5.0 * d[3][i] + d[5][i]),
    ]
}

multiversion! {
    /// F(4,3)'s V = Bᵀ d B for tiles `x0 .. x0 + nb` of tile row `t_y`: 36 matrices of BLOCK × C,
    /// their rows `v_row` values apart.
    fn input_transform4(src: &Source<'_>, t_y: usize, x0: usize, nb: usize, v: &mut [f32], v_row: usize) {
        let c = src.c;
        for t in 0..nb {
            let t_x = x0 + t;
            let px: [[&[f32]; 6]; 6] = std::array::from_fn(|i| std::array::from_fn(|j| src.at(4 * t_y + i, 4 * t_x + j)));
            for c0 in (0..c).step_by(LANES) {
                let n = LANES.min(c - c0);
                // Columns of d through Bᵀ (rows of Bᵀd), then each row through Bᵀ again (· B).
                // Plain arrays and loops: nested `array::from_fn`s of lane vectors compiled to
                // memmoves of the whole intermediate.
                let mut bd = [[[0f32; LANES]; 6]; 6];
                for j in 0..6 {
                    let mut col = [[0f32; LANES]; 6];
                    for i in 0..6 {
                        col[i] = load(px[i][j], c0, n);
                    }
                    let col = bt4(&col);
                    for k in 0..6 {
                        bd[k][j] = col[k];
                    }
                }
                for (k, row) in bd.iter().enumerate() {
                    for (l, val) in bt4(row).iter().enumerate() {
                        store(v, ((k * 6 + l) * BLOCK + t) * v_row + c0, val, n);
                    }
                }
            }
        }
    }
}

/// `dst (rows × n) = lhs (rows × k, rows `lhs_row` values apart) · rhs (k × n)`, row-major,
/// on this thread.
fn matmul(lhs: &[f32], lhs_row: usize, rhs: &[f32], dst: &mut [f32], rows: usize, k: usize, n: usize) {
    matmul_to(lhs, lhs_row, rhs, dst, (rows, k, n), (n, 1));
}

/// `dst = lhs · rhs` for `(rows, k, n)`: lhs row-major, its rows `lhs_row` values apart; rhs
/// row-major k × n; dst's element (i, j) at `i·dst_step.0 + j·dst_step.1`. On this thread.
pub fn matmul_to(lhs: &[f32], lhs_row: usize, rhs: &[f32], dst: &mut [f32], (rows, k, n): (usize, usize, usize), dst_step: (usize, usize)) {
    assert!(rows > 0 && n > 0 && lhs_row >= k);
    assert!(lhs.len() >= (rows - 1) * lhs_row + k && rhs.len() >= k * n);
    assert!(dst.len() > (rows - 1) * dst_step.0 + (n - 1) * dst_step.1);
    // SAFETY: the three slices hold every element the sizes and strides reach (checked
    // above), and `dst` does not alias the inputs (it is a `&mut`).
    unsafe {
        gemm::gemm(
            rows,
            n,
            k,
            dst.as_mut_ptr(),
            dst_step.1 as isize,
            dst_step.0 as isize,
            false,
            lhs.as_ptr(),
            1,
            lhs_row as isize,
            rhs.as_ptr(),
            1,
            n as isize,
            0.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::None,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The cnn engine's channels-last padded activations, for these tests.
    struct Padded {
        t: Tensor,
        h: usize,
        w: usize,
    }

    impl Padded {
        fn from_nchw(x: &Tensor) -> Result<Padded> {
            let (_, c, h, w) = x.dims4()?;
            let t = x.pad_with_zeros(2, 1, 2)?.pad_with_zeros(3, 1, 1)?.permute((0, 2, 3, 1))?.contiguous()?.reshape(((h + 3) * (w + 2), c))?;
            Ok(Padded { t, h, w })
        }

        fn to_nchw(&self) -> Result<Tensor> {
            let c = self.t.dim(1)?;
            self.t.reshape((self.h + 3, self.w + 2, c))?.narrow(0, 1, self.h)?.narrow(1, 1, self.w)?.permute((2, 0, 1))?.unsqueeze(0)?.contiguous()
        }
    }

    #[test]
    fn every_instruction_set_computes_the_same() -> Result<()> {
        use std::sync::atomic::Ordering::Relaxed;
        let dev = Device::Cpu;
        let x = Padded::from_nchw(&Tensor::randn(0f32, 1f32, (1, 20, 13, 37), &dev)?)?;
        let (wt, b) = (Tensor::randn(0f32, 1f32, (18, 20, 3, 3), &dev)?, Tensor::randn(0f32, 1f32, (18,), &dev)?);
        let (f2, f4) = (Winograd::f2(&wt, &b)?, Winograd::f4(&wt, &b)?);
        let run = || -> Result<Vec<Vec<f32>>> {
            let mut t = Transformed::new(13, 37, 20);
            with_slice(&x.t, |p| t.add(p, 20, 20, 0))?;
            Ok(vec![
                f2.forward(&x.t, 13, 37, Activation::LeakyRelu(0.2))?.flatten_all()?.to_vec1()?,
                f4.forward(&x.t, 13, 37, Activation::None)?.flatten_all()?.to_vec1()?,
                f4.forward_transformed(&t, Activation::LeakyRelu(0.2)),
            ])
        };
        let widest = run()?;
        for level in [1, 0] {
            crate::simd::MAX_LEVEL.store(level, Relaxed);
            let got = run();
            crate::simd::MAX_LEVEL.store(2, Relaxed);
            for (a, b) in got?.iter().zip(&widest) {
                let diff = a.iter().zip(b).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
                assert!(diff <= 1e-5, "level {level}: {diff}");
            }
        }
        Ok(())
    }

    #[test]
    fn equals_the_direct_convolution() -> Result<()> {
        let dev = Device::Cpu;
        for (h, w) in [(8, 8), (7, 5), (1, 1), (6, 9)] {
            let x = Tensor::randn(0f32, 1f32, (1, 5, h, w), &dev)?;
            let wt = Tensor::randn(0f32, 1f32, (6, 5, 3, 3), &dev)?;
            let b = Tensor::randn(0f32, 1f32, (6,), &dev)?;
            let direct = x.conv2d(&wt, 1, 1, 1, 1)?.broadcast_add(&b.reshape((1, 6, 1, 1))?)?;
            let p = Padded::from_nchw(&x)?;
            let f2 = Winograd::f2(&wt, &b)?;
            let f4 = Winograd::f4(&wt, &b)?;
            type Forward<'a> = &'a dyn Fn(Activation<'static>) -> Result<Tensor>;
            let forwards: [(Forward, f32); 2] =
                [(&|act| f2.forward(&p.t, h, w, act), 1e-6), (&|act| f4.forward(&p.t, h, w, act), 1e-5)];
            for (forward, tol) in forwards {
            let y = Padded { t: forward(Activation::None)?, h, w };
            let scale = direct.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
            let diff = (y.to_nchw()? - &direct)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
            assert!(diff < tol * scale.max(1.0) * 4.0, "{h}×{w}: {diff} of {scale} (tolerance {tol})");
            // The border stays zero, so the result can feed the next convolution.
            let border = (y.t.abs()?.sum_all()? - y.to_nchw()?.abs()?.sum_all()?)?.to_scalar::<f32>()?;
            assert!(border.abs() < 1e-3, "{h}×{w}: border {border}");
            let leaky = Padded { t: forward(Activation::LeakyRelu(0.2))?, h, w }.to_nchw()?;
            let want = direct.maximum(&(&direct * 0.2)?)?;
            assert!((leaky - want)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()? < tol * scale.max(1.0) * 4.0);
            }
        }
        Ok(())
    }

    #[test]
    fn channels_transformed_as_they_come_equal_the_concatenation() -> Result<()> {
        let dev = Device::Cpu;
        for (h, w) in [(9, 70), (4, 4), (5, 3)] {
            // A 12-channel concatenation of 8 + 4 channels; the convolution reads its first 10.
            let a = Padded::from_nchw(&Tensor::randn(0f32, 1f32, (1, 8, h, w), &dev)?)?;
            let b = Padded::from_nchw(&Tensor::randn(0f32, 1f32, (1, 4, h, w), &dev)?)?;
            let cat = Padded::from_nchw(&Tensor::cat(&[a.to_nchw()?, b.to_nchw()?], 1)?)?;
            let conv = Winograd::f4(&Tensor::randn(0f32, 1f32, (5, 10, 3, 3), &dev)?, &Tensor::randn(0f32, 1f32, 5, &dev)?)?;
            let mut t = Transformed::new(h, w, 12);
            with_slice(&b.t, |p| t.add(p, 4, 4, 8))?;
            with_slice(&a.t, |p| t.add(p, 8, 8, 0))?;
            let got = conv.forward_transformed(&t, Activation::LeakyRelu(0.2));
            let want = with_slice(&cat.t, |p| conv.forward_slice(p, 12, h, w, Activation::LeakyRelu(0.2)))?;
            let diff = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            assert!(diff < 1e-5, "{h}×{w}: {diff}");
        }
        Ok(())
    }
}
