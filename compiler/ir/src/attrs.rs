//! The attribute enums and plain structs that a model, the IR's ops and the backends share:
//! number formats and FP8 scaling, norm kinds, routing kinds, YaRN, AdamW and its schedule.
//! `kiln_compiler::model` re-exports each beside the `Model` that holds them.

use serde::Serialize;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum NormKind {
    /// `x / sqrt(mean(x²) + eps) * w`, computed in fp32. One weight vector.
    RmsNorm,
    /// `(x - mean) / sqrt(var + eps) * w + b`. Weight and bias vectors.
    LayerNorm,
}

impl NormKind {
    /// Learned vectors per norm: weight, plus bias for LayerNorm.
    pub fn vectors(self) -> u64 {
        match self {
            NormKind::RmsNorm => 1,
            NormKind::LayerNorm => 2,
        }
    }
}

/// YaRN context extension (HF `rope_scaling` with `type = "yarn"`).
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Yarn {
    pub factor: f64,
    pub original_max_positions: u64,
    pub beta_fast: f64,
    pub beta_slow: f64,
    pub mscale: f64,
    pub mscale_all_dim: f64,
}

impl Yarn {
    /// YaRN's magnitude correction `0.1 · m · ln(factor) + 1` (1 when `factor ≤ 1`).
    fn correction(&self, m: f64) -> f64 {
        if self.factor <= 1.0 {
            1.0
        } else {
            0.1 * m * self.factor.ln() + 1.0
        }
    }

    /// The correction with `mscale_all_dim`, whose square multiplies the softmax scale.
    pub fn attention_mscale(&self) -> f64 {
        self.correction(self.mscale_all_dim)
    }

    /// The amplitude of the cos/sin tables: `correction(mscale) / correction(mscale_all_dim)`,
    /// exactly 1 for every released DeepSeek config (where `mscale == mscale_all_dim`).
    pub fn rope_amplitude(&self) -> f64 {
        self.correction(self.mscale) / self.correction(self.mscale_all_dim)
    }

    /// DeepSeek's correction range `(low, high)` over the frequency indices of a head with
    /// `dim` rotated dimensions and base `theta`: the fractional index at which a frequency
    /// completes `beta_fast` (for `low`) or `beta_slow` (for `high`) rotations over the original
    /// context, `low` rounded down and `high` rounded up (HF's `truncate`), then clamped to
    /// `[0, dim − 1]`. Frequencies below `low` are kept, above `high` divided by `factor`.
    pub fn correction_range(&self, dim: usize, theta: f64) -> (f64, f64) {
        let dim = dim as f64;
        let positions = self.original_max_positions as f64;
        // The index whose wavelength fits `rotations` times into the original context.
        let index_for = |rotations: f64| {
            dim * (positions / (rotations * 2.0 * std::f64::consts::PI)).ln() / (2.0 * theta.ln())
        };
        let low = index_for(self.beta_fast).floor().max(0.0);
        let high = index_for(self.beta_slow).ceil().min(dim - 1.0);
        (low, high)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ScoreFunc {
    Softmax,
    Sigmoid,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Selection {
    /// Top-k over all experts.
    Greedy,
    /// Keep the best `groups_kept` groups, then top-k among their experts.
    GroupLimited,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum GroupScore {
    /// The group's best expert score (DeepSeek-V2).
    Max,
    /// The sum of the group's two best scores (DeepSeek-V3).
    Top2Sum,
}

/// Number formats a tensor or op can use.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Format {
    Fp32,
    Bf16,
    Fp16,
    E4m3,
    E5m2,
}

impl Format {
    pub const ALL: [Format; 5] = [
        Format::Fp32,
        Format::Bf16,
        Format::Fp16,
        Format::E4m3,
        Format::E5m2,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Format::Fp32 => "fp32",
            Format::Bf16 => "bf16",
            Format::Fp16 => "fp16",
            Format::E4m3 => "e4m3",
            Format::E5m2 => "e5m2",
        }
    }

    pub fn bytes(self) -> u64 {
        match self {
            Format::Fp32 => 4,
            Format::Bf16 | Format::Fp16 => 2,
            Format::E4m3 | Format::E5m2 => 1,
        }
    }

    pub fn is_fp8(self) -> bool {
        matches!(self, Format::E4m3 | Format::E5m2)
    }
}

impl std::fmt::Display for Format {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Fine-grained FP8 scaling, as in DeepSeek-V3 §3.3.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Fp8 {
    /// Activation tile `[rows, cols]`; one scale per tile, cols along the contraction dim.
    pub act_tile: [u64; 2],
    /// Weight block `[rows, cols]`; one scale per block.
    pub weight_block: [u64; 2],
    pub scale: ScaleFormat,
    /// Elements accumulated in the tensor core before promotion to an fp32 accumulator;
    /// `None` accumulates the whole contraction in the limited-precision accumulator.
    pub promote_every: Option<u64>,
    /// How the tensor core accumulates between promotions; promoted partial sums are
    /// accumulated in fp32.
    pub accumulator: Accumulator,
}

/// The tensor core's accumulation model (`[precision.fp8] accumulator`), which the CPU
/// emulation follows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Accumulator {
    /// H100's FP8 datapath, bit for bit (Khattak and Mikaitis, arXiv 2512.07004): 32
    /// products and the running sum aligned to the largest, cut to 13 fraction bits.
    H100,
    /// DeepSeek-V3 §3.3.2 taken literally: each step's products summed in f32, then added to
    /// a running sum that keeps `bits` fraction bits by truncation.
    Truncate { bits: u32 },
}

impl Fp8 {
    /// DeepSeek-V3's recipe (tech report §3.3) on H100: 1×128 activation tiles, 128×128
    /// weight blocks, fp32 scales, promotion to fp32 every 128 elements of the tensor core's
    /// accumulator. The defaults of `[precision.fp8]`.
    pub const DEEPSEEK_V3: Fp8 = Fp8 {
        act_tile: [1, 128],
        weight_block: [128, 128],
        scale: ScaleFormat::Fp32,
        promote_every: Some(128),
        accumulator: Accumulator::H100,
    };
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ScaleFormat {
    /// Scales are any fp32 value (`amax / fmt_max`).
    Fp32,
    /// Scales are rounded up to a power of two, so scaling is exact.
    Pow2,
}

#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct AdamW {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Schedule {
    pub kind: ScheduleKind,
    /// Linear warmup from 0 to `lr` over this many steps.
    pub warmup: u64,
    /// For `Cosine`, the learning rate reached at the last step.
    pub min_lr: f64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ScheduleKind {
    Constant,
    Cosine,
}
