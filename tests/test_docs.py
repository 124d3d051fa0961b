"""The docs stay true: every `prism-ray` command shown in README.md and docs/ names a real subcommand and only
real options, and the cheap ones are run for real."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys

import pytest

from conftest import REPO
from prism_ray.config import EMBEDDED_DATA_DIR

DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
CLI = [sys.executable, "-m", "prism_ray.cli"]


def documented_commands() -> list[tuple[str, str]]:
    found = []
    for doc in DOCS:
        in_code = False
        for line in doc.read_text().splitlines():
            if line.startswith("```"):
                in_code = not in_code
                continue
            command = line.split("#")[0].strip()
            match = re.search(r"(?:^|&& )(prism-ray \S.*)$", command)
            if in_code and match:
                found.append((doc.name, match.group(1)))
    return found


def help_text(words: list[str]) -> str:
    done = subprocess.run([*CLI, *words, "--help"], capture_output=True, text=True, env={"COLUMNS": "200",
                                                                                          "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.mark.parametrize("doc,command", documented_commands())
def test_documented_command_exists(doc, command):
    words = shlex.split(command.replace("…", ""))[1:]
    path = [words[0]] + ([words[1]] if words[0] == "data" else [])
    text = help_text(path)
    for option in (w.split("=")[0] for w in words if w.startswith("--")):
        assert option in text, f"{doc}: `{command}` uses {option}, which `prism-ray {' '.join(path)}` does not have"


def test_there_are_documented_commands():
    assert len(documented_commands()) >= 15


def test_data_info_runs_on_the_embedded_dataset():
    done = subprocess.run([*CLI, "data", "info", str(EMBEDDED_DATA_DIR)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "783bb3cd6292871c" in done.stdout
