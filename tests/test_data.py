"""Locked data: deterministic `prepare`, manifest verification, the §4.1 line rule and the data CLI."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import duckdb
import numpy as np
import pytest
import typer
from prepare_reference import reference_prepare
from typer.testing import CliRunner

from prism_ray.config import EMBEDDED_DATA_DIR
from prism_ray.data import SplitRule, open_dataset, prepare
from prism_ray.data import preparation as prepare_module
from prism_ray.data.cli import data_app
from prism_ray.data.dataset import MANIFEST_NAME
from prism_ray.errors import DataError

REPO = Path(__file__).resolve().parents[1]
EMBEDDED_SOURCE = Path("/work/shared/data/python-docs-edu.jsonl.gz")
WORDS = ["alpha", "beta", "gamma", "naïve", "日本語", "🤖", "don't", "  spaced  ", "tab\tbed", "line\nbreak"]


def make_records(n: int, seed: int = 0) -> list[dict]:
    """Varied records: str/int/float/bool/absent ids, unicode, a duplicate and a same-text-other-id pair."""
    rng = random.Random(seed)
    records = []
    for i in range(n):
        text = f"doc {i}: " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 30)))
        kind = i % 5
        doc_id = {0: f"id-{i}", 1: i, 2: None, 3: i + 0.5, 4: f"ïd-{i}"}[kind]
        records.append({"text": text} if doc_id is None else {"id": doc_id, "text": text})
    records.append(dict(records[0]))  # exact duplicate: written once
    records.append({"text": records[2]["text"]})  # no id, same text as an id-less record: written once
    records.append({"id": "other", "text": records[0]["text"]})  # same text, other id: kept
    records.append({"id": True, "text": "a bool id"})
    return records


def write_jsonl(path: Path, records: list[dict], extra_lines: tuple[bytes, ...] = ()) -> Path:
    data = b"".join(json.dumps(r, ensure_ascii=bool(len(r) % 2)).encode() + b"\n" for r in records)
    data += b"".join(extra_lines)
    if path.name.endswith(".gz"):
        path.write_bytes(gzip.compress(data))
    else:
        path.write_bytes(data)
    return path


def write_parquet(path: Path, records: list[dict]) -> Path:
    """Parquet with a VARCHAR id column holding the same normalised ids the JSON records get."""
    def norm(v):
        return v if v is None or isinstance(v, str) else json.dumps(v)

    table = {"id": np.array([norm(r.get("id")) for r in records], dtype=object),
             "text": np.array([r["text"] for r in records], dtype=object)}
    with duckdb.connect() as con:
        con.register("records", table)
        con.execute(f"COPY (SELECT id::VARCHAR AS id, text FROM records) TO '{path}' (FORMAT parquet)")
    return path


def all_files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def expected_split(record: dict, rule: SplitRule) -> str:
    doc_id = record.get("id")
    key = record["text"] if doc_id is None else doc_id if isinstance(doc_id, str) else json.dumps(doc_id)
    bucket = int(hashlib.sha256(key.encode()).hexdigest(), 16) % 1000
    return ("train", "val", "test")[rule.split_index(bucket)]


@pytest.fixture(scope="module")
def records() -> list[dict]:
    return make_records(400)


@pytest.fixture()
def small(tmp_path, records) -> Path:
    out = tmp_path / "ds"
    prepare([write_jsonl(tmp_path / "src.jsonl", records)], out, SplitRule(800, 100, 100))
    return out


# ------------------------------------------------------------------------------------------ prepare

def test_prepare_is_byte_identical_for_any_order_and_file_layout(tmp_path, records, monkeypatch):
    monkeypatch.setattr(prepare_module, "_BUCKET_SHARE", 1 << 12)  # 4 KiB buckets: many spills and buckets
    a = tmp_path / "a"
    a.mkdir()
    prepare([write_jsonl(a / "all.jsonl", records)], tmp_path / "out_a", SplitRule(800, 100, 100))

    shuffled = records[:]
    random.Random(7).shuffle(shuffled)
    b = tmp_path / "b"
    b.mkdir()
    parts = [shuffled[:150], shuffled[150:300], shuffled[300:]]
    sources = [write_jsonl(b / "z.jsonl.gz", parts[0]), write_parquet(b / "m.parquet", parts[1]),
               write_jsonl(b / "a.jsonl", parts[2])]
    prepare(sources[::-1], tmp_path / "out_b", SplitRule(800, 100, 100))

    files_a, files_b = all_files(tmp_path / "out_a"), all_files(tmp_path / "out_b")
    assert files_a == files_b
    assert set(files_a) == {MANIFEST_NAME, "train/train-00000.jsonl.gz", "val/val-00000.jsonl.gz",
                            "test/test-00000.jsonl.gz"}


def awkward_corpus(tmp_path: Path) -> list[Path]:
    """make_records plus what stresses the order: one id with many texts, "" and absent ids, NUL and control
    characters, repeats across files, bad lines; shuffled over JSONL, JSONL.gz and Parquet."""
    recs = make_records(600, seed=3)
    recs += [{"id": "shared", "text": f"text {i} {'é' * (i % 3)}"} for i in range(40)]  # one key, many texts
    recs += [{"text": "shared"}, {"text": "0"}]  # the same keys without an id: sorted first
    recs += [{"id": "", "text": "empty id"}, {"text": "empty id"}, {"id": "", "text": "a\x00b\x01c"},
             {"text": "tab\tand\x7f"}, {"id": 0, "text": "zero"}, {"id": 0.0, "text": "zero"}]
    recs += random.Random(4).sample(recs, 80)  # duplicates, landing in other files
    random.Random(5).shuffle(recs)
    bad = (b"not json\n", b'{"text": ""}\n', b'{"text": "x", "id": {"a": 1}}\n')
    return [write_jsonl(tmp_path / "a.jsonl", recs[:300], bad), write_jsonl(tmp_path / "b.jsonl.gz", recs[300:600]),
            write_parquet(tmp_path / "c.parquet", recs[600:])]


@pytest.mark.parametrize("bucket_share", [8, 1 << 12, 1 << 15])
def test_prepare_matches_the_old_duckdb_algorithm(tmp_path, monkeypatch, bucket_share):
    """Byte-identical to the DuckDB staging it replaced, whether the split fits one bucket (8: the default
    share), many (4 KiB) or needs oversized buckets split again (512 B, smaller than the estimate assumed)."""
    sources = awkward_corpus(tmp_path)
    rule = SplitRule(700, 150, 150)
    reference_prepare(sources, tmp_path / "old", rule, shard_bytes=20_000)
    monkeypatch.setattr(prepare_module, "_BUCKET_SHARE", bucket_share)
    summary = prepare(sources[::-1], tmp_path / "new", rule, shard_bytes=20_000, memory_mb=16)
    old, new = all_files(tmp_path / "old"), all_files(tmp_path / "new")
    assert sorted(new) == sorted(old) and len(old) > 6  # several train shards
    assert new == old
    assert summary.duplicates > 80 and summary.skipped_lines == 3


def test_prepare_memory_does_not_grow_with_input(tmp_path):
    """Peak RSS of a prepare process (a fresh interpreter, 16 MiB budget) at 3 and 12 MB of JSONL."""
    rng = random.Random(6)
    words = [f"w{i}" for i in range(5000)] + ["naïve", "日本語"]
    peaks = []
    for mb in (3, 12):
        src = tmp_path / f"in{mb}.jsonl"
        with open(src, "w") as f:
            while f.tell() < mb * 1_000_000:
                text = " ".join(rng.choices(words, k=rng.randint(50, 1500)))
                f.write(json.dumps({"id": rng.getrandbits(40), "text": text}) + "\n")
        # VmHWM, not ru_maxrss: that one also counts the RSS of the process exec replaced (pytest, via vfork)
        code = ("import sys; from pathlib import Path; from prism_ray.data import prepare; "
                "prepare([Path(sys.argv[1])], Path(sys.argv[2]), memory_mb=16); "
                "print(next(l for l in open('/proc/self/status') if l.startswith('VmHWM')).split()[1])")
        done = subprocess.run([sys.executable, "-c", code, str(src), str(tmp_path / f"out{mb}")],
                              capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
        assert done.returncode == 0, done.stderr
        peaks.append(int(done.stdout.split()[-1]))
    # the interpreter is most of it at these sizes: also hold the growth to under half the input's 9 MB
    grown = (peaks[1] - peaks[0]) / 1024
    assert peaks[1] < 1.3 * peaks[0] and grown < 4.5, f"peak RSS {peaks[0] // 1024} MB at 3 MB, {peaks[1] // 1024} MB at 12 MB"


def test_prepare_splits_dedups_and_sorts(small, records):
    rule = SplitRule(800, 100, 100)
    ds = open_dataset(small)
    unique = {(json.dumps(r.get("id")), r["text"]): r for r in records}.values()
    for split in ("train", "val", "test"):
        want = sorted(r["text"] for r in unique if expected_split(r, rule) == split)
        assert sorted(ds.iter_documents(split)) == want
        assert ds.skipped_lines[split] == 0
    manifest = ds.manifest
    assert manifest["source"] == {"duplicates": 2, "skipped_lines": 0}
    assert manifest["split_rule"] == {"train": 800, "val": 100, "test": 100}
    assert sum(manifest["splits"][s]["documents"] for s in ("train", "val", "test")) == len(records) - 2

    # lines are ordered by (sha256 key, id, text) and written compactly, id omitted when absent
    with gzip.open(small / "train" / "train-00000.jsonl.gz", "rb") as f:
        lines = [json.loads(raw) for raw in f]
    keys = [hashlib.sha256((o.get("id", o["text"])).encode()).hexdigest() for o in lines]
    assert keys == sorted(keys)
    assert all(isinstance(o.get("id", ""), str) for o in lines)
    assert any("id" not in o for o in lines)


def test_split_proportions_follow_the_rule(tmp_path):
    recs = [{"id": f"k{i}", "text": f"t{i}"} for i in range(4000)]
    summary = prepare([write_jsonl(tmp_path / "s.jsonl", recs)], tmp_path / "o", SplitRule(600, 300, 100))
    for split, share in (("train", 0.6), ("val", 0.3), ("test", 0.1)):
        assert abs(summary.documents[split] / 4000 - share) < 0.03
    assert sum(summary.documents.values()) == 4000


def test_bad_lines_are_skipped_and_counted(tmp_path):
    bad = (b"not json\n", b"[1, 2]\n", b'{"id": "x"}\n', b'{"text": ""}\n', b'{"text": 5}\n',
           b'{"text": "ok", "id": [1]}\n', b"\n", b'{"text": "\xff\xfe"}\n', b'{"text": "\\ud800"}\n')
    src = write_jsonl(tmp_path / "s.jsonl", [{"text": "good one"}, {"text": "good two", "id": 3}], bad)
    summary = prepare([src], tmp_path / "o", SplitRule(1000, 0, 0))
    assert summary.skipped_lines == len(bad)
    assert summary.documents == {"train": 2, "val": 0, "test": 0}
    assert open_dataset(tmp_path / "o").manifest["source"]["skipped_lines"] == len(bad)


def test_parquet_with_integer_ids_and_no_id_column(tmp_path):
    with duckdb.connect() as con:
        con.execute(f"COPY (SELECT range AS id, 'text ' || range AS text FROM range(5)) "
                    f"TO '{tmp_path / 'ints.parquet'}' (FORMAT parquet)")
        con.execute(f"COPY (SELECT 'only text ' || range AS text FROM range(3)) "
                    f"TO '{tmp_path / 'noid.parquet'}' (FORMAT parquet)")
    prepare([tmp_path], tmp_path / "o", SplitRule(1000, 0, 0))  # a directory source is scanned
    with gzip.open(tmp_path / "o" / "train" / "train-00000.jsonl.gz", "rb") as f:
        lines = [json.loads(raw) for raw in f]
    assert sorted(o["id"] for o in lines if "id" in o) == ["0", "1", "2", "3", "4"]
    assert sum("id" not in o for o in lines) == 3


def test_small_shards_roll_over_in_order(tmp_path, records):
    prepare([write_jsonl(tmp_path / "s.jsonl", records)], tmp_path / "big", SplitRule(1000, 0, 0))
    prepare([write_jsonl(tmp_path / "s.jsonl", records)], tmp_path / "o", SplitRule(1000, 0, 0),
            shard_bytes=4096)
    ds = open_dataset(tmp_path / "o")
    shards = ds.shards("train")
    assert len(shards) > 3 and [p.name for p in shards] == sorted(p.name for p in shards)
    assert list(ds.iter_documents("train")) == list(open_dataset(tmp_path / "big").iter_documents("train"))
    assert not ds.has_split("val")


def test_out_dir_is_not_overwritten_without_consent(tmp_path, records):
    src = write_jsonl(tmp_path / "s.jsonl", records)
    prepare([src], tmp_path / "o")
    with pytest.raises(DataError) as err:
        prepare([src], tmp_path / "o")
    assert err.value.rule == "data:out_exists"
    (tmp_path / "o" / "NOTES.md").write_text("kept")
    prepare([src], tmp_path / "o", overwrite=True)
    assert (tmp_path / "o" / "NOTES.md").read_text() == "kept"
    assert open_dataset(tmp_path / "o").pinned


def test_prepare_input_errors(tmp_path):
    with pytest.raises(DataError) as err:
        prepare([tmp_path / "missing.jsonl"], tmp_path / "o")
    assert err.value.rule == "data:not_found"
    (tmp_path / "x.csv").write_text("text\n")
    with pytest.raises(DataError) as err:
        prepare([tmp_path / "x.csv"], tmp_path / "o")
    assert err.value.rule == "data:bad_source"
    with pytest.raises(DataError) as err:
        SplitRule(900, 50, 40)
    assert err.value.rule == "data:bad_split_rule"
    (tmp_path / "ok.jsonl").write_text('{"text": "fine"}\n')
    with pytest.raises(DataError) as err:
        prepare([tmp_path / "ok.jsonl"], tmp_path / "o", memory_mb=8)
    assert err.value.rule == "data:bad_memory"


def test_embedded_dataset_regenerates_to_its_committed_fingerprint(tmp_path):
    committed = open_dataset(EMBEDDED_DATA_DIR)
    assert committed.pinned
    # self-contained: the embedded records, shuffled across two files, lock to the same fingerprint
    lines = []
    for split in ("train", "val", "test"):
        for shard in committed.shards(split):
            with gzip.open(shard, "rb") as f:
                lines += f.read().splitlines(keepends=True)
    random.Random(1).shuffle(lines)
    (tmp_path / "one.jsonl").write_bytes(b"".join(lines[::2]))
    (tmp_path / "two.jsonl.gz").write_bytes(gzip.compress(b"".join(lines[1::2])))
    summary = prepare([tmp_path / "two.jsonl.gz", tmp_path / "one.jsonl"], tmp_path / "again")
    assert summary.fingerprint == committed.fingerprint
    assert all_files(tmp_path / "again") == {k: v for k, v in all_files(EMBEDDED_DATA_DIR).items()
                                             if k != "SOURCE.md"}


@pytest.mark.skipif(not EMBEDDED_SOURCE.exists(), reason="original source file not on this machine")
def test_embedded_dataset_regenerates_from_its_source(tmp_path):
    summary = prepare([EMBEDDED_SOURCE], tmp_path / "again")
    assert summary.fingerprint == open_dataset(EMBEDDED_DATA_DIR).fingerprint
    committed = (EMBEDDED_DATA_DIR / MANIFEST_NAME).read_bytes()
    assert (tmp_path / "again" / MANIFEST_NAME).read_bytes() == committed


# ------------------------------------------------------------------------------------------ verification

def test_flipped_byte_is_tampered_and_names_the_shard(small):
    shard = small / "train" / "train-00000.jsonl.gz"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    ds = open_dataset(small)  # opening is cheap; every shards() call verifies
    with pytest.raises(DataError) as err:
        ds.shards("train")
    assert err.value.rule == "data:tampered"
    assert "train/train-00000.jsonl.gz" in err.value.reasons[0].message
    assert "sha256" in err.value.reasons[0].message
    with pytest.raises(DataError):
        list(ds.iter_documents("train"))
    assert len(ds.shards("val")) == 1  # other splits are still fine


def test_truncated_shard_is_tampered(small):
    shard = small / "val" / "val-00000.jsonl.gz"
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(DataError) as err:
        open_dataset(small).shards("val")
    assert err.value.rule == "data:tampered" and "bytes" in err.value.reasons[0].message


def test_missing_and_unlisted_shards(small):
    (small / "train" / "extra.jsonl").write_text('{"text": "smuggled"}\n')
    with pytest.raises(DataError) as err:
        open_dataset(small).shards("train")
    assert err.value.rule == "data:unlisted_shard" and "extra.jsonl" in err.value.reasons[0].message
    (small / "train" / "extra.jsonl").unlink()
    (small / "test" / "test-00000.jsonl.gz").unlink()
    with pytest.raises(DataError) as err:
        open_dataset(small).shards("test")
    assert err.value.rule == "data:missing_shard"


def test_manifest_problems(small):
    manifest_path = small / MANIFEST_NAME
    manifest = json.loads(manifest_path.read_text())

    manifest["splits"]["train"]["shards"][0]["documents"] += 1  # listing no longer matches its fingerprint
    manifest["splits"]["train"]["documents"] += 1
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(DataError) as err:
        open_dataset(small)
    assert err.value.rule == "data:bad_manifest"

    manifest_path.write_text("{not json")
    with pytest.raises(DataError) as err:
        open_dataset(small)
    assert err.value.rule == "data:bad_manifest"

    manifest_path.write_text(json.dumps({"format": "prism-ray-locked-text/1", "splits": {"train": {
        "shards": [{"path": "../escape.jsonl", "sha256": "0", "bytes": 1, "documents": 1, "text_bytes": 1}],
        "documents": 1, "text_bytes": 1}}}))
    with pytest.raises(DataError) as err:
        open_dataset(small)
    assert err.value.rule == "data:bad_manifest"


def test_unpinned_dir_is_accepted(tmp_path):
    (tmp_path / "train").mkdir()
    write_jsonl(tmp_path / "train" / "b.jsonl.gz", [{"text": "second"}], (b"junk\n",))
    write_jsonl(tmp_path / "train" / "a.jsonl", [{"text": "first"}, {"id": 1, "text": "also first"}])
    ds = open_dataset(tmp_path)
    assert not ds.pinned and ds.manifest is None
    assert ds.fingerprint.startswith("unpinned-") and len(ds.fingerprint) == len("unpinned-") + 64
    assert list(ds.iter_documents("train")) == ["first", "also first", "second"]
    assert ds.skipped_lines["train"] == 1
    assert not ds.has_split("val")
    before = ds.fingerprint
    write_jsonl(tmp_path / "train" / "a.jsonl", [{"text": "changed"}])
    assert open_dataset(tmp_path).fingerprint != before


def test_not_found_and_no_train_split(tmp_path):
    with pytest.raises(DataError) as err:
        open_dataset(tmp_path / "nope")
    assert err.value.rule == "data:not_found"
    (tmp_path / "val").mkdir()
    write_jsonl(tmp_path / "val" / "v.jsonl", [{"text": "x"}])
    with pytest.raises(DataError) as err:
        open_dataset(tmp_path)
    assert err.value.rule == "data:no_train_split"


# ------------------------------------------------------------------------------------------ CLI

@pytest.fixture(scope="module")
def cli():
    app = typer.Typer()
    app.add_typer(data_app, name="data")
    runner = CliRunner()
    return lambda *args: runner.invoke(app, ["data", *map(str, args)])


def test_cli_prepare_info_tokenize(tmp_path, records, cli):
    src = write_jsonl(tmp_path / "s.jsonl", records)
    result = cli("prepare", src, "--out", tmp_path / "o", "--split", "900,50,50", "--shard-mb", "1", "--memory-mb", "16")
    assert result.exit_code == 0, result.output
    fingerprint = open_dataset(tmp_path / "o").fingerprint
    assert fingerprint in result.output
    result = cli("info", tmp_path / "o")
    assert result.exit_code == 0 and "pinned" in result.output and fingerprint in result.output
    result = cli("tokenize", tmp_path / "o", "--tokenizer", "bytes", "--cache-dir", tmp_path / "cache")
    assert result.exit_code == 0 and "MB/s" in result.output, result.output


def test_cli_errors(tmp_path, records, cli):
    src = write_jsonl(tmp_path / "s.jsonl", records)
    assert cli("prepare", src, "--out", tmp_path / "o", "--split", "1,2").exit_code == 2
    assert cli("prepare", src, "--out", tmp_path / "o", "--split", "500,400,50").exit_code == 2
    assert cli("tokenize", tmp_path, "--tokenizer", "llama").exit_code == 2
    assert cli("prepare", src, "--out", tmp_path / "o", "--memory-mb", "8").exit_code == 2
    assert cli("prepare", src, "--out", tmp_path / "o").exit_code == 0
    shard = tmp_path / "o" / "train" / "train-00000.jsonl.gz"
    shard.write_bytes(shard.read_bytes() + b"x")
    result = cli("info", tmp_path / "o")
    assert result.exit_code == 1
    assert "error [data:tampered]" in result.output
    shutil.rmtree(tmp_path / "o")
    result = cli("info", tmp_path / "o")
    assert result.exit_code == 1 and "error [data:not_found]" in result.output


def test_cli_prepare_fails_when_a_split_ends_up_empty(tmp_path, cli):
    """Three good documents and three bad lines: with the default rule val and test stay empty, which is an error
    (exit 1, data:empty_split), not a quiet "skipped lines: 3"; a rule that asks for no val/test accepts it."""
    src = tmp_path / "s.jsonl"
    src.write_text("".join(json.dumps({"text": f"document {i}"}) + "\n" for i in range(3)) + "{bad\n[1]\n\"x\"\n")
    result = cli("prepare", src, "--out", tmp_path / "o")
    assert result.exit_code == 1 and "data:empty_split" in result.output and "3 skipped lines" in result.output
    assert cli("prepare", src, "--out", tmp_path / "p", "--split", "1000,0,0").exit_code == 0
