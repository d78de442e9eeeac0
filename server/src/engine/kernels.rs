//! CPU kernels for a quantized GGUF weight matrix times f32 activation rows: every product of
//! the `quantized` weight mode, decode (a few rows per call) and prefill alike. Candle's CPU kernels first round the activations to 8-bit blocks
//! (Q8_0/Q8_1), and for Q4_1 run a generic scalar loop; these keep the activations in f32, so
//! a result differs from the f32 path only by the weights' quantization and the summation
//! order. Decode reads every weight once per token, so the kernels are built around that:
//! each weight row is streamed once per call for all input rows and decoded block by block in
//! registers, and the output rows are shared out between the cores. The inner loops are
//! written over fixed-size arrays in the shapes that LLVM vectorises (AVX2 + FMA under
//! `-C target-cpu=native`; they vectorise even at opt-level 1), without `unsafe`.
//!
//! Numerics are deterministic: each output is computed by one thread in a fixed order that
//! depends neither on the thread count nor on how many rows share the call, so a row's result
//! is bit for bit the same alone or in a batch.

use std::sync::{Arc, Mutex, PoisonError};

use candle_core::quantized::{GgmlDType, QTensor};
use half::f16;

/// Values per block in every supported format.
const QK: usize = 32;

/// Input rows that share one pass over a weight row (more are processed in groups of this
/// many). Eight accumulators and the decoded block nearly fit AVX2's 16 vector registers;
/// measured, groups of 8 beat groups of 4 at 8 rows.
const MAX_GROUP: usize = 8;

/// Lanes of each accumulator: one AVX2 register of f32.
const LANES: usize = 8;

/// A task streams at least this many weight bytes, so that handing it out stays cheap next to
/// the work.
const MIN_TASK_BYTES: usize = 16 * 1024;

/// Tasks per thread when the matrix is large: enough for a thread that finishes early to take
/// over part of the work of a core that is busy with something else.
const TASKS_PER_THREAD: usize = 4;

/// A quantized weight matrix `[out, in]` as stored in GGUF (row-major blocks along `in`).
#[derive(Clone, Debug)]
pub struct QuantizedMatrix {
    format: Format,
    out: usize,
    inp: usize,
    /// The GGUF block bytes, row after row; shared so that clones are cheap.
    data: Arc<[u8]>,
}

/// The block formats these kernels handle.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Format {
    Q4_0,
    Q4_1,
    Q8_0,
}

impl Format {
    fn block_bytes(self) -> usize {
        match self {
            Format::Q4_0 => Q4_0::BYTES,
            Format::Q4_1 => Q4_1::BYTES,
            Format::Q8_0 => Q8_0::BYTES,
        }
    }
}

impl QuantizedMatrix {
    /// From a candle QTensor. Supported: `GgmlDType::Q4_0`, `Q4_1`, `Q8_0`; any other dtype
    /// gives `None`, so that the caller falls back to candle's kernel. The block bytes are
    /// copied: the QTensor can be dropped afterwards.
    pub fn from_qtensor(q: &QTensor) -> candle_core::Result<Option<Self>> {
        let format = match q.dtype() {
            GgmlDType::Q4_0 => Format::Q4_0,
            GgmlDType::Q4_1 => Format::Q4_1,
            GgmlDType::Q8_0 => Format::Q8_0,
            _ => return Ok(None),
        };
        let (out, inp) = q.shape().dims2()?;
        if inp % QK != 0 {
            candle_core::bail!(
                "quantized matrix {out}x{inp}: columns are not whole blocks of {QK}"
            );
        }
        let data = q.data()?;
        let expected = out * (inp / QK) * format.block_bytes();
        if data.len() != expected {
            candle_core::bail!(
                "quantized matrix {out}x{inp} {:?}: {} bytes of blocks, expected {expected}",
                q.dtype(),
                data.len()
            );
        }
        Ok(Some(Self {
            format,
            out,
            inp,
            data: Arc::from(&*data),
        }))
    }

    /// `(out, in)`.
    pub fn dims(&self) -> (usize, usize) {
        (self.out, self.inp)
    }

    /// Bytes of quantized blocks: what one full matmul streams from memory.
    pub fn size_bytes(&self) -> usize {
        self.data.len()
    }

    /// The GGUF dtype of the blocks.
    pub fn dtype(&self) -> GgmlDType {
        match self.format {
            Format::Q4_0 => GgmlDType::Q4_0,
            Format::Q4_1 => GgmlDType::Q4_1,
            Format::Q8_0 => GgmlDType::Q8_0,
        }
    }

    fn row_bytes(&self) -> usize {
        self.inp / QK * self.format.block_bytes()
    }

    fn check_io(&self, xs: &[f32], rows: usize, ys: &[f32]) {
        assert_eq!(
            xs.len(),
            rows * self.inp,
            "matmul_t: xs holds {} values, expected {rows} rows of {}",
            xs.len(),
            self.inp
        );
        assert_eq!(
            ys.len(),
            rows * self.out,
            "matmul_t: ys holds {} values, expected {rows} rows of {}",
            ys.len(),
            self.out
        );
    }

    /// `ys[r*out + o] = Σ_i xs[r*in + i] · W[o, i]` for `r in 0..rows` (`xs` is `rows×in`
    /// row-major f32). Panics if the lengths of `xs` or `ys` do not match `rows`.
    pub fn matmul_t(&self, xs: &[f32], rows: usize, ys: &mut [f32]) {
        self.matmul_t_on(xs, rows, ys, true);
    }

    /// [`Self::matmul_t`], on the calling thread alone unless `parallel`.
    fn matmul_t_on(&self, xs: &[f32], rows: usize, ys: &mut [f32], parallel: bool) {
        self.check_io(xs, rows, ys);
        match self.format {
            Format::Q4_0 => self.matmul_t_with::<Q4_0>(xs, rows, ys, parallel),
            Format::Q4_1 => self.matmul_t_with::<Q4_1>(xs, rows, ys, parallel),
            Format::Q8_0 => self.matmul_t_with::<Q8_0>(xs, rows, ys, parallel),
        }
    }

    /// Slow, obviously-correct reference twin of [`Self::matmul_t`]: dequantizes row by row,
    /// then plain sequential f32 dot products.
    pub fn matmul_t_reference(&self, xs: &[f32], rows: usize, ys: &mut [f32]) {
        self.check_io(xs, rows, ys);
        let mut w = vec![0f32; self.inp];
        for o in 0..self.out {
            self.dequantize_row(o, &mut w);
            for r in 0..rows {
                let x = &xs[r * self.inp..(r + 1) * self.inp];
                let mut sum = 0f32;
                for (&wi, &xi) in w.iter().zip(x) {
                    sum += wi * xi;
                }
                ys[r * self.out + o] = sum;
            }
        }
    }

    /// Dequantizes selected rows (embedding lookup): `out[k*in..(k+1)*in] = W[ids[k], ..]`,
    /// bit for bit what candle's `dequantize` gives. Panics if an id is not a row or `out` does
    /// not hold `ids.len()` rows.
    pub fn rows(&self, ids: &[u32], out: &mut [f32]) {
        assert_eq!(
            out.len(),
            ids.len() * self.inp,
            "rows: out holds {} values, expected {} rows of {}",
            out.len(),
            ids.len(),
            self.inp
        );
        if self.inp == 0 {
            return;
        }
        for (&id, dst) in ids.iter().zip(out.chunks_exact_mut(self.inp)) {
            let o = id as usize;
            assert!(
                o < self.out,
                "rows: id {id} out of range for {} rows",
                self.out
            );
            self.dequantize_row(o, dst);
        }
    }

    fn dequantize_row(&self, o: usize, dst: &mut [f32]) {
        let row_bytes = self.row_bytes();
        let src = &self.data[o * row_bytes..(o + 1) * row_bytes];
        match self.format {
            Format::Q4_0 => dequantize_blocks::<Q4_0>(src, dst),
            Format::Q4_1 => dequantize_blocks::<Q4_1>(src, dst),
            Format::Q8_0 => dequantize_blocks::<Q8_0>(src, dst),
        }
    }

    /// Output rows per task: at least `MIN_TASK_BYTES` of weights, and otherwise a few tasks
    /// per thread.
    fn task_rows(&self) -> usize {
        let min_rows = MIN_TASK_BYTES.div_ceil(self.row_bytes().max(1));
        let threads = candle_core::utils::barrier_pool().n_workers() + 1;
        let tasks = threads * TASKS_PER_THREAD;
        min_rows.max(self.out.div_ceil(tasks)).max(1)
    }

    fn matmul_t_with<B: Block>(&self, xs: &[f32], rows: usize, ys: &mut [f32], parallel: bool) {
        if rows == 0 || self.out == 0 {
            return;
        }
        if self.inp == 0 {
            ys.fill(0.0);
            return;
        }
        let row_bytes = self.row_bytes();
        let acts = Activations::new::<B>(xs, self.inp);
        let chunk = self.task_rows();
        // Task `t` owns output rows `t*chunk..` of every input row: the output is
        // `rows × out`, so a task's part is one slice per input row, collected here. This
        // lets each task stream its weight rows once for all input rows without `unsafe`.
        let ntasks = self.out.div_ceil(chunk);
        let mut tasks: Vec<Vec<&mut [f32]>> =
            (0..ntasks).map(|_| Vec::with_capacity(rows)).collect();
        for y_row in ys.chunks_exact_mut(self.out) {
            for (task, part) in tasks.iter_mut().zip(y_row.chunks_mut(chunk)) {
                task.push(part);
            }
        }
        let run = |t: usize, outs: &mut [&mut [f32]]| {
            let first = t * chunk;
            let n = outs.first().map_or(0, |part| part.len());
            let w = &self.data[first * row_bytes..(first + n) * row_bytes];
            task::<B>(w, row_bytes, &acts, outs);
        };
        if ntasks == 1 || !parallel {
            for (t, mut outs) in tasks.into_iter().enumerate() {
                run(t, &mut outs);
            }
            return;
        }
        // Candle's barrier pool, not rayon: its workers spin between calls and the calling
        // thread takes part, whereas rayon, called from outside its pool, queues the job and
        // blocks the caller: two cross-thread wake-ups per call, which cost about as much as a
        // whole 192×576 product (measured: 11 µs per call with this pool, 18–21 µs with
        // rayon). It is also the pool that candle's own CPU kernels use, so the two do not
        // compete for the cores. Each task's output slices sit behind a lock that exactly one
        // thread takes, once: the safe way to hand them to whichever thread runs the task.
        let tasks: Vec<Mutex<Vec<&mut [f32]>>> = tasks.into_iter().map(Mutex::new).collect();
        candle_core::utils::barrier_pool().execute_chunked(ntasks, |range| {
            for t in range {
                let mut outs = tasks[t].lock().unwrap_or_else(PoisonError::into_inner);
                run(t, &mut outs);
            }
        });
    }
}

/// The input rows of one call, laid out for the kernel: within every block of 32, the values
/// are reordered to the lane order in which [`Block::unpack`] produces the quants (that order
/// is the cheapest to decode, and the activations are reused for every weight row, so
/// reordering them once costs nothing), and for formats with an offset each block's sum is
/// kept (`Σ (d·q + m)·x = d·Σ q·x + m·Σ x`).
struct Activations {
    /// Blocks per input row.
    nb: usize,
    /// `rows × nb` blocks, reordered.
    xs: Vec<[f32; QK]>,
    /// `rows × nb` block sums (empty when the format has no offset).
    sums: Vec<f32>,
}

impl Activations {
    fn new<B: Block>(xs: &[f32], inp: usize) -> Self {
        let mut reordered = vec![[0f32; QK]; xs.len() / QK];
        for (src, dst) in xs.chunks_exact(QK).zip(reordered.iter_mut()) {
            for ((d, &from), &scale) in dst.iter_mut().zip(&B::ORDER).zip(&B::X_SCALE) {
                // Values that the scaling makes subnormal (|x| < 2^-102 for the nibbles kept
                // 24 bits up) are flushed to zero: subnormal operands can be slow, and
                // products of 1e-31 are lost in any sum with normal ones. (Only a row made
                // entirely of such values comes out as zero instead of about 1e-31.)
                let x = src[from] * scale;
                *d = if x.is_subnormal() { 0.0 } else { x };
            }
        }
        let sums = if B::OFFSET {
            xs.chunks_exact(QK).map(block_sum).collect()
        } else {
            Vec::new()
        };
        Self {
            nb: inp / QK,
            xs: reordered,
            sums,
        }
    }

    fn rows(&self) -> usize {
        self.xs.len() / self.nb
    }

    fn row(&self, r: usize) -> &[[f32; QK]] {
        &self.xs[r * self.nb..(r + 1) * self.nb]
    }

    fn sums(&self, r: usize) -> &[f32] {
        if self.sums.is_empty() {
            &[]
        } else {
            &self.sums[r * self.nb..(r + 1) * self.nb]
        }
    }
}

/// The sum of a block of 32 values, in a fixed order that vectorises: a sequential sum would
/// be a chain of 32 additions per block, per call.
fn block_sum(block: &[f32]) -> f32 {
    let mut lanes = [0f32; LANES];
    for chunk in block.chunks_exact(LANES) {
        for (lane, &x) in lanes.iter_mut().zip(chunk) {
            *lane += x;
        }
    }
    reduce_lanes(&lanes)
}

/// One task: the weight rows `w` (each `row_bytes` long) against every input row, in groups of
/// input rows (see [`group_size`]); `outs[r][k]` receives input row `r` against weight row `k`.
fn task<B: Block>(w: &[u8], row_bytes: usize, acts: &Activations, outs: &mut [&mut [f32]]) {
    let rows = acts.rows();
    let mut r0 = 0;
    while r0 < rows {
        let g = group_size(rows - r0);
        let o = &mut outs[r0..r0 + g];
        match g {
            1 => group::<B, 1>(w, row_bytes, acts, r0, o),
            4 => group::<B, 4>(w, row_bytes, acts, r0, o),
            6 => group::<B, 6>(w, row_bytes, acts, r0, o),
            7 => group::<B, 7>(w, row_bytes, acts, r0, o),
            _ => group::<B, MAX_GROUP>(w, row_bytes, acts, r0, o),
        }
        r0 += g;
    }
}

/// How many of `remaining` input rows the next group takes. Only group sizes whose code is
/// fast are used: with 2, 3 or 5 rows the compiled loop ran 4–10× slower per call than with 1
/// or 4 (LLVM vectorises those instances badly; `kernel_throughput` shows it), so such counts
/// are split into groups of 1 and 4. The result does not depend on the grouping (each row's
/// sum runs in the same order), only the speed does.
fn group_size(remaining: usize) -> usize {
    match remaining {
        0..=3 => 1,
        4 | 5 => 4,
        6 | 7 => remaining,
        _ => MAX_GROUP,
    }
}

/// Input rows `r0..r0 + R` against every weight row of `w`.
fn group<B: Block, const R: usize>(
    w: &[u8],
    row_bytes: usize,
    acts: &Activations,
    r0: usize,
    outs: &mut [&mut [f32]],
) {
    let x: [&[[f32; QK]]; R] = std::array::from_fn(|r| acts.row(r0 + r));
    let sums: [&[f32]; R] = std::array::from_fn(|r| acts.sums(r0 + r));
    for (k, w_row) in w.chunks_exact(row_bytes).enumerate() {
        let dots = dot_rows::<B, R>(w_row, &x, &sums);
        for (out, dot) in outs.iter_mut().zip(dots) {
            out[k] = dot;
        }
    }
}

/// One weight row against `R` input rows. Each block is unpacked once into 32 f32 quants
/// (four registers) and reused for every input row. Per input row and block, the 32 products
/// are summed in two short chains and scaled by the block's `d` into the row's 8-lane
/// accumulator; the offset term `Σ_b m_b·Σx_b` goes to a scalar accumulator. The
/// loop-carried dependencies are single FMAs, so even one row keeps the FMA units busy, and
/// the summation order does not depend on `R`.
#[inline(always)]
fn dot_rows<B: Block, const R: usize>(
    w_row: &[u8],
    x: &[&[[f32; QK]]; R],
    sums: &[&[f32]; R],
) -> [f32; R] {
    // With more than two rows, the offsets' accumulators would push the others out of the 16
    // vector registers: they get a pass of their own (same order, so the same sums).
    let offsets_inline = B::OFFSET && R <= 2;
    let mut acc = [[0f32; LANES]; R];
    let mut acc_offset = [0f32; R];
    // Every slice is cut to exactly `nb` and `b` runs over `0..nb`, so that the compiler
    // drops the bounds checks.
    let nb = w_row.len() / B::BYTES;
    let x: [&[[f32; QK]]; R] = std::array::from_fn(|r| &x[r][..nb]);
    let sums: [&[f32]; R] = std::array::from_fn(|r| if B::OFFSET { &sums[r][..nb] } else { &[] });
    for (block, b) in w_row.chunks_exact(B::BYTES).zip(0..nb) {
        let u = B::unpack(block);
        for r in 0..R {
            let x = &x[r][b];
            let mut lo = [0f32; LANES];
            let mut hi = [0f32; LANES];
            for l in 0..LANES {
                lo[l] = u.q[0][l] * x[l];
            }
            for l in 0..LANES {
                hi[l] = u.q[2][l] * x[2 * LANES + l];
            }
            for l in 0..LANES {
                lo[l] = u.q[1][l].mul_add(x[LANES + l], lo[l]);
            }
            for l in 0..LANES {
                hi[l] = u.q[3][l].mul_add(x[3 * LANES + l], hi[l]);
            }
            for l in 0..LANES {
                acc[r][l] = u.scale.mul_add(lo[l] + hi[l], acc[r][l]);
            }
            if offsets_inline {
                acc_offset[r] = u.offset.mul_add(sums[r][b], acc_offset[r]);
            }
        }
    }
    if B::OFFSET && !offsets_inline {
        for (block, b) in w_row.chunks_exact(B::BYTES).zip(0..nb) {
            let offset = B::offset(block);
            for r in 0..R {
                acc_offset[r] = offset.mul_add(sums[r][b], acc_offset[r]);
            }
        }
    }
    let mut dots = [0f32; R];
    for r in 0..R {
        dots[r] = reduce_lanes(&acc[r]) + acc_offset[r];
    }
    dots
}

/// One register of f32: the compiler keeps these in AVX2 registers.
type V8 = [f32; LANES];

/// Sums the lanes in order. Deliberately sequential: LLVM's SLP vectoriser (rustc 1.95) turns
/// a pairwise tree here into 2-lane vectors for the whole kernel, halving its speed.
#[inline(always)]
fn reduce_lanes(a: &V8) -> f32 {
    a.iter().sum()
}

/// Dequantizes whole blocks (`src`) into `dst` (32 values per block).
fn dequantize_blocks<B: Block>(src: &[u8], dst: &mut [f32]) {
    for (block, out) in src.chunks_exact(B::BYTES).zip(dst.chunks_exact_mut(QK)) {
        B::dequantize(block, out);
    }
}

/// The little-endian f16 at `bytes[at..at + 2]`.
#[inline(always)]
fn f16_at(bytes: &[u8], at: usize) -> f32 {
    f16::from_bits(u16::from_le_bytes([bytes[at], bytes[at + 1]])).to_f32()
}

/// A block unpacked for the kernel: with `p = 8c + l`, value `ORDER[p]` of the block is
/// `scale · q[c][l] · X_SCALE[p] + offset` (mathematically: the kernel applies `scale` and
/// `offset` to sums, and `X_SCALE` to the activations).
struct Unpacked {
    scale: f32,
    offset: f32,
    q: [V8; 4],
}

/// A ggml block format of 32 values.
trait Block {
    /// Bytes per block.
    const BYTES: usize;
    /// Lane `p` of [`Block::unpack`]'s quants is value `ORDER[p]` of the block.
    const ORDER: [usize; QK];
    /// Lane `p` of [`Block::unpack`]'s quants is the quant divided by `X_SCALE[p]`; the
    /// activations are multiplied by it (an exact power of two).
    const X_SCALE: [f32; QK];
    /// Whether [`Unpacked::offset`] can be nonzero.
    const OFFSET: bool;
    /// The block's 32 values in order, computed exactly as ggml (and candle's `dequantize`)
    /// do: for embedding lookups and the reference.
    fn dequantize(block: &[u8], out: &mut [f32]);
    /// The block's quants as f32, in `ORDER`, with its scale and offset.
    fn unpack(block: &[u8]) -> Unpacked;
    /// [`Unpacked::offset`] alone.
    fn offset(block: &[u8]) -> f32;
}

/// Where lane `p` of [`unpack_nibbles`] finds its nibble: the little-endian word `p % 4` of
/// the block's 16 quant bytes, at this bit position.
const fn nibble_bit(p: usize) -> usize {
    let (c, l) = (p / LANES, p % LANES);
    // Vectors 0 and 1 take the low nibbles of bytes (0, 1) and (2, 3) of each word, vectors
    // 2 and 3 the high nibbles; lanes 0..4 the first byte of each pair, lanes 4..8 the second.
    16 * (c % 2) + 8 * (l / 4) + 4 * (c / 2)
}

/// Lane order of [`unpack_nibbles`]: lane `p` holds value `NIBBLE_ORDER[p]` of the block.
const NIBBLE_ORDER: [usize; QK] = {
    let mut order = [0; QK];
    let mut p = 0;
    while p < QK {
        let bit = nibble_bit(p);
        // Byte `bit / 8` of word `p % 4`; its low nibble is value `j`, its high one `j + 16`.
        order[p] = 4 * (p % 4) + bit / 8 + QK / 2 * (bit % 8 / 4);
        p += 1;
    }
    order
};

/// [`unpack_nibbles`] leaves each nibble `q` in place, i.e. as `q · 2^k` with `k` the bit
/// position of its byte (0, 8, 16 or 24); the activations carry the compensating `2^-k`.
const NIBBLE_SCALE: [f32; QK] = {
    let mut scale = [0f32; QK];
    let mut p = 0;
    while p < QK {
        scale[p] = match nibble_bit(p) / 8 {
            0 => 1.0,
            1 => 1.0 / 256.0,
            2 => 1.0 / 65536.0,
            _ => 1.0 / 16_777_216.0,
        };
        p += 1;
    }
    scale
};

/// The 32 nibbles of a 4-bit block (`qs[j] & 0xF` is value `j`, `qs[j] >> 4` value
/// `j + 16`) as f32, in [`NIBBLE_ORDER`] and scaled by `1 / NIBBLE_SCALE`. The 16 bytes are
/// read as four little-endian words repeated over the 8 lanes (one broadcast load), and once
/// more shifted right by 4 to bring the high nibbles down; each vector is then one mask and
/// one conversion, all within 32-bit lanes. The kernel is bound by exactly this decode at one
/// row: widening bytes or 16-bit words instead costs four cross-lane shuffles per block, and
/// shifting every nibble down to bit 0 four more shifts (measured: 29 instructions per block
/// against 25, also when keeping nibbles at most 8 bits up). Leaving a nibble at bit `k` is
/// exact (`q · 2^k < 2^28`), and so is its product with `x · 2^-k` unless that is subnormal
/// (see [`Activations::new`]).
#[inline(always)]
fn unpack_nibbles(qs: &[u8]) -> [V8; 4] {
    let qs: &[u8; QK / 2] = qs.try_into().expect("invariant: 16 nibble bytes");
    let mut words = [0u32; LANES];
    for (l, word) in words.iter_mut().enumerate() {
        let t = l % 4;
        *word = u32::from_le_bytes([qs[4 * t], qs[4 * t + 1], qs[4 * t + 2], qs[4 * t + 3]]);
    }
    let mut q = [[0f32; LANES]; 4];
    for (c, q) in q.iter_mut().enumerate() {
        for l in 0..LANES {
            let bit = nibble_bit(c * LANES + l);
            let low = bit / 8 * 8;
            // As i32: the value is below 2^28, and the signed conversion is the cheap one.
            q[l] = (((words[l] >> (bit - low)) & (0x0F << low)) as i32) as f32;
        }
    }
    q
}

/// `{ d: f16, qs: [u8; 16] }`: value `j` is `d * ((qs[j] & 0xF) - 8)`, value `j + 16` is
/// `d * ((qs[j] >> 4) - 8)`.
struct Q4_0;

impl Block for Q4_0 {
    const BYTES: usize = 18;
    const ORDER: [usize; QK] = NIBBLE_ORDER;
    const X_SCALE: [f32; QK] = NIBBLE_SCALE;
    const OFFSET: bool = true;

    fn dequantize(block: &[u8], out: &mut [f32]) {
        let d = f16_at(block, 0);
        for (j, &q) in block[2..Self::BYTES].iter().enumerate() {
            out[j] = f32::from((q & 0x0F) as i8 - 8) * d;
            out[j + QK / 2] = f32::from((q >> 4) as i8 - 8) * d;
        }
    }

    #[inline(always)]
    fn unpack(block: &[u8]) -> Unpacked {
        let block: &[u8; 18] = block.try_into().expect("invariant: Q4_0 block is 18 bytes");
        let scale = f16_at(block, 0);
        Unpacked {
            scale,
            offset: -8.0 * scale,
            q: unpack_nibbles(&block[2..]),
        }
    }

    #[inline(always)]
    fn offset(block: &[u8]) -> f32 {
        -8.0 * f16_at(block, 0)
    }
}

/// `{ d: f16, m: f16, qs: [u8; 16] }`: value `j` is `d * (qs[j] & 0xF) + m`, value `j + 16`
/// is `d * (qs[j] >> 4) + m`.
struct Q4_1;

impl Block for Q4_1 {
    const BYTES: usize = 20;
    const ORDER: [usize; QK] = NIBBLE_ORDER;
    const X_SCALE: [f32; QK] = NIBBLE_SCALE;
    const OFFSET: bool = true;

    fn dequantize(block: &[u8], out: &mut [f32]) {
        let (d, m) = (f16_at(block, 0), f16_at(block, 2));
        for (j, &q) in block[4..Self::BYTES].iter().enumerate() {
            // A multiply and an add, not an FMA: ggml rounds the product first.
            out[j] = f32::from(q & 0x0F) * d + m;
            out[j + QK / 2] = f32::from(q >> 4) * d + m;
        }
    }

    #[inline(always)]
    fn unpack(block: &[u8]) -> Unpacked {
        let block: &[u8; 20] = block.try_into().expect("invariant: Q4_1 block is 20 bytes");
        Unpacked {
            scale: f16_at(block, 0),
            offset: f16_at(block, 2),
            q: unpack_nibbles(&block[4..]),
        }
    }

    #[inline(always)]
    fn offset(block: &[u8]) -> f32 {
        f16_at(block, 2)
    }
}

/// `{ d: f16, qs: [i8; 32] }`: value `j` is `d * qs[j]`.
struct Q8_0;

impl Block for Q8_0 {
    const BYTES: usize = 34;
    const ORDER: [usize; QK] = {
        let mut order = [0; QK];
        let mut p = 0;
        while p < QK {
            order[p] = p;
            p += 1;
        }
        order
    };
    const X_SCALE: [f32; QK] = [1.0; QK];
    const OFFSET: bool = false;

    fn dequantize(block: &[u8], out: &mut [f32]) {
        let d = f16_at(block, 0);
        for (o, &q) in out.iter_mut().zip(&block[2..Self::BYTES]) {
            *o = f32::from(q as i8) * d;
        }
    }

    #[inline(always)]
    fn unpack(block: &[u8]) -> Unpacked {
        let block: &[u8; 34] = block.try_into().expect("invariant: Q8_0 block is 34 bytes");
        let qs = &block[2..];
        let mut q = [[0f32; LANES]; 4];
        for (c, q) in q.iter_mut().enumerate() {
            for l in 0..LANES {
                q[l] = f32::from(qs[c * LANES + l] as i8);
            }
        }
        Unpacked {
            scale: f16_at(block, 0),
            offset: 0.0,
            q,
        }
    }

    fn offset(_block: &[u8]) -> f32 {
        0.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Module, Tensor};

    const FORMATS: [GgmlDType; 3] = [GgmlDType::Q4_0, GgmlDType::Q4_1, GgmlDType::Q8_0];

    fn random_qtensor(out: usize, inp: usize, dtype: GgmlDType) -> QTensor {
        let w = Tensor::randn(0f32, 1f32, (out, inp), &Device::Cpu).expect("randn");
        QTensor::quantize(&w, dtype).expect("quantize")
    }

    fn random_xs(rows: usize, inp: usize) -> Vec<f32> {
        Tensor::randn(0f32, 1f32, (rows * inp,), &Device::Cpu)
            .and_then(|t| t.to_vec1::<f32>())
            .expect("randn")
    }

    /// `max |a - b|` relative to `max |b|` (dot products cancel, so an element-wise relative
    /// error would be meaningless for outputs near zero).
    fn rel_err(a: &[f32], b: &[f32]) -> f32 {
        assert_eq!(a.len(), b.len());
        let scale = b
            .iter()
            .fold(0f32, |m, v| m.max(v.abs()))
            .max(f32::MIN_POSITIVE);
        let diff = a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
        diff / scale
    }

    fn check_matmul(out: usize, inp: usize, dtype: GgmlDType, rows_list: &[usize]) {
        let q = random_qtensor(out, inp, dtype);
        let m = QuantizedMatrix::from_qtensor(&q)
            .expect("from_qtensor")
            .expect("supported");
        assert_eq!(m.dims(), (out, inp));
        assert_eq!(m.dtype(), dtype);
        assert_eq!(m.size_bytes(), q.storage_size_in_bytes());
        let w = q.dequantize(&Device::Cpu).expect("dequantize");
        for &rows in rows_list {
            let xs = random_xs(rows, inp);
            let mut fast = vec![f32::NAN; rows * out];
            let mut reference = vec![f32::NAN; rows * out];
            m.matmul_t(&xs, rows, &mut fast);
            m.matmul_t_reference(&xs, rows, &mut reference);
            let err = rel_err(&fast, &reference);
            assert!(
                err <= 1e-4,
                "{dtype:?} {out}x{inp} rows={rows}: fast vs reference {err}"
            );

            let x = Tensor::from_slice(&xs, (rows, inp), &Device::Cpu).expect("x");
            let candle = x
                .matmul(&w.t().expect("t"))
                .and_then(|y| y.flatten_all())
                .and_then(|y| y.to_vec1::<f32>())
                .expect("candle matmul");
            let err = rel_err(&reference, &candle);
            assert!(
                err <= 1e-4,
                "{dtype:?} {out}x{inp} rows={rows}: reference vs candle {err}"
            );
        }
    }

    #[test]
    fn matmul_t_matches_reference_and_candle() {
        for dtype in FORMATS {
            for (out, inp) in [(192, 576), (1536, 576), (576, 1536), (100, 64)] {
                check_matmul(out, inp, dtype, &[1, 3, 8]);
            }
        }
    }

    #[test]
    fn more_rows_than_one_group() {
        for dtype in FORMATS {
            check_matmul(100, 64, dtype, &[11, 17]);
        }
    }

    /// The 4-bit kernels scale activations by down to 2^-24 (exactly): small but normal values
    /// must come through unharmed.
    #[test]
    fn small_activations() {
        for dtype in FORMATS {
            let (out, inp, rows) = (100, 256, 2);
            let m = QuantizedMatrix::from_qtensor(&random_qtensor(out, inp, dtype))
                .expect("from_qtensor")
                .expect("supported");
            let xs: Vec<f32> = random_xs(rows, inp).iter().map(|x| x * 1e-25).collect();
            let mut fast = vec![0f32; rows * out];
            let mut reference = vec![0f32; rows * out];
            m.matmul_t(&xs, rows, &mut fast);
            m.matmul_t_reference(&xs, rows, &mut reference);
            let err = rel_err(&fast, &reference);
            assert!(err <= 1e-4, "{dtype:?}: fast vs reference {err}");
        }
    }

    #[test]
    fn rows_equal_dequantized_rows_exactly() {
        for dtype in FORMATS {
            let (out, inp) = (100, 128);
            let q = random_qtensor(out, inp, dtype);
            let m = QuantizedMatrix::from_qtensor(&q)
                .expect("from_qtensor")
                .expect("supported");
            let w = q
                .dequantize(&Device::Cpu)
                .and_then(|w| w.flatten_all())
                .and_then(|w| w.to_vec1::<f32>())
                .expect("dequantize");
            let ids = [0u32, 99, 7, 7, 42];
            let mut got = vec![f32::NAN; ids.len() * inp];
            m.rows(&ids, &mut got);
            for (k, &id) in ids.iter().enumerate() {
                let want = &w[id as usize * inp..(id as usize + 1) * inp];
                let got = &got[k * inp..(k + 1) * inp];
                let same = want
                    .iter()
                    .zip(got)
                    .all(|(a, b)| a.to_bits() == b.to_bits());
                assert!(same, "{dtype:?}: row {id} differs from candle's dequantize");
            }
        }
    }

    /// A row's result is bit for bit the same alone or in a batch, and with one thread or many.
    #[test]
    fn deterministic_across_batch_and_threads() {
        for dtype in FORMATS {
            let (out, inp, rows) = (1536, 576, 8);
            let m = QuantizedMatrix::from_qtensor(&random_qtensor(out, inp, dtype))
                .expect("from_qtensor")
                .expect("supported");
            let xs = random_xs(rows, inp);
            let mut batched = vec![0f32; rows * out];
            m.matmul_t(&xs, rows, &mut batched);
            for r in 0..rows {
                let mut alone = vec![0f32; out];
                m.matmul_t(&xs[r * inp..(r + 1) * inp], 1, &mut alone);
                let same = alone
                    .iter()
                    .zip(&batched[r * out..(r + 1) * out])
                    .all(|(a, b)| a.to_bits() == b.to_bits());
                assert!(same, "{dtype:?}: row {r} differs between batch and alone");
            }
            let mut serial = vec![0f32; rows * out];
            m.matmul_t_on(&xs, rows, &mut serial, false);
            let same = serial
                .iter()
                .zip(&batched)
                .all(|(a, b)| a.to_bits() == b.to_bits());
            assert!(same, "{dtype:?}: one thread differs from the pool");
        }
    }

    #[test]
    fn unsupported_dtypes_fall_back() {
        let w = Tensor::randn(0f32, 1f32, (64, 256), &Device::Cpu).expect("randn");
        for dtype in [GgmlDType::F32, GgmlDType::Q4K, GgmlDType::Q8_1] {
            let q = QTensor::quantize(&w, dtype).expect("quantize");
            assert!(QuantizedMatrix::from_qtensor(&q)
                .expect("from_qtensor")
                .is_none());
        }
    }

    /// Best of `reps` timings of `iters` calls, in seconds per call.
    fn best_time(reps: usize, iters: usize, mut f: impl FnMut()) -> f64 {
        f();
        (0..reps)
            .map(|_| {
                let start = std::time::Instant::now();
                for _ in 0..iters {
                    f();
                }
                start.elapsed().as_secs_f64() / iters as f64
            })
            .fold(f64::INFINITY, f64::min)
    }

    /// Throughput against candle's `QMatMul` (best of 10 timings); prints, asserts nothing.
    /// Run with `cargo test -p mezo-server --lib kernels -- --ignored --nocapture` on an idle
    /// machine. Each case repeats one matrix, which then stays in cache unless it is larger
    /// than the last-level cache (the 49152×576 one), so the GB/s of the small ones are not
    /// memory bandwidth.
    #[test]
    #[ignore = "benchmark: prints timings, asserts nothing"]
    fn kernel_throughput() {
        let cases = [
            (1, 1536, 576, GgmlDType::Q4_1),
            (2, 1536, 576, GgmlDType::Q4_1),
            (3, 1536, 576, GgmlDType::Q4_1),
            (4, 1536, 576, GgmlDType::Q4_1),
            (5, 1536, 576, GgmlDType::Q4_1),
            (6, 1536, 576, GgmlDType::Q4_1),
            (7, 1536, 576, GgmlDType::Q4_1),
            (8, 1536, 576, GgmlDType::Q4_1),
            (1, 576, 1536, GgmlDType::Q4_1),
            (8, 576, 1536, GgmlDType::Q4_1),
            (1, 576, 576, GgmlDType::Q4_1),
            (1, 192, 576, GgmlDType::Q4_1),
            (1, 49152, 576, GgmlDType::Q8_0),
            (2, 49152, 576, GgmlDType::Q8_0),
            (3, 49152, 576, GgmlDType::Q8_0),
            (8, 49152, 576, GgmlDType::Q8_0),
        ];
        println!(
            "threads: {}",
            candle_core::utils::barrier_pool().n_workers() + 1
        );
        for (rows, out, inp, dtype) in cases {
            let q = random_qtensor(out, inp, dtype);
            let m = QuantizedMatrix::from_qtensor(&q)
                .expect("from_qtensor")
                .expect("supported");
            let bytes = m.size_bytes() as f64;
            let xs = random_xs(rows, inp);
            // Enough calls per timing for ~20 ms at 10 GB/s.
            let iters = ((2e8 / bytes) as usize).clamp(3, 2000);
            let mut ys = vec![0f32; rows * out];
            let ours = best_time(10, iters, || m.matmul_t(&xs, rows, &mut ys));
            let qmm = candle_core::quantized::QMatMul::from_qtensor(q).expect("qmatmul");
            let x = Tensor::from_slice(&xs, (rows, inp), &Device::Cpu).expect("x");
            let theirs = best_time(10, iters, || {
                qmm.forward(&x).expect("forward");
            });
            println!(
                "{rows}x{inp} · ({out}x{inp})ᵀ {dtype:?} {:.2} MB: ours {:.4} ms ({:.1} GB/s), \
                 candle {:.4} ms ({:.1} GB/s), {:.1}x",
                bytes / 1e6,
                ours * 1e3,
                bytes / ours / 1e9,
                theirs * 1e3,
                bytes / theirs / 1e9,
                theirs / ours
            );
        }
    }
}
