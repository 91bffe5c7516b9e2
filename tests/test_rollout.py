"""rollout.Collector: the storage layout, dynamic sampling's fixed-size refill, advantages from
the stored rewards, and a prompt length past the largest bucket."""

import dataclasses

import jax
import numpy as np
import pytest

from r1jax import data as data_lib
from r1jax import grpo
from r1jax import mesh as mesh_lib
from r1jax import rollout as rollout_lib
from r1jax.config import load_config
from r1jax.models.build import build_model, resolve_model_config
from r1jax.rewards import RewardRunner
from r1jax.sampler import Sampler
from r1jax.tokenizer import char_tokenizer

pytestmark = pytest.mark.slow  # whole rollouts / runs compile the sampler and update

G = 4
BASE = [
    "model.hidden_size=32", "model.intermediate_size=64", "model.num_layers=2", "model.num_heads=2",
    "model.num_kv_heads=1", "model.max_position_embeddings=64",
    "data.template=none", "data.max_prompt_len=16", "data.synthetic_kwargs={digits: 1, ops: '+'}",
    "sampler.max_new_tokens=6", "sampler.prompt_buckets=[16]", f"grpo.group_size={G}",
    "grpo.num_minibatches=2", "grpo.beta=0.01", "grpo.ref_reset_every=0", "train.prompts_per_rollout=4",
    "rewards.functions=[{name: 'test_rollout:odd_answers_vary'}]",
]


def odd_answers_vary(completions, completion_ids=None, answer=None, **_):
    """Questions with an even answer score 1 whatever the completion (a zero-variance group);
    odd ones score the parity of the first sampled token (a group that varies, almost surely)."""
    return [1.0 if int(a) % 2 == 0 else float(ids[0] % 2) for ids, a in zip(completion_ids, answer)]


def _collector(overrides):
    cfg = load_config(None, [*BASE, *overrides])
    tok = char_tokenizer()
    cfg = dataclasses.replace(cfg, model=resolve_model_config(cfg.model, tok))
    mesh = mesh_lib.make_mesh(cfg.mesh)
    rules = mesh_lib.train_rules(cfg.mesh)
    graphdef, params = build_model(cfg.model, mesh, rules, seed=0)
    geo = grpo.Geometry.from_config(cfg)
    sampler = Sampler(graphdef, cfg.sampler, mesh=mesh, rules=mesh_lib.sample_rules(cfg.mesh),
                      tokenizer=tok, pad_id=tok.pad_id)
    col = rollout_lib.Collector(geo, cfg.grpo, sampler, RewardRunner(cfg.rewards), tok, mesh=mesh, rules=rules)
    batches = data_lib.prompt_batches(cfg.data, tok, geo.prompts_per_rollout, buckets=[geo.prompt_len])
    return cfg, col, params, batches


@pytest.fixture(scope="module")
def dynamic(devices):
    # max_prompt_len 20 > the largest bucket 16: prompts are stored (and sampled) at 32, the
    # next multiple; top-p truncates, so the rollout keeps the sampler's own log-probs too.
    cfg, col, params, batches = _collector(["grpo.dynamic_sampling=true", "grpo.dynamic_sampling_max_tries=50",
                                            "data.max_prompt_len=20", "sampler.top_p=0.9"])
    ref = jax.tree.map(lambda x: x.copy(), params)
    draws = []
    real_draw = col._draw

    def counting_draw(p, batch, key):
        out = real_draw(p, batch, key)
        draws.append((batch, out[2].total))
        return out

    col._draw = counting_draw
    rollouts = [col.collect(params, ref, batches, jax.random.key(i)) for i in range(2)]
    return cfg, col, params, rollouts, draws


def test_dynamic_sampling_fills_the_buffer_with_groups_that_carry_signal(dynamic):
    cfg, col, _, rollouts, draws = dynamic
    geo = col.geometry
    assert len(draws) > 2, "no draw dropped a group: the refill was never exercised"
    for rollout, info in rollouts:
        r_PxG = info.rewards_N.reshape(geo.prompts_per_rollout, G)
        assert (r_PxG.max(1) > r_PxG.min(1)).all(), "a kept group has all-equal rewards"
        assert info.metrics["dynamic_sampling/drop_rate"] > 0
        assert info.metrics["adv/zero_std_groups"] == 0.0
        # The rollout is full: every row holds a sampled completion of a real prompt.
        mask = np.asarray(rollout["completion_mask"])
        assert mask.shape == (geo.rollout_size, geo.completion_len) and (mask.sum(1) >= 1).all()
        assert (np.asarray(rollout["prompt_mask"]).sum(1) >= 1).all()
        np.testing.assert_allclose(
            np.asarray(rollout["advantages"]),
            np.asarray(grpo.group_advantages(r_PxG, scale=cfg.grpo.scale_rewards, eps=cfg.grpo.adv_eps)).reshape(-1),
            rtol=1e-6)
    # However many groups each draw kept, the refill ran one compiled scatter.
    assert col._scatter._cache_size() == 1


def test_rollout_rows_are_the_sampled_groups_in_order(dynamic):
    """Each kept group's G rows carry the prompt they were sampled for, and the rows' rewards
    are those the reward function gave that group (checked against the draws seen)."""
    _, col, _, rollouts, draws = dynamic
    rollout, info = rollouts[0]
    prompt_ids = np.asarray(rollout["prompt_ids"])
    for p in range(col.geometry.prompts_per_rollout):
        rows = prompt_ids[p * G:(p + 1) * G]
        assert (rows == rows[0]).all(), f"group {p} mixes prompts"
    # The first kept group is the first varying group of the first draw.
    batch, total = draws[0]
    r_PxG = total.reshape(-1, G)
    first = int(np.flatnonzero(r_PxG.max(1) > r_PxG.min(1))[0])
    np.testing.assert_array_equal(prompt_ids[0], np.asarray(batch.prompt_ids_PxTp[first]))
    np.testing.assert_array_equal(info.rewards_N[:G], r_PxG[first])


def test_layout_matches_abstract_and_reference_logprobs(dynamic):
    _, col, params, rollouts, _ = dynamic
    rollout, _ = rollouts[0]
    assert list(rollout) == list(rollout_lib.keys(col.grpo_cfg, col.sampler.config))
    for k, spec in col.layout.items():
        assert rollout[k].shape == spec.shape and rollout[k].dtype == spec.dtype, k
        assert rollout[k].sharding.is_equivalent_to(spec.sharding, len(spec.shape)), k
    # The reference is a copy of the policy here: logp_ref is the sampler's log pi_old.
    np.testing.assert_allclose(np.asarray(rollout["logp_ref"]) * np.asarray(rollout["completion_mask"]),
                               np.asarray(rollout["logp_old"]), atol=1e-4)


def test_prompt_longer_than_the_largest_bucket_and_sampler_logprobs(dynamic):
    _, col, _, rollouts, _ = dynamic
    assert col.geometry.prompt_len == 32
    rollout, _ = rollouts[0]
    assert rollout["prompt_ids"].shape == (col.geometry.rollout_size, 32)
    sampled, old = np.asarray(rollout["logp_sampler"]), np.asarray(rollout["logp_old"])
    assert (sampled >= old - 1e-6).all() and (sampled > old + 1e-6).any()  # renormalised over top-p
    # beta = 0 and no truncation: neither logp_ref nor logp_sampler is stored.
    assert rollout_lib.keys(dataclasses.replace(col.grpo_cfg, beta=0.0),
                            dataclasses.replace(col.sampler.config, top_p=1.0)) == rollout_lib.BASE_KEYS
