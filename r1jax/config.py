"""Typed configuration: one dataclass per concern, YAML files as short diffs, dotted overrides.

Parsing, merging and type checking are OmegaConf's (structured configs); this module only
declares the schema and turns OmegaConf's exceptions into one-line messages that name the
culprit and, for unknown keys, list the valid ones.

Every field's comment names the paper symbol (../shared/R1_NOTES.md) where there is one.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf import errors as oc_errors


class ConfigError(ValueError):
    """A configuration problem, with a message that names the culprit."""


# ---------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------
@dataclass
class RopeScalingConfig:
    # "default" (plain RoPE), "llama3" (Llama 3.1 frequency-dependent scaling) or "yarn".
    rope_type: str = "default"
    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192
    # "yarn" (DeepSeek-V3: factor 40, original length 4,096): transformers' fields, same defaults.
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: Optional[float] = None
    mscale_all_dim: Optional[float] = None  # V3: 1.0; scales the softmax by mscale(factor)^2
    attention_factor: Optional[float] = None  # None: derived from factor / mscale / mscale_all_dim
    truncate: bool = True


@dataclass
class MLAConfig:
    """Multi-head Latent Attention (DeepSeek-V2/V3); the DeepSeek-V3 671B values in comments."""

    q_lora_rank: Optional[int] = 24  # queries through a rank-r bottleneck (V3: 1,536); None: full rank
    kv_lora_rank: int = 16  # the joint key/value latent (V3: 512)
    qk_nope_head_dim: int = 8  # per-head key/query features without RoPE (V3: 128)
    qk_rope_head_dim: int = 8  # decoupled RoPE key shared by all heads (V3: 64)
    v_head_dim: int = 8  # (V3: 128)
    rope_interleave: bool = True  # DeepSeek's checkpoints pair RoPE features (x0, x1), (x2, x3), ...


@dataclass
class MoEConfig:
    """Routed (plus shared) experts; DeepSeek-V3 671B / Qwen3-30B-A3B values in comments."""

    num_experts: int = 8  # routed experts E (V3: 256; Qwen3-30B-A3B: 128)
    num_experts_per_tok: int = 2  # K (V3: 8; Qwen3-30B-A3B: 8)
    moe_intermediate_size: int = 32  # each expert's FFN width (V3: 2,048; Qwen3-30B-A3B: 768)
    num_shared_experts: int = 0  # always-on experts, one FFN of n x that width (V3: 1)
    scoring: str = "softmax"  # softmax (Qwen3-MoE) | sigmoid (DeepSeek-V3)
    norm_topk_prob: bool = True  # renormalise the K chosen weights to sum to 1
    routed_scaling_factor: float = 1.0  # multiplies the routed output's weights (V3: 2.5)
    n_group: int = 1  # group-limited routing: experts in n_group groups (V3: 8) ...
    topk_group: int = 1  # ... keep the topk_group best groups, group score = its top-2 sum (V3: 4)
    # A per-expert bias added to the scores for selection only (V3's e_score_correction_bias,
    # aux-loss-free balancing); updated by r1jax.models.moe.update_router_bias, not by gradients.
    router_bias: bool = False
    dense_layers: List[int] = field(default_factory=list)  # layers with a dense FFN (V3: 0, 1, 2)
    # Expert capacity = ceil(capacity_factor * tokens * K / E) per expert and token group; the
    # assignments past it are dropped (counted in moe/dropped). 0: no token is ever dropped
    # (capacity = all tokens: exact but every expert's FLOPs; for tests and tiny models).
    capacity_factor: float = 0.0
    # Aux-loss-free bias step gamma (V3 pre-training: 0.001, then 0 for its last 500B tokens).
    # Default 0 for RL from a checkpoint: the released bias is already balanced and frozen, and
    # every step flips the routing of tokens near the top-K boundary outside the gradient,
    # which moves the trainer's policy away from the sampler's (the ratio drift MoE RL fights).
    bias_update_gamma: float = 0.0
    seq_aux_loss_coef: float = 0.0  # alpha of V3's sequence-wise balance loss (V3: 0.0001)
    routing_replay: str = "none"  # none | rollout: route updates through the sampler's experts


@dataclass
class ModelConfig:
    # A Hugging Face checkpoint directory (config.json + *.safetensors). When set, the shape
    # fields below are read from its config.json and the weights are loaded from it.
    path: Optional[str] = None
    architecture: str = "qwen2"  # a registered family: qwen2 | qwen3 | llama (r1jax.models.registry)
    vocab_size: int = 256
    hidden_size: int = 64
    intermediate_size: int = 176
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: Optional[int] = None  # None: hidden_size // num_heads
    rope_theta: float = 10000.0
    rope_scaling: Optional[RopeScalingConfig] = None
    rms_norm_eps: float = 1e-6
    qkv_bias: bool = True  # Qwen2: bias on q/k/v projections; Llama: none
    o_bias: bool = False  # bias on the output projection (Llama's attention_bias=true)
    qk_norm: bool = False  # Qwen3: RMSNorm over each query/key head before RoPE
    tie_embeddings: bool = False
    max_position_embeddings: int = 4096
    param_dtype: str = "float32"  # storage dtype of the weights
    dtype: str = "float32"  # compute dtype (bfloat16 for real runs)
    # Layers are always stored stacked; run them unrolled (default: about 10-17% faster
    # updates on CPU, where XLA copies each scanned layer's weight slice) or with lax.scan
    # (one compiled layer body: much faster compiles for deep models).
    scan_layers: bool = False
    # Rematerialise each layer in the backward pass: "none" | "full".
    remat: str = "none"
    bos_token_id: Optional[int] = None
    eos_token_id: Optional[int] = None
    pad_token_id: Optional[int] = None
    mla: Optional[MLAConfig] = None  # DeepSeek-V3: attention through compressed latents
    moe: Optional[MoEConfig] = None  # DeepSeek-V3 / Qwen3-MoE: routed experts
    num_mtp_layers: int = 0  # DeepSeek-V3 multi-token-prediction modules (V3: 1)


# ---------------------------------------------------------------------------------------------
# Mesh
# ---------------------------------------------------------------------------------------------
@dataclass
class MeshConfig:
    # Axes inside a node (fast interconnect: NVLink, a TPU slice's ICI) and across nodes (slow:
    # InfiniBand, DCN). Each physical axis's size is ici[axis] * dcn[axis]. One axis may be -1
    # in `ici`, filled from the device count. Valid axis names live in r1jax.mesh.MESH_AXES.
    ici: Dict[str, int] = field(default_factory=lambda: {"fsdp": -1})
    dcn: Dict[str, int] = field(default_factory=dict)
    # Per-layout overrides of the logical-axis rules (logical name -> list of mesh axes or
    # null), merged over r1jax.mesh.TRAIN_RULES / SAMPLE_RULES.
    train_rules: Dict[str, Any] = field(default_factory=dict)
    sample_rules: Dict[str, Any] = field(default_factory=dict)
    # Devices per node when emulating nodes on one process (None: the ici product).
    devices_per_node: Optional[int] = None


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------
@dataclass
class DataSourceConfig:
    path: Optional[str] = None  # JSONL, Parquet, or an HF `datasets` directory saved to disk
    format: str = "auto"  # auto | jsonl | parquet | arrow | synthetic
    synthetic: Optional[str] = None  # a built-in synthetic task name, e.g. "arithmetic"
    synthetic_kwargs: Optional[Dict[str, Any]] = None  # this task's arguments (None: data.synthetic_kwargs)
    weight: float = 1.0  # mixture weight
    split: Optional[str] = None  # for DatasetDict directories


@dataclass
class DataConfig:
    path: Optional[str] = None  # shorthand for a single source: data.path=FILE
    format: str = "auto"
    synthetic: Optional[str] = "arithmetic"  # built-in task used when no path is given
    synthetic_size: int = 20000
    # Task arguments, e.g. {digits: 2, ops: "+-"} for arithmetic; {holdout: 0.1} is the share of
    # the question space reserved for eval (disjoint from train, per seed).
    synthetic_kwargs: Dict[str, Any] = field(default_factory=dict)
    sources: List[DataSourceConfig] = field(default_factory=list)  # a weighted mixture
    split: Optional[str] = None  # split of an HF DatasetDict directory (None: "train")
    # Tokenizer directory (tokenizer.json + tokenizer_config.json); None: the model's path,
    # or the built-in character tokenizer ("char") for a model trained from scratch.
    tokenizer: Optional[str] = None
    # Dataset column names: question text, reference answer, code tests, target language.
    question_field: str = "question"
    answer_field: str = "answer"
    tests_field: str = "tests"
    language_field: str = "language"
    template: str = "r1_zero"  # r1_zero | chat | none
    max_prompt_len: int = 128  # prompts longer than this (tokens) are dropped and counted
    on_bad_row: str = "error"  # error | skip (skipped rows are counted)
    # Canonical fields every row must have (question, answer, tests, language, solution);
    # code datasets would use [question, tests].
    required_fields: List[str] = field(default_factory=lambda: ["question", "answer"])
    shuffle: bool = True
    seed: int = 0
    num_epochs: Optional[int] = None  # None: repeat forever
    # Held-out share of each file for eval (seeded, never trained on); synthetic tasks hold out
    # their own questions. eval_size caps the eval rows (and sets the synthetic eval size).
    eval_fraction: float = 0.0
    eval_size: int = 256
    eval_path: Optional[str] = None  # a separate eval file; overrides eval_fraction
    worker_count: int = 0  # grain read threads (0: read in the main thread, rows are in memory)


# ---------------------------------------------------------------------------------------------
# Rollout (sampler)
# ---------------------------------------------------------------------------------------------
@dataclass
class SamplerConfig:
    max_new_tokens: int = 64  # R1: 32,768 (65,536 after step 8.2k)
    temperature: float = 1.0  # R1: 1.0 (stage-2 RL: 0.7)
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    stop_token_ids: List[int] = field(default_factory=list)  # eos is always a stop
    stop_strings: List[str] = field(default_factory=list)
    kv_cache_dtype: str = "float32"  # or bfloat16
    prompt_buckets: List[int] = field(default_factory=lambda: [32, 64, 128, 256, 512, 1024])


# ---------------------------------------------------------------------------------------------
# Rewards
# ---------------------------------------------------------------------------------------------
@dataclass
class RewardFnConfig:
    # A built-in name (accuracy, format, language_consistency, code, length) or an import
    # path "package.module:function" / "package.module.function".
    name: str = "accuracy"
    weight: float = 1.0
    # Knobs passed to the function as keyword arguments (e.g. format: {strict: false}).
    kwargs: Dict[str, Any] = field(default_factory=dict)
    # Name in metrics and per-function columns (None: the function's name).
    alias: Optional[str] = None
    # Per-sample timeout (None: the function's own default, e.g. code's, else rewards.timeout_s).
    timeout_s: Optional[float] = None


@dataclass
class RewardsConfig:
    # R1: accuracy and format, added with equal weight.
    functions: List[RewardFnConfig] = field(
        default_factory=lambda: [RewardFnConfig("accuracy", 1.0), RewardFnConfig("format", 1.0)]
    )
    timeout_s: float = 10.0  # per sample
    num_workers: int = 8
    on_error: str = "zero"  # zero | none: the score of a sample whose function raised/timed out
    on_none: str = "zero"  # zero | nan: what a None score adds to the total


# ---------------------------------------------------------------------------------------------
# GRPO
# ---------------------------------------------------------------------------------------------
@dataclass
class GRPOConfig:
    group_size: int = 16  # G, outputs per question (R1: 16)
    beta: float = 0.001  # KL coefficient (R1: 0.001); 0 skips the reference model entirely
    eps_low: float = 0.2  # clip range below 1 (R1 stage 1: 10, i.e. effectively no clipping)
    eps_high: float = 0.2  # clip range above 1 (DAPO clip-higher: 0.28)
    # seq_mean_token_mean (paper) | token_mean (DAPO) | seq_mean_token_sum_norm (Dr.GRPO)
    loss_agg: str = "seq_mean_token_mean"
    scale_rewards: str = "group"  # group | batch | none (Dr.GRPO)
    adv_eps: float = 1e-4  # added to std before dividing
    ref_reset_every: int = 400  # reference replaced by the policy every N updates (R1: 400)
    num_minibatches: int = 16  # M: a rollout feeds M policy updates (R1: 16)
    inner_epochs: int = 1  # passes over the rollout (R1: 1)
    micro_batches: int = 1  # gradient accumulation inside one update
    mask_truncated: bool = False  # drop length-capped completions from the loss
    recompute_logp_old: bool = False  # recompute log pi_old with a forward instead of the sampler's
    dynamic_sampling: bool = False  # DAPO: drop groups whose rewards are all equal, refill
    dynamic_sampling_max_tries: int = 3


# ---------------------------------------------------------------------------------------------
# Optimisation and the loop
# ---------------------------------------------------------------------------------------------
@dataclass
class TrainConfig:
    steps: int = 100  # number of policy updates
    prompts_per_rollout: int = 32  # P questions per rollout (R1: 512 questions x 16 = 8,192 outputs)
    lr: float = 3e-6  # R1: 3e-6
    warmup_steps: int = 0
    schedule: str = "constant"  # constant | cosine
    weight_decay: float = 0.0  # not published
    b1: float = 0.9
    b2: float = 0.95  # not published
    adam_eps: float = 1e-8
    max_grad_norm: float = 1.0  # not published
    seed: int = 0


@dataclass
class SFTConfig:
    """Cold-start supervised fine-tuning before RL (R1: a small cold-start SFT)."""

    steps: int = 0
    batch_size: int = 32
    lr: float = 1e-3
    warmup_steps: int = 10


@dataclass
class EvalConfig:
    every: int = 0  # evaluate every N updates (0: only before and after)
    num_prompts: int = 128
    k: int = 1  # samples per prompt: pass@1 averaged over k, and cons@k
    temperature: float = 0.6  # R1 evaluation: 0.6
    top_p: float = 0.95  # R1 evaluation: 0.95
    max_new_tokens: Optional[int] = None  # None: the sampler's


@dataclass
class CheckpointConfig:
    every: int = 0  # save every K updates (0: only at the end and on preemption)
    keep: int = 3  # keep the last N
    keep_best_metric: Optional[str] = None  # e.g. "eval/accuracy": also keep the best
    keep_best_mode: str = "max"  # max | min: which end of keep_best_metric is best
    async_save: bool = True  # False: every save blocks until written (debugging, benchmarks)
    save_on_preemption: bool = True
    # Integrity check of a checkpoint before restoring it: "checksum" (CRC32 of every file,
    # catches garbled bytes that still decode), "size" (catches truncated/missing files,
    # reads no data) or "none". The file list is written inside the step before it appears.
    verify: str = "checksum"


@dataclass
class RunConfig:
    dir: Optional[str] = None  # None: runs/<name>-<timestamp>
    name: str = "r1jax"
    tensorboard: bool = True
    plots: bool = True
    progress: bool = True
    samples_to_log: int = 4


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


def _load_yaml(path: str) -> Dict[str, Any]:
    if not os.path.isfile(path):
        raise ConfigError(f"config file not found: {path}")
    with open(path) as f:
        try:
            data = yaml.safe_load(f)
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {str(e).splitlines()[0]}") from None
    data = data or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config file must hold a mapping, got {type(data).__name__}")
    # `base: other.yaml` (relative to this file) lets an experiment state only what it changes.
    bases = data.pop("base", None) or []
    if isinstance(bases, str):
        bases = [bases]
    merged: Dict[str, Any] = {}
    for b in bases:
        bpath = b if os.path.isabs(b) else os.path.join(os.path.dirname(path), b)
        merged = OmegaConf.to_container(OmegaConf.merge(merged, _load_yaml(bpath)))
    return OmegaConf.to_container(OmegaConf.merge(merged, data)) if merged else data


def load_config(path: Optional[str] = None, overrides: Optional[List[str]] = None,
                schema: Any = None) -> Config:
    """Defaults <- YAML file (and its `base:` chain) <- `key=value` overrides, type checked."""
    schema = schema if schema is not None else Config()
    conf = OmegaConf.structured(schema)
    if path:
        try:
            conf = OmegaConf.merge(conf, _load_yaml(path))
        except oc_errors.OmegaConfBaseException as e:
            raise _explain(e, schema, path) from None
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key=value")
        try:
            conf = OmegaConf.merge(conf, OmegaConf.from_dotlist([item]))
        except oc_errors.OmegaConfBaseException as e:
            raise _explain(e, schema, f"override '{item}'") from None
    try:
        return OmegaConf.to_object(conf)
    except oc_errors.OmegaConfBaseException as e:
        raise _explain(e, schema, path or "config") from None


def to_dict(cfg: Any) -> Dict[str, Any]:
    return OmegaConf.to_container(OmegaConf.structured(cfg))


def to_yaml(cfg: Any) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def save_config(cfg: Any, path: str) -> None:
    """Write the resolved config, so a run states every value it used."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        f.write(to_yaml(cfg))


def from_dict(data: Dict[str, Any], schema: Any = None) -> Config:
    schema = schema if schema is not None else Config()
    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), data))
    except oc_errors.OmegaConfBaseException as e:
        raise _explain(e, schema, "config") from None


__all__ = [
    "Config", "ConfigError", "ModelConfig", "RopeScalingConfig", "MeshConfig", "DataConfig",
    "DataSourceConfig", "SamplerConfig", "RewardsConfig", "RewardFnConfig", "GRPOConfig",
    "TrainConfig", "SFTConfig", "EvalConfig", "CheckpointConfig", "RunConfig", "load_config",
    "save_config", "to_dict", "to_yaml", "from_dict", "DictConfig", "ListConfig",
]
