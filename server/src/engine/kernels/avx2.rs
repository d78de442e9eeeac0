//! The AVX2 kernels: a panel's 16 outputs for one `k` take two 256-bit registers; the tile is
//! up to 6 input rows × 1 panel (12 accumulators of the 16 registers). Same operations as
//! [`super::portable`], so the same bits.
//!
//! `unsafe` is needed twice over: the intrinsics are `unsafe` to call, and these functions are
//! compiled for AVX2 + FMA (`#[target_feature]`) so that one binary runs on CPUs without them.
//! Callers reach them only through [`super::isa::Isa`], which selects them after
//! `is_x86_feature_detected!` confirmed the features, and which checks every slice length
//! the pointer arithmetic here relies on.
#![allow(unsafe_code)]

use std::arch::x86_64::*;

use super::isa::{Tile, Weights};
use super::layout::{Format, PANEL, QK};

/// Input rows per tile.
pub const ROWS: usize = 6;
/// Panels per tile.
pub const PANELS: usize = 1;

/// Half a panel: the outputs in one register.
const HALF: usize = PANEL / 2;

/// Eight f16 at `$p + $at`, and the eight after them, as f32: rows 0..8 and 8..16.
macro_rules! f16_halves {
    ($p:expr, $at:expr) => {
        [
            _mm256_cvtph_ps(_mm_loadu_si128($p.add($at).cast())),
            _mm256_cvtph_ps(_mm_loadu_si128($p.add($at + 2 * HALF).cast())),
        ]
    };
}

/// Sixteen bytes at `$p + $at`, unsigned (`_mm256_cvtepu8_epi32`) or signed
/// (`_mm256_cvtepi8_epi32`), as f32: rows 0..8 and 8..16.
macro_rules! byte_halves {
    ($widen:ident, $p:expr, $at:expr) => {
        [
            _mm256_cvtepi32_ps($widen(_mm_loadl_epi64($p.add($at).cast()))),
            _mm256_cvtepi32_ps($widen(_mm_loadl_epi64($p.add($at + HALF).cast()))),
        ]
    };
}

/// `a · b`, half by half.
#[target_feature(enable = "avx2")]
#[inline]
fn mul_halves(a: [__m256; 2], b: [__m256; 2]) -> [__m256; 2] {
    [_mm256_mul_ps(a[0], b[0]), _mm256_mul_ps(a[1], b[1])]
}

/// A panel block's two per-row factors, as f32 for rows 0..8 and 8..16: the scale `d` and
/// the offset `m` (zero for Q4_0 and Q8_0); `d·sc` and `dmin·m` for Q4_K; for Q6_K the
/// scales of columns 0..16 and 16..32, `d·sc0` and `d·sc1`. Each product is rounded as ggml
/// rounds it.
macro_rules! block_scales {
    ($format:expr, $p:expr) => {{
        match $format {
            Format::Q4_0 | Format::Q8_0 => (f16_halves!($p, 0), [_mm256_setzero_ps(); 2]),
            Format::Q4_1 => (f16_halves!($p, 0), f16_halves!($p, 2 * PANEL)),
            Format::Q4K => (
                mul_halves(
                    f16_halves!($p, 0),
                    byte_halves!(_mm256_cvtepu8_epi32, $p, 4 * PANEL),
                ),
                mul_halves(
                    f16_halves!($p, 2 * PANEL),
                    byte_halves!(_mm256_cvtepu8_epi32, $p, 5 * PANEL),
                ),
            ),
            Format::Q6K => {
                let d = f16_halves!($p, 0);
                (
                    mul_halves(d, byte_halves!(_mm256_cvtepi8_epi32, $p, 2 * PANEL)),
                    mul_halves(d, byte_halves!(_mm256_cvtepi8_epi32, $p, 3 * PANEL)),
                )
            }
        }
    }};
}

/// The dequantized weights of columns `k` and `k + 1` (even `k`) of a panel block at `p`:
/// `[column][half]`, computed as [`super::layout::dequantize_block_row`] does.
macro_rules! column_pair {
    ($format:expr, $p:expr, $d:expr, $m:expr, $k:expr) => {{
        let qs = $p.add($format.quants_offset());
        let quants: [[__m128i; 2]; 2] = match $format {
            Format::Q4_0 | Format::Q4_1 | Format::Q4K => {
                let nibble_mask = _mm_set1_epi8(0x0F);
                let v = _mm_loadu_si128(qs.add(8 * $k).cast());
                let lo = _mm_and_si128(v, nibble_mask);
                let hi = _mm_and_si128(_mm_srli_epi16(v, 4), nibble_mask);
                // Bytes 0..8 of `lo` are rows 0..8 of column k, bytes 8..16 those of k + 1;
                // `hi` holds rows 8..16.
                [[lo, hi], [_mm_srli_si128(lo, 8), _mm_srli_si128(hi, 8)]]
            }
            Format::Q8_0 | Format::Q6K => {
                let v0 = _mm_loadu_si128(qs.add(PANEL * $k).cast());
                let v1 = _mm_loadu_si128(qs.add(PANEL * ($k + 1)).cast());
                [[v0, _mm_srli_si128(v0, 8)], [v1, _mm_srli_si128(v1, 8)]]
            }
        };
        let mut w = [[_mm256_setzero_ps(); 2]; 2];
        for (w, quants) in w.iter_mut().zip(quants) {
            for (h, (w, q)) in w.iter_mut().zip(quants).enumerate() {
                *w = match $format {
                    Format::Q4_1 => {
                        let q = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(q));
                        _mm256_add_ps(_mm256_mul_ps(q, $d[h]), $m[h])
                    }
                    Format::Q4K => {
                        let q = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(q));
                        _mm256_sub_ps(_mm256_mul_ps(q, $d[h]), $m[h])
                    }
                    Format::Q4_0 => {
                        let q = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(q));
                        _mm256_mul_ps(_mm256_sub_ps(q, _mm256_set1_ps(8.0)), $d[h])
                    }
                    Format::Q8_0 => {
                        _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q)), $d[h])
                    }
                    Format::Q6K => {
                        // `k` and `k + 1` lie on the same side of column 16.
                        let scale = if $k < QK / 2 { $d[h] } else { $m[h] };
                        _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q)), scale)
                    }
                };
            }
        }
        w
    }};
}

/// # Safety
/// The CPU has AVX2, FMA and F16C; `blocks` holds whole panel blocks of `format` (not F32)
/// and `out` `32 · 16` floats per block.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn dequantize(format: Format, blocks: &[u8], out: &mut [f32]) {
    let pbb = format.panel_block_bytes();
    for (block, out) in blocks
        .chunks_exact(pbb)
        .zip(out.chunks_exact_mut(QK * PANEL))
    {
        let p = block.as_ptr();
        let o = out.as_mut_ptr();
        // SAFETY (all loads and stores): `block` is one panel block of `format` and `out`
        // holds 32 × 16 floats, so every offset stays inside them.
        let (d, m) = block_scales!(format, p);
        for k in (0..QK).step_by(2) {
            let w = column_pair!(format, p, d, m, k);
            for (c, w) in w.iter().enumerate() {
                for (h, &w) in w.iter().enumerate() {
                    _mm256_storeu_ps(o.add((k + c) * PANEL + h * HALF), w);
                }
            }
        }
    }
}

/// Panel blocks between the one a fused kernel reads and the one it asks the cache for.
/// Decode streams every weight once per token, so the blocks come from memory; the hardware
/// prefetcher follows the stream but starts late at each new panel.
const PREFETCH_BLOCKS: usize = 16;

/// Asks for every cache line of panel block `b + PREFETCH_BLOCKS` of the blocks at `blocks`
/// (`pbb` bytes each). A prefetch never faults, so the address may lie past the end of the
/// blocks (the pointer is only computed, with `wrapping_add`, never read).
#[inline(always)]
pub fn prefetch_ahead(blocks: *const u8, b: usize, pbb: usize) {
    let ahead = blocks.wrapping_add((b + PREFETCH_BLOCKS) * pbb);
    for line in (0..pbb).step_by(64) {
        // SAFETY: `_mm_prefetch` is SSE (every x86-64 CPU) and reads nothing: it is a hint.
        unsafe { _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(line).cast()) };
    }
}

/// Rows per call of [`fused`].
pub const FUSED_ROWS: usize = 4;

/// [`tile`] for a few rows, reading the quantized panel blocks directly: each column's
/// weights are dequantized in registers and used at once (same operations, same bits).
///
/// # Safety
/// The CPU has AVX2, FMA and F16C; `tile` passed [`Tile::check`] (with `Weights::Blocks`) for `FUSED_ROWS` and
/// `PANELS`.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn fused(tile: &mut Tile) {
    match tile.rows {
        1 => fused_fixed::<1>(tile),
        2 => fused_fixed::<2>(tile),
        3 => fused_fixed::<3>(tile),
        4 => fused_fixed::<4>(tile),
        _ => unreachable!("Tile::check bounds the rows"),
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn fused_fixed<const R: usize>(tile: &mut Tile) {
    let Weights::Blocks(format, panel_blocks) = tile.weights else {
        unreachable!("fused tiles read quantized blocks")
    };
    let pbb = format.panel_block_bytes();
    let x = tile.x.as_ptr();
    let blocks = panel_blocks[0].as_ptr();
    // SAFETY (all pointer offsets): `Tile::check` verified that `x` holds R rows of `kc` at
    // `x_stride`, `blocks[0]` `kc / 32` panel blocks, and `c` R rows of 16 at `c_stride`.
    let mut acc = load_accumulators::<R>(tile);
    for b in 0..tile.kc / QK {
        prefetch_ahead(blocks, b, pbb);
        let block = blocks.add(b * pbb);
        let (d, m) = block_scales!(format, block);
        for k in (0..QK).step_by(2) {
            let w = column_pair!(format, block, d, m, k);
            for (r, acc) in acc.iter_mut().enumerate() {
                let at = x.add(r * tile.x_stride + b * QK + k);
                for (c, w) in w.iter().enumerate() {
                    let xk = _mm256_set1_ps(*at.add(c));
                    acc[0] = _mm256_fmadd_ps(xk, w[0], acc[0]);
                    acc[1] = _mm256_fmadd_ps(xk, w[1], acc[1]);
                }
            }
        }
    }
    store_accumulators(&acc, tile);
}

/// # Safety
/// The CPU has AVX2 and FMA; `tile` passed [`Tile::check`] for `ROWS` and `PANELS`.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn tile(tile: &mut Tile) {
    match tile.rows {
        1 => tile_fixed::<1>(tile),
        2 => tile_fixed::<2>(tile),
        3 => tile_fixed::<3>(tile),
        4 => tile_fixed::<4>(tile),
        5 => tile_fixed::<5>(tile),
        6 => tile_fixed::<6>(tile),
        _ => unreachable!("Tile::check bounds the rows"),
    }
}

#[target_feature(enable = "avx2,fma")]
unsafe fn tile_fixed<const R: usize>(tile: &mut Tile) {
    let x = tile.x.as_ptr();
    let Weights::F32([w, _]) = tile.weights else {
        unreachable!("Isa::tile sends quantized blocks to `fused`")
    };
    let w = w.as_ptr();
    // SAFETY (all pointer offsets): `Tile::check` verified that `x` holds R rows of `kc` at
    // `x_stride`, `w[0]` `kc × 16` floats, and `c` R rows of 16 at `c_stride`.
    let mut acc = load_accumulators::<R>(tile);
    for k in 0..tile.kc {
        let wk = [
            _mm256_loadu_ps(w.add(k * PANEL)),
            _mm256_loadu_ps(w.add(k * PANEL + HALF)),
        ];
        for (r, acc) in acc.iter_mut().enumerate() {
            let xk = _mm256_set1_ps(*x.add(r * tile.x_stride + k));
            acc[0] = _mm256_fmadd_ps(xk, wk[0], acc[0]);
            acc[1] = _mm256_fmadd_ps(xk, wk[1], acc[1]);
        }
    }
    store_accumulators(&acc, tile);
}

/// A tile's accumulators: the values in `c` when the tile continues their chains, zeros
/// otherwise.
///
/// # Safety
/// The CPU has AVX2; `tile` passed [`Tile::check`] for R rows.
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn load_accumulators<const R: usize>(tile: &Tile) -> [[__m256; 2]; R] {
    let mut acc = [[_mm256_setzero_ps(); 2]; R];
    if tile.accumulate {
        let c = tile.c.as_ptr();
        // SAFETY: `Tile::check` verified that `c` holds R rows of the tile's width.
        for (r, acc) in acc.iter_mut().enumerate() {
            for (h, acc) in acc.iter_mut().enumerate() {
                *acc = _mm256_loadu_ps(c.add(r * tile.c_stride + h * HALF));
            }
        }
    }
    acc
}

/// Writes a tile's accumulators to `c`.
///
/// # Safety
/// The CPU has AVX2; `tile` passed [`Tile::check`] for R rows.
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn store_accumulators<const R: usize>(acc: &[[__m256; 2]; R], tile: &mut Tile) {
    let c = tile.c.as_mut_ptr();
    // SAFETY: `Tile::check` verified that `c` holds R rows of the tile's width.
    for (r, acc) in acc.iter().enumerate() {
        for (h, &acc) in acc.iter().enumerate() {
            _mm256_storeu_ps(c.add(r * tile.c_stride + h * HALF), acc);
        }
    }
}

/// `iterations` rounds of 12 independent FMA chains in registers (the tile's shape, with no
/// loads): returns a value that depends on all of them, so that none is optimised away.
///
/// # Safety
/// The CPU has AVX2 and FMA.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn fma_loop(iterations: usize) -> f32 {
    let mut acc = [_mm256_set1_ps(1.0); 12];
    let a = _mm256_set1_ps(0.999_999);
    let b = _mm256_set1_ps(1e-7);
    for _ in 0..iterations {
        for acc in acc.iter_mut() {
            *acc = _mm256_fmadd_ps(*acc, a, b);
        }
    }
    let mut lanes = [0f32; 8];
    let mut sum = _mm256_setzero_ps();
    for acc in acc {
        sum = _mm256_add_ps(sum, acc);
    }
    _mm256_storeu_ps(lanes.as_mut_ptr(), sum);
    lanes.iter().sum()
}

/// Keys scored at once by [`scaled_dots`]: independent chains that hide the FMA latency.
const KEYS_AT_ONCE: usize = 4;

/// Attention scores: `scores[j] = (query · keys[j·stride..][..d]) · scale`, each dot product
/// in 8 lanes of FMAs summed in order, then the tail (as [`super::portable::scaled_dots`]).
/// Keys go `KEYS_AT_ONCE` at a time, each in its own chain, so every score keeps its bits.
///
/// # Safety
/// The CPU has AVX2 and FMA; `keys` holds `scores.len()` vectors of `query.len()` at `stride`.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn scaled_dots(
    query: &[f32],
    keys: &[f32],
    stride: usize,
    scale: f32,
    scores: &mut [f32],
) {
    let n = scores.len();
    let grouped = n - n % KEYS_AT_ONCE;
    for j0 in (0..grouped).step_by(KEYS_AT_ONCE) {
        let scores = &mut scores[j0..j0 + KEYS_AT_ONCE];
        scaled_dots_of::<KEYS_AT_ONCE>(query, &keys[j0 * stride..], stride, scale, scores);
    }
    for j in grouped..n {
        let scores = &mut scores[j..j + 1];
        scaled_dots_of::<1>(query, &keys[j * stride..], stride, scale, scores);
    }
}

/// [`scaled_dots`] of `N` keys, in `N` chains.
///
/// # Safety
/// As [`scaled_dots`], with `scores.len() == N`.
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn scaled_dots_of<const N: usize>(
    query: &[f32],
    keys: &[f32],
    stride: usize,
    scale: f32,
    scores: &mut [f32],
) {
    let d = query.len();
    let body = d - d % HALF;
    let q = query.as_ptr();
    let k = keys.as_ptr();
    let mut acc = [_mm256_setzero_ps(); N];
    // SAFETY: `i + 8 <= body <= d`, the length of `query` and of each of the N keys, which
    // lie inside `keys` (the caller's contract).
    for i in (0..body).step_by(HALF) {
        let qi = _mm256_loadu_ps(q.add(i));
        for (c, acc) in acc.iter_mut().enumerate() {
            *acc = _mm256_fmadd_ps(qi, _mm256_loadu_ps(k.add(c * stride + i)), *acc);
        }
    }
    for (c, (acc, score)) in acc.iter().zip(scores.iter_mut()).enumerate() {
        let key = &keys[c * stride..c * stride + d];
        let mut lanes = [0f32; HALF];
        _mm256_storeu_ps(lanes.as_mut_ptr(), *acc);
        let tail: f32 = query[body..]
            .iter()
            .zip(&key[body..])
            .map(|(x, y)| x * y)
            .sum();
        *score = (lanes.iter().sum::<f32>() + tail) * scale;
    }
}

/// Registers of outputs [`weighted_sum`] keeps while it runs over every value.
const SUM_REGISTERS: usize = 8;

/// Attention's weighted sum: `out[i] = fma(weights[j], values[j·stride + i], out[i])` for each
/// `j` in order. Each block of 64 outputs stays in registers for the whole run over `j`
/// (instead of a load and a store per value); every output's chain is the same, so its bits.
///
/// # Safety
/// The CPU has AVX2 and FMA; `values` holds `weights.len()` vectors of `out.len()` at `stride`.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn weighted_sum(weights: &[f32], values: &[f32], stride: usize, out: &mut [f32]) {
    let d = out.len();
    let body = d - d % HALF;
    let o = out.as_mut_ptr();
    let v = values.as_ptr();
    let block = SUM_REGISTERS * HALF;
    for i0 in (0..body).step_by(block) {
        let registers = (body - i0).min(block) / HALF;
        let mut acc = [_mm256_setzero_ps(); SUM_REGISTERS];
        // SAFETY (all loads and stores): `i0 + 8·registers <= body <= d`, the length of `out`
        // and of every value vector `j`, which lies inside `values`.
        for (r, acc) in acc.iter_mut().enumerate().take(registers) {
            *acc = _mm256_loadu_ps(o.add(i0 + r * HALF));
        }
        for (j, &weight) in weights.iter().enumerate() {
            let w = _mm256_set1_ps(weight);
            let vj = v.add(j * stride + i0);
            for (r, acc) in acc.iter_mut().enumerate().take(registers) {
                *acc = _mm256_fmadd_ps(w, _mm256_loadu_ps(vj.add(r * HALF)), *acc);
            }
        }
        for (r, acc) in acc.iter().enumerate().take(registers) {
            _mm256_storeu_ps(o.add(i0 + r * HALF), *acc);
        }
    }
    for (i, y) in out.iter_mut().enumerate().skip(body) {
        for (j, &weight) in weights.iter().enumerate() {
            let x = values[j * stride + i];
            *y = _mm_cvtss_f32(_mm_fmadd_ss(
                _mm_set_ss(weight),
                _mm_set_ss(x),
                _mm_set_ss(*y),
            ));
        }
    }
}
