"""Every `r1jax` command in the README's bash blocks runs, with tiny stand-ins where the real one
needs weights or hours (a random 2-layer HF directory for /models/..., a three-row JSONL, a tiny
model for the 7B compile, a few updates). Commands that share state (train, then eval / ckpt on
its run) run in README order, in one temporary working directory."""

import os
import re
import shlex
import subprocess
import sys

import pytest

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
README = os.path.join(ROOT, "README.md")

# Templates with placeholders, not commands (each must still be in the README).
TEMPLATES = {
    "r1jax --coordinator HOST0:8476": "HOST0 / N / I are the user's cluster addresses",
}
# Make any training run tiny: the flags win over the README's (they come last).
TINY_TRAIN = [
    "model.hidden_size=32", "model.intermediate_size=64", "model.num_layers=2", "model.num_heads=2",
    "model.num_kv_heads=1", "train.steps=2", "train.prompts_per_rollout=2", "grpo.group_size=2",
    "grpo.num_minibatches=2", "sampler.max_new_tokens=4", "sft.steps=2", "sft.batch_size=4",
    "eval.num_prompts=2", "eval.k=2", "eval.max_new_tokens=4", "checkpoint.every=0", "run.progress=false",
    "run.tensorboard=false", "run.plots=false",
]
# configs/r1_zero.yaml on a laptop: its 64 x 8 mesh folded onto the local devices, the R1-Zero
# template's prompts kept (512 tokens), the model from the stand-in directory.
R1_ZERO = ["mesh.dcn={data: 1}", "mesh.ici={fsdp: -1}", "data.max_prompt_len=512", "eval.num_prompts=0", "sft.steps=0",
           "model.dtype=float32", "model.param_dtype=float32", "sampler.kv_cache_dtype=float32"]


def readme_commands():
    cmds, fence, head = [], False, ""
    for line in open(README):
        if line.startswith("```"):
            fence = not fence and line.strip() in ("```bash", "```sh")
            continue
        text = line.split("  #")[0].strip()
        if fence and text.endswith("\\"):  # a command continued on the next line
            head += text[:-1] + " "
            continue
        text, head = head + text, ""
        if fence and text.startswith("r1jax "):
            cmds.append(text)
    return cmds


def _stand_in_hf_dir(path):
    import transformers

    from r1jax.tokenizer import char_tokenizer

    tok = char_tokenizer()
    cfg = transformers.Qwen2Config(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                                   max_position_embeddings=1024, eos_token_id=tok.eos_id,
                                   pad_token_id=tok.pad_id, tie_word_embeddings=False)
    transformers.Qwen2ForCausalLM(cfg).save_pretrained(path)
    tok.save(path)
    return path


def _argv(cmd, hf_dir):
    argv = shlex.split(cmd)[1:]
    argv = [re.sub(r"/models/[\w.\-]+", hf_dir, a) for a in argv]
    if "compile" in argv:  # a 7B compile: the same command on the tiny model
        argv = [a.replace("configs/model/qwen2.5-7b.yaml", "configs/model/tiny.yaml") for a in argv]
    if "train" in argv:
        argv += TINY_TRAIN + (R1_ZERO if "configs/r1_zero.yaml" in argv else [])
    if "study" in argv and "--measure" in argv:  # the projection and compiles, not the timing
        i = argv.index("--measure")
        argv = argv[:i] + argv[i + 2:]
    if "eval" in argv:
        argv += ["eval.num_prompts=2", "eval.max_new_tokens=4"]
    return argv


@pytest.mark.slow
@pytest.mark.subprocess
def test_every_readme_command_runs(tmp_path):
    pytest.importorskip("transformers")
    cmds = readme_commands()
    text = open(README).read()
    for t in TEMPLATES:
        assert t in text, f"TEMPLATES lists {t!r}, which the README no longer shows"
    cmds = [c for c in cmds if not any(c.startswith(t) for t in TEMPLATES)]
    assert len(cmds) >= 8 and any(c.startswith("r1jax train") for c in cmds), cmds
    os.symlink(os.path.join(ROOT, "configs"), tmp_path / "configs")  # the README's relative paths
    hf_dir = _stand_in_hf_dir(str(tmp_path / "stand-in-model"))
    with open(tmp_path / "train.jsonl", "w") as f:
        for q, a in (("What is 2+3?", "5"), ("What is 7-4?", "3"), ("What is 6+1?", "7")):
            f.write(f'{{"question": "{q}", "answer": "{a}"}}\n')
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "", "PYTHONPATH": ROOT}
    env.pop("R1JAX_DEVICES", None)
    for cmd in cmds:
        argv = _argv(cmd, hf_dir)
        out = subprocess.run([sys.executable, "-m", "r1jax.cli", *argv], cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=900)
        assert out.returncode == 0, f"README command failed: {cmd}\n(ran: {argv})\n{out.stderr[-3000:]}"
        assert out.stdout.strip(), f"README command printed nothing: {cmd}"
    assert os.path.isfile(tmp_path / "runs" / "demo-hf" / "config.json")
