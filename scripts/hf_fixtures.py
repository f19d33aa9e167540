#!/usr/bin/env python3
"""Hugging Face logit-parity fixtures for kiln.

What this does
--------------
`generate` builds a handful of tiny, randomly initialised Hugging Face causal
language models (DeepSeek-V3, DeepSeek-V2, Llama, GPT-2), one per *case* in
`CASES` below, and writes for each case, under `tests/hf/<case>/`:

  config.json                 the HF config, as `save_pretrained` writes it
  model.safetensors           the HF weights, as `save_pretrained` writes it
                              (or model-0000k-of-0000n.safetensors plus
                              model.safetensors.index.json for the sharded case)
  fixture.json                case name, model family, what the case covers,
                              the token ids, the weight dtype and the torch /
                              transformers versions that produced it
  expected.safetensors        one float32 tensor `logits` [len(tokens), vocab]:
                              HF's logits for `tokens` as a single sequence
                              (batch 1, positions 0..T-1, causal mask only),
                              computed in float32 with eager attention

kiln's Rust tests load these directories and compare kiln's CPU forward pass
against `expected.safetensors`, without Python. The logits are computed from
the model as reloaded from the files just written (so they describe exactly
what is on disk), and every run of this script with the pinned versions writes
byte-identical files.

`check-export HF_DIR [--tokens 1,2,3 --kiln-logits FILE.json]` loads a
directory kiln exported with `AutoModelForCausalLM.from_pretrained` (float32,
eager attention), prints JSON with the missing / unexpected / mismatched keys
and, given kiln's logits for `tokens` as `{"logits": [[...], ...]}`, the
largest absolute difference from HF's logits. It exits non-zero if a key is
missing or mismatched, if there are unexpected keys other than MTP layers
(`model.layers.{num_hidden_layers + k}.*`), or if the difference exceeds the
tolerance (1e-4 by default).

How to run
----------
Use the wrapper, which finds or builds a Python with exactly the pinned torch,
transformers, safetensors and numpy versions:

    scripts/hf-fixtures generate                  # rewrite tests/hf/*
    scripts/hf-fixtures generate --out /tmp/x     # write elsewhere
    scripts/hf-fixtures generate --case gpt2      # one case only
    scripts/hf-fixtures check-export DIR --tokens 1,2,3 --kiln-logits L.json

Running this file directly also works (`python scripts/hf_fixtures.py ...`),
but `generate` refuses to run unless torch, transformers, safetensors and
numpy are the pinned versions (torch's local label, e.g. +cu132, aside).

Each case seeds its own generators, so a case's files do not depend on which
other cases run. Before writing a DeepSeek case, `generate` recomputes every
router's decisions (and checks them against HF's), and refuses a seed whose
routing comes within MIN_ROUTING_MARGIN of a tie, whose correction bias
(V3) or group limit changes no expert choice in some MoE layer.

Everything runs on the CPU, in one thread (so that float reductions happen in
the same order on every machine with the same torch build).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import math
import os
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

# CPU only, and never reach for the Hugging Face Hub.
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from torch import nn  # noqa: E402

PINS = {
    "torch": "2.15.0",
    "transformers": "5.24.0",
    "safetensors": "0.8.0",
    "numpy": "2.4.6",
}

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO_ROOT / "tests" / "hf"

# Smallest gap tolerated between the last expert (or group) chosen by a
# router and the best one rejected, so that float noise in kiln's forward pass
# cannot flip a routing decision.
MIN_ROUTING_MARGIN = 5e-4


# ---------------------------------------------------------------------------
# versions


def installed_version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def public_version(v: str | None) -> str | None:
    """`2.15.0+cu132` -> `2.15.0` (a local build label is not a different release)."""
    return None if v is None else v.split("+", 1)[0]


def version_mismatches() -> list[str]:
    bad = []
    for dist, want in PINS.items():
        got = installed_version(dist)
        if public_version(got) != want:
            bad.append(f"{dist}: found {got}, want {want}")
    return bad


# ---------------------------------------------------------------------------
# cases


@dataclass
class Case:
    name: str
    family: str
    covers: list[str]
    seed: int
    num_tokens: int
    config: Callable[[], Any]
    dtype: str = "float32"  # dtype of the saved weights
    max_shard_size: str | None = None


def deepseek_v3_qlora_groups_config():
    from transformers import DeepseekV3Config

    return DeepseekV3Config(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=48,
        moe_intermediate_size=16,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=4,
        q_lora_rank=32,
        kv_lora_rank=16,
        qk_nope_head_dim=8,
        qk_rope_head_dim=4,
        v_head_dim=12,
        n_routed_experts=8,
        n_shared_experts=1,
        num_experts_per_tok=2,
        n_group=2,
        topk_group=1,
        first_k_dense_replace=1,
        norm_topk_prob=True,
        routed_scaling_factor=2.5,
        rope_interleave=True,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        max_position_embeddings=64,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        # HF builds no MTP modules inside DeepseekV3ForCausalLM; 0 also keeps
        # the config from advertising MTP weights that the checkpoint lacks.
        num_mtp_layers=0,
    )


def deepseek_v3_yarn_noqlora_config():
    from transformers import DeepseekV3Config

    return DeepseekV3Config(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        moe_intermediate_size=12,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=4,
        q_lora_rank=None,
        kv_lora_rank=16,
        qk_nope_head_dim=8,
        qk_rope_head_dim=8,
        v_head_dim=6,
        n_routed_experts=8,
        n_shared_experts=1,
        num_experts_per_tok=3,
        n_group=1,
        topk_group=1,
        first_k_dense_replace=1,
        norm_topk_prob=False,
        routed_scaling_factor=1.5,
        rope_interleave=True,
        rope_parameters={
            "rope_type": "yarn",
            # A small base puts the yarn correction range at [0, 2] over the 4
            # rope frequencies, so one of them is a fractional blend of the
            # interpolated and extrapolated frequency.
            "rope_theta": 10.0,
            "factor": 4.0,
            "original_max_position_embeddings": 16,
            "beta_fast": 32,
            "beta_slow": 1,
            "mscale": 1.0,
            "mscale_all_dim": 1.0,
        },
        max_position_embeddings=64,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        num_mtp_layers=0,
    )


def deepseek_v2_softmax_greedy_config():
    from transformers import DeepseekV2Config

    return DeepseekV2Config(
        vocab_size=72,
        hidden_size=32,
        intermediate_size=48,
        moe_intermediate_size=12,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=4,
        q_lora_rank=None,
        kv_lora_rank=16,
        qk_nope_head_dim=8,
        qk_rope_head_dim=4,
        v_head_dim=8,
        n_routed_experts=8,
        n_shared_experts=2,
        num_experts_per_tok=3,
        topk_method="greedy",
        n_group=None,
        topk_group=None,
        norm_topk_prob=False,
        routed_scaling_factor=1.0,
        first_k_dense_replace=1,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        max_position_embeddings=64,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
    )


def deepseek_v2_group_limited_config():
    from transformers import DeepseekV2Config

    return DeepseekV2Config(
        vocab_size=72,
        hidden_size=32,
        intermediate_size=48,
        moe_intermediate_size=16,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=4,
        q_lora_rank=24,
        kv_lora_rank=16,
        qk_nope_head_dim=8,
        qk_rope_head_dim=4,
        v_head_dim=10,
        n_routed_experts=8,
        n_shared_experts=1,
        num_experts_per_tok=2,
        topk_method="group_limited_greedy",
        n_group=2,
        topk_group=1,
        norm_topk_prob=False,
        routed_scaling_factor=8.0,
        first_k_dense_replace=1,
        rope_parameters={
            "rope_type": "yarn",
            "rope_theta": 10000.0,
            "factor": 4.0,
            "original_max_position_embeddings": 16,
            "beta_fast": 32,
            "beta_slow": 1,
            "mscale": 0.707,
            "mscale_all_dim": 0.707,
        },
        max_position_embeddings=64,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
    )


def llama_gqa_tied_config():
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        rms_norm_eps=1e-5,
        max_position_embeddings=64,
        tie_word_embeddings=True,
    )


def llama_mha_untied_sharded_config():
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
        rms_norm_eps=1e-6,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )


def gpt2_config():
    from transformers import GPT2Config

    return GPT2Config(
        vocab_size=96,
        n_embd=32,
        n_head=4,
        n_layer=2,
        n_positions=32,
        activation_function="gelu_new",
        layer_norm_epsilon=1e-5,
        bos_token_id=95,
        eos_token_id=95,
        tie_word_embeddings=True,
    )


V3_GROUPS_COVERS = [
    "multi-head latent attention with q_lora_rank (q_a_proj, q_a_layernorm, q_b_proj)",
    "kv_lora_rank latent with kv_a_layernorm and decoupled rope key",
    "v_head_dim differs from qk head dim",
    "interleaved rope (rope_interleave true)",
    "sigmoid router with e_score_correction_bias that changes the chosen experts",
    "group-limited routing: n_group 2, topk_group 1, group score = sum of top-2",
    "norm_topk_prob true and routed_scaling_factor 2.5",
    "shared expert",
    "first_k_dense_replace 1 (dense MLP in layer 0)",
    "untied lm_head",
]

CASES = [
    Case(
        name="deepseek_v3-qlora-groups",
        family="deepseek_v3",
        covers=V3_GROUPS_COVERS,
        seed=2,
        num_tokens=24,
        config=deepseek_v3_qlora_groups_config,
    ),
    Case(
        name="deepseek_v3-yarn-noqlora",
        family="deepseek_v3",
        covers=[
            "q_lora_rank null: queries projected directly by q_proj",
            "yarn rope scaling, factor 4, original_max_position_embeddings 16",
            "rope_theta 10: yarn ramp [0, 0.5, 1, 1], one frequency blended, one kept, two interpolated",
            "yarn mscale_all_dim folded into the softmax scale (attention_factor 1)",
            "40 tokens, beyond the original context length",
            "single expert group (n_group 1, topk_group 1)",
            "norm_topk_prob false, routed_scaling_factor 1.5, 3 experts per token",
            "e_score_correction_bias that changes the chosen experts",
            "v_head_dim smaller than qk_nope_head_dim",
            "interleaved rope (rope_interleave true)",
        ],
        seed=20,
        num_tokens=40,
        config=deepseek_v3_yarn_noqlora_config,
    ),
    Case(
        name="deepseek_v2-softmax-greedy",
        family="deepseek_v2",
        covers=[
            "DeepSeek-V2-Lite style: q_lora_rank null",
            "softmax router scores, topk_method greedy",
            "norm_topk_prob false, routed_scaling_factor 1.0",
            "two shared experts (shared intermediate = 2 x moe_intermediate_size)",
            "first_k_dense_replace 1",
            "rope on interleaved (even, odd) pairs via complex multiplication",
        ],
        seed=4,
        num_tokens=20,
        config=deepseek_v2_softmax_greedy_config,
    ),
    Case(
        name="deepseek_v2-group-limited",
        family="deepseek_v2",
        covers=[
            "q_lora_rank set (q_a_proj, q_a_layernorm, q_b_proj)",
            "topk_method group_limited_greedy: group score = max expert score, n_group 2, topk_group 1",
            "softmax scores over all experts before group masking, no renormalisation",
            "routed_scaling_factor 8",
            "yarn rope scaling with mscale 0.707 and mscale_all_dim 0.707 (DeepSeek-V2 release)",
            "24 tokens, beyond the original context length of 16",
            "v_head_dim differs from qk head dim",
        ],
        seed=17,
        num_tokens=24,
        config=deepseek_v2_group_limited_config,
    ),
    Case(
        name="llama-gqa-tied",
        family="llama",
        covers=[
            "grouped-query attention: 4 query heads, 2 key/value heads",
            "tied embeddings: no lm_head.weight in the checkpoint",
            "rope_theta 10000 (half-split rotate_half rope)",
            "rms_norm_eps 1e-5",
        ],
        seed=5,
        num_tokens=16,
        config=llama_gqa_tied_config,
    ),
    Case(
        name="llama-mha-untied-sharded",
        family="llama",
        covers=[
            "multi-head attention: 4 query heads = 4 key/value heads",
            "untied lm_head",
            "sharded checkpoint: model-0000k-of-0000n.safetensors + model.safetensors.index.json",
            "rope_theta 500000, rms_norm_eps 1e-6",
        ],
        seed=6,
        num_tokens=20,
        config=llama_mha_untied_sharded_config,
        max_shard_size="40KB",
    ),
    Case(
        name="gpt2",
        family="gpt2",
        covers=[
            "learned absolute position embeddings (wpe)",
            "LayerNorm with bias, layer_norm_epsilon 1e-5",
            "Conv1D weights stored [in, out]",
            "fused c_attn (q, k, v concatenated on the output axis) with bias",
            "gelu_new (tanh approximation) MLP with biases",
            "tied embeddings: no lm_head.weight in the checkpoint",
            "checkpoint keys under transformer. (the original openai gpt2 checkpoint has no prefix)",
        ],
        seed=7,
        num_tokens=28,
        config=gpt2_config,
    ),
    Case(
        name="deepseek_v3-bf16",
        family="deepseek_v3",
        covers=["bfloat16 weights, float32 compute"] + V3_GROUPS_COVERS,
        seed=2,  # same seed and config as deepseek_v3-qlora-groups: same weights
        num_tokens=24,
        config=deepseek_v3_qlora_groups_config,
        dtype="bfloat16",
    ),
]

CASES_BY_NAME = {c.name: c for c in CASES}


# ---------------------------------------------------------------------------
# model construction


def build_model(config):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_config(config, attn_implementation="eager", dtype=torch.float32)


def is_norm_weight(name: str) -> bool:
    leaf = name.rsplit(".", 2)
    module = leaf[-2] if len(leaf) >= 2 else ""
    return name.endswith(".weight") and ("norm" in module or module.startswith("ln_"))


def randomize_(model: nn.Module, seed: int) -> None:
    """Overwrite every parameter and persistent buffer from a seeded generator.

    Scales keep activations and logits O(1): linear weights N(0, 1/fan_in),
    embeddings N(0, 0.3^2), norm weights 1 + 0.1 N(0, 1), biases 0.1 N(0, 1),
    e_score_correction_bias 0.05 N(0, 1). Non-persistent buffers (rope
    inverse frequencies) are derived from the config and left alone.
    """
    from transformers.pytorch_utils import Conv1D

    g = torch.Generator().manual_seed(seed)

    fan_in: dict[str, int] = {}
    for mname, module in model.named_modules():
        prefix = f"{mname}." if mname else ""
        if isinstance(module, nn.Linear):
            fan_in[prefix + "weight"] = module.in_features
        elif isinstance(module, Conv1D):  # weight is [in, out]
            fan_in[prefix + "weight"] = module.weight.shape[0]

    def sample(name: str, t: torch.Tensor) -> torch.Tensor:
        n = torch.randn(t.shape, generator=g, dtype=torch.float32)
        if name.endswith("e_score_correction_bias"):
            return 0.05 * n
        if t.dim() == 1 and is_norm_weight(name):
            return 1.0 + 0.1 * n
        if t.dim() == 1 and name.endswith("bias"):
            return 0.1 * n
        if name in fan_in:
            return n / math.sqrt(fan_in[name])
        if name.endswith(("embed_tokens.weight", "wte.weight", "wpe.weight")):
            return 0.3 * n
        if name.endswith("experts.gate_up_proj") or name.endswith("experts.down_proj"):
            return n / math.sqrt(t.shape[-1])  # [E, out, in]
        if name.endswith("mlp.gate.weight"):  # router [E, hidden]
            return n / math.sqrt(t.shape[-1])
        raise ValueError(f"no init rule for {name} {tuple(t.shape)}")

    persistent = set(model.state_dict().keys())
    with torch.no_grad():
        for name, p in model.named_parameters():  # tied weights appear once
            p.copy_(sample(name, p))
        for name, b in model.named_buffers():
            if name not in persistent:
                continue
            if not name.endswith("e_score_correction_bias"):
                raise ValueError(f"unexpected persistent buffer {name}")
            b.copy_(sample(name, b))


# ---------------------------------------------------------------------------
# routing diagnostics


def _gap(values: torch.Tensor, k: int) -> torch.Tensor:
    """Per row, the gap between the k-th and (k+1)-th largest value (inf if none)."""
    if values.shape[-1] <= k:
        return torch.full(values.shape[:-1], math.inf)
    top = values.topk(k + 1, dim=-1).values
    return top[..., k - 1] - top[..., k]


def routing_report(model: nn.Module, input_ids: torch.Tensor) -> list[dict]:
    """Recompute each router's decisions from its input and measure how close
    they come to a tie, and (DeepSeek-V3) how often the correction bias
    changes the chosen experts."""
    routers = [(n, m) for n, m in model.named_modules() if n.endswith("mlp.gate") and hasattr(m, "top_k")]
    if not routers:
        return []
    seen: dict[str, tuple] = {}

    def hook(module, args, out, name):
        seen[name] = (args[0].detach(), out[2].detach())  # (hidden states, HF's top-k indices)

    hooks = [m.register_forward_hook(lambda mod, a, o, n=n: hook(mod, a, o, n)) for n, m in routers]
    with torch.no_grad():
        model(input_ids=input_ids, use_cache=False)
    for h in hooks:
        h.remove()
    report = []
    with torch.no_grad():
        for name, r in routers:
            x, hf_chosen = seen[name]
            entry, chosen = _route(name, r, x)
            if not torch.equal(chosen, hf_chosen.sort(dim=-1).values):
                raise SystemExit(f"{name}: recomputed routing disagrees with HF's")
            report.append(entry)
    return report


def _choose(scores: torch.Tensor, k: int, num_group: int, topk_group: int, group_score) -> tuple:
    """Group-limited top-k: returns (chosen experts sorted, group gap, expert gap)."""
    E = scores.shape[-1]
    if num_group > 1:
        gs = group_score(scores.view(-1, num_group, E // num_group))
        group_gap = _gap(gs, topk_group)
        keep = torch.zeros_like(gs).scatter_(1, gs.topk(topk_group, dim=-1).indices, 1.0)
        keep = keep.repeat_interleave(E // num_group, dim=1).bool()
        scores = scores.masked_fill(~keep, -math.inf)
    else:
        group_gap = torch.full(scores.shape[:-1], math.inf)
    chosen = scores.topk(k, dim=-1).indices.sort(dim=-1).values
    return chosen, group_gap, _gap(scores, k)


def _route(name: str, r: nn.Module, x: torch.Tensor) -> tuple[dict, torch.Tensor]:
    logits = x.reshape(-1, r.hidden_dim).float() @ r.weight.float().T
    k = r.top_k
    changed = None
    if hasattr(r, "e_score_correction_bias"):  # DeepSeek-V3: sigmoid, bias for choice, top-2-sum groups
        scores = logits.sigmoid()
        bias = r.e_score_correction_bias.float()

        def top2_sum(g):
            return g.topk(2, dim=-1).values.sum(-1)

        chosen, group_gap, expert_gap = _choose(scores + bias, k, r.num_group, r.topk_group, top2_sum)
        unbiased = _choose(scores, k, r.num_group, r.topk_group, top2_sum)[0]
        changed = int((chosen != unbiased).any(dim=-1).sum())
        ungrouped = _choose(scores + bias, k, 1, 1, top2_sum)[0]
    else:  # DeepSeek-V2: softmax; greedy, or groups scored by their best expert
        scores = logits.softmax(dim=-1)
        grouped = r.topk_method == "group_limited_greedy"
        chosen, group_gap, expert_gap = _choose(
            scores, k, r.num_group if grouped else 1, r.topk_group, lambda g: g.max(dim=-1).values
        )
        ungrouped = _choose(scores, k, 1, 1, None)[0]
    return {
        "router": name,
        "min_group_gap": float(group_gap.min()),
        "min_expert_gap": float(expert_gap.min()),
        "tokens_rerouted_by_bias": changed,
        "tokens_rerouted_by_groups": int((chosen != ungrouped).any(dim=-1).sum()),
        "expert_load": torch.bincount(chosen.flatten(), minlength=r.num_experts).tolist(),
    }, chosen


# ---------------------------------------------------------------------------
# generate


def forward_logits(model: nn.Module, tokens: list[int]) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        out = model(input_ids=torch.tensor([tokens], dtype=torch.long), use_cache=False)
    return out.logits[0].float().contiguous()


def load_hf_dir(path: Path, dtype):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        str(path),
        attn_implementation="eager",
        dtype=dtype,
        output_loading_info=True,
        ignore_mismatched_sizes=True,
    )


def write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")


def write_fixture_json(path: Path, obj: dict) -> None:
    """Like write_json, but with the token list on one line."""
    items = []
    for key, value in obj.items():
        text = json.dumps(value) if key == "tokens" else json.dumps(value, indent=2).replace("\n", "\n  ")
        items.append(f"  {json.dumps(key)}: {text}")
    path.write_text("{\n" + ",\n".join(items) + "\n}\n", encoding="utf-8")


def generate_case(case: Case, out_root: Path) -> None:
    from safetensors.torch import save_file

    torch.manual_seed(case.seed)
    model = build_model(case.config())
    randomize_(model, case.seed)
    model.eval()

    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(1000 + case.seed)
    tokens = torch.randint(0, vocab, (case.num_tokens,), generator=g).tolist()

    if case.dtype != "float32":
        # Round the weights through the storage dtype but keep the model (and
        # its derived, non-persistent rope buffers) in float32: this is the
        # model that the saved checkpoint describes.
        persistent = set(model.state_dict().keys())
        with torch.no_grad():
            for name, t in [*model.named_parameters(), *model.named_buffers()]:
                if name in persistent:
                    t.copy_(t.to(getattr(torch, case.dtype)).float())

    # Routing must not hinge on near-ties, and (V3) the correction bias must matter.
    report = routing_report(model, torch.tensor([tokens]))
    for r in report:
        print(f"  {r}", file=sys.stderr)
        if min(r["min_group_gap"], r["min_expert_gap"]) < MIN_ROUTING_MARGIN:
            raise SystemExit(f"{case.name}: {r['router']} routing has a near-tie; choose another seed")
    grouped = (getattr(model.config, "n_group", None) or 1) > (getattr(model.config, "topk_group", None) or 1)
    for r in report:
        if case.family == "deepseek_v3" and not r["tokens_rerouted_by_bias"]:
            raise SystemExit(f"{case.name}: {r['router']}: the correction bias changes no choice; choose another seed")
        if grouped and not r["tokens_rerouted_by_groups"]:
            raise SystemExit(f"{case.name}: {r['router']}: group limiting changes no choice; choose another seed")
    in_memory = forward_logits(model, tokens)

    case_dir = out_root / case.name
    if case_dir.exists():
        shutil.rmtree(case_dir)
    case_dir.mkdir(parents=True)

    to_save = model.to(getattr(torch, case.dtype))
    # transformers 5 always writes safetensors (`safe_serialization` is gone).
    kwargs = {"max_shard_size": case.max_shard_size} if case.max_shard_size else {}
    to_save.save_pretrained(str(case_dir), **kwargs)
    gen_cfg = case_dir / "generation_config.json"
    if gen_cfg.exists():
        gen_cfg.unlink()

    # Expected logits come from the files just written: load them in their
    # stored dtype, upcast to float32, run the forward pass in float32.
    loaded, info = load_hf_dir(case_dir, dtype="auto")
    problems = {k: v for k, v in info.items() if k != "error_msgs" and v}
    if problems or info.get("error_msgs"):
        raise SystemExit(f"{case.name}: reloading the saved model was not clean: {info}")
    loaded = loaded.to(torch.float32)
    logits = forward_logits(loaded, tokens)
    if not torch.equal(logits, in_memory):
        diff = (logits - in_memory).abs().max().item()
        raise SystemExit(f"{case.name}: reloaded model disagrees with the in-memory one (max diff {diff})")
    assert logits.shape == (len(tokens), vocab)
    save_file({"logits": logits}, str(case_dir / "expected.safetensors"))

    write_fixture_json(
        case_dir / "fixture.json",
        {
            "case": case.name,
            "family": case.family,
            "covers": case.covers,
            "tokens": tokens,
            "dtype": case.dtype,
            "torch": public_version(installed_version("torch")),
            "transformers": installed_version("transformers"),
        },
    )
    for f in case_dir.iterdir():
        f.chmod(0o644)  # safetensors writes 0600
    print(
        f"{case.name}: {len(tokens)} tokens, vocab {vocab}, logits |max| {logits.abs().max().item():.3f}, "
        f"std {logits.std().item():.3f}",
        file=sys.stderr,
    )


def cmd_generate(args) -> int:
    bad = version_mismatches()
    if bad:
        print("hf_fixtures: refusing to generate with unpinned versions:\n  " + "\n  ".join(bad), file=sys.stderr)
        return 2
    names = args.case or [c.name for c in CASES]
    unknown = [n for n in names if n not in CASES_BY_NAME]
    if unknown:
        print(f"hf_fixtures: unknown case(s) {unknown}; known: {list(CASES_BY_NAME)}", file=sys.stderr)
        return 2
    out_root = Path(args.out).resolve()
    out_root.mkdir(parents=True, exist_ok=True)
    for name in names:
        generate_case(CASES_BY_NAME[name], out_root)
    return 0


# ---------------------------------------------------------------------------
# check-export


def cmd_check_export(args) -> int:
    hf_dir = Path(args.hf_dir)
    result: dict[str, Any] = {"hf_dir": str(hf_dir), "ok": False}
    failures: list[str] = []
    if not (hf_dir / "config.json").is_file():
        result["error"] = f"{hf_dir} is not a directory with a config.json"
        print(json.dumps(result, indent=2))
        return 1
    try:
        model, info = load_hf_dir(hf_dir, dtype=torch.float32)
    except Exception as e:  # report load failures as JSON too
        result["error"] = f"{type(e).__name__}: {e}"
        print(json.dumps(result, indent=2))
        return 1
    model = model.to(torch.float32).eval()

    n_layers = model.config.get_text_config().num_hidden_layers
    mtp = re.compile(r"^model\.layers\.(\d+)\.")

    def is_mtp(key: str) -> bool:
        m = mtp.match(key)
        return m is not None and int(m.group(1)) >= n_layers

    missing = sorted(info.get("missing_keys", []))
    unexpected = sorted(info.get("unexpected_keys", []))
    mismatched = [list(map(str, m)) if isinstance(m, (tuple, list)) else str(m) for m in info.get("mismatched_keys", [])]
    result["missing_keys"] = missing
    result["unexpected_keys"] = unexpected
    result["mismatched_keys"] = mismatched
    result["mtp_keys"] = [k for k in unexpected if is_mtp(k)]
    if info.get("error_msgs"):
        result["error_msgs"] = [str(e) for e in info["error_msgs"]]
        failures.append("load errors")
    if missing:
        failures.append(f"{len(missing)} missing keys")
    non_mtp = [k for k in unexpected if not is_mtp(k)]
    if non_mtp:
        failures.append(f"{len(non_mtp)} unexpected keys outside MTP layers")
    if mismatched:
        failures.append(f"{len(mismatched)} mismatched keys")

    if args.kiln_logits is not None:
        if args.tokens is None:
            print("hf_fixtures: --kiln-logits needs --tokens", file=sys.stderr)
            return 2
        tokens = [int(t) for t in args.tokens.split(",") if t.strip()]
        hf = forward_logits(model, tokens)
        with open(args.kiln_logits, encoding="utf-8") as f:
            kiln = torch.tensor(json.load(f)["logits"], dtype=torch.float64)
        result["tokens"] = len(tokens)
        result["tolerance"] = args.tolerance
        if tuple(kiln.shape) != tuple(hf.shape):
            result["max_abs_diff"] = None
            failures.append(f"kiln logits have shape {list(kiln.shape)}, HF's {list(hf.shape)}")
        else:
            diff = (hf.double() - kiln).abs()
            result["max_abs_diff"] = float(diff.max())
            result["argmax_agree"] = int((hf.argmax(-1) == kiln.argmax(-1)).sum())
            if not math.isfinite(result["max_abs_diff"]) or result["max_abs_diff"] > args.tolerance:
                failures.append(f"max abs diff {result['max_abs_diff']:.3g} > {args.tolerance}")
    if args.dump_logits is not None:
        if args.tokens is None:
            print("hf_fixtures: --dump-logits needs --tokens", file=sys.stderr)
            return 2
        tokens = [int(t) for t in args.tokens.split(",") if t.strip()]
        write_json(Path(args.dump_logits), {"logits": forward_logits(model, tokens).tolist()})

    result["failures"] = failures
    result["ok"] = not failures
    result["versions"] = {d: installed_version(d) for d in PINS}
    print(json.dumps(result, indent=2))
    return 0 if not failures else 1


# ---------------------------------------------------------------------------


def main(argv: list[str]) -> int:
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()

    p = argparse.ArgumentParser(prog="hf-fixtures", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd")
    g = sub.add_parser("generate", help="write the golden fixtures (default: tests/hf)")
    g.add_argument("--out", default=str(DEFAULT_OUT), help="output root (default: tests/hf)")
    g.add_argument("--case", action="append", help="generate only this case (repeatable)")
    c = sub.add_parser("check-export", help="load a kiln-exported HF directory and compare logits")
    c.add_argument("hf_dir")
    c.add_argument("--tokens", help="comma-separated token ids")
    c.add_argument("--kiln-logits", help='JSON file {"logits": [[...], ...]}, [tokens][vocab]')
    c.add_argument("--tolerance", type=float, default=1e-4, help="max abs logit difference (default 1e-4)")
    c.add_argument("--dump-logits", help="also write HF's logits for --tokens to this JSON file")
    args = p.parse_args(argv)
    if args.cmd in (None, "generate"):
        if args.cmd is None:
            args = p.parse_args(["generate", *argv])
        return cmd_generate(args)
    return cmd_check_export(args)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
