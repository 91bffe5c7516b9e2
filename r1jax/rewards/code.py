"""Code reward: run the completion's program against the row's tests in the sandbox.

The program is the last fenced code block (```python ... ``` or plain ``` ... ```) of the
answer part of the completion (after ``</think>`` when there is one). A row's ``tests`` is
either

* a list of ``{"input": str, "output": str}`` stdin/stdout pairs (also accepted: a dict
  ``{"inputs": [...], "outputs": [...]}`` as in APPS/TACO, or its JSON text): the program runs
  once per pair, and passes when it exits with status 0 within the limits and its stdout
  matches (whitespace-separated tokens by default);
* a string of Python statements (``assert f(2) == 4``, or HumanEval's ``def check(candidate):``
  then ``check(f)``): the program runs once, then each top-level ``assert`` or expression
  statement is one test case, executed in the program's namespace; other statements (imports,
  definitions, assignments) are set-up.

HumanEval-style rows (r1jax.formats' "humaneval": columns ``code_prompt``, the function's
signature and docstring, and ``entry_point``, its name) take a completion that is either the
function body (HumanEval's own convention: the prompt is the start of the program) or the
whole function; it may be fenced or bare code. A completion that defines the entry point at
top level is run after the prompt (which keeps the prompt's imports and helper functions,
and is then overridden); otherwise it is appended to the prompt as the body.

The reward is the pass fraction (``mode="fraction"``) or 1/0 for all-pass (``mode="all"``,
which stops at the first failure). Containment is r1jax.rewards.sandbox's (read its docstring).
"""

from __future__ import annotations

import ast
import json
import re
import textwrap
import threading
from typing import Any, Dict, List, Optional, Sequence, Tuple

from r1jax.rewards.sandbox import Limits, Sandbox

_FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_+-]*)[^\n]*\n(.*?)```", re.DOTALL)
_NON_PYTHON = {"bash", "sh", "shell", "console", "text", "txt", "json", "yaml", "c", "cpp",
               "c++", "java", "javascript", "js", "rust", "go", "output", "plaintext"}


def extract_program(text: str) -> Optional[str]:
    """The last Python (or untagged) fenced code block of the answer part, or None."""
    text = text or ""
    if "</think>" in text:
        text = text.rsplit("</think>", 1)[1]
    blocks = [body for lang, body in _FENCE.findall(text) if lang.lower() not in _NON_PYTHON]
    return blocks[-1] if blocks else None


def _defines(code: str, name: str) -> bool:
    try:
        tree = ast.parse(code)
    except SyntaxError:
        return False
    return any(isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.name == name
               for n in tree.body)


def _parses(code: str) -> bool:
    try:
        ast.parse(code)
    except SyntaxError:
        return False
    return True


def humaneval_program(text: str, code_prompt: str, entry_point: str) -> str:
    """The program a HumanEval-style completion makes with its prompt (see the module
    docstring): the whole function after the prompt, or the body appended to it."""
    text = text or ""
    answer = text.rsplit("</think>", 1)[1] if "</think>" in text else text
    code = extract_program(answer)
    if code is None:
        code = answer
    if _defines(code, entry_point):
        return f"{code_prompt.rstrip()}\n\n\n{code}"
    code = code.lstrip("\n")
    joined = code_prompt + (code if code.startswith((" ", "\t")) else textwrap.indent(code, "    "))
    if not _parses(joined):  # e.g. a body written flush left, or unevenly indented
        fixed = code_prompt + textwrap.indent(textwrap.dedent(code), "    ")
        joined = fixed if _parses(fixed) else joined
    return joined


def parse_tests(tests: Any) -> Tuple[str, Any]:
    """("io", [(stdin, expected), ...]) or ("asserts", [statement, ...]); ValueError if neither."""
    if hasattr(tests, "tolist") and not isinstance(tests, str):
        tests = tests.tolist()  # numpy arrays / scalars from columnar datasets
    if isinstance(tests, str):
        s = tests.strip()
        if s[:1] in "[{":
            try:
                tests = json.loads(s)
            except json.JSONDecodeError:
                pass
    if isinstance(tests, dict) and "inputs" in tests and "outputs" in tests:
        tests = [{"input": i, "output": o} for i, o in zip(tests["inputs"], tests["outputs"])]
    if isinstance(tests, (list, tuple)):
        pairs = []
        for t in tests:
            if not isinstance(t, dict) or "input" not in t or "output" not in t:
                raise ValueError(f"code reward: a test must be {{'input': str, 'output': str}}, "
                                 f"got {str(t)[:80]!r}")
            pairs.append((_text(t["input"]), _text(t["output"])))
        return "io", pairs
    if isinstance(tests, str):
        try:
            tree = ast.parse(tests)
        except SyntaxError as e:
            raise ValueError(f"code reward: the assert-style tests do not parse: {e}") from None
        stmts = [ast.get_source_segment(tests, node) or ast.unparse(node) for node in tree.body]
        is_test = [isinstance(node, (ast.Assert, ast.Expr)) for node in tree.body]
        return "asserts", (stmts, is_test)
    raise ValueError(f"code reward: tests must be a list of stdin/stdout pairs or a string of "
                     f"asserts, got {type(tests).__name__}")


def _text(x: Any) -> str:
    if isinstance(x, (list, tuple)):
        return "\n".join(map(str, x))
    return "" if x is None else str(x)


def outputs_match(got: str, expected: str, compare: str = "tokens") -> bool:
    """tokens: same whitespace-separated tokens; lines: same lines up to trailing space; exact."""
    if compare == "tokens":
        return got.split() == expected.split()
    if compare == "lines":
        a = [ln.rstrip() for ln in got.rstrip().splitlines()]
        b = [ln.rstrip() for ln in expected.rstrip().splitlines()]
        return a == b
    if compare == "exact":
        return got == expected
    raise ValueError(f"code reward: compare must be tokens, lines or exact; got {compare!r}")


_SANDBOXES: Dict[tuple, Sandbox] = {}
_SANDBOX_LOCK = threading.Lock()


def get_sandbox(isolation: str = "auto", python: Optional[str] = None,
                ro_binds: Sequence[str] = (), **limits: Any) -> Sandbox:
    """A shared Sandbox per distinct configuration (the isolation probe runs once)."""
    key = (isolation, python, tuple(ro_binds), tuple(sorted(limits.items())))
    with _SANDBOX_LOCK:
        if key not in _SANDBOXES:
            _SANDBOXES[key] = Sandbox(Limits(**limits), isolation=isolation, python=python,
                                      ro_binds=ro_binds)
            _ = _SANDBOXES[key].isolation  # probe now, under the lock, once
        return _SANDBOXES[key]


def score_program(program: str, tests: Any, *, mode: str = "fraction", compare: str = "tokens",
                  max_tests: Optional[int] = None, sandbox: Optional[Sandbox] = None) -> float:
    """Run `program` on `tests` (see the module docstring) and return its reward."""
    if mode not in ("fraction", "all"):
        raise ValueError(f"code reward: mode must be 'fraction' or 'all', got {mode!r}")
    sandbox = sandbox or get_sandbox()
    kind, cases = parse_tests(tests)
    if kind == "io":
        cases = cases[:max_tests] if max_tests else cases
        if not cases:
            return 0.0
        if mode == "all":
            # Cheapest first failure: run one case, then the rest only if it passed.
            first = sandbox.run(program, [cases[0][0]])[0]
            if not (first.ok and outputs_match(first.stdout, cases[0][1], compare)):
                return 0.0
            results = [first] + sandbox.run(program, [c[0] for c in cases[1:]])
        else:
            results = sandbox.run(program, [c[0] for c in cases])
        passed = [r.ok and outputs_match(r.stdout, exp, compare)
                  for r, (_, exp) in zip(results, cases)]
    else:
        stmts, is_test = cases
        if not any(is_test):
            raise ValueError("code reward: the assert-style tests hold no assert or call")
        res = sandbox.run_asserts(program, stmts)
        ran = res.asserts or [False] * len(stmts)
        setup_ok = all(ok for ok, t in zip(ran, is_test) if not t)
        passed = [ok and setup_ok for ok, t in zip(ran, is_test) if t]
        if max_tests:
            passed = passed[:max_tests]
    if mode == "all":
        return 1.0 if all(passed) else 0.0
    return sum(passed) / len(passed)


def code(completions: Sequence[str], tests: Optional[Sequence[Any]] = None,
         code_prompt: Optional[Sequence[Any]] = None, entry_point: Optional[Sequence[Any]] = None, *,
         mode: str = "fraction", compare: str = "tokens", max_tests: Optional[int] = None,
         isolation: str = "auto", python: Optional[str] = None, ro_binds: Sequence[str] = (),
         time_limit_s: float = 5.0, cpu_limit_s: Optional[float] = None, memory_mb: int = 1024,
         max_processes: int = 32, max_output_bytes: int = 1 << 20,
         **unused: Any) -> List[Optional[float]]:
    """Code reward per completion: pass fraction (or all-pass) of the row's tests.

    None where the row has no tests; 0.0 when the completion holds no code block (rows with
    `code_prompt` and `entry_point`, HumanEval's, also take bare code). The limits are per
    test run (see r1jax.rewards.sandbox.Limits).
    """
    if tests is None:
        raise ValueError("code reward needs a 'tests' column (dataset field) per completion")
    sandbox = get_sandbox(isolation=isolation, python=python, ro_binds=ro_binds,
                          wall_s=time_limit_s, cpu_s=cpu_limit_s or time_limit_s,
                          memory_mb=memory_mb, max_processes=max_processes,
                          max_output_bytes=max_output_bytes)
    out: List[Optional[float]] = []
    n = len(completions)
    code_prompt = code_prompt if code_prompt is not None else [None] * n
    entry_point = entry_point if entry_point is not None else [None] * n
    for text, row_tests, prompt, entry in zip(completions, tests, code_prompt, entry_point):
        if row_tests is None or (isinstance(row_tests, (str, list, tuple)) and not row_tests):
            out.append(None)
            continue
        if prompt is not None and entry:
            program = humaneval_program(text, str(prompt), str(entry))
        else:
            program = extract_program(text)
        if program is None:
            parse_tests(row_tests)  # a malformed row is still reported as such
            out.append(0.0)
            continue
        out.append(score_program(program, row_tests, mode=mode, compare=compare,
                                 max_tests=max_tests, sandbox=sandbox))
    return out


# The runner's default per-sample timeout for this function: every test may use its limit.
code.timeout_s = 120.0
