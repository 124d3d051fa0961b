"""A Ray driver on the head node of a tests/netns.py cluster, run in the head's namespace as an operator's process
would be (`ip netns exec <head> python netns_driver.py GCS SETTINGS`). It joins the cluster, brings up the store and
scheduler, then answers one JSON request per stdin line with one line on stdout: MARK and a JSON object (tasks'
output that Ray forwards to this driver lands on stdout too).
"""

from __future__ import annotations

import json
import pickle
import sys
from pathlib import Path

import ray

sys.path.insert(0, str(Path(__file__).parent))

from miners import make_bundle  # noqa: E402
from prism_ray.cluster import start_cluster, submit  # noqa: E402

MARK = "@@netns-driver "


def main(address: str, settings_file: str) -> None:
    handle = start_cluster(address, pickle.loads(Path(settings_file).read_bytes()))
    store = handle.store
    answers = {
        "submit": lambda hotkey, tag, pause: submit(handle, hotkey, f"{tag}.zip", make_bundle(tag, pause=pause)).id,
        "record": lambda id: ray.get(store.get_submission.remote(id)).model_dump(mode="json"),
        "runs": lambda id: [run.model_dump(mode="json") for run in ray.get(store.runs.remote(id))],
        "events": lambda id: [event.model_dump(mode="json") for event in ray.get(store.events.remote(id))],
        "scored": lambda: [row.submission_id for row in ray.get(store.scored_rows.remote())],
        "nodes": lambda: [{"id": node["NodeID"], "ip": node["NodeManagerAddress"], "alive": node["Alive"],
                           "gpus": node["Resources"].get("GPU", 0)} for node in ray.nodes()],
        "stats": lambda: ray.get(handle.scheduler.stats.remote()),
        "stop": lambda: handle.stop(),
    }
    print(MARK + json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        try:
            answer = {"ok": answers[request["call"]](*request.get("args", []))}
        except Exception as error:  # the test sees what went wrong, and can ask again
            answer = {"error": repr(error)}
        print(MARK + json.dumps(answer, default=str), flush=True)
        if request["call"] == "stop":
            break
    ray.shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:])
