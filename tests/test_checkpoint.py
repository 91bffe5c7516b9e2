"""Tests for r1jax.checkpoint: round trip, resharding (1 device, other mesh, 2 processes),
preemption, SIGKILL mid-write, corruption fallback, partial restore, inspection, retention."""

import glob
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorstore as ts  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from r1jax import checkpoint as ck  # noqa: E402
from r1jax.config import CheckpointConfig, Config, to_dict  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from helpers_ckpt_state import make_state, state_shardings  # noqa: E402

TRAIN = os.path.join(HERE, "helpers_ckpt_train.py")
MULTI = os.path.join(HERE, "helpers_ckpt_multiproc.py")


def leaves_np(tree):
    out = []
    for x in jax.tree.leaves(tree):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            x = jax.random.key_data(x)
        out.append(np.asarray(x))
    return out


def assert_tree_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(leaves_np(a), leaves_np(b)):
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(x, y)


def mesh_of(shape):
    return jax.make_mesh(shape, ("data", "fsdp"), devices=jax.devices()[: shape[0] * shape[1]])


@pytest.fixture(scope="module")
def saved_2x4(tmp_path_factory):
    """Steps 5 and 7 of make_state saved from a (2 x 4) mesh over 8 devices."""
    directory = str(tmp_path_factory.mktemp("ckpt") / "run")
    state = make_state(mesh_of((2, 4)))
    assert state["params"]["embed"].sharding.spec == P("data", "fsdp")
    with ck.Checkpointer(directory, CheckpointConfig(keep=3)) as c:
        c.save(5, state, data_state={"epoch": 1, "pos": 5}, config=Config(), metadata={"loss": 1.5})
        c.save(7, state, data_state={"epoch": 1, "pos": 7}, config=Config(),
               metadata={"loss": np.float32(0.5), "eval": {"acc": jnp.float32(0.25)}})
    return directory, state


def run(args, **kw):
    return subprocess.run([sys.executable, TRAIN, *args], capture_output=True, text=True,
                          timeout=120, **kw)


@pytest.fixture(scope="module")
def reference_hash(tmp_path_factory):
    """The final parameters of an uninterrupted 12-step run of helpers_ckpt_train.py."""
    ref = run([str(tmp_path_factory.mktemp("ref") / "run"), "--steps", "12"])
    assert ref.returncode == 0, ref.stderr[-2000:]
    return final_hash(ref.stdout)


def final_hash(stdout):
    lines = [l for l in stdout.splitlines() if l.startswith("FINAL ")]
    assert lines, stdout
    return lines[-1].split()[1]


def steps_printed(stdout):
    return [json.loads(l)["step"] for l in stdout.splitlines() if l.startswith("{")]


# ---------------------------------------------------------------------------------------------
def test_round_trip_with_data_state_config_and_metadata(saved_2x4):
    directory, state = saved_2x4
    with ck.Checkpointer(directory) as c:
        assert c.all_steps() == [5, 7]
        r = c.restore(ck.abstract_state(state))
    assert r.step == 7
    assert_tree_equal(r.state, state)
    # optax's named tuples come back as such because the target says so
    assert type(r.state["opt_state"][0]) is type(state["opt_state"][0])
    assert jax.dtypes.issubdtype(r.state["rng"].dtype, jax.dtypes.prng_key)
    assert r.data_state == {"epoch": 1, "pos": 7}
    assert r.config == to_dict(Config())
    assert r.metadata == {"loss": 0.5, "eval": {"acc": 0.25}}
    assert r.state["params"]["embed"].sharding == state["params"]["embed"].sharding


def test_restore_on_one_device_and_on_a_4x2_mesh(saved_2x4):
    directory, state = saved_2x4
    one = jax.sharding.SingleDeviceSharding(jax.devices()[3])
    mesh = mesh_of((4, 2))
    with ck.Checkpointer(directory) as c:
        r1 = c.restore(ck.abstract_state(state, one))
        r42 = c.restore(ck.abstract_state(state, state_shardings(state, mesh)))
        r_cpu = c.restore()  # no target: everything onto the host CPU, as nested dicts
    assert_tree_equal(r1.state, state)
    assert r1.state["params"]["embed"].sharding == one
    assert_tree_equal(r42.state, state)
    emb = r42.state["params"]["embed"]
    assert emb.sharding.mesh.devices.shape == (4, 2) and emb.sharding.spec == P("data", "fsdp")
    assert len({s.device for s in emb.addressable_shards}) == 8
    np.testing.assert_array_equal(np.asarray(r_cpu.state["opt_state"][0]["mu"]["embed"]),
                                  np.asarray(state["opt_state"][0].mu["embed"]))
    assert r_cpu.state["params"]["embed"].sharding == ck.cpu_sharding()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_restore_and_preempt_in_a_two_process_run(saved_2x4):
    directory, _ = saved_2x4
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": HERE + os.pathsep + os.environ.get("PYTHONPATH", "")}
    procs = [subprocess.Popen([sys.executable, MULTI, directory, str(port), str(i)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
    outs = []
    for p in procs:
        try:
            outs.append(p.communicate(timeout=150)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
    for i, (p, out) in enumerate(zip(procs, outs)):
        assert p.returncode == 0, out[-3000:]
        assert f"OK process {i}" in out, out[-3000:]
    stops = [[l for l in out.splitlines() if l.startswith("STOP ")] for out in outs]
    assert stops[0] and stops[0] == stops[1], stops  # SIGTERM to one: both stop at one step


def test_sigterm_saves_the_current_step_and_resume_continues(tmp_path, reference_hash):
    directory = str(tmp_path / "run")
    p = subprocess.Popen([sys.executable, TRAIN, directory, "--steps", "12", "--every", "4",
                          "--sleep", "0.2"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines = []
    for line in p.stdout:  # wait for a few steps, then preempt
        lines.append(line)
        if line.startswith("{") and json.loads(line)["step"] >= 5:
            p.send_signal(signal.SIGTERM)
            break
    out, err = p.communicate(timeout=60)
    out = "".join(lines) + out
    assert p.returncode == 0, err[-2000:]
    stopped = [int(l.split()[1]) for l in out.splitlines() if l.startswith("PREEMPTED")]
    assert stopped and stopped[0] == steps_printed(out)[-1] < 12, out
    assert ck.list_steps(directory)[-1] == stopped[0]
    res = run([directory, "--steps", "12", "--every", "4"])
    assert res.returncode == 0, res.stderr[-2000:]
    assert f"RESUMED {stopped[0]}" in res.stdout
    assert steps_printed(res.stdout)[0] == stopped[0] + 1
    assert final_hash(res.stdout) == reference_hash  # bitwise the uninterrupted run


def test_sigkill_mid_write_resumes_from_the_last_complete_step(tmp_path, reference_hash):
    directory = str(tmp_path / "run")
    killed = run([directory, "--steps", "12", "--every", "3", "--kill-at", "9"])
    assert killed.returncode == -signal.SIGKILL
    assert steps_printed(killed.stdout)[-1] == 9
    # step 9's write was cut short: only its tmp dir (if anything) exists, never "9"
    assert ck.list_steps(directory) == [3, 6]
    res = run([directory, "--steps", "12", "--every", "3"])
    assert res.returncode == 0, res.stderr[-2000:]
    assert "RESUMED 6" in res.stdout and steps_printed(res.stdout)[0] == 7
    assert final_hash(res.stdout) == reference_hash
    assert not glob.glob(os.path.join(directory, "*orbax-checkpoint-tmp*"))


def _damaged_copy(src, dst, damage):
    shutil.copytree(src, dst)
    damage(os.path.join(dst, "7"))
    return dst


def _state_data_files(step_dir):
    files = [f for f in glob.glob(os.path.join(step_dir, "state", "**", "d", "*"), recursive=True)]
    assert files
    return sorted(files, key=os.path.getsize)


def _garble_middle(step_dir):
    # bytes in the middle of a zstd chunk: Orbax itself restores wrong values without a word
    f = _state_data_files(step_dir)[-1]
    with open(f, "r+b") as fh:
        fh.seek(os.path.getsize(f) // 2)
        fh.write(b"\x13" * 8)


def _truncate(step_dir):
    f = _state_data_files(step_dir)[-1]
    os.truncate(f, os.path.getsize(f) // 2)


def _delete(step_dir):
    os.remove(_state_data_files(step_dir)[-1])


def _delete_all(step_dir):
    for f in _state_data_files(step_dir):
        os.remove(f)


# a failed tensorstore read leaves a callback for a closed event loop: noise, not a failure
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("damage,verify,expect", [
    (_garble_middle, "checksum", "fails its CRC32 check"),
    (_truncate, "size", "expected"),
    (_delete, "size", "is missing"),
    (_delete_all, "none", "restore failed"),  # no file list check: Orbax's own read error
])
def test_damaged_latest_falls_back_to_previous(saved_2x4, tmp_path, caplog, damage, verify, expect):
    src, state = saved_2x4
    directory = _damaged_copy(src, str(tmp_path / "run"), damage)
    with caplog.at_level(logging.WARNING, logger="r1jax.checkpoint"):
        with ck.Checkpointer(directory, CheckpointConfig(verify=verify)) as c:
            with pytest.raises(ck.CheckpointError, match="step 7"):
                c.restore(ck.abstract_state(state), step=7)  # an asked-for step never falls back
            r = c.restore(ck.abstract_state(state))
            # the damaged step is moved aside, so the resumed run can write step 7 again
            assert c.all_steps() == [5] and glob.glob(directory + "/7.damaged-*")
            assert c.save(7, state)
    assert r.step == 5 and r.data_state == {"epoch": 1, "pos": 5}
    assert_tree_equal(r.state, state)
    msgs = [rec.getMessage() for rec in caplog.records if "unusable" in rec.getMessage()]
    assert msgs and "step 7" in msgs[-1] and expect in msgs[-1] and "falling back to step 5" in msgs[-1]
    assert "\n" not in msgs[-1]
    assert ck.list_steps(directory) == [5, 7]


def _value_refs(item_dir, prefix):
    """(file, offset, length) of every chunk stored under keys starting with `prefix`."""
    base = ts.KvStore.open({"driver": "file", "path": item_dir + "/"}).result()
    root = ts.ocdbt.dump(base).result()["versions"][-1]["root"]["location"]
    refs = []
    for e in ts.ocdbt.dump(base, root).result()["entries"]:
        if e["key"].decode().startswith(prefix) and "indirect_value" in e:
            # "value:<base dir>:<file id>:<offset>:<length>"
            _, base_dir, file_id, off, n = e["indirect_value"].split(":")
            refs.append((base_dir + file_id, int(off), int(n)))
    return refs


def test_params_only_restore_does_not_read_the_optimizer_state(tmp_path):
    # arrays big enough that chunks live in data files, not inline in the B+tree
    rng = np.random.default_rng(0)
    state = {"params": {"w": jnp.asarray(rng.normal(size=(64, 64)), jnp.float32)},
             "opt_state": {"mu": jnp.asarray(rng.normal(size=(64, 64)), jnp.float32)}}
    directory = str(tmp_path / "run")
    with ck.Checkpointer(directory, CheckpointConfig(verify="none")) as c:
        c.save(1, state)
    item = os.path.join(directory, "1", "state")
    refs = _value_refs(item, "opt_state.")
    assert refs
    for rel, off, n in refs:  # destroy every byte of the optimizer state, and only those
        with open(os.path.join(item, rel), "r+b") as fh:
            fh.seek(off)
            fh.write(b"\0" * n)
    with ck.Checkpointer(directory, CheckpointConfig(verify="none")) as c:
        step, params = c.restore_params_only()
        assert step == 1
        np.testing.assert_array_equal(np.asarray(params["w"]), np.asarray(state["params"]["w"]))
        with pytest.raises(ck.CheckpointError):
            c.restore(ck.abstract_state(state), step=1)


def test_inspect_from_metadata_and_lazy_slices(saved_2x4):
    directory, state = saved_2x4
    assert ck.list_steps(directory) == [5, 7]
    assert ck.inspect(directory)["steps"] == [5, 7]
    assert ck.describe(directory).endswith("2 step(s): 5 7")
    info = ck.inspect(directory, 7)
    arrays = {a["path"]: a for a in info["arrays"]}
    flat = jax.tree_util.tree_flatten_with_path(state)[0]
    assert len(arrays) == len(flat)
    emb = arrays["params/embed"]
    assert emb["shape"] == (16, 8) and emb["dtype"] == "float32" and emb["stored_bytes"] > 0
    assert arrays["params/layers/b"]["dtype"] == "bfloat16"
    assert arrays["opt_state/0/mu/layers/w"]["shape"] == (2, 8, 8)
    assert info["meta"]["step"] == 7
    text = ck.describe(directory, 7)
    assert "params/embed" in text and "[16, 8]" in text
    want = np.asarray(state["opt_state"][0].nu["layers"]["w"])
    got = ck.read_array(directory, 7, "opt_state/0/nu/layers/w", "1,2:6,::3")
    np.testing.assert_array_equal(got, want[1, 2:6, ::3])
    np.testing.assert_array_equal(ck.read_array(directory, 7, "params.embed"),
                                  np.asarray(state["params"]["embed"]))
    with pytest.raises(KeyError, match="no array 'params/nope'"):
        ck.read_array(directory, 7, "params/nope")
    with pytest.raises(ValueError, match="bad index 'x'"):
        ck.parse_index("1,x")


def test_keep_last_n_and_the_best(tmp_path):
    cfg = CheckpointConfig(keep=1, keep_best_metric="eval/acc")
    state = {"w": jnp.arange(4.0)}
    with ck.Checkpointer(str(tmp_path / "run"), cfg) as c:
        for step, acc in [(1, 0.1), (2, 0.9), (3, 0.3), (4, None), (5, 0.2)]:
            c.save(step, state, metadata={"eval": {"acc": acc}} if acc is not None else {})
        c.wait()
        assert c.all_steps() == [2, 5]
        assert c.best_step() == 2


def test_every_k_and_training_goes_on_during_the_write(tmp_path):
    state = {"w": jnp.arange(1 << 16, dtype=jnp.float32)}
    before = np.asarray(state["w"]).copy()
    bump = jax.jit(lambda s: {"w": s["w"] + 1.0}, donate_argnums=0)
    with ck.Checkpointer(str(tmp_path / "run"), CheckpointConfig(every=2)) as c:
        assert not c.maybe_save(1, state)
        assert c.maybe_save(2, state)
        state = bump(state)  # the donated buffers are reused while step 2 is being written
        c.wait()
        assert not c.maybe_save(2, state)  # already saved
        r = c.restore(step=2)
    np.testing.assert_array_equal(np.asarray(r.state["w"]), before)
    np.testing.assert_array_equal(np.asarray(state["w"]), before + 1)


def test_bad_input_messages(tmp_path):
    with pytest.raises(ValueError, match="checkpoint.verify='crc'"):
        ck.Checkpointer(str(tmp_path / "a"), CheckpointConfig(verify="crc"))
    with pytest.raises(FileNotFoundError, match="checkpoint directory not found"):
        ck.list_steps(str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="checkpoint directory not found"):
        ck.export_hf(str(tmp_path / "missing"), str(tmp_path / "out"))
    with ck.Checkpointer(str(tmp_path / "b")) as c:
        assert c.restore() is None
        with pytest.raises(TypeError, match="data_state for step 1 is not JSON-serialisable"):
            c.save(1, {"w": jnp.zeros(2)}, data_state={"it": object()})
        with pytest.raises(ck.CheckpointError, match="no checkpoint for step 3"):
            c.restore(step=3)


def test_export_hf_writes_the_saved_policy(tmp_path):
    hf = pytest.importorskip("r1jax.models.hf")
    from flax import nnx

    from r1jax.models import Transformer

    cfg = Config()
    # shapes from the model, values random (eager init of the real model is slow on CPU)
    abstract = nnx.eval_shape(lambda: Transformer(cfg.model, rngs=nnx.Rngs(0)))
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda a: jnp.asarray(rng.normal(size=a.shape), a.dtype),
                          nnx.to_pure_dict(nnx.state(abstract, nnx.Param)))
    state = {"params": params, "opt_state": jax.tree.map(lambda p: p * 0 + 1, params)}
    directory = str(tmp_path / "run")
    with ck.Checkpointer(directory) as c:
        c.save(4, state, config=cfg)
        c.save(6, jax.tree.map(lambda x: x + 1, state), config=cfg)
    out = ck.export_hf(directory, str(tmp_path / "hf"), step=4)
    assert os.path.exists(os.path.join(out, "config.json"))
    back = hf.load_params(out, cfg.model)
    assert_tree_equal(back, params)


def test_a_failed_background_write_is_one_error_naming_the_step_and_keeps_the_previous(tmp_path, monkeypatch):
    """A write that fails in Orbax's background thread (here: ENOSPC from the array writer)
    surfaces at the next maybe_save as one CheckpointError; the half-written step is removed
    and the previous step stays the latest and restorable. The real full disk (a tmpfs) is in
    tests/faults/."""
    import errno

    import orbax.checkpoint as ocp

    d = str(tmp_path / "c")
    state = {"w": jnp.arange(8.0)}
    c = ck.Checkpointer(d, CheckpointConfig(every=1))
    try:
        c.maybe_save(1, state)
        c.wait()
        original = ocp.PyTreeCheckpointHandler.async_save

        class FullDisk:  # a commit future: the arrays fail to write in the background
            def result(self, timeout=None):
                raise OSError(errno.ENOSPC, "No space left on device")

        async def fails_later(self, *args, **kwargs):
            await original(self, *args, **kwargs)
            return [FullDisk()]

        async def fails_now(self, *args, **kwargs):
            raise OSError(errno.ENOSPC, "No space left on device")

        for step, patch in ((2, fails_later), (3, fails_now)):
            monkeypatch.setattr(ocp.PyTreeCheckpointHandler, "async_save", patch)
            with pytest.raises(ck.CheckpointError) as e:
                c.maybe_save(step, state)
                c.maybe_save(step + 10, state)  # a background failure shows here at the latest
            msg = str(e.value)
            assert "\n" not in msg and f"checkpoint step {step} in {c.directory} could not be written" in msg
            assert "no space left on device (ENOSPC); the latest complete step is 1" in msg
            monkeypatch.setattr(ocp.PyTreeCheckpointHandler, "async_save", original)
    finally:
        c.close()  # does not raise the reported failure a second time
    assert ck.list_steps(d) == [1] and not [n for n in os.listdir(d) if "tmp" in n]
    r = ck.Checkpointer(d, read_only=True).restore()
    assert r.step == 1 and np.array_equal(np.asarray(r.state["w"]), np.arange(8.0))


def test_orphaned_orbax_futures_are_not_logged_but_other_asyncio_errors_are(monkeypatch):
    """After a failed write Orbax abandons its other chunk writes; asyncio logs each as
    "exception was never retrieved" when collected. Those repeats of the one reported error
    are dropped; an asyncio error from anything else, or with R1JAX_DEBUG=1, passes."""
    import logging

    def record_for(filename: str) -> logging.LogRecord:
        code = compile("raise ValueError('RESOURCE_EXHAUSTED: No space left on device')", filename, "exec")
        try:
            exec(code, {})
        except ValueError as e:
            exc = e
        return logging.LogRecord("asyncio", logging.ERROR, "base_events.py", 1,
                                 "Task exception was never retrieved\nfuture: <Task finished>", None,
                                 (type(exc), exc, exc.__traceback__))

    monkeypatch.delenv("R1JAX_DEBUG", raising=False)
    f = ck._ASYNCIO_FILTER
    orbax_file = os.path.join(os.sep, "venv", "orbax", "checkpoint", "serialization.py")
    assert not f.filter(record_for(orbax_file))
    assert f.filter(record_for(os.path.join(os.sep, "home", "me", "my_code.py")))
    monkeypatch.setenv("R1JAX_DEBUG", "1")
    assert f.filter(record_for(orbax_file))
