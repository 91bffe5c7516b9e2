import jax
import jax.numpy as jnp
import numpy as np

from r1jax.config import ModelConfig
from r1jax.logprobs import completion_logprobs, token_logprobs
from r1jax.models import create


def test_chunked_logprobs_and_grads_equal_full_softmax():
    rng = np.random.RandomState(0)
    h = jnp.asarray(rng.randn(3, 13, 8), jnp.float32)
    w = jnp.asarray(rng.randn(8, 50), jnp.float32)
    y = jnp.asarray(rng.randint(0, 50, (3, 13)))

    def full(h, w, temp):
        logp = jax.nn.log_softmax(h @ w / temp, axis=-1)
        picked = jnp.take_along_axis(logp, y[..., None], -1)[..., 0]
        ent = -jnp.sum(jnp.exp(logp) * logp, -1)
        return picked, ent

    for temp in (1.0, 0.7):
        ref_lp, ref_ent = full(h, w, temp)
        lp, ent = token_logprobs(h, w, y, temperature=temp, chunk_len=4)  # 13 is not a multiple of 4
        np.testing.assert_allclose(np.asarray(lp), np.asarray(ref_lp), atol=1e-5)
        np.testing.assert_allclose(np.asarray(ent), np.asarray(ref_ent), atol=1e-5, rtol=1e-5)
    g_ref = jax.grad(lambda h, w: full(h, w, 1.0)[0].sum(), argnums=(0, 1))(h, w)
    g = jax.grad(lambda h, w: token_logprobs(h, w, y, chunk_len=4)[0].sum(), argnums=(0, 1))(h, w)
    for a, b in zip(g, g_ref):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-4)


def test_completion_logprobs_match_full_forward():
    cfg = ModelConfig(vocab_size=40, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2)
    model = create(cfg, seed=0)
    rng = np.random.RandomState(1)
    prompt = jnp.asarray(rng.randint(0, 40, (2, 5)))
    pmask = jnp.asarray([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    comp = jnp.asarray(rng.randint(0, 40, (2, 4)))
    lp, _ = completion_logprobs(model, prompt, pmask, comp, temperature=0.9)
    for row, start in ((0, 2), (1, 0)):
        seq = jnp.concatenate([prompt[row, start:], comp[row]])[None]
        logits = model(seq)[0] / 0.9
        logp = jax.nn.log_softmax(logits, -1)
        n = seq.shape[1] - 4
        ref = [float(logp[n - 1 + i, comp[row, i]]) for i in range(4)]
        np.testing.assert_allclose(np.asarray(lp[row]), ref, atol=1e-5)
