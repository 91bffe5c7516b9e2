"""`r1jax env`: what this machine gives r1jax."""

import json

from r1jax import cli, envinfo
from r1jax.config import MeshConfig


def test_environment_reports_backend_devices_versions_and_mesh(devices):
    info = envinfo.environment(MeshConfig(ici={"fsdp": 4}, dcn={"data": 2}))
    assert info["backend"] == "cpu" and info["device_count"] == 8 and info["process_count"] == 1
    for pkg in ("jax", "flax", "optax", "orbax-checkpoint", "grain", "tensorstore"):
        assert info["versions"][pkg]
    assert info["mesh"]["shape"] == {"data": 2, "fsdp": 4, "tensor": 1}
    assert isinstance(info["libtpu"]["installed"], bool) and "present" in info["cuda"]
    bad = envinfo.environment(MeshConfig(ici={"fsdp": 16}))
    assert "needs 16 devices" in bad["mesh"]["error"]
    assert "data=2 x fsdp=4" in envinfo.format_environment(info)


def test_env_command(capsys, devices):
    assert cli.main(["env", "mesh.ici={fsdp: 8}", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["mesh"]["shape"]["fsdp"] == 8 and info["device_kind"]
    assert cli.main(["env"]) == 0
    assert "versions: jax" in capsys.readouterr().out
