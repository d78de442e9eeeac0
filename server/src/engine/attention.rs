//! Attention on host memory: causal (optionally sliding-window) grouped-query attention for the
//! rows of a packed batch, in plain loops over each row's queries and its key/value history.
//!
//! Each row attends over its own history only, so candle's tensor operations would cost a
//! dozen small operations per row and layer (narrow, concatenate, reshape, two products,
//! softmax), whose fixed overhead dominated decode at several rows per step. Here a row's
//! attention is a few loops over the key/value cache in place, whose dot products and weighted
//! sums run the SIMD kernels of [`super::kernels::isa`].
//! `attend_reference` (built for the tests) computes the same with candle's operations; the tests hold the two
//! equal.

use std::sync::{Mutex, PoisonError};

use super::kernels::isa::Isa;

/// Batches with at least this many query positions spread them over the thread pool; a few
/// decode rows are too small for a hand-off to pay.
const PARALLEL_MIN_QUERIES: usize = 8;

/// Keys and values a row attends to, `[positions, n_kv_head, head_dim]` each, as up to two
/// consecutive spans (a read-only cached prefix, then the row's own positions). The row's own
/// positions are the last ones.
#[derive(Clone, Copy)]
pub struct KvSpans<'a> {
    pub keys: [&'a [f32]; 2],
    pub values: [&'a [f32]; 2],
}

impl<'a> KvSpans<'a> {
    pub fn one(keys: &'a [f32], values: &'a [f32]) -> Self {
        Self {
            keys: [keys, &[]],
            values: [values, &[]],
        }
    }

    pub fn two(prefix: (&'a [f32], &'a [f32]), own: (&'a [f32], &'a [f32])) -> Self {
        Self {
            keys: [prefix.0, own.0],
            values: [prefix.1, own.1],
        }
    }
}

/// The shape of a layer's attention.
#[derive(Debug, Clone, Copy)]
pub struct HeadShape {
    pub n_head: usize,
    pub n_kv_head: usize,
    pub head_dim: usize,
    /// Scores are `q·k · scale` (usually `1/√head_dim`).
    pub scale: f32,
    /// Sliding-window layers (Gemma 3's local ones): a query sees only the last `window`
    /// positions, itself included. `None`: every earlier position.
    pub window: Option<usize>,
}

/// Causal attention of one row, a query position at a time: `q` is `[t, n_head, head_dim]`,
/// the row's `t` tokens being the last `t` positions of `kv`. Query head `h` reads key/value
/// head `h / (n_head / n_kv_head)`.
pub struct RowAttention<'a> {
    q: &'a [f32],
    kv: KvSpans<'a>,
    shape: HeadShape,
    /// Positions in `kv`.
    total: usize,
    /// Query positions (the row's tokens).
    t: usize,
    /// Positions in the first span.
    split: usize,
    isa: Isa,
}

impl<'a> RowAttention<'a> {
    pub fn new(q: &'a [f32], kv: KvSpans<'a>, shape: HeadShape) -> Self {
        let kv_stride = shape.n_kv_head * shape.head_dim;
        Self {
            q,
            kv,
            shape,
            total: (kv.keys[0].len() + kv.keys[1].len()) / kv_stride,
            t: q.len() / (shape.n_head * shape.head_dim),
            split: kv.keys[0].len() / kv_stride,
            isa: Isa::selected(),
        }
    }

    /// Query `i`'s heads' outputs `[n_head · head_dim]` into `out`; `scores` is scratch.
    fn query(&self, i: usize, out: &mut [f32], scores: &mut Vec<f32>) {
        let HeadShape {
            n_head,
            n_kv_head,
            head_dim,
            scale,
            window,
        } = self.shape;
        let (kv, isa, split) = (self.kv, self.isa, self.split);
        let kv_stride = n_kv_head * head_dim;
        let n_rep = n_head / n_kv_head;
        // Query i sits at position total - t + i and sees the positions `start..end` up to it
        // (the last `window` of them in a sliding-window layer): in the first span those below
        // `split`, in the second the rest, each counted from its span's start.
        let end = self.total - self.t + i + 1;
        let start = window.map_or(0, |w| end.saturating_sub(w));
        let visible = [
            start.min(split)..end.min(split),
            start.max(split) - split..end.max(split) - split,
        ];
        let in_first = visible[0].len();
        scores.resize(end - start, 0.0);
        for h in 0..n_head {
            let g = h / n_rep;
            let query = &self.q[(i * n_head + h) * head_dim..][..head_dim];
            let (first, second) = scores.split_at_mut(in_first);
            for (keys, scores) in spans_from(kv.keys, &visible, kv_stride, g * head_dim)
                .into_iter()
                .zip([first, second])
            {
                isa.scaled_dots(query, keys, kv_stride, scale, scores);
            }
            let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let mut sum = 0f32;
            for score in scores.iter_mut() {
                *score = (*score - max).exp();
                sum += *score;
            }
            for score in scores.iter_mut() {
                *score /= sum;
            }
            let o = &mut out[h * head_dim..][..head_dim];
            o.fill(0.0);
            let (first, second) = scores.split_at(in_first);
            for (values, weights) in spans_from(kv.values, &visible, kv_stride, g * head_dim)
                .into_iter()
                .zip([first, second])
            {
                isa.weighted_sum(weights, values, kv_stride, o);
            }
        }
    }
}

/// Causal attention of several rows: writes each row's `[t, n_head · head_dim]` to `out`, one
/// after the other. Every query position of every row is independent, so all of them are
/// shared out between the cores in one hand-off (one per row cost more than the work of a
/// short row), on the pool the matrix products use (a second pool would compete with its
/// spinning workers for the cores).
pub fn attend_all(rows: &[RowAttention<'_>], out: &mut [f32]) {
    let Some(first) = rows.first() else { return };
    let width = first.shape.n_head * first.shape.head_dim;
    let owners: Vec<(&RowAttention<'_>, usize)> = rows
        .iter()
        .flat_map(|row| (0..row.t).map(move |i| (row, i)))
        .collect();
    if owners.len() < PARALLEL_MIN_QUERIES {
        let mut scores = Vec::new();
        for ((row, i), out) in owners.into_iter().zip(out.chunks_mut(width)) {
            row.query(i, out, &mut scores);
        }
        return;
    }
    // Each query's output row sits behind a lock that exactly one thread takes, once: the
    // safe way to hand it to whichever thread runs the query.
    let outs: Vec<Mutex<&mut [f32]>> = out.chunks_mut(width).map(Mutex::new).collect();
    candle_core::utils::barrier_pool().execute_chunked(owners.len(), |range| {
        let mut scores = Vec::new();
        for j in range {
            let (row, i) = owners[j];
            let mut out = outs[j].lock().unwrap_or_else(PoisonError::into_inner);
            row.query(i, &mut out, &mut scores);
        }
    });
}

/// Each span from its first visible position on, at kv head `offset / head_dim`'s vectors (a span
/// with nothing visible gives nothing).
fn spans_from<'a>(
    spans: [&'a [f32]; 2],
    visible: &[std::ops::Range<usize>; 2],
    kv_stride: usize,
    offset: usize,
) -> [&'a [f32]; 2] {
    [0, 1].map(|s| {
        spans[s]
            .get(visible[s].start * kv_stride + offset..)
            .unwrap_or(&[])
    })
}

/// Slow, obviously-correct twin of [`attend_all`] for one row with candle's operations (full scores matrix,
/// additive causal and window mask, softmax, product).
#[cfg(test)]
pub fn attend_reference(q: &[f32], kv: KvSpans<'_>, shape: HeadShape) -> Vec<f32> {
    use candle_core::{Device, Tensor};
    let HeadShape {
        n_head,
        n_kv_head,
        head_dim,
        scale,
        window,
    } = shape;
    let t = q.len() / (n_head * head_dim);
    let keys = [kv.keys[0], kv.keys[1]].concat();
    let values = [kv.values[0], kv.values[1]].concat();
    let total = keys.len() / (n_kv_head * head_dim);
    let dev = &Device::Cpu;
    let q = Tensor::from_slice(q, (t, n_head, head_dim), dev).unwrap();
    let k = Tensor::from_vec(keys, (total, n_kv_head, head_dim), dev).unwrap();
    let v = Tensor::from_vec(values, (total, n_kv_head, head_dim), dev).unwrap();
    let n_rep = n_head / n_kv_head;
    let mut heads = Vec::new();
    for h in 0..n_head {
        let g = h / n_rep;
        let qh = q.narrow(1, h, 1).unwrap().squeeze(1).unwrap();
        let kh = k.narrow(1, g, 1).unwrap().squeeze(1).unwrap();
        let vh = v.narrow(1, g, 1).unwrap().squeeze(1).unwrap();
        let scores = (qh.matmul(&kh.t().unwrap()).unwrap() * f64::from(scale)).unwrap();
        let mask: Vec<f32> = (0..t)
            .flat_map(|i| {
                (0..total).map(move |j| {
                    let position = total - t + i;
                    let too_far = window.is_some_and(|w| j <= position && position - j >= w);
                    if j > position || too_far {
                        f32::NEG_INFINITY
                    } else {
                        0.0
                    }
                })
            })
            .collect();
        let mask = Tensor::from_vec(mask, (t, total), dev).unwrap();
        let probs = candle_nn::ops::softmax_last_dim(&(scores + mask).unwrap()).unwrap();
        heads.push(probs.matmul(&vh).unwrap());
    }
    Tensor::stack(&heads, 1)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

#[cfg(test)]
mod tests {
    use rand::{Rng, SeedableRng};

    use super::*;

    fn random(n: usize, rng: &mut rand_chacha::ChaCha8Rng) -> Vec<f32> {
        (0..n).map(|_| rng.gen_range(-1.0..1.0)).collect()
    }

    #[test]
    fn fast_attention_equals_the_reference_for_every_cache_shape() {
        for window in [None, Some(4), Some(1), Some(9)] {
            let shape = HeadShape {
                n_head: 6,
                n_kv_head: 2,
                head_dim: 12,
                scale: 0.3,
                window,
            };
            check_against_reference(shape);
        }
    }

    #[test]
    fn rows_attended_together_get_what_each_gets_alone_bit_for_bit() {
        let shape = HeadShape {
            n_head: 6,
            n_kv_head: 2,
            head_dim: 12,
            scale: 0.3,
            window: Some(5),
        };
        let (width, kv_stride) = (
            shape.n_head * shape.head_dim,
            shape.n_kv_head * shape.head_dim,
        );
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
        // (prefix positions, own tokens): decode rows beside prefill rows, enough queries in
        // all for the parallel path, too few in most rows alone.
        let rows: Vec<(Vec<f32>, Vec<f32>, Vec<f32>)> = [(0, 3), (6, 1), (0, 11), (2, 1), (4, 6)]
            .into_iter()
            .map(|(prefix, t)| {
                let positions = prefix + t;
                (
                    random(t * width, &mut rng),
                    random(positions * kv_stride, &mut rng),
                    random(positions * kv_stride, &mut rng),
                )
            })
            .collect();
        let attentions: Vec<RowAttention<'_>> = rows
            .iter()
            .map(|(q, k, v)| RowAttention::new(q, KvSpans::one(k, v), shape))
            .collect();
        let mut together = vec![0f32; rows.iter().map(|(q, _, _)| q.len()).sum()];
        attend_all(&attentions, &mut together);
        let mut alone = Vec::new();
        for attention in &attentions {
            let mut out = vec![0f32; attention.q.len()];
            attend_all(std::slice::from_ref(attention), &mut out);
            alone.extend(out);
        }
        assert_eq!(together, alone);
        assert!(together.iter().any(|&x| x != 0.0));
    }

    fn check_against_reference(shape: HeadShape) {
        let kv_stride = shape.n_kv_head * shape.head_dim;
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        // (prefix positions, own tokens): prefill (long enough to run in parallel), decode,
        // scoring a continuation; windows that end inside the prefix, in the row and past both.
        for (prefix, t) in [(0, 5), (9, 1), (7, 3), (0, 1), (3, 12), (10, 10)] {
            let q = random(t * shape.n_head * shape.head_dim, &mut rng);
            let pk = random(prefix * kv_stride, &mut rng);
            let pv = random(prefix * kv_stride, &mut rng);
            let ok = random(t * kv_stride, &mut rng);
            let ov = random(t * kv_stride, &mut rng);
            let two = KvSpans::two((&pk, &pv), (&ok, &ov));
            let joined_k = [pk.clone(), ok.clone()].concat();
            let joined_v = [pv.clone(), ov.clone()].concat();
            let one = KvSpans::one(&joined_k, &joined_v);
            let want = attend_reference(&q, one, shape);
            for spans in [two, one] {
                let mut got = vec![0f32; want.len()];
                attend_all(&[RowAttention::new(&q, spans, shape)], &mut got);
                let diff = got
                    .iter()
                    .zip(&want)
                    .map(|(a, b)| (a - b).abs())
                    .fold(0f32, f32::max);
                assert!(
                    diff < 1e-5,
                    "prefix {prefix}, t {t}, {shape:?}: max diff {diff}"
                );
            }
        }
    }
}
