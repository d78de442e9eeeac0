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
//! - `Q4_K`: one 32-value sub-block of a 256-value super-block: the super-block's `d[16]` and
//!   `dmin[16]` (f16), the sub-block's 6-bit `sc[16]` and `m[16]` (a byte each), then the
//!   nibbles as `Q4_0`; value = `(d·sc)·q − dmin·m`. 5.5 bits per weight (the file's 4.5).
//! - `Q6_K`: the super-block's `d[16]` (f16), the signed scales of columns 0..16 and 16..32
//!   (`sc0[16]`, `sc1[16]`), then the 6-bit quants minus 32 as `Q8_0`'s signed bytes;
//!   value = `(d·sc)·q`. 9 bits per weight (the file's 6.6).
//!
//! The K-quants are unpacked at load so that each instruction set dequantizes them as it does
//! the 32-value formats, with the same loads and conversions (decode reads them at about the
//! speed of `Q4_1` and `Q8_0`). `F32` panels are `in × 16` floats. Rows past `out` in the last
//! panel are zero.
//! Every dequantization (here, and in each instruction set's kernels) computes the value with
//! exactly these operations, in this order, so that all give the same bits as candle's
//! `dequantize`.

use half::f16;

/// Output rows per panel.
pub const PANEL: usize = 16;

/// Values per quantization block.
pub const QK: usize = 32;

/// Values per K-quant super-block.
pub const QK_K: usize = 256;

/// The quantized formats of a packed matrix (f32 panels are plain floats).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Q4_0,
    Q4_1,
    Q8_0,
    Q4K,
    Q6K,
}

impl Format {
    /// Bytes per block of 32 columns of one panel.
    pub const fn panel_block_bytes(self) -> usize {
        self.quants_offset()
            + match self {
                Format::Q4_0 | Format::Q4_1 | Format::Q4K => QK * PANEL / 2,
                Format::Q8_0 | Format::Q6K => QK * PANEL,
            }
    }

    /// Where a panel block's quants start, after its per-row scales.
    pub const fn quants_offset(self) -> usize {
        match self {
            // d
            Format::Q4_0 | Format::Q8_0 => 2 * PANEL,
            // d, m; or d, sc0, sc1
            Format::Q4_1 | Format::Q6K => 4 * PANEL,
            // d, dmin, sc, m
            Format::Q4K => 6 * PANEL,
        }
    }

    /// Values of one GGUF block.
    pub const fn gguf_block_values(self) -> usize {
        match self {
            Format::Q4_0 | Format::Q4_1 | Format::Q8_0 => QK,
            Format::Q4K | Format::Q6K => QK_K,
        }
    }

    /// Bytes of one GGUF block.
    pub const fn gguf_block_bytes(self) -> usize {
        match self {
            Format::Q4_0 => 18,
            Format::Q4_1 => 20,
            Format::Q8_0 => 34,
            // d, dmin, 12 bytes of 6-bit scales and mins, 128 bytes of nibbles.
            Format::Q4K => 2 + 2 + 12 + QK_K / 2,
            // 128 bytes of low nibbles, 64 of high 2-bit pairs, 16 signed scales, d.
            Format::Q6K => QK_K / 2 + QK_K / 4 + QK_K / 16 + 2,
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

/// Repacks GGUF blocks (`out` rows of `inp / gguf_block_values` blocks) into panels.
pub fn repack(format: Format, gguf: &[u8], out: usize, inp: usize) -> Vec<u8> {
    let nb = inp / QK;
    let gguf_blocks = inp / format.gguf_block_values();
    let sub_blocks = format.gguf_block_values() / QK;
    let panels = out.div_ceil(PANEL);
    let block_bytes = format.gguf_block_bytes();
    let pbb = format.panel_block_bytes();
    let mut packed = vec![0u8; panels * nb * pbb];
    for (o, row) in gguf
        .chunks_exact(gguf_blocks * block_bytes)
        .enumerate()
        .take(out)
    {
        let (p, t) = (o / PANEL, o % PANEL);
        for (g, block) in row.chunks_exact(block_bytes).enumerate() {
            for sub in 0..sub_blocks {
                let b = g * sub_blocks + sub;
                let dst = &mut packed[(p * nb + b) * pbb..(p * nb + b + 1) * pbb];
                repack_block(format, block, sub, t, dst);
            }
        }
    }
    packed
}

/// Row `t`'s part of one panel block: sub-block `sub` (of 32 values) of the GGUF `block`.
fn repack_block(format: Format, block: &[u8], sub: usize, t: usize, dst: &mut [u8]) {
    let quants = format.quants_offset();
    // Scales and offsets are copied as f16 bytes.
    let mut half_at = |slot: usize, src: usize| {
        let at = slot * 2 * PANEL + 2 * t;
        dst[at..at + 2].copy_from_slice(&block[src..src + 2]);
    };
    let mut nibbles = [0u8; QK];
    match format {
        Format::Q4_0 => {
            half_at(0, 0);
            nibbles = std::array::from_fn(|k| gguf_nibble(&block[2..18], k));
        }
        Format::Q4_1 => {
            half_at(0, 0);
            half_at(1, 2);
            nibbles = std::array::from_fn(|k| gguf_nibble(&block[4..20], k));
        }
        Format::Q4K => {
            half_at(0, 0);
            half_at(1, 2);
            let (sc, m) = scale_min_k4(sub, &block[4..16]);
            dst[4 * PANEL + t] = sc;
            dst[5 * PANEL + t] = m;
            // Sub-blocks 2j and 2j + 1 share 32 bytes: the low nibbles, then the high ones.
            let qs = &block[16 + QK * (sub / 2)..16 + QK * (sub / 2 + 1)];
            let shift = 4 * (sub % 2);
            nibbles = std::array::from_fn(|k| (qs[k] >> shift) & 0x0F);
        }
        Format::Q8_0 => {
            half_at(0, 0);
            for k in 0..QK {
                dst[quants + PANEL * k + t] = block[2 + k];
            }
        }
        Format::Q6K => {
            half_at(0, QK_K / 2 + QK_K / 4 + QK_K / 16);
            let scales = &block[QK_K / 2 + QK_K / 4..];
            dst[2 * PANEL + t] = scales[2 * sub];
            dst[3 * PANEL + t] = scales[2 * sub + 1];
            for k in 0..QK {
                dst[quants + PANEL * k + t] = q6_k_quant(block, QK * sub + k) as u8;
            }
        }
    }
    if matches!(format, Format::Q4_0 | Format::Q4_1 | Format::Q4K) {
        let shift = 4 * (t / 8);
        for (k, q) in nibbles.into_iter().enumerate() {
            dst[quants + 8 * k + t % 8] |= q << shift;
        }
    }
}

/// The 6-bit scale and min of sub-block `j` (0..8) from a K-quant's 12 packed bytes.
pub fn scale_min_k4(j: usize, scales: &[u8]) -> (u8, u8) {
    if j < 4 {
        (scales[j] & 63, scales[j + 4] & 63)
    } else {
        (
            (scales[j + 4] & 0x0F) | ((scales[j - 4] >> 6) << 4),
            (scales[j + 4] >> 4) | ((scales[j] >> 6) << 4),
        )
    }
}

/// Value `v` (0..256) of a `Q6_K` block as its signed quant (−32..32). ggml stores the values
/// in halves of 128, each as four runs of 32: run `r` of half `h` takes the low (`r` even) or
/// high nibbles of `ql[64h + 32(r % 2)..]` and bits `2r..2r + 2` of `qh[32h..]`; the scale of
/// values `16c..16c + 16` is `scales[c]`.
fn q6_k_quant(block: &[u8], v: usize) -> i8 {
    let (ql, qh) = (&block[..QK_K / 2], &block[QK_K / 2..QK_K / 2 + QK_K / 4]);
    let (h, r, l) = (v / 128, v % 128 / 32, v % 32);
    let low = (ql[64 * h + 32 * (r % 2) + l] >> (4 * (r / 2))) & 0x0F;
    let high = (qh[32 * h + l] >> (2 * r)) & 3;
    (low | (high << 4)) as i8 - 32
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
    let qs = &block[format.quants_offset()..];
    let nibble = |k: usize| (qs[8 * k + t % 8] >> (4 * (t / 8))) & 0x0F;
    let byte = |k: usize| qs[PANEL * k + t] as i8;
    let out = &mut out[..QK];
    // Multiplies and adds, never an FMA: ggml rounds each product first.
    match format {
        Format::Q4_0 => {
            for (k, o) in out.iter_mut().enumerate() {
                *o = f32::from(nibble(k) as i8 - 8) * d;
            }
        }
        Format::Q4_1 => {
            let m = f16_at(block, 2 * PANEL + 2 * t);
            for (k, o) in out.iter_mut().enumerate() {
                *o = f32::from(nibble(k)) * d + m;
            }
        }
        Format::Q8_0 => {
            for (k, o) in out.iter_mut().enumerate() {
                *o = f32::from(byte(k)) * d;
            }
        }
        Format::Q4K => {
            let d1 = d * f32::from(block[4 * PANEL + t]);
            let m1 = f16_at(block, 2 * PANEL + 2 * t) * f32::from(block[5 * PANEL + t]);
            for (k, o) in out.iter_mut().enumerate() {
                *o = f32::from(nibble(k)) * d1 - m1;
            }
        }
        Format::Q6K => {
            let scale = |slot: usize| d * f32::from(block[slot * PANEL + t] as i8);
            let (d0, d1) = (scale(2), scale(3));
            for (k, o) in out.iter_mut().enumerate() {
                *o = f32::from(byte(k)) * if k < QK / 2 { d0 } else { d1 };
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
