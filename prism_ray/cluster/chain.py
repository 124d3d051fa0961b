"""One claimed attempt moving through its stages, and where an audit's GPU stages may run."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import ray
from ray import ObjectRef

from prism_ray.evaluation.pipeline import Job


@dataclass
class Chain:
    """One claimed attempt of a queue item moving through its plan of stages."""

    job: Job  # for an audit, job.submission_id is the audit's id: its leases and timeline are the audit's
    bundle: ObjectRef
    settings: ObjectRef
    plan: tuple[int, ...]  # indices into STAGES, in order
    submission_id: str  # the submission the chain runs (the one an audit re-runs)
    target: str | None = None  # where an audit's GPU stages must run
    stage: int = -1
    outcome: ObjectRef | None = None  # the running stage's Outcome
    payloads: dict[str, ObjectRef] = field(default_factory=dict)
    nodes: dict[str, str] = field(default_factory=dict)  # stage → the node it ran on
    timings: dict[str, float] = field(default_factory=dict)  # stage → seconds, measured inside its task
    started: float = 0.0  # monotonic, of the running stage
    deadline: float = float("inf")  # monotonic; a GPU stage's clock starts when its task does, not while it queues


def other_gpu_node(avoid: str | None) -> str | None:
    """A live GPU node other than `avoid`, or None (then Ray picks any node: the cluster has no other)."""
    nodes = [node["NodeID"] for node in ray.nodes()
             if node["Alive"] and node["Resources"].get("GPU", 0) > 0 and node["NodeID"] != avoid]
    return random.choice(nodes) if nodes else None
