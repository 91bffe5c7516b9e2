"""benchmarks/device_check.sh in its CPU dry mode, so the GPU check does not rot."""

import json
import os
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
@pytest.mark.subprocess
def test_device_check_dry_run_writes_its_json(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "R1JAX_TEST_BACKEND")}
    env["OUT"] = str(tmp_path)
    proc = subprocess.run(["bash", os.path.join(ROOT, "benchmarks", "device_check.sh"), "--dry"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    s = json.load(open(tmp_path / "device_check.json"))
    assert s["ok"] and s["dry"] and set(s["exit_codes"]) >= {"env", "tests", "bench", "ckpt_write",
                                                             "ckpt_restore"}
    b = s["bench"]
    assert b["backend"] == "cpu" and b["decode_batch"] == 16
    assert 0 < b["update_mfu"] and b["decode_tokens_per_s"] > 0
    assert set(b["parts"]) == {"prefill", "decode", "reference", "update"}
    assert s["ckpt_restore"]["ok"] and s["env"]["backend"] == "cpu"
