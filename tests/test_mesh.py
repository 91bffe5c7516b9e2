import json
import os
import subprocess
import sys

import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from r1jax import mesh as mesh_lib
from r1jax.config import MeshConfig, ModelConfig
from r1jax.models import create


def test_fill_axis_and_shapes(devices):
    m = mesh_lib.make_mesh(MeshConfig(ici={"fsdp": -1}))
    assert dict(m.shape) == {"data": 1, "fsdp": 8, "tensor": 1}
    m = mesh_lib.make_mesh(MeshConfig(ici={"fsdp": 2, "tensor": 2}, dcn={"data": 2}))
    assert dict(m.shape) == {"data": 2, "fsdp": 2, "tensor": 2}


def test_emulated_nodes_are_consecutive_devices(devices):
    # 2 "nodes" of 4: the dcn (data) axis must separate devices 0-3 from 4-7, so that the
    # fast ici axes (fsdp x tensor) stay inside one node.
    m = mesh_lib.make_mesh(MeshConfig(ici={"fsdp": 2, "tensor": 2}, dcn={"data": 2}))
    ids = np.vectorize(lambda d: d.id)(m.devices)
    assert sorted(ids[0].ravel()) == [0, 1, 2, 3]
    assert sorted(ids[1].ravel()) == [4, 5, 6, 7]
    # An axis split across both levels: dcn part outer, ici part inner.
    m = mesh_lib.make_mesh(MeshConfig(ici={"fsdp": 4}, dcn={"fsdp": 2}))
    ids = np.vectorize(lambda d: d.id)(m.devices)[0, :, 0]
    assert list(ids[:4]) == [0, 1, 2, 3] and list(ids[4:]) == [4, 5, 6, 7]


def test_mesh_that_does_not_fit_names_both_shapes(devices):
    with pytest.raises(ValueError) as e:
        mesh_lib.make_mesh(MeshConfig(ici={"fsdp": 8}, dcn={"data": 64}))
    msg = str(e.value)
    assert "(64, 8, 1)" in msg and "512" in msg and "8 are available" in msg
    with pytest.raises(ValueError, match="3 devices, which does not divide the 8"):
        mesh_lib.make_mesh(MeshConfig(ici={"fsdp": -1, "tensor": 3}))
    with pytest.raises(ValueError, match="only one mesh axis may be -1"):
        mesh_lib.make_mesh(MeshConfig(ici={"fsdp": -1, "tensor": -1}))


def test_unknown_axis_and_bad_rules(devices):
    with pytest.raises(ValueError, match="unknown axis 'model'.*data, fsdp, tensor"):
        mesh_lib.make_mesh(MeshConfig(ici={"model": 8}))
    with pytest.raises(ValueError, match="rule 'embed' -> 'fsd' names an unknown mesh axis"):
        mesh_lib.train_rules(MeshConfig(train_rules={"embed": ["fsd"]}))
    rules = mesh_lib.train_rules(MeshConfig(train_rules={"mlp": ["fsdp", "tensor"]}))
    assert dict(rules)["mlp"] == ("fsdp", "tensor")


def test_logical_to_spec_divisibility_and_reuse(devices):
    m = mesh_lib.make_mesh(MeshConfig(ici={"fsdp": 4, "tensor": 2}))
    rules = mesh_lib.TRAIN_RULES
    assert mesh_lib.logical_to_spec(("embed", "mlp"), rules, (64, 96), m) == P("fsdp", "tensor")
    # 3 kv heads cannot be split over tensor=2: replicated rather than failing.
    assert mesh_lib.logical_to_spec(("embed", "kv_heads", "head_dim"), rules, (64, 3, 16), m) == P("fsdp", None, None)
    # batch takes data x fsdp; data has size 1 here so only fsdp remains.
    assert mesh_lib.logical_to_spec(("batch", "length"), rules, (8, 5), m) == P("fsdp", None)


def test_params_created_sharded_as_rules_say(devices):
    cfg = ModelConfig(vocab_size=64, hidden_size=64, intermediate_size=96, num_layers=2,
                      num_heads=4, num_kv_heads=2)
    m = mesh_lib.make_mesh(MeshConfig(ici={"fsdp": 4, "tensor": 2}))
    model = create(cfg, mesh=m, rules=mesh_lib.TRAIN_RULES)
    from flax import nnx

    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    assert params["layers"]["mlp"]["gate"].sharding.spec == P(None, "fsdp", "tensor")
    assert params["layers"]["attn"]["q"].sharding.spec == P(None, "fsdp", "tensor", None)
    assert params["layers"]["attn"]["o"].sharding.spec == P(None, "tensor", None, "fsdp")
    assert params["embed"].sharding.spec == P("tensor", "fsdp")
    # Each device holds 1/8 of the MLP weight: really split, not replicated.
    shard = params["layers"]["mlp"]["gate"].addressable_shards[0].data
    assert shard.shape == (2, 16, 48)
    # Sampling layout: embed gathered, tensor split kept.
    model_s = create(cfg, mesh=m, rules=mesh_lib.SAMPLE_RULES)
    ps = nnx.to_pure_dict(nnx.state(model_s, nnx.Param))
    assert ps["layers"]["mlp"]["gate"].sharding.spec == P(None, None, "tensor")


@pytest.mark.subprocess
def test_h800x512_on_512_fake_devices():
    code = r"""
import json, os
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=512"
os.environ["JAX_PLATFORMS"] = "cpu"
import numpy as np
from r1jax.config import load_config
from r1jax.mesh import make_mesh
cfg = load_config(os.path.join("configs", "mesh", "h800x512.yaml"))
m = make_mesh(cfg.mesh)
ids = np.vectorize(lambda d: d.id)(m.devices)
nodes_ok = all(sorted(ids[n, :, 0]) == list(range(8 * n, 8 * n + 8)) for n in range(64))
print(json.dumps({"shape": dict(m.shape), "nodes_ok": bool(nodes_ok)}))
"""
    root = os.path.join(os.path.dirname(__file__), "..")
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True,
                         timeout=300, env={**os.environ, "XLA_FLAGS": ""})
    assert out.returncode == 0, out.stderr[-2000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["shape"] == {"data": 64, "fsdp": 8, "tensor": 1}
    assert res["nodes_ok"]


def test_expert_axis_rides_inside_a_node_in_both_layouts(devices):
    """Experts split over fsdp (whole experts per device, their weights not split again along
    embed); dense models have no expert axis, so their layout is unchanged."""
    m = mesh_lib.make_mesh(MeshConfig(ici={"fsdp": 4, "tensor": 2}))
    logical = ("layers", "expert", "embed", "mlp")
    for rules in (mesh_lib.TRAIN_RULES, mesh_lib.SAMPLE_RULES):
        assert mesh_lib.logical_to_spec(logical, rules, (2, 8, 64, 96), m) == P(None, "fsdp", None, "tensor")
    # 6 experts do not divide over 4 devices: replicated along experts, embed keeps fsdp
    assert mesh_lib.logical_to_spec(logical, mesh_lib.TRAIN_RULES, (2, 6, 64, 96), m) == P(None, None, "fsdp", "tensor")
    cfg = ModelConfig(vocab_size=64, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4, num_kv_heads=2)
    from flax import nnx

    axes = [v.get_metadata()["logical_axes"] for _, v in nnx.to_flat_state(nnx.state(create(cfg), nnx.Param))]
    assert axes and not any("expert" in a for a in axes)


def test_batch_that_does_not_split_over_the_shards_is_a_one_line_error_naming_both():
    import jax

    mesh = mesh_lib.make_mesh(MeshConfig(ici={"data": 4}, dcn={"fsdp": 2}), jax.devices()[:8])
    rules = mesh_lib.train_rules(None)
    mesh_lib.check_batch_divides(mesh, rules, {"train.prompts_per_rollout": 16})
    with pytest.raises(ValueError, match=r"^train.prompts_per_rollout = 3 does not split over the 8 "
                                         r"batch shards \(data=4 x fsdp=2 of mesh data=4 x fsdp=2 x tensor=1\)"):
        mesh_lib.check_batch_divides(mesh, rules, {"train.prompts_per_rollout": 3})
