"""Tokenizers: a thin wrapper over Hugging Face `tokenizers`, the R1-Zero prompt template,
chat templates rendered with jinja2 the way `transformers` renders them, and a tiny
character-level tokenizer for models trained from scratch (the CPU demo).

Nothing here imports `transformers`: a checkpoint directory's tokenizer.json and
tokenizer_config.json are enough, and `Tokenizer.save` writes a directory that
`transformers.AutoTokenizer` loads with the same ids and the same chat template.
"""

from __future__ import annotations

import datetime
import json
import os
import string
from typing import Any, Dict, Iterable, List, Optional, Sequence

import tokenizers
from tokenizers import AddedToken, decoders, models

# DeepSeek-R1, section 2.2.1 (Table 1): the template R1-Zero was trained with. `{prompt}` is
# replaced by the question.
R1_ZERO_TEMPLATE = (
    "A conversation between User and Assistant. The user asks a question, and the Assistant "
    "solves it. The assistant first thinks about the reasoning process in the mind and then "
    "provides the user with the answer. The reasoning process and answer are enclosed within "
    "<think> </think> and <answer> </answer> tags, respectively, i.e., <think> reasoning "
    "process here </think> <answer> answer here </answer>. User: {prompt}. Assistant:"
)

TEMPLATES = ("r1_zero", "chat", "none")

# The tags a reasoning completion is made of; the char tokenizer gives each one id.
THINK_TAGS = ("<think>", "</think>", "<answer>", "</answer>")

_SPECIAL_KEYS = ("bos_token", "eos_token", "pad_token", "unk_token")


class TokenizerError(ValueError):
    """A tokenizer directory or template problem, with a message naming the culprit."""


def _token_content(value: Any, key: str, file: str) -> Optional[str]:
    """tokenizer_config.json stores special tokens as a string or as an AddedToken dict."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    raise TokenizerError(f"{file}: {key} must be a string or an AddedToken mapping with 'content', "
                         f"got {type(value).__name__} {str(value)[:60]!r}")


def _read_json(file: str) -> Dict[str, Any]:
    """A JSON object from `file`, or a TokenizerError naming the file and what is wrong."""
    try:
        with open(file, "rb") as f:
            data = f.read()
    except OSError as e:
        raise TokenizerError(f"{file}: cannot be read: {e.strerror or e}") from None
    if not data.strip():
        raise TokenizerError(f"{file}: the file is empty (truncated?)")
    try:
        obj = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise TokenizerError(f"{file}: not UTF-8 text (byte {e.start}): garbled or not a JSON file") from None
    except json.JSONDecodeError as e:
        raise TokenizerError(f"{file}: not valid JSON (truncated or garbled?): {e.msg} (line {e.lineno}, "
                             f"column {e.colno})") from None
    if not isinstance(obj, dict):
        raise TokenizerError(f"{file}: expected a JSON object, got a {type(obj).__name__}")
    return obj


def _why_unreadable(tok_file: str, err: Exception) -> str:
    """What is wrong with a tokenizer.json that `tokenizers` refused, in words."""
    try:
        obj = _read_json(tok_file)
    except TokenizerError as e:
        return str(e)
    if "model" not in obj:
        return (f"{tok_file}: valid JSON but not a tokenizer (no 'model' section; keys: "
                f"{', '.join(sorted(obj)[:8])})")
    return f"{tok_file}: cannot be read: {str(err).splitlines()[0]}"


def _tojson(x: Any, ensure_ascii: bool = False, indent: Optional[int] = None,
            separators: Any = None, sort_keys: bool = False) -> str:
    # Jinja's own tojson HTML-escapes its output, which chat templates do not want.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _raise_exception(message: str) -> None:
    from jinja2.exceptions import TemplateError
    raise TemplateError(message)


def _strftime_now(fmt: str) -> str:
    return datetime.datetime.now().strftime(fmt)


_TEMPLATE_CACHE: Dict[str, Any] = {}


def compile_chat_template(source: str):
    """Compile a chat template in a sandbox with the same settings and helpers as `transformers`
    (trim_blocks, lstrip_blocks, loop controls, `tojson`, `raise_exception`, `strftime_now`)."""
    if source not in _TEMPLATE_CACHE:
        import jinja2.ext
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                           extensions=[jinja2.ext.loopcontrols])
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = _strftime_now
        _TEMPLATE_CACHE[source] = env.from_string(source)
    return _TEMPLATE_CACHE[source]


class Tokenizer:
    """A `tokenizers.Tokenizer` plus what tokenizer_config.json adds: special tokens and the
    chat template.

    Args:
      tok: the fast tokenizer.
      bos_token, eos_token, pad_token, unk_token: special-token strings (each must be in the
        vocabulary when given). Without a pad token, the eos token pads.
      chat_template: a jinja2 chat template, or None.
      add_bos: whether `encode(..., add_special_tokens=True)` should prepend bos itself; only
        for tokenizers whose post-processor does not already do it.
    """

    def __init__(self, tok: tokenizers.Tokenizer, *, bos_token: Optional[str] = None,
                 eos_token: Optional[str] = None, pad_token: Optional[str] = None,
                 unk_token: Optional[str] = None, chat_template: Optional[str] = None,
                 add_bos: bool = False, model_max_length: Optional[int] = None):
        self._tok = tok
        self.bos_token, self.eos_token = bos_token, eos_token
        self.pad_token, self.unk_token = pad_token, unk_token
        self.chat_template = chat_template
        self.add_bos = add_bos
        self.model_max_length = model_max_length
        for key in _SPECIAL_KEYS:
            token = getattr(self, key)
            if token is not None and tok.token_to_id(token) is None:
                raise TokenizerError(f"{key} {token!r} is not in the tokenizer's vocabulary")
        if eos_token is None:
            raise TokenizerError("the tokenizer has no eos_token: generation could never stop")

    # ----------------------------------------------------------------------------------------
    # Loading and saving
    # ----------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str) -> "Tokenizer":
        """Load tokenizer.json plus tokenizer_config.json (special tokens, chat template) from
        a Hugging Face model directory. A chat_template.jinja file, or a template in
        special_tokens_map.json / tokenizer_config.json's list form, are read too."""
        tok_file = os.path.join(path, "tokenizer.json")
        if os.path.isfile(path):
            raise TokenizerError(f"{path}: is a file; give the directory that holds tokenizer.json")
        if not os.path.isdir(path):
            raise TokenizerError(f"tokenizer directory not found: {path}")
        if not os.path.isfile(tok_file):
            raise TokenizerError(f"{path}: no tokenizer.json (only fast tokenizers are supported)")
        try:
            tok = tokenizers.Tokenizer.from_file(tok_file)
        except Exception as e:  # tokenizers raises a bare Exception on a malformed file
            raise TokenizerError(_why_unreadable(tok_file, e)) from None
        conf: Dict[str, Any] = {}
        where: Dict[str, str] = {}  # key -> the file it came from, for messages
        for name in ("special_tokens_map.json", "tokenizer_config.json"):
            file = os.path.join(path, name)
            if os.path.isfile(file):
                part = _read_json(file)
                conf.update(part)
                where.update(dict.fromkeys(part, file))
        template = conf.get("chat_template")
        if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default") or next(iter(named.values()), None)
        if template is not None and not isinstance(template, str):
            raise TokenizerError(f"{where['chat_template']}: chat_template must be a string, got "
                                 f"{type(template).__name__}")
        jinja_file = os.path.join(path, "chat_template.jinja")
        if os.path.isfile(jinja_file):
            try:
                with open(jinja_file, encoding="utf-8") as f:
                    template = f.read()
            except UnicodeDecodeError as e:
                raise TokenizerError(f"{jinja_file}: not UTF-8 text (byte {e.start})") from None
        specials = {k: _token_content(conf.get(k), k, where.get(k, path)) for k in _SPECIAL_KEYS}
        if specials["eos_token"] is None:
            gen_file = os.path.join(path, "generation_config.json")
            eos_id = None
            if os.path.isfile(gen_file):
                eos_id = _read_json(gen_file).get("eos_token_id")
                if isinstance(eos_id, list):
                    eos_id = eos_id[0] if eos_id else None
                if eos_id is not None and (not isinstance(eos_id, int) or tok.id_to_token(eos_id) is None):
                    raise TokenizerError(f"{gen_file}: eos_token_id {eos_id!r} is not an id of the tokenizer")
            if eos_id is not None:
                specials["eos_token"] = tok.id_to_token(eos_id)
        # add_bos_token in the config only matters when tokenizer.json's post-processor does
        # not insert bos already (Llama 3's does).
        add_bos = bool(conf.get("add_bos_token", False)) and specials["bos_token"] is not None
        if add_bos:
            probe = tok.encode("a", add_special_tokens=True).ids
            add_bos = not probe or probe[0] != tok.token_to_id(specials["bos_token"])
        # transformers writes a huge sentinel (1e30) when the length is unknown.
        max_len = conf.get("model_max_length")
        max_len = int(max_len) if isinstance(max_len, (int, float)) and max_len < 1e12 else None
        try:
            return cls(tok, chat_template=template, add_bos=add_bos, model_max_length=max_len, **specials)
        except TokenizerError as e:
            raise TokenizerError(f"{path}: {e}") from None

    def save(self, path: str) -> None:
        """Write tokenizer.json and tokenizer_config.json (loadable by transformers'
        AutoTokenizer as a PreTrainedTokenizerFast)."""
        os.makedirs(path, exist_ok=True)
        self._tok.save(os.path.join(path, "tokenizer.json"))
        added = {}
        for tid, tok in sorted(self._tok.get_added_tokens_decoder().items()):
            added[str(tid)] = {
                "content": tok.content, "lstrip": tok.lstrip, "rstrip": tok.rstrip,
                "normalized": tok.normalized, "single_word": tok.single_word, "special": tok.special,
            }
        conf: Dict[str, Any] = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "added_tokens_decoder": added,
            "clean_up_tokenization_spaces": False,
            "add_bos_token": self.add_bos,
        }
        for key in _SPECIAL_KEYS:
            if getattr(self, key) is not None:
                conf[key] = getattr(self, key)
        if self.model_max_length is not None:
            conf["model_max_length"] = self.model_max_length
        if self.chat_template is not None:
            conf["chat_template"] = self.chat_template
        with open(os.path.join(path, "tokenizer_config.json"), "w", encoding="utf-8") as f:
            json.dump(conf, f, indent=2, ensure_ascii=False)

    # ----------------------------------------------------------------------------------------
    # Ids
    # ----------------------------------------------------------------------------------------
    def _id(self, token: Optional[str]) -> Optional[int]:
        return None if token is None else self._tok.token_to_id(token)

    @property
    def eos_id(self) -> int:
        return self._id(self.eos_token)

    @property
    def bos_id(self) -> Optional[int]:
        return self._id(self.bos_token)

    @property
    def pad_id(self) -> int:
        """The pad id; the eos id when the tokenizer has no pad token (padding is masked)."""
        pid = self._id(self.pad_token)
        return self.eos_id if pid is None else pid

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included (an embedding table needs at least this many)."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def backend(self) -> tokenizers.Tokenizer:
        """The underlying `tokenizers.Tokenizer`."""
        return self._tok

    def token_to_id(self, token: str) -> Optional[int]:
        return self._tok.token_to_id(token)

    def id_to_token(self, tid: int) -> Optional[str]:
        return self._tok.id_to_token(tid)

    # ----------------------------------------------------------------------------------------
    # Encoding and decoding
    # ----------------------------------------------------------------------------------------
    def encode(self, text: str, add_special_tokens: bool = True) -> List[int]:
        """Token ids of `text`. `add_special_tokens` runs tokenizer.json's post-processor (e.g.
        Llama 3's bos); text rendered from a chat template already holds its special tokens, so
        encode it with add_special_tokens=False."""
        ids = self._tok.encode(text, add_special_tokens=add_special_tokens).ids
        if add_special_tokens and self.add_bos and (not ids or ids[0] != self.bos_id):
            ids = [self.bos_id] + ids
        return ids

    def encode_batch(self, texts: Sequence[str], add_special_tokens: bool = True) -> List[List[int]]:
        """`encode` for many texts at once (tokenizers parallelises in Rust)."""
        encs = self._tok.encode_batch(list(texts), add_special_tokens=add_special_tokens)
        out = [e.ids for e in encs]
        if add_special_tokens and self.add_bos:
            out = [ids if ids and ids[0] == self.bos_id else [self.bos_id] + ids for ids in out]
        return out

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        """Text of `ids` (numpy arrays and jax arrays are accepted)."""
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def batch_decode(self, ids_BxT: Iterable[Iterable[int]], skip_special_tokens: bool = True) -> List[str]:
        """`decode` for each row of a batch."""
        return self._tok.decode_batch([[int(i) for i in row] for row in ids_BxT],
                                      skip_special_tokens=skip_special_tokens)

    # ----------------------------------------------------------------------------------------
    # Chat template
    # ----------------------------------------------------------------------------------------
    def apply_chat_template(self, messages: List[Dict[str, Any]], add_generation_prompt: bool = True,
                            **kwargs: Any) -> str:
        """Render `messages` ([{"role": ..., "content": ...}]) with the model's chat template,
        with the variables transformers passes (special tokens, add_generation_prompt); extra
        keyword arguments reach the template too."""
        if self.chat_template is None:
            raise TokenizerError("this tokenizer has no chat_template (use template='r1_zero' or 'none')")
        variables: Dict[str, Any] = {k: getattr(self, k) for k in _SPECIAL_KEYS
                                     if getattr(self, k) is not None}
        variables.update(kwargs)
        return compile_chat_template(self.chat_template).render(
            messages=messages, add_generation_prompt=add_generation_prompt,
            tools=variables.pop("tools", None), documents=variables.pop("documents", None), **variables)

    def __repr__(self) -> str:
        return (f"Tokenizer(vocab_size={self.vocab_size}, eos={self.eos_token!r}, "
                f"pad={self.pad_token!r}, bos={self.bos_token!r}, "
                f"chat_template={self.chat_template is not None})")


def apply_template(question: str, template: str = "r1_zero", tokenizer: Optional[Tokenizer] = None) -> str:
    """The prompt text for `question`.

    template: "r1_zero" (DeepSeek-R1's R1-Zero template), "chat" (the tokenizer's chat template
    with one user message and the generation prompt), "none" (the question as is), or any
    string holding "{prompt}".
    """
    if template == "r1_zero":
        return R1_ZERO_TEMPLATE.replace("{prompt}", question)
    if template == "none":
        return question
    if template == "chat":
        if tokenizer is None:
            raise TokenizerError("template='chat' needs a tokenizer (its chat_template renders the prompt)")
        return tokenizer.apply_chat_template([{"role": "user", "content": question}],
                                             add_generation_prompt=True)
    if "{prompt}" in template:
        return template.replace("{prompt}", question)
    raise TokenizerError(f"unknown prompt template {template!r}; valid: {', '.join(TEMPLATES)} "
                         "or a string containing '{prompt}'")


def template_adds_special_tokens(template: str) -> bool:
    """Whether text from `template` should be encoded with the post-processor's special tokens:
    chat templates write their own (bos included), plain text does not."""
    return template != "chat"


# The characters of the character-level tokenizer: enough for the built-in tasks, the R1-Zero
# template and short English.
CHAR_VOCAB = string.digits + string.ascii_letters + string.punctuation + " \n"

# A minimal chat template for the char tokenizer (user/assistant turns separated by newlines).
CHAR_CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


def char_tokenizer(extra_special: Sequence[str] = ()) -> Tokenizer:
    """A character-level tokenizer for tiny models trained from scratch.

    Ids: <pad>=0, <eos>=1, <bos>=2, <unk>=3, then "<think>", "</think>", "<answer>",
    "</answer>" (one id each, matched whole, never split into characters), then `extra_special`
    (special tokens, dropped by decode(skip_special_tokens=True)), then one id per character of
    CHAR_VOCAB (digits, letters, punctuation, space, newline). Unknown characters map to <unk>.
    About 110 ids in all.
    """
    specials = ["<pad>", "<eos>", "<bos>", "<unk>"]
    vocab: Dict[str, int] = {}
    for t in [*specials, *THINK_TAGS, *extra_special]:
        vocab.setdefault(t, len(vocab))
    for c in CHAR_VOCAB:
        vocab.setdefault(c, len(vocab))
    # BPE without merges splits a word into its characters; with no pre-tokenizer the whole
    # text is one "word", so spaces and newlines are ordinary characters.
    tok = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    # The tags are added tokens (matched before the model) but not special: decoding keeps them,
    # so rewards can read them.
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in THINK_TAGS])
    if extra_special:
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in extra_special])
    tok.decoder = decoders.Fuse()
    return Tokenizer(tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>",
                     chat_template=CHAR_CHAT_TEMPLATE)


def load_tokenizer(path: Optional[str]) -> Tokenizer:
    """`Tokenizer.from_pretrained(path)`, or the char tokenizer when `path` is None or "char"."""
    if path is None or path == "char":
        return char_tokenizer()
    return Tokenizer.from_pretrained(path)


__all__ = [
    "Tokenizer", "TokenizerError", "R1_ZERO_TEMPLATE", "TEMPLATES", "THINK_TAGS", "CHAR_VOCAB",
    "apply_template", "char_tokenizer", "load_tokenizer", "compile_chat_template",
    "template_adds_special_tokens",
]
