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

# One XLA compilation cache for the session, inherited by every process a test starts: the suite
# compiles the same tiny programs again in dozens of fresh processes (CLI runs, kill / resume,
# several processes), and on 2 cores compiling is most of their time (a tiny `r1jax train`: 28 s
# of CPU cold, 5.5 s with its programs cached). An entry is keyed by the program's HLO, the
# compile options and the devices, so a hit runs the same executable. A size limit turns on
# JAX's file lock around reads and writes, so concurrent processes never read an entry
# half-written. It starts empty each session; R1JAX_TEST_COMPILE_CACHE=0 turns it off.
_COMPILE_CACHE = None
if os.environ.get("R1JAX_TEST_COMPILE_CACHE", "1") != "0" and "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    import tempfile

    _COMPILE_CACHE = tempfile.mkdtemp(prefix="r1jax-test-xla-cache-")
    os.environ.update(JAX_COMPILATION_CACHE_DIR=_COMPILE_CACHE,
                      JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                      JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
                      JAX_COMPILATION_CACHE_MAX_SIZE=str(8 << 30))

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def devices():
    import jax

    cpus = jax.devices("cpu")
    assert len(cpus) == 8, "conftest must create 8 fake devices before jax starts"
    return cpus


def pytest_sessionfinish(session, exitstatus):
    if _COMPILE_CACHE is not None:
        import shutil

        shutil.rmtree(_COMPILE_CACHE, ignore_errors=True)
