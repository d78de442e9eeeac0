//! The AVX-512 kernels: one 512-bit register holds the weights of a whole panel (16 outputs)
//! for one `k`; the tile is up to 12 input rows × 2 panels (24 accumulators of the 32
//! registers). Same operations as [`super::portable`], so the same bits.
//!
//! `unsafe` is needed twice over: the intrinsics are `unsafe` to call, and these functions are
//! compiled for AVX-512 (`#[target_feature]`) so that one binary runs on CPUs without it.
//! Callers reach them only through [`super::isa::Isa`], which selects them after
//! `is_x86_feature_detected!` confirmed the features, and which checks every slice length
//! the pointer arithmetic here relies on.
#![allow(unsafe_code)]

use std::arch::x86_64::*;

use super::avx2::prefetch_ahead;
use super::isa::{Tile, Weights};
use super::layout::{Format, PANEL, QK};

/// Input rows per tile.
pub const ROWS: usize = 12;
/// Panels per tile.
pub const PANELS: usize = 2;

/// Sixteen f16 at `$p + $at`, as f32: one per row.
macro_rules! f16_row {
    ($p:expr, $at:expr) => {
        _mm512_cvtph_ps(_mm256_loadu_si256($p.add($at).cast()))
    };
}

/// Sixteen bytes at `$p + $at`, unsigned (`_mm512_cvtepu8_epi32`) or signed
/// (`_mm512_cvtepi8_epi32`), as f32: one per row.
macro_rules! byte_row {
    ($widen:ident, $p:expr, $at:expr) => {
        _mm512_cvtepi32_ps($widen(_mm_loadu_si128($p.add($at).cast())))
    };
}

/// A panel block's two per-row factors, as f32: the scale `d` and the offset `m` (zero for
/// Q4_0 and Q8_0); `d·sc` and `dmin·m` for Q4_K; for Q6_K the scales of columns 0..16 and
/// 16..32, `d·sc0` and `d·sc1`. Each product is rounded as ggml rounds it.
macro_rules! block_scales {
    ($format:expr, $p:expr) => {{
        match $format {
            Format::Q4_0 | Format::Q8_0 => (f16_row!($p, 0), _mm512_setzero_ps()),
            Format::Q4_1 => (f16_row!($p, 0), f16_row!($p, 2 * PANEL)),
            Format::Q4K => (
                _mm512_mul_ps(
                    f16_row!($p, 0),
                    byte_row!(_mm512_cvtepu8_epi32, $p, 4 * PANEL),
                ),
                _mm512_mul_ps(
                    f16_row!($p, 2 * PANEL),
                    byte_row!(_mm512_cvtepu8_epi32, $p, 5 * PANEL),
                ),
            ),
            Format::Q6K => {
                let d = f16_row!($p, 0);
                (
                    _mm512_mul_ps(d, byte_row!(_mm512_cvtepi8_epi32, $p, 2 * PANEL)),
                    _mm512_mul_ps(d, byte_row!(_mm512_cvtepi8_epi32, $p, 3 * PANEL)),
                )
            }
        }
    }};
}

/// The dequantized weights of columns `k` and `k + 1` (even `k`) of a panel block at `p`:
/// one register of 16 rows each, computed as [`super::layout::dequantize_block_row`] does.
macro_rules! column_pair {
    ($format:expr, $p:expr, $d:expr, $m:expr, $k:expr) => {{
        let qs = $p.add($format.quants_offset());
        match $format {
            Format::Q4_0 | Format::Q4_1 | Format::Q4K => {
                let nibble_mask = _mm_set1_epi8(0x0F);
                let v = _mm_loadu_si128(qs.add(8 * $k).cast());
                let lo = _mm_and_si128(v, nibble_mask);
                let hi = _mm_and_si128(_mm_srli_epi16(v, 4), nibble_mask);
                // Bytes 0..8 of `lo` are rows 0..8 of column k, bytes 8..16 those of k + 1;
                // `hi` holds rows 8..16.
                let q0 = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_unpacklo_epi64(lo, hi)));
                let q1 = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_unpackhi_epi64(lo, hi)));
                match $format {
                    Format::Q4_1 => [
                        _mm512_add_ps(_mm512_mul_ps(q0, $d), $m),
                        _mm512_add_ps(_mm512_mul_ps(q1, $d), $m),
                    ],
                    Format::Q4K => [
                        _mm512_sub_ps(_mm512_mul_ps(q0, $d), $m),
                        _mm512_sub_ps(_mm512_mul_ps(q1, $d), $m),
                    ],
                    // Q4_0
                    _ => {
                        let eight = _mm512_set1_ps(8.0);
                        [
                            _mm512_mul_ps(_mm512_sub_ps(q0, eight), $d),
                            _mm512_mul_ps(_mm512_sub_ps(q1, eight), $d),
                        ]
                    }
                }
            }
            Format::Q8_0 | Format::Q6K => {
                // Q6_K: `k` and `k + 1` lie on the same side of column 16.
                let scale = if $format == Format::Q6K && $k >= QK / 2 {
                    $m
                } else {
                    $d
                };
                let q0 = _mm512_cvtepi8_epi32(_mm_loadu_si128(qs.add(PANEL * $k).cast()));
                let q1 = _mm512_cvtepi8_epi32(_mm_loadu_si128(qs.add(PANEL * ($k + 1)).cast()));
                [
                    _mm512_mul_ps(_mm512_cvtepi32_ps(q0), scale),
                    _mm512_mul_ps(_mm512_cvtepi32_ps(q1), scale),
                ]
            }
        }
    }};
}

/// # Safety
/// The CPU has AVX-512F, AVX2, FMA and F16C; `blocks` holds whole panel blocks of `format`
/// (not F32) and `out` `32 · 16` floats per block.
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
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
            _mm512_storeu_ps(o.add(k * PANEL), w[0]);
            _mm512_storeu_ps(o.add((k + 1) * PANEL), w[1]);
        }
    }
}

/// Rows per call of [`fused`].
pub const FUSED_ROWS: usize = 8;

/// [`tile`] for a few rows, reading the quantized panel blocks directly: each column's
/// weights are dequantized in registers and used at once (same operations, same bits), which
/// saves the buffer's stores and loads where there are too few rows to share them.
///
/// # Safety
/// The CPU has AVX-512F, AVX2, FMA and F16C; `tile` passed [`Tile::check`] (with `Weights::Blocks`) for
/// `FUSED_ROWS` and `PANELS`.
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
pub unsafe fn fused(tile: &mut Tile) {
    macro_rules! dispatch {
        ($($r:literal)*) => {
            match (tile.rows, tile.panels) {
                $(($r, 1) => fused_fixed::<$r, 1>(tile), ($r, _) => fused_fixed::<$r, 2>(tile),)*
                _ => unreachable!("Tile::check bounds the rows"),
            }
        };
    }
    dispatch!(1 2 3 4 5 6 7 8)
}

#[target_feature(enable = "avx512f,avx2,fma,f16c")]
unsafe fn fused_fixed<const R: usize, const P: usize>(tile: &mut Tile) {
    let Weights::Blocks(format, panel_blocks) = tile.weights else {
        unreachable!("fused tiles read quantized blocks")
    };
    let pbb = format.panel_block_bytes();
    let x = tile.x.as_ptr();
    let mut blocks = [std::ptr::null::<u8>(); P];
    for (b, panel) in blocks.iter_mut().zip(&panel_blocks) {
        *b = panel.as_ptr();
    }
    // SAFETY (all pointer offsets): `Tile::check` verified that `x` holds R rows of `kc` at
    // `x_stride`, each `blocks[p]` `kc / 32` panel blocks, and `c` R rows of `16 · P` at
    // `c_stride`.
    let mut acc = load_accumulators::<R, P>(tile);
    for b in 0..tile.kc / QK {
        for &block in &blocks {
            prefetch_ahead(block, b, pbb);
        }
        let mut scales = [(_mm512_setzero_ps(), _mm512_setzero_ps()); P];
        for (s, &block) in scales.iter_mut().zip(&blocks) {
            *s = block_scales!(format, block.add(b * pbb));
        }
        for k in (0..QK).step_by(2) {
            for p in 0..P {
                let (d, m) = scales[p];
                let w = column_pair!(format, blocks[p].add(b * pbb), d, m, k);
                for (r, acc) in acc.iter_mut().enumerate() {
                    let at = x.add(r * tile.x_stride + b * QK + k);
                    acc[p] = _mm512_fmadd_ps(_mm512_set1_ps(*at), w[0], acc[p]);
                    acc[p] = _mm512_fmadd_ps(_mm512_set1_ps(*at.add(1)), w[1], acc[p]);
                }
            }
        }
    }
    store_accumulators(&acc, tile);
}

/// # Safety
/// The CPU has AVX-512F; `tile` passed [`Tile::check`] for `ROWS` and `PANELS`.
#[target_feature(enable = "avx512f,avx2,fma")]
pub unsafe fn tile(tile: &mut Tile) {
    macro_rules! dispatch {
        ($($r:literal)*) => {
            match (tile.rows, tile.panels) {
                $(($r, 1) => tile_fixed::<$r, 1>(tile), ($r, _) => tile_fixed::<$r, 2>(tile),)*
                _ => unreachable!("Tile::check bounds the rows"),
            }
        };
    }
    dispatch!(1 2 3 4 5 6 7 8 9 10 11 12)
}

#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn tile_fixed<const R: usize, const P: usize>(tile: &mut Tile) {
    let x = tile.x.as_ptr();
    let mut w = [std::ptr::null::<f32>(); P];
    let Weights::F32(panels) = tile.weights else {
        unreachable!("Isa::tile sends quantized blocks to `fused`")
    };
    for (w, panel) in w.iter_mut().zip(&panels) {
        *w = panel.as_ptr();
    }
    // SAFETY (all pointer offsets): `Tile::check` verified that `x` holds R rows of `kc` at
    // `x_stride`, each `w[p]` `kc × 16` floats, and `c` R rows of `16 · P` at `c_stride`.
    let mut acc = load_accumulators::<R, P>(tile);
    for k in 0..tile.kc {
        let mut wk = [_mm512_setzero_ps(); P];
        for (wk, &w) in wk.iter_mut().zip(&w) {
            *wk = _mm512_loadu_ps(w.add(k * PANEL));
        }
        for (r, acc) in acc.iter_mut().enumerate() {
            let xk = _mm512_set1_ps(*x.add(r * tile.x_stride + k));
            for (acc, &wk) in acc.iter_mut().zip(&wk) {
                *acc = _mm512_fmadd_ps(xk, wk, *acc);
            }
        }
    }
    store_accumulators(&acc, tile);
}

/// A tile's accumulators: the values in `c` when the tile continues their chains, zeros
/// otherwise.
///
/// # Safety
/// The CPU has AVX-512F; `tile` passed [`Tile::check`] for R rows.
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn load_accumulators<const R: usize, const P: usize>(tile: &Tile) -> [[__m512; P]; R] {
    let mut acc = [[_mm512_setzero_ps(); P]; R];
    if tile.accumulate {
        let c = tile.c.as_ptr();
        // SAFETY: `Tile::check` verified that `c` holds R rows of the tile's width.
        for (r, acc) in acc.iter_mut().enumerate() {
            for (p, acc) in acc.iter_mut().enumerate() {
                *acc = _mm512_loadu_ps(c.add(r * tile.c_stride + p * PANEL));
            }
        }
    }
    acc
}

/// Writes a tile's accumulators to `c`.
///
/// # Safety
/// The CPU has AVX-512F; `tile` passed [`Tile::check`] for R rows.
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn store_accumulators<const R: usize, const P: usize>(
    acc: &[[__m512; P]; R],
    tile: &mut Tile,
) {
    let c = tile.c.as_mut_ptr();
    // SAFETY: `Tile::check` verified that `c` holds R rows of the tile's width.
    for (r, acc) in acc.iter().enumerate() {
        for (p, &acc) in acc.iter().enumerate() {
            _mm512_storeu_ps(c.add(r * tile.c_stride + p * PANEL), acc);
        }
    }
}

/// `iterations` rounds of 24 independent FMA chains in registers (the tile's shape, with no
/// loads): returns a value that depends on all of them, so that none is optimised away.
///
/// # Safety
/// The CPU has AVX-512F.
#[target_feature(enable = "avx512f,avx2,fma")]
pub unsafe fn fma_loop(iterations: usize) -> f32 {
    let mut acc = [_mm512_set1_ps(1.0); 24];
    let a = _mm512_set1_ps(0.999_999);
    let b = _mm512_set1_ps(1e-7);
    for _ in 0..iterations {
        for acc in acc.iter_mut() {
            *acc = _mm512_fmadd_ps(*acc, a, b);
        }
    }
    let mut sum = _mm512_setzero_ps();
    for acc in acc {
        sum = _mm512_add_ps(sum, acc);
    }
    _mm512_reduce_add_ps(sum)
}
