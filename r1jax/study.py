"""Mesh scaling study: compile the programs of one GRPO step ahead of time for each mesh and
project their time on a named hardware profile.

A GRPO step runs four kinds of programs (R1: one rollout of P x G outputs, the reference
log-probs, M policy updates):

  prefill    one forward over the P prompts that fills their KV cache;
  decode     ONE sampler step: the P x G current tokens through the model, attending to their
             prompt's cache (stored once per prompt, as r1jax's sampler does) and to their own
             completion cache, then the next token. The sampler runs it in a while loop; the
             study compiles a single step so that its cost is not hidden inside a loop;
  reference  the frozen reference model's per-token log-probs for one mini-batch;
  update     one policy update (forward, backward, AdamW) on one mini-batch.

For each mesh, each program is lowered from abstract shapes (nothing is allocated, so a 671B
model compiles on a laptop) and reported through `r1jax.aot.program_report`: per-device
memory, FLOPs and bytes (loop-corrected), collectives by kind split inside / across nodes.
Beside them, an analytic floor from the shapes alone (`analytic_part`): the bytes that must be
held and moved and the FLOPs that must be done. `r1jax.hardware.project` turns each program
into seconds on a profile; `grpo_step` adds them up into a whole GRPO step. Where the devices
really exist (fake CPU devices, a GPU), the programs also run on random inputs and are timed.

Entry points: `run_study(cfg, meshes, ...)`, `grpo_step(...)`, `analytic_part(...)`,
`param_counts(...)`; the command is `r1jax study` (r1jax/commands/study.py).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Dict, List, Optional

PARTS = ("prefill", "decode", "reference", "update")


# ---------------------------------------------------------------------------------------------
# Analytic model: parameter counts and per-part FLOPs / bytes from shapes alone
# ---------------------------------------------------------------------------------------------
def _dtype_bytes(name: str) -> int:
    return {"float32": 4, "bfloat16": 2, "float16": 2, "float64": 8}.get(str(name), 4)


def param_counts(mcfg) -> Dict[str, float]:
    """Parameter counts from a ModelConfig's shapes (dense, MLA attention, MoE FFNs).

    total: every parameter; matmul: the weights a token's forward multiplies by (the active
    experts only, the unembedding, not the embedding lookup); embedding: the lookup table;
    expert: all routed experts' weights (0 for dense models); per_layer_attention and
    per_layer_ffn (dense FFN) for the bytes model. MTP modules are left out."""
    d, L = mcfg.hidden_size, mcfg.num_layers
    v = mcfg.vocab_size
    nh, nk = mcfg.num_heads, mcfg.num_kv_heads
    dh = mcfg.head_dim or d // nh
    mla = getattr(mcfg, "mla", None)
    moe = getattr(mcfg, "moe", None)
    if mla is not None:
        qk = mla.qk_nope_head_dim + mla.qk_rope_head_dim
        q = (d * mla.q_lora_rank + mla.q_lora_rank + mla.q_lora_rank * nh * qk
             if mla.q_lora_rank else d * nh * qk)
        attn = (q + d * (mla.kv_lora_rank + mla.qk_rope_head_dim) + mla.kv_lora_rank
                + mla.kv_lora_rank * nh * (mla.qk_nope_head_dim + mla.v_head_dim)
                + nh * mla.v_head_dim * d)
    else:
        attn = d * nh * dh + 2 * d * nk * dh + nh * dh * d
        if getattr(mcfg, "qkv_bias", False):
            attn += nh * dh + 2 * nk * dh
        if getattr(mcfg, "qk_norm", False):
            attn += 2 * dh
    attn += 2 * d  # the two RMSNorm scales of a block
    dense_ffn = 3 * d * mcfg.intermediate_size
    if moe is not None:
        dense_layers = set(moe.dense_layers)
        n_moe = sum(1 for i in range(L) if i not in dense_layers)
        expert = 3 * d * moe.moe_intermediate_size
        routed = moe.num_experts * expert
        shared = moe.num_shared_experts * expert
        router = d * moe.num_experts + (moe.num_experts if moe.router_bias else 0)
        ffn_total = (L - n_moe) * dense_ffn + n_moe * (routed + shared + router)
        ffn_active = (L - n_moe) * dense_ffn + n_moe * (
            moe.num_experts_per_tok * expert + shared + router)
        expert_total = n_moe * routed
    else:
        ffn_total = ffn_active = L * dense_ffn
        expert_total = 0
    embed = v * d
    head = 0 if mcfg.tie_embeddings else d * v
    total = L * attn + ffn_total + embed + head + d
    return {"total": float(total), "matmul": float(L * attn + ffn_active + d * v),
            "embedding": float(embed), "expert": float(expert_total),
            "per_layer_attention": float(attn), "layers": float(L)}


def kv_bytes_per_token(mcfg, cache_dtype: str) -> float:
    """KV-cache bytes per token over all layers: K and V per KV head, or MLA's compressed
    latent (kv_lora_rank + the shared RoPE key), which is what DeepSeek's inference caches."""
    b = _dtype_bytes(cache_dtype)
    mla = getattr(mcfg, "mla", None)
    if mla is not None:
        return float(mcfg.num_layers * (mla.kv_lora_rank + mla.qk_rope_head_dim) * b)
    dh = mcfg.head_dim or mcfg.hidden_size // mcfg.num_heads
    return float(mcfg.num_layers * 2 * mcfg.num_kv_heads * dh * b)


def _attn_flops_per_token(mcfg, context: float) -> float:
    """Scores and weighted values: 2 x 2 x heads x head_dim x attended positions, per layer."""
    mla = getattr(mcfg, "mla", None)
    nh = mcfg.num_heads
    if mla is not None:
        dqk, dv = mla.qk_nope_head_dim + mla.qk_rope_head_dim, mla.v_head_dim
    else:
        dqk = dv = mcfg.head_dim or mcfg.hidden_size // nh
    return 2.0 * mcfg.num_layers * nh * (dqk + dv) * context


def _experts_touched(moe, tokens: float) -> float:
    """Expected share of routed experts at least one of `tokens` tokens picks (uniform routing)."""
    if moe is None:
        return 1.0
    p = moe.num_experts_per_tok / moe.num_experts
    return 1.0 - (1.0 - p) ** max(tokens, 0.0)


def _batch_split(n: int, mesh_shape: Dict[str, int]) -> int:
    """How many ways a batch of `n` rows splits: the rules' "batch" axes, keeping the longest
    prefix whose product divides n (as r1jax.mesh.logical_to_spec does)."""
    from r1jax.mesh import TRAIN_RULES

    axes = dict(TRAIN_RULES)["batch"]
    axes = [a for a in ((axes,) if isinstance(axes, str) else tuple(axes or ()))
            if mesh_shape.get(a, 1) > 1]
    while axes and n % math.prod(mesh_shape[a] for a in axes):
        axes = axes[:-1]
    return math.prod(mesh_shape[a] for a in axes) if axes else 1


@dataclasses.dataclass(frozen=True)
class Shape:
    """The shapes of one GRPO step's programs: P prompts x G samples, a rollout split into M
    mini-batches of `minibatch` sequences, prompt and completion lengths in tokens."""

    prompts: int
    group_size: int
    minibatch: int
    prompt_len: int
    completion_len: int

    @property
    def rollout(self) -> int:
        return self.prompts * self.group_size


def analytic_part(part: str, mcfg, shape: Shape, mesh_shape: Dict[str, int], *,
                  cache_dtype: Optional[str] = None, context: Optional[float] = None,
                  completion_len: Optional[float] = None) -> Dict[str, float]:
    """The floor of one program per device: FLOPs that must be done, bytes that must move
    through HBM, and bytes that must be held, if the work split perfectly over the devices.

    FLOPs: split over the devices the batch splits over (the rules' batch axes that divide it)
    times tensor; 2 per matmul weight per token forward (x3 for forward + backward, x4 with full
    rematerialisation), plus attention over the attended positions (half the sequence on
    average for a causal forward; the cache length for a decode step at `context`).
    Bytes moved: every weight a device multiplies by is read once per pass (tensor
    parallelism splits them, fsdp and data do not: a gathered weight is read whole); the
    decode step also reads its share of the KV cache; the update reads and writes its shard
    of the optimizer state and parameters once. MoE: a decode step reads the experts its
    tokens pick (expected share under uniform routing).
    Bytes held: parameters, optimizer state (AdamW: two moments in the parameter dtype),
    gradients, the reference, the KV cache, the saved layer inputs of a rematerialised
    backward pass; sharded as the train rules shard them (fsdp x tensor) or, for sampling,
    over tensor only.
    """
    if part not in PARTS:
        raise ValueError(f"unknown part {part!r}; valid: {', '.join(PARTS)}")
    pc = param_counts(mcfg)
    n_dev = max(1, math.prod(mesh_shape.values()))
    tensor = mesh_shape.get("tensor", 1)
    shard = mesh_shape.get("fsdp", 1) * tensor
    pb = _dtype_bytes(mcfg.param_dtype)
    ab = _dtype_bytes(mcfg.dtype)
    cdt = cache_dtype or mcfg.dtype
    tc = float(completion_len if completion_len is not None else shape.completion_len)
    seq = shape.prompt_len + tc
    d, L = mcfg.hidden_size, mcfg.num_layers
    weights = pc["total"] * pb
    moe = getattr(mcfg, "moe", None)
    out: Dict[str, float] = {}
    if part in ("prefill", "reference", "update"):
        n_seq = shape.prompts if part == "prefill" else shape.minibatch
        t = shape.prompt_len if part == "prefill" else seq
        tokens = n_seq * t
        fwd = tokens * (2 * pc["matmul"] + _attn_flops_per_token(mcfg, t / 2))
        passes = 1 if part != "update" else (4 if mcfg.remat == "full" else 3)
        out["flops"] = fwd * passes / (_batch_split(n_seq, mesh_shape) * tensor)
        touched = _experts_touched(moe, tokens * shape.minibatch / max(n_dev, 1))
        read = (weights - pc["expert"] * pb * (1 - touched)) / tensor
        out["bytes_accessed"] = read * passes
        out["param_bytes"] = weights / (shard if part == "update" or part == "reference"
                                        else tensor)
        act = tokens / n_dev * d * ab
        if part == "update":
            opt = 2 * weights / shard
            grads = weights / shard
            out["bytes_accessed"] += 2 * (weights / shard + opt) + grads
            out["optimizer_bytes"] = opt
            out["grad_bytes"] = grads
            # Full remat keeps each layer's input; without it a layer's residuals are ~ 10 x.
            out["activation_bytes"] = act * L * (1 if mcfg.remat == "full" else 10)
        else:
            out["activation_bytes"] = act
        if part == "prefill":
            out["kv_cache_bytes"] = shape.prompts * t * kv_bytes_per_token(mcfg, cdt) / n_dev
        out["bytes_accessed"] += 2 * out["activation_bytes"]
    else:  # decode: one step for P x G tokens
        b = shape.rollout
        ctx = float(context if context is not None else shape.prompt_len + tc)
        out["flops"] = (b * (2 * pc["matmul"] + _attn_flops_per_token(mcfg, ctx))
                        / (_batch_split(b, mesh_shape) * tensor))
        touched = _experts_touched(moe, b / max(n_dev / tensor, 1))
        read = (weights - pc["expert"] * pb * (1 - touched)) / tensor
        kvt = kv_bytes_per_token(mcfg, cdt)
        # The prompt's cache once per prompt (shared by its G samples), completions per sample.
        kv_read = (shape.prompts * shape.prompt_len + b * max(ctx - shape.prompt_len, 0)) * kvt
        out["kv_cache_bytes"] = (shape.prompts * shape.prompt_len + b * tc) * kvt / n_dev
        out["bytes_accessed"] = read + kv_read / n_dev + b * d * ab * 4 / n_dev
        out["param_bytes"] = weights / tensor
        out["activation_bytes"] = b * d * ab / n_dev
    out["held_bytes"] = sum(out.get(k, 0.0) for k in ("param_bytes", "optimizer_bytes",
                                                      "grad_bytes", "kv_cache_bytes",
                                                      "activation_bytes"))
    return out




# ---------------------------------------------------------------------------------------------
# The prefill and decode-step programs (sample rules), built from the model's public API
# ---------------------------------------------------------------------------------------------
def _prefill_fn(graphdef, mcfg):
    """(params, prompt_PxT, pmask_PxT) -> (last-position logits [P, V], K/V caches)."""
    import jax.numpy as jnp
    from flax import nnx

    from r1jax.models.transformer import attention, causal_segment_mask

    def prefill(params, prompt_PxT, pmask_PxT):
        model = nnx.merge(graphdef, params)
        mask = causal_segment_mask(pmask_PxT)

        def attn(q, k, v, _):
            return attention(q, k, v, mask), (k, v)

        placeholder = jnp.zeros((mcfg.num_layers,), jnp.int8)  # one slot per layer for attn's K/V
        h, (k, v) = model.hidden(prompt_PxT, segment_ids_BxT=pmask_PxT, cache=placeholder,
                                 attn_fn=attn)
        logits = h[:, -1].astype(jnp.float32) @ model.unembed_matrix().astype(jnp.float32)
        return logits, k, v

    return prefill


def _decode_fn(graphdef, group_size: int, temperature: float, return_logits: bool = False):
    """One sampler step: (params, prompt K/V [L, P, Tp, K, H], prompt mask, completion K/V
    [L, P*G, Tc, K, H], tokens [P*G], step t, key) -> (next tokens, completion K/V with this
    step's K/V written at slot t).

    Each query attends to its prompt's cache (one copy per prompt, read once for its G
    samples, as r1jax's sampler stores it), to the completion positions before t and to
    itself; one softmax over all three. `return_logits`: the [P*G, V] logits instead of the
    sampled tokens (for tests against a full forward)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    G = group_size

    def decode(params, pk, pv, pmask_PxT, ck, cv, tok_B, t, key):
        model = nnx.merge(graphdef, params)
        B = tok_B.shape[0]
        P = B // G
        pos_B = jnp.repeat(pmask_PxT.sum(-1), G) + t

        def attn(q_Bx1xNxH, k_Bx1xKxH, v_Bx1xKxH, layer):
            pk_l, pv_l, ck_l, cv_l = layer
            n, h = q_Bx1xNxH.shape[2], q_Bx1xNxH.shape[3]
            kh = k_Bx1xKxH.shape[2]
            r = n // kh
            scale = 1.0 / math.sqrt(h)
            q = q_Bx1xNxH.reshape(P, G, kh, r, h).astype(jnp.float32) * scale
            s_p = jnp.einsum("pgkrh,pskh->pgkrs", q, pk_l.astype(jnp.float32))
            s_p = jnp.where(pmask_PxT[:, None, None, None, :] > 0, s_p, -1e30)
            qc = q.reshape(B, kh, r, h)
            s_c = jnp.einsum("bkrh,bskh->bkrs", qc, ck_l.astype(jnp.float32))
            s_c = jnp.where(jnp.arange(ck_l.shape[1])[None, None, None, :] < t, s_c, -1e30)
            s_x = jnp.einsum("bkrh,bkh->bkr", qc, k_Bx1xKxH[:, 0].astype(jnp.float32))[..., None]
            s = jnp.concatenate([s_p.reshape(B, kh, r, -1), s_c, s_x], axis=-1)
            w = jax.nn.softmax(s, axis=-1)
            tp, tc = pk_l.shape[1], ck_l.shape[1]
            w_p = w[..., :tp].reshape(P, G, kh, r, tp)
            o = jnp.einsum("pgkrs,pskh->pgkrh", w_p, pv_l.astype(jnp.float32)).reshape(B, kh, r, -1)
            o = o + jnp.einsum("bkrs,bskh->bkrh", w[..., tp:tp + tc], cv_l.astype(jnp.float32))
            o = o + w[..., -1:] * v_Bx1xKxH[:, 0, :, None, :].astype(jnp.float32)
            out = o.reshape(B, 1, n, -1).astype(q_Bx1xNxH.dtype)
            return out, (k_Bx1xKxH[:, 0], v_Bx1xKxH[:, 0])

        h, (k_new, v_new) = model.hidden(tok_B[:, None], positions_BxT=pos_B[:, None],
                                         cache=(pk, pv, ck, cv), attn_fn=attn)
        logits = h[:, -1].astype(jnp.float32) @ model.unembed_matrix().astype(jnp.float32)
        nxt = logits if return_logits else jax.random.categorical(
            key, logits / temperature).astype(jnp.int32)
        ck = jax.lax.dynamic_update_slice_in_dim(ck, k_new[:, :, None].astype(ck.dtype), t, axis=2)
        cv = jax.lax.dynamic_update_slice_in_dim(cv, v_new[:, :, None].astype(cv.dtype), t, axis=2)
        return nxt, ck, cv

    return decode


def compile_sampling(cfg, devices, *, prompts: int, group_size: int, prompt_len: int,
                     completion_len: int, partition_to_node=None, slices: int = 1,
                     compiler_options=None, programs: Optional[Dict[str, Any]] = None
                     ) -> Dict[str, Any]:
    """Compile the prefill and one decode step for `cfg.mesh` on `devices` under the sample
    rules, from abstract shapes; returns {"prefill": report, "decode": report, "kv_cache":
    per-device bytes of the caches}. `programs` receives the executables and arguments."""
    import time

    import jax
    import jax.numpy as jnp

    from r1jax import aot
    from r1jax import mesh as mesh_lib
    from r1jax.models import build

    mesh = mesh_lib.make_mesh(cfg.mesh, devices)
    rules = mesh_lib.sample_rules(cfg.mesh)
    mcfg = build.resolve_model_config(cfg.model)
    graphdef, params = build.abstract_model(mcfg, mesh, rules)
    P, G, tp, tc = prompts, group_size, prompt_len, completion_len
    B = P * G
    kv_dtype = jnp.dtype(getattr(cfg.sampler, "kv_cache_dtype", None) or mcfg.dtype)

    def sds(shape, dtype, logical):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=mesh_lib.named_sharding(
            mesh, logical, rules, shape))

    prompt = sds((P, tp), jnp.int32, ("batch", None))
    pmask = sds((P, tp), jnp.int32, ("batch", None))
    out: Dict[str, Any] = {}
    with mesh_lib.layout(mesh, rules):
        t0 = time.perf_counter()
        pre = _prefill_fn(graphdef, mcfg)
        shapes = jax.eval_shape(pre, params, prompt, pmask)
        _, k_sh, v_sh = shapes
        cache_logical = ("layers", "batch", "cache_length", "kv_heads", None)
        pk = sds(k_sh.shape, kv_dtype, cache_logical)
        pv = sds(v_sh.shape, kv_dtype, cache_logical)
        shard_of = {"k": pk.sharding, "v": pv.sharding}
        pre_c = jax.jit(pre, out_shardings=(None, shard_of["k"], shard_of["v"]),
                        compiler_options=compiler_options).lower(params, prompt, pmask).compile()
        out["prefill"] = aot.program_report(pre_c, partition_to_node=partition_to_node,
                                            slices=slices)
        out["prefill"]["compile_s"] = round(time.perf_counter() - t0, 2)
        t0 = time.perf_counter()
        L, _, _, kh, hk = k_sh.shape
        hv = v_sh.shape[-1]
        ck = sds((L, B, tc, kh, hk), kv_dtype, cache_logical)
        cv = sds((L, B, tc, kh, hv), kv_dtype, cache_logical)
        tok = sds((B,), jnp.int32, ("batch",))
        step = jax.ShapeDtypeStruct((), jnp.int32, sharding=mesh_lib.replicated(mesh))
        key = jax.eval_shape(lambda: jax.random.key(0))
        key = jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=mesh_lib.replicated(mesh))
        temp = cfg.sampler.temperature if cfg.sampler.temperature > 0 else 1.0
        dec = jax.jit(_decode_fn(graphdef, G, temp), donate_argnums=(4, 5),
                      out_shardings=(tok.sharding, ck.sharding, cv.sharding),
                      compiler_options=compiler_options)
        args = (params, pk, pv, pmask, ck, cv, tok, step, key)
        dec_c = dec.lower(*args).compile()
        out["decode"] = aot.program_report(dec_c, partition_to_node=partition_to_node,
                                           slices=slices)
        out["decode"]["compile_s"] = round(time.perf_counter() - t0, 2)
    if programs is not None:
        programs["prefill"] = (pre_c, (params, prompt, pmask))
        programs["decode"] = (dec_c, args)

    def dev_bytes(a):
        return math.prod(a.sharding.shard_shape(a.shape)) * jnp.dtype(a.dtype).itemsize

    out["kv_cache_bytes"] = int(sum(dev_bytes(a) for a in (pk, pv, ck, cv)))
    out["sample_param_bytes"] = int(sum(dev_bytes(a) for a in jax.tree.leaves(params)))
    return out


# ---------------------------------------------------------------------------------------------
# Measuring where the devices exist
# ---------------------------------------------------------------------------------------------
def _zeros_fn(abstract):
    """One jitted function making zero-filled arrays with the shapes, dtypes and shardings of
    an abstract tree (PRNG keys: key(0))."""
    import jax
    import jax.numpy as jnp

    leaves, treedef = jax.tree.flatten(abstract)

    def make():
        out = []
        for a in leaves:
            if jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key):
                out.append(jax.random.key(0))
            else:
                out.append(jnp.zeros(a.shape, a.dtype))
        return jax.tree.unflatten(treedef, out)

    return jax.jit(make, out_shardings=jax.tree.unflatten(treedef, [a.sharding for a in leaves]))


def measure(compiled, abstract_args, reps: int = 3) -> float:
    """Best-of-`reps` seconds of one call of a compiled program on zero inputs (fresh inputs
    for every call, so donated buffers are never reused), after one warm-up call."""
    import time

    import jax

    zeros = _zeros_fn(abstract_args)
    best = float("inf")
    for i in range(reps + 1):
        args = jax.block_until_ready(zeros())
        t = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        if i:
            best = min(best, time.perf_counter() - t)
        del args
    return best


def _local(devices) -> bool:
    import jax

    try:
        ids = {d.id for d in jax.local_devices()}
        kinds = {d.platform for d in jax.local_devices()}
    except RuntimeError:
        return False
    return all(d.id in ids and d.platform in kinds for d in devices) and \
        all(d in jax.local_devices() for d in devices)


# ---------------------------------------------------------------------------------------------
# The study
# ---------------------------------------------------------------------------------------------
def parse_sweep(specs) -> List[Dict[str, Dict[str, int]]]:
    """["ici.fsdp=1,2,4,8", "dcn.data=1,2"] -> the cartesian product of mesh edits, each
    {"ici": {axis: size}, "dcn": {...}}."""
    import itertools

    from r1jax.mesh import MESH_AXES

    axes = []
    for spec in specs or []:
        key, _, vals = str(spec).partition("=")
        level, _, axis = key.strip().partition(".")
        if level not in ("ici", "dcn") or axis not in MESH_AXES or not vals:
            raise ValueError(f"--sweep {spec!r}: expected ici.AXIS=N,N,... or dcn.AXIS=N,... "
                             f"with AXIS one of {', '.join(MESH_AXES)}")
        try:
            sizes = [int(v) for v in vals.split(",")]
        except ValueError:
            raise ValueError(f"--sweep {spec!r}: sizes must be integers") from None
        if any(v < 1 for v in sizes):
            raise ValueError(f"--sweep {spec!r}: sizes must be >= 1")
        axes.append((level, axis, sizes))
    out = []
    for combo in itertools.product(*[s for _, _, s in axes]):
        edit: Dict[str, Dict[str, int]] = {"ici": {}, "dcn": {}}
        for (level, axis, _), v in zip(axes, combo):
            edit[level][axis] = v
        out.append(edit)
    return out


def mesh_label(mesh_cfg) -> str:
    ici = ",".join(f"{a}={s}" for a, s in (mesh_cfg.ici or {}).items() if s != 1) or "1"
    dcn = ",".join(f"{a}={s}" for a, s in (mesh_cfg.dcn or {}).items() if s != 1)
    return f"ici[{ici}]" + (f" dcn[{dcn}]" if dcn else "")


def _project_part(rep, analytic, profile, assumptions, bytes_source: str):
    from r1jax import hardware

    c = rep.get("collectives", {}).get("total", {})
    ici = c.get("ici_bytes", 0.0)
    dcn = c.get("dcn_bytes", 0.0) + c.get("unknown_bytes", 0.0)
    b = rep.get("bytes_accessed", 0.0) if bytes_source == "compiled" else analytic["bytes_accessed"]
    return hardware.project(rep.get("flops", 0.0), b, ici, dcn, profile, assumptions)


def grpo_step(part_seconds: Dict[str, float], *, rollout: int, minibatch: int,
              num_minibatches: int, decode_steps: int, reference: bool = True) -> Dict[str, float]:
    """One GRPO step from per-call seconds: rollout (prefill + decode_steps decode steps), the
    reference over the rollout's mini-batches, and num_minibatches updates."""
    calls = {"prefill": 1, "decode": decode_steps,
             "reference": (rollout // minibatch) if reference else 0,
             "update": num_minibatches}
    parts = {p: part_seconds.get(p, 0.0) * n for p, n in calls.items()}
    out = {"rollout_s": parts["prefill"] + parts["decode"], "reference_s": parts["reference"],
           "updates_s": parts["update"]}
    out["step_s"] = sum(out.values())
    out["calls"] = calls
    return out


_REPORT_KEYS = ("argument_bytes", "output_bytes", "temp_bytes", "alias_bytes", "peak_bytes",
                "flops", "bytes_accessed", "xla_flops", "compile_s")


def _collective_summary(rep) -> Dict[str, Dict[str, float]]:
    from r1jax.aot import COLLECTIVES

    c = rep.get("collectives", {})
    out = {k: {"count": c[k]["count"], "traffic_bytes": c[k]["traffic_bytes"],
               "ici_bytes": c[k]["ici_bytes"], "dcn_bytes": c[k]["dcn_bytes"] + c[k]["unknown_bytes"],
               "group_sizes": c[k]["group_sizes"]}
           for k in COLLECTIVES if k in c and c[k]["count"]}
    out["top"] = [{kk: t[kk] for kk in ("kind", "shape", "runs", "group_size", "where",
                                         "traffic_bytes", "op_name")} for t in c.get("top", [])[:3]]
    return out


def study_mesh(cfg, devices, *, profile, assumptions=None, topology: Optional[str] = None,
               slices: int = 1, prompts: Optional[int] = None, prompt_len: Optional[int] = None,
               completion_len: Optional[int] = None, decode_steps: Optional[int] = None,
               measure_reps: int = 0, bytes_source: str = "compiled",
               compiler_options=None) -> Dict[str, Any]:
    """Compile (and where possible time) the four programs of a GRPO step for cfg.mesh."""
    from r1jax import aot
    from r1jax import hardware
    from r1jax import mesh as mesh_lib
    from r1jax.models import build

    assumptions = assumptions or {}
    if bytes_source not in ("compiled", "analytic"):
        raise ValueError(f"bytes_source must be compiled or analytic, got {bytes_source!r}")
    P = int(prompts or cfg.train.prompts_per_rollout)
    G, M = int(cfg.grpo.group_size), int(cfg.grpo.num_minibatches)
    if (P * G) % M:
        raise ValueError(f"grpo.num_minibatches={M} does not divide the rollout of {P} x {G}")
    mb = P * G // M
    programs: Dict[str, Any] = {}
    kw = dict(batch_sequences=mb, prompt_len=prompt_len, completion_len=completion_len,
              reference=True, compiler_options=compiler_options, programs=programs)
    if topology:
        rep = aot.compile_update(cfg, topology=topology, slices=slices, **kw)
        devs = aot.topology_devices(topology, slices)
    else:
        rep = aot.compile_update(cfg, devices=devices, **kw)
        devs = list(devices)
    tp, tc = rep["batch"]["prompt_len"], rep["batch"]["completion_len"]
    mesh = mesh_lib.make_mesh(cfg.mesh, devs)
    partition_to_node = aot._partition_to_node(mesh, devs, rep["devices_per_node"])  # noqa: SLF001
    samp = compile_sampling(cfg, devs, prompts=P, group_size=G, prompt_len=tp, completion_len=tc,
                            partition_to_node=partition_to_node, slices=slices,
                            compiler_options=compiler_options, programs=programs)
    mcfg = build.resolve_model_config(cfg.model)
    shape = Shape(P, G, mb, tp, tc)
    mesh_shape = {a: int(s) for a, s in mesh.shape.items()}
    reports = {"update": rep["update"], "reference": rep.get("reference", {}),
               "prefill": samp["prefill"], "decode": samp["decode"]}
    local = not topology and _local(devs)
    parts: Dict[str, Any] = {}
    for part in PARTS:
        r = reports[part]
        an = analytic_part(part, mcfg, shape, mesh_shape,
                           cache_dtype=getattr(cfg.sampler, "kv_cache_dtype", None))
        a = assumptions.get(part, hardware.DEFAULT_ASSUMPTIONS[part])
        row = {k: r[k] for k in _REPORT_KEYS if k in r}
        row["collectives"] = _collective_summary(r)
        row["analytic"] = an
        row["projected"] = _project_part(r, an, profile, a, bytes_source)
        row["analytic_projected"] = hardware.project(an["flops"], an["bytes_accessed"], 0.0, 0.0,
                                                     profile, a)
        row["assumptions"] = a.to_dict()
        if local and measure_reps:
            compiled, args = programs[part]
            row["measured_s"] = measure(compiled, args, measure_reps)
        parts[part] = row
    p = rep["params"]
    ref_bytes = p["per_device_bytes"] if cfg.grpo.beta else 0
    memory = {
        "params": p["per_device_bytes"],
        "optimizer": p["state_per_device_bytes"] - p["per_device_bytes"],
        "reference": ref_bytes,
        "kv_cache": samp["kv_cache_bytes"],
        "activations": max(parts[k].get("temp_bytes", 0) for k in PARTS),
    }
    an_u = parts["update"]["analytic"]
    floor = {"params": an_u["param_bytes"], "optimizer": an_u["optimizer_bytes"],
             "reference": an_u["param_bytes"] if cfg.grpo.beta else 0.0,
             "kv_cache": parts["decode"]["analytic"]["kv_cache_bytes"],
             "activations": max(an_u["activation_bytes"], parts["decode"]["analytic"]["activation_bytes"])}
    steps = int(decode_steps or tc)
    step_kw = dict(rollout=P * G, minibatch=mb, num_minibatches=M, decode_steps=steps,
                   reference=bool(cfg.grpo.beta))
    step = {"projected": grpo_step({k: v["projected"]["total_s"] for k, v in parts.items()},
                                   **step_kw),
            "analytic_projected": grpo_step({k: v["analytic_projected"]["total_s"]
                                             for k, v in parts.items()}, **step_kw)}
    if all("measured_s" in v for v in parts.values()):
        step["measured"] = grpo_step({k: v["measured_s"] for k, v in parts.items()}, **step_kw)
    return {"label": mesh_label(cfg.mesh), "mesh": mesh_shape, "ici": rep["ici"], "dcn": rep["dcn"],
            "devices": rep["devices"], "device_kind": rep["device_kind"], "platform": rep["platform"],
            "topology": topology, "sharded_enough": p["sharded_enough"],
            "shape": dataclasses.asdict(shape), "decode_steps": steps,
            "memory": memory, "memory_floor": floor,
            "memory_peak_bytes": max(parts[k].get("peak_bytes", 0) for k in PARTS),
            "parts": parts, "step": step}


def run_study(cfg, meshes, *, profile, devices=None, **kw) -> Dict[str, Any]:
    """`study_mesh` for every MeshConfig in `meshes` (each on the first devices it needs of
    `devices`, default all local ones; with topology= on the TPU topology's chips)."""
    import jax

    from r1jax import hardware
    from r1jax import mesh as mesh_lib
    from r1jax.models import build

    devs = list(devices if devices is not None else jax.devices())
    rows = []
    for m in meshes:
        c = dataclasses.replace(cfg, mesh=m)
        if kw.get("topology"):
            sub = None
        else:
            ici, dcn = mesh_lib._axis_sizes(m, len(devs)) if -1 in list((m.ici or {}).values()) + \
                list((m.dcn or {}).values()) else (m.ici or {}, m.dcn or {})  # noqa: SLF001
            n = math.prod(ici.values()) * math.prod(dcn.values())
            if n > len(devs):
                raise ValueError(f"mesh {mesh_label(m)} needs {n} devices but {len(devs)} are "
                                 f"available (--devices N emulates N CPU devices)")
            sub = devs[:n]
        rows.append(study_mesh(c, sub, profile=profile, **kw))
    mcfg = build.resolve_model_config(cfg.model)
    pc = param_counts(mcfg)
    return {"model": {"architecture": mcfg.architecture, "layers": mcfg.num_layers,
                      "hidden": mcfg.hidden_size, "params": pc["total"],
                      "params_matmul": pc["matmul"], "param_dtype": mcfg.param_dtype,
                      "remat": mcfg.remat},
            "profile": hardware.profile_dict(profile), "meshes": rows}


# ---------------------------------------------------------------------------------------------
# Output: table, CSV, plots
# ---------------------------------------------------------------------------------------------
MEMORY_PARTS = ("params", "optimizer", "reference", "kv_cache", "activations")


def _size(x: float) -> str:
    return f"{x / 2**30:.3g} GiB" if x >= 2**30 else f"{x / 2**20:.3g} MiB"


def _ms(s: float) -> str:
    return f"{s * 1e3:9.3g}"


def format_study(res: Dict[str, Any]) -> str:
    m = res["model"]
    lines = [f"model {m['architecture']} {m['params'] / 1e6:.4g}M params ({m['layers']} layers, "
             f"{m['param_dtype']}, remat {m['remat']}); projected on {res['profile']['name']}"]
    for row in res["meshes"]:
        s = row["shape"]
        lines.append("")
        lines.append(f"== {row['label']}: mesh {row['mesh']} on {row['devices']} {row['device_kind']}"
                     f" ({'sharded enough' if row['sharded_enough'] else 'UNDER-SHARDED'}); "
                     f"P={s['prompts']} x G={s['group_size']}, mini-batch {s['minibatch']}, "
                     f"{s['prompt_len']} + {s['completion_len']} tokens, {row['decode_steps']} decode steps")
        lines.append("  memory / device: " + ", ".join(
            f"{k} {_size(row['memory'][k])} (floor {_size(row['memory_floor'][k])})"
            for k in MEMORY_PARTS) + f"; peak program {_size(row['memory_peak_bytes'])}")
        lines.append(f"  {'part':10s} {'GFLOP/dev':>10s} {'GB/dev':>8s} {'ici MB':>9s} {'dcn MB':>9s} "
                     f"{'peak MiB':>9s} {'proj ms':>9s} {'bound':>7s} {'floor ms':>9s} {'meas ms':>9s}")
        for part in PARTS:
            v = row["parts"][part]
            c = v["collectives"]
            ici = sum(x["ici_bytes"] for k, x in c.items() if k != "top")
            dcn = sum(x["dcn_bytes"] for k, x in c.items() if k != "top")
            meas = _ms(v["measured_s"]) if "measured_s" in v else f"{'-':>9s}"
            lines.append(f"  {part:10s} {v.get('flops', 0) / 1e9:10.4g} "
                         f"{v.get('bytes_accessed', 0) / 1e9:8.3g} {ici / 1e6:9.3g} {dcn / 1e6:9.3g} "
                         f"{v.get('peak_bytes', 0) / 2**20:9.4g} {_ms(v['projected']['total_s'])} "
                         f"{v['projected']['bound']:>7s} {_ms(v['analytic_projected']['total_s'])} "
                         f"{meas}")
            kinds = [f"{k} {x['count']}x {x['traffic_bytes'] / 1e6:.3g} MB (ici {x['ici_bytes'] / 1e6:.3g}"
                     f", dcn {x['dcn_bytes'] / 1e6:.3g})" for k, x in c.items() if k != "top"]
            if kinds:
                lines.append(f"  {'':10s} " + "; ".join(kinds))
        st = row["step"]
        for key in ("projected", "analytic_projected", "measured"):
            if key in st:
                x = st[key]
                lines.append(f"  GRPO step {key:18s} {x['step_s']:.4g} s = rollout {x['rollout_s']:.3g}"
                             f" + reference {x['reference_s']:.3g} + updates {x['updates_s']:.3g}")
    a = res["meshes"][0]["parts"]["update"]["assumptions"] if res["meshes"] else {}
    lines.append("")
    lines.append(f"time model: max(FLOPs / (peak x matmul eff), bytes / (HBM x hbm eff)) + collectives"
                 f" at the profile's ici/dcn bandwidths - overlap x min(core, comm); update "
                 f"assumptions {a}")
    return "\n".join(lines)


def csv_rows(res: Dict[str, Any]) -> List[Dict[str, Any]]:
    rows = []
    for row in res["meshes"]:
        for part in PARTS:
            v = row["parts"][part]
            c = v["collectives"]
            rows.append({
                "mesh": row["label"], "devices": row["devices"], "part": part,
                "flops": v.get("flops", 0.0), "bytes_accessed": v.get("bytes_accessed", 0.0),
                "ici_bytes": sum(x["ici_bytes"] for k, x in c.items() if k != "top"),
                "dcn_bytes": sum(x["dcn_bytes"] for k, x in c.items() if k != "top"),
                "argument_bytes": v.get("argument_bytes", 0), "temp_bytes": v.get("temp_bytes", 0),
                "peak_bytes": v.get("peak_bytes", 0),
                "projected_s": v["projected"]["total_s"], "bound": v["projected"]["bound"],
                "analytic_projected_s": v["analytic_projected"]["total_s"],
                "measured_s": v.get("measured_s", "")})
    return rows


def write_outputs(res: Dict[str, Any], out_dir: str) -> Dict[str, str]:
    """study.json, study.csv and plots (memory.png, time.png: stacked by part, one bar per
    mesh) under `out_dir`; returns their paths."""
    import csv
    import json
    import os

    os.makedirs(out_dir, exist_ok=True)
    paths = {"json": os.path.join(out_dir, "study.json"), "csv": os.path.join(out_dir, "study.csv"),
             "memory_png": os.path.join(out_dir, "memory.png"),
             "time_png": os.path.join(out_dir, "time.png")}
    with open(paths["json"], "w") as f:
        json.dump(res, f, indent=1, default=float)
    rows = csv_rows(res)
    with open(paths["csv"], "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["mesh"])
        w.writeheader()
        w.writerows(rows)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [r["label"] for r in res["meshes"]]
    x = range(len(labels))
    fig, ax = plt.subplots(figsize=(max(5, 1.4 * len(labels)), 4))
    bottom = [0.0] * len(labels)
    for k in MEMORY_PARTS:
        vals = [r["memory"][k] / 2 ** 30 for r in res["meshes"]]
        ax.bar(x, vals, bottom=bottom, label=k)
        bottom = [b + v for b, v in zip(bottom, vals)]
    ax.plot(x, [r["memory_peak_bytes"] / 2 ** 30 for r in res["meshes"]], "k_", ms=30,
            label="peak program")
    ax.set_xticks(list(x), labels, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("GiB per device")
    ax.set_title(f"memory per device ({res['model']['params'] / 1e9:.2f}B params)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(paths["memory_png"], dpi=110)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(max(5, 1.4 * len(labels)), 4))
    bottom = [0.0] * len(labels)
    for k, name in (("rollout_s", "rollout"), ("reference_s", "reference"), ("updates_s", "updates")):
        vals = [r["step"]["projected"][k] for r in res["meshes"]]
        ax.bar(x, vals, bottom=bottom, label=name)
        bottom = [b + v for b, v in zip(bottom, vals)]
    # Measurements belong on the projection's axes only when they ran on that kind of device.
    same = res["profile"].get("platform") in {r["platform"] for r in res["meshes"]}
    meas = [r["step"].get("measured", {}).get("step_s") if same else None for r in res["meshes"]]
    if any(m is not None for m in meas):
        ax.plot([i for i, m in zip(x, meas) if m is not None], [m for m in meas if m is not None],
                "k*", ms=10, label="measured")
    ax.set_xticks(list(x), labels, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("seconds per GRPO step")
    ax.set_title(f"projected GRPO step on {res['profile']['name']}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(paths["time_png"], dpi=110)
    plt.close(fig)
    return paths


__all__ = ["MEMORY_PARTS", "PARTS", "Shape", "analytic_part", "compile_sampling", "csv_rows",
           "format_study", "grpo_step", "kv_bytes_per_token", "measure", "mesh_label",
           "param_counts", "parse_sweep", "run_study", "study_mesh", "write_outputs"]
