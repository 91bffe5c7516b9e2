"""Rollout throughput: r1jax's sampler vs transformers `generate` vs Tunix's vanilla sampler.

Same random-weight HF Qwen2 checkpoint (created here with transformers), same prompts (random
token ids, lengths 16..48, left-padded), same batch (P prompts x G samples), every completion
forced to the full new-token count (no eos; transformers: min_new_tokens = max_new_tokens),
plain sampling at temperature 1 (top-k / top-p off everywhere; transformers' default top_k=50
is switched off). tokens/s = P * G * new_tokens / wall time of one warm call (best of
--repeats), prefill included.

Also measured in the same run, right before each r1jax timing: this machine's fp32 matmul peak
(best of 5 jitted 2048^3 matmuls), and the fraction of it r1jax's rollout reaches, counting
2 x (non-embedding params + the unembedding) + attention FLOPs per generated token.

Tunix runs in its own environment (`--tunix-python`, no default) through this same file in
worker mode; prompts reach it as strings of token ids through a pass-through tokenizer. A
requested peer (`--peers`) that cannot run stops the benchmark with a non-zero exit naming it.
Prints ONE JSON line.

Fixed memory (`--kv-budget F`): every system gets the same KV-cache budget, F times what
r1jax's shared-prefix rollout needs whole (prompt caches + P * G * cap), in cached positions.
r1jax decodes under it with continuous batching (sampler.kv_cache_budget: as many samples as
fit, a pending one seated in each slot that frees up); the peers, which keep a cache of the
padded prompt plus the cap per sequence, run the prompts in chunks whose caches fit.

    python benchmarks/sampler.py --lengths realistic --sizes tiny --batches 256 --cap 256 --mean-length 50 --kv-budget 0.25

    python benchmarks/sampler.py                       # tiny + small, 64 and 512 sequences
    python benchmarks/sampler.py --sizes tiny --batches 64

Realistic lengths (`--lengths realistic`): the checkpoint's end-of-sequence logit is raised by
a fixed amount on every step (benchmarks/_checkpoint.py, shared with grpo_step.py: one residual
channel held constant shifts every logit equally except the eos row's, which gets an extra set
by --mean-length), so each system stops on its own eos with a
known per-step probability: geometric lengths, long-tailed, mean about --mean-length under the
cap --cap. tokens/s counts the tokens each system actually generated (eos included), and the
length statistics each system produced are reported beside it. r1jax also runs with compaction
and windows off (`r1jax_one_program`: one batch and one window until the last row stops).

    python benchmarks/sampler.py --lengths realistic --sizes tiny --batches 64 --cap 256 --mean-length 50
    python benchmarks/sampler.py --model-dir ~/.cache/r1jax/SmolLM2-135M-Instruct --batches 64 --new-tokens 32
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from _checkpoint import CONFIGS, length_stats, make_checkpoint, num_params  # sibling modules (benchmarks/ on sys.path)
from _peak import matmul_peak_flops

GROUP = 16  # G, R1's group size


def _prompts(n: int, vocab: int, seed: int = 0):
    import numpy as np

    rs = np.random.RandomState(seed)
    return [rs.randint(1, vocab, size=int(rs.randint(16, 49))).tolist() for _ in range(n)]


def add_model_dir(path: str, new_tokens: int) -> str:
    """Register a real HF checkpoint directory (e.g. the converted SmolLM2) as a size; returns
    its name. Its prompts are random token ids too: throughput does not read them."""
    with open(os.path.join(path, "config.json")) as f:
        hf = json.load(f)
    keys = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
            "num_attention_heads", "num_key_value_heads", "max_position_embeddings")
    name = os.path.basename(os.path.normpath(path))
    CONFIGS[name] = {**{k: hf[k] for k in keys}, "tie_word_embeddings": bool(hf.get("tie_word_embeddings")),
                     "model_type": hf.get("model_type"), "path": path, "new_tokens": new_tokens}
    return name


def decode_flops_per_token(name: str, avg_context: float) -> float:
    c = CONFIGS[name]
    p = num_params(name)
    h = c["hidden_size"] // c["num_attention_heads"]
    attn = 4 * c["num_hidden_layers"] * c["num_attention_heads"] * h * avg_context
    return 2 * (p["non_embedding"] + p["unembed_matmul"]) + attn


def matmul_peak_gflops(n: int = 2048, reps: int = 5) -> float:
    return matmul_peak_flops(n, reps) / 1e9


def bench_r1jax(path: str, prompts, new_tokens: int, repeats: int, prefix_mode: str = "shared",
                realistic: bool = False, **config) -> dict:
    """config: SamplerConfig overrides (compact, min_decode_window, ...)."""
    import jax
    import numpy as np

    from r1jax import models, sampler

    model = models.from_pretrained(path)
    cache = sampler.ProgramCache()  # the compiled program, reused by the timed calls
    kw = dict(key=jax.random.key(0), num_samples=GROUP, max_new_tokens=new_tokens, temperature=1.0,
              top_p=1.0, top_k=0, stop_at_eos=realistic, prefix_mode=prefix_mode, cache=cache, **config)
    t = time.perf_counter()
    jax.block_until_ready(sampler.sample(model, prompts, **kw).tokens)
    compile_s = time.perf_counter() - t
    if realistic:  # the timed keys' lengths may reach other (batch, window) buckets: compile them
        for i in range(repeats):
            jax.block_until_ready(sampler.sample(model, prompts, **{**kw, "key": jax.random.key(i + 1)}).tokens)
    best = float("inf")
    for i in range(repeats):
        t = time.perf_counter()
        out = sampler.sample(model, prompts, **{**kw, "key": jax.random.key(i + 1)})
        jax.block_until_ready(out.tokens)
        best = min(best, time.perf_counter() - t)
    n = int(out.mask.sum())
    res = {"tokens_per_s": n / best, "seconds": best, "first_call_s": compile_s}
    if realistic:
        res["lengths"] = length_stats(np.asarray(out.lengths), new_tokens)
        res["programs_compiled"] = cache.num_compiled()
    else:
        assert n == len(prompts) * GROUP * new_tokens, n
    return res


def bench_transformers(path: str, prompts, new_tokens: int, repeats: int, thread_counts=None,
                       eos=None, chunk: int = 0) -> dict:
    """Best over torch thread counts {all cores, 1}: on a shared machine torch's spinning OpenMP
    workers can lose far more to a descheduled thread than a second core gains. chunk > 0: the
    prompts run `chunk` at a time (their G samples each), one generate call after the other
    (the fixed-memory case: a chunk's cache fits the KV budget)."""
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.eval()
    t = max(map(len, prompts))
    ids = torch.zeros((len(prompts), t), dtype=torch.long)
    mask = torch.zeros((len(prompts), t), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, t - len(p):] = torch.tensor(p)
        mask[i, t - len(p):] = 1
    gen = dict(do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=new_tokens,
               min_new_tokens=new_tokens if eos is None else 0, num_return_sequences=GROUP,
               pad_token_id=0, eos_token_id=eos)
    best, best_threads = float("inf"), None
    step = chunk or len(prompts)
    with torch.no_grad():
        for threads in thread_counts or sorted({os.cpu_count() or 1, 1}, reverse=True):
            torch.set_num_threads(threads)
            model.generate(ids[:1], attention_mask=mask[:1], **{**gen, "max_new_tokens": 2, "min_new_tokens": 2})
            for i in range(repeats):
                torch.manual_seed(i)
                t0 = time.perf_counter()
                outs = [model.generate(ids[c:c + step], attention_mask=mask[c:c + step], **gen)
                        for c in range(0, len(prompts), step)]
                dt = time.perf_counter() - t0
                if dt < best:
                    best, best_threads = dt, threads
    import torch.nn.functional as F

    width = max(o.shape[1] for o in outs)  # chunks stop at different steps: pad to one width
    out = torch.cat([F.pad(o, (0, width - o.shape[1]), value=0) for o in outs])
    gen_ids = out[:, t:].numpy()
    if eos is None:
        n = gen_ids.size
        assert n == len(prompts) * GROUP * new_tokens, (out.shape, n)
        return {"tokens_per_s": n / best, "seconds": best, "torch_threads": best_threads}
    import numpy as np

    hit = gen_ids == eos
    lengths = np.where(hit.any(1), hit.argmax(1) + 1, new_tokens)  # eos included, like r1jax
    n = int(lengths.sum())
    return {"tokens_per_s": n / best, "seconds": best, "torch_threads": best_threads,
            "lengths": length_stats(lengths, new_tokens)}


# ---- Tunix, in its own environment ---------------------------------------------------------
class _IdTokenizer:
    """Token ids written as text ("12 7 300"): Tunix's sampler only takes strings."""

    def __init__(self, vocab: int):
        self.vocab = vocab

    def encode(self, text, **kw):
        return [int(t) for t in text.split()]

    def decode(self, ids, **kw):
        return " ".join(str(int(i)) for i in ids)

    def bos_id(self):
        return None

    def eos_id(self):
        return self.vocab + 7  # never produced: every completion runs to full length

    def pad_id(self):
        return 0


def tunix_worker(path: str, prompts_file: str, new_tokens: int, repeats: int, eos=None,
                 chunk: int = 0) -> dict:
    from tunix.generate import sampler as tsampler
    from tunix.models.qwen2 import model as qmodel
    from tunix.models.qwen2 import params as qparams

    with open(os.path.join(path, "config.json")) as f:
        hf = json.load(f)
    if hf.get("model_type") != "qwen2":
        return {"error": f"not compared: this benchmark drives Tunix's Qwen2 model, and the checkpoint "
                         f"is {hf.get('model_type')!r}"}
    with open(prompts_file) as f:
        prompts = json.load(f)
    cfg = qmodel.ModelConfig(
        num_layers=hf["num_hidden_layers"], vocab_size=hf["vocab_size"], embed_dim=hf["hidden_size"],
        hidden_dim=hf["intermediate_size"], num_heads=hf["num_attention_heads"],
        head_dim=hf["hidden_size"] // hf["num_attention_heads"], num_kv_heads=hf["num_key_value_heads"],
        rope_theta=int(hf.get("rope_theta", 10000)), norm_eps=hf["rms_norm_eps"],
        use_tied_embedding=hf["tie_word_embeddings"])
    model = qparams.create_model_from_safe_tensors(path, cfg, mesh=None)
    tok = _IdTokenizer(hf["vocab_size"])
    strings = [" ".join(map(str, p)) for p in prompts for _ in range(GROUP)]
    max_prompt = 1 << (max(map(len, prompts)) - 1).bit_length()
    cache = tsampler.CacheConfig(cache_size=max_prompt + new_tokens, num_layers=cfg.num_layers,
                                 num_kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim)
    s = tsampler.Sampler(model, tok, cache)
    kw = dict(max_generation_steps=new_tokens, max_prompt_length=max_prompt, temperature=1.0,
              top_p=1.0, eos_tokens=[tok.eos_id() if eos is None else eos])
    step = (chunk or len(prompts)) * GROUP  # fixed-memory case: `chunk` prompts per call

    def run(seed):
        return [t for c in range(0, len(strings), step)
                for t in s(strings[c:c + step], seed=seed, **kw).tokens]

    t = time.perf_counter()
    run(0)
    first = time.perf_counter() - t
    best = float("inf")
    for i in range(repeats):
        t = time.perf_counter()
        toks = run(i + 1)
        best = min(best, time.perf_counter() - t)
    lengths = [len(x) for x in toks]  # as Tunix returns them
    n = sum(lengths)
    res = {"tokens_per_s": n / best, "seconds": best, "first_call_s": first,
           "version": __import__("importlib.metadata").metadata.version("google-tunix")}
    if eos is None:
        assert n == len(strings) * new_tokens, n
    else:
        res["lengths"] = length_stats(lengths, new_tokens)
    return res


def bench_tunix(python: str, path: str, prompts, new_tokens: int, repeats: int, tmp: str,
                eos=None, chunk: int = 0) -> dict:
    pf = os.path.join(tmp, "prompts.json")
    with open(pf, "w") as f:
        json.dump(prompts, f)
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    cmd = [python, os.path.abspath(__file__), "--tunix-worker", path, "--prompts-file", pf,
           "--new-tokens", str(new_tokens), "--repeats", str(repeats)]
    if eos is not None:
        cmd += ["--eos", str(eos)]
    if chunk:
        cmd += ["--chunk", str(chunk)]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=3600)
    if r.returncode != 0:
        return {"error": (r.stderr.strip().splitlines() or ["failed"])[-1][:300]}
    return json.loads(r.stdout.strip().splitlines()[-1])


def check_peers(peers, tunix_python) -> None:
    """A requested peer that cannot run stops the benchmark before anything is timed, naming it."""
    unknown = sorted(set(peers) - {"transformers", "tunix"})
    if unknown:
        raise SystemExit(f"unknown peer(s) {', '.join(unknown)}; valid: transformers, tunix")
    if "transformers" in peers:
        try:
            import torch  # noqa: F401
            import transformers  # noqa: F401
        except ImportError as e:
            raise SystemExit(f"peer transformers cannot run in this interpreter: {e}") from None
    if "tunix" in peers:
        if not tunix_python:
            raise SystemExit("peer tunix needs --tunix-python (an interpreter with google-tunix), "
                             "or leave it out of --peers")
        try:
            r = subprocess.run([tunix_python, "-c", "import tunix.generate.sampler"], capture_output=True,
                               text=True, timeout=600)
            why = (r.stderr.strip().splitlines() or ["failed"])[-1] if r.returncode else None
        except OSError as e:
            why = str(e)
        if why:
            raise SystemExit(f"peer tunix cannot run with --tunix-python {tunix_python}: {why}")


def _budget(args, prompts, new: int) -> dict:
    """The fixed-memory case's KV budget (tokens, prompt caches included) and what it holds:
    r1jax's decode slots, each peer's chunk of prompts (their G samples each; a peer's cache
    holds the padded prompt plus the cap per sequence, no prefix sharing)."""
    from r1jax import sampler
    from r1jax.config import SamplerConfig
    from r1jax.padding import bucket_length

    P, longest = len(prompts), max(map(len, prompts))
    tp = bucket_length(longest, SamplerConfig().prompt_buckets)
    budget = int(args.kv_budget * (P * tp + P * GROUP * new))
    tunix_seq = (1 << (longest - 1).bit_length()) + new
    out = {"kv_budget_tokens": budget,
           "r1jax_slots": sampler.budget_slots(budget, P, tp, new, P * GROUP, 1),
           "transformers_chunk_prompts": budget // (GROUP * (longest + new)),
           "tunix_chunk_prompts": budget // (GROUP * tunix_seq)}
    for k in ("transformers_chunk_prompts", "tunix_chunk_prompts"):
        if out[k] < 1:
            raise SystemExit(f"--kv-budget {args.kv_budget}: {budget} tokens hold no chunk of one prompt's "
                             f"{GROUP} samples for {k.split('_')[0]}")
        out[k] = min(out[k], P)
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="tiny,small")
    ap.add_argument("--model-dir", default=None,
                    help="a real HF checkpoint directory to time instead of the random --sizes")
    ap.add_argument("--batches", default="64,512", help="sequences per rollout (P * G, G = 16)")
    ap.add_argument("--small-512-new-tokens", type=int, default=None,
                    help="fewer new tokens for the small model at 512 sequences (slow peers)")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--peers", default="transformers,tunix")
    ap.add_argument("--tunix-python", default=None,
                    help="the interpreter of an environment with google-tunix (needed for the tunix peer)")
    ap.add_argument("--torch-threads", default=None,
                    help="comma-separated torch thread counts to try (default: all cores and 1)")
    ap.add_argument("--prefix-modes", default="shared", help="r1jax prefix modes to time (shared,repeat)")
    ap.add_argument("--tunix-worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--prompts-file", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--eos", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--chunk", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--kv-budget", type=float, default=0.0,
                    help="fixed-memory case: the KV cache every system may hold, as a fraction of what "
                         "r1jax's shared-prefix rollout needs whole (r1jax: sampler.kv_cache_budget, "
                         "continuous batching; peers: prompts in chunks whose caches fit)")
    ap.add_argument("--lengths", default="full", choices=("full", "realistic"),
                    help="full: every completion forced to the cap; realistic: long-tailed eos stops")
    ap.add_argument("--cap", type=int, default=512, help="--lengths realistic: max new tokens")
    ap.add_argument("--mean-length", type=float, default=100.0,
                    help="--lengths realistic: the mean completion length the eos bias aims at")
    ap.add_argument("--min-decode-batch", type=int, default=8,
                    help="--lengths realistic: r1jax's sampler.min_decode_batch (smallest batch bucket)")
    ap.add_argument("--min-decode-window", type=int, default=64,
                    help="--lengths realistic: r1jax's sampler.min_decode_window (first window bucket)")
    ap.add_argument("--new-tokens", type=int, default=None, help="new tokens per completion (--model-dir: default 64)")
    args = ap.parse_args(argv)
    if args.tunix_worker:
        print(json.dumps(tunix_worker(args.tunix_worker, args.prompts_file, args.new_tokens, args.repeats,
                                      args.eos, args.chunk)))
        return

    if args.model_dir:
        args.sizes = add_model_dir(os.path.expanduser(args.model_dir), args.new_tokens or 64)
    peers = [p for p in args.peers.split(",") if p]
    check_peers(peers, args.tunix_python)
    failed = []
    result = {"bench": "sampler", "device": "cpu", "cpus": os.cpu_count(), "group_size": GROUP,
              "matmul_peak_gflops": round(matmul_peak_gflops(), 1), "runs": []}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.sizes.split(","):
            realistic = args.lengths == "realistic"
            path = make_checkpoint(name, tmp, args.mean_length if realistic else 0.0)
            eos = CONFIGS[name]["vocab_size"] - 1 if realistic else None
            for seqs in (int(b) for b in args.batches.split(",")):
                new = CONFIGS[name]["new_tokens"]
                if name == "small" and seqs >= 512 and args.small_512_new_tokens:
                    new = args.small_512_new_tokens
                if realistic:
                    new = args.cap
                prompts = _prompts(seqs // GROUP, CONFIGS[name]["vocab_size"])
                run = {"model": name, "params": num_params(name)["total"], "sequences": seqs,
                       "prompts": len(prompts), "new_tokens": new}
                # The peak right before r1jax's timing: the machine is shared, so it moves.
                run["matmul_peak_gflops"] = round(matmul_peak_gflops(), 1)
                fixed = _budget(args, prompts, new) if args.kv_budget else {}
                run.update(fixed)
                for mode in args.prefix_modes.split(","):
                    buckets = dict(compact=True, min_decode_batch=args.min_decode_batch,
                                   min_decode_window=args.min_decode_window) if realistic else {}
                    if fixed:
                        buckets["kv_cache_budget"] = fixed["kv_budget_tokens"]
                    run[f"r1jax_{mode}"] = bench_r1jax(path, prompts, new, args.repeats, mode, realistic,
                                                       **buckets)
                if realistic and not fixed:
                    run["r1jax_one_program"] = bench_r1jax(path, prompts, new, args.repeats, "shared", True,
                                                           compact=False, min_decode_window=new)
                r1 = run[f"r1jax_{args.prefix_modes.split(',')[0]}"]
                gen = r1["lengths"]["mean"] if realistic else new
                avg_ctx = sum(map(len, prompts)) / len(prompts) + gen / 2
                achieved = r1["tokens_per_s"] * decode_flops_per_token(name, avg_ctx) / 1e9
                run["r1jax_gflops"] = round(achieved, 1)
                run["r1jax_fraction_of_matmul_peak"] = round(achieved / run["matmul_peak_gflops"], 3)
                if "transformers" in peers:
                    threads = [int(t) for t in args.torch_threads.split(",")] if args.torch_threads else None
                    run["transformers"] = bench_transformers(path, prompts, new, args.repeats, threads, eos,
                                                             fixed.get("transformers_chunk_prompts", 0))
                if "tunix" in peers:
                    run["tunix"] = bench_tunix(args.tunix_python, path, prompts, new, args.repeats, tmp, eos,
                                               fixed.get("tunix_chunk_prompts", 0))
                for p in peers:  # a requested peer that failed: named, and the exit status says so
                    err = run.get(p, {}).get("error", "")
                    if err and not err.startswith("not compared"):
                        failed.append(f"{p} ({run['model']}, {seqs} sequences): {err}")
                best_peer = max((run[p]["tokens_per_s"] for p in peers
                                 if "tokens_per_s" in run.get(p, {})), default=None)
                for p in peers:
                    if "tokens_per_s" in run.get(p, {}):
                        run[f"ratio_vs_{p}"] = round(r1["tokens_per_s"] / run[p]["tokens_per_s"], 2)
                if best_peer:
                    run["ratio_vs_best_peer"] = round(r1["tokens_per_s"] / best_peer, 2)
                for k, v in list(run.items()):
                    if isinstance(v, dict):
                        run[k] = {a: (round(b, 3) if isinstance(b, float) else b) for a, b in v.items()}
                result["runs"].append(run)
                print(json.dumps(run), file=sys.stderr, flush=True)
    print(json.dumps(result))
    if failed:
        raise SystemExit("requested peer(s) failed: " + "; ".join(failed))


if __name__ == "__main__":
    main()
