"""Bad input of every kind r1jax reads ends in one line naming the file (or option) and what is
wrong: damaged datasets, checkpoints and directories of the wrong kind, out-of-range options.
Config files and tokenizer files have their own tables in test_config.py / test_tokenizer.py."""

import json
import os
import shutil

import jax.numpy as jnp
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from r1jax import checkpoint as ckpt_lib
from r1jax.cli import main
from r1jax.config import DataConfig
from r1jax.data import DataError, read_rows

ROWS = [{"question": f"q{i}", "answer": str(i)} for i in range(20)]


def _write_good(path: str, fmt: str) -> None:
    table = pa.Table.from_pylist(ROWS)
    if fmt == "jsonl":
        with open(path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in ROWS)
    elif fmt == "parquet":
        pq.write_table(table, path)
    else:
        with pa.OSFile(path, "wb") as f, pa.ipc.new_file(f, table.schema) as w:
            w.write_table(table)


def _damage(data: bytes, how: str, other: bytes) -> bytes:
    if how == "truncated":
        return data[: len(data) // 2 + 7]
    if how == "garbled":  # the middle overwritten: headers intact, contents not
        mid = len(data) // 3
        return data[:mid] + bytes(range(256))[: len(data) // 3] + data[mid + len(data) // 3:]
    if how == "empty":
        return b""
    return other  # "wrong format": another format's bytes under this name


@pytest.mark.parametrize("fmt", ["jsonl", "parquet", "arrow"])
@pytest.mark.parametrize("how", ["truncated", "garbled", "empty", "wrong format"])
def test_damaged_dataset_files_are_named_in_one_line(tmp_path, fmt, how):
    path = str(tmp_path / f"data.{fmt}")
    _write_good(path, fmt)
    other = str(tmp_path / ("other.parquet" if fmt != "parquet" else "other.jsonl"))
    _write_good(other, "parquet" if fmt != "parquet" else "jsonl")
    with open(path, "rb") as f, open(other, "rb") as g:
        damaged = _damage(f.read(), how, g.read())
    with open(path, "wb") as f:
        f.write(damaged)
    with pytest.raises(DataError) as e:
        read_rows(path, DataConfig())
    msg = str(e.value)
    assert "\n" not in msg and path in msg, msg


@pytest.mark.parametrize("meta", ["state.json", "dataset_dict.json"])
@pytest.mark.parametrize("how", ["truncated", "garbled", "not an object"])
def test_damaged_hf_dataset_directory_names_its_metadata_file(tmp_path, meta, how):
    datasets = pytest.importorskip("datasets")
    d = datasets.Dataset.from_list(ROWS)
    root = tmp_path / "hf"
    (datasets.DatasetDict({"train": d}) if meta == "dataset_dict.json" else d).save_to_disk(str(root))
    file = root / meta if meta == "dataset_dict.json" else root / "state.json"
    data = file.read_bytes()
    file.write_bytes({"truncated": data[: len(data) // 2], "garbled": b"\xff\xfe" + bytes(range(128)),
                      "not an object": b"[1, 2]"}[how])
    with pytest.raises(DataError) as e:
        read_rows(str(root), DataConfig())
    msg = str(e.value)
    assert "\n" not in msg and str(file) in msg, msg


# ---------------------------------------------------------------------------------------------
# Checkpoints and directories of the wrong kind
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ckpt_dir(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("ckpt") / "checkpoints")
    with ckpt_lib.Checkpointer(d) as ck:
        for step in (1, 2):
            ck.save(step, {"step": jnp.int32(step), "params": {"w": jnp.full((4, 4), float(step))}},
                    config={}, metadata={"step": step}, block=True)
    return d


def _copy(src: str, dst) -> str:
    shutil.copytree(src, str(dst))
    return str(dst)


@pytest.mark.parametrize("kind", ["empty", "hf_model", "run_without_steps", "random_files"])
def test_a_directory_that_is_not_a_checkpoint_is_one_line(tmp_path, kind):
    d = tmp_path / kind
    d.mkdir()
    if kind == "hf_model":
        (d / "config.json").write_text("{}")
        (d / "model.safetensors").write_bytes(b"\0" * 64)
    elif kind == "run_without_steps":
        (d / "checkpoints").mkdir()
        d = d / "checkpoints"
    elif kind == "random_files":
        (d / "notes.txt").write_text("hello")
        (d / "12abc").mkdir()
    for call in (lambda: ckpt_lib.export_hf(str(d), str(tmp_path / "out")),
                 lambda: ckpt_lib.latest_listed_step(str(d)),
                 lambda: ckpt_lib.Checkpointer(str(d), read_only=True).restore_params_only()):
        with pytest.raises(ckpt_lib.CheckpointError) as e:
            call()
        msg = str(e.value)
        assert "\n" not in msg and str(d) in msg and "holds no r1jax checkpoint" in msg, msg
    if kind == "hf_model":
        assert "model.path" in msg


@pytest.mark.parametrize("how", ["truncated", "garbled", "empty"])
def test_damaged_step_is_named_by_inspect_and_read_and_skipped_by_restore(ckpt_dir, tmp_path, how):
    d = _copy(ckpt_dir, tmp_path / "c")
    meta = os.path.join(d, "2", "state", "_METADATA")
    with open(meta, "rb") as f:
        data = f.read()
    with open(meta, "wb") as f:
        f.write({"truncated": data[: len(data) // 2], "garbled": bytes(255 - b for b in data), "empty": b""}[how])
    for call in (lambda: ckpt_lib.describe(d, 2), lambda: ckpt_lib.read_array(d, 2, "params/w")):
        with pytest.raises(ckpt_lib.CheckpointError) as e:
            call()
        msg = str(e.value)
        assert "\n" not in msg and f"step 2 in {d}" in msg and "unreadable" in msg, msg
    # The damaged latest step is reported and the previous one is used.
    ck = ckpt_lib.Checkpointer(d, read_only=True)
    try:
        step, params = ck.restore_params_only()
        assert step == 1 and ck.restore_warnings and "step 2" in ck.restore_warnings[0]
        np.testing.assert_array_equal(np.asarray(params["w"]), np.ones((4, 4)))
    finally:
        ck.close()


# ---------------------------------------------------------------------------------------------
# The command line: `error: ...` in one line, exit status 1 (2 for argparse's own usage errors)
# ---------------------------------------------------------------------------------------------
def _one_line_error(capsys, argv, status=1):
    assert main(argv) == status
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and "error: " in err[0] and "Traceback" not in err[0], err
    return err[0]


def test_cli_names_directories_of_the_wrong_kind(tmp_path, capsys):
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    for argv in (["ckpt", "inspect", str(hf)], ["ckpt", "inspect", str(hf), "--array", "params/w"],
                 ["ckpt", "export-hf", str(hf), str(tmp_path / "out")]):
        line = _one_line_error(capsys, argv)
        assert str(hf) in line and "holds no r1jax checkpoint" in line, line
    line = _one_line_error(capsys, ["eval", "--checkpoint", str(hf)])
    assert str(hf) in line, line
    (tmp_path / "bad.yaml").write_bytes(b"train: [unclosed\n")
    line = _one_line_error(capsys, ["train", str(tmp_path / "bad.yaml")])
    assert "bad.yaml: not valid YAML" in line


def test_cli_damaged_checkpoint_step_is_one_line(ckpt_dir, tmp_path, capsys):
    d = _copy(ckpt_dir, tmp_path / "c")
    open(os.path.join(d, "2", "state", "_METADATA"), "wb").close()
    line = _one_line_error(capsys, ["ckpt", "inspect", d])
    assert f"step 2 in {d}" in line


@pytest.mark.parametrize("argv,option", [
    (["--devices", "0", "mesh"], "--devices"),
    (["sample", "--model", "m", "--prompt", "x", "-G", "0"], "-G/--num-samples"),
    (["sample", "--model", "m", "--prompt", "x", "--max-new-tokens", "-3"], "--max-new-tokens"),
    (["sample", "--model", "m", "--prompt", "x", "--top-p", "1.5"], "--top-p"),
    (["sample", "--model", "m", "--prompt", "x", "--temperature", "nan"], "--temperature"),
    (["sample", "--model", "m", "--prompt", "x", "--top-k", "-1"], "--top-k"),
    (["eval", "--step", "-1"], "--step"),
    (["ckpt", "inspect", "d", "--step", "x"], "--step"),
    (["compile", "--slices", "0"], "--slices"),
])
def test_cli_option_out_of_range_is_a_usage_error_naming_it(capsys, argv, option):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("r1jax") and f"argument {option}: " in err[-1], err
    assert "must be" in err[-1] or "expected" in err[-1]


def test_r1jax_devices_environment_variable_is_checked_too(capsys, monkeypatch):
    monkeypatch.setenv("R1JAX_DEVICES", "0")
    with pytest.raises(SystemExit) as e:
        main(["mesh"])
    assert e.value.code == 2
    assert "R1JAX_DEVICES: must be in [1, inf), got 0" in capsys.readouterr().err


def test_cli_config_value_out_of_range_is_one_line(capsys, tmp_path):
    line = _one_line_error(capsys, ["train", "train.lr=nan", f"run.dir={tmp_path}/r"])
    assert "'train.lr' must be in (0, inf), got nan" in line
    assert not os.path.exists(tmp_path / "r")  # rejected before anything was built


def test_rollout_rows_that_do_not_split_over_the_batch_shards_name_the_settings(capsys, tmp_path):
    """8 devices (conftest): the default layout shards the update's batch 8 ways; 3 x 2 rows
    do not split. One line naming the settings, the shard count and the mesh, before any
    compile (without the check the partitioner reports an array shape and a tiling factor)."""
    line = _one_line_error(capsys, ["train", "train.prompts_per_rollout=3", "grpo.group_size=2",
                                    "grpo.num_minibatches=1", f"run.dir={tmp_path}/r"])
    assert ("rollout rows (train.prompts_per_rollout x grpo.group_size) = 6 does not split over "
            "the 8 batch shards") in line
    assert "of mesh data=" in line
