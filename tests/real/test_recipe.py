"""configs/smollm2_gsm8k.yaml, shrunk to CPU size: two GRPO updates of SmolLM2 on generated
GSM8K-format questions, and `r1jax eval` at temperature 0 against transformers' greedy
generation of the same prompts, scored with the same reward."""

import json
import math
import os
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")

from r1jax.config import load_config  # noqa: E402
from r1jax.rewards.accuracy import accuracy, run_settings  # noqa: E402
from r1jax.tasks import synthetic_rows  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RECIPE = os.path.join(ROOT, "configs", "smollm2_gsm8k.yaml")


def r1jax_cli(*args: str) -> str:
    """The `r1jax` command on one CPU device (the session's 8 fake devices would hold 8 copies
    of a 135M-parameter model's optimizer temporaries)."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    proc = subprocess.run([sys.executable, "-m", "r1jax.cli", "--devices", "1", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=1500, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout
SMALL = ["data.max_prompt_len=128", "sampler.prompt_buckets=[128]", "run.progress=false",
         "run.tensorboard=false", "run.plots=false"]


def digit_share(completions, **unused):
    """A test reward that differs between samples of one prompt (SmolLM2's accuracy on two
    questions is all zeros, whose advantages are zero): the share of digits in the text."""
    return [sum(c.isdigit() for c in t) / max(len(t), 1) for t in completions]


@pytest.mark.slow
@pytest.mark.subprocess
def test_two_grpo_updates(smollm2_dir, tmp_path):
    r1jax_cli("train", RECIPE, *SMALL,
              f"model.path={smollm2_dir}", f"run.dir={tmp_path}", "train.steps=2", "train.prompts_per_rollout=2",
              "grpo.group_size=2", "grpo.num_minibatches=1", "grpo.beta=0.001", "sampler.max_new_tokens=16",
              "data.synthetic_size=8", "eval.num_prompts=0", "grpo.dynamic_sampling=false",
              "rewards.functions=[{name: accuracy, kwargs: {sources: [boxed, answer_tag, gsm8k, last_number]}},"
              " {name: 'tests.real.test_recipe:digit_share'}]")
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["steps"] == 2
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    updates = [r for r in rows if "update/loss" in r]
    assert len(updates) == 2
    for r in updates:
        assert math.isfinite(r["update/loss"]) and r["update/finite"] == 1.0
        assert math.isfinite(r["update/grad_norm"]) and r["update/grad_norm"] > 0
        assert r["update/num_seqs"] == 4


EVAL_QUESTIONS = 3
EVAL_NEW = 96


@pytest.mark.slow
@pytest.mark.subprocess
def test_eval_greedy_equals_transformers_greedy(smollm2_dir, hf_model, hf_tokenizer, tmp_path):
    """`r1jax eval` at temperature 0 scores what transformers' greedy generation scores with the
    same reward. SmolLM2 gets these GSM8K questions wrong (0 == 0 proves little), so the
    references are also set to the answers transformers' greedy completions end with: each
    then scores 1 for transformers, and for r1jax only if its greedy completion ends the same."""
    from r1jax.rewards.accuracy import extract_answer

    cfg = load_config(RECIPE, [f"model.path={smollm2_dir}"])
    settings = run_settings(cfg.rewards.functions)
    rows = synthetic_rows("gsm_symbolic", EVAL_QUESTIONS, split="eval")
    prompts = [hf_tokenizer.apply_chat_template([{"role": "user", "content": r["question"]}], tokenize=False,
                                                add_generation_prompt=True) for r in rows]
    hf_tokenizer.padding_side = "left"
    enc = hf_tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.no_grad():
        out = hf_model.generate(**enc, max_new_tokens=EVAL_NEW, do_sample=False,
                                eos_token_id=hf_tokenizer.eos_token_id, pad_token_id=hf_tokenizer.pad_token_id)
    texts = hf_tokenizer.batch_decode(out[:, enc.input_ids.shape[1]:], skip_special_tokens=True)
    theirs_real = accuracy(texts, answer=[r["answer"] for r in rows], **settings)
    own = [extract_answer(t, **settings) for t in texts]
    keep = [i for i, a in enumerate(own) if a]  # a completion that rambles without a number has none
    assert keep, texts
    assert accuracy([texts[i] for i in keep], answer=[own[i] for i in keep], **settings) == [1.0] * len(keep)

    # One `r1jax eval` over both: the own-answer rows first (plain rows; the GSM8K ones after
    # them keep their "#### N" answers, which the reward reads as the reference).
    file = tmp_path / "eval.jsonl"
    pairs = [(rows[i]["question"], own[i]) for i in keep] + [(r["question"], r["answer"]) for r in rows]
    file.write_text("".join(json.dumps({"question": q, "answer": a}) + "\n" for q, a in pairs))
    ours = json.loads(r1jax_cli("eval", RECIPE, "eval.temperature=0", "eval.k=1",
                                f"eval.num_prompts={len(pairs)}", f"eval.max_new_tokens={EVAL_NEW}",
                                f"model.path={smollm2_dir}", f"data.eval_path={file}").strip().splitlines()[-1])
    assert ours["eval/num_prompts"] == len(pairs)
    assert ours["eval/pass@1"] == pytest.approx((len(keep) + sum(theirs_real)) / len(pairs))
    assert ours["eval/cons@1"] == ours["eval/pass@1"]  # one greedy sample: the vote is that sample
