"""Intake and contract: every `intake:*` / `contract:*` rule with a bundle that breaks it and a twin that passes."""

from __future__ import annotations

import base64
import io
import stat
import zipfile

import pytest

from conftest import write_bundle
from miners import QUICKSTART_YAML
from prism_ray.config import IntakeLimits
from prism_ray.errors import BundleError
from prism_ray.intake.bundle import load_bundle

ARCH = "def build_model(ctx):\n    return None\n"
TRAIN = "def train(ctx):\n    pass\n"
GOOD = {"architecture.py": ARCH, "training.py": TRAIN}


def zipped(files: dict[str, bytes | str], symlink: str | None = None) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, content in files.items():
            archive.writestr(name, content)
        if symlink:
            info = zipfile.ZipInfo(symlink)
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            archive.writestr(info, "/etc/passwd")
    return buffer.getvalue()


def rule_of(source, limits=None) -> str:
    with pytest.raises(BundleError) as caught:
        load_bundle(source, limits)
    return caught.value.rule


def test_legitimate_zip_base64_and_directory(tmp_path):
    files = {**GOOD, "prism.yaml": "name: ok\ntokenizer: bytes\n", "models/blocks.py": "X = 1\n", "README.md": "hi"}
    assert load_bundle(zipped(files)).config.tokenizer == "bytes"
    assert load_bundle(base64.b64encode(zipped(files)).decode()).display_name == "ok"
    directory = write_bundle(tmp_path / "b", ARCH, TRAIN)
    assert load_bundle(directory).sha256 == load_bundle(zipped(GOOD)).sha256


@pytest.mark.parametrize("name,rule", [("../evil.py", "intake:path_traversal"), ("/abs.py", "intake:absolute_path"),
                                       ("inner.zip", "intake:nested_archive"), ("run.sh", "intake:suffix"),
                                       ("lib.so", "intake:suffix")])
def test_bad_member_names(name, rule):
    assert rule_of(zipped({**GOOD, name: "x"})) == rule


def test_symlink_duplicate_and_nested_archive_content():
    assert rule_of(zipped(GOOD, symlink="link.py")) == "intake:symlink"
    assert rule_of(zipped({**GOOD, "notes.txt": zipped(GOOD)})) == "intake:nested_archive"
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive, pytest.warns(UserWarning):
        archive.writestr("architecture.py", ARCH)
        archive.writestr("training.py", TRAIN)
        archive.writestr("training.py", TRAIN)
    assert rule_of(buffer.getvalue()) == "intake:duplicate_name"


def test_sizes_are_measured_while_inflating():
    limits = IntakeLimits(max_member_bytes=1_000_000, max_total_bytes=4_000_000, max_files=64)
    bomb = zipped({**GOOD, "bomb.txt": b"0" * 200_000_000})  # ~200 KB compressed, 200 MB inflated
    assert len(bomb) < 1_000_000
    assert rule_of(bomb, limits) == "intake:member_too_large"
    many = {**GOOD, **{f"part{i}.txt": b"1" * 900_000 for i in range(5)}}
    assert rule_of(zipped(many), limits) == "intake:total_too_large"
    assert rule_of(zipped({**GOOD, **{f"m{i}.py": "" for i in range(70)}}), limits) == "intake:too_many_files"


def test_encodings():
    assert rule_of("not base64 at all!") == "intake:bad_base64"
    assert rule_of(b"plain bytes, not a zip") == "intake:not_a_zip"
    assert rule_of(zipped({**GOOD, "helpers.py": b"\xff\xfe bad"})) == "intake:not_utf8"


HIDDEN = "# \\x0aimport os\\x0aos.system('id')\n"  # a comment to a UTF-8 reader, code once unicode_escape decodes it


@pytest.mark.parametrize("head", ["# coding: unicode_escape\n", "#!/usr/bin/env python\n# the file encoding: utf-7\n",
                                  "# -*- coding: latin-1 -*-\n", "# coding: no-such-codec\n",
                                  "# a\r# b\n# coding: utf-7\n", "\r# coding: utf-7\n", " \r# coding: utf-7\n"])
def test_a_declared_encoding_other_than_utf8_is_refused(head):
    """Python imports a file in the encoding it declares, while the policy reads UTF-8: under unicode_escape or
    utf-7 a comment turns into code the policy never saw (a red team ran `id` in the trainer that way)."""
    with pytest.raises(BundleError) as caught:
        load_bundle(zipped({**GOOD, "training.py": head + HIDDEN + TRAIN}))
    assert (caught.value.rule, caught.value.reasons[0].file, caught.value.reasons[0].line) == \
        ("intake:not_utf8", "training.py", 1)


def test_a_utf8_declaration_is_fine():
    bundle = load_bundle(zipped({**GOOD, "training.py": "# -*- coding: utf-8 -*-\n" + TRAIN}))
    assert "training.py" in bundle.python_files


def test_a_corrupt_deflate_stream_is_not_a_zip():
    data = bytearray(zipped({**GOOD, "architecture.py": ARCH * 50}))
    name_length, extra_length = int.from_bytes(data[26:28], "little"), int.from_bytes(data[28:30], "little")
    data[30 + name_length + extra_length] = 0x07  # a deflate block of the reserved type: zlib.error (was a 500)
    assert rule_of(bytes(data)) == "intake:not_a_zip"


def test_a_zip_needing_a_newer_zip_version_is_not_a_zip():
    data = bytearray(zipped(GOOD))
    central = data.index(b"PK\x01\x02")
    data[central + 6] = 143  # "version needed to extract" 14.3: zipfile raises NotImplementedError (was a 500)
    assert rule_of(bytes(data)) == "intake:not_a_zip"


@pytest.mark.parametrize("files,rule,where", [
    ({"architecture.py": ARCH}, "contract:missing_file", "training.py"),
    ({**GOOD, "training.py": "def fit(ctx):\n    pass\n"}, "contract:missing_symbol", "training.py"),
    ({**GOOD, "training.py": "train = 3\n"}, "contract:not_a_function", "training.py"),
    ({**GOOD, "training.py": "def train(ctx)\n    pass\n"}, "contract:syntax", "training.py"),
    ({**GOOD, "prism.yaml": "tokenizer: llama\n"}, "contract:prism_yaml", "prism.yaml"),
    ({**GOOD, "prism.yaml": "architecture: [unclosed\n"}, "contract:prism_yaml", "prism.yaml"),
    ({**GOOD, "prism.yaml": "architecture: training.py::train\n"}, "contract:same_file", "prism.yaml"),
])
def test_contract_rules_name_the_file(files, rule, where):
    with pytest.raises(BundleError) as caught:
        load_bundle(zipped(files))
    assert caught.value.rule == rule and caught.value.reasons[0].file == where


@pytest.mark.parametrize("manifest,says", [
    ("x: " + "[" * 5000 + "]" * 5000 + "\n", "nested deeper than"),  # PyYAML alone: RecursionError
    ("x:\n" + "".join("  " * (i + 1) + f"k{i}:\n" for i in range(40)), "nested deeper than"),
    ("a: &a [x, x, x, x, x, x, x, x, x, x]\nb: [" + ", ".join(["*a"] * 2500) + "]\n", "aliases count"),
    ("name: " + "x" * 70_000 + "\n", "byte limit"),
    ("1: a\n", "Keys should be strings"),  # a key that is not a string (was a TypeError)
    # values PyYAML resolves but Python cannot build (a ValueError, once HTTP 500)
    ("version: " + "1" * 5000 + "\n", "a value cannot be read"),
    ("description: 2024-13-45\n", "a value cannot be read: month must be in 1..12"),
    # a lone surrogate: the store cannot write it, and it failed the other intakes of its group commit
    ('name: "x\\ud800"\n', "is not Unicode text"),
    ('tags: &t [a, *t, {"\\udfff": 1}]\n', "is not Unicode text"),  # in a key, beside a list that holds itself
])
def test_hostile_prism_yaml_is_a_typed_rejection(manifest, says):
    with pytest.raises(BundleError) as caught:
        load_bundle(zipped({**GOOD, "prism.yaml": manifest}))
    reason = caught.value.reasons[0]
    assert (reason.rule, reason.file) == ("contract:prism_yaml", "prism.yaml") and says in reason.message, reason


def test_nesting_within_the_bound_is_read():
    bundle = load_bundle(zipped({**GOOD, "prism.yaml": "name: ok\ndescription: fine\n"}))
    assert bundle.config.name == "ok"


def test_look_alike_names_are_escaped_and_never_an_entrypoint():
    cyrillic = "\u0430rchitecture.py"  # a Cyrillic "а": looks exactly like architecture.py
    with pytest.raises(BundleError) as caught:
        load_bundle(zipped({cyrillic: ARCH, "training.py": TRAIN}))
    reason = caught.value.reasons[0]
    assert reason.rule == "contract:missing_file" and "\\u0430rchitecture.py" in reason.message
    with pytest.raises(BundleError) as caught:
        load_bundle(zipped({cyrillic: ARCH, "training.py": TRAIN, "prism.yaml": f"architecture: {cyrillic}\n"}))
    reason = caught.value.reasons[0]
    assert reason.rule == "contract:prism_yaml" and "'\\u0430rchitecture.py' has non-ASCII" in reason.message
    with pytest.raises(BundleError) as caught:
        load_bundle(zipped({**GOOD, "helpers.py": "import os\n", cyrillic: b"\xff"}))
    assert caught.value.reasons[0].file == "\\u0430rchitecture.py"  # shown escaped wherever a reason names it


@pytest.mark.parametrize("source", ["x = " + "1+" * 100_000 + "1\n", "x = " + "not " * 100_000 + "1\n"])
def test_code_too_deep_for_the_parser_is_a_typed_rejection(source):
    """RecursionError or MemoryError out of ast.parse was an HTTP 500."""
    with pytest.raises(BundleError) as caught:
        load_bundle(zipped({**GOOD, "deep.py": source}))
    reason = caught.value.reasons[0]
    assert (reason.rule, reason.file) == ("contract:syntax", "deep.py") and "nested too deeply" in reason.message


@pytest.mark.parametrize("method", [zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA])
def test_members_compressed_other_than_by_deflate_are_refused_unread(method):
    """zipfile bounds one read's output for DEFLATE only: a 65 KB zip of bzip2 blocks asked for ~90 GB at once."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, content in GOOD.items():
            archive.writestr(name, content)
        archive.writestr("notes.txt", b"0" * 1000, compress_type=method)
    with pytest.raises(BundleError) as caught:
        load_bundle(buffer.getvalue())
    reason = caught.value.reasons[0]
    assert (reason.rule, reason.file) == ("intake:compression", "notes.txt"), reason
    stored = io.BytesIO()  # stored or deflated members are what zip tools write by default
    with zipfile.ZipFile(stored, "w", zipfile.ZIP_STORED) as archive:
        for name, content in GOOD.items():
            archive.writestr(name, content)
    assert load_bundle(stored.getvalue()).files.keys() == GOOD.keys()


def test_syntax_error_has_its_line():
    with pytest.raises(BundleError) as caught:
        load_bundle(zipped({**GOOD, "training.py": "import torch\n\ndef train(ctx)\n    pass\n"}))
    assert caught.value.reasons[0].line == 3


def test_custom_entrypoints():
    files = {"model.py": "def make(ctx):\n    return None\n", "loop.py": "def run(ctx):\n    pass\n",
             "prism.yaml": "architecture: model.py::make\ntraining: loop.py::run\n"}
    bundle = load_bundle(zipped(files))
    assert (bundle.config.architecture_entry.symbol, bundle.config.training_entry.file) == ("make", "loop.py")


@pytest.mark.parametrize("manifest,expected", [
    (QUICKSTART_YAML, ("architecture.py::build_model", "training.py::train")),
    ("architecture:\n  entrypoint: model.py::make\ntraining:\n  entrypoint: loop.py\n  symbol: run\n",
     ("model.py::make", "loop.py::run")),
    ("architecture:\n  entrypoint: model.py\n  factory: make\ntraining:\n  entrypoint: loop.py\n  function: run\n",
     ("model.py::make", "loop.py::run")),
    ("architecture:\n  entrypoint: model.py\n  entry: make\n  files: helpers.py\ntraining:\n  entry: run\n"
     "  files: [helpers.py]\nkind: full\narchitecture_id: arch-1\n", ("model.py::make", "training.py::run")),
    ("architecture: model.py::make\ntraining: loop.py::run\n", ("model.py::make", "loop.py::run")),
])
def test_prism_yaml_nested_sections_as_upstream_writes_them(manifest, expected):
    files = {"architecture.py": ARCH, "training.py": TRAIN + "def run(ctx):\n    pass\n", "model.py": "def make(ctx):\n    pass\n",
             "loop.py": "def run(ctx):\n    pass\n", "helpers.py": "X = 1\n", "prism.yaml": manifest}
    config = load_bundle(zipped(files)).config
    assert (str(config.architecture_entry), str(config.training_entry)) == expected


@pytest.mark.parametrize("manifest,says", [
    ("architecture:\n  entrypoint: architecture.py::build_model\n  symbol: other\n", "name different functions"),
    ("architecture:\n  entrypoint: [architecture.py]\n", "architecture.entrypoint: Input should be a valid string"),
    ("training:\n  entrypoint: training.py\n  typo: 1\n", "training.typo: Extra inputs are not permitted"),
    ("training:\n  entrypoint: training.py\n  files: [missing.py]\n", "prism.yaml lists missing.py"),
    ("kind: architecture_only\n", "kind: Input should be 'full'"),
])
def test_prism_yaml_nested_mistakes_are_typed(manifest, says):
    with pytest.raises(BundleError) as caught:
        load_bundle(zipped({**GOOD, "prism.yaml": manifest}))
    reason = caught.value.reasons[0]
    assert reason.rule in ("contract:prism_yaml", "contract:missing_file") and reason.file == "prism.yaml"
    assert says in reason.message, reason.message
