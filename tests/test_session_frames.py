"""The parent's frame loop (harness/session.py) on its own: real sockets and a real selector, no runners."""

from __future__ import annotations

import json
import selectors
import socket
import time

import numpy as np

from conftest import byte_stream
from prism_ray.harness.isolation import SandboxPolicy
from prism_ray.harness.protocol import Channel, Kind, parse_json
from prism_ray.harness.records import RunSpec
from prism_ray.harness.session import _Session

LAYOUT = [["table.weight", [257, 257], "float32"]]


def test_an_exporter_gone_in_the_select_whose_geometry_dismisses_it_is_not_read(tmp_path):
    """The contract check dismisses its exporter once the ranks' geometry matches its build. An exporter whose
    architecture.py ends its process meanwhile closes its socket: when that close and the geometry come back from
    one select, the geometry's handler has already dropped the exporter's channel, and its close is not read (it
    was a KeyError that ended the session)."""
    spec = RunSpec(bundle_dir=tmp_path, exporter_bundle_dir=tmp_path, architecture=("a.py", "build_model"),
                   training=("t.py", "train"), tokenizer="bytes", vocab_size=257, max_seq_len=64, max_params=10**6,
                   seed=1, device="cpu", byte_budget=0, artifacts_dir=tmp_path / "artifacts", data_dir="", threads=2,
                   scored=False)
    session = _Session(spec, byte_stream("x" * 400), np.ones(257, dtype=np.int64), tmp_path, 60.0, None,
                       SandboxPolicy(), None, 60.0, None)
    far: dict[str, Channel] = {}
    for key in ("scorer", "exporter", "trainer:0"):
        near, far_end = socket.socketpair()
        far[key] = Channel(far_end, accept_fds=True)
        channel = Channel(near)
        if key == "trainer:0":
            session.ranks.add(channel)
        session.channels[key] = channel
        session.selector.register(near, selectors.EVENT_READ, key)
    session.layout = LAYOUT  # the exporter's LAYOUT is in

    far["trainer:0"].send_json(Kind.GEOMETRY, {"batch_size": 4, "seq_len": 32, "with_logits": False,
                                               "layout": LAYOUT, "device": "cpu"})
    far["exporter"].close()  # ready after the geometry: the select hands the two back in that order
    assert len(session.selector.select(timeout=1.0)) == 2
    session._dispatch(time.monotonic() + 10.0)

    assert "exporter" not in session.channels
    kind, payload = far["scorer"].recv(timeout=1.0)
    assert kind == Kind.SHARE and parse_json(payload)["layout"] == LAYOUT
    kind, payload = far["trainer:0"].recv(timeout=1.0)
    assert kind == Kind.SHARE and json.loads(payload)["where"] == "memfd"
    assert session.outcome.reasons == []
