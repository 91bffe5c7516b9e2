"""Format reward: R1-Zero's ``<think> reasoning </think> <answer> answer </answer>`` structure.

strict: the whole completion is exactly one think block followed by one non-empty answer block
(whitespace allowed around and between them, nothing else, no nested or repeated tags).
lenient: a ``<think>...</think>`` block appears somewhere before an ``<answer>...</answer>``
block; text around them is tolerated.

With ``answer_tag=False`` the answer is the text after ``</think>`` (R1's later format without
``<answer>``). With ``think_in_prompt=True`` the template already ended the prompt with
``<think>``, so the completion is checked as if it started with it.
"""

from __future__ import annotations

import re
from typing import Any, List, Optional, Sequence

_TAG = r"</?(?:think|answer)>"
_FREE = rf"(?:(?!{_TAG}).)"  # text without any of the four tags
_STRICT = re.compile(rf"\A\s*<think>{_FREE}*</think>\s*<answer>{_FREE}*?\S{_FREE}*</answer>\s*\Z",
                     re.DOTALL)
_STRICT_NO_ANSWER = re.compile(rf"\A\s*<think>{_FREE}*</think>{_FREE}*?\S{_FREE}*\Z", re.DOTALL)
_LENIENT = re.compile(r"<think>.*?</think>.*?<answer>.*?</answer>", re.DOTALL)
_LENIENT_NO_ANSWER = re.compile(r"<think>.*?</think>\s*\S", re.DOTALL)


def format_ok(text: str, strict: bool = True, answer_tag: bool = True,
              think_in_prompt: bool = False) -> bool:
    """Whether one completion follows the format."""
    text = text or ""
    if think_in_prompt and not text.lstrip().startswith("<think>"):
        text = "<think>" + text
    if strict:
        rx = _STRICT if answer_tag else _STRICT_NO_ANSWER
        return rx.match(text) is not None
    rx = _LENIENT if answer_tag else _LENIENT_NO_ANSWER
    return rx.search(text) is not None


def format(completions: Sequence[str], *, strict: bool = True, answer_tag: bool = True,
           think_in_prompt: bool = False, **unused: Any) -> List[Optional[float]]:
    """1.0 per completion that follows the R1-Zero format (strict or lenient), else 0.0."""
    return [1.0 if format_ok(c, strict, answer_tag, think_in_prompt) else 0.0
            for c in completions]
