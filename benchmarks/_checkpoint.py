"""The benchmarks' shared model: random-weight HF Qwen2 configs, the checkpoint writer (optionally
with a raised end-of-sequence logit, for realistic completion lengths), a word-level tokenizer,
and the length statistics every system's completions are reported with.

Realistic lengths (`make_checkpoint(..., mean_length=m)`): eos = vocab - 1 and its logit is
raised by a fixed amount on every step through one residual channel held constant (channel 0:
its embedding column is 1 for every token and no layer writes to it, so after the final norm it
shifts every logit equally, except the eos row's, which gets an extra weight calibrated so that
the mean per-step eos probability is 1 / m). Each system then stops on its own eos with a known
per-step probability: geometric lengths, long-tailed, mean about m under the cap. With a pad id,
the pad row gets a large negative weight on the same channel, so no system ever samples pad
(Tunix masks completion tokens equal to pad; TRL and r1jax do not: the counts would differ).
"""

from __future__ import annotations

import os
from typing import Optional

CONFIGS = {
    # ~1.2M parameters.
    "tiny": dict(vocab_size=2048, hidden_size=128, intermediate_size=512, num_hidden_layers=4,
                 num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                 max_position_embeddings=512, new_tokens=32),
    # ~47M parameters.
    "small": dict(vocab_size=16384, hidden_size=512, intermediate_size=1664, num_hidden_layers=12,
                  num_attention_heads=8, num_key_value_heads=2, tie_word_embeddings=True,
                  max_position_embeddings=512, new_tokens=64),
}


def num_params(name: str) -> dict:
    c = CONFIGS[name]
    d, f, L, V = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"], c["vocab_size"]
    n, k = c["num_attention_heads"], c["num_key_value_heads"]
    h = d // n
    layer = d * h * (n + 2 * k) + h * (n + 2 * k) + n * h * d + 3 * d * f + 2 * d
    return {"non_embedding": L * layer + d, "embedding": V * d, "total": L * layer + d + V * d,
            "unembed_matmul": d * V}


def eos_id(name: str, realistic: bool) -> int:
    """The end-of-sequence id: vocab - 1 with realistic lengths; otherwise one past the model's
    vocabulary (only the word tokenizer has it: no completion can stop early)."""
    v = CONFIGS[name]["vocab_size"]
    return v - 1 if realistic else v


def make_checkpoint(name: str, out_dir: str, mean_length: float = 0.0, *, pad_id: Optional[int] = None,
                    tokenizer: bool = False) -> str:
    """Random weights (float32, seed 0); with mean_length > 0, eos = vocab - 1 and its logit
    raised so that a step ends the sequence with probability about 1 / mean_length (see the
    module docstring). pad_id: the config's pad id (its embedding row starts at zero) and, with
    mean_length, a token never sampled. tokenizer: also save the word-level tokenizer
    ("t<i>" is token i, "<pad>" is 0, "<eos>" is eos_id(name, realistic))."""
    import torch
    import transformers

    if "path" in CONFIGS[name]:  # a real checkpoint (benchmarks/sampler.py --model-dir)
        return CONFIGS[name]["path"]
    kw = {k: v for k, v in CONFIGS[name].items() if k != "new_tokens"}
    eos = kw["vocab_size"] - 1 if mean_length else None
    if mean_length and not kw["tie_word_embeddings"]:
        raise SystemExit(f"--lengths realistic needs a tied-embedding config, not {name}")
    extra = {} if pad_id is None else {"pad_token_id": pad_id}
    torch.manual_seed(0)
    model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**kw, bos_token_id=None, eos_token_id=eos,
                                                                   **extra))
    model.eval()
    model.generation_config.eos_token_id = eos
    model.generation_config.bos_token_id = None
    if mean_length:
        _raise_eos(model, kw["vocab_size"], eos, mean_length, pad_id)
    path = os.path.join(out_dir, name + ("_eos" if mean_length else ""))
    model.save_pretrained(path)
    if tokenizer:
        save_word_tokenizer(path, kw["vocab_size"], eos_id(name, bool(mean_length)))
    return path


def _raise_eos(model, v: int, eos: int, mean_length: float, pad_id: Optional[int]) -> None:
    import torch

    with torch.no_grad():
        emb = model.get_input_embeddings().weight  # tied: also the unembedding
        emb[:, 0] = 1.0  # channel 0: constant, dominating the RMS norms
        if pad_id is not None:
            emb[pad_id, 0] = -20.0  # pad's logit ~ -20 x channel 0 below the rest: never sampled
        for layer in model.model.layers:  # nothing writes to channel 0
            layer.self_attn.o_proj.weight[0].zero_()
            layer.mlp.down_proj.weight[0].zero_()
        # Calibrate on random sequences: eos's extra channel-0 weight x such that the mean
        # per-step eos probability is 1 / mean_length.
        ids = torch.randint(0, v - 1, (8, 64))
        out = model(ids, output_hidden_states=True)
        h0 = out.hidden_states[-1][..., 0].reshape(-1)  # after the final norm
        logits = out.logits.reshape(-1, v)
        rest = torch.logsumexp(logits[:, :-1], dim=-1)
        lo, hi = 0.0, 100.0
        for _ in range(60):
            x = (lo + hi) / 2
            prob = torch.sigmoid(logits[:, -1] + x * h0 - rest).mean().item()
            lo, hi = (x, hi) if prob < 1.0 / mean_length else (lo, x)
        emb[eos, 0] = 1.0 + (lo + hi) / 2


def save_word_tokenizer(path: str, vocab: int, eos: int) -> None:
    """A word-level HF tokenizer: "<pad>" is 0, "<eos>" is `eos`, "t<i>" is i for the other ids
    below the vocabulary size."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = {"<pad>": 0, **{f"t{i}": i for i in range(1, vocab) if i != eos}, "<eos>": eos}
    tok = Tokenizer(models.WordLevel(words, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    hf_tok = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>",
                                                  eos_token="<eos>", unk_token="<pad>")
    hf_tok.padding_side = "left"
    hf_tok.save_pretrained(path)


def length_stats(lengths, cap: int) -> dict:
    import numpy as np

    x = np.asarray(lengths, np.float64)
    return {"mean": round(float(x.mean()), 1), "p50": float(np.percentile(x, 50)),
            "p90": float(np.percentile(x, 90)), "p99": float(np.percentile(x, 99)),
            "max": int(x.max()), "at_cap": round(float((x >= cap).mean()), 4), "cap": cap,
            "n": int(x.size)}
