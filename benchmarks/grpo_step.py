"""Whole GRPO step throughput: r1jax vs TRL's GRPOTrainer (torch CPU) vs Tunix's GRPOLearner.

A "whole GRPO step" = rollout of P prompts x G samples + reference log-probs (beta > 0) + one
policy update (AdamW, global-norm clip 1.0) on all P*G sequences. Every system gets:
  * the same random-weight HF Qwen2 checkpoint (benchmarks/_checkpoint.py, float32) and the
    same word-level tokenizer (built with `tokenizers`: "t<i>" is token i, "<pad>" is 0, "<eos>"
    is id V, one past the model's vocabulary, so no completion can ever stop early; but see
    realistic lengths below);
  * the same P prompts (random token ids, all of length --prompt-len), G, new-token count
    (every completion runs to full length: asserted), temperature 1, top-k / top-p off;
  * beta (--beta, default 0.04) > 0, lr 1e-6, eps 0.2, float32 everywhere, one update per rollout.
completion tokens/s = P * G * new_tokens / step seconds (median of --steps timed steps after
--warmup steps; the first step, which compiles, is reported separately as first_step_s).

Realistic lengths (`--lengths realistic --cap C --mean-length M`): the checkpoint's eos
(vocab - 1) has its logit raised (benchmarks/_checkpoint.py, shared with sampler.py) so every
system stops on its own eos (r1jax: the model config's eos; TRL: the tokenizer's / generation
config's; Tunix: RolloutConfig.eos_tokens) with geometric, long-tailed lengths of mean ~M
under the cap C; the pad id is never sampled. tokens/s then counts the completion tokens each
system generated (eos included; median over timed steps of tokens / step seconds), and each
worker reports, from its own completions and the tensors it ran: length statistics, per-part
seconds (rollout, reference, update) and the padding share of its reference and update passes
(1 - real prompt + completion tokens / token positions computed: TRL pads completions to the
longest of the batch, Tunix to max_tokens_to_generate, r1jax packs them). r1jax runs its
configuration for such lengths: sampler compaction (--min-decode-batch, --min-decode-window)
and the packed update and reference pass (grpo.packing), the update being the jitted step that
compiles each chunk-count bucket once; the programs it compiled are reported.

    python benchmarks/grpo_step.py --sizes tiny --lengths realistic --warmup 2 --steps 5 \
        --trl-python /path/to/peers/bin/python --tunix-python /path/to/peers/bin/python

Also in the same run: the jitted fp32 matmul peak (2048^3 jnp.dot, best of 5) and r1jax's
update FLOP/s as a fraction of it, FLOPs from the compiled update's aot.program_report (and the
6 * params * tokens estimate next to it).

Each system runs in its own subprocess (this file in worker mode), with --r1jax-python,
--trl-python (default: this interpreter) and --tunix-python (Tunix wants its own venv; no
default). r1jax's step is the library's: rollout.Collector and grpo.make_update_step, as the
trainer builds them. A requested peer that cannot run (no interpreter, its package not
importable, its worker failing) ends the benchmark with a non-zero exit naming it.
Progress goes to stderr; ONE JSON line goes to stdout.

    python benchmarks/grpo_step.py --tunix-python /path/to/tunix-venv/bin/python   # all peers
    python benchmarks/grpo_step.py --sizes tiny --peers r1jax,trl

step_cpu_s (process CPU seconds per step) is reported next to wall time: on a shared machine it is
the load-robust cost. TRL runs torch with 1 thread by default (--torch-threads): with 2 OpenMP
threads on the loaded 2-core machine its steps were ~10x slower (spin-waiting).

    python benchmarks/grpo_step.py --rollout-modes sync,async   # the loop: sync vs async rollouts

Measured figures: README.md, Benchmarks.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any
from _checkpoint import CONFIGS, eos_id, length_stats, make_checkpoint, num_params  # sibling modules
from _peak import matmul_peak_flops  # (benchmarks/ is on sys.path)

PEERS = ("r1jax", "trl", "tunix")
LR = 1e-6
EPS_CLIP = 0.2


def _say(msg: str) -> None:
    print(f"[grpo_step {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _load_tokenizer(path: str):
    # Explicit class: AutoTokenizer would follow config.json's model_type to Qwen2's BPE class.
    import transformers

    tok = transformers.PreTrainedTokenizerFast.from_pretrained(path)
    tok.padding_side = "left"
    return tok


def make_prompts(num: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    import numpy as np

    rs = np.random.RandomState(seed)
    return rs.randint(1, vocab, size=(num, length)).tolist()


def prompt_text(ids: list[int]) -> str:
    return " ".join(f"t{i}" for i in ids)


def trivial_rewards(completions) -> Any:
    """Fraction of even token ids in each completion (ragged lists are fine): cheap, varies
    across a group so advantages are non-zero."""
    import numpy as np

    return np.asarray([np.mean(np.asarray(c) % 2 == 0) if len(c) else 0.0 for c in completions], np.float32)


def _summary(step_s: list[float], parts: dict[str, list[float]], tokens: list[int], first: float) -> dict[str, Any]:
    """tokens: the completion tokens each timed step generated (eos included); tokens/s is the
    median over timed steps of tokens / seconds (with full lengths: tokens / median step)."""
    out = {"completion_tokens_per_s": statistics.median(n / t for n, t in zip(tokens, step_s)),
           "step_s": statistics.median(step_s), "step_s_all": step_s, "first_step_s": first,
           "completion_tokens_per_step": statistics.median(tokens)}
    for k, v in parts.items():
        if v:
            out[f"{k}_s"] = statistics.median(v)
    return out


def _padding(positions: list[int], real: list[int]) -> dict[str, float]:
    """What one pass (reference or update) computed against what it needed, over the timed
    steps: token positions of the tensors it ran (rows x width, or packed chunks x chunk
    tokens) and the real prompt + completion tokens its own masks mark."""
    p, r = sum(positions), sum(real)
    return {"positions_per_step": p / len(positions), "real_tokens_per_step": r / len(real),
            "padding_share": 1.0 - r / p}


# ---- r1jax ----------------------------------------------------------------------------------
def _flops_of(compiled) -> float:
    """FLOPs of one call, from r1jax's one compiled-program report (aot.program_report: XLA's
    cost analysis with while-loop bodies counted once per iteration)."""
    from r1jax.aot import program_report

    return float(program_report(compiled, collectives=False).get("flops", float("nan")))


def even_token_fraction(completions, completion_ids=None, **_):
    """The benchmark's reward (a reward function for r1jax's RewardRunner, by import path)."""
    return [float(x) for x in trivial_rewards([list(c) for c in completion_ids])]


def r1jax_worker(a) -> dict[str, Any]:
    """The library's own step: rollout.Collector (sampling, host scoring, advantages, reference
    log-probs) and grpo.make_update_step, built as the trainer builds them. Realistic lengths:
    the trainer's path for them too, compaction (sampler.compact, the default) and the packed
    update and reference pass (grpo.packing), the jitted update compiling each chunk-count
    bucket once (as trainer._compile_update returns it)."""
    import itertools

    import jax
    import numpy as np

    from r1jax import grpo
    from r1jax import mesh as mesh_lib
    from r1jax import rollout as rollout_lib
    from r1jax.config import load_config
    from r1jax.data import PromptBatch
    from r1jax.models.build import build_model, resolve_model_config
    from r1jax.rewards import RewardRunner
    from r1jax.sampler import Sampler
    from r1jax.tokenizer import load_tokenizer

    P, G, T, Tp = len(a.prompts), a.group, a.new_tokens, len(a.prompts[0])
    realistic = a.lengths == "realistic"
    tuned = [f"sampler.min_decode_batch={a.min_decode_batch}", f"sampler.min_decode_window={a.min_decode_window}",
             "grpo.packing=true", f"grpo.pack_chunk_tokens={a.pack_chunk_tokens}"] if realistic else []
    cfg = load_config(None, [
        f"model.path={a.path}", "model.dtype=float32", f"train.prompts_per_rollout={P}", f"grpo.group_size={G}",
        "grpo.num_minibatches=1", "grpo.micro_batches=1", f"grpo.beta={a.beta}", f"grpo.eps_low={EPS_CLIP}",
        f"grpo.eps_high={EPS_CLIP}", "grpo.ref_reset_every=0", f"sampler.max_new_tokens={T}",
        "sampler.temperature=1.0", f"sampler.prompt_buckets=[{Tp}]", f"data.max_prompt_len={Tp}",
        f"train.lr={LR}", "train.b1=0.9", "train.b2=0.999", "train.adam_eps=1e-8", "train.max_grad_norm=1.0",
        "rewards.functions=[{name: 'grpo_step:even_token_fraction'}]", *tuned])
    tok = load_tokenizer(a.path)
    mcfg = resolve_model_config(cfg.model)
    assert mcfg.eos_token_id == (a.eos if realistic else None), mcfg.eos_token_id
    mesh, rules = mesh_lib.make_mesh(cfg.mesh), mesh_lib.train_rules(cfg.mesh)
    graphdef, params = build_model(mcfg, mesh, rules)
    p_sh = jax.tree.map(lambda x: x.sharding, params)
    geo = grpo.Geometry.from_config(cfg)
    sampler = Sampler(graphdef, cfg.sampler, mesh=mesh, rules=mesh_lib.sample_rules(cfg.mesh), tokenizer=tok,
                      pad_id=tok.pad_id)
    collector = rollout_lib.Collector(geo, cfg.grpo, sampler, RewardRunner(cfg.rewards), tok, mesh=mesh,
                                      rules=rules, params_shardings=p_sh)
    optimizer, schedule = grpo.make_optimizer(cfg.train)
    shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
    s_sh = grpo.train_state_shardings(p_sh, optimizer, shapes, mesh)
    ref = grpo.init_reference(params, a.beta)
    state = grpo.init_train_state(params, optimizer, s_sh)
    b_sh = {k: v.sharding for k, v in collector.layout.items() if k not in ("truncated", "logp_sampler")}
    packer = collector.packer
    u_sh = b_sh
    if packer is not None:  # the packed layout's shardings, as the trainer compiles them
        n = geo.minibatch_size
        padded = {k: jax.ShapeDtypeStruct((n,) + v.shape[1:], v.dtype, sharding=v.sharding)
                  for k, v in collector.layout.items() if k in b_sh}
        u_sh = {k: v.sharding for k, v in packer.abstract(padded).items()}
    update = grpo.make_update_step(graphdef, optimizer, cfg.grpo, geo, schedule=schedule, state_shardings=s_sh,
                                   ref_shardings=p_sh, batch_shardings=u_sh, mesh=mesh, rules=rules)
    # The reference pass's token positions, from the arrays each call of its forward gets.
    ref_fn_name = "_logp_packed" if packer is not None else "_logp"
    ref_fn = getattr(collector, ref_fn_name)
    ref_positions = [0]

    def counted_ref_fn(p, *arrays):
        if p is ref:  # the reference pass (not a recomputed pi_old)
            ref_positions[0] += arrays[0].size if packer is not None else arrays[0].size + arrays[2].size
        return ref_fn(p, *arrays)

    setattr(collector, ref_fn_name, counted_ref_fn)

    def programs() -> dict[str, int]:
        out = {"sampler": sampler.cache.num_compiled(), "reference": ref_fn._cache_size(),
               "update": update._cache_size() if packer is not None else 1}
        if packer is not None:
            out["pack_gather"] = packer._gather._cache_size()
        return out

    batch = PromptBatch(np.asarray(a.prompts, np.int32), np.ones((P, Tp), bool),
                        [prompt_text(p) for p in a.prompts], {"question": [prompt_text(p) for p in a.prompts]})
    batches = itertools.repeat(batch)
    rows = np.arange(geo.rollout_size)
    compiled_update = None
    step_s: list[float] = []
    parts: dict[str, list[float]] = {"rollout": [], "reference": [], "update": [], "step_cpu": []}
    tokens: list[int] = []
    lengths: list[int] = []
    pad: dict[str, list[int]] = {"ref_positions": [], "update_positions": [], "real": []}
    first = 0.0
    warm_programs = {}
    for i in range(a.warmup + a.steps):
        t0, c0 = time.perf_counter(), time.process_time()
        ref_positions[0] = 0
        rollout, info = collector.collect(state.params, ref, batches, jax.random.key(i))
        t2 = time.perf_counter()
        mb = rollout_lib.minibatch(rollout, rows, cfg.grpo, b_sh)
        if packer is not None:  # varying shapes: the jitted step (bucketed chunk counts)
            mb = packer.pack(mb)
            state, metrics = update(state, ref, mb)
        else:
            if compiled_update is None:
                compiled_update = update.lower(state, ref, mb).compile()
            state, metrics = compiled_update(state, ref, mb)
        metrics = jax.device_get(metrics)
        t3 = time.perf_counter()
        cmask_NxT = np.asarray(rollout["completion_mask"])
        len_N = cmask_NxT.sum(-1)
        n_tok = int(len_N.sum())
        if realistic:  # each completion is a prefix ending at its first eos (or at the cap)
            ids_NxT = np.asarray(rollout["completion_ids"])
            assert (cmask_NxT == (np.arange(T) < len_N[:, None])).all(), "r1jax completion masks not prefixes"
            stopped = len_N < T
            assert (ids_NxT[stopped, len_N[stopped] - 1] == a.eos).all(), "r1jax: a completion stopped off eos"
            assert not (ids_NxT[np.arange(T) < len_N[:, None] - 1] == a.eos).any(), "r1jax: eos inside a completion"
        else:
            assert n_tok == P * G * T, f"r1jax completions not full length: {n_tok} != {P * G * T}"
        assert np.isfinite(metrics["loss"])
        t_rollout, t_ref = info.metrics["time/rollout"], info.metrics["time/reference"]
        if i < a.warmup:
            first = first or (t3 - t0)
            warm_programs = programs()
            _say(f"r1jax warm-up step {i}: {t3 - t0:.2f}s")
            continue
        step_s.append(t3 - t0)
        parts["rollout"].append(t_rollout)
        parts["reference"].append(t_ref)
        parts["update"].append(t3 - t2)
        parts["step_cpu"].append(time.process_time() - c0)
        tokens.append(n_tok)
        lengths.extend(int(x) for x in len_N)
        pad["real"].append(int(np.asarray(rollout["prompt_mask"]).sum()) + n_tok)
        pad["ref_positions"].append(ref_positions[0])
        pad["update_positions"].append(int(np.prod(mb["tokens"].shape)) if packer is not None
                                       else int(mb["prompt_ids"].size + mb["completion_ids"].size))
        _say(f"r1jax step {i}: {t3 - t0:.3f}s (rollout {t_rollout:.3f} ref {t_ref:.3f} update {t3 - t2:.3f}; "
             f"{n_tok} tokens)")
    res = _summary(step_s, parts, tokens, first)
    res["lengths"] = length_stats(lengths, T)
    res["padding_reference"] = _padding(pad["ref_positions"], pad["real"])
    res["padding_update"] = _padding(pad["update_positions"], pad["real"])
    res["programs_after_warmup"], res["programs_compiled"] = warm_programs, programs()
    if compiled_update is None:  # the last step's update shape, compiled here only for its FLOPs
        compiled_update = update.lower(state, ref, mb).compile()
    res["update_flops"] = _flops_of(compiled_update)
    res["kl"] = float(metrics.get("kl", float("nan")))
    res["version"] = __import__("importlib.metadata").metadata.version("jax")
    return res


# ---- TRL --------------------------------------------------------------------------------------
def trl_worker(a) -> dict[str, Any]:
    import datasets
    import torch
    import transformers
    import trl

    torch.set_num_threads(a.torch_threads or os.cpu_count() or 1)
    P, G, T = len(a.prompts), a.group, a.new_tokens
    tok = _load_tokenizer(a.path)
    model = transformers.AutoModelForCausalLM.from_pretrained(a.path, dtype=torch.float32)
    total_steps = a.warmup + a.steps
    # One row per prompt per step; the RepeatSampler draws P distinct prompts x G per step.
    ds = datasets.Dataset.from_dict({"prompt": [prompt_text(p) for p in a.prompts] * total_steps})

    step_lengths: list[int] = []  # this step's completion lengths (TRL's, eos included)

    def reward(completion_ids, **kw):
        step_lengths.extend(len(c) for c in completion_ids)
        return [float(x) for x in trivial_rewards(completion_ids)]

    cfg = trl.GRPOConfig(
        output_dir=os.path.join(a.tmp, "trl_out"), per_device_train_batch_size=P * G,
        gradient_accumulation_steps=1, num_generations=G, max_completion_length=T,
        beta=a.beta, epsilon=EPS_CLIP, learning_rate=LR, lr_scheduler_type="constant",
        warmup_steps=0, weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8,
        max_grad_norm=1.0, temperature=1.0, top_p=1.0, top_k=0, max_steps=total_steps,
        num_iterations=1, use_cpu=True, bf16=False, fp16=False, report_to="none",
        save_strategy="no", logging_steps=1, seed=0, dataloader_num_workers=0,
        loss_type="grpo", disable_tqdm=True)
    trainer = trl.GRPOTrainer(model=model, reward_funcs=reward, args=cfg, train_dataset=ds,
                              processing_class=tok)
    assert trainer.ref_model is not None, "TRL built no reference model (beta must be > 0)"
    if a.lengths == "realistic":  # it stops on the tokenizer's / generation config's eos
        assert a.eos in trainer.eos_token_ids, (a.eos, trainer.eos_token_ids)

    timers: dict[str, float] = {"rollout": 0.0, "reference": 0.0}
    # Token positions each forward ran (input rows x width: completions are padded to the
    # longest of the batch) and the real tokens its attention mask marks, this step.
    seen = {"ref_positions": 0, "update_positions": 0, "real": 0}
    gen_cls = type(trainer.accelerator.unwrap_model(trainer.model))
    orig_generate = gen_cls.generate

    def timed_generate(self, *args, **kw):
        t = time.perf_counter()
        out = orig_generate(self, *args, **kw)
        timers["rollout"] += time.perf_counter() - t
        return out

    gen_cls.generate = timed_generate
    orig_logps = trainer._get_per_token_logps_and_entropies

    def timed_logps(model_, input_ids, attention_mask, *args, **kw):
        t = time.perf_counter()
        out = orig_logps(model_, input_ids, attention_mask, *args, **kw)
        if model_ is trainer.ref_model:
            timers["reference"] += time.perf_counter() - t
            seen["ref_positions"] += input_ids.numel()
            seen["real"] += int(attention_mask.sum())
        elif torch.is_grad_enabled():  # the update's forward (the loss)
            seen["update_positions"] += input_ids.numel()
        return out

    trainer._get_per_token_logps_and_entropies = timed_logps
    step_s: list[float] = []
    parts: dict[str, list[float]] = {"rollout": [], "reference": [], "update_and_rest": [], "step_cpu": []}
    tokens: list[int] = []
    lengths: list[int] = []
    pad: dict[str, list[int]] = {k: [] for k in seen}
    first = [0.0]

    class Timer(transformers.TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t0, self.c0 = time.perf_counter(), time.process_time()
            timers["rollout"] = timers["reference"] = 0.0
            step_lengths.clear()
            for k in seen:
                seen[k] = 0

        def on_step_end(self, args, state, control, **kw):
            dt = time.perf_counter() - self.t0
            i = state.global_step - 1
            if i < a.warmup:
                first[0] = first[0] or dt
                _say(f"trl warm-up step {i}: {dt:.2f}s")
                return
            step_s.append(dt)
            parts["rollout"].append(timers["rollout"])
            parts["reference"].append(timers["reference"])
            parts["update_and_rest"].append(dt - timers["rollout"] - timers["reference"])
            parts["step_cpu"].append(time.process_time() - self.c0)
            tokens.append(sum(step_lengths))
            lengths.extend(step_lengths)
            for k, v in seen.items():
                pad[k].append(v)
            _say(f"trl step {i}: {dt:.3f}s (generate {timers['rollout']:.3f} ref {timers['reference']:.3f}; "
                 f"{sum(step_lengths)} tokens)")

    trainer.add_callback(Timer())
    trainer.train()
    assert lengths and max(lengths) <= T, f"TRL completions over the cap: {max(lengths)}"
    if a.lengths == "full":
        assert all(n == T for n in lengths), f"TRL completions not full length: {sorted(set(lengths))}"
    assert len(step_s) == a.steps and all(pad["update_positions"]), (step_s, pad)
    res = _summary(step_s, parts, tokens, first[0])
    res["lengths"] = length_stats(lengths, T)
    res["padding_reference"] = _padding(pad["ref_positions"], pad["real"])
    res["padding_update"] = _padding(pad["update_positions"], pad["real"])
    res["version"] = trl.__version__
    res["torch"] = torch.__version__
    kls = [h["kl"] for h in trainer.state.log_history if "kl" in h]
    res["kl"] = float(kls[-1]) if kls else None
    return res


# ---- Tunix (its own venv) ----------------------------------------------------------------------
class _WordTokenizer:
    """The same word-level vocabulary as the HF tokenizer ("t<i>" = i, "<pad>" = 0, "<eos>" = eos),
    with the encode/decode/bos_id/eos_id/pad_id methods Tunix's TokenizerAdapter accepts (Tunix
    hands the HF tokenizer numpy strings, which transformers 5 rejects)."""

    def __init__(self, eos: int):
        self.eos = eos

    def encode(self, text, **kw):
        text = text.decode() if isinstance(text, bytes) else str(text)
        return [0 if w == "<pad>" else self.eos if w == "<eos>" else int(w[1:]) for w in text.split()]

    def decode(self, ids, **kw):
        return " ".join("<pad>" if i == 0 else "<eos>" if i == self.eos else f"t{i}"
                        for i in (int(x) for x in ids))

    def bos_id(self):
        return None

    def eos_id(self):
        return self.eos  # full lengths: one past the model's vocabulary, never sampled

    def pad_id(self):
        return 0


def tunix_worker(a) -> dict[str, Any]:
    import jax
    import numpy as np
    import optax
    from tunix.models.qwen2 import model as qmodel
    from tunix.models.qwen2 import params as qparams
    from tunix.rl import rl_cluster as rl_cluster_lib
    from tunix.rl.grpo import grpo_learner
    from tunix.rl.rollout import base_rollout

    P, G, T = len(a.prompts), a.group, a.new_tokens
    tp = len(a.prompts[0])
    with open(os.path.join(a.path, "config.json")) as f:
        hf = json.load(f)
    cfg = qmodel.ModelConfig(
        num_layers=hf["num_hidden_layers"], vocab_size=hf["vocab_size"], embed_dim=hf["hidden_size"],
        hidden_dim=hf["intermediate_size"], num_heads=hf["num_attention_heads"],
        head_dim=hf["hidden_size"] // hf["num_attention_heads"], num_kv_heads=hf["num_key_value_heads"],
        rope_theta=int(hf.get("rope_theta", hf.get("rope_parameters", {}).get("rope_theta", 10000))),
        norm_eps=hf["rms_norm_eps"], use_tied_embedding=hf["tie_word_embeddings"])
    # Auto axes: Tunix's models index the embedding without explicit out-shardings.
    mesh = jax.make_mesh((1, 1), ("fsdp", "tp"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    with mesh:
        actor = qparams.create_model_from_safe_tensors(a.path, cfg, mesh)
        reference = qparams.create_model_from_safe_tensors(a.path, cfg, mesh)
    tok = _WordTokenizer(a.eos)
    eos = tok.eos_id()
    optimizer = optax.chain(optax.clip_by_global_norm(1.0),
                            optax.adamw(LR, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0))
    total_steps = a.warmup + a.steps
    cluster_cfg = rl_cluster_lib.ClusterConfig(
        role_to_mesh={rl_cluster_lib.Role.ACTOR: mesh, rl_cluster_lib.Role.REFERENCE: mesh,
                      rl_cluster_lib.Role.ROLLOUT: mesh},
        rollout_engine="vanilla", offload_to_cpu=False,
        training_config=rl_cluster_lib.RLTrainingConfig(
            actor_optimizer=optimizer, eval_every_n_steps=10 ** 9, max_steps=total_steps,
            mini_batch_size=P, train_micro_batch_size=P),
        rollout_config=base_rollout.RolloutConfig(
            max_tokens_to_generate=T, max_prompt_length=tp, kv_cache_size=tp + T + 8,
            temperature=1.0, top_p=1.0, top_k=None, eos_tokens=[eos]))
    cluster = rl_cluster_lib.RLCluster(actor=actor, reference=reference, tokenizer=tok,
                                       cluster_config=cluster_cfg)
    step_lengths: list[int] = []  # this step's completion lengths, eos included

    def reward(prompts, completions, **kw):
        # Tunix's completions end before their eos (the sampler cuts it off; its completion
        # mask leaves it out): a completion under the cap stopped on an eos it generated.
        ids = [tok.encode(c, add_special_tokens=False) for c in completions]
        step_lengths.extend(len(x) + (len(x) < T) for x in ids)
        return [float(x) for x in trivial_rewards(ids)]

    learner = grpo_learner.GRPOLearner(
        rl_cluster=cluster,
        algo_config=grpo_learner.GRPOConfig(num_generations=G, num_iterations=1, beta=a.beta,
                                            epsilon=EPS_CLIP),
        reward_fns=[reward])

    timers: dict[str, float] = {"rollout": 0.0, "reference": 0.0, "update": 0.0}

    def timed(obj, name, key, block=False):
        orig = getattr(obj, name)

        def wrapper(*args, **kw):
            t = time.perf_counter()
            out = orig(*args, **kw)
            if block:
                jax.block_until_ready(out)
            timers[key] += time.perf_counter() - t
            return out

        setattr(obj, name, wrapper)

    timed(cluster, "generate", "rollout")
    timed(cluster, "get_ref_per_token_logps", "reference", block=True)
    timed(cluster, "update_actor", "update")
    # The arrays the reference pass and the update run on (Tunix pads completions to
    # max_tokens_to_generate): the TrainExample this step builds; real tokens from its masks.
    seen = {"positions": 0, "real": 0}
    orig_build = learner._generate_and_compute_advantage

    def measured_build(*args, **kw):
        ex = orig_build(*args, **kw)
        seen["positions"] += int(ex.prompt_ids.size + ex.completion_ids.size)
        seen["real"] += int(np.asarray(ex.prompt_mask).sum() + np.asarray(ex.completion_mask).sum())
        return ex

    learner._generate_and_compute_advantage = measured_build
    step_s: list[float] = []
    parts: dict[str, list[float]] = {"rollout": [], "reference": [], "update": [], "step_cpu": []}
    tokens: list[int] = []
    lengths: list[int] = []
    pad: dict[str, list[int]] = {k: [] for k in seen}
    first, calls = [0.0], [0]
    orig_step = learner._run_global_step

    def timed_step(*args, **kw):
        for k in timers:
            timers[k] = 0.0
        step_lengths.clear()
        for k in seen:
            seen[k] = 0
        t, c0 = time.perf_counter(), time.process_time()
        out = orig_step(*args, **kw)
        jax.block_until_ready(nnx_state(cluster.actor_trainer.model))
        dt = time.perf_counter() - t
        i = calls[0]
        calls[0] += 1
        if i < a.warmup:
            first[0] = first[0] or dt
            _say(f"tunix warm-up step {i}: {dt:.2f}s")
        else:
            step_s.append(dt)
            for k, v in timers.items():
                parts[k].append(v)
            parts["step_cpu"].append(time.process_time() - c0)
            tokens.append(sum(step_lengths))
            lengths.extend(step_lengths)
            for k, v in seen.items():
                pad[k].append(v)
            _say(f"tunix step {i}: {dt:.3f}s (rollout {timers['rollout']:.3f} ref "
                 f"{timers['reference']:.3f} update {timers['update']:.3f}; {sum(step_lengths)} tokens)")
        return out

    def nnx_state(m):
        from flax import nnx
        return nnx.state(m)

    learner._run_global_step = timed_step
    # An array, not a list: Tunix repeats each batch G times with jax.tree.map (a list's strings
    # would each become a leaf).
    data = [{"prompts": np.asarray([prompt_text(p) for p in a.prompts])} for _ in range(total_steps)]
    learner.train(data)
    assert lengths and max(lengths) <= T, f"Tunix completions over the cap: {max(lengths)}"
    if a.lengths == "full":
        assert all(n == T for n in lengths), f"Tunix completions not full length: {sorted(set(lengths))}"
    assert len(step_s) == a.steps and all(pad["positions"]), (step_s, pad)
    res = _summary(step_s, parts, tokens, first[0])
    res["lengths"] = length_stats(lengths, T)
    # One TrainExample feeds both passes: the same positions and real tokens.
    res["padding_reference"] = res["padding_update"] = _padding(pad["positions"], pad["real"])
    res["version"] = __import__("importlib.metadata").metadata.version("google-tunix")
    res["jax"] = jax.__version__
    return res


def _table_row(r: dict[str, Any]) -> dict[str, Any]:
    """One system's line of the README table: tokens/s, lengths, per-part seconds, padding."""
    part = {k[:-2]: r[k] for k in ("rollout_s", "reference_s", "update_s", "update_and_rest_s") if k in r}
    return {"tok_s": r["completion_tokens_per_s"], "step_s": r["step_s"],
            "len_mean_p50_p90_max": [r["lengths"][k] for k in ("mean", "p50", "p90", "max")], **part,
            "pad_ref": r["padding_reference"]["padding_share"], "pad_update": r["padding_update"]["padding_share"]}


# ---- driver -----------------------------------------------------------------------------------
class PeerError(RuntimeError):
    """A requested peer could not run (missing interpreter or package, crash, timeout)."""


def check_peer(peer: str, python: str) -> None:
    """Fail before any work when a requested peer cannot start: its interpreter must exist and
    import its package."""
    if not os.path.exists(python):
        raise PeerError(f"peer {peer}: no Python interpreter at {python} (give --{peer}-python)")
    package = {"r1jax": "r1jax", "trl": "trl", "tunix": "tunix"}[peer]
    r = subprocess.run([python, "-c", f"import {package}"], capture_output=True, text=True, check=False)
    if r.returncode != 0:
        last = (r.stderr.strip().splitlines() or ["?"])[-1]
        raise PeerError(f"peer {peer}: {python} cannot import {package} ({last}); install it or give "
                        f"--{peer}-python, or leave {peer} out of --peers")


def run_worker(peer: str, python: str, args_json: str, env_extra: dict[str, str], timeout: int) -> dict[str, Any]:
    env = dict(os.environ, **env_extra)
    env.pop("XLA_FLAGS", None)
    env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(os.path.abspath(__file__)),
                                         *filter(None, [env.get("PYTHONPATH")])])
    cmd = [python, os.path.abspath(__file__), "--worker", peer, "--worker-args", args_json]
    t = time.perf_counter()
    try:
        r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=None, text=True, env=env,
                           timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        raise PeerError(f"peer {peer} did not finish within {timeout}s (--timeout)") from None
    if r.returncode != 0:
        raise PeerError(f"peer {peer}: its worker failed (exit {r.returncode}); see its stderr above")
    res = json.loads(r.stdout.strip().splitlines()[-1])
    res["process_s"] = time.perf_counter() - t
    return res


def _round(x):
    if isinstance(x, float):
        return float(f"{x:.4g}")
    if isinstance(x, dict):
        return {k: _round(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_round(v) for v in x]
    return x


# ---- the loop, sync vs async rollouts (r1jax.offpolicy) -------------------------------------
def loop_worker(a) -> dict[str, Any]:
    """r1jax's whole training loop (trainer.train) on a.devices fake CPU devices: sync on all of
    them, or async (train.rollout_mode=async: half sample, half train, max_staleness 1). Seconds
    per update: the mean of metrics.jsonl's time/step after the first rollout (compiles)."""
    from r1jax import mesh as mesh_lib

    mesh_lib.set_host_device_count(a.devices)
    from r1jax import trainer as trainer_lib
    from r1jax.config import load_config

    run = os.path.join(a.tmp, f"loop-{a.mode}")
    m = a.minibatches
    cfg = load_config(None, [
        "model.hidden_size=128", "model.intermediate_size=512", "model.num_layers=4", "model.num_heads=4",
        "model.num_kv_heads=2", "model.max_position_embeddings=256", "data.max_prompt_len=64", "data.template=none",
        f"sampler.max_new_tokens={a.new_tokens}", "sampler.prompt_buckets=[64]", "sft.steps=0",
        "eval.num_prompts=0", f"grpo.group_size={a.group}", f"grpo.num_minibatches={m}", f"grpo.beta={a.beta}",
        "grpo.ref_reset_every=0", f"train.prompts_per_rollout={a.prompts}", f"train.steps={m * a.rollouts}",
        f"train.rollout_mode={a.mode}", "train.max_staleness=1", "checkpoint.every=0", "run.progress=false",
        "run.tensorboard=false", "run.plots=false", f"run.dir={run}"])
    summary = trainer_lib.train(cfg)
    with open(os.path.join(run, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f][m:]
    return {"mode": a.mode, "devices": a.devices, "updates_timed": len(rows),
            "update_step_s": statistics.mean(r["time/step"] for r in rows),
            "trainer_wait_rollout_s": statistics.mean(r.get("time/trainer_wait_rollout", 0.0) for r in rows[::m]),
            "sampler_wait_weights_s": statistics.mean(r.get("time/sampler_wait_weights", 0.0) for r in rows[::m]),
            "wall_s": summary["wall_seconds"]}


def loop_main(args) -> None:
    """--rollout-modes: the loop's seconds per update, one worker per mode (fresh processes)."""
    out: dict[str, Any] = {"bench": "grpo_loop", "cpus": os.cpu_count(), "load_avg_1m_start": os.getloadavg()[0],
                           "prompts": args.prompts, "group": args.group, "runs": []}
    with tempfile.TemporaryDirectory() as tmp:
        for mode in args.rollout_modes.split(","):
            wargs = json.dumps({"mode": mode, "devices": args.loop_devices, "prompts": args.prompts,
                                "group": args.group, "new_tokens": 32, "beta": args.beta, "minibatches": 2,
                                "rollouts": args.warmup + args.steps, "tmp": tmp})
            _say(f"loop: {mode} on {args.loop_devices} devices ...")
            res = run_worker("loop", args.r1jax_python, wargs, {"JAX_PLATFORMS": "cpu"}, args.timeout)
            _say(f"loop: {mode} -> {json.dumps(_round(res))}")
            out["runs"].append(_round(res))
    t = {r["mode"]: r["update_step_s"] for r in out["runs"]}
    if "sync" in t and "async" in t:
        out["speedup_async_vs_sync"] = _round(t["sync"] / t["async"])
    out["load_avg_1m_end"] = os.getloadavg()[0]
    print(json.dumps(out))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="tiny,small")
    ap.add_argument("--peers", default=",".join(PEERS))
    ap.add_argument("--prompts", type=int, default=8, help="P")
    ap.add_argument("--group", type=int, default=8, help="G")
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--beta", type=float, default=0.04)
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps (the first compiles)")
    ap.add_argument("--steps", type=int, default=3, help="timed steps (median reported)")
    ap.add_argument("--lengths", default="full", choices=("full", "realistic"),
                    help="full: every completion runs to the size's new-token count (eos never sampled); "
                         "realistic: a checkpoint with a raised eos logit, long-tailed lengths under --cap "
                         "(benchmarks/_checkpoint.py), every system stopping on its own eos")
    ap.add_argument("--cap", type=int, default=256, help="--lengths realistic: max new tokens")
    ap.add_argument("--mean-length", type=float, default=50.0,
                    help="--lengths realistic: the mean completion length the eos bias aims at")
    ap.add_argument("--min-decode-batch", type=int, default=8,
                    help="--lengths realistic: r1jax's sampler.min_decode_batch (smallest compaction bucket)")
    ap.add_argument("--min-decode-window", type=int, default=64,
                    help="--lengths realistic: r1jax's sampler.min_decode_window (first window bucket)")
    ap.add_argument("--pack-chunk-tokens", type=int, default=0,
                    help="--lengths realistic: r1jax's grpo.pack_chunk_tokens (0: prompt + cap)")
    ap.add_argument("--torch-threads", type=int, default=1,
                    help="torch.set_num_threads for TRL (0: all cores). Default 1: on the shared "
                         "2-core machine 2 OpenMP threads made TRL ~10x slower (spin-waiting under "
                         "contention); pass 0 on a quiet machine")
    ap.add_argument("--r1jax-python", default=sys.executable, help="interpreter for r1jax (default: this one)")
    ap.add_argument("--trl-python", default=sys.executable, help="interpreter with TRL (default: this one)")
    ap.add_argument("--tunix-python", default=os.environ.get("TUNIX_PYTHON"),
                    help="interpreter with Tunix installed (its own venv; also TUNIX_PYTHON); "
                         "required when tunix is among --peers")
    ap.add_argument("--timeout", type=int, default=900, help="seconds per worker")
    ap.add_argument("--rollout-modes", default=None,
                    help="e.g. sync,async: time the whole loop (r1jax only) per train.rollout_mode instead")
    ap.add_argument("--loop-devices", type=int, default=8, help="fake CPU devices for --rollout-modes")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--worker-args", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        a = argparse.Namespace(**json.loads(args.worker_args))
        fn = {"r1jax": r1jax_worker, "trl": trl_worker, "tunix": tunix_worker, "loop": loop_worker}[args.worker]
        print(json.dumps(fn(a)))
        return
    if args.rollout_modes:
        return loop_main(args)

    peers = [p for p in args.peers.split(",") if p]
    bad = [p for p in peers if p not in PEERS]
    if bad:
        ap.error(f"unknown peer(s) {bad}; valid: {','.join(PEERS)}")
    sizes = [s for s in args.sizes.split(",") if s]
    bad = [s for s in sizes if s not in CONFIGS]
    if bad:
        ap.error(f"unknown size(s) {bad}; valid: {','.join(CONFIGS)}")
    if args.beta <= 0:
        ap.error("--beta must be > 0: the benchmark measures a step with a reference model")
    pythons = {"r1jax": args.r1jax_python, "trl": args.trl_python, "tunix": args.tunix_python}
    try:
        for peer in peers:
            if not pythons[peer]:
                raise PeerError(f"peer {peer}: no interpreter given (--{peer}-python)")
            check_peer(peer, pythons[peer])
    except PeerError as e:
        print(f"grpo_step: error: {e}", file=sys.stderr)
        sys.exit(2)
    import jax

    peak = matmul_peak_flops()
    realistic = args.lengths == "realistic"
    if realistic and not 0 < args.mean_length <= args.cap:
        ap.error("--mean-length must be in (0, --cap]")
    result: dict[str, Any] = {"bench": "grpo_step", "device": "cpu", "cpus": os.cpu_count(),
                              "load_avg_1m_start": os.getloadavg()[0], "lengths": args.lengths,
                              **({"cap": args.cap, "mean_length_target": args.mean_length} if realistic else {}),
                              "prompts": args.prompts, "group": args.group,
                              "prompt_len": args.prompt_len, "beta": args.beta, "dtype": "float32",
                              "matmul_peak_gflops": peak / 1e9, "runs": []}
    _say(f"fp32 jit matmul peak {peak / 1e9:.1f} GFLOP/s (jax {jax.__version__})")
    with tempfile.TemporaryDirectory() as tmp:
        for name in sizes:
            path = make_checkpoint(name, tmp, args.mean_length if realistic else 0.0, pad_id=0, tokenizer=True)
            c = CONFIGS[name]
            eos = eos_id(name, realistic)
            new = args.cap if realistic else c["new_tokens"]
            # Prompt ids below eos (realistic: eos is the vocabulary's last id).
            prompts = make_prompts(args.prompts, args.prompt_len, min(eos, c["vocab_size"]))
            wargs = json.dumps({"path": path, "prompts": prompts, "group": args.group,
                                "new_tokens": new, "beta": args.beta, "lengths": args.lengths, "eos": eos,
                                "min_decode_batch": args.min_decode_batch,
                                "min_decode_window": args.min_decode_window,
                                "pack_chunk_tokens": args.pack_chunk_tokens,
                                "warmup": args.warmup, "steps": args.steps, "tmp": tmp,
                                "torch_threads": args.torch_threads})
            np_ = num_params(name)
            run: dict[str, Any] = {"model": name, "params": np_["total"], "new_tokens": new}
            if not realistic:
                run["completion_tokens_per_step"] = args.prompts * args.group * new
            for peer in peers:
                _say(f"{name}: {peer} ...")
                env = {"JAX_PLATFORMS": "cpu"} if peer != "trl" else {}
                try:
                    run[peer] = run_worker(peer, pythons[peer], wargs, env, args.timeout)
                except PeerError as e:
                    print(f"grpo_step: error: {e}", file=sys.stderr)
                    sys.exit(1)
                _say(f"{name}: {peer} -> {json.dumps(_round(run[peer]))}")
            r1 = run.get("r1jax", {})
            if "update_s" in r1:
                # Tokens through the update's forward/backward: the real prompt + completion tokens
                # of every row (full lengths: P * G * (Tp + T)); the tied embedding counts once,
                # as the unembedding matmul.
                toks = r1["padding_update"]["real_tokens_per_step"]
                est = 6 * (np_["non_embedding"] + np_["embedding"]) * toks
                r1["update_flops_6nd"] = est
                r1["update_gflops_per_s"] = est / r1["update_s"] / 1e9
                r1["update_fraction_of_matmul_peak"] = est / r1["update_s"] / peak
                # The compiler's count (aot.program_report, loop bodies times their trip counts;
                # realistic lengths: the last step's update shape).
                flops = r1.pop("update_flops", float("nan"))
                r1["update_flops_compiled"] = flops
                r1["update_fraction_of_matmul_peak_compiled"] = flops / r1["update_s"] / peak
            others = [p for p in peers if p != "r1jax" and "completion_tokens_per_s" in run.get(p, {})]
            if "completion_tokens_per_s" in r1:
                for p in others:
                    run[f"ratio_r1jax_vs_{p}"] = r1["completion_tokens_per_s"] / run[p]["completion_tokens_per_s"]
                if others:
                    best = max(run[p]["completion_tokens_per_s"] for p in others)
                    run["ratio_r1jax_vs_best_peer"] = r1["completion_tokens_per_s"] / best
            run["table"] = {p: _table_row(run[p]) for p in peers if "completion_tokens_per_s" in run.get(p, {})}
            result["runs"].append(_round(run))
            print(json.dumps(_round(run)), file=sys.stderr, flush=True)
    result["load_avg_1m_end"] = os.getloadavg()[0]
    print(json.dumps(_round(result)))


if __name__ == "__main__":
    main()
