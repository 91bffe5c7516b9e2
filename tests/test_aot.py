"""AOT compilation of the GRPO update: memory, FLOPs and collectives from abstract shapes."""

import dataclasses

import numpy as np
import pytest

from r1jax import aot
from r1jax.config import MeshConfig, load_config

FAST = {"xla_backend_optimization_level": 0}
# Scanned layers, so that the trip-count accounting of collectives inside loops is exercised.
SMALL = ["train.prompts_per_rollout=4", "grpo.group_size=4", "grpo.num_minibatches=2",
         "data.max_prompt_len=16", "sampler.max_new_tokens=8", "sampler.prompt_buckets=[16]",
         "model.scan_layers=true"]


def _cfg(ici, dcn=None, extra=()):
    cfg = load_config("configs/model/tiny.yaml", SMALL + list(extra))
    return dataclasses.replace(cfg, mesh=MeshConfig(ici=dict(ici), dcn=dict(dcn or {})))


@pytest.fixture(scope="module")
def reports(devices):
    """One compile per layout, shared by the tests below (each compile takes seconds)."""
    return {
        "fsdp8": aot.compile_update(_cfg({"fsdp": 8}), compiler_options=FAST),
        # 4 emulated nodes of 2 devices: data inside a node, fsdp across nodes.
        "data2_fsdp4": aot.compile_update(_cfg({"data": 2}, {"fsdp": 4}), compiler_options=FAST,
                                          reference=False),
        "one": aot.compile_update(_cfg({"fsdp": 1}), devices=devices[:1], compiler_options=FAST,
                                  reference=False),
    }


def test_report_has_positive_memory_and_flops(reports):
    r = reports["fsdp8"]
    assert r["devices"] == 8 and r["mesh"] == {"data": 1, "fsdp": 8, "tensor": 1}
    assert r["batch"] == {"sequences": 8, "prompt_len": 16, "completion_len": 8,
                          "micro_batches": 1, "sharded_over": ["fsdp"]}
    for name in ("update", "reference"):
        u = r[name]
        for key in ("argument_bytes", "temp_bytes", "peak_bytes", "flops", "bytes_accessed"):
            assert u[key] > 0, (name, key)
        assert u["peak_bytes"] >= u["argument_bytes"]
    # The update's arguments hold at least this device's shard of the train state.
    assert r["update"]["argument_bytes"] >= r["params"]["state_per_device_bytes"]


def test_fsdp_gathers_parameters_and_one_device_has_no_collectives(reports):
    fsdp = reports["fsdp8"]["update"]["collectives"]
    assert fsdp["all-gather"]["count"] > 0 and 8 in fsdp["all-gather"]["group_sizes"]
    # Gradients of fsdp-sharded parameters are reduced across the 8 devices.
    assert fsdp["all-reduce"]["count"] + fsdp["reduce-scatter"]["count"] > 0
    # The scanned layers' gathers run once per layer: executions exceed instructions.
    assert fsdp["all-gather"]["executions"] > fsdp["all-gather"]["count"]
    one = reports["one"]["update"]["collectives"]["total"]
    assert one["count"] == 0 and one["traffic_bytes"] == 0


def test_per_device_bytes_shrink_as_fsdp_grows(reports):
    p1, p4, p8 = (reports[k]["params"] for k in ("one", "data2_fsdp4", "fsdp8"))
    assert p1["total_bytes"] == p4["total_bytes"] == p8["total_bytes"]
    assert p1["per_device_bytes"] == p1["total_bytes"]
    assert p8["per_device_bytes"] < p4["per_device_bytes"] < p1["per_device_bytes"]
    assert p8["sharded_enough"] and p4["sharded_enough"]
    a1, a4, a8 = (reports[k]["update"]["argument_bytes"] for k in ("one", "data2_fsdp4", "fsdp8"))
    assert a8 < a4 < a1


def test_traffic_is_attributed_to_links_inside_and_across_nodes(reports):
    # ici data=2 (2 devices per node) x dcn fsdp=4: the parameter gathers run over fsdp, i.e.
    # across nodes; the loss sums over the whole batch include the in-node data axis.
    c = reports["data2_fsdp4"]["update"]["collectives"]
    assert reports["data2_fsdp4"]["devices_per_node"] == 2
    assert c["all-gather"]["dcn_bytes"] > 10 * c["all-gather"]["ici_bytes"]
    assert c["total"]["unknown_bytes"] == 0
    f = reports["fsdp8"]["update"]["collectives"]["total"]
    assert f["ici_bytes"] > 0 and f["dcn_bytes"] == 0  # one node: nothing crosses


def test_collectives_parser_on_handwritten_hlo():
    hlo = """HloModule m

%body (p: (s32[], f32[4])) -> (s32[], f32[4]) {
  %ag = f32[8,4]{1,0} all-gather(f32[2,4]{1,0} %x), channel_id=1, replica_groups={{0,1,2,3},{4,5,6,7}}, dimensions={0}, use_global_device_ids=true
  %rs = f32[2]{0} reduce-scatter(f32[8]{0} %y), channel_id=2, replica_groups=[2,4]<=[4,2]T(1,0), dimensions={0}, to_apply=%add
}

%cond (p: (s32[], f32[4])) -> pred[] {
  %c = pred[] constant(true)
}

%body2 (p: (s32[], f32[4])) -> (s32[], f32[4]) {
  %cp = f32[4]{0} collective-permute(%x), channel_id=4, source_target_pairs={{0,4},{4,0}}
}

%cond2 (p: (s32[], f32[4])) -> pred[] {
  %k = s32[] constant(5)
  %i = s32[] get-tuple-element(%p), index=0
  ROOT %lt = pred[] compare(%i, %k), direction=LT
}

ENTRY %main (a: f32[4]) -> f32[4] {
  %w = (s32[], f32[4]{0}) while(%t), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"3"}}
  %ar = bf16[16]{0} all-reduce(%a), channel_id=3, replica_groups=mesh['x'=2,'y'=4] {'x'}, to_apply=%add
  %w2 = (s32[], f32[4]{0}) while(%t2), condition=%cond2, body=%body2
}
"""
    node = [i // 4 for i in range(8)]  # 2 nodes of 4
    c = aot.collectives_from_hlo(hlo, node)
    ag, rs, ar = c["all-gather"], c["reduce-scatter"], c["all-reduce"]
    assert (ag["count"], ag["executions"]) == (1, 3.0)
    assert ag["bytes"] == 3 * 8 * 4 * 4 and ag["ici_bytes"] == pytest.approx(3 * 0.75 * 128)
    # iota groups [2,4]<=[4,2]T(1,0) = {0,2,4,6},{1,3,5,7}: they span both nodes.
    assert rs["bytes"] == 3 * 2 * 4 * 4 and rs["dcn_bytes"] == pytest.approx(3 * 0.75 * 32)
    # mesh groups over x in a 2x4 mesh: {0,4},{1,5},...: across nodes; ring all-reduce 2(S-1)/S.
    assert ar["executions"] == 1 and ar["dcn_bytes"] == pytest.approx(2 * 0.5 * 32)
    # No recorded trip count (TPU): read it off the loop condition (i < 5); a permute across
    # nodes moves its whole buffer once per run.
    cp = c["collective-permute"]
    assert cp["executions"] == 5 and cp["dcn_bytes"] == 5 * 16
    assert c["total"]["unknown_bytes"] == 0
    groups, size = aot.parse_replica_groups(
        "replica_groups=mesh['a'=4,'b'=1,'c'=2], device_ids=([2,4]T(1,0)) {'a'}, dimensions={0}")
    assert size == 4 and groups.tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]]
    groups, size = aot.parse_replica_groups("replica_groups=mesh['x'=8] {'x':(2)2}")
    # Sub-axis (pre-size 2, size 2) of x: the middle factor of x = [2, 2, 2].
    assert size == 2 and groups.tolist() == [[0, 2], [1, 3], [4, 6], [5, 7]]


def test_bad_inputs_fail_with_one_clear_line(devices):
    with pytest.raises(ValueError, match="micro_batches"):
        aot.compile_update(_cfg({"fsdp": 8}, extra=["grpo.micro_batches=3"]))
    with pytest.raises(ValueError, match="batch_sequences"):
        aot.compile_update(_cfg({"fsdp": 8}), batch_sequences=0)
    with pytest.raises(ValueError, match="needs 16 devices"):
        aot.compile_update(_cfg({"fsdp": 16}))


def _require_libtpu():
    """TPU compiles need libtpu (the `tpu` extra). CI installs it, so there its absence fails."""
    import os

    ok, why = aot.tpu_available()
    if not ok:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"CI must compile for TPU topologies: {why}")
        pytest.skip(f"no TPU AOT: {why}")


def test_compile_for_tpu_slices_without_a_tpu():
    _require_libtpu()
    # Two v5p 2x2x1 slices: fsdp=4 on each slice's ICI, data=2 across slices over DCN.
    rep = aot.compile_update(_cfg({"fsdp": 4}, {"data": 2}), topology="v5p:2x2x1", slices=2,
                             reference=False)
    assert rep["platform"] == "tpu" and rep["devices"] == 8 and "v5" in rep["device_kind"].lower()
    u = rep["update"]
    assert u["argument_bytes"] > 0 and u["flops"] > 0 and u["peak_bytes"] > 0
    c = u["collectives"]
    assert c["all-gather"]["ici_bytes"] > 0  # parameter gathers stay inside a slice
    assert c["total"]["dcn_bytes"] > 0  # the gradient reduction over data crosses slices
    assert c["total"]["unknown_bytes"] == 0
    with pytest.raises(ValueError, match="topology"):
        aot.compile_update(_cfg({"fsdp": 4}), topology="v99:1x1")


def test_tpu_availability_follows_libtpu_and_its_path(monkeypatch, tmp_path):
    import importlib.util

    monkeypatch.delenv("TPU_LIBRARY_PATH", raising=False)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    ok, why = aot.tpu_available()
    assert not ok and "libtpu is not installed" in why
    with pytest.raises(RuntimeError, match="--topology v5p:2x2x1: libtpu"):
        aot.topology_devices("v5p:2x2x1")
    so = tmp_path / "libtpu.so"
    so.write_bytes(b"")
    monkeypatch.setenv("TPU_LIBRARY_PATH", str(so))
    assert aot.tpu_available() == (True, "")
