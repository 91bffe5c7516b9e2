"""`r1jax sample --model HF_DIR --prompt TEXT [-G 4] ...`: sample completions of prompt texts
from a Hugging Face model directory with r1jax's sampler; one JSON line per sample."""

from __future__ import annotations

import json
from typing import Any, Dict, List, Optional, Sequence

from r1jax.config import SamplerConfig


def sample_text(model_dir: str, prompts: Sequence[str], *, num_samples: int = 1, seed: int = 0,
                config: Optional[SamplerConfig] = None, dtype: Optional[str] = None, mesh=None,
                tokenizer_dir: Optional[str] = None, **overrides) -> List[Dict[str, Any]]:
    """`sampler.generate_text` on an HF directory (config.json + safetensors + tokenizer.json),
    loaded straight into the sampling layout."""
    from r1jax.mesh import SAMPLE_RULES
    from r1jax.models.build import from_pretrained
    from r1jax.sampler import generate_text
    from r1jax.tokenizer import load_tokenizer

    model = from_pretrained(model_dir, dtype=dtype, mesh=mesh, rules=SAMPLE_RULES)
    tokenizer = load_tokenizer(tokenizer_dir or model_dir)
    return generate_text(model, tokenizer, prompts, num_samples=num_samples, seed=seed,
                         config=config, mesh=mesh, rules=SAMPLE_RULES, **overrides)


def run(args) -> int:
    from r1jax.tokenizer import apply_template, load_tokenizer

    prompts = list(args.prompt)
    if args.prompt_file:
        with open(args.prompt_file) as f:
            prompts += [line.rstrip("\n") for line in f if line.strip()]
    if not prompts:
        raise ValueError("no prompt: give --prompt TEXT or --prompt-file FILE")
    if args.template != "none":
        tok = load_tokenizer(args.model)
        prompts = [apply_template(p, args.template, tok) for p in prompts]
    rows = sample_text(args.model, prompts, num_samples=args.num_samples, seed=args.seed, dtype=args.dtype,
                       max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                       top_p=args.top_p, top_k=args.top_k, stop_strings=list(args.stop))
    for r in rows:
        print(json.dumps(r, ensure_ascii=False))
    return 0
