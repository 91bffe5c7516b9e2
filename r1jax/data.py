"""Prompt data through Grain: readers (JSONL, Parquet, HF `datasets` directories, the built-in
synthetic tasks), a weighted mixture, and the pipeline that feeds GRPO rollouts and the
cold-start SFT stage.

The pipeline, per process:

    rows (a random-access source per dataset, field names mapped to canonical ones)
      -> this process's shard (strided: every process_count-th row)
      -> shuffle by seed, repeat for `num_epochs` (a new order every epoch)
      -> weighted mixture of the sources            (grain MapDataset.mix)
      -> template + tokenisation                     (lazy, per row)
      -> length filter, counting what it drops       (its count is part of the iterator state)
      -> batches of P prompts, left-padded to a bucketed length

Every stage is index-based, so the iterator state is a handful of integers: `get_state()` is
JSON-serialisable and `set_state()` continues the exact sequence, mid-epoch included.

Readers are strict: a missing file, a row without a required field, an empty dataset and
text that is not UTF-8 each give a one-line `DataError` naming the file, row and field
(`on_bad_row="skip"` drops bad rows instead and counts them).
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import threading
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import grain
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from r1jax import formats
from r1jax.config import DataConfig, DataSourceConfig
from r1jax.padding import bucket_length
from r1jax.tasks import synthetic_rows
from r1jax.tokenizer import Tokenizer, apply_template, template_adds_special_tokens

# Canonical row fields: the rest of r1jax reads rows under these names, whatever the columns
# are called in a file (DataConfig.*_field maps them).
FIELDS = ("question", "answer", "tests", "language")


class DataError(ValueError):
    """A data problem, with a one-line message naming the file, row and field."""


# ---------------------------------------------------------------------------------------------
# Row sources: random access, canonical field names
# ---------------------------------------------------------------------------------------------
class RowSource:
    """A random-access sequence of row dicts (grain's RandomAccessDataSource protocol).

    Rows are held as a pyarrow Table (columnar, cheap for millions of rows) or a list of
    dicts (JSONL, synthetic tasks); `indices` selects a subset (the train or eval split)
    without copying.
    """

    def __init__(self, name: str, *, table: Optional[pa.Table] = None,
                 rows: Optional[List[Dict[str, Any]]] = None,
                 indices: Optional[np.ndarray] = None, bad_rows: int = 0):
        assert (table is None) != (rows is None)
        self.name = name
        self._table, self._rows = table, rows
        n = table.num_rows if table is not None else len(rows)
        self._indices = np.arange(n) if indices is None else np.asarray(indices, dtype=np.int64)
        self.bad_rows = bad_rows  # rows skipped by on_bad_row="skip"

    def __len__(self) -> int:
        return len(self._indices)

    def __getitem__(self, i: int) -> Dict[str, Any]:
        j = int(self._indices[i])
        if self._rows is not None:
            return dict(self._rows[j])
        return self._table.slice(j, 1).to_pylist()[0]

    def subset(self, indices: Sequence[int]) -> "RowSource":
        """The rows at `indices` (positions in this source)."""
        return RowSource(self.name, table=self._table, rows=self._rows,
                         indices=self._indices[np.asarray(indices, dtype=np.int64)],
                         bad_rows=self.bad_rows)

    def __repr__(self) -> str:
        return f"RowSource({self.name!r}, {len(self)} rows)"


def _field_map(cfg: DataConfig) -> Dict[str, str]:
    """File column name -> canonical name."""
    mapping = {
        cfg.question_field: "question", cfg.answer_field: "answer",
        cfg.tests_field: "tests", cfg.language_field: "language",
    }
    return {k: v for k, v in mapping.items() if k != v}


def _detect_format(path: str) -> str:
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, "dataset_dict.json")) or \
                os.path.isfile(os.path.join(path, "state.json")):
            return "arrow"
        kinds = {_detect_format(p) for p in _dir_files(path)}
        if len(kinds) == 1:
            return kinds.pop()
        raise DataError(f"{path}: cannot tell the format of a directory holding "
                        f"{sorted(kinds) or 'no data files'}; set data.format")
    low = path.lower()
    if low.endswith((".jsonl", ".json", ".jsonl.gz", ".ndjson")):
        return "jsonl"
    if low.endswith((".parquet", ".pq")):
        return "parquet"
    if low.endswith(".arrow"):
        return "arrow"
    raise DataError(f"{path}: cannot tell the format from the file name; set data.format "
                    "to jsonl, parquet or arrow")


def _dir_files(path: str) -> List[str]:
    exts = (".jsonl", ".ndjson", ".parquet", ".pq", ".arrow")
    return sorted(os.path.join(path, f) for f in os.listdir(path) if f.lower().endswith(exts))


def _expand(path: str) -> List[str]:
    """A file, a glob pattern, or a directory -> the files to read (missing: an error)."""
    if any(c in path for c in "*?["):
        files = sorted(glob.glob(path))
        if not files:
            raise DataError(f"no data files match {path}")
        return files
    if not os.path.exists(path):
        raise DataError(f"data file not found: {path}")
    return [path]


def _read_jsonl(path: str) -> List[Dict[str, Any]]:
    rows = []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{path}: line {lineno} is not valid UTF-8 "
                                f"(byte 0x{raw[e.start]:02x} at column {e.start + 1})") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}: line {lineno} is not valid JSON: {e.msg} "
                                f"(column {e.colno})") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}: line {lineno} holds a {type(row).__name__}, not a JSON object")
            rows.append((lineno, row))
    return rows


def _json_object(file: str) -> Dict[str, Any]:
    """A JSON object from `file` (an HF dataset directory's metadata), or a DataError naming it."""
    try:
        with open(file, encoding="utf-8") as f:
            obj = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{file}: not valid JSON (truncated or garbled?): {str(e).splitlines()[0][:120]}") from None
    if not isinstance(obj, dict):
        raise DataError(f"{file}: expected a JSON object, got a {type(obj).__name__}")
    return obj


def _arrow_files_of_hf_dir(path: str, split: Optional[str]) -> Tuple[List[str], str]:
    """The .arrow files of an HF `datasets` directory written by save_to_disk."""
    dd = os.path.join(path, "dataset_dict.json")
    if os.path.isfile(dd):
        splits = _json_object(dd).get("splits", [])
        if split is None:
            if "train" not in splits:
                raise DataError(f"{path}: a DatasetDict without a 'train' split; set the split "
                                f"(data.split or the source's split) to one of {splits}")
            split = "train"
        if split not in splits:
            raise DataError(f"{path}: no split {split!r}; splits: {splits}")
        path = os.path.join(path, split)
    state = os.path.join(path, "state.json")
    if not os.path.isfile(state):
        files = sorted(glob.glob(os.path.join(path, "*.arrow")))
        if not files:
            raise DataError(f"{path}: neither state.json nor *.arrow files (not a saved HF dataset)")
        return files, path
    data_files = _json_object(state).get("_data_files", [])
    if not isinstance(data_files, list) or not all(isinstance(d, dict) and "filename" in d for d in data_files):
        raise DataError(f"{state}: '_data_files' is not a list of {{filename: ...}} entries")
    files = [os.path.join(path, d["filename"]) for d in data_files]
    for file in files:
        if not os.path.isfile(file):
            raise DataError(f"{state} lists {os.path.basename(file)}, which is missing")
    return files, path


def _read_arrow_file(path: str) -> pa.Table:
    # save_to_disk writes the IPC stream format; plain .arrow files may be the file format.
    try:
        with pa.memory_map(path) as source:
            return pa.ipc.open_stream(source).read_all()
    except pa.ArrowInvalid:
        pass
    try:
        with pa.memory_map(path) as source:
            return pa.ipc.open_file(source).read_all()
    except pa.ArrowInvalid as e:
        raise DataError(f"{path}: not an Arrow IPC file: {str(e).splitlines()[0]}") from None


def _check_table(table: pa.Table, name: str, required: Sequence[str], on_bad_row: str,
                 row_offset: int = 0) -> Tuple[pa.Table, int]:
    """Check required columns and UTF-8 text; drop (and count) or report bad rows."""
    for col_name in table.column_names:
        col = table.column(col_name)
        if pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
            try:
                col.validate(full=True)
            except pa.ArrowInvalid:
                raise DataError(f"{name}: column '{col_name}' holds text that is not valid UTF-8") from None
        elif (pa.types.is_binary(col.type) or pa.types.is_large_binary(col.type)) and col_name in required:
            for i, v in enumerate(col.to_pylist()):
                if v is None:
                    continue
                try:
                    v.decode("utf-8")
                except UnicodeDecodeError:
                    raise DataError(f"{name}: row {row_offset + i}, field '{col_name}': "
                                    "not valid UTF-8") from None
            table = table.set_column(table.column_names.index(col_name), col_name,
                                     pc.cast(col, pa.string()))
    bad = np.zeros(table.num_rows, dtype=bool)
    for f in required:
        if f not in table.column_names:
            if on_bad_row == "skip":
                bad[:] = True
                continue
            raise DataError(f"{name}: row {row_offset}, field '{f}' is missing "
                            f"(columns: {', '.join(table.column_names)})")
        nulls = table.column(f).is_null().to_numpy(zero_copy_only=False)
        if nulls.any():
            if on_bad_row != "skip":
                row = row_offset + int(np.argmax(nulls))
                raise DataError(f"{name}: row {row}, field '{f}' is missing (null)")
            bad |= nulls
    if bad.any():
        table = table.filter(pa.array(~bad))
    return table, int(bad.sum())


_UNSET = object()


def _row_mapper(row_fmt: str, first_row: Dict[str, Any], required: List[str]):
    """A dataset format's row mapping (r1jax.formats; None: rows as they are), told from the
    first row under auto, and the fields its rows must then have."""
    kind = formats.detect(first_row) if row_fmt == "auto" else row_fmt
    return (formats.MAPPERS[kind] if kind else None), formats.required_fields(kind, required)


def _map_row(mapper, row: Dict[str, Any], where: str) -> Dict[str, Any]:
    try:
        return mapper(row)
    except formats.FormatError as e:
        raise DataError(f"{where}: {e}") from None


def read_rows(path: str, cfg: DataConfig, *, fmt: str = "auto", split: Optional[str] = None) -> RowSource:
    """Read a dataset file (or glob, or directory) into a RowSource with canonical field names.

    fmt: auto | jsonl | parquet | arrow (an HF `datasets` directory saved to disk, read with
    pyarrow: the `datasets` library is not needed), or a row format (gsm8k | math | humaneval,
    r1jax.formats; under auto and a file type it is detected from the first row).
    """
    required = list(cfg.required_fields)
    for f in required:
        if f not in FIELDS and f != "solution":
            valid = ", ".join(FIELDS + ("solution",))
            raise DataError(f"required_fields: unknown field {f!r}; valid: {valid}")
    rename = _field_map(cfg)
    files = _expand(path)
    try:
        fmt, row_fmt = formats.split_format(fmt)
    except formats.FormatError as e:
        raise DataError(f"{path}: {e}") from None
    mapper: Any = _UNSET
    if fmt == "auto":
        fmt = _detect_format(files[0])
    if fmt not in ("jsonl", "parquet", "arrow"):
        raise DataError(f"{path}: unknown data format {fmt!r}; valid: auto, jsonl, parquet, arrow")
    expanded: List[str] = []
    for file in files:
        if os.path.isdir(file):
            if fmt == "arrow":
                arrow_files, _ = _arrow_files_of_hf_dir(file, split)
                expanded.extend(arrow_files)
            else:
                expanded.extend(_dir_files(file))
        else:
            expanded.append(file)
    if not expanded:
        raise DataError(f"{path}: no data files")

    if fmt == "jsonl":
        rows: List[Dict[str, Any]] = []
        bad = 0
        for file in expanded:
            for lineno, row in _read_jsonl(file):
                row = {rename.get(k, k): v for k, v in row.items()}
                if mapper is _UNSET:
                    mapper, required = _row_mapper(row_fmt, row, required)
                if mapper is not None:
                    row = _map_row(mapper, row, f"{file}: line {lineno}")
                missing = [f for f in required if row.get(f) is None]
                if missing:
                    if cfg.on_bad_row == "skip":
                        bad += 1
                        continue
                    inverse = {v: k for k, v in rename.items()}
                    name = inverse.get(missing[0], missing[0])
                    raise DataError(f"{file}: line {lineno}, field '{name}' is missing")
                rows.append(row)
        if not rows:
            raise DataError(f"{path}: empty dataset (no usable rows"
                            f"{f'; {bad} bad rows skipped' if bad else ''})")
        return RowSource(path, rows=rows, bad_rows=bad)

    tables, bad = [], 0
    for file in expanded:
        try:
            if fmt == "parquet":
                table = pq.read_table(file)
            else:
                table = _read_arrow_file(file)
        except (pa.ArrowInvalid, OSError) as e:
            raise DataError(f"{file}: cannot be read as {fmt}: {str(e).splitlines()[0]}") from None
        table = table.rename_columns([rename.get(c, c) for c in table.column_names])
        try:
            if mapper is _UNSET and table.num_rows:
                mapper, required = _row_mapper(row_fmt, table.slice(0, 1).to_pylist()[0], required)
            if mapper not in (None, _UNSET):
                table = pa.Table.from_pylist([_map_row(mapper, r, f"{file}: row {i}")
                                              for i, r in enumerate(table.to_pylist())])
        except UnicodeDecodeError:
            pass  # _check_table names the column that is not UTF-8
        inverse = {v: k for k, v in rename.items()}
        try:
            table, nbad = _check_table(table, file, required, cfg.on_bad_row)
        except DataError as e:
            # Name the field as the file calls it.
            msg = str(e)
            for canon, orig in inverse.items():
                msg = msg.replace(f"field '{canon}'", f"field '{orig}'")
            raise DataError(msg) from None
        bad += nbad
        if table.num_rows:
            tables.append(table)
    if not tables:
        raise DataError(f"{path}: empty dataset (no usable rows{f'; {bad} bad rows skipped' if bad else ''})")
    try:
        table = pa.concat_tables(tables, promote_options="default")
    except pa.ArrowInvalid as e:
        raise DataError(f"{path}: its files have incompatible columns: {str(e).splitlines()[0]}") from None
    return RowSource(path, table=table, bad_rows=bad)


# ---------------------------------------------------------------------------------------------
# Sources of a config, with the train/eval split
# ---------------------------------------------------------------------------------------------
@dataclass
class Source:
    """One dataset of a mixture: its rows and its mixture weight."""
    name: str
    rows: RowSource
    weight: float = 1.0


def _source_configs(cfg: DataConfig) -> List[DataSourceConfig]:
    if cfg.sources:
        return list(cfg.sources)
    if cfg.path:
        return [DataSourceConfig(path=cfg.path, format=cfg.format, split=cfg.split)]
    if cfg.synthetic:
        return [DataSourceConfig(synthetic=cfg.synthetic, format="synthetic")]
    raise DataError("no data: set data.path, data.sources or data.synthetic")


def _split_indices(n: int, fraction: float, cap: int, seed: int) -> Tuple[np.ndarray, np.ndarray]:
    """(train, eval) positions: a seeded permutation's first round(n * fraction) rows (at most
    `cap`) are held out."""
    n_eval = min(int(round(n * fraction)), cap) if fraction > 0 else 0
    if n_eval >= n:
        raise DataError(f"eval_fraction={fraction} leaves no training rows out of {n}")
    perm = np.random.default_rng(seed).permutation(n)
    return np.sort(perm[n_eval:]), np.sort(perm[:n_eval])


def load_sources(cfg: DataConfig, split: str = "train") -> List[Source]:
    """The datasets of `cfg` for `split` ("train" or "eval"), each with its weight.

    Eval rows: the synthetic tasks' held-out questions; `eval_path` when set; otherwise a
    seeded `eval_fraction` of each file (never seen in training). An empty eval split is an
    error only when eval rows are asked for.
    """
    if split not in ("train", "eval"):
        raise DataError(f"unknown split {split!r}; valid: train, eval")
    if split == "eval" and cfg.eval_path:
        return [Source(cfg.eval_path, read_rows(cfg.eval_path, cfg, fmt=cfg.format))]
    out = []
    for i, sc in enumerate(_source_configs(cfg)):
        if sc.synthetic or sc.format == "synthetic":
            task = sc.synthetic or cfg.synthetic
            kwargs = dict(cfg.synthetic_kwargs if sc.synthetic_kwargs is None else sc.synthetic_kwargs)
            n = cfg.synthetic_size if split == "train" else cfg.eval_size
            rows = synthetic_rows(task, n, seed=cfg.seed, split=split, **kwargs)
            out.append(Source(f"synthetic:{task}", RowSource(f"synthetic:{task}", rows=rows), sc.weight))
            continue
        if not sc.path:
            raise DataError(f"data.sources[{i}]: set path or synthetic")
        rows = read_rows(sc.path, cfg, fmt=sc.format, split=sc.split)
        if cfg.eval_fraction > 0 or split == "eval":
            train_idx, eval_idx = _split_indices(len(rows), cfg.eval_fraction, cfg.eval_size, cfg.seed + i)
            idx = train_idx if split == "train" else eval_idx
            if len(idx) == 0:
                continue
            rows = rows.subset(idx)
        out.append(Source(sc.path, rows, sc.weight))
    if not out:
        raise DataError(f"no {split} rows: set data.eval_fraction > 0 or data.eval_path")
    for s in out:
        if s.weight <= 0:
            raise DataError(f"{s.name}: mixture weight must be > 0, got {s.weight}")
    return out


# ---------------------------------------------------------------------------------------------
# The Grain pipeline
# ---------------------------------------------------------------------------------------------
def per_process_batch_size(global_batch: int, process_count: Optional[int] = None) -> int:
    """This process's share of a global batch (e.g. P prompts per rollout): an error unless it
    divides evenly, because processes must step together."""
    if process_count is None:
        import jax
        process_count = jax.process_count()
    if global_batch <= 0 or global_batch % process_count:
        raise DataError(f"a global batch of {global_batch} does not split evenly over "
                        f"{process_count} processes")
    return global_batch // process_count


def global_order() -> grain.sharding.ShardOptions:
    """Every process reads the same global sequence (each then uses its rows of a batch):
    the order, and an iterator state saved from it, do not depend on the process count, so a
    run resumed on another number of processes continues the same data."""
    return grain.sharding.NoSharding()


def default_shard_options() -> grain.sharding.ShardOptions:
    """This JAX process's share: shard jax.process_index() of jax.process_count(). The
    remainder is dropped so that every process yields the same number of batches (a
    process that runs out first would leave the others waiting in a collective)."""
    return grain.sharding.ShardByJaxProcess(drop_remainder=True)


def _shard(ds: grain.MapDataset, opts: grain.sharding.ShardOptions, name: str) -> grain.MapDataset:
    n = len(ds)
    if opts.drop_remainder:
        ds = ds[: n - n % opts.shard_count]
    # Strided rather than contiguous: a file sorted by difficulty or source still gives every
    # process a similar mix.
    ds = ds[opts.shard_index:: opts.shard_count]
    if len(ds) == 0:
        raise DataError(f"{name}: {n} rows cannot feed {opts.shard_count} processes "
                        f"(shard {opts.shard_index} is empty)")
    return ds


class _EpochShuffleMapDataset(grain.MapDataset):
    """A new seeded permutation of the parent per epoch (index // len is the epoch, as in
    grain's own shuffle, so `.repeat()` after it reshuffles every pass).

    Grain's `MapDataset.shuffle` draws each index through a Feistel network whose cost grows
    as the dataset shrinks (about 5 ms per row at 7 rows, 0.6 ms at 50); a cached NumPy
    permutation costs O(n) once per epoch and O(1) per row at any size.
    """

    def __init__(self, parent: grain.MapDataset, seed: Sequence[int]):
        super().__init__(parent)
        self._seed = [int(s) for s in seed]
        self._n = len(parent)
        self._perms: Dict[int, np.ndarray] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return self._n

    def _perm(self, epoch: int) -> np.ndarray:
        with self._lock:
            perm = self._perms.get(epoch)
            if perm is None:
                perm = np.random.default_rng([*self._seed, epoch]).permutation(self._n)
                # Read threads may straddle two epochs; older ones are never asked for again.
                for old in sorted(self._perms)[:-1]:
                    del self._perms[old]
                self._perms[epoch] = perm
            return perm

    def __getstate__(self):
        state = dict(self.__dict__)
        state.pop("_lock")
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        epoch, k = divmod(index, self._n)
        return self._parent[epoch * self._n + int(self._perm(epoch)[k])]

    def __str__(self) -> str:
        return f"EpochShuffleMapDataset(seed={self._seed})"


def mixed_rows(sources: Sequence[Source], *, seed: int, shuffle: bool, num_epochs: Optional[int],
               shard_options: grain.sharding.ShardOptions, mix: bool = True) -> grain.MapDataset:
    """Sharded, shuffled, repeated rows of one source or a weighted mixture of several.

    One source: `num_epochs` passes over this process's shard, each in a new seeded order.
    A mixture: each source repeats forever and rows are drawn in proportion to the weights
    (grain's MapDataset.mix); `num_epochs` then caps the rows at num_epochs times the
    shards' total size. mix=False concatenates the sources instead (every row once per
    epoch, as evaluation wants).
    """
    parts = []
    for k, src in enumerate(sources):
        ds = _shard(grain.MapDataset.source(src.rows), shard_options, src.name)
        if shuffle:
            # The shard index joins the seed: with one order for all, the strided shards would
            # put file neighbours (often near-duplicates) side by side in every global batch.
            ds = _EpochShuffleMapDataset(ds, seed=(seed, k, shard_options.shard_index))
        parts.append(ds)
    if len(parts) == 1:
        return parts[0].repeat(num_epochs)
    if not mix:
        return grain.MapDataset.concatenate(parts).repeat(num_epochs)
    total = sum(len(p) for p in parts)
    mixed = grain.MapDataset.mix([p.repeat(None) for p in parts], weights=[s.weight for s in sources])
    if num_epochs is not None:
        mixed = mixed[: num_epochs * total]
    return mixed


class _CountingFilterIterDataset(grain.IterDataset):
    """Drops elements whose "keep" is False and stamps each kept element with the number
    dropped so far. The count lives in the iterator state, so it survives a restore."""

    def __init__(self, parent: grain.IterDataset, give_up_after: int, what: str):
        super().__init__(parent)
        self._give_up_after = give_up_after
        self._what = what

    def __iter__(self) -> grain.DatasetIterator:
        return _CountingFilterIterator(self._parent.__iter__(), self._give_up_after, self._what)

    def __str__(self) -> str:
        return "CountingFilterIterDataset"


class _CountingFilterIterator(grain.DatasetIterator):
    def __init__(self, parent: grain.DatasetIterator, give_up_after: int, what: str):
        super().__init__(parent)
        self._dropped = 0
        self._give_up_after = give_up_after
        self._what = what

    def __next__(self):
        streak = 0
        while True:
            elem = next(self._parent)
            if elem["keep"]:
                elem["dropped"] = self._dropped
                return elem
            self._dropped += 1
            streak += 1
            # A whole epoch's worth in a row: nothing fits, and an infinite repeat would spin.
            if streak >= self._give_up_after:
                raise DataError(f"{self._what}: {streak} rows in a row are too long; the last one "
                                f"has {elem['length']} tokens > {elem['limit']}. Raise the length limit.")

    def get_state(self) -> Dict[str, Any]:
        return {"parent": self._parent.get_state(), "dropped": self._dropped}

    def set_state(self, state: Dict[str, Any]) -> None:
        self._parent.set_state(state["parent"])
        self._dropped = int(state["dropped"])

    def __str__(self) -> str:
        return "CountingFilterIterator"


@dataclass
class PromptBatch:
    """P prompts for one rollout on this process.

    prompt_ids_PxTp: int32, LEFT-padded with the pad id (the last prompt token of every row is
      at column Tp-1, where generation starts).
    prompt_mask_PxTp: bool, True on real tokens.
    prompts: the templated prompt texts; fields: the rows' canonical fields (question, answer,
      tests, language, solution, ...) as python lists of length P (None where a row lacks one).
    num_dropped: rows dropped by the length filter so far (cumulative, this process).
    """
    prompt_ids_PxTp: np.ndarray
    prompt_mask_PxTp: np.ndarray
    prompts: List[str]
    fields: Dict[str, List[Any]]
    num_dropped: int = 0

    def __len__(self) -> int:
        return self.prompt_ids_PxTp.shape[0]

    @property
    def questions(self) -> List[str]:
        return self.fields["question"]

    @property
    def answers(self) -> List[Any]:
        return self.fields.get("answer", [None] * len(self))


@dataclass
class SFTBatch:
    """Prompt + solution sequences for supervised fine-tuning, RIGHT-padded.

    tokens_BxT: int32 (pad id after the end). loss_mask_BxT: float32, 1 where the token is a
    target (solution and eos), so the loss is  -sum(mask[:, 1:] * log p(tokens[:, 1:] |
    tokens[:, :-1])) / sum(mask[:, 1:]).  segment_ids_BxT: int32, 1 on real tokens, 0 on
    padding. positions_BxT: int32, 0.. along each sequence.
    """
    tokens_BxT: np.ndarray
    loss_mask_BxT: np.ndarray
    segment_ids_BxT: np.ndarray
    positions_BxT: np.ndarray
    fields: Dict[str, List[Any]]
    num_dropped: int = 0

    def __len__(self) -> int:
        return self.tokens_BxT.shape[0]


def _collect_fields(rows: Sequence[Dict[str, Any]]) -> Dict[str, List[Any]]:
    keys: List[str] = []
    for r in rows:
        keys.extend(k for k in r if k not in keys)
    for k in FIELDS:
        if k not in keys:
            keys.append(k)
    return {k: [r.get(k) for r in rows] for k in keys}


@dataclasses.dataclass(frozen=True)
class _PromptCollate:
    pad_id: int
    buckets: Optional[Tuple[int, ...]]

    def __call__(self, elems: Sequence[Dict[str, Any]]) -> PromptBatch:
        tp = bucket_length(max(len(e["ids"]) for e in elems), self.buckets)
        ids = np.full((len(elems), tp), self.pad_id, dtype=np.int32)
        mask = np.zeros((len(elems), tp), dtype=bool)
        for i, e in enumerate(elems):
            n = len(e["ids"])
            ids[i, tp - n:] = e["ids"]
            mask[i, tp - n:] = True
        return PromptBatch(ids, mask, [e["prompt"] for e in elems],
                           _collect_fields([e["row"] for e in elems]), max(e["dropped"] for e in elems))


@dataclasses.dataclass(frozen=True)
class _SFTCollate:
    pad_id: int
    buckets: Optional[Tuple[int, ...]]

    def __call__(self, elems: Sequence[Dict[str, Any]]) -> SFTBatch:
        t = bucket_length(max(len(e["ids"]) for e in elems), self.buckets)
        b = len(elems)
        tokens = np.full((b, t), self.pad_id, dtype=np.int32)
        loss = np.zeros((b, t), dtype=np.float32)
        seg = np.zeros((b, t), dtype=np.int32)
        pos = np.zeros((b, t), dtype=np.int32)
        for i, e in enumerate(elems):
            n = len(e["ids"])
            tokens[i, :n] = e["ids"]
            loss[i, e["prompt_len"]:n] = 1.0
            seg[i, :n] = 1
            pos[i, :n] = np.arange(n)
        return SFTBatch(tokens, loss, seg, pos, _collect_fields([e["row"] for e in elems]),
                        max(e["dropped"] for e in elems))


@dataclasses.dataclass(frozen=True)
class _EncodePrompt:
    """Row -> template + token ids (+ whether it fits). A picklable callable, so the map can
    later run in grain worker processes."""
    tokenizer: Tokenizer
    template: str
    max_len: int
    with_solution: bool = False

    def __call__(self, row: Dict[str, Any]) -> Dict[str, Any]:
        prompt = apply_template(str(row["question"]), self.template, self.tokenizer)
        ids = self.tokenizer.encode(prompt, add_special_tokens=template_adds_special_tokens(self.template))
        out = {"row": row, "prompt": prompt, "limit": self.max_len}
        if self.with_solution:
            sol = row.get("solution")
            if sol is None:
                raise DataError(f"SFT needs a 'solution' field; row {row.get('question')!r} has none")
            target = self.tokenizer.encode(str(sol), add_special_tokens=False) + [self.tokenizer.eos_id]
            out["prompt_len"] = len(ids)
            ids = ids + target
        out["ids"] = ids
        out["length"] = len(ids)
        out["keep"] = len(ids) <= self.max_len
        return out


class BatchIterator:
    """An iterator of PromptBatch / SFTBatch with a checkpointable position.

    get_state() returns a JSON-serialisable dict (the Grain iterator's state); set_state() on
    an iterator built from the same config continues the exact sequence.
    """

    def __init__(self, ds: grain.IterDataset, *, sources: Sequence[Source], rows_per_epoch: int):
        self._ds = ds
        self._it = iter(ds)
        self.sources = list(sources)
        self.rows_per_epoch = rows_per_epoch  # this process's rows per pass (all sources)
        self.num_dropped = 0

    def __iter__(self) -> "BatchIterator":
        return self

    def __next__(self):
        try:
            batch = next(self._it)
        except DataError as e:
            # Grain appends a note about its filtered traceback; keep the one-line message.
            raise DataError(str(e).splitlines()[0]) from None
        self.num_dropped = batch.num_dropped
        return batch

    @property
    def iterator(self) -> grain.DatasetIterator:
        """The Grain iterator itself (for Orbax's Grain checkpoint handlers)."""
        return self._it

    def get_state(self) -> Dict[str, Any]:
        state = self._it.get_state()
        # Round-trip through JSON so a non-serialisable state fails here, not in the checkpoint.
        return json.loads(json.dumps(state))

    def set_state(self, state: Dict[str, Any]) -> None:
        try:
            self._it.set_state(state)
        except (KeyError, TypeError) as e:
            raise DataError(f"data iterator state does not fit this pipeline ({e!r}); was it saved "
                            "with a different data config?") from None

    @property
    def stats(self) -> Dict[str, int]:
        """Counters: rows dropped by the length filter, bad rows skipped by the readers."""
        return {"dropped_too_long": self.num_dropped,
                "bad_rows_skipped": sum(s.rows.bad_rows for s in self.sources),
                "rows_per_epoch": self.rows_per_epoch}


@dataclasses.dataclass(frozen=True)
class _Pass:
    """How one pipeline walks the data: which split, prompts alone or prompt + solution (SFT),
    the length limit, epochs, order, whether a short last batch is kept, and whether the
    sources are mixed by weight (eval reads them one after another)."""

    split: str
    max_len: int
    sft: bool = False
    num_epochs: Optional[int] = None
    shuffle: bool = True
    drop_remainder: bool = True
    mix: bool = True


def _build(cfg: DataConfig, tokenizer: Tokenizer, batch_size: int, walk: _Pass, *,
           buckets: Optional[Sequence[int]],
           shard_options: Optional[grain.sharding.ShardOptions]) -> BatchIterator:
    split, max_len, sft = walk.split, walk.max_len, walk.sft
    num_epochs, shuffle, drop_remainder, mix = walk.num_epochs, walk.shuffle, walk.drop_remainder, walk.mix
    if batch_size <= 0:
        raise DataError(f"batch size must be > 0, got {batch_size}")
    if cfg.seed < 0:
        raise DataError(f"data.seed must be >= 0, got {cfg.seed}")
    shard_options = shard_options if shard_options is not None else default_shard_options()
    sources = load_sources(cfg, split)
    if sft:
        for s in sources:
            if len(s.rows) and s.rows[0].get("solution") is None:
                raise DataError(f"{s.name}: SFT needs a 'solution' field (a worked completion) in every row")
    rows = mixed_rows(sources, seed=cfg.seed, shuffle=shuffle, num_epochs=num_epochs,
                      shard_options=shard_options, mix=mix)
    rows = rows.map(_EncodePrompt(tokenizer, cfg.template, max_len, with_solution=sft))
    read = grain.ReadOptions(num_threads=cfg.worker_count, prefetch_buffer_size=4 * max(cfg.worker_count, 1)
                             if cfg.worker_count else 0)
    per_epoch = sum(len(_shard(grain.MapDataset.source(s.rows), shard_options, s.name)) for s in sources)
    ds = _CountingFilterIterDataset(rows.to_iter_dataset(read), give_up_after=max(per_epoch, 1),
                                    what=", ".join(s.name for s in sources))
    collate = (_SFTCollate if sft else _PromptCollate)(tokenizer.pad_id, tuple(buckets) if buckets else None)
    ds = ds.batch(batch_size, drop_remainder=drop_remainder, batch_fn=collate)
    return BatchIterator(ds, sources=sources, rows_per_epoch=per_epoch)


def prompt_batches(cfg: DataConfig, tokenizer: Tokenizer, batch_size: int, *,
                   buckets: Optional[Sequence[int]] = None,
                   shard_options: Optional[grain.sharding.ShardOptions] = None) -> BatchIterator:
    """Training prompts: PromptBatch of `batch_size` prompts (this process's share of a
    rollout: global P // process_count), shuffled by cfg.seed, for cfg.num_epochs (None:
    forever). Prompts longer than cfg.max_prompt_len tokens are dropped and counted.
    `buckets` (e.g. cfg.sampler.prompt_buckets) bounds the set of padded lengths.
    `shard_options` defaults to this JAX process's shard."""
    return _build(cfg, tokenizer, batch_size, _Pass("train", cfg.max_prompt_len, num_epochs=cfg.num_epochs,
                                                    shuffle=cfg.shuffle),
                  buckets=buckets, shard_options=shard_options)


def eval_batches(cfg: DataConfig, tokenizer: Tokenizer, batch_size: int, *,
                 buckets: Optional[Sequence[int]] = None,
                 shard_options: Optional[grain.sharding.ShardOptions] = None) -> BatchIterator:
    """Held-out prompts, one pass in a fixed order; the last batch may be smaller. By default
    each process takes an equal share (the < process_count leftover rows are skipped) so
    that all processes run the same number of eval steps; pass ShardOptions with
    drop_remainder=False to cover every row."""
    return _build(cfg, tokenizer, batch_size, _Pass("eval", cfg.max_prompt_len, num_epochs=1, shuffle=False,
                                                    drop_remainder=False, mix=False),
                  buckets=buckets, shard_options=shard_options)


def sft_batches(cfg: DataConfig, tokenizer: Tokenizer, batch_size: int, *, max_len: int,
                buckets: Optional[Sequence[int]] = None,
                shard_options: Optional[grain.sharding.ShardOptions] = None,
                num_epochs: Optional[int] = None) -> BatchIterator:
    """Cold-start SFT: SFTBatch of prompt + solution + eos (right-padded, loss on the solution
    and eos), shuffled by cfg.seed, forever by default. Sequences longer than `max_len`
    tokens are dropped and counted. Rows need a `solution` field (the synthetic tasks have
    one)."""
    return _build(cfg, tokenizer, batch_size, _Pass("train", max_len, sft=True, num_epochs=num_epochs,
                                                    shuffle=cfg.shuffle),
                  buckets=buckets, shard_options=shard_options)


__all__ = [
    "FIELDS", "DataError", "RowSource", "Source", "read_rows", "load_sources", "mixed_rows",
    "PromptBatch", "SFTBatch", "BatchIterator", "prompt_batches", "eval_batches", "sft_batches",
    "bucket_length", "default_shard_options", "per_process_batch_size",
]
