//! The portable kernels, plain Rust for any target: the fallback on CPUs without AVX2 + FMA,
//! and the definition of the numerics that the SIMD variants reproduce bit for bit (every
//! product is one `mul_add`, every output one chain along `k`).

use super::isa::{Tile, Weights};
use super::layout::{dequantize_block, Format, PANEL, QK};

/// Input rows per tile.
pub const ROWS: usize = 4;
/// Panels per tile.
pub const PANELS: usize = 1;

/// `blocks` (whole panel blocks of `format`) into `out`, `32 · 16` floats per block.
pub fn dequantize(format: Format, blocks: &[u8], out: &mut [f32]) {
    for (block, out) in blocks
        .chunks_exact(format.panel_block_bytes())
        .zip(out.chunks_exact_mut(QK * PANEL))
    {
        dequantize_block(format, block, out);
    }
}

pub fn tile(tile: &mut Tile) {
    let mut acc = [[0f32; PANEL]; ROWS];
    let acc = &mut acc[..tile.rows];
    if tile.accumulate {
        for (r, acc) in acc.iter_mut().enumerate() {
            acc.copy_from_slice(&tile.c[r * tile.c_stride..r * tile.c_stride + PANEL]);
        }
    }
    let Weights::F32([w, _]) = tile.weights else {
        unreachable!("the portable variant has no fused kernel")
    };
    let w = &w[..tile.kc * PANEL];
    for (k, wk) in w.chunks_exact(PANEL).enumerate() {
        for (r, acc) in acc.iter_mut().enumerate() {
            let xk = tile.x[r * tile.x_stride + k];
            for (acc, &wk) in acc.iter_mut().zip(wk) {
                *acc = xk.mul_add(wk, *acc);
            }
        }
    }
    for (r, acc) in acc.iter().enumerate() {
        tile.c[r * tile.c_stride..r * tile.c_stride + PANEL].copy_from_slice(acc);
    }
}

/// Attention scores: `scores[j] = (query · keys[j·stride..][..d]) · scale`, each dot product
/// in 8 lanes of FMAs summed in order, then the tail.
pub fn scaled_dots(query: &[f32], keys: &[f32], stride: usize, scale: f32, scores: &mut [f32]) {
    let d = query.len();
    for (j, score) in scores.iter_mut().enumerate() {
        let key = &keys[j * stride..j * stride + d];
        let mut lanes = [0f32; 8];
        let (q8, k8) = (query.chunks_exact(8), key.chunks_exact(8));
        let tail: f32 = q8
            .remainder()
            .iter()
            .zip(k8.remainder())
            .map(|(x, y)| x * y)
            .sum();
        for (x, y) in q8.zip(k8) {
            for l in 0..8 {
                lanes[l] = x[l].mul_add(y[l], lanes[l]);
            }
        }
        *score = (lanes.iter().sum::<f32>() + tail) * scale;
    }
}

/// Attention's weighted sum: `out[i] = fma(weights[j], values[j·stride + i], out[i])` for each
/// `j` in order.
pub fn weighted_sum(weights: &[f32], values: &[f32], stride: usize, out: &mut [f32]) {
    let d = out.len();
    for (j, &weight) in weights.iter().enumerate() {
        for (y, &x) in out.iter_mut().zip(&values[j * stride..j * stride + d]) {
            *y = weight.mul_add(x, *y);
        }
    }
}
