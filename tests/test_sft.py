"""Cold-start SFT: the loss against a plain log-softmax of the model's logits, the jitted step
(donated, sharded equals unsharded), and the optimizer built from SFTConfig."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from r1jax import data as data_lib
from r1jax import mesh as mesh_lib
from r1jax import sft
from r1jax.config import DataConfig, MeshConfig, ModelConfig, SFTConfig
from r1jax.models.build import build_model
from r1jax.tokenizer import char_tokenizer

TOK = char_tokenizer()
MODEL = ModelConfig(vocab_size=TOK.vocab_size, hidden_size=32, intermediate_size=64, num_layers=2,
                    num_heads=2, num_kv_heads=1, max_position_embeddings=64,
                    eos_token_id=TOK.eos_id, pad_token_id=TOK.pad_id)
DATA = DataConfig(template="none", max_prompt_len=16, synthetic_kwargs={"digits": 1, "ops": "+"})
MAX_LEN = 32


@pytest.fixture(scope="module")
def batch():
    b = next(data_lib.sft_batches(DATA, TOK, 8, max_len=MAX_LEN, buckets=[MAX_LEN]))
    return b.tokens_BxT, b.loss_mask_BxT, b.segment_ids_BxT


def test_loss_is_the_masked_token_mean_of_the_logits_log_softmax(batch):
    tokens, mask, seg = batch
    graphdef, params = build_model(MODEL, seed=0)
    got = float(jax.jit(lambda p, t, m, s: sft.sft_loss(graphdef, p, t, m, s))(params, tokens, mask, seg))
    forward = jax.jit(lambda p, t, s: nnx.merge(graphdef, p)(t, segment_ids_BxT=s))
    logits = np.asarray(forward(params, tokens, seg), np.float64)
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - logits.max(-1, keepdims=True)
    picked = np.take_along_axis(logp[:, :-1], tokens[:, 1:, None], -1)[..., 0]
    m = mask[:, 1:]
    assert m.sum() > 0
    assert got == pytest.approx(-(picked * m).sum() / m.sum(), rel=1e-5)


def test_sharded_donated_step_equals_unsharded_and_learns(batch, devices):
    cfg = SFTConfig(steps=3, lr=1e-2, warmup_steps=1)
    opt = sft.make_optimizer(cfg)
    tokens, mask, seg = (jnp.asarray(x) for x in batch)
    graphdef, params = build_model(MODEL, seed=0)
    plain = sft.make_step(graphdef, opt)
    p, o, losses = params, opt.init(params), []
    for _ in range(3):
        p, o, loss = plain(p, o, tokens, mask, seg)
        losses.append(float(loss))
    assert losses[2] < losses[0]

    mesh = mesh_lib.make_mesh(MeshConfig(ici={"fsdp": 8}))
    rules = mesh_lib.TRAIN_RULES
    graphdef, s_params = build_model(MODEL, mesh, rules, seed=0)
    p_sh = jax.tree.map(lambda a: a.sharding, s_params)
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), s_params)
    o_sh = sft.opt_state_shardings(opt, abstract, p_sh, mesh)
    step = sft.make_step(graphdef, opt, params_shardings=p_sh, opt_shardings=o_sh, mesh=mesh, rules=rules)
    s_opt = jax.jit(opt.init, out_shardings=o_sh)(s_params)
    b_sh = mesh_lib.batch_sharding(mesh, rules, 2)
    s_batch = [jax.device_put(x, b_sh) for x in (tokens, mask, seg)]
    for i in range(3):
        old = s_params
        s_params, s_opt, loss = step(s_params, s_opt, *s_batch)
        assert old["embed"].is_deleted()  # donated
        assert float(loss) == pytest.approx(losses[i], rel=1e-4)
    assert any(s.spec != jax.sharding.PartitionSpec() for s in jax.tree.leaves(p_sh))
    for a, b, sh in zip(jax.tree.leaves(s_params), jax.tree.leaves(p), jax.tree.leaves(p_sh)):
        assert a.sharding == sh
        # Adam divides by sqrt(v): where a gradient is near zero, reduction-order noise of the
        # sharded sums moves the step by a fraction of lr (2.3e-5 seen, lr 1e-2): 1% of a step.
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-2 * cfg.lr)


def test_optimizer_settings_come_from_the_config():
    cfg = SFTConfig(steps=20, lr=1e-2, warmup_steps=5, b1=0.8, b2=0.9, weight_decay=0.1,
                    max_grad_norm=0.5, final_lr_ratio=0.2)
    params = {"w": jnp.ones((3, 3)) * 2.0}
    grads = {"w": jnp.arange(9.0).reshape(3, 3)}
    # The same update written out with optax's primitives, from the paper-style description.
    schedule = optax.warmup_cosine_decay_schedule(0.0, 1e-2, 5, 20, 1e-2 * 0.2)
    ref = optax.chain(optax.clip_by_global_norm(0.5),
                      optax.adamw(schedule, b1=0.8, b2=0.9, weight_decay=0.1))
    ours = sft.make_optimizer(cfg)
    s_ref, s_ours = ref.init(params), ours.init(params)
    for _ in range(7):
        u_ref, s_ref = ref.update(grads, s_ref, params)
        u_ours, s_ours = ours.update(grads, s_ours, params)
        np.testing.assert_allclose(np.asarray(u_ours["w"]), np.asarray(u_ref["w"]), rtol=1e-6)
    assert float(jnp.abs(u_ours["w"]).max()) > 0
    # max_grad_norm 0: no clipping stage in the chain (AdamW alone).
    unclipped = sft.make_optimizer(SFTConfig(steps=20, lr=1e-2, warmup_steps=5, max_grad_norm=0.0))
    assert len(unclipped.init(params)) == 1 and len(s_ours) == 2
