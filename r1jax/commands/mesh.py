"""`r1jax mesh [CONFIG ...] [key=value ...]`: the device grid per node and every parameter's
sharding and per-device bytes (from abstract shapes: a 7B model on 512 emulated devices costs
no memory). Several CONFIGs merge in order (e.g. a mesh file and a model file)."""

from __future__ import annotations

from r1jax.commands import load_config


def run(args) -> int:
    import jax

    from r1jax.layout_report import describe_mesh

    report = describe_mesh(load_config(args))
    if jax.process_index() == 0:  # every process builds the mesh; one prints it
        print(report)
    return 0
