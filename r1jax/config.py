"""Typed configuration: one dataclass per concern, YAML files as short diffs, dotted overrides.

Parsing, merging and type checking are OmegaConf's (structured configs); this module only
declares the schema and turns OmegaConf's exceptions into one-line messages that name the
culprit and, for unknown keys, list the valid ones. Every field declares its valid values
(`valid(default, spec)`, explained below, checked by `validate`), so a negative step count or a
NaN learning rate stops at load time in one line naming the key, the value and the range.

Every field's comment names the paper symbol (../shared/R1_NOTES.md) where there is one.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf import errors as oc_errors


class ConfigError(ValueError):
    """A configuration problem, with a message that names the culprit."""


# ---------------------------------------------------------------------------------------------
# Valid values: every field declares them; `validate` checks them all, in this one place.
#
# Adding a field? Give it `valid(default, spec)` instead of a bare default (tests/test_config.py
# fails for any int, float or str field without one, and tries an invalid value on every spec):
#     steps: int = valid(100, "[0, inf)")              # an interval, [ ] closed, ( ) open;
#     lr: float = valid(3e-6, "(0, inf)")              #   NaN and +-inf are never inside one
#     weight: float = valid(1.0, "(-inf, inf)")        # any finite number
#     schedule: str = valid("constant", ("constant", "cosine"))   # a set of choices
#     ici: Dict[str, int] = valid({"fsdp": -1}, (-1, "[1, inf)")) # choices and intervals mixed
#     name: str = valid("r1jax", TEXT)                 # free text (checked where it is used)
# Lists and dicts are checked element by element, None passes for Optional fields, nested
# dataclasses are walked. A list/dict default is copied per instance (no default_factory).
# Rules that tie several fields together live with their owner (rollout geometry: grpo.py).
# ---------------------------------------------------------------------------------------------
_SPEC = "r1jax_valid"
_INTERVAL = re.compile(r"^([\[(])\s*(-inf|[-+0-9.e]+)\s*,\s*(inf|[-+0-9.e]+)\s*([\])])$")


@dataclass(frozen=True)
class Rule:
    """A named predicate, for the few values an interval or a set cannot describe."""

    text: str
    ok: Callable[[Any], bool]


TEXT = Rule("text", lambda v: isinstance(v, str))
DTYPES = ("float32", "bfloat16", "float16")
# File types, then row formats (r1jax.formats: the file type is told from the file name).
DATA_FORMATS = ("auto", "jsonl", "parquet", "arrow", "synthetic", "gsm8k", "math", "humaneval")
# r1jax.tokenizer.apply_template's templates, or a template string of one's own.
PROMPT_TEMPLATE = ("r1_zero", "chat", "none",
                   Rule("a string containing '{prompt}'", lambda v: isinstance(v, str) and "{prompt}" in v))


@dataclass(frozen=True)
class Interval:
    text: str
    lo: float
    hi: float
    lo_closed: bool
    hi_closed: bool

    @classmethod
    def parse(cls, text: str) -> "Interval":
        m = _INTERVAL.match(text)
        if not m:
            raise ValueError(f"not an interval: {text!r} (write e.g. '[0, inf)' or '(0, 1]')")
        return cls(text, float(m.group(2)), float(m.group(3)), m.group(1) == "[", m.group(4) == "]")

    def ok(self, v: Any) -> bool:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            return False
        above = v >= self.lo if self.lo_closed else v > self.lo
        below = v <= self.hi if self.hi_closed else v < self.hi
        return above and below


class Spec:
    """What `valid` stores: a value is valid when any of the alternatives accepts it."""

    def __init__(self, spec: Any):
        items = spec if isinstance(spec, tuple) else (spec,)
        self.alternatives: List[Any] = []
        for it in items:
            if isinstance(it, str) and _INTERVAL.match(it):
                self.alternatives.append(Interval.parse(it))
            else:
                self.alternatives.append(it)
        self.text = self._describe()

    def _describe(self) -> str:
        parts = [a.text if isinstance(a, (Rule, Interval)) else repr(a) for a in self.alternatives]
        if len(parts) == 1 and parts[0] == "(-inf, inf)":
            return "a finite number"
        if len(parts) == 1 and isinstance(self.alternatives[0], Interval):
            return f"in {parts[0]}"
        return parts[0] if len(parts) == 1 else "one of " + ", ".join(parts)

    def ok(self, v: Any) -> bool:
        for a in self.alternatives:
            if isinstance(a, (Rule, Interval)):
                if a.ok(v):
                    return True
            elif type(a) is type(v) and a == v:
                return True
        return False

    @property
    def numeric(self) -> bool:
        return any(isinstance(a, Interval) for a in self.alternatives)


def valid(default: Any, spec: Any) -> Any:
    """A dataclass field with its valid values (see the block above)."""
    md = {_SPEC: Spec(spec)}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: copy.deepcopy(default), metadata=md)
    return field(default=default, metadata=md)


def spec_of(f: "dataclasses.Field") -> Optional[Spec]:
    """The declared spec of a dataclass field, or None."""
    return f.metadata.get(_SPEC)


def _problems(node: Any, path: str):
    """(dotted key, value, spec) of every invalid leaf under a config dataclass."""
    for f in dataclasses.fields(node):
        value, key = getattr(node, f.name), f"{path}{f.name}"
        spec = spec_of(f)
        if dataclasses.is_dataclass(value):
            yield from _problems(value, key + ".")
        elif isinstance(value, (list, tuple)) and value and dataclasses.is_dataclass(value[0]):
            for i, item in enumerate(value):
                yield from _problems(item, f"{key}[{i}].")
        elif spec is not None and value is not None:
            if isinstance(value, (list, tuple, ListConfig)):
                leaves = [(f"{key}[{i}]", v) for i, v in enumerate(value)]
            elif isinstance(value, (dict, DictConfig)):
                leaves = [(f"{key}.{k}", v) for k, v in value.items()]
            else:
                leaves = [(key, value)]
            for k, v in leaves:
                if not spec.ok(v):
                    yield k, v, spec


def invalid_message(key: str, value: Any, spec: Spec) -> str:
    got = f"{type(value).__name__} {value!r}" if isinstance(value, str) and spec.numeric else repr(value)
    return f"config key '{key}' must be {spec.text}, got {got}"


def validate(cfg: Any, origin: str = "config") -> Any:
    """Every declared range and set checked; ConfigError (one line: origin, key, value, valid
    values) for the first value outside. Returns `cfg`. load_config and from_dict call it; so
    does anything that takes a config built in Python (train)."""
    for key, value, spec in _problems(cfg, ""):
        raise ConfigError(f"{origin}: {invalid_message(key, value, spec)}")
    return cfg


def arg(kind: Callable[[str], Any], spec: Any) -> Callable[[str], Any]:
    """An argparse `type=` that converts with `kind` and checks `spec` (the same notation as
    `valid`): `--devices 0` fails in argparse's one line, naming the option and the range."""
    import argparse

    sp = Spec(spec)

    def convert(text: str) -> Any:
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {kind.__name__} {sp.text}, got {text!r}") from None
        if not sp.ok(v):
            raise argparse.ArgumentTypeError(f"must be {sp.text}, got {text}")
        return v

    convert.__name__ = kind.__name__  # argparse names the type in its messages
    return convert


# ---------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------
@dataclass
class RopeScalingConfig:
    # "default" (plain RoPE), "llama3" (Llama 3.1 frequency-dependent scaling) or "yarn".
    rope_type: str = valid("default", ("default", "llama3", "yarn"))
    factor: float = valid(8.0, "(0, inf)")
    low_freq_factor: float = valid(1.0, "(0, inf)")
    high_freq_factor: float = valid(4.0, "(0, inf)")
    original_max_position_embeddings: int = valid(8192, "[1, inf)")
    # "yarn" (DeepSeek-V3: factor 40, original length 4,096): transformers' fields, same defaults.
    beta_fast: float = valid(32.0, "(0, inf)")
    beta_slow: float = valid(1.0, "(0, inf)")
    mscale: Optional[float] = valid(None, "(0, inf)")
    mscale_all_dim: Optional[float] = valid(None, "[0, inf)")  # V3: 1.0; scales the softmax by mscale(factor)^2
    attention_factor: Optional[float] = valid(None, "(0, inf)")  # None: derived from factor / mscale / mscale_all_dim
    truncate: bool = True


@dataclass
class MLAConfig:
    """Multi-head Latent Attention (DeepSeek-V2/V3); the DeepSeek-V3 671B values in comments."""

    q_lora_rank: Optional[int] = valid(24, "[1, inf)")  # queries through a rank-r bottleneck (V3: 1,536); None: full rank
    kv_lora_rank: int = valid(16, "[1, inf)")  # the joint key/value latent (V3: 512)
    qk_nope_head_dim: int = valid(8, "[1, inf)")  # per-head key/query features without RoPE (V3: 128)
    qk_rope_head_dim: int = valid(8, "[1, inf)")  # decoupled RoPE key shared by all heads (V3: 64)
    v_head_dim: int = valid(8, "[1, inf)")  # (V3: 128)
    rope_interleave: bool = True  # DeepSeek's checkpoints pair RoPE features (x0, x1), (x2, x3), ...


@dataclass
class MoEConfig:
    """Routed (plus shared) experts; DeepSeek-V3 671B / Qwen3-30B-A3B values in comments."""

    num_experts: int = valid(8, "[1, inf)")  # routed experts E (V3: 256; Qwen3-30B-A3B: 128)
    num_experts_per_tok: int = valid(2, "[1, inf)")  # K (V3: 8; Qwen3-30B-A3B: 8)
    moe_intermediate_size: int = valid(32, "[1, inf)")  # each expert's FFN width (V3: 2,048; Qwen3-30B-A3B: 768)
    num_shared_experts: int = valid(0, "[0, inf)")  # always-on experts, one FFN of n x that width (V3: 1)
    scoring: str = valid("softmax", ("softmax", "sigmoid"))  # softmax (Qwen3-MoE) | sigmoid (DeepSeek-V3)
    norm_topk_prob: bool = True  # renormalise the K chosen weights to sum to 1
    routed_scaling_factor: float = valid(1.0, "(0, inf)")  # multiplies the routed output's weights (V3: 2.5)
    n_group: int = valid(1, "[1, inf)")  # group-limited routing: experts in n_group groups (V3: 8) ...
    topk_group: int = valid(1, "[1, inf)")  # ... keep the topk_group best groups, group score = its top-2 sum (V3: 4)
    # A per-expert bias added to the scores for selection only (V3's e_score_correction_bias,
    # aux-loss-free balancing); updated by r1jax.models.moe.update_router_bias, not by gradients.
    router_bias: bool = False
    dense_layers: List[int] = valid([], "[0, inf)")  # layers with a dense FFN (V3: 0, 1, 2)
    # Expert capacity = ceil(capacity_factor * tokens * K / E) per expert and token group; the
    # assignments past it are dropped (counted in moe/dropped). 0: no token is ever dropped
    # (capacity = all tokens: exact but every expert's FLOPs; for tests and tiny models).
    capacity_factor: float = valid(0.0, "[0, inf)")
    # Aux-loss-free bias step gamma (V3 pre-training: 0.001, then 0 for its last 500B tokens).
    # Default 0 for RL from a checkpoint: the released bias is already balanced and frozen, and
    # every step flips the routing of tokens near the top-K boundary outside the gradient,
    # which moves the trainer's policy away from the sampler's (the ratio drift MoE RL fights).
    bias_update_gamma: float = valid(0.0, "[0, inf)")
    seq_aux_loss_coef: float = valid(0.0, "[0, inf)")  # alpha of V3's sequence-wise balance loss (V3: 0.0001)
    # none | rollout: routing replay ("R3"). The sampler records every token's experts per MoE
    # layer (prompt and completion; uint8 up to 255 experts, else int16), the rollout stores
    # and checkpoints them, and the update's policy forward routes each token to them (gate
    # weights still from the current router, so it keeps learning): sampler and trainer
    # log-probs then agree at the rollout's parameters. The reference pass does not replay:
    # pi_ref is the reference model's own routing, and the recorded experts are the rollout
    # policy's, not the reference's (a recomputed pi_old, grpo.recompute_logp_old, does).
    routing_replay: str = valid("none", ("none", "rollout"))
    # With routing_replay=rollout: also run a gradient-free forward with the router's own
    # choices per update for the moe/free_* ratio metrics beside moe/replay_* (one extra
    # forward per update; turn off when the comparison is not needed).
    replay_compare: bool = True


@dataclass
class ModelConfig:
    # A Hugging Face checkpoint directory (config.json + *.safetensors). When set, the shape
    # fields below are read from its config.json and the weights are loaded from it.
    path: Optional[str] = valid(None, TEXT)
    architecture: str = valid("qwen2", TEXT)  # a registered family: qwen2 | qwen3 | llama (r1jax.models.registry)
    vocab_size: int = valid(256, "[1, inf)")
    hidden_size: int = valid(64, "[1, inf)")
    intermediate_size: int = valid(176, "[1, inf)")
    num_layers: int = valid(2, "[1, inf)")
    num_heads: int = valid(4, "[1, inf)")
    num_kv_heads: int = valid(2, "[1, inf)")
    head_dim: Optional[int] = valid(None, "[1, inf)")  # None: hidden_size // num_heads
    rope_theta: float = valid(10000.0, "(0, inf)")
    rope_scaling: Optional[RopeScalingConfig] = None
    rms_norm_eps: float = valid(1e-6, "(0, inf)")
    qkv_bias: bool = True  # Qwen2: bias on q/k/v projections; Llama: none
    o_bias: bool = False  # bias on the output projection (Llama's attention_bias=true)
    qk_norm: bool = False  # Qwen3: RMSNorm over each query/key head before RoPE
    tie_embeddings: bool = False
    max_position_embeddings: int = valid(4096, "[1, inf)")
    param_dtype: str = valid("float32", DTYPES)  # storage dtype of the weights
    dtype: str = valid("float32", DTYPES)  # compute dtype (bfloat16 for real runs)
    # Layers are always stored stacked; run them unrolled (default: about 10-17% faster
    # updates on CPU, where XLA copies each scanned layer's weight slice) or with lax.scan
    # (one compiled layer body: much faster compiles for deep models).
    scan_layers: bool = False
    # Rematerialise each layer in the backward pass: "none" | "full".
    remat: str = valid("none", ("none", "full"))
    bos_token_id: Optional[int] = valid(None, "[0, inf)")
    eos_token_id: Optional[int] = valid(None, "[0, inf)")
    pad_token_id: Optional[int] = valid(None, "[0, inf)")
    mla: Optional[MLAConfig] = None  # DeepSeek-V3: attention through compressed latents
    moe: Optional[MoEConfig] = None  # DeepSeek-V3 / Qwen3-MoE: routed experts
    num_mtp_layers: int = valid(0, "[0, inf)")  # DeepSeek-V3 multi-token-prediction modules (V3: 1)


# ---------------------------------------------------------------------------------------------
# Mesh
# ---------------------------------------------------------------------------------------------
@dataclass
class MeshConfig:
    # Axes inside a node (fast interconnect: NVLink, a TPU slice's ICI) and across nodes (slow:
    # InfiniBand, DCN). Each physical axis's size is ici[axis] * dcn[axis]. One axis may be -1
    # in `ici`, filled from the device count. Valid axis names live in r1jax.mesh.MESH_AXES.
    ici: Dict[str, int] = valid({"fsdp": -1}, (-1, "[1, inf)"))
    dcn: Dict[str, int] = valid({}, "[1, inf)")
    # Per-layout overrides of the logical-axis rules (logical name -> list of mesh axes or
    # null), merged over r1jax.mesh.TRAIN_RULES / SAMPLE_RULES.
    train_rules: Dict[str, Any] = field(default_factory=dict)
    sample_rules: Dict[str, Any] = field(default_factory=dict)
    # Devices per node when emulating nodes on one process (None: the ici product).
    devices_per_node: Optional[int] = valid(None, "[1, inf)")


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------
@dataclass
class DataSourceConfig:
    path: Optional[str] = valid(None, TEXT)  # JSONL, Parquet, or an HF `datasets` directory saved to disk
    format: str = valid("auto", DATA_FORMATS)  # auto | jsonl | parquet | arrow | synthetic | gsm8k | math | humaneval
    synthetic: Optional[str] = valid(None, TEXT)  # a built-in synthetic task name, e.g. "arithmetic"
    synthetic_kwargs: Optional[Dict[str, Any]] = None  # this task's arguments (None: data.synthetic_kwargs)
    weight: float = valid(1.0, "(0, inf)")  # mixture weight
    split: Optional[str] = valid(None, TEXT)  # for DatasetDict directories


@dataclass
class DataConfig:
    path: Optional[str] = valid(None, TEXT)  # shorthand for a single source: data.path=FILE
    format: str = valid("auto", DATA_FORMATS)
    synthetic: Optional[str] = valid("arithmetic", TEXT)  # built-in task used when no path is given
    synthetic_size: int = valid(20000, "[1, inf)")
    # Task arguments, e.g. {digits: 2, ops: "+-"} for arithmetic; {holdout: 0.1} is the share of
    # the question space reserved for eval (disjoint from train, per seed).
    synthetic_kwargs: Dict[str, Any] = field(default_factory=dict)
    sources: List[DataSourceConfig] = field(default_factory=list)  # a weighted mixture
    split: Optional[str] = valid(None, TEXT)  # split of an HF DatasetDict directory (None: "train")
    # Tokenizer directory (tokenizer.json + tokenizer_config.json); None: the model's path,
    # or the built-in character tokenizer ("char") for a model trained from scratch.
    tokenizer: Optional[str] = valid(None, TEXT)
    # Dataset column names: question text, reference answer, code tests, target language.
    question_field: str = valid("question", TEXT)
    answer_field: str = valid("answer", TEXT)
    tests_field: str = valid("tests", TEXT)
    language_field: str = valid("language", TEXT)
    template: str = valid("r1_zero", PROMPT_TEMPLATE)  # r1_zero | chat | none
    max_prompt_len: int = valid(128, "[1, inf)")  # prompts longer than this (tokens) are dropped and counted
    on_bad_row: str = valid("error", ("error", "skip"))  # error | skip (skipped rows are counted)
    # Canonical fields every row must have (question, answer, tests, language, solution);
    # code datasets would use [question, tests].
    required_fields: List[str] = valid(["question", "answer"], ("question", "answer", "tests", "language", "solution"))
    shuffle: bool = True
    seed: int = valid(0, "[0, inf)")
    num_epochs: Optional[int] = valid(None, "[1, inf)")  # None: repeat forever
    # Held-out share of each file for eval (seeded, never trained on); synthetic tasks hold out
    # their own questions. eval_size caps the eval rows (and sets the synthetic eval size).
    eval_fraction: float = valid(0.0, "[0, 1)")
    eval_size: int = valid(256, "[1, inf)")
    eval_path: Optional[str] = valid(None, TEXT)  # a separate eval file; overrides eval_fraction
    worker_count: int = valid(0, "[0, inf)")  # grain read threads (0: read in the main thread, rows are in memory)


# ---------------------------------------------------------------------------------------------
# Rollout (sampler)
# ---------------------------------------------------------------------------------------------
@dataclass
class SamplerConfig:
    max_new_tokens: int = valid(64, "[1, inf)")  # R1: 32,768 (65,536 after step 8.2k)
    temperature: float = valid(1.0, "[0, inf)")  # R1: 1.0 (stage-2 RL: 0.7)
    top_p: float = valid(1.0, "(0, 1]")
    top_k: int = valid(0, "[0, inf)")  # 0: off
    stop_token_ids: List[int] = valid([], "[0, inf)")  # eos is always a stop
    stop_strings: List[str] = valid([], TEXT)
    kv_cache_dtype: str = valid("float32", DTYPES)  # or bfloat16
    prompt_buckets: List[int] = valid([32, 64, 128, 256, 512, 1024], "[1, inf)")
    # Decode in shrinking batch buckets: when at most half a bucket's rows are still live, they
    # are gathered into the next smaller one (same tokens; r1jax.sampler.batch_buckets).
    compact: bool = True
    # The smallest batch bucket: below it a decode step costs little more per row than the
    # compaction's copies and extra compilations (rollouts under 2x this never compact).
    min_decode_batch: int = valid(64, "[1, inf)")
    # Attention reads a completion-cache window of min_decode_window * 2^k slots, grown as the
    # step crosses it (>= max_new_tokens: one window; r1jax.sampler.window_buckets); under
    # kv_cache_budget, the window that holds the longest live slot's step, up and down.
    min_decode_window: int = valid(64, "[1, inf)")
    # KV-cache budget in cached positions (tokens; 0: no limit), prompt caches included: one
    # position holds every layer's K and V (r1jax.sampler.kv_bytes_per_token bytes). When the
    # P prompts' caches plus max_new_tokens per sample do not fit, the rollout decodes as many
    # samples as fit and seats a pending one in each slot that frees up (continuous batching;
    # same tokens; r1jax.sampler.budget_slots).
    kv_cache_budget: int = valid(0, "[0, inf)")
    # The sampler's weights and compute dtype (None: the model's): bfloat16 against a float32
    # trainer is the sampler/trainer mismatch grpo.rollout_correction corrects (set
    # grpo.recompute_logp_old=true so pi_old is the trainer's and logp_sampler the sampler's).
    dtype: Optional[str] = valid(None, ("float32", "bfloat16"))


# ---------------------------------------------------------------------------------------------
# Rewards
# ---------------------------------------------------------------------------------------------
@dataclass
class RewardFnConfig:
    # A built-in name (accuracy, format, language_consistency, code, length) or an import
    # path "package.module:function" / "package.module.function".
    name: str = valid("accuracy", TEXT)
    weight: float = valid(1.0, "(-inf, inf)")
    # Knobs passed to the function as keyword arguments (e.g. format: {strict: false}).
    kwargs: Dict[str, Any] = field(default_factory=dict)
    # Name in metrics and per-function columns (None: the function's name).
    alias: Optional[str] = valid(None, TEXT)
    # Per-sample timeout (None: the function's own default, e.g. code's, else rewards.timeout_s).
    timeout_s: Optional[float] = valid(None, "(0, inf)")


@dataclass
class RewardsConfig:
    # R1: accuracy and format, added with equal weight.
    functions: List[RewardFnConfig] = field(
        default_factory=lambda: [RewardFnConfig("accuracy", 1.0), RewardFnConfig("format", 1.0)]
    )
    timeout_s: float = valid(10.0, "(0, inf)")  # per sample
    num_workers: int = valid(8, "[1, inf)")
    on_error: str = valid("zero", ("zero", "none"))  # zero | none: the score of a sample whose function raised/timed out
    on_none: str = valid("zero", ("zero", "nan"))  # zero | nan: what a None score adds to the total


# ---------------------------------------------------------------------------------------------
# GRPO
# ---------------------------------------------------------------------------------------------
@dataclass
class GRPOConfig:
    group_size: int = valid(16, "[2, inf)")  # G, outputs per question (R1: 16)
    beta: float = valid(0.001, "[0, inf)")  # KL coefficient (R1: 0.001); 0 skips the reference model entirely
    eps_low: float = valid(0.2, "[0, inf)")  # clip range below 1 (R1 stage 1: 10, i.e. effectively no clipping)
    eps_high: float = valid(0.2, "[0, inf)")  # clip range above 1 (DAPO clip-higher: 0.28)
    # seq_mean_token_mean (paper) | token_mean (DAPO) | seq_mean_token_sum_norm (Dr.GRPO)
    loss_agg: str = valid("seq_mean_token_mean", ("seq_mean_token_mean", "token_mean", "seq_mean_token_sum_norm"))
    scale_rewards: str = valid("group", ("group", "batch", "none"))  # group | batch | none (Dr.GRPO)
    adv_eps: float = valid(1e-4, "(0, inf)")  # added to std before dividing
    ref_reset_every: int = valid(400, "[0, inf)")  # reference replaced by the policy every N updates (R1: 400)
    num_minibatches: int = valid(16, "[1, inf)")  # M: a rollout feeds M policy updates (R1: 16)
    inner_epochs: int = valid(1, "[1, inf)")  # passes over the rollout (R1: 1)
    micro_batches: int = valid(1, "[1, inf)")  # gradient accumulation inside one update
    mask_truncated: bool = False  # drop length-capped completions from the loss
    recompute_logp_old: bool = False  # recompute log pi_old with a forward instead of the sampler's
    dynamic_sampling: bool = False  # DAPO: drop groups whose rewards are all equal, refill
    dynamic_sampling_max_tries: int = valid(3, "[1, inf)")
    # The clipped ratio (r1jax/objectives.py): token (GRPO) | sequence (GSPO, Zheng et al. 2025:
    # the length-normalised sequence ratio, clipped per sequence; the paper: eps 3e-4 / 4e-4).
    importance_sampling_level: str = valid("token", ("token", "sequence"))
    # Sampler/trainer mismatch: none | tis (token weights min(pi_old/q, tis_cap), Yao et al. 2025)
    # | mis (sequences whose prod pi_old/q leaves [mis_low, mis_high] dropped, Liu, Li et al. 2025).
    rollout_correction: str = valid("none", ("none", "tis", "mis"))
    tis_cap: float = valid(2.0, "(0, inf)")  # TIS's C (verl's rollout_is_threshold default)
    mis_low: float = valid(0.5, "[0, inf)")  # MIS band (verl's decoupled_seq_is_rs preset)
    mis_high: float = valid(2.0, "(0, inf)")
    # Sequence packing in the update and the reference pass (r1jax/packing.py).
    packing: bool = False
    pack_chunk_tokens: int = valid(0, "[0, inf)")  # chunk budget L; 0: Tp + Tc (any row fits)
    micro_batch_tokens: int = valid(0, "[0, inf)")  # with packing: tokens per micro-batch; 0: one


# ---------------------------------------------------------------------------------------------
# Optimisation and the loop
# ---------------------------------------------------------------------------------------------
@dataclass
class TrainConfig:
    steps: int = valid(100, "[0, inf)")  # number of policy updates
    prompts_per_rollout: int = valid(32, "[1, inf)")  # P questions per rollout (R1: 512 questions x 16 = 8,192 outputs)
    lr: float = valid(3e-6, "(0, inf)")  # R1: 3e-6
    warmup_steps: int = valid(0, "[0, inf)")
    schedule: str = valid("constant", ("constant", "cosine"))  # constant | cosine
    weight_decay: float = valid(0.0, "[0, inf)")  # not published
    b1: float = valid(0.9, "[0, 1)")
    b2: float = valid(0.95, "[0, 1)")  # not published
    adam_eps: float = valid(1e-8, "(0, inf)")
    max_grad_norm: float = valid(1.0, "[0, inf)")  # not published
    # Consecutive updates with a non-finite loss or gradient tolerated (each is skipped: the
    # parameters stay unchanged); one more stops the run. 0: stop at the first.
    max_nonfinite_updates: int = valid(3, "[0, inf)")
    seed: int = valid(0, "[0, inf)")
    # Rollouts (r1jax.offpolicy): sync draws rollout k with the current policy; async draws it
    # on its own sampling mesh, in a background thread, with policy version
    # max(0, k - max_staleness) (AReaL's staleness bound eta; PipelineRL / slime's async mode).
    rollout_mode: str = valid("sync", ("sync", "async"))
    max_staleness: int = valid(1, "[0, inf)")  # async: versions a rollout may lag (0: on-policy)
    sampling_devices: int = valid(0, "[0, inf)")  # async: devices of the sampling mesh (0: half)


@dataclass
class SFTConfig:
    """Cold-start supervised fine-tuning before RL (R1: a small cold-start SFT)."""

    steps: int = valid(0, "[0, inf)")
    batch_size: int = valid(32, "[1, inf)")
    lr: float = valid(1e-3, "(0, inf)")
    warmup_steps: int = valid(10, "[0, inf)")
    # AdamW after global-norm clipping, warmup then cosine decay to lr * final_lr_ratio.
    b1: float = valid(0.9, "[0, 1)")
    b2: float = valid(0.98, "[0, 1)")
    weight_decay: float = valid(0.0, "[0, inf)")
    max_grad_norm: float = valid(1.0, "[0, inf)")  # 0: no clipping
    final_lr_ratio: float = valid(0.1, "[0, 1]")


@dataclass
class EvalConfig:
    every: int = valid(0, "[0, inf)")  # evaluate every N updates (0: only before and after)
    num_prompts: int = valid(128, "[0, inf)")
    k: int = valid(1, "[1, inf)")  # samples per prompt: pass@1 averaged over k, and cons@k
    temperature: float = valid(0.6, "[0, inf)")  # R1 evaluation: 0.6
    top_p: float = valid(0.95, "(0, 1]")  # R1 evaluation: 0.95
    max_new_tokens: Optional[int] = valid(None, "[1, inf)")  # None: the sampler's


@dataclass
class CheckpointConfig:
    every: int = valid(0, "[0, inf)")  # save every K updates (0: only at the end and on preemption)
    keep: int = valid(3, "[1, inf)")  # keep the last N
    keep_best_metric: Optional[str] = valid(None, TEXT)  # e.g. "eval/accuracy": also keep the best
    keep_best_mode: str = valid("max", ("max", "min"))  # max | min: which end of keep_best_metric is best
    async_save: bool = True  # False: every save blocks until written (debugging, benchmarks)
    save_on_preemption: bool = True
    # Integrity check of a checkpoint before restoring it: "checksum" (CRC32 of every file,
    # catches garbled bytes that still decode), "size" (catches truncated/missing files,
    # reads no data) or "none". The file list is written inside the step before it appears.
    verify: str = valid("checksum", ("checksum", "size", "none"))


@dataclass
class RunConfig:
    dir: Optional[str] = valid(None, TEXT)  # None: runs/<name>-<timestamp>
    name: str = valid("r1jax", TEXT)
    tensorboard: bool = True
    plots: bool = True
    progress: bool = True
    samples_to_log: int = valid(4, "[0, inf)")
    # Step watchdog (r1jax/distributed.py): a process that makes no progress for this long (a
    # rollout, an update, an eval, a checkpoint; the first step includes compilation) ends the
    # job with a stack dump instead of waiting forever on a collective. 0: off.
    step_timeout_s: float = valid(3600.0, "[0, inf)")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    data: DataConfig = field(default_factory=DataConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    rewards: RewardsConfig = field(default_factory=RewardsConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    run: RunConfig = field(default_factory=RunConfig)


# ---------------------------------------------------------------------------------------------
# Loading, merging, overriding
# ---------------------------------------------------------------------------------------------
def _valid_keys(schema: Any, dotted: str) -> tuple[str, List[str]]:
    """The dataclass path of `dotted`'s parent and the valid keys there."""
    node = schema
    parts = dotted.split(".")
    walked = []
    for part in parts[:-1]:
        if dataclasses.is_dataclass(node):
            names = {f.name: f for f in dataclasses.fields(node)}
            if part not in names:
                break
            node = getattr(node, part)
            walked.append(part)
        else:
            break
    if dataclasses.is_dataclass(node):
        return ".".join(walked), sorted(f.name for f in dataclasses.fields(node))
    return ".".join(walked), []


def _explain(err: Exception, schema: Any, origin: str) -> ConfigError:
    """One line naming the culprit, from an OmegaConf exception."""
    key = getattr(err, "full_key", None) or getattr(err, "key", None) or ""
    if isinstance(err, (oc_errors.ConfigAttributeError, oc_errors.ConfigKeyError)):
        parent, valid = _valid_keys(schema, str(key))
        leaf = str(key).split(".")[-1]
        near = difflib.get_close_matches(leaf, valid, n=1)
        hint = f" (did you mean '{near[0]}'?)" if near else ""
        where = f" in '{parent}'" if parent else ""
        return ConfigError(
            f"{origin}: unknown config key '{key}'{where}{hint}; valid keys: {', '.join(valid)}"
        )
    if isinstance(err, oc_errors.ValidationError):
        expected = getattr(err, "ref_type", None) or getattr(err, "object_type", None)
        msg = str(err).splitlines()[0]
        value = getattr(err, "value", None)
        return ConfigError(
            f"{origin}: wrong type for config key '{key}': expected {_type_name(err, expected)}, "
            f"got {type(value).__name__} {value!r} ({msg})"
        )
    return ConfigError(f"{origin}: {str(err).splitlines()[0]} (key '{key}')")


def _type_name(err: Exception, fallback: Any) -> str:
    text = str(err)
    # OmegaConf says e.g. "Value 'abc' of type 'str' could not be converted to Integer".
    if "converted to" in text:
        return text.split("converted to")[-1].split("\n")[0].strip()
    return getattr(fallback, "__name__", str(fallback))


def _load_yaml(path: str, chain: tuple = ()) -> Dict[str, Any]:
    if os.path.isdir(path):
        raise ConfigError(f"{path}: is a directory, not a config file")
    if not os.path.isfile(path):
        raise ConfigError(f"config file not found: {path}")
    if os.path.realpath(path) in chain:
        raise ConfigError(f"{path}: its `base:` chain includes itself")
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {' '.join(str(e).split())[:200]}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not a text file (byte {e.start} is not UTF-8)") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot be read: {e.strerror or e}") from None
    if data is None:
        raise ConfigError(f"{path}: the config file is empty (a truncated write?); it must hold a mapping "
                          "of config keys")
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config file must hold a mapping, got {type(data).__name__}")
    # `base: other.yaml` (relative to this file) lets an experiment state only what it changes.
    bases = data.pop("base", None) or []
    if isinstance(bases, str):
        bases = [bases]
    merged: Dict[str, Any] = {}
    for b in bases:
        bpath = b if os.path.isabs(b) else os.path.join(os.path.dirname(path), b)
        merged = OmegaConf.to_container(OmegaConf.merge(merged, _load_yaml(bpath, chain + (os.path.realpath(path),))))
    return OmegaConf.to_container(OmegaConf.merge(merged, data)) if merged else data


def load_config(path: Union[str, Sequence[str], None] = None, overrides: Optional[List[str]] = None,
                schema: Any = None) -> Config:
    """Defaults <- YAML file (and its `base:` chain) <- `key=value` overrides, type checked.
    `path` may be a list of files, merged in order (e.g. a mesh file, then a model file)."""
    schema = schema if schema is not None else Config()
    conf = OmegaConf.structured(schema)
    paths = [path] if isinstance(path, str) else [p for p in (path or []) if p]
    for one in paths:
        try:
            conf = OmegaConf.merge(conf, _load_yaml(one))
        except oc_errors.OmegaConfBaseException as e:
            raise _explain(e, schema, one) from None
    path = ", ".join(paths) or None
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key=value")
        try:
            conf = OmegaConf.merge(conf, OmegaConf.from_dotlist([item]))
        except oc_errors.OmegaConfBaseException as e:
            raise _explain(e, schema, f"override '{item}'") from None
    try:
        cfg = OmegaConf.to_object(conf)
    except oc_errors.OmegaConfBaseException as e:
        raise _explain(e, schema, path or "config") from None
    for key, value, spec in _problems(cfg, ""):
        # Name where the value came from: the override that set it, else the file.
        origin = next((f"override '{o}'" for o in reversed(overrides or [])
                       if key == o.split("=", 1)[0] or key.startswith(o.split("=", 1)[0] + ".")
                       or key.startswith(o.split("=", 1)[0] + "[")), path or "config")
        raise ConfigError(f"{origin}: {invalid_message(key, value, spec)}")
    return cfg


def to_dict(cfg: Any) -> Dict[str, Any]:
    return OmegaConf.to_container(OmegaConf.structured(cfg))


def to_yaml(cfg: Any) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def save_config(cfg: Any, path: str) -> None:
    """Write the resolved config, so a run states every value it used."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        f.write(to_yaml(cfg))


def from_dict(data: Dict[str, Any], schema: Any = None, origin: str = "config") -> Config:
    schema = schema if schema is not None else Config()
    try:
        cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), data))
    except oc_errors.OmegaConfBaseException as e:
        raise _explain(e, schema, origin) from None
    return validate(cfg, origin)


__all__ = [
    "Config", "ConfigError", "ModelConfig", "RopeScalingConfig", "MeshConfig", "DataConfig",
    "DataSourceConfig", "SamplerConfig", "RewardsConfig", "RewardFnConfig", "GRPOConfig",
    "TrainConfig", "SFTConfig", "EvalConfig", "CheckpointConfig", "RunConfig", "load_config",
    "save_config", "to_dict", "to_yaml", "from_dict", "DictConfig", "ListConfig", "validate", "valid",
    "TEXT", "Rule", "arg", "spec_of",
]
