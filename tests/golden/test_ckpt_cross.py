"""A checkpoint written on 8 CPU devices in fp32 restores onto 3 devices in bf16 (values the
bf16 cast of the saved ones, every shard on the restoring backend). On a GPU or TPU machine
benchmarks/device_check.sh runs the same restore on the accelerator."""

import json
import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))


def _run(action, d, devices, *extra):
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
    out = subprocess.run([sys.executable, os.path.join(HERE, "ckpt_cross.py"), action, str(d),
                          *extra], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.subprocess
def test_checkpoint_restores_on_another_device_count_and_dtype(tmp_path):
    w = _run("write", tmp_path, 8)
    assert w["devices"] == 8
    r = _run("restore", tmp_path, 3, "--dtype", "bfloat16")
    assert r["ok"] and r["devices"] == 3 and r["dtype"] == "bfloat16" and r["leaves"] > 5
