"""Data plane at scale: `prism-ray data prepare` throughput and peak memory at two input sizes 4× apart, the old
way (commit 50401b2: every document staged in DuckDB, `SELECT DISTINCT … ORDER BY` per split) against this
checkout's (hash-partitioned buckets sorted one at a time, gzip on a background thread), and the gpt2 token-cache
build against tiktoken's own `encode_ordinary_batch` on the same documents and threads.

The input is synthetic JSONL (seeded): FineWeb-like documents of log-normal length (mean about 3 KB), string,
integer and missing ids, some non-ASCII text and about 3% exact duplicate lines, in no particular order.

Every measurement runs in a fresh process (this checkout's or the old tree first on PYTHONPATH), interleaved old /
new for each size and round; peak RSS is the child's VmHWM (its whole life: interpreter, imports, DuckDB),
MB/s is input bytes ÷ seconds of the `prepare()` call. Old and new outputs are compared byte for byte. Token-cache
rows encode the smaller dataset's train split: tiktoken on texts already in memory, then the full cache build
(reading and verifying the shards, encoding, writing), each with the same thread count.

Targets: new peak RSS at the larger size within 1.3× of the smaller; new MB/s ≥ old; cache build ≥ 0.9 × tiktoken.

    python bench/data_prep.py [--sizes-mb 25 100] [--rounds 1] [--threads 0] [--memory-mb 256] [--no-old]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OLD_COMMIT = "50401b2"  # the last `prepare` that staged every document in DuckDB


# --------------------------------------------------------------------------------------------- corpus

def generate(path: Path, size_bytes: int, seed: int = 0) -> int:
    """Write about size_bytes of synthetic JSONL to path; returns the number of distinct documents."""
    import numpy as np

    rng, r = np.random.default_rng(seed), random.Random(seed)
    syllables = ["ka", "lo", "mi", "ten", "ser", "qua", "nor", "phi", "del", "tra", "ion", "ent", "ar", "ic",
                 "ous", "ble", "ly", "ment", "pre", "con"]
    words = ["".join(r.choice(syllables) for _ in range(r.randint(1, 4))) for _ in range(20000)]
    words += ["naïve", "café", "日本語", "🤖", "Straße", "δοκιμή", "don't", "1999", "3.14", "(x)"]
    words = np.array(words, dtype=object)
    sentences = []
    for _ in range(50000):
        s = " ".join(words[rng.integers(0, len(words), r.randint(4, 30))])
        sentences.append(s[0].upper() + s[1:] + r.choice([".", ".", "?", "!", ":\n"]))
    sentences = np.array(sentences, dtype=object)
    written, docs, recent = 0, 0, []
    with open(path, "w", encoding="utf-8") as f:
        while written < size_bytes:
            if recent and r.random() < 0.03:
                line = r.choice(recent)  # an exact duplicate of an earlier line
            else:
                text = f"Doc {docs}. " + " ".join(sentences[rng.integers(0, len(sentences),
                                                                         int(rng.lognormal(2.5, 1.0)) + 1)])
                kind = docs % 4
                record = {"text": text} if kind == 0 else {"id": f"doc-{docs}" if kind < 3 else docs, "text": text}
                line = json.dumps(record, ensure_ascii=bool(docs % 2)) + "\n"
                if len(recent) < 1000:
                    recent.append(line)
                else:
                    recent[r.randrange(1000)] = line
                docs += 1
            f.write(line)
            written += len(line.encode("utf-8"))
    return docs


# --------------------------------------------------------------------------------------------- children

def child(job: dict) -> None:
    """One measurement in this process; prints a JSON line."""
    import prism_ray

    result = {"tree": str(Path(prism_ray.__file__).parents[1])}
    if job["what"] == "prepare":
        from prism_ray.data.preparation import prepare

        extra = {"memory_mb": job["memory_mb"]} if job.get("memory_mb") else {}
        start, cpu = time.perf_counter(), time.process_time()
        summary = prepare([Path(job["src"])], Path(job["out"]), **extra)
        result.update(seconds=time.perf_counter() - start, cpu=time.process_time() - cpu,
                      fingerprint=summary.fingerprint)
    elif job["what"] == "cache":
        from prism_ray.data import build_token_cache, open_dataset

        cpu = time.process_time()
        built = build_token_cache(open_dataset(Path(job["data"])), "train", "gpt2", Path(job["cache"]),
                                  job["threads"])
        result.update(seconds=built["seconds"], cpu=time.process_time() - cpu, text_bytes=built["text_bytes"])
    else:  # tiktoken alone, on the same documents already in memory
        from prism_ray.data import get_tokenizer, open_dataset

        texts = list(open_dataset(Path(job["data"])).iter_documents("train"))
        encoding = get_tokenizer("gpt2")._enc  # the tiktoken Encoding the cache uses
        start, cpu = time.perf_counter(), time.process_time()
        encoding.encode_ordinary_batch(texts, num_threads=job["threads"])
        result.update(seconds=time.perf_counter() - start, cpu=time.process_time() - cpu,
                      text_bytes=sum(len(t.encode("utf-8")) for t in texts))
    print(json.dumps({**result, "rss_mb": peak_rss_mb()}))


def peak_rss_mb() -> float:
    """This process's peak RSS since exec (VmHWM). Not ru_maxrss: Linux folds the RSS of the address space exec
    replaced into it, and subprocess starts children with vfork, so that would be the parent's peak."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise SystemExit("no VmHWM in /proc/self/status: peak RSS needs Linux")


def run_child(tree: Path, job: dict) -> dict:
    """Run one job in a fresh interpreter with `tree` first on PYTHONPATH."""
    done = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(job)],
                          env={**os.environ, "PYTHONPATH": str(tree)}, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{job['what']} in {tree} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    if Path(result["tree"]).resolve() != tree.resolve():
        raise SystemExit(f"child imported prism_ray from {result['tree']}, not {tree}")
    return result


def export_old(scratch: Path) -> tuple[Path | None, str]:
    root = scratch / f"prism-ray-{OLD_COMMIT}"
    archive = subprocess.run(["git", "-C", str(REPO), "archive", OLD_COMMIT], capture_output=True) \
        if shutil.which("git") else None
    if archive is None or archive.returncode != 0:
        return None, f"old way skipped: no git checkout holding commit {OLD_COMMIT} here"
    root.mkdir()
    subprocess.run(["tar", "-x", "-C", str(root)], input=archive.stdout, check=True)
    return root, f"old way: commit {OLD_COMMIT}, exported to a temp dir"


def tree_files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def load() -> str:
    return "{:.2f} {:.2f} {:.2f}".format(*os.getloadavg())


# --------------------------------------------------------------------------------------------- main

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes-mb", type=float, nargs=2, default=[25, 100], help="the two input sizes (MB)")
    parser.add_argument("--rounds", type=int, default=1, help="interleaved rounds; medians are shown")
    parser.add_argument("--threads", type=int, default=0, help="token-cache and tiktoken threads (0 = all cores)")
    parser.add_argument("--memory-mb", type=int, default=0, help="new prepare's memory budget (0 = its default)")
    parser.add_argument("--no-old", action="store_true", help="skip the old way")
    parser.add_argument("--scratch", type=Path, default=None, help="where inputs and outputs go (default: a temp dir)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(json.loads(args.child))
        return
    threads = args.threads or os.cpu_count() or 1
    scratch = Path(tempfile.mkdtemp(prefix="prism-data-bench-", dir=args.scratch))
    try:
        old_tree, old_note = (None, "old way skipped (--no-old)") if args.no_old else export_old(scratch)
        trees = {"new": REPO} | ({"old": old_tree} if old_tree else {})
        loads = [load()]
        sources = {}
        for size in args.sizes_mb:
            sources[size] = scratch / f"corpus-{size:g}MB.jsonl"
            generate(sources[size], int(size * 1e6), seed=int(size))
        rows: dict[tuple[str, float], list[dict]] = {}
        for round_ in range(args.rounds):
            for size in args.sizes_mb:
                for way in (["old", "new"] if round_ % 2 == 0 else ["new", "old"]):
                    if way not in trees:
                        continue
                    out = scratch / f"out-{way}-{size:g}"
                    shutil.rmtree(out, ignore_errors=True)
                    job = {"what": "prepare", "src": str(sources[size]), "out": str(out),
                           "memory_mb": args.memory_mb if way == "new" else 0}
                    rows.setdefault((way, size), []).append(run_child(trees[way], job))
                if "old" in trees and tree_files(scratch / f"out-old-{size:g}") != \
                        tree_files(scratch / f"out-new-{size:g}"):
                    raise SystemExit(f"old and new outputs differ at {size:g} MB")
            loads.append(load())

        # the smaller dataset: tiktoken's batch call holds every text and token list in memory at once
        data = scratch / f"out-new-{args.sizes_mb[0]:g}"
        cache_rows: dict[str, list[dict]] = {}
        for _ in range(args.rounds):
            for name in ("tiktoken", "new cache", "old cache"):
                way = name.split()[0]
                if way == "old" and "old" not in trees:
                    continue
                cache = scratch / f"cache-{way}"
                shutil.rmtree(cache, ignore_errors=True)
                job = {"what": "tiktoken" if way == "tiktoken" else "cache", "data": str(data), "cache": str(cache),
                       "threads": threads}
                cache_rows.setdefault(name, []).append(run_child(trees.get(way, REPO), job))
            if "old" in trees:
                a, b = (tree_files(scratch / f"cache-{w}" / "tokens") for w in ("new", "old"))
                strip = {k: v for k, v in a.items() if not k.endswith("meta.json")}
                if strip != {k: v for k, v in b.items() if not k.endswith("meta.json")}:
                    raise SystemExit("old and new token caches differ")
            loads.append(load())
        report(args, sources, rows, cache_rows, threads, loads, old_note)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def report(args, sources: dict, rows: dict, cache_rows: dict, threads: int, loads: list[str], old_note: str) -> None:
    small, large = args.sizes_mb
    same = "; old and new outputs (shards, MANIFEST, token caches) byte-identical" if ("old", small) in rows else ""
    print(f"{os.cpu_count()} cores; {args.rounds} round(s), medians; {old_note}{same}")
    print("load average (1/5/15 min) at start and after each round: " + " | ".join(loads))
    print("MB/s: input (or text) MB per wall second; MB/cpu-s: per CPU second of all the process's threads, the fairer"
          " figure when the load average is above the core count")
    print(f"\n{'data prepare':<16}{'input MB':>10}{'seconds':>10}{'MB/s':>8}{'MB/cpu-s':>10}{'peak RSS MB':>13}")
    med = {}
    for (way, size), results in sorted(rows.items(), key=lambda kv: (kv[0][1], kv[0][0] != "old")):
        mb = sources[size].stat().st_size / 1e6
        seconds, cpu, rss = (statistics.median(r[k] for r in results) for k in ("seconds", "cpu", "rss_mb"))
        med[way, size] = (mb / seconds, mb / cpu, rss)
        print(f"{way:<16}{mb:>10.1f}{seconds:>10.2f}{mb / seconds:>8.1f}{mb / cpu:>10.1f}{rss:>13.0f}")
    print()
    for way in ("old", "new"):
        if (way, small) in med:
            print(f"{way}: peak RSS {large:g} MB ÷ {small:g} MB input = {med[way, large][2] / med[way, small][2]:.2f}"
                  + (" (target ≤ 1.30)" if way == "new" else ""))
    if ("old", small) in med:
        for size in args.sizes_mb:
            print(f"new ÷ old at {size:g} MB: {med['new', size][0] / med['old', size][0]:.2f} by wall, "
                  f"{med['new', size][1] / med['old', size][1]:.2f} by CPU (target ≥ 1.0)")
    print(f"\n{'gpt2, ' + str(threads) + ' threads':<16}{'text MB':>10}{'seconds':>10}{'MB/s':>8}{'MB/cpu-s':>10}"
          f"{'peak RSS MB':>13}")
    rate = {}
    for name, results in cache_rows.items():
        mb = results[0]["text_bytes"] / 1e6
        seconds, cpu, rss = (statistics.median(r[k] for r in results) for k in ("seconds", "cpu", "rss_mb"))
        rate[name] = (mb / seconds, mb / cpu)
        print(f"{name:<16}{mb:>10.1f}{seconds:>10.2f}{mb / seconds:>8.1f}{mb / cpu:>10.1f}{rss:>13.0f}")
    print()
    for name in ("new cache", "old cache"):
        if name in rate:
            print(f"{name} ÷ tiktoken: {rate[name][0] / rate['tiktoken'][0]:.2f} by wall, "
                  f"{rate[name][1] / rate['tiktoken'][1]:.2f} by CPU" + (" (target ≥ 0.90)" if "new" in name else ""))


if __name__ == "__main__":
    main()
