//! Runtime instruction-set dispatch: one binary, built for plain x86-64, runs the AVX-512
//! kernels where the CPU has them, the AVX2 + FMA ones where it has those, and the portable
//! ones anywhere else. The choice is made once per process (`MEZO_KERNELS=avx512|avx2|portable`
//! overrides it, for benchmarks and tests), and every variant gives the same bits, so the
//! choice changes speed only.

use std::sync::OnceLock;

use super::layout::{Format, PANEL, QK};
use super::portable;
#[cfg(target_arch = "x86_64")]
use super::{avx2, avx512};

/// A family of kernels, each for one instruction set (declared in the order of [`Isa::ALL`],
/// which [`Isa::supported`] indexes by the discriminant).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Isa {
    Avx512,
    Avx2,
    Portable,
}

/// One call of a tile kernel: `c[r·c_stride + j] (+)= Σ_{k<kc} x[r·x_stride + k] · W_k[j]` for
/// `r < rows` and `j < 16·panels`, with `W_k` column `k` of the panels' weights; each output one
/// chain of FMAs in the order of `k`, continuing from the value in `c` when `accumulate`.
pub struct Tile<'a> {
    pub rows: usize,
    pub panels: usize,
    pub kc: usize,
    pub x: &'a [f32],
    pub x_stride: usize,
    pub weights: Weights<'a>,
    pub c: &'a mut [f32],
    pub c_stride: usize,
    pub accumulate: bool,
}

/// The weights of a tile, per panel (the second unused for a one-panel tile).
#[derive(Clone, Copy)]
pub enum Weights<'a> {
    /// `kc × 16` floats each: a dequantized buffer or an f32 panel.
    F32([&'a [f32]; 2]),
    /// `kc / 32` quantized panel blocks each, dequantized in registers by the fused kernels
    /// (for a few rows, where a buffer's stores and loads would not be shared). Same result,
    /// bit for bit.
    Blocks(Format, [&'a [u8]; 2]),
}

impl Tile<'_> {
    /// Panics unless every slice holds what the kernels read and write: the soundness
    /// condition of the SIMD variants' pointer arithmetic.
    fn check(&self, max_rows: usize, max_panels: usize) {
        assert!(
            (1..=max_rows).contains(&self.rows) && (1..=max_panels).contains(&self.panels),
            "tile of {} rows × {} panels (at most {max_rows} × {max_panels})",
            self.rows,
            self.panels
        );
        assert!(self.x_stride >= self.kc && self.c_stride >= PANEL * self.panels);
        assert!(self.x.len() >= (self.rows - 1) * self.x_stride + self.kc);
        assert!(self.c.len() >= (self.rows - 1) * self.c_stride + PANEL * self.panels);
        match self.weights {
            Weights::F32(w) => {
                for w in &w[..self.panels] {
                    assert!(w.len() >= self.kc * PANEL);
                }
            }
            Weights::Blocks(format, blocks) => {
                assert!(self.kc.is_multiple_of(QK));
                for blocks in &blocks[..self.panels] {
                    assert!(blocks.len() >= self.kc / QK * format.panel_block_bytes());
                }
            }
        }
    }
}

impl Isa {
    /// Every variant, fastest first.
    pub const ALL: [Isa; 3] = [Isa::Avx512, Isa::Avx2, Isa::Portable];

    pub fn name(self) -> &'static str {
        match self {
            Isa::Avx512 => "avx512",
            Isa::Avx2 => "avx2",
            Isa::Portable => "portable",
        }
    }

    /// The CPU features this variant's kernels are compiled for.
    fn needed_features(self) -> &'static [&'static str] {
        match self {
            Isa::Avx512 => &["avx512f", "avx2", "fma", "f16c"],
            Isa::Avx2 => &["avx2", "fma", "f16c"],
            Isa::Portable => &[],
        }
    }

    /// The CPU features this variant needs that this CPU lacks (empty: it can run).
    pub fn missing_features(self) -> Vec<&'static str> {
        self.needed_features()
            .iter()
            .copied()
            .filter(|&feature| !cpu_has(feature))
            .collect()
    }

    /// Whether this CPU runs the variant. Checked before every SIMD call (every tile), so the
    /// answers are worked out once per process: matching the features by name on each call
    /// showed in the profile of a training step.
    pub fn supported(self) -> bool {
        static SUPPORTED: OnceLock<[bool; 3]> = OnceLock::new();
        let supported = SUPPORTED.get_or_init(|| {
            Isa::ALL.map(|isa| {
                isa.needed_features()
                    .iter()
                    .all(|&feature| cpu_has(feature))
            })
        });
        supported[self as usize]
    }

    /// The guard before any SIMD call: the soundness of the `unsafe` calls rests on it.
    fn assert_supported(self) {
        assert!(
            self.supported(),
            "{} kernels on a CPU without them",
            self.name()
        );
    }

    /// The variant this process uses: `MEZO_KERNELS` if set (and runnable here), otherwise
    /// the fastest this CPU runs. Logged once.
    pub fn selected() -> Isa {
        static SELECTED: OnceLock<Isa> = OnceLock::new();
        *SELECTED.get_or_init(|| {
            let (chosen, warning) = Isa::choose(std::env::var("MEZO_KERNELS").ok().as_deref());
            if let Some(warning) = warning {
                tracing::warn!("{warning}");
            }
            if chosen == Isa::Portable && cfg!(target_arch = "x86_64") && !Isa::Avx2.supported() {
                tracing::warn!(
                    "matrix kernels: portable (this CPU lacks {}); products run many times \
                     slower than with AVX2",
                    Isa::Avx2.missing_features().join(", ")
                );
            } else {
                tracing::info!("matrix kernels: {}", chosen.name());
            }
            chosen
        })
    }

    /// The variant for a `MEZO_KERNELS` value (`None` or empty: the fastest this CPU runs),
    /// and why the request was not followed, if it was not.
    pub fn choose(requested: Option<&str>) -> (Isa, Option<String>) {
        let best = Isa::ALL
            .into_iter()
            .find(|isa| isa.supported())
            .unwrap_or(Isa::Portable);
        match requested.map(str::trim) {
            None | Some("") => (best, None),
            Some(name) => match Isa::ALL.into_iter().find(|isa| isa.name() == name) {
                Some(isa) if isa.supported() => (isa, None),
                Some(isa) => (
                    best,
                    Some(format!(
                        "MEZO_KERNELS={name}: this CPU lacks {}; using {}",
                        isa.missing_features().join(", "),
                        best.name()
                    )),
                ),
                None => (
                    best,
                    Some(format!(
                        "MEZO_KERNELS={name} is not a kernel variant (avx512, avx2, portable); \
                         using {}",
                        best.name()
                    )),
                ),
            },
        }
    }

    /// Input rows and panels of this variant's largest tile.
    pub fn tile_shape(self) -> (usize, usize) {
        match self {
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => (avx512::ROWS, avx512::PANELS),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => (avx2::ROWS, avx2::PANELS),
            _ => (portable::ROWS, portable::PANELS),
        }
    }

    /// The most rows a tile of [`Weights::Blocks`] takes (0: this variant only takes f32
    /// weights).
    pub fn fused_rows(self) -> usize {
        match self {
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => avx512::FUSED_ROWS,
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => avx2::FUSED_ROWS,
            _ => 0,
        }
    }

    /// Dequantizes whole panel blocks of `format` into `out` (`32 · 16` floats per block,
    /// `out[k·16 + t]` = column `k` of the panel's row `t`).
    pub fn dequantize(self, format: Format, blocks: &[u8], out: &mut [f32]) {
        let pbb = format.panel_block_bytes();
        assert!(blocks.len().is_multiple_of(pbb));
        assert!(out.len() >= blocks.len() / pbb * QK * PANEL);
        self.assert_supported();
        match self {
            // SAFETY: the features were detected (`supported`), the lengths checked above.
            #[cfg(target_arch = "x86_64")]
            #[allow(unsafe_code)]
            Isa::Avx512 => unsafe { avx512::dequantize(format, blocks, out) },
            #[cfg(target_arch = "x86_64")]
            #[allow(unsafe_code)]
            Isa::Avx2 => unsafe { avx2::dequantize(format, blocks, out) },
            _ => portable::dequantize(format, blocks, out),
        }
    }

    /// Runs one tile (see [`Tile`]): f32 weights for any number of rows, which the tile
    /// kernel takes [`Self::tile_shape`]'s rows at a time (checked once here, not per group:
    /// the checks and the dispatch per call were 4% of a training step), or quantized blocks
    /// for at most [`Self::fused_rows`] rows.
    pub fn tile(self, tile: &mut Tile) {
        let (rows, panels) = self.tile_shape();
        let fused = matches!(tile.weights, Weights::Blocks(..));
        tile.check(if fused { self.fused_rows() } else { usize::MAX }, panels);
        self.assert_supported();
        if fused {
            match self {
                // SAFETY: the features were detected (`supported`), the slices checked above.
                #[cfg(target_arch = "x86_64")]
                #[allow(unsafe_code)]
                Isa::Avx512 => unsafe { avx512::fused(tile) },
                #[cfg(target_arch = "x86_64")]
                #[allow(unsafe_code)]
                Isa::Avx2 => unsafe { avx2::fused(tile) },
                // `fused_rows` is 0, so `check` refused the tile.
                _ => unreachable!("the portable variant has no fused kernel"),
            }
            return;
        }
        for r0 in (0..tile.rows).step_by(rows) {
            // A group of rows of the checked tile: its slices lie inside the tile's.
            let group = &mut Tile {
                rows: rows.min(tile.rows - r0),
                panels: tile.panels,
                kc: tile.kc,
                x: &tile.x[r0 * tile.x_stride..],
                x_stride: tile.x_stride,
                weights: tile.weights,
                c: &mut tile.c[r0 * tile.c_stride..],
                c_stride: tile.c_stride,
                accumulate: tile.accumulate,
            };
            match self {
                // SAFETY: the features were detected (`supported`); the group holds at most
                // the kernel's rows, and the slices it reads and writes are the checked
                // tile's.
                #[cfg(target_arch = "x86_64")]
                #[allow(unsafe_code)]
                Isa::Avx512 => unsafe { avx512::tile(group) },
                #[cfg(target_arch = "x86_64")]
                #[allow(unsafe_code)]
                Isa::Avx2 => unsafe { avx2::tile(group) },
                _ => portable::tile(group),
            }
        }
    }
}

impl Isa {
    /// Attention scores of one query against `scores.len()` keys (`keys[j·stride..][..d]`,
    /// `d = query.len()`), scaled. Every variant gives the same bits (the AVX-512 one runs the
    /// AVX2 code: head vectors are too short for wider registers to pay).
    pub fn scaled_dots(
        self,
        query: &[f32],
        keys: &[f32],
        stride: usize,
        scale: f32,
        scores: &mut [f32],
    ) {
        let n = scores.len();
        assert!(n == 0 || keys.len() >= (n - 1) * stride + query.len());
        self.assert_supported();
        match self {
            // SAFETY: the features were detected (`supported`), the length checked above.
            #[cfg(target_arch = "x86_64")]
            #[allow(unsafe_code)]
            Isa::Avx512 | Isa::Avx2 => unsafe {
                avx2::scaled_dots(query, keys, stride, scale, scores)
            },
            _ => portable::scaled_dots(query, keys, stride, scale, scores),
        }
    }

    /// `out += Σ_j weights[j] · values[j·stride..][..out.len()]`, one FMA per term in the
    /// order of `j`. Every variant gives the same bits.
    pub fn weighted_sum(self, weights: &[f32], values: &[f32], stride: usize, out: &mut [f32]) {
        let n = weights.len();
        assert!(n == 0 || values.len() >= (n - 1) * stride + out.len());
        self.assert_supported();
        match self {
            // SAFETY: the features were detected (`supported`), the length checked above.
            #[cfg(target_arch = "x86_64")]
            #[allow(unsafe_code)]
            Isa::Avx512 | Isa::Avx2 => unsafe { avx2::weighted_sum(weights, values, stride, out) },
            _ => portable::weighted_sum(weights, values, stride, out),
        }
    }
}

/// `iterations` rounds of independent FMA chains in `isa`'s registers; returns the FLOPs
/// done and a value that depends on all of them.
fn fma_loop_on(isa: Isa, iterations: usize) -> (f64, f32) {
    match isa {
        // SAFETY: only called for a supported variant (see `fma_peak_gflops`).
        #[cfg(target_arch = "x86_64")]
        #[allow(unsafe_code)]
        Isa::Avx512 => ((iterations * 24 * 16 * 2) as f64, unsafe {
            avx512::fma_loop(iterations)
        }),
        #[cfg(target_arch = "x86_64")]
        #[allow(unsafe_code)]
        Isa::Avx2 => ((iterations * 12 * 8 * 2) as f64, unsafe {
            avx2::fma_loop(iterations)
        }),
        _ => {
            let mut acc = [1f32; 16];
            for _ in 0..iterations {
                for acc in acc.iter_mut() {
                    *acc = acc.mul_add(0.999_999, 1e-7);
                }
            }
            ((iterations * 16 * 2) as f64, acc.iter().sum())
        }
    }
}

impl Isa {
    /// The machine's FMA peak with this variant's registers, measured: every thread of the
    /// kernels' pool runs independent FMA chains (no memory traffic) for about 50 ms. The
    /// ceiling that a matrix product's GFLOP/s are compared to.
    pub fn fma_peak_gflops(self) -> f64 {
        self.assert_supported();
        let iterations = match self {
            Isa::Portable => 200_000,
            _ => 2_000_000,
        };
        let pool = candle_core::utils::barrier_pool();
        let threads = pool.n_workers() + 1;
        let totals = std::sync::Mutex::new((0f64, 0f32));
        let start = std::time::Instant::now();
        pool.execute_chunked(threads, |range| {
            for _ in range {
                let (flops, check) = fma_loop_on(self, iterations);
                let mut totals = totals
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                totals.0 += flops;
                totals.1 += check;
            }
        });
        let seconds = start.elapsed().as_secs_f64();
        let (flops, check) = totals
            .into_inner()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        std::hint::black_box(check);
        flops / seconds / 1e9
    }
}

#[cfg(target_arch = "x86_64")]
fn cpu_has(feature: &str) -> bool {
    match feature {
        "avx512f" => std::arch::is_x86_feature_detected!("avx512f"),
        "avx2" => std::arch::is_x86_feature_detected!("avx2"),
        "fma" => std::arch::is_x86_feature_detected!("fma"),
        "f16c" => std::arch::is_x86_feature_detected!("f16c"),
        _ => false,
    }
}

#[cfg(not(target_arch = "x86_64"))]
fn cpu_has(_feature: &str) -> bool {
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    fn supported() -> Vec<Isa> {
        Isa::ALL.into_iter().filter(|isa| isa.supported()).collect()
    }

    /// The cached answers belong to their variants: each is what the CPU's features say.
    #[test]
    fn supported_follows_the_features_of_each_variant() {
        for isa in Isa::ALL {
            assert_eq!(
                isa.supported(),
                isa.missing_features().is_empty(),
                "{}",
                isa.name()
            );
        }
        assert!(Isa::Portable.supported());
    }

    #[test]
    fn choosing_a_variant() {
        let best = supported()[0];
        assert_eq!(Isa::choose(None), (best, None));
        assert_eq!(Isa::choose(Some(" ")), (best, None));
        assert_eq!(Isa::choose(Some("portable")), (Isa::Portable, None));
        let (isa, warning) = Isa::choose(Some("avx1024"));
        assert_eq!(isa, best);
        assert!(warning.is_some_and(|w| w.contains("not a kernel variant")));
        for isa in Isa::ALL {
            let (chosen, warning) = Isa::choose(Some(isa.name()));
            if isa.supported() {
                assert_eq!((chosen, warning), (isa, None));
            } else {
                assert_eq!(chosen, best);
                assert!(warning.is_some_and(|w| w.contains("lacks")));
            }
        }
    }

    /// Attention's kernels give the portable ones' bits, including the tails of vectors whose
    /// length is not a multiple of 8.
    #[test]
    fn attention_kernels_of_every_variant_agree() {
        let values = |n: usize, seed: f32| -> Vec<f32> {
            (0..n)
                .map(|i| (i as f32 * 0.37 + seed).sin() * 3.0)
                .collect()
        };
        for d in [256, 100, 64, 12, 5] {
            let (n, stride) = (7, d + 3);
            let query = values(d, 0.1);
            let keys = values((n - 1) * stride + d, 0.2);
            let mut want = vec![0f32; n];
            Isa::Portable.scaled_dots(&query, &keys, stride, 0.125, &mut want);
            let weights = values(n, 0.3);
            let mut want_sum = values(d, 0.4);
            Isa::Portable.weighted_sum(&weights, &keys, stride, &mut want_sum);
            for isa in supported() {
                let mut got = vec![f32::NAN; n];
                isa.scaled_dots(&query, &keys, stride, 0.125, &mut got);
                assert_eq!(got, want, "{} scores, d = {d}", isa.name());
                let mut got_sum = values(d, 0.4);
                isa.weighted_sum(&weights, &keys, stride, &mut got_sum);
                assert_eq!(got_sum, want_sum, "{} weighted sum, d = {d}", isa.name());
            }
        }
    }

    #[test]
    fn every_variant_measures_a_peak() {
        for isa in supported() {
            let peak = isa.fma_peak_gflops();
            assert!(peak.is_finite() && peak > 0.0, "{}: {peak}", isa.name());
        }
    }
}
