"""A checkpoint crossing backends, device counts and dtypes.

    python tests/golden/ckpt_cross.py write DIR     # on CPU: tiny-model params (fp32, fsdp over
                                                    # this process's devices) + expected.npz
    python tests/golden/ckpt_cross.py restore DIR [--dtype bfloat16]
        # on the default backend (CPU, GPU or TPU), fsdp over ALL its devices, cast to --dtype;
        # prints one JSON line {backend, devices, dtype, max_abs_error, ok}

Used by tests/golden/test_ckpt_cross.py (CPU, 8 devices -> 3 devices, fp32 -> bf16) and by
benchmarks/device_check.sh (CPU -> GPU).
"""

import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _params(mesh):
    from r1jax import mesh as mesh_lib
    from r1jax.config import load_config
    from r1jax.models import build

    mcfg = load_config(os.path.join(ROOT, "configs/model/tiny.yaml"), []).model
    return build.build_model(mcfg, mesh, mesh_lib.TRAIN_RULES, seed=3)[1]


def _mesh():
    import jax

    from r1jax import mesh as mesh_lib
    from r1jax.config import MeshConfig

    return mesh_lib.make_mesh(MeshConfig(ici={"fsdp": len(jax.devices())}), jax.devices())


def write(d: str) -> None:
    import jax
    import numpy as np
    from flax import traverse_util

    from r1jax.checkpoint import Checkpointer

    params = _params(_mesh())
    with Checkpointer(os.path.join(d, "checkpoints")) as ck:
        ck.save(1, {"params": params})
        ck.wait()
    flat = traverse_util.flatten_dict(jax.device_get(params), sep="/")
    np.savez(os.path.join(d, "expected.npz"), **{k: np.asarray(v) for k, v in flat.items()})
    print(json.dumps({"wrote": d, "devices": len(jax.devices()), "backend": jax.default_backend()}))


def restore(d: str, dtype: str) -> int:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import traverse_util

    from r1jax import checkpoint as ckpt

    mesh = _mesh()
    abstract = jax.eval_shape(lambda: _params(mesh))
    shardings = jax.tree.map(lambda a: a.sharding, _abstract_shardings(mesh))
    target = {"params": jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, jnp.dtype(dtype),
                                                                        sharding=s),
                                     abstract, shardings)}
    with ckpt.Checkpointer(os.path.join(d, "checkpoints"), read_only=True) as ck:
        r = ck.restore(target)
    got = traverse_util.flatten_dict(r.state["params"], sep="/")
    expected = np.load(os.path.join(d, "expected.npz"))
    err, where = 0.0, set()
    for k, v in got.items():
        assert v.dtype == jnp.dtype(dtype), (k, v.dtype)
        where |= {dev.platform for dev in v.sharding.device_set}
        ref = jnp.asarray(expected[k]).astype(dtype).astype(np.float32)
        err = max(err, float(np.max(np.abs(np.asarray(v.astype(np.float32)) - np.asarray(ref)))))
    ok = err == 0.0 and where == {jax.default_backend()}
    print(json.dumps({"backend": jax.default_backend(), "devices": len(jax.devices()),
                      "dtype": dtype, "leaves": len(got), "max_abs_error": err, "ok": ok}))
    return 0 if ok else 1


def _abstract_shardings(mesh):
    from r1jax import mesh as mesh_lib
    from r1jax.config import load_config
    from r1jax.models import build

    mcfg = load_config(os.path.join(ROOT, "configs/model/tiny.yaml"), []).model
    return build.abstract_model(mcfg, mesh, mesh_lib.TRAIN_RULES)[1]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("action", choices=("write", "restore"))
    ap.add_argument("dir")
    ap.add_argument("--dtype", default="bfloat16")
    args = ap.parse_args(argv)
    sys.path.insert(0, ROOT)
    if args.action == "write":
        write(args.dir)
        return 0
    return restore(args.dir, args.dtype)


if __name__ == "__main__":
    sys.exit(main())
