"""SmolLM2-135M-Instruct, converted from its GGUF file, against transformers and the GGUF itself.

Tolerances (measured on this checkpoint, CPU, `pytest tests/real -k logits -s` prints them):
* fp32: max |logit difference| <= 2e-5 x the largest |logit| (seen: ~3e-6).
* bf16 compute (fp32 or bf16 storage) against transformers fp32: mean |difference| <= 1% and
  max <= 6% of the largest |logit| (seen: 0.33% and 3.6%), the same next-token argmax on >= 90%
  of the positions (seen: 98%), and the text's mean NLL within 0.05 nats.
Greedy generation: r1jax's tokens equal transformers' until the first position where
transformers' top-2 logit gap is below NEAR_TIE (fp32 rounding can order such a pair either
way); the tokens from there on are not compared.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from r1jax.models import from_pretrained  # noqa: E402
from r1jax.sampler import sample  # noqa: E402
from r1jax.tokenizer import Tokenizer  # noqa: E402

EIFFEL = ("The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, France. "
          "It is named after the engineer Gustave Eiffel, whose company designed and built the tower "
          "from 1887 to 1889.")
CODE = 'def add(a: int, b: int) -> int:\n    """Return the sum of a and b."""\n    return a + b\n'
NEAR_TIE = 1e-3


@pytest.fixture(scope="module")
def tok(smollm2_dir):
    return Tokenizer.from_pretrained(smollm2_dir)


@pytest.fixture(scope="module")
def model(smollm2_dir):
    # Scanned layers: one compiled layer body instead of 30 keeps the tier's compiles short.
    return from_pretrained(smollm2_dir, scan_layers=True)


def _hf_logits(hf_model, ids):
    with torch.no_grad():
        return hf_model(torch.tensor([ids])).logits[0].numpy()


def _nll(logits, ids):
    lp = torch.log_softmax(torch.tensor(logits, dtype=torch.float32), -1).numpy()
    return float(-lp[np.arange(len(ids) - 1), ids[1:]].mean())


# ---------------------------------------------------------------------------------------------
# Tokenizer: the GGUF's own vocabulary, merges and pre-tokenisation
# ---------------------------------------------------------------------------------------------
def _bytes_to_unicode():
    """GPT-2's byte -> printable character table (what byte-level BPE vocabularies are written in)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _reference_bpe(gguf_path):
    """An independent encoder from the GGUF file's fields: llama.cpp's "smollm" pre-tokeniser
    (each digit apart, then the GPT-2 regex), byte-level symbols, merges by rank."""
    import gguf
    import regex

    r = gguf.GGUFReader(gguf_path)
    assert r.fields["tokenizer.ggml.pre"].contents() == "smollm"
    tokens = r.fields["tokenizer.ggml.tokens"].contents()
    merges = r.fields["tokenizer.ggml.merges"].contents()
    vocab = {t: i for i, t in enumerate(tokens)}
    rank = {tuple(m.split(" ")): i for i, m in enumerate(merges)}
    gpt2 = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")
    b2u = _bytes_to_unicode()

    def bpe(word):
        parts = list(word)
        while len(parts) > 1:
            pairs = [(rank.get((a, b), 1 << 30), i) for i, (a, b) in enumerate(zip(parts, parts[1:]))]
            best, i = min(pairs)
            if best == 1 << 30:
                break
            parts[i:i + 2] = [parts[i] + parts[i + 1]]
        return parts

    def encode(text):
        ids = []
        for chunk in regex.split(r"(\p{N})", text):
            for piece in gpt2.findall(chunk):
                ids += [vocab[p] for p in bpe("".join(b2u[b] for b in piece.encode("utf-8")))]
        return ids

    return encode, tokens, r


TEXTS = [EIFFEL, CODE, "a  1", "x   42 apples, 3.14 and 1,000,000!", "Natalia sold 48/2 = 24 clips.\n\n#### 72",
         "  leading spaces\tand\ttabs\n\n\nnewlines", "naïve café — 東京 🙂", "I'm sure they'll do it; we've been there."]


def test_tokenizer_matches_gguf_vocabulary(gguf_path, tok, hf_tokenizer):
    encode, tokens, reader = _reference_bpe(gguf_path)
    assert tok.vocab_size == len(tokens)
    for text in TEXTS:
        want = encode(text)
        assert tok.encode(text, add_special_tokens=False) == want, text
        assert hf_tokenizer(text, add_special_tokens=False).input_ids == want, text
        assert tok.decode(want) == text
    f = reader.fields
    assert tok.bos_id == int(f["tokenizer.ggml.bos_token_id"].contents())
    assert tok.eos_id == int(f["tokenizer.ggml.eos_token_id"].contents())
    assert tok.pad_id == int(f["tokenizer.ggml.padding_token_id"].contents())
    assert tok.chat_template == f["tokenizer.chat_template"].contents()


@pytest.mark.parametrize("messages", [
    [{"role": "user", "content": "What is 7 * 8?"}],
    [{"role": "system", "content": "You answer in one word."},
     {"role": "user", "content": "Capital of France?"}, {"role": "assistant", "content": "Paris"},
     {"role": "user", "content": "And of Italy?"}],
])
def test_chat_template_as_transformers(tok, hf_tokenizer, messages):
    for gen in (True, False):
        ours = tok.apply_chat_template(messages, add_generation_prompt=gen)
        theirs = hf_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
        assert ours == theirs
        ids = tok.encode(ours, add_special_tokens=False)
        assert ids == hf_tokenizer(theirs, add_special_tokens=False).input_ids
        # <|im_start|> / <|im_end|> are single special ids, not spelled out.
        assert ids.count(tok.token_to_id("<|im_start|>")) == ours.count("<|im_start|>") > 0
        assert ids.count(tok.eos_id) == ours.count("<|im_end|>")


# ---------------------------------------------------------------------------------------------
# Logits
# ---------------------------------------------------------------------------------------------
def test_conversion_is_a_language_model(hf_model, tok):
    """The conversion undid llama.cpp's Q/K row interleaving: with it left in (or applied
    twice) the same text's NLL is about 3.2 nats; converted right it is about 1.8."""
    ids = tok.encode(EIFFEL, add_special_tokens=False)
    assert _nll(_hf_logits(hf_model, ids), ids) < 2.4


def test_logits_fp32_match_transformers(model, hf_model, tok):
    for text in (EIFFEL, CODE):
        ids = tok.encode(text, add_special_tokens=False)
        ref = _hf_logits(hf_model, ids)
        got = np.asarray(model(jnp.asarray([ids]))[0])
        scale = np.abs(ref).max()
        err = np.abs(got - ref).max()
        print(f"fp32 {len(ids)} tokens: max|diff| {err:.3g}, max|logit| {scale:.3g}")
        assert err <= 2e-5 * scale


@pytest.mark.parametrize("param_dtype", ["float32", "bfloat16"])
def test_logits_bf16_close_to_transformers_fp32(smollm2_dir, hf_model, tok, param_dtype):
    ids = tok.encode(EIFFEL, add_special_tokens=False)
    ref = _hf_logits(hf_model, ids)
    m = from_pretrained(smollm2_dir, dtype="bfloat16", param_dtype=param_dtype, scan_layers=True)
    got = np.asarray(m(jnp.asarray([ids]))[0].astype(jnp.float32))
    scale = np.abs(ref).max()
    diff = np.abs(got - ref)
    agree = float((got.argmax(-1) == ref.argmax(-1)).mean())
    print(f"bf16/{param_dtype}: mean {diff.mean() / scale:.3%}, max {diff.max() / scale:.3%} of max|logit|, "
          f"argmax agreement {agree:.3f}")
    assert diff.mean() <= 0.01 * scale and diff.max() <= 0.06 * scale
    assert agree >= 0.9
    assert abs(_nll(got, ids) - _nll(ref, ids)) <= 0.05


# ---------------------------------------------------------------------------------------------
# Greedy generation
# ---------------------------------------------------------------------------------------------
def test_greedy_generation_matches_transformers(model, hf_model, tok, gsm8k_rows):
    new = 40
    prompts = [tok.apply_chat_template([{"role": "user", "content": r["question"]}]) for r in gsm8k_rows[:3]]
    ids = [tok.encode(p, add_special_tokens=False) for p in prompts]
    out = sample(model, ids, key=jax.random.key(0), temperature=0.0, max_new_tokens=new,
                 pad_id=tok.pad_id)
    tokens, lengths = jax.device_get((out.tokens, out.lengths))
    compared = 0
    for r, p in enumerate(ids):
        with torch.no_grad():
            g = hf_model.generate(torch.tensor([p]), max_new_tokens=new, do_sample=False,
                                  output_scores=True, return_dict_in_generate=True,
                                  eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
        want = g.sequences[0, len(p):].tolist()
        got = tokens[r, :int(lengths[r])].tolist()
        for j, w in enumerate(want):
            top2 = torch.topk(g.scores[j][0], 2).values
            if float(top2[0] - top2[1]) < NEAR_TIE:
                break  # a near-tie: either order is right, and the rest follows from it
            assert j < len(got) and got[j] == w, (r, j, tok.decode(got[:j + 1]), tok.decode(want[:j + 1]))
            compared += 1
        else:
            assert got == want
    assert compared >= 60  # most of the 120 tokens were compared
