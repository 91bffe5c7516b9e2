"""The command line: every command explains itself, bad input is one line naming the culprit."""

import os
import subprocess
import sys

import pytest

from r1jax.cli import build_parser, main

ROOT = os.path.join(os.path.dirname(__file__), "..")


def test_help_explains_every_command(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    top = capsys.readouterr().out
    for cmd in ("train", "eval", "sample", "mesh", "ckpt"):
        assert cmd in top
    for argv in (["train", "-h"], ["eval", "-h"], ["sample", "-h"], ["mesh", "-h"], ["ckpt", "inspect", "-h"],
                 ["ckpt", "export-hf", "-h"]):
        with pytest.raises(SystemExit):
            main(argv)
        text = capsys.readouterr().out
        assert len(text.splitlines()) > 3 and "usage: r1jax" in text


def test_config_and_overrides_are_separated():
    from r1jax.cli import _split_config

    args = build_parser().parse_args(["train", "train.steps=3", "run.dir=x"])
    assert _split_config(args) == ([], ["train.steps=3", "run.dir=x"])
    args = build_parser().parse_args(["train", "configs/r1_zero.yaml", "train.steps=3"])
    assert _split_config(args) == (["configs/r1_zero.yaml"], ["train.steps=3"])
    # Several files merge in order (the README's mesh example: a mesh file, then a model file).
    args = build_parser().parse_args(["mesh", "configs/mesh/h800x512.yaml", "configs/model/tiny.yaml", "x=1"])
    assert _split_config(args) == (["configs/mesh/h800x512.yaml", "configs/model/tiny.yaml"], ["x=1"])


def _run(*argv):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
    return subprocess.run([sys.executable, "-m", "r1jax.cli", *argv], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.subprocess
def test_bad_input_is_one_line_naming_the_culprit(tmp_path):
    out = _run("train", "grpo.bta=0.1", f"run.dir={tmp_path}/r")
    assert out.returncode == 1
    err = out.stderr.strip().splitlines()
    assert len(err) == 1 and "grpo.bta" in err[0] and "beta" in err[0]
    out = _run("train", "/no/such/config.yaml")
    assert out.returncode == 1 and "config file not found: /no/such/config.yaml" in out.stderr
    out = _run("--devices", "8", "mesh", "configs/mesh/h800x512.yaml")
    assert out.returncode == 1
    assert "(64, 8, 1)" in out.stderr and "512" in out.stderr and "8 are available" in out.stderr


@pytest.mark.subprocess
def test_mesh_command_emulates_nodes():
    out = _run("--devices", "16", "mesh", "configs/model/tiny.yaml", "mesh.ici.fsdp=4", "mesh.dcn.data=4")
    assert out.returncode == 0, out.stderr
    assert "mesh data=4 x fsdp=4 x tensor=1 on 16 cpu devices" in out.stdout
    assert "node 1: devices [4, 5, 6, 7]" in out.stdout
    assert "layers/mlp/up" in out.stdout and "'fsdp'" in out.stdout


@pytest.mark.subprocess
def test_compile_command_reports_memory_and_collectives_for_emulated_nodes():
    import json

    out = _run("--devices", "4", "compile", "configs/model/tiny.yaml", "mesh.ici.fsdp=2", "mesh.dcn.data=2",
               "grpo.beta=0", "train.prompts_per_rollout=2", "grpo.group_size=4", "grpo.num_minibatches=2",
               "--prompt-len", "8", "--completion-len", "4")
    assert out.returncode == 0, out.stderr
    assert "compiled for 4 cpu devices; mesh data=2 x fsdp=2 x tensor=1" in out.stdout
    assert "all-gather" in out.stdout and "peak_bytes" in out.stdout
    rep = json.loads(out.stdout.strip().splitlines()[-1])
    assert rep["batch"]["sequences"] == 4 and rep["batch"]["prompt_len"] == 8
    assert rep["update"]["argument_bytes"] > 0 and rep["update"]["flops"] > 0
    assert rep["update"]["collectives"]["all-gather"]["ici_bytes"] > 0  # fsdp=2 inside a node
    assert "reference" not in rep  # beta = 0: no reference model


@pytest.mark.subprocess
def test_compile_command_without_libtpu_says_so_in_one_line():
    from r1jax.aot import tpu_available

    if tpu_available()[0]:
        pytest.skip("libtpu is installed: the --topology path is covered by tests/test_aot.py")
    out = _run("compile", "configs/model/tiny.yaml", "--topology", "v5p:2x2x1")
    assert out.returncode == 1
    err = out.stderr.strip().splitlines()
    assert len(err) == 1 and "v5p:2x2x1" in err[0] and "libtpu" in err[0]


def test_compile_command_explains_itself(capsys):
    with pytest.raises(SystemExit):
        main(["compile", "-h"])
    text = capsys.readouterr().out
    assert "usage: r1jax compile" in text and "--topology" in text and "--slices" in text
    assert main(["compile", "configs/model/tiny.yaml", "--slices", "2"]) == 1
    assert "--slices needs --topology" in capsys.readouterr().err
