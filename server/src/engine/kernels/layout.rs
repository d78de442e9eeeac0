//! The panel layout the kernels read: a weight matrix `[out, in]` is cut into panels of
//! [`PANEL`] output rows, and within a panel the values of one input column `k` for all 16 rows
//! sit next to each other. A GGUF file stores each output row's blocks one after the other;
//! repacking once at load lets a SIMD register hold 16 outputs' weights for one `k`, so both
//! the decode kernel and the blocked GEMM accumulate every output as one plain chain of FMAs
//! along `k` (see [`super`]). The layout keeps the file's quantization: a 4-bit panel is as
//! large as the GGUF blocks it came from.
//!
//! Per block of 32 columns and panel, the quantized formats store:
//! - `Q4_0`: `d[16]` (f16), then 32 × 8 bytes: byte `8k + t` holds row `t`'s nibble in its low
//!   half and row `t + 8`'s in its high half; value = `(q − 8)·d`.
//! - `Q4_1`: `d[16]`, `m[16]` (f16), then the nibbles as `Q4_0`; value = `q·d + m`.
//! - `Q8_0`: `d[16]` (f16), then 32 × 16 signed bytes (`16k + t`); value = `q·d`.
//!
//! and `F32` panels are `in × 16` floats. Rows past `out` in the last panel are zero.
//! Every dequantization (here, and in each instruction set's kernels) computes the value with
//! exactly these operations, in this order, so that all give the same bits as candle's
//! `dequantize`.

use half::f16;

/// Output rows per panel.
pub const PANEL: usize = 16;

/// Values per quantization block.
pub const QK: usize = 32;

/// The quantized formats of a packed matrix (f32 panels are plain floats).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Q4_0,
    Q4_1,
    Q8_0,
}

impl Format {
    /// Bytes per block of 32 columns of one panel.
    pub const fn panel_block_bytes(self) -> usize {
        match self {
            Format::Q4_0 => 2 * PANEL + QK * PANEL / 2,
            Format::Q4_1 => 4 * PANEL + QK * PANEL / 2,
            Format::Q8_0 => 2 * PANEL + QK * PANEL,
        }
    }

    /// Bytes of one GGUF block.
    pub const fn gguf_block_bytes(self) -> usize {
        match self {
            Format::Q4_0 => 18,
            Format::Q4_1 => 20,
            Format::Q8_0 => 34,
        }
    }
}

/// The little-endian f16 at `bytes[at..at + 2]`, as f32 (exact).
#[inline]
pub fn f16_at(bytes: &[u8], at: usize) -> f32 {
    f16::from_bits(u16::from_le_bytes([bytes[at], bytes[at + 1]])).to_f32()
}

/// Quant `j` (0..32) of a GGUF 4-bit block's 16 quant bytes.
fn gguf_nibble(qs: &[u8], j: usize) -> u8 {
    if j < QK / 2 {
        qs[j] & 0x0F
    } else {
        qs[j - QK / 2] >> 4
    }
}

/// Repacks GGUF blocks (`out` rows of `inp / 32` blocks) into panels.
pub fn repack(format: Format, gguf: &[u8], out: usize, inp: usize) -> Vec<u8> {
    let nb = inp / QK;
    let panels = out.div_ceil(PANEL);
    let block_bytes = format.gguf_block_bytes();
    let pbb = format.panel_block_bytes();
    let mut packed = vec![0u8; panels * nb * pbb];
    for (o, row) in gguf.chunks_exact(nb * block_bytes).enumerate().take(out) {
        let (p, t) = (o / PANEL, o % PANEL);
        for (b, block) in row.chunks_exact(block_bytes).enumerate() {
            let dst = &mut packed[(p * nb + b) * pbb..(p * nb + b + 1) * pbb];
            // Scales (and offsets) are copied as f16 bytes.
            dst[2 * t..2 * t + 2].copy_from_slice(&block[0..2]);
            match format {
                Format::Q4_0 | Format::Q4_1 => {
                    let (scales, qs) = if format == Format::Q4_1 {
                        dst[2 * PANEL + 2 * t..2 * PANEL + 2 * t + 2].copy_from_slice(&block[2..4]);
                        (4 * PANEL, &block[4..20])
                    } else {
                        (2 * PANEL, &block[2..18])
                    };
                    let shift = 4 * (t / 8);
                    for k in 0..QK {
                        dst[scales + 8 * k + t % 8] |= gguf_nibble(qs, k) << shift;
                    }
                }
                Format::Q8_0 => {
                    for k in 0..QK {
                        dst[2 * PANEL + PANEL * k + t] = block[2 + k];
                    }
                }
            }
        }
    }
    packed
}

/// GGUF `Q5_0` blocks rewritten as `Q8_0` blocks of the same values: ggml computes a `Q5_0`
/// value as `(q − 16)·d` with `q` 5 bits and `d` an f16, and a `Q8_0` value as `q·d` with `q` a
/// signed byte, so storing `q − 16` as that byte and keeping `d` gives every value bit for bit,
/// and `Q5_0` matrices run on the fast `Q8_0` kernels (in 34 bytes per 32 values instead of 22).
pub fn q5_0_as_q8_0(gguf: &[u8]) -> Vec<u8> {
    const Q5_0_BYTES: usize = 22;
    let mut q8 = Vec::with_capacity(gguf.len() / Q5_0_BYTES * Format::Q8_0.gguf_block_bytes());
    for block in gguf.chunks_exact(Q5_0_BYTES) {
        q8.extend_from_slice(&block[0..2]);
        let qh = u32::from_le_bytes([block[2], block[3], block[4], block[5]]);
        let qs = &block[6..22];
        let fifth = |j: usize| ((qh >> j) & 1) as u8;
        let low = (0..16).map(|j| (qs[j] & 0x0F) | (fifth(j) << 4));
        let high = (0..16).map(|j| (qs[j] >> 4) | (fifth(j + 16) << 4));
        q8.extend(low.chain(high).map(|q| (q as i8 - 16) as u8));
    }
    q8
}

/// Packs a row-major f32 matrix `[out, inp]` into panels of `inp × 16` floats.
pub fn pack_f32(w: &[f32], out: usize, inp: usize) -> Vec<f32> {
    let panels = out.div_ceil(PANEL);
    let mut packed = vec![0f32; panels * inp * PANEL];
    for (o, row) in w.chunks_exact(inp.max(1)).enumerate().take(out) {
        let (p, t) = (o / PANEL, o % PANEL);
        let panel = &mut packed[p * inp * PANEL..(p + 1) * inp * PANEL];
        for (k, &v) in row.iter().enumerate() {
            panel[k * PANEL + t] = v;
        }
    }
    packed
}

/// Row `t` of one quantized panel block, dequantized into `out[..32]`: the value ggml computes.
pub fn dequantize_block_row(format: Format, block: &[u8], t: usize, out: &mut [f32]) {
    let d = f16_at(block, 2 * t);
    match format {
        Format::Q4_0 | Format::Q4_1 => {
            let (qs, m) = if format == Format::Q4_1 {
                (&block[4 * PANEL..], Some(f16_at(block, 2 * PANEL + 2 * t)))
            } else {
                (&block[2 * PANEL..], None)
            };
            let shift = 4 * (t / 8);
            for (k, o) in out[..QK].iter_mut().enumerate() {
                let q = (qs[8 * k + t % 8] >> shift) & 0x0F;
                *o = match m {
                    // A multiply and an add, not an FMA: ggml rounds the product first.
                    Some(m) => f32::from(q) * d + m,
                    None => f32::from(q as i8 - 8) * d,
                };
            }
        }
        Format::Q8_0 => {
            let qs = &block[2 * PANEL..];
            for (k, o) in out[..QK].iter_mut().enumerate() {
                *o = f32::from(qs[PANEL * k + t] as i8) * d;
            }
        }
    }
}

/// One quantized panel block, all 16 rows: `out[k * 16 + t]` = value `k` of row `t`. The
/// portable kernels' dequantization, and the definition the SIMD ones match bit for bit.
pub fn dequantize_block(format: Format, block: &[u8], out: &mut [f32]) {
    let mut row = [0f32; QK];
    for t in 0..PANEL {
        dequantize_block_row(format, block, t, &mut row);
        for (k, &v) in row.iter().enumerate() {
            out[k * PANEL + t] = v;
        }
    }
}
