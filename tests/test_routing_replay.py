"""Routing replay through the pipeline: the sampler records every token's experts, the update's
forward routes through them. The router's selection bias is perturbed after sampling (what the
aux-loss-free bias step does between a rollout and its updates) so its choices change while the
gate weights do not: with replay the update picks the recorded experts and reproduces the
sampler's log-probs; without it neither holds. Sharded (experts over 4 fake devices) equals
unsharded. Then the bias step and the balance loss inside a real update."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from r1jax import grpo
from r1jax import mesh as mesh_lib
from r1jax import packing
from r1jax.config import GRPOConfig, MeshConfig, SamplerConfig, load_config
from r1jax.models import moe
from r1jax.sampler import Sampler

from helpers_moe import random_model

P, G, TC = 2, 2, 6
# One prompt bucket, no compaction: one compiled rollout program per test.
FAST = {"xla_backend_optimization_level": 0}  # the forwards and the update compile faster
_SCFG = SamplerConfig(max_new_tokens=TC, temperature=1.0, prompt_buckets=[8], compact=False)


def _cfg(**moe_kw):
    # Two layers, both MoE (fewer layers to compile; the dense-layer stacking is the model's).
    cfg = load_config("configs/model/deepseek-v3-tiny.yaml").model
    return dataclasses.replace(cfg, num_mtp_layers=0, num_layers=2, moe=dataclasses.replace(
        cfg.moe, routing_replay="rollout", dense_layers=[], **moe_kw))


def _prompts():
    r = np.random.RandomState(0)
    toks = r.randint(1, 64, (P, 8)).astype(np.int32)
    mask = np.ones_like(toks)
    mask[1, :3] = 0  # one left-padded prompt
    return toks * mask, mask


@pytest.fixture(scope="module")
def rollout():
    """One sampled rollout of the tiny DeepSeek-V3 (MLA latent decode, grouped routing with
    the correction bias), its params, and the same params with a perturbed selection bias."""
    cfg = _cfg()
    model = random_model(cfg, 3)
    graphdef, params = nnx.split(model)
    params = nnx.to_pure_dict(params)
    toks, mask = _prompts()
    s = Sampler(graphdef, _SCFG, stop_at_eos=False)
    out = s.sample(params, toks, prompt_mask=mask, key=jax.random.key(1), num_samples=G)
    bias = params["moe"]["router_bias"]
    r = np.random.RandomState(7)
    moved = {**params, "moe": {**params["moe"], "router_bias": bias + jnp.asarray(
        r.normal(0, 0.3, bias.shape), jnp.float32)}}
    batch = {"prompt_ids": jnp.repeat(out.prompt_tokens, G, 0), "prompt_mask": jnp.repeat(out.prompt_mask, G, 0),
             "completion_ids": out.tokens, "prompt_routes": jnp.repeat(out.prompt_routes, G, 0),
             "completion_routes": out.routes}
    return cfg, graphdef, params, moved, out, batch, _forward_fn(graphdef)


def _forward_fn(graphdef):
    """(logp [N, Tc], routes the forward chose [MoE layers, N, Tp + Tc, K]) with and without
    replay, and the replayed side outputs, in one compiled call of the update's own forward
    (grpo._completion_logprobs)."""
    @functools.partial(jax.jit, compiler_options=FAST)
    def forward(params, batch):
        lp_r, _, aux_r = grpo._completion_logprobs(graphdef, params, batch, 1.0, replay=True)
        lp_f, _, aux_f = grpo._completion_logprobs(graphdef, params, batch, 1.0)
        return lp_r, aux_r["routes"], lp_f, aux_f["routes"], aux_r
    return forward


def _recorded(out, batch):
    """Recorded routes [MoE layers, N, Tp + Tc, K] (int32, -1 unrouted) and where they exist."""
    r = jnp.concatenate([batch["prompt_routes"], batch["completion_routes"]], axis=1)
    r = jnp.moveaxis(moe.expand_routes(r), 2, 0)
    return r, jnp.all(r >= 0, axis=-1)


def test_sampler_records_compact_routes_only_with_replay(rollout):
    cfg, graphdef, params, _, out, _, _ = rollout
    lm, k = len(moe.moe_layer_ids(cfg)), cfg.moe.num_experts_per_tok
    assert out.routes.dtype == jnp.uint8 and out.routes.shape == (P * G, TC, lm, k)
    assert out.prompt_routes.shape == (P, 8, lm, k)
    pr = np.asarray(out.prompt_routes)
    assert (pr[1, :3] == 255).all() and (pr[1, 3:] < cfg.moe.num_experts).all()  # padding unrouted
    cr = np.asarray(out.routes)
    # Token t is routed when decode step t feeds it; the last one is never fed.
    assert (cr[:, : TC - 1] < cfg.moe.num_experts).all() and (cr[:, TC - 1] == 255).all()
    # (Without replay nothing is recorded: tests/models/test_mla.py's sampler test.)


def test_replay_reproduces_the_sampler_after_the_router_moved(rollout):
    cfg, graphdef, params, moved, out, batch, _forward = rollout
    recorded, has = _recorded(out, batch)
    m = np.asarray(out.mask, bool)
    sampler_lp = np.asarray(out.logp_policy)
    # At the rollout's parameters the forward's own routing is the recorded one.
    lp_r, routes_r, lp_f, routes_f, _ = _forward(params, batch)
    assert float(moe.routing_disagreement(routes_f, recorded, has)) == 0.0
    np.testing.assert_allclose(np.asarray(lp_r)[m], sampler_lp[m], atol=2e-5)
    # The selection bias moved: the router's choices change, the gate weights do not.
    lp_r, routes_r, lp_f, routes_f, aux = _forward(moved, batch)
    np.testing.assert_array_equal(np.asarray(jnp.where(has[..., None], routes_r, -1)),
                                  np.asarray(jnp.where(has[..., None], recorded, -1)))
    np.testing.assert_allclose(np.asarray(lp_r)[m], sampler_lp[m], atol=2e-5)
    free_share = float(moe.routing_disagreement(routes_f, recorded, has))
    assert free_share > 0.1
    assert np.abs(np.asarray(lp_f)[m] - sampler_lp[m]).max() > 1e-3
    # moe/replay_disagreement: the router's own top-K on the replayed hidden states.
    replay_share = float(jnp.sum(aux["replay_differs"]) / jnp.sum(aux["replay_tokens"]))
    assert 0.1 < replay_share <= 1.0


def test_packed_routes_give_the_padded_logprobs(rollout):
    cfg, graphdef, _, moved, out, batch, _forward = rollout
    lp_r = np.asarray(_forward(moved, batch)[0])
    full = dict(batch, completion_mask=out.mask)
    plan = packing.plan(np.asarray(full["prompt_mask"]), np.asarray(out.mask))
    packed = plan.pack_batch({k: np.asarray(v) for k, v in full.items()})
    assert packed["routes"].shape == plan.shape + batch["completion_routes"].shape[2:]
    fn = jax.jit(lambda p, b: grpo._completion_logprobs(graphdef, p, b, 1.0, replay=True)[0],
                 compiler_options=FAST)
    lp_packed = plan.unpack_completion(np.asarray(fn(moved, {k: jnp.asarray(packed[k]) for k in (
        "tokens", "segment_ids", "positions", "routes")})))
    m = np.asarray(out.mask, bool)
    np.testing.assert_allclose(lp_packed[m], lp_r[m], atol=2e-5)


def test_sharded_replay_equals_unsharded(rollout):
    """The replayed forward with the batch over 2 devices and experts over 4 (expert-parallel
    dispatch): the same log-probs."""
    cfg, graphdef, params, moved, out, batch, _forward = rollout
    mesh = mesh_lib.make_mesh(MeshConfig(ici={"data": 2, "fsdp": 4}))
    train_rules = tuple(dict(mesh_lib.TRAIN_RULES, expert=("fsdp",)).items())
    fn = jax.jit(grpo._under_layout(
        lambda p, b: grpo._completion_logprobs(graphdef, p, b, 1.0, 2, replay=True)[0], mesh, train_rules),
        compiler_options=FAST)
    lp = fn(moved, batch)
    np.testing.assert_allclose(np.asarray(lp), np.asarray(_forward(moved, batch)[0]), atol=2e-5)


def test_bias_step_and_balance_loss_in_a_real_update(rollout):
    """model.moe.bias_update_gamma: each update moves the selection bias by gamma * sign(mean
    load - load) from the load its own forward measured, and the skewed load evens out.
    seq_aux_loss_coef: V3's balance loss is in the gradient (with zero advantages the policy
    loss has none, so the router, the only weight the optimiser moves here, moves through it)."""
    _, _, _, _, out, batch, _ = rollout  # its tokens; one MoE layer suffices here
    cfg = _cfg(bias_update_gamma=0.1, seq_aux_loss_coef=0.1)
    cfg = dataclasses.replace(cfg, num_layers=1, moe=dataclasses.replace(cfg.moe, routing_replay="none"))
    graphdef, params = nnx.split(random_model(cfg, 3))
    params = nnx.to_pure_dict(params)
    skew = params["moe"]["router_bias"].at[:, 0].add(0.3)  # expert 0 chosen by every token
    params = {**params, "moe": {**params["moe"], "router_bias": skew}}
    geo = grpo.Geometry(prompts_per_rollout=P, group_size=G, num_minibatches=1, inner_epochs=1,
                        micro_batches=2, minibatch_size=P * G, prompt_len=8, completion_len=TC,
                        temperature=1.0)
    labels = jax.tree_util.tree_map_with_path(
        lambda path, _: "router" if path[-1].key == "router" else "frozen", params)
    opt = optax.multi_transform({"router": optax.sgd(1.0), "frozen": optax.set_to_zero()}, labels)
    step = grpo.make_update_step(graphdef, opt, GRPOConfig(beta=0.0), geo, donate=False,
                                 compiler_options=FAST)
    data = {k: v for k, v in batch.items() if not k.endswith("routes")}
    data.update(completion_mask=out.mask, logp_old=out.logp_policy, advantages=jnp.zeros((P * G,)))
    state = grpo.TrainState.create(params, opt)
    imbalance, biases = [], [np.asarray(skew)]
    for _ in range(4):
        state, m = step(state, None, data)
        imbalance.append(float(m["moe/max_load_over_mean"]))
        biases.append(np.asarray(state.params["moe"]["router_bias"]))
        for key in ("moe/load_cv", "moe/dropped_fraction", "moe/balance_loss"):
            assert np.isfinite(float(m[key])), key
    d = biases[1] - biases[0]
    assert np.allclose(np.abs(d[d != 0]), 0.1) and (d[:, 0] < 0).all()  # the overloaded expert drops
    assert imbalance[-1] < imbalance[0]
    moved = np.abs(np.asarray(state.params["moe"]["router"]) - np.asarray(params["moe"]["router"])).max()
    assert moved > 1e-6  # only the balance loss has a gradient
    np.testing.assert_array_equal(np.asarray(state.params["moe"]["gate"]), np.asarray(params["moe"]["gate"]))


@pytest.mark.slow  # a Trainer run compiles the sampler and the update
def test_train_with_replay_checkpoints_the_recorded_routes(tmp_path):
    """`r1jax train` on the tiny Qwen3-MoE with routing_replay=rollout: update 1 checkpoints the
    unfinished rollout, routes included, and a resuming Trainer's restore target reads back
    exactly the routes update 2 would replay (the resume loop: tests/test_trainer.py);
    the replay and load metrics reach metrics.jsonl."""
    import json
    import os

    from r1jax import checkpoint as ckpt_lib
    from r1jax import trainer as trainer_lib

    from test_trainer import TINY

    cfg = load_config("configs/model/qwen3-moe-tiny.yaml", [
        o for o in TINY if not o.startswith(("model.", "grpo.beta", "grpo.ref_reset"))] + [
        "model.num_layers=1", "model.moe.dense_layers=[]", "model.moe.routing_replay=rollout",
        "model.moe.bias_update_gamma=0.001", "model.moe.seq_aux_loss_coef=0.001",
        "grpo.beta=0.0", "checkpoint.every=1", "train.steps=1", "sampler.compact=false",
        f"run.dir={tmp_path / 'run'}"])
    seen = {}
    t = trainer_lib.Trainer(cfg)
    t.add_hook(lambda loop: seen.update({k: np.asarray(jax.device_get(loop.rollout[k]))
                                         for k in ("prompt_routes", "completion_routes")}))
    assert t.run()["steps"] == 1
    assert seen["completion_routes"].dtype == np.uint8 and seen["completion_routes"].shape[2:] == (1, 2)
    resumed = trainer_lib.Trainer(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, steps=2)))
    ckpt = ckpt_lib.Checkpointer(os.path.join(tmp_path / "run", "checkpoints"), cfg.checkpoint)
    try:  # the resume's restore target for the rollout: its layout, uint8 routes included
        step, rollout = ckpt.restore_params_only(resumed.collector.layout, key="rollout")
    finally:
        ckpt.close()
    assert step == 1
    for k in ("prompt_routes", "completion_routes"):
        assert rollout[k].dtype == np.uint8
        np.testing.assert_array_equal(np.asarray(jax.device_get(rollout[k])), seen[k])
    with open(os.path.join(tmp_path / "run", "metrics.jsonl")) as f:
        (row,) = [json.loads(line) for line in f]
    # Update 1 runs at the rollout's parameters: replayed ratios are 1, routing agrees.
    assert row["update/moe/replay_abs_log_ratio"] < 1e-5
    assert row["update/moe/replay_disagreement"] < 1e-6
    for key in ("update/moe/free_abs_log_ratio", "update/moe/max_load_over_mean",
                "update/moe/dropped_fraction", "update/moe/balance_loss"):
        assert key in row, key
