"""`cluster.yaml` checked the way `ray up` checks it: Ray's own `prepare_config`, then `validate_config` against the
launcher's schema; and the parts prism-ray depends on (a GPU-less head with the `head` resource, the HTTP guard in
the proxy). A broken twin proves the check can fail."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from serve_app.connection_guard import PROXY_CALLBACK, PROXY_CALLBACK_VARIABLE

CLUSTER_YAML = Path(__file__).parents[1] / "cluster.yaml"


def checked(config: dict) -> dict:
    prepared = prepare_config(copy.deepcopy(config))  # what `ray up` does first (commands._bootstrap_config)
    validate_config(prepared)
    return prepared


def test_cluster_yaml_passes_rays_own_validation():
    config = checked(yaml.safe_load(CLUSTER_YAML.read_text()))
    head = config["available_node_types"][config["head_node_type"]]
    assert head["resources"]["head"] == 1 and head["resources"]["GPU"] == 0
    workers = [node for name, node in config["available_node_types"].items() if name != config["head_node_type"]]
    assert workers and all(node["resources"]["GPU"] >= 1 for node in workers)
    head_start = " ".join(config["head_start_ray_commands"])
    assert f"{PROXY_CALLBACK_VARIABLE}={PROXY_CALLBACK}" in head_start and "--resources='{\"head\": 1}'" in head_start


def test_a_broken_cluster_yaml_is_caught():
    config = yaml.safe_load(CLUSTER_YAML.read_text())
    config["available_node_types"]["head"]["min_workers"] = "zero"
    with pytest.raises(Exception, match="is not of type 'integer'"):
        checked(config)
