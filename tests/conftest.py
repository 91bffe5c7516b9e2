"""Test session set-up: 8 fake CPU devices, created before anything imports jax."""

import os

os.environ["XLA_FLAGS"] = " ".join(
    [f for f in os.environ.get("XLA_FLAGS", "").split()
     if not f.startswith("--xla_force_host_platform_device_count")]
    + ["--xla_force_host_platform_device_count=8"])
# R1JAX_TEST_BACKEND=gpu (or tpu) runs the suite with that backend as the default one, the 8
# fake CPU devices still there for the mesh tests (the `devices` fixture); default: CPU only.
_BACKEND = {"gpu": "cuda"}.get(os.environ.get("R1JAX_TEST_BACKEND", "cpu"),
                               os.environ.get("R1JAX_TEST_BACKEND", "cpu"))
if _BACKEND == "cpu":
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
else:
    os.environ["JAX_PLATFORMS"] = f"{_BACKEND},cpu"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def devices():
    import jax

    cpus = jax.devices("cpu")
    assert len(cpus) == 8, "conftest must create 8 fake devices before jax starts"
    return cpus
