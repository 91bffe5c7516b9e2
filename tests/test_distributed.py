"""r1jax.distributed, dry: from faked SLURM / Kubernetes / TPU environments, the coordinator,
process count, id and local devices each process would start with; and that every
jax.distributed.initialize argument is stated. Nothing here starts a runtime."""

import inspect
import os
import subprocess
import sys

import pytest

from r1jax import distributed as dist
from r1jax.distributed import DistributedError, detect

# One node of R1's cluster inside `srun`: 64 nodes, one task per node, 8 GPUs each.
SLURM_64x8 = {
    "SLURM_JOB_ID": "912345", "SLURM_STEP_NODELIST": "h800-[017-080]", "SLURM_JOB_NODELIST": "h800-[017-080]",
    "SLURM_NTASKS": "64", "SLURM_PROCID": "37", "SLURM_LOCALID": "0", "SLURM_NNODES": "64",
    "SLURM_STEP_NUM_NODES": "64", "SLURM_NTASKS_PER_NODE": "1", "SLURM_GPUS_ON_NODE": "8",
}


def test_slurm_one_process_per_node_drives_all_eight_gpus():
    spec = detect(SLURM_64x8)
    # JAX's port rule: job id mod 4096 in the top of the ephemeral range, the same on every node.
    assert spec.coordinator_address == f"h800-017:{912345 % 4096 + 61440}"
    assert (spec.num_processes, spec.process_id, spec.source) == (64, 37, "slurm")
    assert spec.local_device_ids == list(range(8))  # JAX's own detection would give [0]


def test_slurm_several_tasks_per_node_split_the_gpus():
    env = {**SLURM_64x8, "SLURM_NTASKS": "128", "SLURM_PROCID": "5", "SLURM_LOCALID": "1",
           "SLURM_NTASKS_PER_NODE": "2", "R1JAX_COORDINATOR_PORT": "7000"}
    spec = detect(env)
    assert spec.coordinator_address == "h800-017:7000" and spec.num_processes == 128
    assert spec.local_device_ids == [4, 5, 6, 7]
    # SLURM already bound each task's GPUs (--gpus-per-task): every visible one.
    bound = {**env, "CUDA_VISIBLE_DEVICES": "4,5,6,7"}
    assert detect(bound).local_device_ids == [0, 1, 2, 3]
    # Without a GPU count: one GPU per task (JAX's convention).
    no_count = {k: v for k, v in env.items() if k != "SLURM_GPUS_ON_NODE"}
    assert detect(no_count).local_device_ids == [1]


@pytest.mark.parametrize("nodelist, host", [
    ("node001", "node001"), ("node001,gpu7", "node001"), ("gpu[003-010,012],cpu1", "gpu003"),
    ("a[7,9-11]", "a7"), ("dgx-[1-4]", "dgx-1")])
def test_first_slurm_host(nodelist, host):
    assert dist.first_slurm_host(nodelist) == host


def test_slurm_outside_srun_and_single_task_are_one_process():
    batch_script = {k: v for k, v in SLURM_64x8.items() if k not in ("SLURM_PROCID", "SLURM_LOCALID")}
    assert detect(batch_script) is None
    assert detect({**SLURM_64x8, "SLURM_NTASKS": "1", "SLURM_PROCID": "0"}) is None


def test_kubernetes_indexed_job_takes_the_process_id_from_the_completion_index():
    env = {"R1JAX_COORDINATOR": "r1jax-0.r1jax", "R1JAX_NUM_PROCESSES": "4", "JOB_COMPLETION_INDEX": "3",
           "R1JAX_LOCAL_DEVICE_IDS": "0-7"}
    spec = detect(env)
    assert spec.coordinator_address == f"r1jax-0.r1jax:{dist.DEFAULT_PORT}"
    assert (spec.num_processes, spec.process_id, spec.source) == (4, 3, "kubernetes")
    assert spec.local_device_ids == list(range(8))


def test_explicit_flags_win_over_the_environment():
    spec = detect(SLURM_64x8, coordinator="10.0.0.1:1234", num_processes=2, process_id=1, local_device_ids="0,1")
    assert spec == dist.ClusterSpec("10.0.0.1:1234", 2, 1, [0, 1], "explicit")


def test_tpu_pod_hosts_and_slices():
    env = {"TPU_WORKER_ID": "2", "TPU_WORKER_HOSTNAMES": "t-w0,t-w1,t-w2,t-w3"}
    spec = detect(env)
    assert spec == dist.ClusterSpec(f"t-w0:{dist.TPU_PORT}", 4, 2, None, "tpu")  # None: every chip
    two_slices = {**env, "MEGASCALE_NUM_SLICES": "2", "MEGASCALE_SLICE_ID": "1",
                  "MEGASCALE_COORDINATOR_ADDRESS": "s0-w0:8080"}
    spec = detect(two_slices)
    assert (spec.coordinator_address, spec.num_processes, spec.process_id) == (f"s0-w0:{dist.TPU_PORT}", 8, 6)
    assert detect({"TPU_WORKER_ID": "0", "TPU_WORKER_HOSTNAMES": "only-host"}) is None  # one host


def test_nothing_detected_is_one_process():
    assert detect({"HOME": "/root", "SLURM_JOB_ID": "1"}) is None


@pytest.mark.parametrize("env, culprit", [
    ({"R1JAX_COORDINATOR": "h:1", "R1JAX_NUM_PROCESSES": "2"}, "R1JAX_PROCESS_ID"),
    ({"R1JAX_NUM_PROCESSES": "2", "R1JAX_PROCESS_ID": "0"}, "R1JAX_COORDINATOR"),
    ({"R1JAX_COORDINATOR": "h:1", "R1JAX_NUM_PROCESSES": "2", "R1JAX_PROCESS_ID": "2"}, "outside 0..1"),
    ({"R1JAX_COORDINATOR": "h:1", "R1JAX_NUM_PROCESSES": "two", "R1JAX_PROCESS_ID": "0"}, "'two'"),
    ({"R1JAX_COORDINATOR": "h:port", "R1JAX_NUM_PROCESSES": "2", "R1JAX_PROCESS_ID": "0"}, "port"),
    ({"R1JAX_COORDINATOR": "h", "R1JAX_NUM_PROCESSES": "2", "R1JAX_PROCESS_ID": "0",
      "R1JAX_LOCAL_DEVICE_IDS": "0,0"}, "distinct"),
    ({"TPU_WORKER_ID": "4", "TPU_WORKER_HOSTNAMES": "a,b"}, "TPU_WORKER_ID=4"),
])
def test_bad_cluster_descriptions_name_the_culprit(env, culprit):
    with pytest.raises(DistributedError, match=culprit):
        detect(env)


def test_every_initialize_argument_is_stated_and_detection_is_off():
    import jax

    spec = detect(SLURM_64x8)
    args = dist.initialize_arguments(spec, dist.Timeouts(heartbeat_s=7, shutdown_s=9, init_s=11))
    # A new jax.distributed.initialize argument fails this test until r1jax states it.
    assert set(args) == set(inspect.signature(jax.distributed.initialize).parameters)
    assert args["cluster_detection_method"] == "deactivate"
    assert (args["heartbeat_timeout_seconds"], args["shutdown_timeout_seconds"], args["initialization_timeout"]) \
        == (7, 9, 11)
    assert args["local_device_ids"] == list(range(8))
    assert args["coordinator_bind_address"] == f"[::]:{spec.coordinator_address.rsplit(':', 1)[1]}"
    local = dist.initialize_arguments(dist.ClusterSpec("127.0.0.1:5555", 2, 0, [0], "local"), dist.Timeouts())
    assert local["coordinator_bind_address"] == "127.0.0.1:5555"  # tests touch loopback only


def test_timeouts_from_flags_and_environment():
    assert dist.timeouts_from({}) == dist.Timeouts(dist.HEARTBEAT_TIMEOUT_S, dist.SHUTDOWN_TIMEOUT_S,
                                                   dist.INIT_TIMEOUT_S)
    t = dist.timeouts_from({"R1JAX_HEARTBEAT_TIMEOUT": "5", "R1JAX_SHUTDOWN_TIMEOUT": "6"}, shutdown_s=8)
    assert (t.heartbeat_s, t.shutdown_s) == (5, 8)
    with pytest.raises(DistributedError, match="R1JAX_HEARTBEAT_TIMEOUT"):
        dist.timeouts_from({"R1JAX_HEARTBEAT_TIMEOUT": "0"})


def test_strip_flag():
    argv = ["--processes", "4", "--devices", "2", "--processes=3", "mesh", "mesh.dcn={data: 4}"]
    assert dist.strip_flag(argv, "--processes") == ["--devices", "2", "mesh", "mesh.dcn={data: 4}"]


def test_launcher_scripts_are_valid_shell():
    root = os.path.join(os.path.dirname(__file__), "..", "launch")
    scripts = [os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs if f.endswith((".sh", ".sbatch"))]
    assert len(scripts) >= 4
    for s in scripts:
        r = subprocess.run(["bash", "-n", s], capture_output=True, text=True)
        assert r.returncode == 0, f"{s}: {r.stderr}"


def test_detect_reads_the_process_environment():
    """As srun starts it on node 3 of 64: one process per node driving all 8 GPUs."""
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}, **SLURM_64x8,
           "SLURM_PROCID": "3", "JAX_PLATFORMS": "cpu"}
    code = ("from r1jax.distributed import detect; s = detect(); "
            "print(s.coordinator_address, s.num_processes, s.process_id, s.local_device_ids)")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip().split(maxsplit=3) == [f"h800-017:{912345 % 4096 + 61440}", "64", "3", str(list(range(8)))]


def test_kubernetes_manifest_wires_every_pod():
    """The shipped indexed Job, as its pod with completion index 2 sees it."""
    import yaml

    path = os.path.join(os.path.dirname(__file__), "..", "launch", "k8s", "indexed-job.yaml")
    service, job = list(yaml.safe_load_all(open(path)))
    container = job["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e["value"] for e in container["env"]}
    spec = detect({**env, "JOB_COMPLETION_INDEX": "2"})
    # Pod 0 of an indexed Job is <job>-0, reachable through the headless Service (its subdomain).
    host, port = spec.coordinator_address.split(":")
    assert host == f"{job['metadata']['name']}-0.{service['metadata']['name']}"
    assert job["spec"]["template"]["spec"]["subdomain"] == service["metadata"]["name"]
    assert int(port) == service["spec"]["ports"][0]["port"]
    assert spec.num_processes == job["spec"]["completions"] == job["spec"]["parallelism"]
    assert spec.process_id == 2 and spec.source == "kubernetes"
    assert len(spec.local_device_ids) == container["resources"]["limits"]["nvidia.com/gpu"]


def test_rows_of_global_arrays_on_one_process(devices):
    """One code path for one and many processes: local_rows reads addressable shards once
    each (replicated ones too), gather_rows/all_rows rebuild the whole array, put_global
    writes only the shards a process holds."""
    import jax
    import numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    mesh = Mesh(np.asarray(devices).reshape(4, 2), ("data", "tensor"))
    x = np.arange(48, dtype=np.float32).reshape(8, 6)
    for spec in (P("data"), P(("data", "tensor")), P(None)):
        a = dist.put_global(x, NamedSharding(mesh, spec))
        assert a.sharding.spec == spec
        ids, values = dist.local_rows(a)
        np.testing.assert_array_equal(ids, np.arange(8))
        np.testing.assert_array_equal(values, x)
        np.testing.assert_array_equal(dist.all_rows(a), x)
    np.testing.assert_array_equal(dist.gather_rows([2, 0, 1], x[[2, 0, 1]], 3), x[:3])
    with pytest.raises(RuntimeError, match="1 of 4 rows are held by no process"):
        dist.gather_rows([0, 1, 2], x[:3], 4)
    with pytest.raises(ValueError, match="non-row axis"):
        dist.local_rows(dist.put_global(x, NamedSharding(mesh, P("data", "tensor"))))
    assert dist.sum_across_processes({"n": 3}) == {"n": 3}
    assert jax.process_count() == 1 and dist.mesh_process_report(mesh) == []
