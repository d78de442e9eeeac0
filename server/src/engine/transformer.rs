//! A decoder-only transformer loaded from GGUF, whatever its architecture: the token
//! embeddings, the architecture's blocks ([`DecoderLayers`]), the final norm and the output
//! projection, and the batched forward pass that serves every kind of work.
//!
//! The forward reads top to bottom: embed the packed rows' tokens (scaled, for Gemma), run the
//! blocks, normalize, project the positions whose logits the rows asked for. Each architecture
//! lives in its own file and is picked by `general.architecture`; adding one is one more file
//! and one more arm in [`Transformer::load`].
//!
//! The output projection is tied to `token_embd.weight` when `output.weight` is absent; both
//! uses then share one tensor in memory.

use std::ops::Range;

use adapters::{ModelDims, QkRowOrder};
use candle_core::quantized::gguf_file::{Content, TensorInfo};
use candle_core::{Device, Tensor, D};

use super::batch::{chunks_by_budget, BatchRow, RowCache};
use super::blocks::{DecoderLayers, ForwardContext, RmsNorm, TensorReader};
use super::gguf::{GgufFile, Metadata};
use super::lora::{AdapterSegment, AdapterView};
use super::weights::{Matrix, WeightMode};
use super::{gemma3, llama, EngineError, Result};
use crate::progress::Progress;

/// The architectures this engine runs, by their `general.architecture` names.
pub const SUPPORTED_ARCHITECTURES: &[&str] = &["llama", "gemma3"];

/// Tokens per pack of a forward pass: small packs are faster, not only leaner, because a
/// pack's activations stay in the caches between a layer's products and its element-wise
/// work. Measured on training steps (`mezo bench mezo --steps 8 --eval-every 8 --test-size
/// 16`, FZOO's five evaluations of 16 reviews, ~2,400 tokens a step), twice each on a 2-core
/// Xeon: 3.13–3.15 s a step and 157 MiB peak at 256, 3.15–3.55 s and 168 MiB at 512,
/// 3.21–3.31 s and 153 MiB at 128, 3.66–3.67 s and 271 MiB with the whole step in one pack.
pub const PACK_TOKENS: usize = 256;

/// The shapes every architecture has, read from `{arch}.*` metadata.
#[derive(Debug, Clone, PartialEq)]
pub struct TransformerConfig {
    /// `general.architecture`.
    pub architecture: String,
    pub n_layer: usize,
    pub hidden: usize,
    pub ffn: usize,
    pub n_head: usize,
    pub n_kv_head: usize,
    pub head_dim: usize,
    pub vocab_size: usize,
    pub context_length: usize,
    pub rms_norm_eps: f64,
    /// Token embeddings are multiplied by this before the first block (Gemma: √hidden).
    pub embedding_scale: f32,
    /// The row order of q/k in the loaded weights, which adapters in memory follow.
    pub qk_rows: QkRowOrder,
}

impl TransformerConfig {
    /// The shapes under `{arch}.*`: head size from `attention.key_length` when the file gives
    /// it (Gemma's heads are wider than `hidden / n_head`), else `hidden / n_head`.
    pub fn from_metadata(
        meta: &Metadata<'_>,
        arch: &str,
        vocab_size: usize,
        qk_rows: QkRowOrder,
    ) -> Result<Self> {
        let key = |name: &str| format!("{arch}.{name}");
        let optional = |name: &str| -> Result<Option<usize>> {
            match meta.get(&key(name)) {
                Some(_) => Ok(Some(meta.usize(&key(name))?)),
                None => Ok(None),
            }
        };
        let hidden = meta.usize(&key("embedding_length"))?;
        let n_head = meta.usize(&key("attention.head_count"))?;
        let n_kv_head = optional("attention.head_count_kv")?.unwrap_or(n_head);
        let invalid = |reason: String| EngineError::Metadata {
            key: key("attention.head_count"),
            reason,
        };
        if n_head == 0 || n_kv_head == 0 || n_head % n_kv_head != 0 {
            return Err(invalid(format!(
                "{n_head} heads and {n_kv_head} key/value heads do not divide evenly"
            )));
        }
        let head_dim = match optional("attention.key_length")? {
            Some(head_dim) => head_dim,
            None if hidden % n_head == 0 => hidden / n_head,
            None => {
                return Err(invalid(format!(
                    "{n_head} heads do not divide the width {hidden}, and the file gives no \
                     `{}`",
                    key("attention.key_length")
                )))
            }
        };
        if let Some(value_length) = optional("attention.value_length")? {
            if value_length != head_dim {
                return Err(invalid(format!(
                    "keys of {head_dim} and values of {value_length} dimensions are not \
                     implemented (they must be equal)"
                )));
            }
        }
        if head_dim == 0 || head_dim % 2 != 0 {
            return Err(invalid(format!(
                "head size {head_dim} is not a positive even number"
            )));
        }
        Ok(Self {
            architecture: arch.to_string(),
            n_layer: meta.usize(&key("block_count"))?,
            hidden,
            ffn: meta.usize(&key("feed_forward_length"))?,
            n_head,
            n_kv_head,
            head_dim,
            vocab_size,
            context_length: meta.usize(&key("context_length"))?,
            rms_norm_eps: f64::from(meta.f32(&key("attention.layer_norm_rms_epsilon"))?),
            embedding_scale: 1.0,
            qk_rows,
        })
    }

    /// The config of the model in `file`, without loading its weights.
    pub fn of_file(file: &GgufFile) -> Result<Self> {
        let vocab_size = embedding_rows(file)?;
        let meta = file.metadata();
        match architecture_of(file)?.as_str() {
            "llama" => llama::config(&meta, vocab_size),
            "gemma3" => gemma3::config(&meta, vocab_size),
            other => Err(unsupported(file, other)),
        }
    }

    /// The shapes a LoRA adapter must fit.
    pub fn dims(&self) -> ModelDims {
        ModelDims {
            n_layer: self.n_layer,
            hidden: self.hidden,
            n_head: self.n_head,
            n_kv_head: self.n_kv_head,
            head_dim: self.head_dim,
            ffn: self.ffn,
            qk_rows: self.qk_rows,
        }
    }
}

/// Where a forward pass starts.
#[derive(Debug)]
pub enum Start {
    /// The rows' token embeddings, before layer 0.
    Embeddings,
    /// The packed rows' hidden states `[n_tokens, hidden]` entering `layer`.
    Layer { layer: usize, hidden: Tensor },
}

/// A model loaded once; `forward` serves every kind of work.
#[derive(Debug)]
pub struct Transformer {
    pub config: TransformerConfig,
    pub mode: WeightMode,
    tok_embeddings: Matrix,
    layers: Box<dyn DecoderLayers>,
    norm: RmsNorm,
    output: Matrix,
    /// `output` is `tok_embeddings` (same storage), as in SmolLM2 and Gemma.
    tied_output: bool,
}

impl Transformer {
    /// Loads every tensor of a GGUF in the given weight mode, with the blocks of the
    /// architecture the file names.
    pub fn load(file: &mut GgufFile, mode: WeightMode) -> Result<Self> {
        let config = TransformerConfig::of_file(file)?;
        check_complete(file)?;
        let has_output = file.content.tensor_infos.contains_key("output.weight");
        let total = file.content.tensor_infos.values().map(tensor_bytes).sum();
        let mut reader = TensorReader {
            file,
            mode,
            progress: Progress::bytes(total, "loading the weights"),
        };
        let c = &config;
        let tok_embeddings = reader.matrix("token_embd.weight", (c.vocab_size, c.hidden))?;
        let layers: Box<dyn DecoderLayers> = match c.architecture.as_str() {
            "llama" => Box::new(llama::LlamaLayers::load(&mut reader, c)?),
            "gemma3" => Box::new(gemma3::Gemma3Layers::load(&mut reader, c)?),
            other => return Err(unsupported(reader.file, other)),
        };
        let norm = reader.rms_norm("output_norm.weight", c.hidden, c.rms_norm_eps)?;
        let output = if has_output {
            reader.matrix("output.weight", (c.vocab_size, c.hidden))?
        } else {
            tok_embeddings.clone()
        };
        Ok(Self {
            config,
            mode,
            tok_embeddings,
            layers,
            norm,
            output,
            tied_output: !has_output,
        })
    }

    /// Every weight matrix: the embeddings, the blocks', and the output unless it is the
    /// embeddings.
    fn matrices(&self) -> impl Iterator<Item = &Matrix> {
        let output = (!self.tied_output).then_some(&self.output);
        std::iter::once(&self.tok_embeddings)
            .chain(self.layers.matrices())
            .chain(output)
    }

    /// Bytes held by the weights (a tied output matrix counted once).
    pub fn weights_size_bytes(&self) -> usize {
        self.matrices().map(Matrix::size_bytes).sum()
    }

    /// How many weight matrices are kept in each type (`F32` for the f32 mode and for types no
    /// kernel reads in place), for the start-up log and the tests.
    pub fn matrix_types(&self) -> std::collections::BTreeMap<String, usize> {
        let mut counts = std::collections::BTreeMap::new();
        for matrix in self.matrices() {
            *counts.entry(format!("{:?}", matrix.dtype())).or_insert(0) += 1;
        }
        counts
    }

    /// Runs a packed batch and returns, per row, the logits `[k, vocab]` at its requested
    /// positions (`None` when it asked for none). Rows with `RowCache::Append` have their keys
    /// and values appended to their cache.
    pub fn forward(&self, rows: &mut [BatchRow<'_>]) -> Result<Vec<Option<Tensor>>> {
        self.forward_from(rows, Start::Embeddings)
    }

    /// [`Self::forward`] starting where `start` says. Starting at a layer with the hidden states
    /// [`Self::hidden_states_entering`] computed gives exactly (bit for bit) the full forward,
    /// provided no row's adapter changes a layer below it; caches then receive keys and values
    /// of the layers run only.
    ///
    /// Rows run through every layer in packs of about [`PACK_TOKENS`] tokens (whole rows; a
    /// longer row is a pack of its own). Rows do not depend on each other, so the packs give the
    /// one batch's results bit for bit.
    pub fn forward_from(
        &self,
        rows: &mut [BatchRow<'_>],
        start: Start,
    ) -> Result<Vec<Option<Tensor>>> {
        let n_tokens: usize = rows.iter().map(|row| row.tokens.len()).sum();
        if let Start::Layer { layer, hidden } = &start {
            let expected = (n_tokens, self.config.hidden);
            if *layer > self.config.n_layer || hidden.dims2()? != expected {
                return Err(EngineError::InvalidRequest(format!(
                    "hidden states {:?} entering layer {layer} do not fit a batch of \
                     {n_tokens} tokens in a {}-layer model",
                    hidden.dims(),
                    self.config.n_layer
                )));
            }
        }
        let packs = chunks_by_budget(rows.iter().map(|row| row.tokens.len()), PACK_TOKENS);
        let mut out = Vec::with_capacity(rows.len());
        let mut first_token = 0;
        for pack in packs {
            let rows = &mut rows[pack];
            let pack_tokens: usize = rows.iter().map(|row| row.tokens.len()).sum();
            let start = match &start {
                Start::Embeddings => Start::Embeddings,
                Start::Layer { layer, hidden } => Start::Layer {
                    layer: *layer,
                    hidden: hidden.narrow(0, first_token, pack_tokens)?,
                },
            };
            out.extend(self.forward_pack(rows, start)?);
            first_token += pack_tokens;
        }
        Ok(out)
    }

    /// [`Self::forward_from`] for one pack of rows.
    fn forward_pack(&self, rows: &mut [BatchRow<'_>], start: Start) -> Result<Vec<Option<Tensor>>> {
        let batch = self.prepare(rows)?;
        let (first_layer, xs) = match start {
            Start::Embeddings => (0, self.embed(rows, batch.positions.len())?),
            Start::Layer { layer, hidden } => (layer, hidden),
        };
        let xs = self.run_layers(xs, first_layer..self.config.n_layer, rows, &batch)?;
        for row in rows.iter_mut() {
            if let RowCache::Append(cache) = &mut row.cache {
                cache.advance(row.tokens.len());
            }
        }
        let xs = self.norm.forward(&xs)?;
        self.logits_at(&xs, rows, &batch)
    }

    /// The hidden states `[n_tokens, hidden]` entering `layer` for a packed batch of rows with
    /// no cache, computed by the base model (the rows' adapters are not applied): what every
    /// adapter that leaves the layers below `layer` alone sees there.
    pub fn hidden_states_entering(&self, rows: &[BatchRow<'_>], layer: usize) -> Result<Tensor> {
        if layer > self.config.n_layer {
            return Err(EngineError::InvalidRequest(format!(
                "layer {layer} does not exist in a {}-layer model",
                self.config.n_layer
            )));
        }
        let mut base_rows: Vec<BatchRow<'_>> = Vec::with_capacity(rows.len());
        for row in rows {
            if !matches!(row.cache, RowCache::None) {
                return Err(EngineError::InvalidRequest(
                    "hidden states are computed for rows without a cache".into(),
                ));
            }
            base_rows.push(BatchRow {
                tokens: row.tokens,
                cache: RowCache::None,
                adapter: None,
                logits: 0..0,
            });
        }
        let batch = self.prepare(&base_rows)?;
        let xs = self.embed(&base_rows, batch.positions.len())?;
        self.run_layers(xs, 0..layer, &mut base_rows, &batch)
    }

    fn embed(&self, rows: &[BatchRow<'_>], n_tokens: usize) -> Result<Tensor> {
        let tokens: Vec<u32> = rows.iter().flat_map(|r| r.tokens.iter().copied()).collect();
        let tokens = Tensor::from_vec(tokens, n_tokens, &Device::Cpu)?;
        let xs = self.tok_embeddings.rows(&tokens)?;
        if self.config.embedding_scale == 1.0 {
            return Ok(xs);
        }
        Ok((xs * f64::from(self.config.embedding_scale))?)
    }

    fn run_layers(
        &self,
        mut xs: Tensor,
        layers: Range<usize>,
        rows: &mut [BatchRow<'_>],
        batch: &ForwardContext<'_>,
    ) -> Result<Tensor> {
        for layer in layers {
            xs = self.layers.forward(layer, &xs, rows, batch)?;
        }
        Ok(xs)
    }

    /// Checks the rows against the model's limits and lays out the packed batch.
    fn prepare<'a>(&self, rows: &[BatchRow<'a>]) -> Result<ForwardContext<'a>> {
        let mut row_ranges = Vec::with_capacity(rows.len());
        let mut positions = Vec::new();
        let mut segments: Vec<AdapterSegment<'a>> = Vec::new();
        let mut start = 0;
        for row in rows {
            let t = row.tokens.len();
            if t == 0 {
                return Err(EngineError::InvalidRequest(
                    "a batch row has no tokens".into(),
                ));
            }
            let prefix = row.cache.prefix_len();
            if prefix + t > self.config.context_length {
                return Err(EngineError::InputTooLong {
                    tokens: prefix + t,
                    limit: self.config.context_length,
                });
            }
            if let Some(&id) = row
                .tokens
                .iter()
                .find(|&&id| id as usize >= self.config.vocab_size)
            {
                return Err(EngineError::InvalidRequest(format!(
                    "token id {id} is outside the vocabulary of {} tokens",
                    self.config.vocab_size
                )));
            }
            if row.logits.end > t {
                return Err(EngineError::InvalidRequest(format!(
                    "logits requested up to position {} of a {t}-token row",
                    row.logits.end
                )));
            }
            positions.extend(prefix..prefix + t);
            match segments.last_mut() {
                Some(seg) if same_view(seg.view, row.adapter) => seg.len += t,
                _ => segments.push(AdapterSegment {
                    start,
                    len: t,
                    view: row.adapter,
                }),
            }
            row_ranges.push(start..start + t);
            start += t;
        }
        Ok(ForwardContext {
            segments,
            row_ranges,
            positions,
        })
    }

    fn logits_at(
        &self,
        xs: &Tensor,
        rows: &[BatchRow<'_>],
        batch: &ForwardContext<'_>,
    ) -> Result<Vec<Option<Tensor>>> {
        let mut picks = Vec::new();
        for (row, range) in rows.iter().zip(&batch.row_ranges) {
            picks.extend(row.logits.clone().map(|p| (range.start + p) as u32));
        }
        if picks.is_empty() {
            return Ok(rows.iter().map(|_| None).collect());
        }
        let n_picks = picks.len();
        let picked = xs.index_select(&Tensor::from_vec(picks, n_picks, &Device::Cpu)?, 0)?;
        let logits = self.output.forward(&picked)?;
        let mut out = Vec::with_capacity(rows.len());
        let mut offset = 0;
        for row in rows {
            let k = row.logits.len();
            out.push(if k == 0 {
                None
            } else {
                Some(logits.narrow(0, offset, k)?)
            });
            offset += k;
        }
        Ok(out)
    }
}

fn same_view(a: Option<&AdapterView>, b: Option<&AdapterView>) -> bool {
    match (a, b) {
        (None, None) => true,
        (Some(a), Some(b)) => std::ptr::eq(a, b),
        _ => false,
    }
}

fn architecture_of(file: &GgufFile) -> Result<String> {
    Ok(file.metadata().string("general.architecture")?.to_string())
}

fn unsupported(file: &GgufFile, architecture: &str) -> EngineError {
    EngineError::UnsupportedArchitecture {
        path: file.path.clone(),
        architecture: architecture.to_string(),
        supported: SUPPORTED_ARCHITECTURES.join(", "),
    }
}

/// The vocabulary size: the rows of `token_embd.weight`.
fn embedding_rows(file: &GgufFile) -> Result<usize> {
    tensor_rows(&file.content, "token_embd.weight").ok_or_else(|| EngineError::InvalidGguf {
        path: file.path.clone(),
        reason: "tensor `token_embd.weight` is missing".into(),
    })
}

/// Bytes a tensor takes in the file.
pub(super) fn tensor_bytes(info: &TensorInfo) -> u64 {
    let elems = info.shape.elem_count();
    (elems / info.ggml_dtype.block_size() * info.ggml_dtype.type_size()) as u64
}

fn tensor_rows(content: &Content, name: &str) -> Option<usize> {
    // GGUF lists dimensions innermost first; candle reverses them, so dims()[0] is rows.
    content
        .tensor_infos
        .get(name)
        .map(|info| info.shape.dims()[0])
}

/// Rejects a truncated file up front, with a message that says so, instead of failing on
/// whichever tensor happens to be read first past the end.
fn check_complete(file: &GgufFile) -> Result<()> {
    let len = file
        .reader
        .get_ref()
        .metadata()
        .map_err(|source| EngineError::Io {
            path: file.path.clone(),
            source,
        })?
        .len();
    let content = &file.content;
    let needed = content
        .tensor_infos
        .values()
        .map(|info| content.tensor_data_offset + info.offset + tensor_bytes(info))
        .max()
        .unwrap_or(content.tensor_data_offset);
    if len < needed {
        return Err(EngineError::InvalidGguf {
            path: file.path.clone(),
            reason: format!(
                "the file is truncated: it has {len} bytes, its tensors need {needed}; download it again (`mezo fetch-model`)"
            ),
        });
    }
    Ok(())
}

/// Log-softmax over the vocabulary (last dimension).
pub fn log_softmax(logits: &Tensor) -> Result<Tensor> {
    Ok(candle_nn::ops::log_softmax(logits, D::Minus1)?)
}
