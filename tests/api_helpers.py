"""Requests as miners make them: real sr25519 keypairs, signed JSON bodies, real bundle zips (test_api, test_service).

The default bundle is a real learner (a bigram table trained with Adam through the harness's forward), so wherever
a test lets it run it passes the check stage, trains and is scored."""

from __future__ import annotations

import base64
import io
import json
import zipfile

from bittensor_wallet import Keypair

from conftest import bigram_architecture, learner_loop
from prism_ray.auth import sign_request

BIGRAM_ARCHITECTURE = bigram_architecture()


def zip_files(files: dict[str, str]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, text in files.items():
            archive.writestr(name, text)
    return buffer.getvalue()


def bundle_zip(tag: str, training: str | None = None, architecture: str = BIGRAM_ARCHITECTURE) -> bytes:
    """A real bundle zip; `tag` makes its code (and so its fingerprint) distinct."""
    if training is None:
        training = f"# {tag}\n{learner_loop(seq_len=64, lr=0.1)}"
    return zip_files({"architecture.py": architecture, "training.py": training,
                      "prism.yaml": f"tokenizer: bytes\nname: {tag}\n"})


def new_keypair() -> Keypair:
    return Keypair.create_from_mnemonic(Keypair.generate_mnemonic())


def signed_json(keypair: Keypair, zipped: bytes, filename: str = "model.zip") -> tuple[bytes, dict[str, str]]:
    """A PRISM JSON submission body and its signed headers."""
    body = json.dumps({"filename": filename, "code": base64.b64encode(zipped).decode(),
                       "metadata": {"source": "test"}}).encode()
    return body, {"Content-Type": "application/json", **sign_request(keypair, body)}
