"""Language-consistency reward (R1): the share of chain-of-thought words in the target language.

No model is involved: words are classified by Unicode script. Every Han, kana or Hangul
character counts as one word (these scripts do not separate words with spaces); a run of
letters of any other script counts as one word of that script; digits, maths and punctuation
are neutral. So "en" (and other Latin-script targets) cannot be told apart from each other:
the reward measures the script, which is what mixing (English / Chinese) looks like in R1.

The chain of thought is the text inside ``<think>...</think>`` (or before ``</think>`` when
the template opened the tag in the prompt, or the whole completion when there is no tag).
A chain of thought with no words at all scores None (cannot be scored).
"""

from __future__ import annotations

import re
import unicodedata
from typing import Any, Dict, List, Optional, Sequence

# Target language -> the scripts that count as that language.
LANGUAGE_SCRIPTS: Dict[str, tuple] = {
    "en": ("latin",), "fr": ("latin",), "de": ("latin",), "es": ("latin",),
    "it": ("latin",), "pt": ("latin",), "nl": ("latin",), "vi": ("latin",),
    "zh": ("han",), "ja": ("han", "kana"), "ko": ("hangul",), "ru": ("cyrillic",),
    "uk": ("cyrillic",), "ar": ("arabic",), "he": ("hebrew",), "el": ("greek",),
    "hi": ("devanagari",), "th": ("thai",),
}
_ALIASES = {"english": "en", "chinese": "zh", "zh-cn": "zh", "zh-tw": "zh", "zh-hans": "zh",
            "zh-hant": "zh", "japanese": "ja", "korean": "ko", "russian": "ru"}
_SPACELESS = ("han", "kana", "hangul", "thai")
_THINK = re.compile(r"<think>(.*?)(?:</think>|\Z)", re.DOTALL)


def _script(ch: str) -> Optional[str]:
    """The script of a letter (None for digits, punctuation, symbols, spaces)."""
    o = ord(ch)
    if (0x4E00 <= o <= 0x9FFF or 0x3400 <= o <= 0x4DBF or 0x20000 <= o <= 0x2FA1F
            or 0xF900 <= o <= 0xFAFF):
        return "han"
    if 0x3040 <= o <= 0x30FF or 0x31F0 <= o <= 0x31FF:
        return "kana"
    if 0xAC00 <= o <= 0xD7AF or 0x1100 <= o <= 0x11FF or 0x3130 <= o <= 0x318F:
        return "hangul"
    if not ch.isalpha():
        return None
    name = unicodedata.name(ch, "")
    for script in ("LATIN", "CYRILLIC", "GREEK", "ARABIC", "HEBREW", "DEVANAGARI", "THAI"):
        if name.startswith(script):
            return script.lower()
    return "other"


def count_words(text: str) -> Dict[str, int]:
    """Words per script in `text` (see the module docstring for what a word is)."""
    counts: Dict[str, int] = {}
    prev = None
    for ch in text:
        s = _script(ch)
        if s is not None and (s in _SPACELESS or s != prev):
            counts[s] = counts.get(s, 0) + 1
        prev = s
    return counts


def chain_of_thought(text: str) -> str:
    """The reasoning part of a completion."""
    blocks = _THINK.findall(text)
    if blocks:
        return "\n".join(blocks)
    if "</think>" in text:
        return text.split("</think>")[0]
    return text


def language_share(text: str, target: str) -> Optional[float]:
    """Share of the words of `text` written in `target`'s script(s); None without words."""
    key = _ALIASES.get(str(target).lower(), str(target).lower())
    if key not in LANGUAGE_SCRIPTS:
        raise ValueError(f"language_consistency: unknown target language {target!r}; known: "
                         f"{', '.join(sorted(LANGUAGE_SCRIPTS))}")
    counts = count_words(text)
    total = sum(counts.values())
    if total == 0:
        return None
    return sum(counts.get(s, 0) for s in LANGUAGE_SCRIPTS[key]) / total


def language_consistency(completions: Sequence[str], language: Optional[Sequence[Any]] = None,
                         *, target: str = "en", **unused: Any) -> List[Optional[float]]:
    """R1's language-consistency reward in [0, 1] per completion.

    The target is the row's `language` column when present and not None, else `target`.
    """
    out: List[Optional[float]] = []
    for i, text in enumerate(completions):
        lang = language[i] if language is not None and language[i] is not None else target
        out.append(language_share(chain_of_thought(text or ""), lang))
    return out
