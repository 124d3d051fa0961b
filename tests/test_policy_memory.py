"""The policy's remembered verdicts: a fresh process checks a bundle it has seen the origins of without importing
torch, and finds exactly what a live walk finds; a changed environment or a damaged file is walked again."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

from prism_ray.policy import remembered

TRAINING = """
import torch
import torch.nn.functional as F
from torch import nn


def train(ctx):
    model = ctx.build_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for batch in ctx.iter_train_batches(model, batch_size=4, seq_len=32):
        logits = model(batch.tokens)
        F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), batch.tokens[:, 1:].reshape(-1)).backward()
        optimizer.step()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    saved = torch.load  # a forbidden API, under another name
    return nn.Module.__subclasses__, saved
"""
ARCHITECTURE = """
from torch import nn


def build_model(ctx):
    return nn.Sequential(nn.Embedding(ctx.vocab_size, 16), nn.Linear(16, ctx.vocab_size))
"""
CHECK = """
import json, sys
from pathlib import Path
from prism_ray.intake.bundle import load_bundle
from prism_ray.policy import inspect
found = inspect(load_bundle(Path(sys.argv[1])), remember_in=Path(sys.argv[2]))
print(json.dumps({"findings": [[r.rule, r.file, r.line] for r in found], "torch": "torch" in sys.modules}))
"""


def check(bundle: Path, memory: Path) -> dict:
    done = subprocess.run([sys.executable, "-c", CHECK, str(bundle), str(memory)], capture_output=True, text=True,
                          timeout=120, check=True)
    return json.loads(done.stdout)


def write_bundle(where: Path) -> Path:
    where.mkdir()
    (where / "prism.yaml").write_text("name: remembered\ntokenizer: bytes\n")
    (where / "architecture.py").write_text(textwrap.dedent(ARCHITECTURE))
    (where / "training.py").write_text(textwrap.dedent(TRAINING))
    return where


def test_a_fresh_process_checks_from_remembered_verdicts_without_torch(tmp_path):
    bundle, memory = write_bundle(tmp_path / "bundle"), tmp_path / "policy"
    live = check(bundle, memory)
    assert live["torch"], "the first check walks torch's real namespace"
    assert {rule for rule, _, _ in live["findings"]} >= {"sandbox:forbidden_api", "sandbox:dunder"}, live
    [kept] = memory.glob("reach-*.json")
    assert any(key.startswith("reach:torch.") for key in json.loads(kept.read_text()))
    again = check(bundle, memory)
    assert again == {"findings": live["findings"], "torch": False}


def test_a_damaged_file_is_walked_again_and_rewritten(tmp_path):
    bundle, memory = write_bundle(tmp_path / "bundle"), tmp_path / "policy"
    live = check(bundle, memory)
    [kept] = memory.glob("reach-*.json")
    kept.write_text('{"reach:torch.load": ["torch.load", null')  # cut short
    again = check(bundle, memory)
    assert again == {"findings": live["findings"], "torch": True}
    assert "reach:torch.load" in json.loads(kept.read_text())


def test_another_package_version_is_another_file(tmp_path, monkeypatch):
    site = tmp_path / "site"
    (site / "somepkg-1.0.dist-info").mkdir(parents=True)
    before = remembered.fingerprint()
    try:
        monkeypatch.syspath_prepend(str(site))
        remembered.fingerprint.cache_clear()
        installed = remembered.fingerprint()
        (site / "somepkg-1.0.dist-info").rename(site / "somepkg-1.1.dist-info")
        remembered.fingerprint.cache_clear()
        upgraded = remembered.fingerprint()
    finally:
        remembered.fingerprint.cache_clear()
    assert len({before, installed, upgraded}) == 3
