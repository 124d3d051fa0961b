"""The scored forward as data: a graph of ATen operations exported from the miner's model (`export.py`, run in the
miner's sandbox), written in a JSON format of our own (`format.py`), checked against an allowlist of pure tensor
operations (`ops.py`) and run by prism-ray's own interpreter (`program.py`) in the trusted scorer, which never
imports a bundle module. docs/architecture.md, "Trust boundaries"."""
