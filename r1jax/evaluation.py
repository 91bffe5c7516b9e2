"""Evaluation as R1 reports it: pass@1 averaged over k samples per question (at the eval
temperature and top-p), and cons@k, the accuracy of the majority-vote answer of those k."""

from __future__ import annotations

import dataclasses
from collections import Counter
from typing import Any, Dict, List, Optional, Sequence, Tuple

import jax
import numpy as np

from r1jax import data as data_lib
from r1jax import distributed
from r1jax.config import DataConfig, EvalConfig
from r1jax.rewards import accuracy as accuracy_reward, extract_answer
from r1jax.sampler import Sampler
from r1jax.tokenizer import Tokenizer


def pass_and_consensus(correct_PxK: np.ndarray, answers_PxK: Sequence[Sequence[Optional[str]]]
                       ) -> Tuple[np.ndarray, np.ndarray]:
    """Per question: pass@1 (the mean correctness of its k samples) and cons@k (whether the
    most frequent extracted answer is correct; ties go to the answer seen first, a question
    without any extracted answer scores 0).

    correct_PxK: 1.0 where sample j of question p is right. answers_PxK: the extracted final
    answers (None or "" when a sample has none), compared after stripping whitespace.
    """
    correct = np.asarray(correct_PxK, np.float32)
    if correct.ndim != 2 or len(answers_PxK) != correct.shape[0]:
        raise ValueError(f"pass_and_consensus: correctness {correct.shape} and answers for "
                         f"{len(answers_PxK)} questions must be [P, k] and P lists")
    cons = np.zeros(correct.shape[0], np.float32)
    for p, extracted in enumerate(answers_PxK):
        stripped = [(e or "").strip() for e in extracted]
        counts = Counter(e for e in stripped if e)
        if counts:
            top = counts.most_common(1)[0][0]
            cons[p] = correct[p, stripped.index(top)]
    return correct.mean(axis=1), cons


def evaluate(sampler: Sampler, params, *, eval_cfg: EvalConfig, data_cfg: DataConfig,
             tokenizer: Tokenizer, prompt_len: int, seed: int = 0, batch_size: int = 64,
             samples_to_log: int = 0, samples_out: Optional[List[Dict[str, Any]]] = None,
             answer_kwargs: Optional[Dict[str, Any]] = None) -> Dict[str, float]:
    """pass@1 over eval.k samples and cons@k on eval.num_prompts held-out questions.

    `sampler` is the run's (its compiled programs are reused); its config is replaced by the
    eval temperature / top-p / max_new_tokens. Prompts are padded to `prompt_len` (the run's
    Geometry.prompt_len, so evaluation compiles one program). The first batch's first
    `samples_to_log` completions go to `samples_out`. `answer_kwargs`: the accuracy reward's
    answer extraction (pattern, sources; r1jax.rewards.accuracy.run_settings of the run).
    """
    answer_kwargs = dict(answer_kwargs or {})
    k, num_prompts = eval_cfg.k, eval_cfg.num_prompts
    scfg = dataclasses.replace(sampler.config, temperature=eval_cfg.temperature, top_p=eval_cfg.top_p,
                               max_new_tokens=eval_cfg.max_new_tokens or sampler.config.max_new_tokens)
    s = sampler.with_config(scfg)
    # The same global batches on every process (equal step counts everywhere); each scores
    # the rows its devices hold and the per-row results are all-gathered.
    batches = data_lib.eval_batches(data_cfg, tokenizer, min(batch_size, num_prompts),
                                    buckets=[prompt_len], shard_options=data_lib.global_order())
    pass1, cons, lengths, n_prompts = [], [], [], 0
    key = jax.random.PRNGKey(seed)
    for bi, b in enumerate(batches):
        if n_prompts >= num_prompts:
            break
        take = min(len(b), num_prompts - n_prompts)
        out = s.sample(params, b.prompt_ids_PxTp[:take], prompt_mask=b.prompt_mask_PxTp[:take],
                       key=jax.random.fold_in(key, bi), num_samples=k)
        rows, tokens = distributed.local_rows(out.tokens)
        _, n_local = distributed.local_rows(out.lengths)
        texts = tokenizer.batch_decode([t[:n] for t, n in zip(tokens, n_local)])
        answers = [b.answers[r // k] for r in rows]
        acc = np.asarray([x or 0.0 for x in accuracy_reward(completions=texts, answer=answers, **answer_kwargs)],
                         np.float32)
        # Answers travel between processes as hashes (0: none extracted): enough for cons@k.
        hashes = np.asarray([_answer_hash(extract_answer(t, **answer_kwargs)) for t in texts], np.int32)
        n_rows = out.tokens.shape[0]
        acc, hashes, n_tok = (distributed.gather_rows(rows, v, n_rows) for v in (acc, hashes, n_local))
        extracted = [[str(h) if h else "" for h in hashes[p * k:(p + 1) * k]] for p in range(take)]
        p1, c = pass_and_consensus(acc.reshape(take, k), extracted)
        pass1.append(p1)
        cons.append(c)
        lengths.append(n_tok)
        if samples_out is not None and bi == 0:  # the first rows (process 0 holds them)
            samples_out.extend({"prompt": b.prompts[int(r) // k], "completion": texts[i],
                                "answer": answers[i], "correct": float(acc[r])}
                               for i, r in enumerate(rows) if r < samples_to_log)
        n_prompts += take
    if not n_prompts:
        raise data_lib.DataError("evaluation found no held-out prompts (set data.eval_fraction or an eval split)")
    return {"eval/pass@1": float(np.concatenate(pass1).mean()), f"eval/cons@{k}": float(np.concatenate(cons).mean()),
            "eval/num_prompts": float(n_prompts), "eval/k": float(k),
            "eval/length_mean": float(np.concatenate(lengths).mean())}


def _answer_hash(answer: Optional[str]) -> int:
    import zlib

    text = (answer or "").strip()
    # 30 bits: all-gathers run in int32 (no x64); 0 stays "no answer".
    return (zlib.crc32(text.encode("utf-8")) & 0x3FFFFFFF) + 1 if text else 0


__all__ = ["evaluate", "pass_and_consensus"]
