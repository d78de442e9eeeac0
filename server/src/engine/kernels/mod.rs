//! The matrix products of the engine: `ys = xs · Wᵀ` for f32 activation rows `xs` and a weight
//! matrix kept either as GGUF 4/8-bit blocks (`quantized` mode) or as f32 (`f32` mode), for one
//! decode row and for a training batch of thousands alike.
//!
//! - [`layout`]: the matrix is repacked at load into panels of 16 output rows, interleaved
//!   along `k`, keeping its quantization (`Q4_0`, `Q4_1`, `Q8_0`; `Q5_0` as the `Q8_0` of the
//!   same values; `Q4_K` and `Q6_K` unpacked into 32-value sub-blocks). [`row_blocks`] keeps
//!   the rarer `Q5_1`, `Q5_K` and half-precision matrices as whole GGUF blocks per row,
//!   dequantized by portable code (one-row decode of those is several times slower).
//! - The product is a blocked GEMM: per panel (two on AVX-512) and chunk of `KC` columns,
//!   the weights are dequantized once into an f32 buffer that stays in L1 (f32 panels are read
//!   in place), and a register-blocked outer-product tile kernel runs every block of input
//!   rows over it ([`isa::Tile`]: 12×32 on AVX-512, 6×16 on AVX2, 4×16 portable). Panels are
//!   shared out between the cores. Decode's few rows (up to 8 on AVX-512, 4 on AVX2) skip the
//!   buffer: a fused kernel dequantizes each column's weights in registers and uses them at
//!   once, sweeping every column of a panel in one pass with the next blocks prefetched, and
//!   the products that share their input (q, k, v; gate, up) go to the cores as one list of
//!   tasks ([`PackedMatrix::products_new`]).
//! - [`isa`]: the variant is chosen at run time from the CPU's features (`avx512`, `avx2`,
//!   `portable`); no build flag is needed.
//!
//! Numerics: activations stay f32 (no 8-bit rounding: MeZO measures loss differences of about
//! ε·|∇L| between θ+εz and θ−εz, which rounding the activations to 8 bits would drown), every
//! weight is dequantized exactly as candle's `dequantize`, and every
//! output is one chain of FMAs along `k` from 0 to `in`. So a row's result is bit for bit the
//! same alone or in any batch, on any thread count, with every variant, and in both weight
//! modes; and it equals [`PackedMatrix::matmul_t_reference`], the plain scalar twin.

#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;
pub mod isa;
pub mod layout;
mod portable;
pub mod row_blocks;

use std::cell::RefCell;
use std::mem::MaybeUninit;
use std::sync::{Arc, Mutex, PoisonError};

use candle_core::quantized::{GgmlDType, QTensor};

use isa::{Isa, Tile, Weights};
use layout::{Format, PANEL, QK};
use row_blocks::RowFormat;

/// Columns per chunk: one panel's dequantized chunk is `KC × 16` floats (16 KiB), so the two
/// an AVX-512 tile reads stay in L1 with the input rows' slices. A multiple of [`QK`].
const KC: usize = 256;

/// Input rows per block: the block's slice of a chunk (`MC × KC` floats, 240 KiB) stays in L2
/// while every panel of a task passes over it. A multiple of every variant's tile rows.
const MC: usize = 240;

/// A task reads at least this many weight bytes, so that handing it out stays cheap next to
/// the work.
const MIN_TASK_BYTES: usize = 16 * 1024;

/// Tasks per thread when the matrix is large: enough for a thread that finishes early to take
/// over part of the work of a core that is busy with something else.
const TASKS_PER_THREAD: usize = 4;

/// A value the products write exactly once: `f32` in a caller's buffer, or `MaybeUninit<f32>`
/// in a new vector that is not zero-filled first (filling it cost about as much as the copy
/// of the results: `memset` was 4–5% of a training step's profile).
pub trait OutputValue: Send {
    fn write_all(dst: &mut [Self], src: &[f32])
    where
        Self: Sized;
}

impl OutputValue for f32 {
    fn write_all(dst: &mut [f32], src: &[f32]) {
        dst.copy_from_slice(src);
    }
}

impl OutputValue for MaybeUninit<f32> {
    fn write_all(dst: &mut [MaybeUninit<f32>], src: &[f32]) {
        dst.write_copy_of_slice(src);
    }
}

/// One thread's buffers for [`PackedMatrix::task`], kept between calls: a row block's results
/// and two panels' dequantized chunk (allocating and zeroing them per task showed in the
/// profile of every batched product).
struct TaskScratch {
    results: Vec<f32>,
    panels: [Vec<f32>; 2],
}

thread_local! {
    static TASK_SCRATCH: RefCell<TaskScratch> = RefCell::new(TaskScratch {
        results: Vec::new(),
        panels: [vec![0f32; KC * PANEL], vec![0f32; KC * PANEL]],
    });
}

/// One task of a product call: panels `panels` of `matrix` against every input row, row
/// `r`'s columns of these panels written to `outs[r]`.
struct ProductTask<'a, T> {
    matrix: &'a PackedMatrix,
    panels: std::ops::Range<usize>,
    outs: Vec<&'a mut [T]>,
}

/// A weight matrix `[out, in]` in the panel layout.
#[derive(Clone, Debug)]
pub struct PackedMatrix {
    out: usize,
    inp: usize,
    storage: Storage,
}

/// The panels; shared so that clones are cheap.
#[derive(Clone, Debug)]
enum Storage {
    /// Interleaved along `k` ([`layout`]), dequantized by each instruction set's kernels.
    Blocks {
        format: Format,
        bytes: Arc<[u8]>,
    },
    /// Whole GGUF blocks per row ([`row_blocks`]), dequantized by portable code.
    RowBlocks {
        format: RowFormat,
        bytes: Arc<[u8]>,
    },
    F32(Arc<[f32]>),
}

impl PackedMatrix {
    /// From a candle QTensor in `Q4_0`, `Q4_1`, `Q8_0`, `Q5_0` (kept as the `Q8_0` blocks of the
    /// same values), `Q5_1`, `Q4_K`, `Q5_K`, `Q6_K`, `F16` or `BF16`, kept in that format; any
    /// other dtype (and a half-precision matrix whose
    /// rows are not whole groups of 32) gives `None`, so that the caller falls back to another
    /// path. The QTensor can be dropped afterwards.
    pub fn from_qtensor(q: &QTensor) -> candle_core::Result<Option<Self>> {
        enum Kept {
            Interleaved(Format),
            /// `Q5_0`, kept as the `Q8_0` blocks of the same values.
            Q5_0AsQ8_0,
            Rows(RowFormat),
        }
        let kept = match q.dtype() {
            GgmlDType::Q4_0 => Kept::Interleaved(Format::Q4_0),
            GgmlDType::Q4_1 => Kept::Interleaved(Format::Q4_1),
            GgmlDType::Q8_0 => Kept::Interleaved(Format::Q8_0),
            GgmlDType::Q5_0 => Kept::Q5_0AsQ8_0,
            GgmlDType::Q5_1 => Kept::Rows(RowFormat::Q5_1),
            GgmlDType::Q4K => Kept::Interleaved(Format::Q4K),
            GgmlDType::Q5K => Kept::Rows(RowFormat::Q5K),
            GgmlDType::Q6K => Kept::Interleaved(Format::Q6K),
            GgmlDType::F16 => Kept::Rows(RowFormat::F16),
            GgmlDType::BF16 => Kept::Rows(RowFormat::BF16),
            _ => return Ok(None),
        };
        let (block_values, block_bytes) = match kept {
            Kept::Interleaved(format) => (format.gguf_block_values(), format.gguf_block_bytes()),
            Kept::Q5_0AsQ8_0 => (QK, q.dtype().type_size()),
            Kept::Rows(format) => (format.block_values(), format.block_bytes()),
        };
        let (out, inp) = q.shape().dims2()?;
        let half_precision = matches!(q.dtype(), GgmlDType::F16 | GgmlDType::BF16);
        if half_precision && inp % block_values != 0 {
            return Ok(None);
        }
        if inp % block_values != 0 {
            candle_core::bail!(
                "quantized matrix {out}x{inp} {:?}: columns are not whole blocks of {block_values}",
                q.dtype()
            );
        }
        let data = q.data()?;
        let expected = out * (inp / block_values) * block_bytes;
        if data.len() != expected {
            candle_core::bail!(
                "quantized matrix {out}x{inp} {:?}: {} bytes of blocks, expected {expected}",
                q.dtype(),
                data.len()
            );
        }
        let interleaved = |format: Format, data: &[u8]| Storage::Blocks {
            format,
            bytes: Arc::from(layout::repack(format, data, out, inp)),
        };
        let storage = match kept {
            Kept::Interleaved(format) => interleaved(format, &data),
            Kept::Q5_0AsQ8_0 => interleaved(Format::Q8_0, &layout::q5_0_as_q8_0(&data)),
            Kept::Rows(format) => Storage::RowBlocks {
                format,
                bytes: Arc::from(row_blocks::repack(format, &data, out, inp)),
            },
        };
        Ok(Some(Self { out, inp, storage }))
    }

    /// From a row-major f32 matrix `[out, inp]`. Panics if `w` does not hold `out × inp`.
    pub fn from_f32(w: &[f32], out: usize, inp: usize) -> Self {
        assert_eq!(
            w.len(),
            out * inp,
            "from_f32: {} values for {out}x{inp}",
            w.len()
        );
        Self {
            out,
            inp,
            storage: Storage::F32(Arc::from(layout::pack_f32(w, out, inp))),
        }
    }

    /// `(out, in)`.
    pub fn dims(&self) -> (usize, usize) {
        (self.out, self.inp)
    }

    /// Bytes of the panels: what one full product streams from memory.
    pub fn size_bytes(&self) -> usize {
        match &self.storage {
            Storage::Blocks { bytes, .. } | Storage::RowBlocks { bytes, .. } => bytes.len(),
            Storage::F32(values) => values.len() * 4,
        }
    }

    /// The GGUF dtype of the weights.
    pub fn dtype(&self) -> GgmlDType {
        match &self.storage {
            Storage::Blocks { format, .. } => match format {
                Format::Q4_0 => GgmlDType::Q4_0,
                Format::Q4_1 => GgmlDType::Q4_1,
                Format::Q8_0 => GgmlDType::Q8_0,
                Format::Q4K => GgmlDType::Q4K,
                Format::Q6K => GgmlDType::Q6K,
            },
            Storage::RowBlocks { format, .. } => match format {
                RowFormat::Q5_1 => GgmlDType::Q5_1,
                RowFormat::Q5K => GgmlDType::Q5K,
                RowFormat::F16 => GgmlDType::F16,
                RowFormat::BF16 => GgmlDType::BF16,
            },
            Storage::F32(_) => GgmlDType::F32,
        }
    }

    fn panels(&self) -> usize {
        self.out.div_ceil(PANEL)
    }

    /// Bytes of one panel's blocks in `format`.
    fn panel_bytes(&self, format: Format) -> usize {
        self.inp / QK * format.panel_block_bytes()
    }

    /// Bytes of one panel's blocks in row format `format`.
    fn row_panel_bytes(&self, format: RowFormat) -> usize {
        self.inp / format.block_values() * PANEL * format.block_bytes()
    }

    fn check_io<T>(&self, xs: &[f32], rows: usize, ys: &[T]) {
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
        self.matmul_t_with(Isa::selected(), xs, rows, ys, true);
    }

    /// [`Self::matmul_t`] into a new `rows × out` vector.
    pub fn matmul_t_new(&self, xs: &[f32], rows: usize) -> Vec<f32> {
        let [ys] = Self::products_new([self], xs, rows);
        ys
    }

    /// [`Self::matmul_t_new`] of several matrices with the same input width over the same
    /// rows (q, k and v; gate and up), in one hand-off to the pool: in decode, where a product
    /// lasts a few microseconds, one hand-off and one barrier instead of one per matrix.
    /// Panics if a matrix's input width is not `xs`'s.
    #[allow(unsafe_code)]
    pub fn products_new<const N: usize>(
        matrices: [&Self; N],
        xs: &[f32],
        rows: usize,
    ) -> [Vec<f32>; N] {
        let mut ys = matrices.map(|m| Vec::with_capacity(rows * m.out));
        let outs = ys
            .iter_mut()
            .zip(matrices)
            .map(|(ys, m)| &mut ys.spare_capacity_mut()[..rows * m.out])
            .collect();
        Self::products_with(Isa::selected(), &matrices, xs, rows, outs, true);
        for (ys, m) in ys.iter_mut().zip(matrices) {
            // SAFETY: `products_with` wrote each of the first `rows × out` values: the tasks'
            // column ranges cover every column, each task writes its range of every row, and
            // the empty cases write every value too.
            unsafe { ys.set_len(rows * m.out) };
        }
        ys
    }

    /// [`Self::matmul_t`] with the kernels of `isa` (which the CPU must support), on the
    /// calling thread alone unless `parallel`.
    pub fn matmul_t_with<T: OutputValue>(
        &self,
        isa: Isa,
        xs: &[f32],
        rows: usize,
        ys: &mut [T],
        parallel: bool,
    ) {
        Self::products_with(isa, &[self], xs, rows, vec![ys], parallel);
    }

    /// The products of `matrices` with `xs` into `ys` (one output per matrix), as one list of
    /// tasks shared out between the cores (or run here, unless `parallel`).
    fn products_with<T: OutputValue>(
        isa: Isa,
        matrices: &[&Self],
        xs: &[f32],
        rows: usize,
        ys: Vec<&mut [T]>,
        parallel: bool,
    ) {
        let mut tasks: Vec<ProductTask<'_, T>> = Vec::new();
        for (&matrix, ys) in matrices.iter().zip(ys) {
            matrix.check_io(xs, rows, ys);
            if rows == 0 || matrix.out == 0 {
                continue;
            }
            if matrix.inp == 0 {
                T::write_all(ys, &vec![0.0; ys.len()]);
                continue;
            }
            // Task `t` owns output columns `t*chunk..` of every input row: one slice per row,
            // collected here, so that a task writes its results without `unsafe`.
            let panels_per_task = matrix.panels_per_task();
            let chunk = panels_per_task * PANEL;
            let first_task = tasks.len();
            tasks.extend((0..matrix.out.div_ceil(chunk)).map(|t| {
                let first = t * panels_per_task;
                ProductTask {
                    matrix,
                    panels: first..(first + panels_per_task).min(matrix.panels()),
                    outs: Vec::with_capacity(rows),
                }
            }));
            for y_row in ys.chunks_exact_mut(matrix.out) {
                for (task, part) in tasks[first_task..].iter_mut().zip(y_row.chunks_mut(chunk)) {
                    task.outs.push(part);
                }
            }
        }
        let run = |task: &mut ProductTask<'_, T>| {
            TASK_SCRATCH.with_borrow_mut(|scratch| {
                let panels = task.panels.clone();
                task.matrix
                    .task(isa, xs, rows, panels, &mut task.outs, scratch);
            });
        };
        if tasks.len() <= 1 || !parallel {
            for task in &mut tasks {
                run(task);
            }
            return;
        }
        // Candle's barrier pool, not rayon: its workers spin between calls and the calling
        // thread takes part, whereas rayon, called from outside its pool, queues the job and
        // blocks the caller: two cross-thread wake-ups per call, which cost about as much as a
        // whole 192×576 product (measured: 11 µs per call with this pool, 18–21 µs with
        // rayon). It is also the pool that candle's own CPU kernels use, so the two do not
        // compete for the cores. Each task sits behind a lock that exactly one thread takes,
        // once: the safe way to hand its output slices to whichever thread runs it.
        let tasks: Vec<Mutex<ProductTask<'_, T>>> = tasks.into_iter().map(Mutex::new).collect();
        candle_core::utils::barrier_pool().execute_chunked(tasks.len(), |range| {
            for t in range {
                run(&mut tasks[t].lock().unwrap_or_else(PoisonError::into_inner));
            }
        });
    }

    /// Panels per task: at least `MIN_TASK_BYTES` of weights, and otherwise a few tasks per
    /// thread; even, so that AVX-512's two-panel tiles are not split between tasks.
    fn panels_per_task(&self) -> usize {
        let panel_bytes = self.size_bytes() / self.panels().max(1);
        let min_panels = MIN_TASK_BYTES.div_ceil(panel_bytes.max(1));
        let threads = candle_core::utils::barrier_pool().n_workers() + 1;
        let tasks = threads * TASKS_PER_THREAD;
        let panels = min_panels.max(self.panels().div_ceil(tasks)).max(1);
        panels + panels % 2
    }

    /// Panels `panels` against every input row; `outs[r]` receives row `r`'s columns of
    /// these panels. `scratch` is the running thread's buffers.
    fn task<T: OutputValue>(
        &self,
        isa: Isa,
        xs: &[f32],
        rows: usize,
        panels: std::ops::Range<usize>,
        outs: &mut [&mut [T]],
        scratch: &mut TaskScratch,
    ) {
        let width = panels.len() * PANEL;
        // One row block's results, copied out while they are still in cache. Every tile writes
        // its values before it reads them (`accumulate` is false at `k0 = 0`), so what the
        // buffer held before does not matter.
        let results_len = MC.min(rows) * width;
        if scratch.results.len() < results_len {
            scratch.results.resize(results_len, 0.0);
        }
        let TaskScratch {
            results: c,
            panels: buffers,
        } = scratch;
        let (_, tile_panels) = isa.tile_shape();
        // A few rows of quantized weights: dequantize in registers, without the buffer.
        let fused = match &self.storage {
            Storage::Blocks { format, bytes } if rows <= isa.fused_rows() => Some((*format, bytes)),
            _ => None,
        };
        // Rows in blocks of `MC`, then columns in chunks of `KC`: the activations of one block
        // and chunk stay in L2 while every panel of the task passes over them. Fused tiles
        // have no buffer to keep in L1 and take every column in one sweep per panel, so that
        // each panel's blocks stream from memory once, in order (about 5% of decode's time on the
        // AMD EPYC).
        let column_chunk = if fused.is_some() { self.inp } else { KC };
        for rb in (0..rows).step_by(MC) {
            let rb_end = (rb + MC).min(rows);
            let block_rows = rb_end - rb;
            let xs = &xs[rb * self.inp..rb_end * self.inp];
            for k0 in (0..self.inp).step_by(column_chunk) {
                let kc = column_chunk.min(self.inp - k0);
                for p in (panels.start..panels.end).step_by(tile_panels) {
                    let np = tile_panels.min(panels.end - p);
                    let c = &mut c[(p - panels.start) * PANEL..];
                    let weights = match fused {
                        Some((format, bytes)) => {
                            let blocks = self.chunk_blocks(format, bytes, p, np, k0, kc);
                            Weights::Blocks(format, blocks)
                        }
                        None => Weights::F32(self.chunk_weights(isa, p, np, k0, kc, buffers)),
                    };
                    isa.tile(&mut Tile {
                        rows: block_rows,
                        panels: np,
                        kc,
                        x: &xs[k0..],
                        x_stride: self.inp,
                        weights,
                        c,
                        c_stride: width,
                        accumulate: k0 > 0,
                    });
                }
            }
            for (out, c) in outs[rb..rb_end].iter_mut().zip(c.chunks_exact(width)) {
                let n = out.len();
                T::write_all(out, &c[..n]);
            }
        }
    }

    /// The quantized blocks (`bytes`, in `format`) of columns `k0..k0 + kc` of panels
    /// `p..p + np`.
    fn chunk_blocks<'a>(
        &self,
        format: Format,
        bytes: &'a [u8],
        p: usize,
        np: usize,
        k0: usize,
        kc: usize,
    ) -> [&'a [u8]; 2] {
        let pbb = format.panel_block_bytes();
        let at = |q: usize| {
            let start = (p + q) * self.panel_bytes(format) + k0 / QK * pbb;
            &bytes[start..start + kc / QK * pbb]
        };
        [at(0), at(np - 1)]
    }

    /// Columns `k0..k0 + kc` of panels `p..p + np` as `kc × 16` f32 each: read in place for
    /// f32 panels, dequantized into `buffers` otherwise.
    fn chunk_weights<'a>(
        &'a self,
        isa: Isa,
        p: usize,
        np: usize,
        k0: usize,
        kc: usize,
        buffers: &'a mut [Vec<f32>; 2],
    ) -> [&'a [f32]; 2] {
        match &self.storage {
            Storage::F32(values) => {
                let at = |q: usize| {
                    let start = ((p + q) * self.inp + k0) * PANEL;
                    &values[start..start + kc * PANEL]
                };
                [at(0), at(np - 1)]
            }
            Storage::Blocks { format, bytes } => {
                let blocks = self.chunk_blocks(*format, bytes, p, np, k0, kc);
                for (blocks, buffer) in blocks.iter().zip(buffers.iter_mut()).take(np) {
                    isa.dequantize(*format, blocks, buffer);
                }
                let [a, b] = buffers;
                [&a[..kc * PANEL], &b[..kc * PANEL]]
            }
            Storage::RowBlocks { format, bytes } => {
                // `k0` and `kc` are whole blocks: `KC` is a multiple of every block size.
                let group = PANEL * format.block_bytes();
                let first = k0 / format.block_values();
                let count = kc.div_ceil(format.block_values());
                for (q, buffer) in buffers.iter_mut().enumerate().take(np) {
                    let start = (p + q) * self.row_panel_bytes(*format) + first * group;
                    let blocks = &bytes[start..start + count * group];
                    row_blocks::dequantize_chunk(*format, blocks, kc, buffer);
                }
                let [a, b] = buffers;
                [&a[..kc * PANEL], &b[..kc * PANEL]]
            }
        }
    }

    /// Slow, obviously-correct reference twin of [`Self::matmul_t`]: each weight row
    /// dequantized, then one sequential `mul_add` chain per output.
    pub fn matmul_t_reference(&self, xs: &[f32], rows: usize, ys: &mut [f32]) {
        self.check_io(xs, rows, ys);
        let mut w = vec![0f32; self.inp];
        for o in 0..self.out {
            self.weight_row(o, &mut w);
            for r in 0..rows {
                let x = &xs[r * self.inp..(r + 1) * self.inp];
                let mut sum = 0f32;
                for (&wi, &xi) in w.iter().zip(x) {
                    sum = xi.mul_add(wi, sum);
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
            self.weight_row(o, dst);
        }
    }

    /// Row `o` of the matrix, dequantized into `dst`.
    fn weight_row(&self, o: usize, dst: &mut [f32]) {
        let (p, t) = (o / PANEL, o % PANEL);
        match &self.storage {
            Storage::F32(values) => {
                let panel = &values[p * self.inp * PANEL..(p + 1) * self.inp * PANEL];
                for (d, column) in dst.iter_mut().zip(panel.chunks_exact(PANEL)) {
                    *d = column[t];
                }
            }
            Storage::Blocks { format, bytes } => {
                let panel_bytes = self.panel_bytes(*format);
                let panel = &bytes[p * panel_bytes..(p + 1) * panel_bytes];
                let blocks = panel.chunks_exact(format.panel_block_bytes());
                for (block, d) in blocks.zip(dst.chunks_exact_mut(QK)) {
                    layout::dequantize_block_row(*format, block, t, d);
                }
            }
            Storage::RowBlocks { format, bytes } => {
                let panel_bytes = self.row_panel_bytes(*format);
                let panel = &bytes[p * panel_bytes..(p + 1) * panel_bytes];
                row_blocks::dequantize_row(*format, panel, t, dst);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Module, Tensor};

    /// Every format kept as stored: interleaved along `k`, then kept block by block per row.
    const FORMATS: [GgmlDType; 10] = [
        GgmlDType::Q4_0,
        GgmlDType::Q4_1,
        GgmlDType::Q8_0,
        GgmlDType::Q5_0,
        GgmlDType::Q5_1,
        GgmlDType::Q4K,
        GgmlDType::Q5K,
        GgmlDType::Q6K,
        GgmlDType::F16,
        GgmlDType::BF16,
    ];

    /// Whether a matrix of `inp` columns can be stored in `dtype` (whole blocks per row).
    fn fits(dtype: GgmlDType, inp: usize) -> bool {
        inp.is_multiple_of(dtype.block_size().max(32))
    }

    fn random_qtensor(out: usize, inp: usize, dtype: GgmlDType) -> QTensor {
        let w = Tensor::randn(0f32, 1f32, (out, inp), &Device::Cpu).expect("randn");
        QTensor::quantize(&w, dtype).expect("quantize")
    }

    fn random_xs(rows: usize, inp: usize) -> Vec<f32> {
        Tensor::randn(0f32, 1f32, (rows * inp,), &Device::Cpu)
            .and_then(|t| t.to_vec1::<f32>())
            .expect("randn")
    }

    fn packed(q: &QTensor) -> PackedMatrix {
        PackedMatrix::from_qtensor(q)
            .expect("from_qtensor")
            .expect("supported")
    }

    fn dequantized(q: &QTensor) -> Vec<f32> {
        q.dequantize(&Device::Cpu)
            .and_then(|w| w.flatten_all())
            .and_then(|w| w.to_vec1::<f32>())
            .expect("dequantize")
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

    fn same_bits(a: &[f32], b: &[f32]) -> bool {
        a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits())
    }

    fn supported_variants() -> Vec<Isa> {
        Isa::ALL.into_iter().filter(|isa| isa.supported()).collect()
    }

    /// Every variant this CPU runs, serial and on the pool, equals the reference twin bit for
    /// bit; the reference is within float rounding of candle's own product.
    fn check_matmul(m: &PackedMatrix, w: &[f32], rows_list: &[usize]) {
        let (out, inp) = m.dims();
        for &rows in rows_list {
            let xs = random_xs(rows, inp);
            let mut reference = vec![f32::NAN; rows * out];
            m.matmul_t_reference(&xs, rows, &mut reference);
            for isa in supported_variants() {
                for parallel in [false, true] {
                    let mut fast = vec![f32::NAN; rows * out];
                    m.matmul_t_with(isa, &xs, rows, &mut fast, parallel);
                    assert!(
                        same_bits(&fast, &reference),
                        "{:?} {out}x{inp} rows={rows} {} parallel={parallel}: differs from \
                         the reference by {}",
                        m.dtype(),
                        isa.name(),
                        rel_err(&fast, &reference)
                    );
                }
            }
            let x = Tensor::from_slice(&xs, (rows, inp), &Device::Cpu).expect("x");
            let w = Tensor::from_slice(w, (out, inp), &Device::Cpu).expect("w");
            let candle = x
                .matmul(&w.t().expect("t"))
                .and_then(|y| y.flatten_all())
                .and_then(|y| y.to_vec1::<f32>())
                .expect("candle matmul");
            let err = rel_err(&reference, &candle);
            assert!(
                err <= 1e-5,
                "{out}x{inp} rows={rows}: reference vs candle {err}"
            );
        }
    }

    #[test]
    fn every_variant_matches_the_reference_bit_for_bit() {
        assert!(supported_variants().contains(&Isa::Portable));
        for dtype in FORMATS {
            let shapes = [
                (192, 576),
                (100, 64),
                (40, 1536),
                (17, 288),
                (33, 512),
                (20, 768),
            ];
            for (out, inp) in shapes.into_iter().filter(|&(_, inp)| fits(dtype, inp)) {
                let q = random_qtensor(out, inp, dtype);
                check_matmul(&packed(&q), &dequantized(&q), &[1, 3, 6, 8, 13, 30]);
            }
        }
    }

    /// Products computed together, as q/k/v and gate/up are, give each matrix the bits it
    /// gets alone, whatever mix of formats and widths shares the call.
    #[test]
    fn products_together_equal_each_alone_bit_for_bit() {
        let inp = 256;
        let q4 = packed(&random_qtensor(192, inp, GgmlDType::Q4_0));
        let q8 = packed(&random_qtensor(64, inp, GgmlDType::Q8_0));
        let half = packed(&random_qtensor(40, inp, GgmlDType::F16));
        let dense = PackedMatrix::from_f32(&random_xs(17, inp), 17, inp);
        for rows in [1, 5, 8, 40] {
            let xs = random_xs(rows, inp);
            let together = PackedMatrix::products_new([&q4, &q8, &half, &dense], &xs, rows);
            for (m, got) in [&q4, &q8, &half, &dense].into_iter().zip(&together) {
                let alone = m.matmul_t_new(&xs, rows);
                assert!(
                    same_bits(got, &alone),
                    "{:?} rows={rows}: together differs from alone",
                    m.dtype()
                );
            }
        }
    }

    #[test]
    fn f32_matrices_of_any_shape() {
        for (out, inp) in [(33, 7), (48, 300), (5, 1), (64, 577)] {
            let w = random_xs(out, inp);
            check_matmul(&PackedMatrix::from_f32(&w, out, inp), &w, &[1, 2, 12, 25]);
        }
    }

    /// The two weight modes give the same bits: the f32 mode holds exactly the dequantized
    /// weights, and the products run the same chains.
    #[test]
    fn quantized_and_dequantized_matrices_agree_exactly() {
        for dtype in FORMATS {
            let (out, inp, rows) = (80, 512, 9);
            let q = random_qtensor(out, inp, dtype);
            let dense = PackedMatrix::from_f32(&dequantized(&q), out, inp);
            let xs = random_xs(rows, inp);
            let mut a = vec![0f32; rows * out];
            let mut b = vec![0f32; rows * out];
            packed(&q).matmul_t(&xs, rows, &mut a);
            dense.matmul_t(&xs, rows, &mut b);
            assert!(
                same_bits(&a, &b),
                "{dtype:?}: quantized and f32 modes differ"
            );
        }
    }

    /// Scaled far down, activations and products are subnormal: still the reference's bits.
    #[test]
    fn small_activations() {
        for dtype in FORMATS {
            let (out, inp, rows) = (100, 256, 2);
            let m = packed(&random_qtensor(out, inp, dtype));
            let xs: Vec<f32> = random_xs(rows, inp).iter().map(|x| x * 1e-39).collect();
            let mut reference = vec![0f32; rows * out];
            m.matmul_t_reference(&xs, rows, &mut reference);
            for isa in supported_variants() {
                let mut fast = vec![0f32; rows * out];
                m.matmul_t_with(isa, &xs, rows, &mut fast, true);
                assert!(same_bits(&fast, &reference), "{dtype:?} {}", isa.name());
            }
        }
    }

    #[test]
    fn rows_equal_dequantized_rows_exactly() {
        for dtype in FORMATS {
            let (out, inp) = (100, 256);
            let q = random_qtensor(out, inp, dtype);
            let w = dequantized(&q);
            let ids = [0u32, 99, 7, 7, 42, 16, 15];
            for m in [packed(&q), PackedMatrix::from_f32(&w, out, inp)] {
                let mut got = vec![f32::NAN; ids.len() * inp];
                m.rows(&ids, &mut got);
                for (k, &id) in ids.iter().enumerate() {
                    let want = &w[id as usize * inp..(id as usize + 1) * inp];
                    assert!(
                        same_bits(want, &got[k * inp..(k + 1) * inp]),
                        "{:?}: row {id} differs from candle's dequantize",
                        m.dtype()
                    );
                }
            }
        }
    }

    /// Each variant's dequantization of whole panels is the portable one, bit for bit.
    #[test]
    fn dequantization_of_every_variant_is_the_same() {
        for dtype in [
            GgmlDType::Q4_0,
            GgmlDType::Q4_1,
            GgmlDType::Q8_0,
            GgmlDType::Q4K,
            GgmlDType::Q6K,
        ] {
            let q = random_qtensor(48, 256, dtype);
            let m = packed(&q);
            let Storage::Blocks { format, bytes } = &m.storage else {
                unreachable!("quantized storage")
            };
            let values = bytes.len() / format.panel_block_bytes() * QK * PANEL;
            let mut want = vec![0f32; values];
            Isa::Portable.dequantize(*format, bytes, &mut want);
            for isa in supported_variants() {
                let mut got = vec![f32::NAN; values];
                isa.dequantize(*format, bytes, &mut got);
                assert!(same_bits(&got, &want), "{dtype:?} {}", isa.name());
            }
        }
    }

    #[test]
    fn unsupported_dtypes_fall_back() {
        let w = Tensor::randn(0f32, 1f32, (64, 256), &Device::Cpu).expect("randn");
        for dtype in [
            GgmlDType::F32,
            GgmlDType::Q2K,
            GgmlDType::Q3K,
            GgmlDType::Q8_1,
        ] {
            let q = QTensor::quantize(&w, dtype).expect("quantize");
            assert!(PackedMatrix::from_qtensor(&q)
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

    /// Throughput of every variant against candle's `QMatMul` (best of 5 timings); prints,
    /// asserts nothing. Run with
    /// `cargo test -p mezo-server --lib kernels -- --ignored --nocapture` on an idle machine.
    #[test]
    #[ignore = "benchmark: prints timings, asserts nothing"]
    fn kernel_throughput() {
        let cases = [
            (1, 1536, 576, GgmlDType::Q4_1),
            (4, 1536, 576, GgmlDType::Q4_1),
            (8, 1536, 576, GgmlDType::Q4_1),
            (1, 576, 1536, GgmlDType::Q4_1),
            (1, 49152, 576, GgmlDType::Q8_0),
            (200, 1536, 576, GgmlDType::Q4_1),
            (1600, 1536, 576, GgmlDType::Q4_1),
            (1600, 576, 1536, GgmlDType::Q4_1),
            (1, 576, 1536, GgmlDType::Q4K),
            (1, 576, 1536, GgmlDType::Q6K),
            (1, 1536, 576, GgmlDType::Q5_0),
            (1600, 576, 1536, GgmlDType::Q4K),
            (1600, 576, 1536, GgmlDType::Q6K),
            (1600, 1536, 576, GgmlDType::Q5_0),
        ];
        println!(
            "threads: {}",
            candle_core::utils::barrier_pool().n_workers() + 1
        );
        for isa in supported_variants() {
            println!(
                "{} FMA peak: {:.0} GFLOP/s",
                isa.name(),
                isa.fma_peak_gflops()
            );
        }
        for (rows, out, inp, dtype) in cases {
            let q = random_qtensor(out, inp, dtype);
            let m = packed(&q);
            let dense = PackedMatrix::from_f32(&dequantized(&q), out, inp);
            let flops = 2.0 * (rows * out * inp) as f64;
            let xs = random_xs(rows, inp);
            let iters = ((3e8 / flops) as usize).clamp(1, 2000);
            let mut ys = vec![0f32; rows * out];
            let mut line = format!("{rows}x{inp} · ({out}x{inp})ᵀ {dtype:?}:");
            // The portable kernels are too slow for the large cases to be worth the wait.
            let variants = supported_variants()
                .into_iter()
                .filter(|&isa| isa != Isa::Portable || rows <= 8);
            for isa in variants {
                for (mode, m) in [("quantized", &m), ("f32", &dense)] {
                    let t = best_time(5, iters, || m.matmul_t_with(isa, &xs, rows, &mut ys, true));
                    line += &format!(
                        " {} {mode} {:.3} ms ({:.0} GFLOP/s);",
                        isa.name(),
                        t * 1e3,
                        flops / t / 1e9
                    );
                }
            }
            let qmm = candle_core::quantized::QMatMul::from_qtensor(q).expect("qmatmul");
            let x = Tensor::from_slice(&xs, (rows, inp), &Device::Cpu).expect("x");
            let theirs = best_time(5, iters, || {
                qmm.forward(&x).expect("forward");
            });
            line += &format!(" candle {:.3} ms", theirs * 1e3);
            println!("{line}");
        }
    }
}
