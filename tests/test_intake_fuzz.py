"""Intake fuzzed over real HTTP: hypothesis makes zips (mutated bytes, hostile member names, generated prism.yaml),
JSON bodies (deep, wrong types, bad base64) and headers, and posts them to the app under uvicorn (behind the
connection guard) over a real DuckDB store. No answer may be a 5xx, and nothing may be half-stored: an accepted
post has its record, its original zip and its timeline; a 422 that names an id is a stored rejection with reasons;
any other refusal stores nothing."""

from __future__ import annotations

import base64
import io
import json
import zipfile

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from api_helpers import bundle_zip, new_allowlist, serve, server_settings
from prism_ray.config import Settings
from prism_ray.store import Store
from serve_app import StoreBackend, create_app

VALID = bundle_zip("fuzz-base")
YAML_ALPHABET = "[]{}:-&*!|>#,'\"\n\t ?%@`ab1"
yaml_text = st.lists(st.sampled_from([*YAML_ALPHABET, "name", "tokenizer", "bytes", "architecture", ": "]),
                     max_size=120).map("".join)
NAMES = st.one_of(st.sampled_from(["architecture.py", "training.py", "prism.yaml", "аrchitecture.py", "../x.py",
                                   "/abs.py", "a\\..\\b.py", "x.zip", "dir/", "C:/x.py", "tr\u200baining.py"]),
                  st.text(min_size=1, max_size=20))


def zipped(members: list[tuple[str, bytes]]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, content in members:
            if not name.split("\0", 1)[0]:  # zipfile cuts a name at its first NUL, and an empty name crashes it
                continue
            try:
                archive.writestr(name, content)
            except (ValueError, UnicodeEncodeError):
                continue
    return buffer.getvalue()


mutated_zip = st.builds(lambda edits, cut: _mutate(VALID, edits, cut),
                        st.lists(st.tuples(st.integers(0, len(VALID) - 1), st.integers(0, 255)), max_size=8),
                        st.one_of(st.none(), st.integers(0, len(VALID))))
generated_zip = st.builds(zipped, st.lists(st.tuples(NAMES, st.one_of(
    st.binary(max_size=200), st.text(max_size=200).map(str.encode),
    yaml_text.map(str.encode))), max_size=6))
yaml_zip = st.builds(lambda manifest: zipped([(name, content) for name, content in
                                              zipfile_members(VALID) if name != "prism.yaml"] +
                                             [("prism.yaml", manifest.encode())]),
                     st.one_of(yaml_text,
                               st.integers(1, 3000).map(lambda n: "x: " + "[" * n + "]" * n),
                               st.integers(1, 3000).map(lambda n: "x: " + "{a: " * n + "}" * n)))
any_zip = st.one_of(mutated_zip, generated_zip, yaml_zip)
json_value = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False),
                                    st.text(max_size=20)),
                          lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                                      max_size=4), max_leaves=20)
json_body = st.one_of(
    st.builds(lambda filename, code, metadata: json.dumps({"filename": filename, "code": code,
                                                           "metadata": metadata}).encode(),
              st.text(max_size=300), st.one_of(any_zip.map(lambda z: base64.b64encode(z).decode()),
                                               st.text(max_size=50)), json_value),
    json_value.map(lambda value: json.dumps(value).encode()),
    st.integers(1, 100_000).map(lambda n: b"[" * n + b"]" * n),
    st.binary(max_size=300))
header_value = st.from_regex(r"[!-~]([ -~]{0,38}[!-~])?", fullmatch=True)  # what a client can send
extra_headers = st.dictionaries(st.from_regex(r"X-[A-Za-z0-9-]{1,20}", fullmatch=True), header_value, max_size=6)
hotkey = st.one_of(st.just("fuzz-miner"), header_value)
content_type = st.sampled_from(["application/zip", "application/json", "application/json; charset=utf-8",
                                "text/plain", "multipart/form-data", "", "application/x-zip-compressed"])


def zipfile_members(data: bytes) -> list[tuple[str, bytes]]:
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        return [(info.filename, archive.read(info)) for info in archive.infolist()]


def _mutate(data: bytes, edits: list[tuple[int, int]], cut: int | None) -> bytes:
    raw = bytearray(data)
    for at, value in edits:
        raw[at] = value
    return bytes(raw[:cut] if cut is not None else raw)


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory):
    store = Store(tmp_path_factory.mktemp("fuzz") / "prism.duckdb")
    backend = StoreBackend(store, Settings())
    api = server_settings(new_allowlist(tmp_path_factory.mktemp("registry")), auth_mode="dev",
                          registry={"mode": "open"}, rate_limit_burst=1_000_000, stored_rejections_per_hotkey=100_000)
    try:
        with serve(create_app(backend, api)) as url, httpx.Client(base_url=url, timeout=30) as http:
            yield http, backend
    finally:
        store.close()


def stored(backend: StoreBackend) -> dict[str, object]:
    with backend.use() as store:
        return {record.id: record for record in store.list_submissions(limit=1_000_000)}


def assert_whole(backend: StoreBackend, submission_id: str) -> None:
    """A stored submission is whole: a rejection has its reasons, anything else its original zip; both a timeline."""
    with backend.use() as store:
        record = store.get_submission(submission_id)
        assert record is not None
        assert store.events(submission_id), record
        if record.status == "rejected":
            assert record.reasons, record
        else:
            assert store.original_zip(submission_id) is not None and record.bundle_sha256, record


@settings(max_examples=250, deadline=None, suppress_health_check=list(HealthCheck))
@given(body=st.one_of(any_zip, json_body), media_type=content_type, key=hotkey, headers=extra_headers)
def test_fuzzed_intake_never_answers_5xx_and_never_half_stores(fuzzed, body, media_type, key, headers):
    http, backend = fuzzed
    before = stored(backend)
    response = http.post("/v1/submissions", content=body,
                         headers={**headers, "Content-Type": media_type, "X-Hotkey": key})
    assert response.status_code < 500, (response.status_code, response.text[:500])
    assert response.headers["content-type"].startswith("application/json"), response.text[:200]
    answer = response.json()
    after = stored(backend)
    if response.status_code in (200, 202):
        assert answer["id"] in after
        assert_whole(backend, answer["id"])
    elif response.status_code == 422 and answer.get("id"):
        assert after[answer["id"]].status == "rejected"
        assert_whole(backend, answer["id"])
    else:
        assert after.keys() == before.keys(), (response.status_code, answer)
    assert len(after) - len(before) <= 1
