//! The adapter itself: its configuration, its per-layer A/B matrices, and the stable order in
//! which its parameters are enumerated (MeZO keys its random directions by that order).

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::{AdapterError, QkRowOrder, Result};

/// A linear layer of a llama block that LoRA can adapt.
///
/// The order of the variants is the order parameters are enumerated in, within a layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum TargetModule {
    #[serde(rename = "q_proj")]
    Q,
    #[serde(rename = "k_proj")]
    K,
    #[serde(rename = "v_proj")]
    V,
    #[serde(rename = "o_proj")]
    O,
    #[serde(rename = "gate_proj")]
    Gate,
    #[serde(rename = "up_proj")]
    Up,
    #[serde(rename = "down_proj")]
    Down,
}

impl TargetModule {
    pub const ALL: [TargetModule; 7] = [
        TargetModule::Q,
        TargetModule::K,
        TargetModule::V,
        TargetModule::O,
        TargetModule::Gate,
        TargetModule::Up,
        TargetModule::Down,
    ];

    /// The module's name in Hugging Face / PEFT (`q_proj`, …).
    pub fn peft_name(self) -> &'static str {
        match self {
            TargetModule::Q => "q_proj",
            TargetModule::K => "k_proj",
            TargetModule::V => "v_proj",
            TargetModule::O => "o_proj",
            TargetModule::Gate => "gate_proj",
            TargetModule::Up => "up_proj",
            TargetModule::Down => "down_proj",
        }
    }

    /// The module's path inside a Hugging Face llama model, e.g. `model.layers.3.self_attn.q_proj`.
    pub fn module_path(self, layer: usize) -> String {
        let block = match self {
            TargetModule::Q | TargetModule::K | TargetModule::V | TargetModule::O => "self_attn",
            TargetModule::Gate | TargetModule::Up | TargetModule::Down => "mlp",
        };
        format!("model.layers.{layer}.{block}.{}", self.peft_name())
    }

    /// `(in_features, out_features)` of this module in a model of the given dimensions.
    pub fn dims(self, dims: &ModelDims) -> (usize, usize) {
        let q = dims.n_head * dims.head_dim;
        let kv = dims.n_kv_head * dims.head_dim;
        match self {
            TargetModule::Q => (dims.hidden, q),
            TargetModule::K | TargetModule::V => (dims.hidden, kv),
            TargetModule::O => (q, dims.hidden),
            TargetModule::Gate | TargetModule::Up => (dims.hidden, dims.ffn),
            TargetModule::Down => (dims.ffn, dims.hidden),
        }
    }
}

impl fmt::Display for TargetModule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.peft_name())
    }
}

impl FromStr for TargetModule {
    type Err = AdapterError;

    /// Accepts PEFT names (`q_proj`) and the short forms used in configs (`q`, `gate`).
    fn from_str(s: &str) -> Result<Self> {
        let short = s.strip_suffix("_proj").unwrap_or(s);
        TargetModule::ALL
            .into_iter()
            .find(|m| m.peft_name().strip_suffix("_proj") == Some(short))
            .ok_or_else(|| AdapterError::UnsupportedTarget(s.to_string()))
    }
}

/// The shapes of the base model that an adapter must fit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelDims {
    pub n_layer: usize,
    pub hidden: usize,
    pub n_head: usize,
    pub n_kv_head: usize,
    pub head_dim: usize,
    pub ffn: usize,
    /// The row order of q/k in the engine's weights, which adapters in memory follow.
    #[serde(default)]
    pub qk_rows: QkRowOrder,
}

/// LoRA hyperparameters, with the MeZO paper's defaults (r = 8, α = 16 on q and v, every layer).
/// Fields left out of a serialised config take these defaults; unknown fields are refused, so
/// that a misspelt one is not silently ignored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LoraConfig {
    pub rank: usize,
    pub alpha: f32,
    pub targets: Vec<TargetModule>,
    pub use_rslora: bool,
    /// The transformer layers adapted, in increasing order (PEFT's `layers_to_transform`);
    /// `None` adapts every layer. Leaving the bottom layers out lets training compute their
    /// output once per example instead of twice per step.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub layers: Option<Vec<usize>>,
}

impl Default for LoraConfig {
    fn default() -> Self {
        Self {
            rank: 8,
            alpha: 16.0,
            targets: vec![TargetModule::Q, TargetModule::V],
            use_rslora: false,
            layers: None,
        }
    }
}

impl LoraConfig {
    /// The factor applied to `B·A·x`: `α/r`, or `α/√r` with rsLoRA.
    pub fn scale(&self) -> f32 {
        if self.use_rslora {
            self.alpha / (self.rank as f32).sqrt()
        } else {
            self.alpha / self.rank as f32
        }
    }

    pub fn validate(&self) -> Result<()> {
        if self.rank == 0 {
            return Err(AdapterError::InvalidConfig(
                "rank must be at least 1 (given 0)".into(),
            ));
        }
        if !(self.alpha.is_finite() && self.alpha > 0.0) {
            return Err(AdapterError::InvalidConfig(format!(
                "lora_alpha must be a positive number (given {})",
                self.alpha
            )));
        }
        if self.targets.is_empty() {
            return Err(AdapterError::InvalidConfig(
                "target_modules must name at least one of q, k, v, o, gate, up, down".into(),
            ));
        }
        self.validate_layers(usize::MAX)
    }

    /// [`Self::validate`], and every listed layer exists in a model with `n_layer` layers.
    pub fn validate_for(&self, n_layer: usize) -> Result<()> {
        self.validate()?;
        self.validate_layers(n_layer)
    }

    /// The layer list alone: non-empty, increasing, and inside a model with `n_layer` layers.
    pub fn validate_layers(&self, n_layer: usize) -> Result<()> {
        let Some(layers) = &self.layers else {
            return Ok(());
        };
        if layers.is_empty() {
            return Err(AdapterError::InvalidConfig(
                "layers must list at least one layer index (or be left out to adapt every layer)"
                    .into(),
            ));
        }
        if let Some(pair) = layers.windows(2).find(|pair| pair[0] >= pair[1]) {
            return Err(AdapterError::InvalidConfig(format!(
                "layers must be in increasing order without repeats (found {} before {})",
                pair[0], pair[1]
            )));
        }
        match layers.last() {
            Some(&last) if last >= n_layer => Err(AdapterError::InvalidConfig(format!(
                "layer {last} does not exist: the base model has {n_layer} layers, numbered 0 \
                 to {}",
                n_layer.saturating_sub(1)
            ))),
            _ => Ok(()),
        }
    }

    /// Whether `layer` is adapted.
    pub fn adapts_layer(&self, layer: usize) -> bool {
        self.layers
            .as_ref()
            .is_none_or(|layers| layers.binary_search(&layer).is_ok())
    }

    /// The lowest adapted layer: every layer below it computes exactly what the base model does.
    pub fn first_adapted_layer(&self) -> usize {
        self.layers
            .as_deref()
            .and_then(<[usize]>::first)
            .copied()
            .unwrap_or(0)
    }

    /// The canonical form of a layer list given in any order with repeats: sorted, unique.
    pub fn normalized_layers(mut layers: Vec<usize>) -> Vec<usize> {
        layers.sort_unstable();
        layers.dedup();
        layers
    }
}

/// One adapted linear layer: `A` is `rank × in`, `B` is `out × rank`, both row-major f32.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraLayer {
    pub in_dim: usize,
    pub out_dim: usize,
    pub rank: usize,
    pub a: Vec<f32>,
    pub b: Vec<f32>,
}

impl LoraLayer {
    pub fn zeros(in_dim: usize, out_dim: usize, rank: usize) -> Self {
        Self {
            in_dim,
            out_dim,
            rank,
            a: vec![0.0; rank * in_dim],
            b: vec![0.0; out_dim * rank],
        }
    }
}

/// A LoRA adapter: configuration plus one [`LoraLayer`] per (layer index, target module).
#[derive(Debug, Clone, PartialEq)]
pub struct LoraAdapter {
    pub config: LoraConfig,
    pub dims: ModelDims,
    /// Keyed by (layer, module); the map's order is the parameter order (see [`Self::params`]).
    pub layers: BTreeMap<(usize, TargetModule), LoraLayer>,
}

impl LoraAdapter {
    /// A fresh adapter as PEFT initialises one: `A` uniform in ±1/√in (Kaiming-uniform with
    /// a = √5, PEFT's default), `B` zero, so it starts as the identity on the base model.
    /// The same seed gives the same adapter.
    pub fn new_initialized(config: LoraConfig, dims: ModelDims, seed: u64) -> Result<Self> {
        config.validate_for(dims.n_layer)?;
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut layers = BTreeMap::new();
        for layer in (0..dims.n_layer).filter(|&l| config.adapts_layer(l)) {
            for &module in &config.targets {
                let (in_dim, out_dim) = module.dims(&dims);
                let mut lora = LoraLayer::zeros(in_dim, out_dim, config.rank);
                let bound = 1.0 / (in_dim as f32).sqrt();
                for a in lora.a.iter_mut() {
                    *a = rng.gen_range(-bound..bound);
                }
                layers.insert((layer, module), lora);
            }
        }
        Ok(Self {
            config,
            dims,
            layers,
        })
    }

    /// The trainable tensors in their stable order: for each (layer, module), `A` then `B`.
    pub fn params(&self) -> impl Iterator<Item = &[f32]> {
        self.layers
            .values()
            .flat_map(|l| [l.a.as_slice(), l.b.as_slice()])
    }

    /// Mutable access to the trainable tensors, in the order of [`Self::params`].
    pub fn params_mut(&mut self) -> impl Iterator<Item = &mut [f32]> {
        self.layers
            .values_mut()
            .flat_map(|l| [l.a.as_mut_slice(), l.b.as_mut_slice()])
    }

    /// Number of trainable f32 values.
    pub fn num_params(&self) -> usize {
        self.params().map(<[f32]>::len).sum()
    }

    /// Bytes of LoRA data held in memory.
    pub fn size_bytes(&self) -> usize {
        self.num_params() * std::mem::size_of::<f32>()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // A test that hits an error should fail loudly, which unwrap does.
mod tests {
    use super::*;

    /// A tiny llama: q and o map 16 → 16, k and v 16 → 8, gate and up 16 → 24, down 24 → 16.
    const DIMS: ModelDims = ModelDims {
        n_layer: 3,
        hidden: 16,
        n_head: 4,
        n_kv_head: 2,
        head_dim: 4,
        ffn: 24,
        qk_rows: QkRowOrder::HuggingFace,
    };

    fn config(targets: &[TargetModule]) -> LoraConfig {
        LoraConfig {
            rank: 4,
            alpha: 8.0,
            targets: targets.to_vec(),
            use_rslora: false,
            layers: None,
        }
    }

    #[test]
    fn from_str_accepts_short_and_peft_names() {
        for module in TargetModule::ALL {
            let name = module.peft_name();
            assert_eq!(name.parse::<TargetModule>().unwrap(), module);
            let short = name.strip_suffix("_proj").unwrap();
            assert_eq!(short.parse::<TargetModule>().unwrap(), module);
            assert_eq!(module.to_string(), name);
        }
        assert_eq!("q".parse::<TargetModule>().unwrap(), TargetModule::Q);
        assert_eq!("q_proj".parse::<TargetModule>().unwrap(), TargetModule::Q);
    }

    #[test]
    fn from_str_rejects_other_modules() {
        for name in [
            "embed_tokens",
            "lm_head",
            "",
            "_proj",
            "Q",
            "q_proj_proj",
            "qkv_proj",
        ] {
            match name.parse::<TargetModule>() {
                Err(AdapterError::UnsupportedTarget(n)) => assert_eq!(n, name),
                other => panic!("{name:?} parsed as {other:?}"),
            }
        }
    }

    #[test]
    fn module_paths_and_dims_follow_llama() {
        assert_eq!(
            TargetModule::Q.module_path(3),
            "model.layers.3.self_attn.q_proj"
        );
        assert_eq!(
            TargetModule::Down.module_path(0),
            "model.layers.0.mlp.down_proj"
        );
        let dims: Vec<_> = TargetModule::ALL.map(|m| m.dims(&DIMS)).into();
        assert_eq!(
            dims,
            [
                (16, 16),
                (16, 8),
                (16, 8),
                (16, 16),
                (16, 24),
                (16, 24),
                (24, 16)
            ]
        );
    }

    #[test]
    fn params_are_layer_major_in_module_order_a_before_b() {
        // Targets listed out of order: the enumeration order must not depend on the listing.
        let mut adapter =
            LoraAdapter::new_initialized(config(&[TargetModule::V, TargetModule::Q]), DIMS, 1)
                .unwrap();
        // Tag every tensor with its (layer, module, A/B) so the order can be read back.
        for (&(layer, module), l) in adapter.layers.iter_mut() {
            let tag = (layer * 100 + module as usize * 10) as f32;
            l.a.fill(tag);
            l.b.fill(tag + 1.0);
        }
        let order: Vec<f32> = adapter.params().map(|p| p[0]).collect();
        assert_eq!(
            order,
            [0.0, 1.0, 20.0, 21.0, 100.0, 101.0, 120.0, 121.0, 200.0, 201.0, 220.0, 221.0]
        );
        let lens: Vec<usize> = adapter.params().map(<[f32]>::len).collect();
        assert_eq!(lens, [64, 64, 64, 32].repeat(3));

        let order_mut: Vec<f32> = adapter.params_mut().map(|p| p[0]).collect();
        assert_eq!(order_mut, order);
        assert_eq!(adapter.num_params(), 3 * (64 + 64 + 64 + 32));
        assert_eq!(adapter.size_bytes(), adapter.num_params() * 4);
    }

    #[test]
    fn new_initialized_is_deterministic_per_seed() {
        let targets = [TargetModule::Q, TargetModule::K, TargetModule::Down];
        let one = LoraAdapter::new_initialized(config(&targets), DIMS, 42).unwrap();
        let again = LoraAdapter::new_initialized(config(&targets), DIMS, 42).unwrap();
        let other = LoraAdapter::new_initialized(config(&targets), DIMS, 43).unwrap();
        assert_eq!(one, again);
        assert_ne!(one, other);
    }

    #[test]
    fn new_initialized_starts_as_identity_with_bounded_a() {
        let adapter = LoraAdapter::new_initialized(config(&TargetModule::ALL), DIMS, 5).unwrap();
        assert_eq!(adapter.layers.len(), DIMS.n_layer * TargetModule::ALL.len());
        for (&(_, module), l) in &adapter.layers {
            let (in_dim, out_dim) = module.dims(&DIMS);
            assert_eq!((l.in_dim, l.out_dim, l.rank), (in_dim, out_dim, 4));
            assert_eq!((l.a.len(), l.b.len()), (4 * in_dim, out_dim * 4));
            assert!(l.b.iter().all(|&b| b == 0.0), "B must start at zero");
            let bound = 1.0 / (in_dim as f32).sqrt();
            assert!(l.a.iter().all(|&a| (-bound..bound).contains(&a)));
            // Spread over the range rather than collapsed near zero.
            let max = l.a.iter().fold(0.0f32, |m, a| m.max(a.abs()));
            assert!(max > bound / 2.0, "{module}: max |A| {max}, bound {bound}");
        }
    }

    #[test]
    fn scale_is_alpha_over_rank_or_its_root() {
        let mut c = LoraConfig {
            rank: 16,
            alpha: 32.0,
            ..LoraConfig::default()
        };
        assert_eq!(c.scale(), 2.0);
        c.use_rslora = true;
        assert_eq!(c.scale(), 8.0);
    }

    #[test]
    fn validate_rejects_unusable_configs() {
        assert!(LoraConfig::default().validate().is_ok());
        let bad = [
            LoraConfig {
                rank: 0,
                ..LoraConfig::default()
            },
            LoraConfig {
                alpha: 0.0,
                ..LoraConfig::default()
            },
            LoraConfig {
                alpha: f32::NAN,
                ..LoraConfig::default()
            },
            LoraConfig {
                targets: vec![],
                ..LoraConfig::default()
            },
        ];
        for config in bad {
            assert!(
                matches!(
                    LoraAdapter::new_initialized(config.clone(), DIMS, 0),
                    Err(AdapterError::InvalidConfig(_))
                ),
                "{config:?}"
            );
        }
    }

    #[test]
    fn a_layer_subset_adapts_only_those_layers() {
        let subset = LoraConfig {
            layers: Some(vec![1, 2]),
            ..config(&[TargetModule::Q, TargetModule::V])
        };
        let adapter = LoraAdapter::new_initialized(subset.clone(), DIMS, 7).unwrap();
        let adapted: Vec<(usize, TargetModule)> = adapter.layers.keys().copied().collect();
        assert_eq!(
            adapted,
            [
                (1, TargetModule::Q),
                (1, TargetModule::V),
                (2, TargetModule::Q),
                (2, TargetModule::V)
            ]
        );
        assert_eq!(subset.first_adapted_layer(), 1);
        assert!(!subset.adapts_layer(0) && subset.adapts_layer(1) && subset.adapts_layer(2));
        let every = config(&[TargetModule::Q]);
        assert_eq!(every.first_adapted_layer(), 0);
        assert!((0..DIMS.n_layer).all(|l| every.adapts_layer(l)));
    }

    #[test]
    fn layer_lists_must_be_increasing_and_inside_the_model() {
        let with_layers = |layers: Vec<usize>| LoraConfig {
            layers: Some(layers),
            ..LoraConfig::default()
        };
        for (layers, expected) in [
            (vec![], "at least one layer"),
            (vec![2, 1], "found 2 before 1"),
            (vec![1, 1], "found 1 before 1"),
            (
                vec![0, 3],
                "layer 3 does not exist: the base model has 3 layers, numbered 0 to 2",
            ),
        ] {
            match LoraAdapter::new_initialized(with_layers(layers.clone()), DIMS, 0) {
                Err(AdapterError::InvalidConfig(message)) => {
                    assert!(message.contains(expected), "{layers:?}: {message}")
                }
                other => panic!("{layers:?} gave {other:?}"),
            }
        }
        assert_eq!(LoraConfig::normalized_layers(vec![5, 2, 5, 0]), [0, 2, 5]);
    }
}
