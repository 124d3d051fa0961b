"""The Ray layer (docs/architecture.md, "Layers"): a store actor, a scheduler actor and stage tasks over the plain
pipeline.

    handle = start_cluster("auto", settings)        # or None: a local cluster on this machine
    record = submit(handle, hotkey, "model.zip", zip_bytes)
    record = wait(handle, record.id, timeout=600)
    board = leaderboard(handle)
"""

from prism_ray.cluster.client import ClusterBackend, export, leaderboard, status, submit, wait, weights
from prism_ray.cluster.runtime import NO_GPU_NOTICE, ClusterHandle, connect, start_cluster

__all__ = ["NO_GPU_NOTICE", "ClusterBackend", "ClusterHandle", "connect", "export", "leaderboard", "start_cluster",
           "status", "submit", "wait", "weights"]
