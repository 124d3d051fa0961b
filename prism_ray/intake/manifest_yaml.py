"""prism.yaml read with bounds: its size, its nesting depth and its node count are capped before anything is built,
so hostile YAML (thousands of nested brackets, alias bombs) is a typed `contract:prism_yaml`, never a crash
(docs/miner.md, "prism.yaml")."""

from __future__ import annotations

from typing import Any

import yaml

from prism_ray.errors import BundleError

MANIFEST_NAME = "prism.yaml"
MAX_BYTES = 64 * 1024  # a real prism.yaml is a few lines
MAX_DEPTH = 16  # PyYAML composes recursively: thousands of levels would raise RecursionError
MAX_NODES = 2_000  # aliases count each time they are used, so an alias bomb stops here


class _Refused(yaml.YAMLError):
    def __init__(self, message: str, mark: yaml.Mark | None) -> None:
        super().__init__(message)
        self.problem_mark = mark


class _BoundedLoader(yaml.SafeLoader):
    """SafeLoader that counts nesting and nodes while composing, before recursion can go deep."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0
        self._nodes = 0

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node:
        self._depth += 1
        self._nodes += 1
        mark = self.peek_event().start_mark
        if self._depth > MAX_DEPTH:
            raise _Refused(f"nested deeper than {MAX_DEPTH} levels", mark)
        if self._nodes > MAX_NODES:
            raise _Refused(f"more than {MAX_NODES:,} values (aliases count each time they are used)", mark)
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_scalar(self, node: yaml.ScalarNode) -> Any:
        """Keys and values alike. YAML's `"\\ud800"` escape makes a lone surrogate, which the store cannot write (it
        failed the other submissions of the same group commit)."""
        value = super().construct_scalar(node)
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise _Refused(f"{value[:40]!r} is not Unicode text (a lone surrogate escape such as \\ud800)",
                           node.start_mark) from None
        return value


def load(raw: bytes) -> Any:
    """The parsed document (None when empty), or BundleError `contract:prism_yaml` with the line where known."""
    if len(raw) > MAX_BYTES:
        raise BundleError("contract:prism_yaml", f"prism.yaml is {len(raw):,} bytes, over the {MAX_BYTES:,}-byte "
                          "limit", file=MANIFEST_NAME)
    try:
        loader = _BoundedLoader(raw.decode("utf-8"))
        try:
            return loader.get_single_data()
        finally:
            loader.dispose()
    except (yaml.YAMLError, UnicodeDecodeError, RecursionError, ValueError) as error:
        line = getattr(getattr(error, "problem_mark", None), "line", None)
        if isinstance(error, RecursionError):
            problem = "nested too deeply"
        elif isinstance(error, ValueError) and not isinstance(error, UnicodeDecodeError):
            # a scalar YAML resolves but Python cannot build (`2024-13-45`, an int of 5,000 digits)
            problem = f"a value cannot be read: {str(error)[:200]}"
        else:
            problem = str(error)
        raise BundleError("contract:prism_yaml", f"prism.yaml is not valid YAML ({problem})", file=MANIFEST_NAME,
                          line=line + 1 if line is not None else None) from None
