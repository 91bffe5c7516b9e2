"""Tokenizer wrapper: char tokenizer, R1-Zero template, chat templates and parity with
transformers' AutoTokenizer on tokenizers built here (no downloads)."""

import json
import os

import jinja2
import pytest
from tokenizers import Tokenizer as HFTok
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from r1jax.tokenizer import (
    CHAR_VOCAB, R1_ZERO_TEMPLATE, THINK_TAGS, Tokenizer, TokenizerError, apply_template,
    char_tokenizer,
)

# The template as printed in the R1 paper (../shared/R1_NOTES.md), typed out independently.
PAPER_R1_ZERO = (
    "A conversation between User and Assistant. The user asks a question, and the Assistant solves it. "
    "The assistant first thinks about the reasoning process in the mind and then provides the user "
    "with the answer. The reasoning process and answer are enclosed within <think> </think> and "
    "<answer> </answer> tags, respectively, i.e., <think> reasoning process here </think> "
    "<answer> answer here </answer>. User: {prompt}. Assistant:"
)

QWEN_LIKE_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{%- endif %}\n"
    "{%- for message in messages %}\n"
    "  {%- if message.role == 'system' and not loop.first %}{{ raise_exception('system message must come first') }}{%- endif %}\n"
    "  {%- if not (message.role == 'system' and loop.first) %}\n"
    "    {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}\n"
    "  {%- endif %}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}\n"
)

LLAMA_LIKE_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n{{ m['content'] | trim }}<|eot_id|>"
    "{% endfor %}{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
    "{% if meta is defined %}{{ meta | tojson }}{% endif %}"
)

CORPUS = [
    "The quick brown fox jumps over the lazy dog. 1234567890 + - * / = ?",
    "A conversation between User and Assistant. The user asks a question.",
    "<think> reasoning process here </think> <answer> answer here </answer>",
    "What is 23+45? Let me think step by step: 3+5=8, 2+4=6, so 68.",
    "Ünïcödé and emoji \U0001F600 and 中文 text, tabs\tand\nnewlines.",
] * 4

TEXTS = [
    "What is 23+45?",
    "  leading spaces and trailing  ",
    "<think>7+8=15,4+3+1=8</think> <answer>85</answer>",
    "Ünïcödé \U0001F600 中文\n\tmixed",
    "",
    R1_ZERO_TEMPLATE.replace("{prompt}", "Solve 3x+7=22"),
]

CONVERSATIONS = [
    [{"role": "user", "content": "What is 2+2?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "3*7?"}],
]


def _bpe(specials, post_bos=None):
    tok = HFTok(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    if post_bos:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{post_bos} $A", pair=f"{post_bos} $A {post_bos} $B",
            special_tokens=[(post_bos, tok.token_to_id(post_bos))])
    return tok


def qwen_like():
    tok = _bpe(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    return Tokenizer(tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", chat_template=QWEN_LIKE_TEMPLATE)


def llama_like():
    tok = _bpe(["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                "<|eot_id|>"], post_bos="<|begin_of_text|>")
    return Tokenizer(tok, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>", chat_template=LLAMA_LIKE_TEMPLATE)


def test_r1_zero_template_matches_paper():
    assert R1_ZERO_TEMPLATE == PAPER_R1_ZERO
    assert apply_template("2+2", "r1_zero") == PAPER_R1_ZERO.replace("{prompt}", "2+2")
    assert apply_template("2+2", "none") == "2+2"
    assert apply_template("2+2", "Q: {prompt}\nA:") == "Q: 2+2\nA:"
    with pytest.raises(TokenizerError, match="unknown prompt template 'r2'"):
        apply_template("x", "r2")
    with pytest.raises(TokenizerError, match="needs a tokenizer"):
        apply_template("x", "chat")


def test_char_tokenizer_small_vocab_and_whole_tags():
    tok = char_tokenizer()
    assert tok.vocab_size < 128
    assert (tok.pad_id, tok.eos_id, tok.bos_id) == (0, 1, 2)
    for tag in THINK_TAGS:
        assert len(tok.encode(tag)) == 1, tag
    text = "<think>7+8=15,4+3+1=8</think> <answer>85</answer>"
    ids = tok.encode(text)
    # 4 tags + one id per remaining character.
    assert len(ids) == 4 + len(text) - sum(len(t) for t in THINK_TAGS)
    assert tok.decode(ids) == text
    # Every character of the vocabulary has its own id and round-trips.
    assert len(tok.encode(CHAR_VOCAB)) == len(CHAR_VOCAB)
    assert tok.decode(tok.encode(CHAR_VOCAB)) == CHAR_VOCAB
    # Special tokens are dropped by default, kept on request; tags are never dropped.
    wrapped = [tok.bos_id] + ids + [tok.eos_id, tok.pad_id]
    assert tok.decode(wrapped) == text
    assert tok.decode(wrapped, skip_special_tokens=False) == "<bos>" + text + "<eos><pad>"
    assert tok.batch_decode([ids, ids[:1]]) == [text, "<think>"]
    # Unknown characters become <unk>, one each.
    assert tok.encode("a\u00e9b") == [tok.encode("a")[0], tok.token_to_id("<unk>"), tok.encode("b")[0]]
    # The whole R1-Zero prompt is representable.
    prompt = apply_template("12+34", "r1_zero")
    assert tok.decode(tok.encode(prompt)) == prompt


def test_char_tokenizer_extra_special():
    tok = char_tokenizer(extra_special=["<sep>"])
    sep = tok.token_to_id("<sep>")
    assert sep is not None and len(tok.encode("a<sep>b")) == 3
    assert tok.decode(tok.encode("a<sep>b")) == "ab"


@pytest.mark.parametrize("make", [char_tokenizer, qwen_like, llama_like], ids=["char", "qwen", "llama"])
def test_save_load_roundtrip_and_autotokenizer_parity(tmp_path, make):
    from transformers import AutoTokenizer

    tok = make()
    tok.save(str(tmp_path))
    ours = Tokenizer.from_pretrained(str(tmp_path))
    hf = AutoTokenizer.from_pretrained(str(tmp_path))
    assert (ours.eos_id, ours.pad_id, ours.bos_id) == (tok.eos_id, tok.pad_id, tok.bos_id)
    assert ours.vocab_size == tok.vocab_size == len(hf)
    assert hf.eos_token_id == ours.eos_id
    assert hf.bos_token_id == ours.bos_id
    texts = TEXTS if make is not char_tokenizer else [t for t in TEXTS if t.isascii()]
    for text in texts:
        ids = ours.encode(text)
        assert ids == tok.encode(text)
        assert ids == hf.encode(text), text
        assert ours.encode(text, add_special_tokens=False) == hf.encode(text, add_special_tokens=False)
        assert ours.decode(ids) == hf.decode(ids, skip_special_tokens=True)
        assert ours.decode(ids, skip_special_tokens=False) == hf.decode(ids, skip_special_tokens=False)
    for conv in CONVERSATIONS:
        for gen in (True, False):
            rendered = ours.apply_chat_template(conv, add_generation_prompt=gen)
            expected = hf.apply_chat_template(conv, tokenize=False, add_generation_prompt=gen)
            assert rendered == expected
            hf_ids = hf.apply_chat_template(conv, tokenize=True, add_generation_prompt=gen)
            if isinstance(hf_ids, dict) or hasattr(hf_ids, "keys"):
                hf_ids = hf_ids["input_ids"]
            assert ours.encode(rendered, add_special_tokens=False) == list(hf_ids)
    chat_prompt = apply_template("What is 2+2?", "chat", tok)
    assert chat_prompt == hf.apply_chat_template(CONVERSATIONS[0], tokenize=False, add_generation_prompt=True)


def test_llama_bos_from_post_processor_not_doubled(tmp_path):
    tok = llama_like()
    ids = tok.encode("hello")
    assert ids[0] == tok.bos_id and ids.count(tok.bos_id) == 1
    # Chat-rendered text holds its own bos; encoding it must not add a second one.
    rendered = tok.apply_chat_template(CONVERSATIONS[0])
    assert rendered.startswith("<|begin_of_text|>")
    assert tok.encode(rendered, add_special_tokens=False).count(tok.bos_id) == 1


def test_chat_template_variables_and_raise_exception():
    tok = llama_like()
    out = tok.apply_chat_template(CONVERSATIONS[0], meta={"k": "é"})
    assert out.endswith('{"k": "é"}')  # tojson without HTML escaping or ASCII escapes
    q = qwen_like()
    bad = [{"role": "user", "content": "a"}, {"role": "system", "content": "late"}]
    with pytest.raises(jinja2.TemplateError, match="system message must come first"):
        q.apply_chat_template(bad)


def test_from_pretrained_config_forms(tmp_path):
    tok = qwen_like()
    tok.save(str(tmp_path))
    conf_path = tmp_path / "tokenizer_config.json"
    conf = json.loads(conf_path.read_text())
    # Special tokens stored as AddedToken dicts, and the template as a named list.
    conf["eos_token"] = {"content": "<|im_end|>", "special": True}
    conf["chat_template"] = [{"name": "default", "template": "X{{ messages[0]['content'] }}"}]
    conf_path.write_text(json.dumps(conf))
    loaded = Tokenizer.from_pretrained(str(tmp_path))
    assert loaded.eos_token == "<|im_end|>"
    assert loaded.apply_chat_template(CONVERSATIONS[0]) == "XWhat is 2+2?"
    # chat_template.jinja wins over the config (what recent transformers writes).
    (tmp_path / "chat_template.jinja").write_text("J{{ messages | length }}")
    assert Tokenizer.from_pretrained(str(tmp_path)).apply_chat_template(CONVERSATIONS[1]) == "J4"


def test_from_pretrained_errors(tmp_path):
    with pytest.raises(TokenizerError, match="tokenizer directory not found: .*nope"):
        Tokenizer.from_pretrained(str(tmp_path / "nope"))
    with pytest.raises(TokenizerError, match="no tokenizer.json"):
        Tokenizer.from_pretrained(str(tmp_path))
    (tmp_path / "vocab.txt").write_text("a\n")
    with pytest.raises(TokenizerError, match="vocab.txt: is a file; give the directory"):
        Tokenizer.from_pretrained(str(tmp_path / "vocab.txt"))
    (tmp_path / "vocab.txt").unlink()
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(TokenizerError, match="tokenizer.json: not valid JSON"):
        Tokenizer.from_pretrained(str(tmp_path))
    qwen_like().backend.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(TokenizerError, match="no eos_token"):
        Tokenizer.from_pretrained(str(tmp_path))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|nope|>"}))
    with pytest.raises(TokenizerError, match="eos_token '<\\|nope\\|>' is not in the tokenizer's vocabulary"):
        Tokenizer.from_pretrained(str(tmp_path))
    with pytest.raises(TokenizerError, match="has no chat_template"):
        Tokenizer(qwen_like().backend, eos_token="<|im_end|>").apply_chat_template(CONVERSATIONS[0])


def test_generation_config_eos_fallback(tmp_path):
    q = qwen_like()
    q.backend.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [q.eos_id, 0]}))
    loaded = Tokenizer.from_pretrained(str(tmp_path))
    assert loaded.eos_id == q.eos_id and loaded.pad_id == q.eos_id  # no pad token: eos pads
    assert os.path.isfile(tmp_path / "tokenizer.json")


def _damage(data: bytes, how: str) -> bytes:
    return {"truncated": data[: len(data) // 2], "empty": b"", "garbled": bytes(range(256)) * 8,
            "wrong kind": b'{"architectures": ["Qwen2ForCausalLM"], "hidden_size": 8}',
            "not an object": b"[1, 2, 3]"}[how]


@pytest.mark.parametrize("file", ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                                  "generation_config.json"])
@pytest.mark.parametrize("how", ["truncated", "empty", "garbled", "wrong kind", "not an object"])
def test_damaged_tokenizer_files_are_named_in_one_line(tmp_path, file, how):
    char_tokenizer().save(str(tmp_path))
    (tmp_path / "special_tokens_map.json").write_text(json.dumps({"eos_token": "<eos>"}))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": 1}))
    path = tmp_path / file
    damaged = _damage(path.read_bytes(), how)
    path.write_bytes(damaged)
    expect = {"truncated": "not valid JSON", "empty": "is empty", "garbled": "not UTF-8",
              "wrong kind": "not a tokenizer", "not an object": "expected a JSON object"}[how]
    if file != "tokenizer.json" and how == "wrong kind":
        # Valid JSON with other keys: a config file with no tokens in it is harmless, unless it
        # misses what the tokenizer needs (generation_config.json is only read without eos).
        Tokenizer.from_pretrained(str(tmp_path))
        return
    if file == "generation_config.json":
        # Only read when no eos_token is configured: remove it so the file matters.
        conf = json.loads((tmp_path / "tokenizer_config.json").read_text())
        conf.pop("eos_token")
        (tmp_path / "tokenizer_config.json").write_text(json.dumps(conf))
        (tmp_path / "special_tokens_map.json").write_text("{}")
    if file == "tokenizer.json" and how == "truncated":
        expect = "not valid JSON"
    with pytest.raises(TokenizerError) as e:
        Tokenizer.from_pretrained(str(tmp_path))
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg and expect in msg, msg


def test_wrong_kinds_of_values_in_tokenizer_config_are_named(tmp_path):
    char_tokenizer().save(str(tmp_path))
    conf_file = tmp_path / "tokenizer_config.json"
    conf = json.loads(conf_file.read_text())
    for key, value, expect in (("eos_token", 5, "eos_token must be a string"),
                               ("pad_token", ["<pad>"], "pad_token must be a string"),
                               ("chat_template", 3, "chat_template must be a string")):
        conf_file.write_text(json.dumps({**conf, key: value}))
        with pytest.raises(TokenizerError, match=f"^{conf_file}: {expect}"):
            Tokenizer.from_pretrained(str(tmp_path))
    conf.pop("eos_token")
    conf_file.write_text(json.dumps(conf))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": 10**6}))
    with pytest.raises(TokenizerError, match="generation_config.json: eos_token_id 1000000 is not an id"):
        Tokenizer.from_pretrained(str(tmp_path))
