"""Bundle intake: a zip (bytes, base64 or file) or a directory becomes a checked, in-memory Bundle.

Everything here treats the input as hostile: sizes are counted while inflating, names are checked
before anything is written, and every rejection carries an `intake:*` or `contract:*` rule id.
"""

from __future__ import annotations

import ast
import base64
import binascii
import hashlib
import io
import stat
import tokenize
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import PydanticCustomError

from prism_ray.config import IntakeLimits
from prism_ray.errors import BundleError, Reason, escape_name
from prism_ray.intake import manifest_yaml

MANIFEST_NAME = manifest_yaml.MANIFEST_NAME
_ARCHIVE_MAGIC = (b"PK\x03\x04", b"PK\x05\x06", b"\x1f\x8b", b"BZh", b"\xfd7zXZ", b"7z\xbc\xaf", b"Rar!")
_READ_CHUNK = 64 * 1024


class Entrypoint(BaseModel):
    file: str
    symbol: str

    @classmethod
    def parse(cls, spec: str, default_symbol: str) -> Entrypoint:
        file, _, symbol = spec.partition("::")
        return cls(file=file.strip(), symbol=(symbol.strip() or default_symbol))

    def __str__(self) -> str:
        return f"{self.file}::{self.symbol}"


class RoleSection(BaseModel):
    """PRISM's nested form of one role (docs/miner.md): `entrypoint: file.py` (or `file.py::symbol`), the symbol
    under any of upstream's keys, and the extra `files` the role uses."""

    model_config = ConfigDict(extra="forbid")

    entrypoint: str | None = None
    symbol: str | None = Field(default=None, validation_alias=AliasChoices("symbol", "factory", "function", "entry"))
    files: list[str] = Field(default_factory=list)

    @field_validator("files", mode="before")
    @classmethod
    def _one_file(cls, value: object) -> object:
        return [value] if isinstance(value, str) else value

    def spec(self, default_file: str) -> str:
        file, _, declared = (self.entrypoint or default_file).partition("::")
        if self.symbol and declared and self.symbol != declared:
            raise ValueError(f"entrypoint {self.entrypoint!r} and symbol {self.symbol!r} name different functions")
        symbol = self.symbol or declared
        return f"{file}::{symbol}" if symbol else file


class BundleConfig(BaseModel):
    """prism.yaml: two entrypoints (`file.py` or `file.py::symbol`, or PRISM's nested `entrypoint:` sections), the
    tokenizer and a display name."""

    model_config = ConfigDict(extra="forbid")

    architecture: str = "architecture.py::build_model"
    training: str = "training.py::train"
    tokenizer: Literal["gpt2", "bytes"] = "gpt2"
    name: str | None = None
    version: int | str | None = None
    description: str | None = None
    kind: Literal["full"] = Field(default="full", description="PRISM's project kind; prism-ray scores full bundles")
    architecture_id: str | None = Field(default=None, description="PRISM's label; kept, not used")
    component_files: list[str] = Field(default_factory=list, description="the roles' declared `files`: each must exist")

    @model_validator(mode="before")
    @classmethod
    def _nested_roles(cls, data: object) -> object:
        # PRISM's quickstart writes `architecture: {entrypoint: architecture.py}`; the flat string form is the same.
        if not isinstance(data, dict):
            return data
        data = dict(data)
        for role, default_file in (("architecture", "architecture.py"), ("training", "training.py")):
            section = data.get(role)
            if isinstance(section, dict):
                try:
                    parsed = RoleSection.model_validate(section)
                    data[role] = parsed.spec(default_file)
                except ValidationError as error:
                    raise PydanticCustomError("prism_yaml", "; ".join(
                        f"{role}.{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in error.errors())) from None
                except ValueError as error:
                    raise PydanticCustomError("prism_yaml", f"{role}: {error}") from None
                data["component_files"] = [*data.get("component_files", []), *parsed.files]
        return data

    @field_validator("architecture", "training")
    @classmethod
    def _entrypoint(cls, value: str) -> str:
        file, _, symbol = value.partition("::")
        if not value.isascii():
            raise ValueError(f"entrypoint '{escape_name(value)}' has non-ASCII characters; entrypoints must be plain "
                             "ASCII names (a letter that only looks Latin is refused)")
        if not file.endswith(".py") or file.startswith("/") or ".." in PurePosixPath(file).parts:
            raise ValueError(f"entrypoint {value!r} must be 'file.py' or 'file.py::symbol'")
        if symbol and not symbol.isidentifier():
            raise ValueError(f"entrypoint symbol {symbol!r} is not a Python identifier")
        return value

    @property
    def architecture_entry(self) -> Entrypoint:
        return Entrypoint.parse(self.architecture, "build_model")

    @property
    def training_entry(self) -> Entrypoint:
        return Entrypoint.parse(self.training, "train")


@dataclass(frozen=True)
class Bundle:
    """A checked submission: posix relative path → bytes, the parsed prism.yaml, and fingerprints."""

    files: dict[str, bytes]
    config: BundleConfig
    sha256: str = field(init=False)
    fingerprint: str = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "sha256", _digest({p: c for p, c in self.files.items()}))
        object.__setattr__(self, "fingerprint", _digest({p: _normalise(c) for p, c in self.files.items()}))

    def text(self, path: str) -> str:
        return self.files[path].decode("utf-8")

    @property
    def python_files(self) -> dict[str, str]:
        return {p: c.decode("utf-8") for p, c in sorted(self.files.items()) if p.endswith(".py")}

    @property
    def display_name(self) -> str:
        return self.config.name or PurePosixPath(self.config.architecture_entry.file).stem

    def write_to(self, directory: Path, without_training: bool = False) -> Path:
        """Materialise the bundle (names were validated at intake, so joining is safe); the scorer's copy is
        `without_training`: it never has the training entry file to import."""
        directory.mkdir(parents=True, exist_ok=True)
        for rel, content in self.files.items():
            if without_training and rel == self.config.training_entry.file:
                continue
            target = directory / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(content)
        return directory

    def to_zip(self) -> bytes:
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
            for rel in sorted(self.files):
                info = zipfile.ZipInfo(rel, date_time=(1980, 1, 1, 0, 0, 0))
                info.compress_type = zipfile.ZIP_DEFLATED
                archive.writestr(info, self.files[rel])
        return buffer.getvalue()


def _normalise(content: bytes) -> bytes:
    # Duplicate detection should not be fooled by line endings or trailing whitespace.
    lines = content.replace(b"\r\n", b"\n").split(b"\n")
    return b"\n".join(line.rstrip() for line in lines).strip(b"\n")


def _digest(files: dict[str, bytes]) -> str:
    listing = hashlib.sha256()
    for rel in sorted(files):
        listing.update(rel.encode() + b"\0" + hashlib.sha256(files[rel]).hexdigest().encode() + b"\n")
    return listing.hexdigest()


def load_bundle(source: Path | str | bytes, limits: IntakeLimits | None = None) -> Bundle:
    """Accept a directory or .zip (a Path), zip bytes, or base64 zip text (a str — never read as a path, so
    text from the network cannot name a server file); raise BundleError on any rule."""
    limits = limits or IntakeLimits()
    if isinstance(source, bytes):
        files = _read_zip(source, limits)
    elif isinstance(source, Path):
        path = source
        if path.is_dir():
            files = _read_directory(path, limits)
        elif path.is_file():
            files = _read_zip(path.read_bytes(), limits)
        else:
            raise BundleError("intake:not_found", f"bundle {path} does not exist")
    else:
        files = _read_zip(decode_base64(source), limits)
    return check_contract(files)


def decode_base64(text: str) -> bytes:
    try:
        return base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError) as error:
        raise BundleError("intake:bad_base64", f"the bundle is not valid base64 ({error})") from None


def _check_name(name: str, limits: IntakeLimits) -> str:
    if name.startswith("/") or (len(name) > 1 and name[1] == ":") or name.startswith("\\"):
        raise BundleError("intake:absolute_path", f"member {name!r} has an absolute path", file=name)
    normalised = name.replace("\\", "/")
    parts = PurePosixPath(normalised).parts
    if any(part == ".." for part in parts):
        raise BundleError("intake:path_traversal", f"member {name!r} escapes the bundle with '..'", file=name)
    clean = "/".join(part for part in parts if part not in ("", "."))
    if not clean:
        raise BundleError("intake:bad_name", f"member {name!r} has an empty name", file=name)
    suffix = PurePosixPath(clean).suffix.lower()
    if suffix in (".zip", ".tar", ".gz", ".tgz", ".bz2", ".xz", ".7z", ".rar", ".whl", ".egg"):
        raise BundleError("intake:nested_archive", f"member {clean!r} is an archive; bundles hold source only",
                          file=clean)
    if suffix not in limits.allowed_suffixes:
        allowed = " ".join(limits.allowed_suffixes)
        raise BundleError("intake:suffix", f"member {clean!r} has a suffix outside {allowed}", file=clean)
    return clean


def _add_member(files: dict[str, bytes], name: str, content: bytes, limits: IntakeLimits) -> None:
    if name in files or any(existing.lower() == name.lower() for existing in files):
        raise BundleError("intake:duplicate_name", f"member {name!r} appears more than once", file=name)
    if content.startswith(_ARCHIVE_MAGIC):
        raise BundleError("intake:nested_archive", f"member {name!r} contains an archive", file=name)
    if name.endswith(".py"):
        try:
            content.decode("utf-8")
        except UnicodeDecodeError as error:
            raise BundleError("intake:not_utf8", f"{name} is not valid UTF-8 ({error.reason} at byte "
                              f"{error.start})", file=name) from None
        _check_declared_encoding(name, content)
    files[name] = content
    if len(files) > limits.max_files:
        raise BundleError("intake:too_many_files", f"the bundle has more than {limits.max_files} files")


def _check_declared_encoding(name: str, content: bytes) -> None:
    """Python imports a file in the encoding its first two lines declare (`# coding: …`), while everything here
    reads it as UTF-8: under `unicode_escape` or `utf-7` a comment decodes into code the policy never saw (found by a
    red team). Only UTF-8 may be declared."""
    # Lines as the compiler splits them (a bare \r ends one) and as tokenize's readers do (\n only): neither may
    # find a declaration other than UTF-8.
    for text in (content.replace(b"\r\n", b"\n").replace(b"\r", b"\n"), content):
        try:
            declared, _ = tokenize.detect_encoding(io.BytesIO(text).readline)
        except SyntaxError as error:  # an encoding Python does not know
            raise BundleError("intake:not_utf8", f"{name} declares a source encoding Python cannot use "
                              f"({error.msg}); bundle files are UTF-8: remove the `coding:` comment", file=name,
                              line=1) from None
        if declared not in ("utf-8", "utf-8-sig"):
            raise BundleError("intake:not_utf8", f"{name} declares the source encoding {declared!r}; bundle files "
                              "are UTF-8: remove the `coding:` comment", file=name, line=1)


def _read_zip(data: bytes, limits: IntakeLimits) -> dict[str, bytes]:
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
    except (zipfile.BadZipFile, NotImplementedError, ValueError, OSError, EOFError):  # e.g. "zip file version 14.3"
        raise BundleError("intake:not_a_zip", "the bundle is not a zip archive") from None
    files: dict[str, bytes] = {}
    total = 0
    with archive:
        members = archive.infolist()
        if len([m for m in members if not m.is_dir()]) > limits.max_files:
            raise BundleError("intake:too_many_files", f"the bundle has more than {limits.max_files} files")
        for info in members:
            if info.is_dir():
                _check_dir_name(info.filename)
                continue
            if stat.S_ISLNK(info.external_attr >> 16):
                raise BundleError("intake:symlink", f"member {info.filename!r} is a symbolic link",
                                  file=info.filename)
            name = _check_name(info.filename, limits)
            if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
                # zipfile bounds what one read inflates for DEFLATE only: 64 KiB of bzip2 became ~90 GB at once
                raise BundleError("intake:compression", f"{name} is compressed with method {info.compress_type}; "
                                  "bundles may only store or deflate their files (any zip tool's default)",
                                  file=name)
            content, total = _inflate(archive, info, name, total, limits)
            _add_member(files, name, content, limits)
    if not files:
        raise BundleError("intake:empty", "the bundle holds no files")
    return files


def _check_dir_name(name: str) -> None:
    if name.startswith("/") or ".." in PurePosixPath(name.replace("\\", "/")).parts:
        raise BundleError("intake:path_traversal", f"directory {name!r} escapes the bundle", file=name)


def _inflate(archive: zipfile.ZipFile, info: zipfile.ZipInfo, name: str, total: int,
             limits: IntakeLimits) -> tuple[bytes, int]:
    """Read one member in chunks, stopping the moment a limit is crossed (zip bombs never fully inflate)."""
    chunks: list[bytes] = []
    size = 0
    try:
        with archive.open(info) as member:
            while chunk := member.read(_READ_CHUNK):
                size += len(chunk)
                total += len(chunk)
                if size > limits.max_member_bytes:
                    raise BundleError("intake:member_too_large",
                                      f"{name} is over {limits.max_member_bytes:,} bytes", file=name)
                if total > limits.max_total_bytes:
                    raise BundleError("intake:total_too_large",
                                      f"the bundle is over {limits.max_total_bytes:,} bytes uncompressed",
                                      file=name)
                chunks.append(chunk)
    except (zipfile.BadZipFile, NotImplementedError, RuntimeError, OSError, EOFError, ValueError, zlib.error) as error:
        raise BundleError("intake:not_a_zip", f"{name} cannot be read from the zip ({error})", file=name) from None
    return b"".join(chunks), total


def _read_directory(root: Path, limits: IntakeLimits) -> dict[str, bytes]:
    files: dict[str, bytes] = {}
    total = 0
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if any(part in ("__pycache__", ".git") or part.startswith(".") for part in PurePosixPath(rel).parts):
            continue
        if path.is_symlink():
            raise BundleError("intake:symlink", f"{rel} is a symbolic link", file=rel)
        if path.is_dir():
            continue
        name = _check_name(rel, limits)
        size = path.stat().st_size
        if size > limits.max_member_bytes:
            raise BundleError("intake:member_too_large", f"{name} is over {limits.max_member_bytes:,} bytes",
                              file=name)
        total += size
        if total > limits.max_total_bytes:
            raise BundleError("intake:total_too_large",
                              f"the bundle is over {limits.max_total_bytes:,} bytes", file=name)
        _add_member(files, name, path.read_bytes(), limits)
    if not files:
        raise BundleError("intake:empty", f"{root} holds no bundle files")
    return files


def parse_config(files: dict[str, bytes]) -> BundleConfig:
    raw = files.get(MANIFEST_NAME)
    if raw is None:
        return BundleConfig()
    data = manifest_yaml.load(raw) or {}
    if not isinstance(data, dict):
        raise BundleError("contract:prism_yaml", "prism.yaml must be a mapping", file=MANIFEST_NAME)
    entrypoints = data.pop("entrypoints", None)
    if isinstance(entrypoints, dict):
        data = {**{k: v for k, v in entrypoints.items()}, **data}
    try:
        return BundleConfig.model_validate(data)  # not **data: YAML keys need not be strings
    except ValidationError as error:
        reasons = [Reason(rule="contract:prism_yaml",
                          message=f"prism.yaml: {'.'.join(str(p) for p in e['loc']) or 'root'}: {e['msg']}",
                          file=MANIFEST_NAME) for e in error.errors()]
        raise BundleError.from_reasons(reasons) from None


def _top_level_names(node: ast.stmt) -> set[str]:
    if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
        return {node.name}
    targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) else []
    return {target.id for target in targets if isinstance(target, ast.Name)}


def check_contract(files: dict[str, bytes]) -> Bundle:
    """The two-script contract: distinct files, each symbol a top-level def, every .py parses."""
    config = parse_config(files)
    reasons: list[Reason] = []
    trees: dict[str, ast.Module] = {}
    for rel, content in sorted(files.items()):
        if rel.endswith(".py"):
            try:
                trees[rel] = ast.parse(content.decode("utf-8"), filename=rel)
            except SyntaxError as error:
                reasons.append(Reason(rule="contract:syntax", message=f"syntax error: {error.msg}",
                                      file=rel, line=error.lineno))
            except (RecursionError, MemoryError):  # `1+1+…` or `not not …` many thousand deep
                reasons.append(Reason(rule="contract:syntax", message="an expression is nested too deeply for "
                                      "Python's parser", file=rel))
    arch, train = config.architecture_entry, config.training_entry
    if arch.file == train.file:
        reasons.append(Reason(rule="contract:same_file", file=MANIFEST_NAME,
                              message=f"architecture and training must be two files, both are {arch.file}"))
    for extra in config.component_files:
        if extra not in files:
            reasons.append(Reason(rule="contract:missing_file", file=MANIFEST_NAME,
                                  message=f"prism.yaml lists {extra}, which is missing from the bundle"))
    for role, entry in (("architecture", arch), ("training", train)):
        if entry.file not in files:
            lookalikes = [escape_name(name) for name in files if not name.isascii() and name.endswith(".py")]
            reasons.append(Reason(rule="contract:missing_file", file=entry.file,
                                  message=f"the {role} script {entry.file} is missing from the bundle"
                                  + (f"; these file names are not ASCII and cannot be an entrypoint: "
                                     f"{', '.join(lookalikes)}" if lookalikes else "")))
            continue
        tree = trees.get(entry.file)
        if tree is None:
            continue
        definition = next((node for node in tree.body if entry.symbol in _top_level_names(node)), None)
        if definition is None:
            reasons.append(Reason(rule="contract:missing_symbol", file=entry.file,
                                  message=f"{entry.file} has no top-level `def {entry.symbol}(ctx)`"))
        elif not isinstance(definition, ast.FunctionDef):
            reasons.append(Reason(rule="contract:not_a_function", file=entry.file, line=definition.lineno,
                                  message=f"{entry.symbol} in {entry.file} must be a plain top-level def"))
    if reasons:
        raise BundleError.from_reasons(reasons)
    return Bundle(files=dict(files), config=config)
