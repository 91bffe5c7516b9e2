"""The rollout engine against independent references: repeated full forward passes, the
training-side log-probs, numpy transcriptions of top-k / top-p, transformers' greedy generate,
and itself across prefix modes and mesh layouts."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from r1jax import mesh as mesh_lib
from r1jax import models, sampler
from r1jax.config import MeshConfig, ModelConfig
from r1jax.logprobs import completion_logprobs
from r1jax.sampler import FINISH_LENGTH, FINISH_STOP, ProgramCache, SamplerError
from r1jax.sampler import sample as _sample
from r1jax.tokenizer import char_tokenizer  # noqa: E402

# One compiled-program cache for this module's tests (they share a vocabulary and shapes), held
# here rather than inside the library.
CACHE = ProgramCache()


def sample(*args, **kw):
    return _sample(*args, cache=CACHE, **kw)


TOK = char_tokenizer()
VOCAB = TOK.vocab_size  # one vocabulary for every test model: they share compiled programs
# Scanned layers (lax.scan over the stacked weights); TINY_UNROLLED covers the default path.
TINY = ModelConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_layers=2,
                   num_heads=4, num_kv_heads=2, max_position_embeddings=64, scan_layers=True)
# Unrolled layers, tied embeddings, no bias, one KV head: the other code paths of the model.
TINY_UNROLLED = ModelConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_layers=3,
                            num_heads=4, num_kv_heads=1, qkv_bias=False, tie_embeddings=True,
                            scan_layers=False, max_position_embeddings=64, eos_token_id=98)
PROMPTS = [[5, 7, 9], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], [30], [12, 40, 3, 3, 8]]


def _model(cfg, seed=0, scale=6.0):
    """Random weights with a larger spread than the 0.02 init, so logits are far from uniform
    and greedy choices are not decided by rounding."""
    m = models.create(cfg, seed=seed)
    state = nnx.state(m, nnx.Param)
    nnx.update(m, jax.tree.map(lambda a: a * scale if a.ndim >= 2 else a, state))
    return m


@pytest.fixture(scope="module")
def tiny():
    return _model(TINY)


def _greedy_reference(model, prompts, n):
    """Argmax continuations by full forward passes without a cache: each row right-padded into
    one fixed [P, T] buffer (causal attention: the padding after a position cannot change it),
    so one compiled forward serves every step."""
    t = max(map(len, prompts)) + n
    buf = np.zeros((len(prompts), t), np.int32)
    for r, p in enumerate(prompts):
        buf[r, :len(p)] = p
    forward = nnx.jit(lambda m, x: m(x))
    for s in range(n):
        logits = np.asarray(forward(model, jnp.asarray(buf)))
        for r, p in enumerate(prompts):
            buf[r, len(p) + s] = np.argmax(logits[r, len(p) + s - 1])
    return [buf[r, len(p):len(p) + n].tolist() for r, p in enumerate(prompts)]


@pytest.mark.parametrize("cfg", [TINY, TINY_UNROLLED], ids=["scan", "unrolled_tied_mqa_eos"])
def test_greedy_equals_repeated_full_forwards(cfg):
    model = _model(cfg, seed=1)
    kw = dict(key=jax.random.key(0), num_samples=2, max_new_tokens=8, temperature=0.0)
    out = sample(model, PROMPTS, stop_at_eos=False, **kw)
    toks = np.asarray(out.tokens)
    refs = _greedy_reference(model, PROMPTS, 8)
    for p, ref in enumerate(refs):
        for g in range(2):
            assert toks[p * 2 + g].tolist() == ref, (p, g)
    assert np.asarray(out.mask).all() and (np.asarray(out.finish_reason) == FINISH_LENGTH).all()
    assert out.prompt_tokens.shape[1] == 32  # bucketed
    if cfg.eos_token_id is not None:  # the model's eos stops a sequence by default
        eos = sample(model, PROMPTS, **kw)
        lengths = [ref.index(cfg.eos_token_id) + 1 if cfg.eos_token_id in ref else 8 for ref in refs]
        assert np.asarray(eos.lengths).tolist() == [n for n in lengths for _ in range(2)]
        assert any(n < 8 for n in lengths), "pick an eos the greedy continuations contain"


def test_array_prompts_with_mask_match_lists(tiny):
    t = max(map(len, PROMPTS))
    arr = np.zeros((len(PROMPTS), t), np.int32)
    msk = np.zeros_like(arr)
    for i, p in enumerate(PROMPTS):
        arr[i, t - len(p):], msk[i, t - len(p):] = p, 1
    a = sample(tiny, arr, prompt_mask=msk, key=jax.random.key(3), num_samples=2, max_new_tokens=8)
    b = sample(tiny, PROMPTS, key=jax.random.key(3), num_samples=2, max_new_tokens=8)
    np.testing.assert_array_equal(a.tokens, b.tokens)


@pytest.mark.parametrize("kw", [dict(temperature=0.7), dict(temperature=1.3, top_k=5, top_p=0.9)],
                         ids=["T0.7", "T1.3_topk_topp"])
def test_logp_policy_equals_full_forward_logprobs(tiny, kw):
    out = sample(tiny, PROMPTS, key=jax.random.key(1), num_samples=2, max_new_tokens=8, **kw)
    pt, pm = out.row_prompts()
    ref, _ = completion_logprobs(tiny, pt, pm, out.tokens, temperature=kw["temperature"])
    mask = np.asarray(out.mask)
    np.testing.assert_allclose(np.asarray(out.logp_policy) * mask, np.asarray(ref) * mask, atol=1e-5)
    if "top_k" not in kw:
        np.testing.assert_array_equal(out.logp, out.logp_policy)
    else:
        # Under truncation the sampled-from distribution is renormalised over fewer tokens.
        assert (np.asarray(out.logp - out.logp_policy)[mask.astype(bool)] > 0).all()


def test_shared_prefix_equals_separate_copies(tiny):
    kw = dict(key=jax.random.key(7), max_new_tokens=8, temperature=1.0)
    shared = sample(tiny, PROMPTS, num_samples=3, **kw)
    copies = sample(tiny, [p for p in PROMPTS for _ in range(3)], num_samples=1, **kw)
    repeat = sample(tiny, PROMPTS, num_samples=3, prefix_mode="repeat", **kw)
    for other in (copies, repeat):
        np.testing.assert_array_equal(shared.tokens, other.tokens)
        np.testing.assert_allclose(shared.logp, other.logp, atol=1e-6)
    # G samples of one prompt differ from each other; the same key reproduces them.
    toks = np.asarray(shared.tokens)
    assert len({tuple(r) for r in toks[:3]}) > 1
    again = sample(tiny, PROMPTS, num_samples=3, **kw)
    np.testing.assert_array_equal(shared.tokens, again.tokens)
    other_key = sample(tiny, PROMPTS, num_samples=3, **{**kw, "key": jax.random.key(8)})
    assert not np.array_equal(shared.tokens, other_key.tokens)


def test_stop_tokens_end_sequences_and_mask(tiny):
    free = sample(tiny, PROMPTS, key=jax.random.key(2), num_samples=2, max_new_tokens=8)
    free_toks = np.asarray(free.tokens)
    stop = int(free_toks[0, 3])  # appears in row 0 by construction
    out = sample(tiny, PROMPTS, key=jax.random.key(2), num_samples=2, max_new_tokens=8,
                 stop_token_ids=[stop])
    toks, mask = np.asarray(out.tokens), np.asarray(out.mask)
    finish, lengths = np.asarray(out.finish_reason), np.asarray(out.lengths)
    for r in range(toks.shape[0]):
        hits = np.nonzero(free_toks[r] == stop)[0]
        if hits.size:
            n = hits[0] + 1
            assert finish[r] == FINISH_STOP and lengths[r] == n
            assert toks[r, n - 1] == stop
        else:
            n = 8
            assert finish[r] == FINISH_LENGTH and lengths[r] == n
        np.testing.assert_array_equal(toks[r, :n], free_toks[r, :n])  # same key schedule
        assert mask[r].tolist() == [1] * n + [0] * (8 - n)
        assert (toks[r, n:] == 0).all() and (np.asarray(out.logp)[r, n:] == 0).all()
    assert lengths[0] <= 4 and out.truncated.dtype == jnp.bool_
    # Everything stops at once: the loop exits early.
    first = sorted({int(t) for t in free_toks[:, 0]})
    early = sample(tiny, PROMPTS, key=jax.random.key(2), num_samples=2, max_new_tokens=8,
                   stop_token_ids=first)
    assert int(early.num_steps) == 1 and (np.asarray(early.lengths) == 1).all()


def test_stop_strings_on_device_and_host_pass(tiny):
    tok, model = TOK, tiny
    prompts = [tok.encode(s, add_special_tokens=False) for s in ("2+2=", "hello world", "x", "ab")]
    kw = dict(key=jax.random.key(4), num_samples=2, max_new_tokens=8, stop_at_eos=False)
    free = np.asarray(sample(model, prompts, **kw).tokens)
    plain = min(i for i in range(2, 7) if (free[1, i:i + 2] >= 8).all())  # two ordinary chars
    pair = free[1, plain:plain + 2].tolist()
    stop = tok.decode(pair)
    assert tok.encode(stop, add_special_tokens=False) == pair
    # Device: the stop string's token sequence ends a row at its first occurrence.
    out = sample(model, prompts, stop_strings=[stop], tokenizer=tok, host_stop_check=False, **kw)
    for r in range(8):
        hits = [i + 1 for i in range(7) if free[r, i:i + 2].tolist() == pair]
        n = int(out.lengths[r])
        if hits:
            assert n == hits[0] + 1 and int(out.finish_reason[r]) == FINISH_STOP
        else:
            assert n == 8 and int(out.finish_reason[r]) == FINISH_LENGTH
        np.testing.assert_array_equal(np.asarray(out.tokens)[r, :n], free[r, :n])
    assert int(out.lengths[1]) <= plain + 2
    # Host pass: cuts at a string the device never saw, and fixes mask and finish reason.
    text0 = tok.decode(free[0])
    sub = text0[2:4]
    cut = sampler.truncate_at_stop_strings(sample(model, prompts, **kw), tok, [sub])
    n = int(cut.lengths[0])
    assert int(cut.finish_reason[0]) == FINISH_STOP
    assert np.asarray(cut.mask)[0].sum() == n and (np.asarray(cut.tokens)[0, n:] == 0).all()
    kept = np.asarray(cut.tokens)[0, :n]
    assert sub in tok.decode(kept) and sub not in tok.decode(kept[:-1])


@pytest.mark.parametrize("ici", [{"data": 4, "tensor": 2}, {"fsdp": 8}], ids=["data4xtensor2", "fsdp8"])
def test_sharded_equals_unsharded(tiny, devices, ici):
    mesh = mesh_lib.make_mesh(MeshConfig(ici=ici))
    kw = dict(key=jax.random.key(5), num_samples=2, max_new_tokens=8, temperature=1.0)
    ref = sample(tiny, PROMPTS, **kw)
    out = sample(tiny, PROMPTS, mesh=mesh, **kw)
    np.testing.assert_array_equal(out.tokens, ref.tokens)
    np.testing.assert_allclose(out.logp, ref.logp, atol=1e-5)
    assert len(out.tokens.sharding.device_set) == 8 or out.tokens.shape[0] < 8


def test_temperature_zero_topk1_tiny_p_are_greedy_and_p1_is_plain(tiny):
    kw = dict(key=jax.random.key(9), num_samples=2, max_new_tokens=8)
    greedy = np.asarray(sample(tiny, PROMPTS, temperature=0.0, **kw).tokens)
    assert (greedy == np.asarray(sample(tiny, PROMPTS, temperature=1.0, top_k=1, **kw).tokens)).all()
    tiny_p = sample(tiny, PROMPTS, temperature=1.0, top_p=1e-6, **kw)
    assert (greedy == np.asarray(tiny_p.tokens)).all()
    np.testing.assert_allclose(tiny_p.logp, 0.0, atol=1e-6)  # one token kept: probability 1
    plain = sample(tiny, PROMPTS, temperature=1.0, **kw)
    p1 = sample(tiny, PROMPTS, temperature=1.0, top_p=1.0, top_k=0, **kw)
    np.testing.assert_array_equal(plain.tokens, p1.tokens)
    kv = sample(tiny, PROMPTS, temperature=1.0, top_k=VOCAB, **kw)  # top_k >= V: no truncation
    np.testing.assert_array_equal(plain.tokens, kv.tokens)


def _np_keep(x, k, p):
    """numpy transcription: sort, keep the top k, then the smallest prefix with mass >= p."""
    keep = np.ones_like(x, bool)
    for b in range(x.shape[0]):
        order = np.argsort(-x[b], kind="stable")
        kk = k if 0 < k < x.shape[1] else x.shape[1]
        kept = order[:kk]
        pr = np.exp(x[b, kept] - x[b, kept].max())
        pr /= pr.sum()
        cum = np.cumsum(pr)
        n = int(np.searchsorted(cum, p - 1e-9)) + 1 if p < 1 else kk
        keep[b] = False
        keep[b, kept[:n]] = True
    return keep


@pytest.mark.parametrize("k,p", [(5, 1.0), (0, 0.9), (7, 0.5), (0, 0.3)])
def test_truncation_matches_numpy_sort(k, p):
    x = np.random.RandomState(0).randn(16, 300).astype(np.float32) * 3
    x[0, 10:20] = -1e9  # masked-out vocabulary
    x[1] = -2.5  # all tied: everything kept
    got = np.asarray(sampler._truncation_mask(jnp.asarray(x), k, p))
    ref = _np_keep(x, k, p)
    np.testing.assert_array_equal(got[2:], ref[2:])
    assert got[1].all()


def test_inverse_cdf_sampling_follows_the_distribution():
    rs = np.random.RandomState(0)
    probs = rs.dirichlet(np.ones(37) * 0.5)
    probs[5] = 0.0  # never sampled
    probs /= probs.sum()
    n = 40000
    e = jnp.asarray(np.tile(probs, (n, 1)), jnp.float32)
    u = jnp.asarray(rs.rand(n), jnp.float32)
    idx = np.asarray(sampler._inverse_cdf(e, u, chunk=6))
    # Exact against the numpy inverse CDF (up to float32 rounding at chunk boundaries).
    ref = np.searchsorted(np.cumsum(probs), np.asarray(u, np.float64), side="right")
    assert (idx == ref).mean() > 0.999
    freq = np.bincount(idx, minlength=37) / n
    assert freq[5] == 0
    tol = 4 * np.sqrt(probs * (1 - probs) / n) + 1e-4  # 4 standard errors
    assert (np.abs(freq - probs) <= tol).all(), np.abs(freq - probs) / tol


def test_kv_cache_bf16_runs_close(tiny):
    kw = dict(key=jax.random.key(1), num_samples=2, max_new_tokens=8, temperature=1.0)
    a = sample(tiny, PROMPTS, **kw)
    b = sample(tiny, PROMPTS, kv_cache_dtype="bfloat16", **kw)
    np.testing.assert_array_equal(a.tokens[:, 0], b.tokens[:, 0])  # from the prefill
    same = np.asarray(a.tokens == b.tokens).all(-1)
    assert same.mean() >= 0.5
    np.testing.assert_allclose(np.asarray(a.logp)[same], np.asarray(b.logp)[same], atol=0.1)


def test_prompt_buckets_reuse_the_compiled_program(tiny):
    kw = dict(key=jax.random.key(0), num_samples=2, max_new_tokens=8)
    sample(tiny, [[1, 2], [3], [4], [5]], temperature=1.0, **kw)
    n = len(CACHE)
    fn = CACHE.programs()[-1]
    size = fn._cache_size()
    # Another prompt length in the same bucket, another temperature, other stop tokens.
    sample(tiny, [[1, 2, 3, 4, 5, 6, 7], [8, 9], [1], [2]], temperature=0.6, stop_token_ids=[3, 4], **kw)
    assert len(CACHE) == n and fn._cache_size() == size


def test_bad_input_names_the_culprit(tiny):
    key = jax.random.key(0)
    n = len(CACHE)
    cases = [
        (dict(prompts=[[1] * 65]), "prompt 0 has 65 tokens, more than the model's max_position_embeddings 64"),
        (dict(prompts=[[1, 2], []]), "prompt 1 is empty"),
        (dict(prompts=[[1]], num_samples=0), "num_samples (G) must be an integer >= 1"),
        (dict(prompts=[[1] * 10], max_new_tokens=60), "max_new_tokens 60 = 70 exceeds"),
        (dict(prompts=[[1, VOCAB]]), f"prompt 0 has a token id outside [0, {VOCAB})"),
        (dict(prompts=[[1]], stop_strings=["</answer>"]), "stop_strings need a tokenizer"),
        (dict(prompts=[[1]], top_p=0.0), "top_p must be in (0, 1]"),
        (dict(prompts=[[1]], temperatur=1.0), "unknown sampler option(s) temperatur"),
        (dict(prompts=np.ones((2, 3), np.int32), prompt_mask=np.array([[1, 0, 1], [1, 1, 1]])),
         "prompt 0 is not left-padded"),
    ]
    for kw, msg in cases:
        with pytest.raises(SamplerError) as err:
            sample(tiny, key=key, **{"max_new_tokens": 8, **kw})
        assert msg in str(err.value) and "\n" not in str(err.value), str(err.value)
    assert len(CACHE) == n  # rejected before anything compiled


@pytest.mark.slow
def test_greedy_matches_transformers_generate(tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    hf = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        tie_word_embeddings=False))
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0.0, 0.15)
    hf.eval()
    hf.save_pretrained(str(tmp_path))
    model = models.from_pretrained(str(tmp_path))
    out = sample(model, PROMPTS, key=jax.random.key(0), max_new_tokens=8, temperature=0.0,
                 stop_at_eos=False)
    for r, p in enumerate(PROMPTS):
        with torch.no_grad():
            ref = hf.generate(torch.tensor([p]), max_new_tokens=8, min_new_tokens=8, do_sample=False,
                              eos_token_id=None, pad_token_id=0)
        assert np.asarray(out.tokens)[r].tolist() == ref[0, len(p):].tolist(), r
    # Text in, text out, from the directory (the `r1jax sample` path).
    TOK.save(str(tmp_path))
    from r1jax.commands.sample import sample_text

    rows = sample_text(str(tmp_path), ["2+2=", "hello"], num_samples=2, max_new_tokens=8,
                       temperature=0.0, stop_at_eos=False)
    assert [(r["prompt_index"], r["sample_index"]) for r in rows] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    for row in rows:
        ids = TOK.encode(row["prompt"])
        with torch.no_grad():
            ref = hf.generate(torch.tensor([ids]), max_new_tokens=8, min_new_tokens=8, do_sample=False,
                              eos_token_id=None, pad_token_id=0)
        assert row["completion"] == TOK.decode(ref[0, len(ids):].tolist())
        assert row["finish_reason"] == "length" and row["num_tokens"] == 8


# ---- Compacted, windowed decoding (sampler.compact, min_decode_batch, min_decode_window) -------
SEG = dict(compact=True, min_decode_batch=4, min_decode_window=8)  # buckets 16, 8, 4; windows 8, 16
ONE = dict(compact=False, min_decode_window=64)  # the one-program rollout


@pytest.fixture(scope="module")
def long_tailed(tiny):
    """A 4 x 4 rollout whose rows stop at many different steps (stop ids taken from an
    unstopped run), the last rows never: a long tail to the 16-token cap."""
    kw = dict(key=jax.random.key(11), num_samples=4, max_new_tokens=16, temperature=1.0)
    free = np.asarray(sample(tiny, PROMPTS, stop_at_eos=False, **ONE, **kw).tokens)
    late = set(free[-3:].ravel().tolist())
    stops = sorted({int(free[r, 1 + r % 6]) for r in range(13)} - late)
    kw = dict(kw, stop_token_ids=stops, stop_at_eos=False)
    ref = sample(tiny, PROMPTS, **ONE, **kw)
    lengths = np.asarray(ref.lengths)
    assert lengths.min() <= 4 and lengths.max() == 16 and len(set(lengths.tolist())) >= 5, lengths
    return kw, ref


@pytest.fixture(scope="module")
def long_head(tiny):
    """The reverse tail: the first 3 rows never stop, the others stop within 6 steps, so under
    a budget the long rows are seated first and finish while the slots hold young rows."""
    kw = dict(key=jax.random.key(11), num_samples=4, max_new_tokens=16, temperature=1.0)
    free = np.asarray(sample(tiny, PROMPTS, stop_at_eos=False, **ONE, **kw).tokens)
    early = set(free[:3].ravel().tolist())
    stops = sorted({int(free[r, 1 + r % 6]) for r in range(3, 16)} - early)
    kw = dict(kw, stop_token_ids=stops, stop_at_eos=False)
    ref = sample(tiny, PROMPTS, **ONE, **kw)
    lengths = np.asarray(ref.lengths)
    assert (lengths[:3] == 16).all() and lengths[3:].max() <= 7, lengths
    return kw, ref


def _same_rollout(out, ref):
    np.testing.assert_array_equal(out.tokens, ref.tokens)
    np.testing.assert_allclose(out.logp, ref.logp, atol=1e-5)
    np.testing.assert_allclose(out.logp_policy, ref.logp_policy, atol=1e-5)
    for f in ("mask", "lengths", "finish_reason", "num_steps"):
        np.testing.assert_array_equal(getattr(out, f), getattr(ref, f), err_msg=f)


def test_compacted_windowed_decode_equals_one_program(tiny, long_tailed):
    kw, ref = long_tailed
    cache = ProgramCache()
    out = _sample(tiny, PROMPTS, cache=cache, **SEG, **kw)
    _same_rollout(out, ref)
    assert sampler.batch_buckets(16, 1, 4) == [16, 8, 4]
    assert sampler.window_buckets(16, 8) == [8, 16]
    bound = sampler.program_bound(16, 1, 4, 16, 8)
    # Prefill, finish and decode programs in more than one bucket: it did compact / grow.
    assert 4 < cache.num_compiled() <= bound, (cache.num_compiled(), bound)
    # Log-probs equal a full forward over the compacted rollout's tokens.
    pt, pm = out.row_prompts()
    full, _ = completion_logprobs(tiny, pt, pm, out.tokens, temperature=kw["temperature"])
    mask = np.asarray(out.mask)
    np.testing.assert_allclose(np.asarray(out.logp_policy) * mask, np.asarray(full) * mask, atol=1e-5)


def test_compacted_windowed_decode_sharded(tiny, devices, long_tailed):
    kw, ref = long_tailed
    mesh = mesh_lib.make_mesh(MeshConfig(ici={"data": 4, "tensor": 2}))
    # Batch buckets 16, 8 over the 4 batch shards, windows 8, 16.
    out = sample(tiny, PROMPTS, mesh=mesh, **{**SEG, "min_decode_batch": 8}, **kw)
    _same_rollout(out, ref)
    assert len(out.tokens.sharding.device_set) == 8


def test_bucket_ladders():
    assert sampler.batch_buckets(512, 8, 8) == [512, 256, 128, 64, 32, 16, 8]
    assert sampler.batch_buckets(48, 4, 8) == [48, 16, 8]  # shards * 2^k, at most half the last
    assert sampler.batch_buckets(8, 1, 8) == [8]
    assert sampler.batch_buckets(12, 6, 1) == [12, 6]
    assert sampler.window_buckets(512, 64) == [64, 128, 256, 512]
    assert sampler.window_buckets(100, 64) == [64, 100]
    assert sampler.window_buckets(8, 64) == [8]
    assert sampler.program_bound(512, 8, 8, 512, 64) == 2 + 7 * 4 + 6 * 4 + 7 * 3


# ---- Continuous batching under a KV-cache budget (sampler.kv_cache_budget) --------------------
# PROMPTS sit in the 32 bucket: their caches take 4 x 32 positions, then 16 per decode slot.
def _budget(slots):
    return 4 * 32 + slots * 16


def test_kv_budget_continuous_decode_equals_unbudgeted(tiny, long_tailed):
    """5 slots for 16 samples of prompts of 4 lengths stopping at many steps: rows are seated as
    slots free up (at different steps of each row), then the tail compacts to 4 and 2 slots."""
    kw, ref = long_tailed
    cache = ProgramCache()
    out = _sample(tiny, PROMPTS, cache=cache, kv_cache_budget=_budget(5) + 15,
                  compact=True, min_decode_batch=2, **kw)
    _same_rollout(out, ref)
    assert sampler.budget_slots(_budget(5) + 15, 4, 32, 16, 16, 1) == 5
    assert sampler.batch_buckets(5, 1, 2) == [5, 2]
    bound = sampler.budget_program_bound(5, 1, 2, True, 16, 64)
    assert bound == 5 and 3 < cache.num_compiled() <= bound, (cache.num_compiled(), bound)
    pt, pm = out.row_prompts()
    full, _ = completion_logprobs(tiny, pt, pm, out.tokens, temperature=kw["temperature"])
    mask = np.asarray(out.mask)
    np.testing.assert_allclose(np.asarray(out.logp_policy) * mask, np.asarray(full) * mask, atol=1e-5)


class _Recording(ProgramCache):
    """A ProgramCache that records which parts were asked for, in order."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def part(self, graphdef, cfg, plan, name, arg=0):
        self.calls.append((name, arg))
        return super().part(graphdef, cfg, plan, name, arg)


@pytest.mark.parametrize("tail", ["long_tailed", "long_head"])
def test_kv_budget_slots_attend_over_a_window(tiny, tail, request):
    """Windows 4, 8, 16 in 5 slots: the window follows the longest live slot's step, up as a
    row passes it and (long_head: the long rows are seated first) down when they have finished
    and the slots hold younger rows; the same rollout and log-probs as the one-program decode."""
    kw, ref = request.getfixturevalue(tail)
    cache = _Recording()
    out = _sample(tiny, PROMPTS, cache=cache, kv_cache_budget=_budget(5) + 15, compact=True,
                  min_decode_batch=2, min_decode_window=4, **kw)
    _same_rollout(out, ref)
    windows = [arg[1] for name, arg in cache.calls if name == "slot_decode"]
    assert windows[0] == 4 and max(windows) == 16, windows
    shrank = any(b < a for a, b in zip(windows, windows[1:]))
    assert shrank == (tail == "long_head"), windows
    bound = sampler.budget_program_bound(5, 1, 2, True, 16, 4)
    assert bound == 2 + 2 * 3 + 1 and cache.num_compiled() <= bound, (cache.num_compiled(), bound)
    pt, pm = out.row_prompts()
    full, _ = completion_logprobs(tiny, pt, pm, out.tokens, temperature=kw["temperature"])
    mask = np.asarray(out.mask)
    np.testing.assert_allclose(np.asarray(out.logp_policy) * mask, np.asarray(full) * mask, atol=1e-5)


def test_kv_budget_sharded_and_errors(tiny, devices, long_tailed):
    kw, ref = long_tailed
    mesh = mesh_lib.make_mesh(MeshConfig(ici={"data": 4, "tensor": 2}))
    # 8 slots over 4 batch shards, no compaction: prefill, one decode program, output assembly.
    cache = ProgramCache()
    out = _sample(tiny, PROMPTS, mesh=mesh, cache=cache, kv_cache_budget=_budget(9), compact=False, **kw)
    _same_rollout(out, ref)
    assert len(out.tokens.sharding.device_set) == 8
    assert cache.num_compiled() == sampler.budget_program_bound(8, 4, 64, False, 16, 64) == 3
    # Windowed slots on the mesh: the same rollout.
    _same_rollout(_sample(tiny, PROMPTS, mesh=mesh, kv_cache_budget=_budget(9), compact=False,
                          min_decode_window=4, **kw), ref)
    with pytest.raises(SamplerError, match=r"kv_cache_budget 150 tokens is too small.* at least 192"):
        sample(tiny, PROMPTS, mesh=mesh, kv_cache_budget=150, **kw)
    # A budget that holds every sample decodes them all at once (the unbudgeted path).
    assert sampler.budget_slots(_budget(16), 4, 32, 16, 16, 4) == 16
