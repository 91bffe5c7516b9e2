"""Data pipeline through Grain: readers, bad input, order, exact resume, sharding, mixture,
length filter, padding, SFT batches, synthetic tasks."""

import json
import re
from collections import Counter

import grain
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from r1jax.config import DataConfig, DataSourceConfig
from r1jax.data import (
    DataError, bucket_length, eval_batches, load_sources, per_process_batch_size, prompt_batches,
    read_rows, sft_batches,
)
from r1jax.tasks import TaskError, synthetic_rows
from r1jax.tokenizer import apply_template, char_tokenizer

TOK = char_tokenizer()
ONE = grain.sharding.ShardOptions(0, 1)


def _rows(n, prefix="q"):
    return [{"question": f"{prefix}{i}", "answer": str(i), "language": "en"} for i in range(n)]


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _cfg(**kw):
    kw.setdefault("template", "none")
    return DataConfig(**kw)


def _questions(it, n_batches):
    return [q for _ in range(n_batches) for q in next(it).questions]


def _hf_dir(path, table):
    """The layout `datasets.Dataset.save_to_disk` writes (state.json + IPC stream files)."""
    path.mkdir()
    with pa.OSFile(str(path / "data-00000-of-00001.arrow"), "wb") as f:
        with pa.ipc.new_stream(f, table.schema) as w:
            w.write_table(table)
    (path / "state.json").write_text(json.dumps({"_data_files": [{"filename": "data-00000-of-00001.arrow"}]}))
    (path / "dataset_info.json").write_text("{}")
    return str(path)


# ---------------------------------------------------------------------------------------------
# Readers
# ---------------------------------------------------------------------------------------------
def test_readers_jsonl_parquet_arrow_agree(tmp_path):
    rows = [{"problem": f"p{i}", "sol": str(i), "tests": ["t"] if i % 2 else None, "lang": "en"} for i in range(7)]
    cfg = _cfg(question_field="problem", answer_field="sol", language_field="lang")
    table = pa.Table.from_pylist(rows)
    pq.write_table(table, tmp_path / "d.parquet")
    sources = {
        "jsonl": read_rows(_jsonl(tmp_path / "d.jsonl", rows), cfg),
        "parquet": read_rows(str(tmp_path / "d.parquet"), cfg),
        "arrow": read_rows(_hf_dir(tmp_path / "hf", table), cfg),
    }
    for name, src in sources.items():
        assert len(src) == 7, name
        got = [src[i] for i in range(7)]
        assert [g["question"] for g in got] == [f"p{i}" for i in range(7)], name
        assert [g["answer"] for g in got] == [str(i) for i in range(7)], name
        assert [g["language"] for g in got] == ["en"] * 7, name
        assert got[1]["tests"] == ["t"] and got[0].get("tests") is None, name


def test_reader_datasets_save_to_disk(tmp_path):
    datasets = pytest.importorskip("datasets")  # test-only: r1jax reads the files with pyarrow
    rows = _rows(5)
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "ds"))
    src = read_rows(str(tmp_path / "ds"), _cfg())
    assert [src[i]["question"] for i in range(5)] == [r["question"] for r in rows]
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_list(rows),
                               "test": datasets.Dataset.from_list(_rows(2, "t"))})
    dd.save_to_disk(str(tmp_path / "dd"))
    assert len(read_rows(str(tmp_path / "dd"), _cfg())) == 5
    assert [r["question"] for r in read_rows(str(tmp_path / "dd"), _cfg(), split="test")] == ["t0", "t1"]
    with pytest.raises(DataError, match=r"dd: no split 'dev'; splits: \['train', 'test'\]"):
        read_rows(str(tmp_path / "dd"), _cfg(), split="dev")


def test_reader_glob_and_directory(tmp_path):
    (tmp_path / "parts").mkdir()
    _jsonl(tmp_path / "parts" / "a.jsonl", _rows(3, "a"))
    _jsonl(tmp_path / "parts" / "b.jsonl", _rows(2, "b"))
    assert len(read_rows(str(tmp_path / "parts" / "*.jsonl"), _cfg())) == 5
    assert len(read_rows(str(tmp_path / "parts"), _cfg())) == 5


# ---------------------------------------------------------------------------------------------
# Bad input: one line naming the culprit
# ---------------------------------------------------------------------------------------------
def test_missing_file(tmp_path):
    with pytest.raises(DataError, match=r"data file not found: .*nope\.jsonl"):
        read_rows(str(tmp_path / "nope.jsonl"), _cfg())
    with pytest.raises(DataError, match="no data files match"):
        read_rows(str(tmp_path / "*.parquet"), _cfg())


def test_row_without_required_field(tmp_path):
    rows = _rows(5)
    del rows[3]["answer"]
    path = _jsonl(tmp_path / "d.jsonl", rows)
    with pytest.raises(DataError, match=r"d\.jsonl: line 4, field 'answer' is missing"):
        read_rows(path, _cfg())
    # The error names the field as the file calls it.
    renamed = [{"q": r["question"], **({"a": r["answer"]} if "answer" in r else {})} for r in rows]
    with pytest.raises(DataError, match=r"line 4, field 'a' is missing"):
        read_rows(_jsonl(tmp_path / "r.jsonl", renamed), _cfg(question_field="q", answer_field="a"))
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    with pytest.raises(DataError, match=r"d\.parquet: row 3, field 'answer' is missing"):
        read_rows(str(tmp_path / "d.parquet"), _cfg())
    pq.write_table(pa.Table.from_pylist([{"question": "x"}]), tmp_path / "noans.parquet")
    with pytest.raises(DataError, match=r"noans\.parquet: row 0, field 'answer' is missing \(columns: question\)"):
        read_rows(str(tmp_path / "noans.parquet"), _cfg())
    # Skip-and-count instead.
    for p in (path, str(tmp_path / "d.parquet")):
        src = read_rows(p, _cfg(on_bad_row="skip"))
        assert len(src) == 4 and src.bad_rows == 1
        assert "q3" not in [src[i]["question"] for i in range(4)]
    it = prompt_batches(_cfg(path=path, on_bad_row="skip"), TOK, 2, shard_options=ONE)
    assert it.stats["bad_rows_skipped"] == 1


def test_empty_dataset(tmp_path):
    (tmp_path / "e.jsonl").write_text("\n")
    with pytest.raises(DataError, match=r"e\.jsonl: empty dataset"):
        read_rows(str(tmp_path / "e.jsonl"), _cfg())
    pq.write_table(pa.Table.from_pylist(_rows(1)).slice(0, 0), tmp_path / "e.parquet")
    with pytest.raises(DataError, match=r"e\.parquet: empty dataset"):
        read_rows(str(tmp_path / "e.parquet"), _cfg())
    only_bad = _jsonl(tmp_path / "b.jsonl", [{"question": "x"}])
    with pytest.raises(DataError, match=r"empty dataset \(no usable rows; 1 bad rows skipped\)"):
        read_rows(only_bad, _cfg(on_bad_row="skip"))


def test_not_utf8(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b'{"question": "ok", "answer": "1"}\n{"question": "caf\xe9", "answer": "2"}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl: line 2 is not valid UTF-8 \(byte 0xe9"):
        read_rows(str(path), _cfg())
    # An Arrow string column holding invalid bytes (Arrow does not check on write).
    bad = pa.Array.from_buffers(pa.string(), 1, [None, pa.py_buffer(np.array([0, 2], np.int32).tobytes()),
                                                 pa.py_buffer(b"\xff\xfe")])
    table = pa.table({"question": bad, "answer": pa.array(["1"])})
    with pytest.raises(DataError, match=r"data-00000-of-00001\.arrow: column 'question' holds text that is not valid UTF-8"):
        read_rows(_hf_dir(tmp_path / "hf", table), _cfg())
    # A binary question column is decoded, and rejected when it is not UTF-8.
    pq.write_table(pa.table({"question": pa.array([b"fine", b"\xff"]), "answer": ["1", "2"]}), tmp_path / "b.parquet")
    with pytest.raises(DataError, match=r"b\.parquet: row 1, field 'question': not valid UTF-8"):
        read_rows(str(tmp_path / "b.parquet"), _cfg())


def test_bad_json_and_unknown_format(tmp_path):
    p = tmp_path / "j.jsonl"
    p.write_text('{"question": "a", "answer": "1"}\n{"question": \n')
    with pytest.raises(DataError, match=r"j\.jsonl: line 2 is not valid JSON"):
        read_rows(str(p), _cfg())
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(DataError, match=r"x\.csv: cannot tell the format"):
        read_rows(str(tmp_path / "x.csv"), _cfg())


# ---------------------------------------------------------------------------------------------
# Order, resume, sharding
# ---------------------------------------------------------------------------------------------
def test_same_seed_same_order_new_order_each_epoch(tmp_path):
    path = _jsonl(tmp_path / "d.jsonl", _rows(20))
    a = _questions(prompt_batches(_cfg(path=path, seed=3), TOK, 4, shard_options=ONE), 10)
    b = _questions(prompt_batches(_cfg(path=path, seed=3), TOK, 4, shard_options=ONE), 10)
    c = _questions(prompt_batches(_cfg(path=path, seed=4), TOK, 4, shard_options=ONE), 10)
    assert a == b and a != c
    # Each epoch is a permutation of the data, in a new order.
    assert sorted(a[:20]) == sorted(a[20:]) == sorted(r["question"] for r in _rows(20))
    assert a[:20] != a[20:]
    # No shuffle: file order.
    d = _questions(prompt_batches(_cfg(path=path, shuffle=False), TOK, 5, shard_options=ONE), 4)
    assert d == [f"q{i}" for i in range(20)]


@pytest.mark.parametrize("k", [1, 3, 6])  # mid first epoch, at the epoch boundary region, in epoch 2
def test_resume_mid_epoch_continues_exact_sequence(tmp_path, k):
    rows = _rows(26) + [{"question": "x" * 40, "answer": "long"}] * 4  # some dropped by length
    path = _jsonl(tmp_path / "d.jsonl", rows)
    cfg = _cfg(path=path, seed=7, max_prompt_len=8, num_epochs=3)
    ref = prompt_batches(cfg, TOK, 4, buckets=[4, 8], shard_options=ONE)
    for _ in range(k):
        next(ref)
    state = ref.get_state()
    state = json.loads(json.dumps(state))  # what a checkpoint stores
    expected = list(ref)
    resumed = prompt_batches(cfg, TOK, 4, buckets=[4, 8], shard_options=ONE)
    resumed.set_state(state)
    got = list(resumed)
    assert len(got) == len(expected) > 0
    for e, g in zip(expected, got):
        assert e.prompts == g.prompts
        np.testing.assert_array_equal(e.prompt_ids_PxTp, g.prompt_ids_PxTp)
        assert e.num_dropped == g.num_dropped
    # 3 epochs of 26 short rows = 78 rows -> 19 full batches of 4; the long rows of the first two
    # epochs at least have been counted by the last batch (the third's may come after it).
    assert k + len(got) == 19 and 8 <= got[-1].num_dropped <= 12
    assert resumed.stats["dropped_too_long"] == got[-1].num_dropped


def test_resume_sft_and_mixture(tmp_path):
    cfg = _cfg(synthetic_size=300, sources=[
        DataSourceConfig(synthetic="arithmetic", weight=1.0),
        DataSourceConfig(path=_jsonl(tmp_path / "d.jsonl", [dict(r, solution="<answer>1</answer>") for r in _rows(30)]),
                         weight=2.0)])
    cfg.sources.append(DataSourceConfig(synthetic="equation", synthetic_kwargs={"max_x": 5}))
    a = sft_batches(cfg, TOK, 8, max_len=64, shard_options=ONE)
    for _ in range(5):
        next(a)
    state = a.get_state()
    b = sft_batches(cfg, TOK, 8, max_len=64, shard_options=ONE)
    b.set_state(state)
    tasks = set()
    for _ in range(5):
        x, y = next(a), next(b)
        tasks.update(t for t in x.fields["task"] if t)
        np.testing.assert_array_equal(x.tokens_BxT, y.tokens_BxT)
        np.testing.assert_array_equal(x.loss_mask_BxT, y.loss_mask_BxT)
    assert tasks == {"arithmetic", "equation"}


def test_two_processes_read_disjoint_shards_covering_the_data(tmp_path):
    path = _jsonl(tmp_path / "d.jsonl", _rows(23))
    cfg = _cfg(path=path, seed=1, num_epochs=1)
    seen = []
    for index in (0, 1):
        opts = grain.sharding.ShardOptions(index, 2, drop_remainder=False)
        seen.append([q for b in prompt_batches(cfg, TOK, 1, shard_options=opts) for q in b.questions])
    assert set(seen[0]).isdisjoint(seen[1])
    assert sorted(seen[0] + seen[1]) == sorted(f"q{i}" for i in range(23))
    assert len(seen[0]) == 12 and len(seen[1]) == 11
    # The training default drops the remainder so both processes yield the same number of batches.
    even = [list(prompt_batches(cfg, TOK, 1, shard_options=grain.sharding.ShardOptions(i, 2, drop_remainder=True)))
            for i in (0, 1)]
    assert len(even[0]) == len(even[1]) == 11
    # Eval batches: every held-out row exactly once across processes.
    ecfg = _cfg(path=path, eval_fraction=0.3)
    ev = [q for i in (0, 1) for b in eval_batches(ecfg, TOK, 2, shard_options=grain.sharding.ShardOptions(i, 2))
          for q in b.questions]
    train = {q for b in prompt_batches(_cfg(path=path, eval_fraction=0.3, num_epochs=1), TOK, 1, shard_options=ONE)
             for q in b.questions}
    assert len(ev) == len(set(ev)) == 7 and train.isdisjoint(ev) and len(train) == 16


def test_default_shard_options_are_this_process_share():
    """r1jax's default (not grain's): this process's shard, remainder dropped; on one process
    the default pipeline reads exactly what an explicit 1-of-1 shard reads."""
    import jax

    from r1jax.data import default_shard_options

    opts = default_shard_options()
    assert (opts.shard_index, opts.shard_count, opts.drop_remainder) == (
        jax.process_index(), jax.process_count(), True)
    cfg = _cfg(synthetic="arithmetic", synthetic_size=40, seed=5)
    assert _questions(prompt_batches(cfg, TOK, 4), 5) == _questions(prompt_batches(cfg, TOK, 4, shard_options=ONE), 5)
    # A 2-way shard of the same data reads a different, disjoint half.
    half = grain.sharding.ShardOptions(1, 2, drop_remainder=True)
    other = set(_questions(prompt_batches(cfg, TOK, 4, shard_options=half), 5))
    assert other.isdisjoint(_questions(prompt_batches(cfg, TOK, 4, shard_options=grain.sharding.ShardOptions(0, 2, drop_remainder=True)), 5))


def test_per_process_batch_size():
    assert per_process_batch_size(32, 4) == 8 and per_process_batch_size(32) == 32
    with pytest.raises(DataError, match="a global batch of 30 does not split evenly over 4 processes"):
        per_process_batch_size(30, 4)


def test_bad_state_is_a_clear_error(tmp_path):
    it = prompt_batches(_cfg(path=_jsonl(tmp_path / "d.jsonl", _rows(8))), TOK, 2, shard_options=ONE)
    with pytest.raises(DataError, match="state does not fit this pipeline"):
        it.set_state({"something": 1})


# ---------------------------------------------------------------------------------------------
# Mixture, length filter, padding
# ---------------------------------------------------------------------------------------------
def test_mixture_weights_roughly_respected(tmp_path):
    cfg = _cfg(sources=[DataSourceConfig(path=_jsonl(tmp_path / "a.jsonl", _rows(50, "a")), weight=3.0),
                        DataSourceConfig(path=_jsonl(tmp_path / "b.jsonl", _rows(7, "b")), weight=1.0)])
    qs = _questions(prompt_batches(cfg, TOK, 50, shard_options=ONE), 16)
    share_a = sum(q.startswith("a") for q in qs) / len(qs)
    assert abs(share_a - 0.75) < 0.03, share_a
    # The small source repeats (it is cycled), the big one is not exhausted first.
    counts = Counter(qs)
    assert counts["b0"] > 10
    # num_epochs caps a mixture at epochs x total rows.
    capped = list(prompt_batches(_cfg(sources=cfg.sources, num_epochs=2), TOK, 1, shard_options=ONE))
    assert len(capped) == 2 * 57


def test_eval_of_a_mixture_reads_every_row_once(tmp_path):
    cfg = _cfg(eval_fraction=0.5, sources=[
        DataSourceConfig(path=_jsonl(tmp_path / "a.jsonl", _rows(20, "a")), weight=5.0),
        DataSourceConfig(path=_jsonl(tmp_path / "b.jsonl", _rows(6, "b")), weight=1.0)])
    qs = [q for b in eval_batches(cfg, TOK, 4, shard_options=ONE) for q in b.questions]
    assert len(qs) == len(set(qs)) == 13
    assert sum(q.startswith("a") for q in qs) == 10


def test_length_filter_counts_dropped_rows(tmp_path):
    rows = [{"question": "x" * n, "answer": str(n)} for n in range(1, 21)]
    path = _jsonl(tmp_path / "d.jsonl", rows)
    it = prompt_batches(_cfg(path=path, max_prompt_len=12, num_epochs=1, shuffle=False), TOK, 4, shard_options=ONE)
    batches = list(it)
    kept = [q for b in batches for q in b.questions]
    assert kept == ["x" * n for n in range(1, 13)]
    # Shuffled, two epochs: only short rows come out, and the counter never decreases.
    it = prompt_batches(_cfg(path=path, max_prompt_len=12, num_epochs=2, seed=2), TOK, 1, shard_options=ONE)
    out = list(it)
    assert sorted(b.questions[0] for b in out) == sorted(2 * ["x" * n for n in range(1, 13)])
    assert all(a.num_dropped <= b.num_dropped for a, b in zip(out, out[1:])) and out[-1].num_dropped <= 16
    # The template counts towards the length.
    it = prompt_batches(_cfg(path=path, max_prompt_len=12, template="Q:{prompt}", num_epochs=1, shuffle=False),
                        TOK, 1, shard_options=ONE)
    assert [b.questions[0] for b in it] == ["x" * n for n in range(1, 11)]
    # Nothing fits: an error, not an endless loop.
    with pytest.raises(DataError, match=r"l\.jsonl: 16 rows in a row are too long; the last one has \d+ tokens > 3\. "
                       r"Raise the length limit\.$"):
        next(prompt_batches(_cfg(path=_jsonl(tmp_path / "l.jsonl", rows[4:]), max_prompt_len=3), TOK, 1,
                            shard_options=ONE))


def test_length_filter_counter_exact(tmp_path):
    # 10 short then 10 long rows in file order, one epoch: the counter reaches exactly 10.
    rows = [{"question": "s", "answer": "1"}] * 10 + [{"question": "l" * 30, "answer": "1"}] * 10 \
        + [{"question": "t", "answer": "2"}] * 2
    it = prompt_batches(_cfg(path=_jsonl(tmp_path / "d.jsonl", rows), max_prompt_len=5, num_epochs=1,
                             shuffle=False), TOK, 6, shard_options=ONE)
    batches = list(it)
    assert [b.num_dropped for b in batches] == [0, 10]
    assert it.stats["dropped_too_long"] == 10


def test_left_padding_and_buckets(tmp_path):
    rows = [{"question": "y" * n, "answer": str(n)} for n in (1, 5, 9, 3)]
    path = _jsonl(tmp_path / "d.jsonl", rows)
    for template in ("none", "r1_zero", "chat"):
        cfg = _cfg(path=path, shuffle=False, template=template, max_prompt_len=1000)
        b = next(prompt_batches(cfg, TOK, 4, buckets=[4, 16, 512], shard_options=ONE))
        ids, mask = b.prompt_ids_PxTp, b.prompt_mask_PxTp
        assert ids.dtype == np.int32 and mask.dtype == np.bool_
        lens = [len(TOK.encode(p, add_special_tokens=template != "chat")) for p in b.prompts]
        assert ids.shape == (4, bucket_length(max(lens), [4, 16, 512]))
        for i, q in enumerate(b.questions):
            prompt = apply_template(q, template, TOK)
            assert b.prompts[i] == prompt
            n = lens[i]
            np.testing.assert_array_equal(ids[i, -n:], TOK.encode(prompt, add_special_tokens=template != "chat"))
            assert (ids[i, :-n] == TOK.pad_id).all()
            assert mask[i, -n:].all() and not mask[i, :-n].any()
        assert b.answers == ["1", "5", "9", "3"]
        assert b.fields["language"] == [None] * 4
    assert bucket_length(3, [4, 16]) == 4 and bucket_length(16, [4, 16]) == 16
    # Past the largest bucket: the next multiple of it (one rule for data, sampler and the
    # rollout buffer), and a padded length is a fixed point of the rule.
    assert bucket_length(17, [4, 16]) == 32 and bucket_length(33, [16, 4]) == 48
    assert bucket_length(7, None) == 7
    assert all(bucket_length(bucket_length(n, [4, 16]), [4, 16]) == bucket_length(n, [4, 16])
               for n in range(0, 70))


# ---------------------------------------------------------------------------------------------
# SFT batches and synthetic tasks
# ---------------------------------------------------------------------------------------------
def test_sft_batches_mask_the_solution(tmp_path):
    cfg = _cfg(synthetic_size=200, template="r1_zero", seed=5)
    b = next(sft_batches(cfg, TOK, 4, max_len=512, buckets=[384, 512], shard_options=ONE))
    assert b.tokens_BxT.shape[1] in (384, 512)
    for i in range(4):
        q, sol = b.fields["question"][i], b.fields["solution"][i]
        prompt_ids = TOK.encode(apply_template(q, "r1_zero"))
        target = TOK.encode(sol, add_special_tokens=False) + [TOK.eos_id]
        n = len(prompt_ids) + len(target)
        np.testing.assert_array_equal(b.tokens_BxT[i, :n], prompt_ids + target)
        assert (b.tokens_BxT[i, n:] == TOK.pad_id).all()
        np.testing.assert_array_equal(b.loss_mask_BxT[i], [0] * len(prompt_ids) + [1] * len(target)
                                      + [0] * (b.tokens_BxT.shape[1] - n))
        np.testing.assert_array_equal(b.segment_ids_BxT[i, :n], 1)
        assert (b.segment_ids_BxT[i, n:] == 0).all() and b.positions_BxT[i, n - 1] == n - 1
    with pytest.raises(DataError, match="SFT needs a 'solution' field"):
        sft_batches(_cfg(path=_jsonl(tmp_path / "d.jsonl", _rows(4))), TOK, 2, max_len=64, shard_options=ONE)


def _check_solution(question, answer, solution):
    """Replay the worked steps independently: each step's arithmetic holds and the answer's
    digits are the steps' last digits (plus a final carry)."""
    m = re.fullmatch(r"<think>(.*)</think> <answer>(.*)</answer>", solution)
    assert m, solution
    steps, ans = m.group(1), m.group(2)
    assert ans == answer
    if "x" in question:
        lhs, c = question.split("=")
        a, b = lhs.split("x+")
        assert int(a) * int(answer) + int(b) == int(c)
    else:
        assert int(answer) == eval(question)  # noqa: S307 (our own digits-and-operator strings)
    parts = steps.split(",")
    if re.fullmatch(r"\d+>\d+", parts[0]):
        parts = parts[1:]
    for step in parts:
        lhs, rhs = step.split("=")
        assert eval(lhs.replace("/", "//")) == int(rhs), step  # noqa: S307
    if "x" not in question:
        mag = answer.lstrip("-")
        digits = "".join(p.split("=")[1][-1] for p in parts)[::-1]
        carry = parts[-1].split("=")[1][:-1]
        assert int(carry + digits) == int(mag)


@pytest.mark.parametrize("kwargs", [{}, {"ops": "*"}, {"digits": 3, "ops": "+-*"}, {"digits": 1}])
def test_arithmetic_solutions_are_correct_and_short(kwargs):
    rows = synthetic_rows("arithmetic", 400, seed=0, **kwargs)
    for r in rows:
        _check_solution(r["question"], r["answer"], r["solution"])
    if kwargs.get("digits", 2) == 2:
        assert max(len(TOK.encode(r["solution"])) for r in rows) <= 30


def test_equation_solutions():
    for r in synthetic_rows("equation", 200, seed=1):
        _check_solution(r["question"], r["answer"], r["solution"])


def test_synthetic_split_disjoint_and_deterministic():
    train = synthetic_rows("arithmetic", 3000, seed=0)
    ev = synthetic_rows("arithmetic", 200, seed=0, split="eval")
    assert {r["question"] for r in train}.isdisjoint(r["question"] for r in ev)
    assert len({r["question"] for r in ev}) == 200
    assert ev == synthetic_rows("arithmetic", 200, seed=0, split="eval")
    assert ev != synthetic_rows("arithmetic", 200, seed=1, split="eval")
    # The pipeline's eval split is the held-out one.
    cfg = _cfg(synthetic_size=2000, eval_size=64)
    (tr,), (es,) = load_sources(cfg, "train"), load_sources(cfg, "eval")
    assert len(es.rows) == 64
    assert {tr.rows[i]["question"] for i in range(len(tr.rows))}.isdisjoint(
        es.rows[i]["question"] for i in range(64))
    with pytest.raises(TaskError, match="unknown synthetic task 'sudoku'; valid: arithmetic, equation"):
        synthetic_rows("sudoku", 3)
    with pytest.raises(TaskError, match="unknown op '/'"):
        synthetic_rows("arithmetic", 3, ops="/")
    with pytest.raises(TaskError, match="bad arguments"):
        synthetic_rows("arithmetic", 3, nope=1)


def test_no_data_and_bad_weight(tmp_path):
    with pytest.raises(DataError, match="no data: set data.path"):
        load_sources(_cfg(synthetic=None))
    with pytest.raises(DataError, match="mixture weight must be > 0"):
        load_sources(_cfg(sources=[DataSourceConfig(path=_jsonl(tmp_path / "a.jsonl", _rows(3)), weight=0.0)]))
    with pytest.raises(DataError, match="no eval rows"):
        load_sources(_cfg(path=_jsonl(tmp_path / "b.jsonl", _rows(3))), "eval")


def test_read_threads_keep_order_and_state():
    def run(workers, state=None, n=6):
        it = prompt_batches(_cfg(synthetic_size=300, worker_count=workers), TOK, 8, shard_options=ONE)
        if state is not None:
            it.set_state(state)
        return [next(it).questions for _ in range(n)], it.get_state()

    serial, state = run(0)
    threaded, threaded_state = run(2)
    assert serial == threaded and state == threaded_state
    assert run(2, state, 3)[0] == run(0, None, 9)[0][6:]


_WORKER = r"""
import json, sys
import jax
pid, port, path, out = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
jax.distributed.initialize(coordinator_address=f"localhost:{port}", num_processes=2, process_id=pid)
from r1jax.config import DataConfig
from r1jax.data import prompt_batches
from r1jax.tokenizer import char_tokenizer
it = prompt_batches(DataConfig(path=path, template="none", num_epochs=1, seed=3), char_tokenizer(), 2)
qs = [q for b in it for q in b.questions]
json.dump({"index": jax.process_index(), "count": jax.process_count(), "questions": qs}, open(out, "w"))
"""


@pytest.mark.subprocess
def test_two_jax_processes_shard_by_default(tmp_path):
    """Two real JAX processes (jax.distributed on CPU): the default shard options give each
    its own half."""
    import os
    import socket
    import subprocess
    import sys

    path = _jsonl(tmp_path / "d.jsonl", _rows(21))
    (tmp_path / "w.py").write_text(_WORKER)
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = str(s.getsockname()[1])
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cpu"
    procs = [subprocess.Popen([sys.executable, str(tmp_path / "w.py"), str(i), port, path, str(tmp_path / f"{i}.json")],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for i in (0, 1)]
    for p in procs:
        out, _ = p.communicate(timeout=120)
        assert p.returncode == 0, out.decode()[-2000:]
    res = [json.loads((tmp_path / f"{i}.json").read_text()) for i in (0, 1)]
    assert [(r["index"], r["count"]) for r in res] == [(0, 2), (1, 2)]
    a, b = res[0]["questions"], res[1]["questions"]
    # 21 rows over 2 processes: the remainder row is dropped so both take 10 steps.
    assert len(a) == len(b) == 10 and set(a).isdisjoint(b)
    assert set(a) | set(b) <= {f"q{i}" for i in range(21)} and len(set(a) | set(b)) == 20
