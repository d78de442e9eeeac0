//! The GGUF formats that products dequantize block by block: `Q5_1` (blocks of 32 values),
//! the K-quant `Q5_K` (super-blocks of 256 values with 6-bit sub-block scales), which is what
//! Q5_K_M files hold; and half-precision matrices (`F16`, `BF16`, taken 32 values at a time),
//! kept at half the memory of f32 and widened exactly. (`Q4_K` and `Q6_K`, the bulk of Q4_K_M
//! and Q6_K files, are unpacked into the interleaved panels of [`super::layout`] instead.)
//!
//! Their blocks are kept as the file stores them, only regrouped by panel: for panel `p` and
//! block `b`, the 16 rows' blocks `b` follow one another. A product dequantizes one panel's
//! chunk of `KC` (256) columns at a time into the f32 buffer the tile kernels read (as the
//! other quantized formats are), so the activations stay f32 and the weights five bits.
//!
//! Every value is computed with exactly ggml's operations, in ggml's order (candle's
//! `to_float`, which a test holds these to bit for bit): `(d·sc)·q − dmin·m`, the
//! products rounded before the subtraction, never fused.

use half::{bf16, f16};

use super::layout::{scale_min_k4, PANEL, QK_K};

/// A block-by-block format and the size of its blocks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RowFormat {
    Q5_1,
    Q5K,
    F16,
    BF16,
}

impl RowFormat {
    /// Values per block.
    pub const fn block_values(self) -> usize {
        match self {
            RowFormat::Q5_1 | RowFormat::F16 | RowFormat::BF16 => 32,
            RowFormat::Q5K => QK_K,
        }
    }

    /// Bytes per block, as in the GGUF file.
    pub const fn block_bytes(self) -> usize {
        match self {
            // d, m, qh (32 fifth bits), 16 bytes of nibbles.
            RowFormat::Q5_1 => 2 + 2 + 4 + 16,
            // d, dmin, 12 bytes of 6-bit scales and mins, 32 bytes of fifth bits, 128 bytes of
            // nibbles.
            RowFormat::Q5K => 2 + 2 + 12 + QK_K / 8 + QK_K / 2,
            // 32 values of 2 bytes.
            RowFormat::F16 | RowFormat::BF16 => 64,
        }
    }

    /// One block's values, into `out[..block_values]`: what ggml computes.
    pub fn dequantize(self, block: &[u8], out: &mut [f32]) {
        match self {
            RowFormat::Q5_1 => q5_1(block, out),
            RowFormat::Q5K => q5_k(block, out),
            RowFormat::F16 => {
                for (o, v) in out.iter_mut().zip(block.chunks_exact(2)) {
                    *o = f16::from_le_bytes([v[0], v[1]]).to_f32();
                }
            }
            RowFormat::BF16 => {
                for (o, v) in out.iter_mut().zip(block.chunks_exact(2)) {
                    *o = bf16::from_le_bytes([v[0], v[1]]).to_f32();
                }
            }
        }
    }
}

/// The little-endian f16 at `bytes[at..at + 2]`, as f32 (exact).
fn f16_at(bytes: &[u8], at: usize) -> f32 {
    f16::from_bits(u16::from_le_bytes([bytes[at], bytes[at + 1]])).to_f32()
}

fn u32_at(bytes: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]])
}

/// Quant `j` and `j + 16` of a 5-bit block: the nibble of byte `j`, and bit `j` (or `j + 16`)
/// of `qh` as the fifth bit.
fn five_bit_pair(qs: &[u8], qh: u32, j: usize) -> (u8, u8) {
    let high_0 = (((qh >> j) << 4) & 0x10) as u8;
    let high_1 = ((qh >> (j + 12)) & 0x10) as u8;
    ((qs[j] & 0x0F) | high_0, (qs[j] >> 4) | high_1)
}

fn q5_1(block: &[u8], out: &mut [f32]) {
    let d = f16_at(block, 0);
    let m = f16_at(block, 2);
    let qh = u32_at(block, 4);
    let qs = &block[8..24];
    for j in 0..16 {
        let (x0, x1) = five_bit_pair(qs, qh, j);
        out[j] = f32::from(x0) * d + m;
        out[j + 16] = f32::from(x1) * d + m;
    }
}

fn q5_k(block: &[u8], out: &mut [f32]) {
    let d = f16_at(block, 0);
    let dmin = f16_at(block, 2);
    let scales = &block[4..16];
    let qh = &block[16..16 + QK_K / 8];
    let qs = &block[16 + QK_K / 8..16 + QK_K / 8 + QK_K / 2];
    for (half_pair, j) in (0..QK_K).step_by(64).enumerate() {
        let ql = &qs[j / 2..j / 2 + 32];
        let is = 2 * half_pair;
        let (u1, u2) = (1u8 << (2 * half_pair), 2u8 << (2 * half_pair));
        let (sc, m) = scale_min_k4(is, scales);
        let (d1, m1) = (d * f32::from(sc), dmin * f32::from(m));
        let (sc, m) = scale_min_k4(is + 1, scales);
        let (d2, m2) = (d * f32::from(sc), dmin * f32::from(m));
        let out = &mut out[j..j + 64];
        for (l, (&low, &high)) in ql.iter().zip(qh).enumerate() {
            let fifth = |bit: u8| if high & bit != 0 { 16f32 } else { 0f32 };
            out[l] = d1 * (f32::from(low & 0x0F) + fifth(u1)) - m1;
            out[l + 32] = d2 * (f32::from(low >> 4) + fifth(u2)) - m2;
        }
    }
}

/// Regroups a GGUF matrix (`out` rows of `inp / block_values` blocks each) by panel: panel `p`,
/// block `b` holds the 16 rows' blocks `b` in row order; rows past `out` are zero bytes (their
/// outputs are never read).
pub fn repack(format: RowFormat, gguf: &[u8], out: usize, inp: usize) -> Vec<u8> {
    let nb = inp / format.block_values();
    let bytes = format.block_bytes();
    let panels = out.div_ceil(PANEL);
    let mut packed = vec![0u8; panels * nb * PANEL * bytes];
    for (o, row) in gguf.chunks_exact(nb * bytes).enumerate().take(out) {
        let (p, t) = (o / PANEL, o % PANEL);
        for (b, block) in row.chunks_exact(bytes).enumerate() {
            let at = ((p * nb + b) * PANEL + t) * bytes;
            packed[at..at + bytes].copy_from_slice(block);
        }
    }
    packed
}

/// One panel's blocks covering `kc` columns (whole blocks), dequantized into `out` in the
/// layout the tiles read: `out[k * 16 + t]` = value `k` of row `t`. Each block is dequantized
/// into a row of its own first (contiguous, so the arithmetic vectorizes), then the 16 rows
/// are interleaved.
pub fn dequantize_chunk(format: RowFormat, blocks: &[u8], kc: usize, out: &mut [f32]) {
    let values = format.block_values();
    let bytes = format.block_bytes();
    let mut rows = [[0f32; QK_K]; PANEL];
    for (b, group) in blocks
        .chunks_exact(PANEL * bytes)
        .take(kc / values)
        .enumerate()
    {
        for (row, block) in rows.iter_mut().zip(group.chunks_exact(bytes)) {
            format.dequantize(block, &mut row[..values]);
        }
        let out = &mut out[b * values * PANEL..(b + 1) * values * PANEL];
        for (k, column) in out.chunks_exact_mut(PANEL).enumerate() {
            for (o, row) in column.iter_mut().zip(&rows) {
                *o = row[k];
            }
        }
    }
}

/// Row `t` of a panel, dequantized into `out[..inp]` (the embedding lookup, the reference twin).
pub fn dequantize_row(format: RowFormat, panel: &[u8], t: usize, out: &mut [f32]) {
    let values = format.block_values();
    let bytes = format.block_bytes();
    for (group, dst) in panel
        .chunks_exact(PANEL * bytes)
        .zip(out.chunks_exact_mut(values))
    {
        format.dequantize(&group[t * bytes..(t + 1) * bytes], dst);
    }
}
