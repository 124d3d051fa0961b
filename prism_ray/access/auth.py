"""Miner authentication (PRISM-compatible): sr25519 signatures over the request, nonces, the internal bearer token.

A signed request carries four headers; the signature covers `prism:{hotkey}:{nonce}:{timestamp}:{sha256(body)}`,
so neither the body nor the headers can be swapped. The verifier refuses timestamps outside a window and each nonce
is accepted once per hotkey, so a captured request cannot be replayed.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from bittensor_wallet import Keypair, Wallet

HOTKEY_HEADER = "X-Hotkey"
SIGNATURE_HEADER = "X-Signature"
NONCE_HEADER = "X-Nonce"
TIMESTAMP_HEADER = "X-Timestamp"
SIGNED_HEADERS = (HOTKEY_HEADER, SIGNATURE_HEADER, NONCE_HEADER, TIMESTAMP_HEADER)
DEFAULT_WINDOW_S = 300.0

# PRISM's rule: any 1-128 printable characters. A colon in a nonce leaves the message unambiguous: the hotkey (ss58)
# has none, and the timestamp (digits) and body hash (hex) after it have none either.
NONCE_PATTERN = r"[^\x00-\x1f\x7f]{1,128}"
TIMESTAMP_PATTERN = r"\d{1,12}(\.\d{1,6})?"
SIGNATURE_PATTERN = r"(0x)?[0-9a-fA-F]{128}"
_NONCE, _TIMESTAMP, _SIGNATURE = (re.compile(p) for p in (NONCE_PATTERN, TIMESTAMP_PATTERN, SIGNATURE_PATTERN))
_SEED = re.compile(r"(0x)?[0-9a-fA-F]{64}")


class AuthError(Exception):
    """A request that fails authentication: `status` is the HTTP answer (401; 400 for an unreadable timestamp and
    409 for a replayed nonce, as PRISM answers)."""

    def __init__(self, rule: str, message: str, status: int = 401) -> None:
        super().__init__(message)
        self.rule = rule
        self.message = message
        self.status = status


class KeyLoadError(ValueError):
    """The signing key cannot be loaded (the message never contains key material)."""


def signing_message(hotkey: str, nonce: str, timestamp: str, body: bytes) -> bytes:
    return f"prism:{hotkey}:{nonce}:{timestamp}:{hashlib.sha256(body).hexdigest()}".encode()


def sign_request(keypair: Keypair, body: bytes, nonce: str | None = None,
                 timestamp: str | int | None = None) -> dict[str, str]:
    """The four auth headers for one request with this exact body (a fresh nonce and the current time by default)."""
    nonce = nonce or secrets.token_hex(16)
    stamp = str(int(time.time()) if timestamp is None else timestamp)
    signature = keypair.sign(signing_message(keypair.ss58_address, nonce, stamp, body))
    return {HOTKEY_HEADER: keypair.ss58_address, SIGNATURE_HEADER: "0x" + signature.hex(), NONCE_HEADER: nonce,
            TIMESTAMP_HEADER: stamp}


@dataclass(frozen=True)
class SignedHeaders:
    """The auth headers of one request, parsed and inside the time window, not yet checked against the body."""

    hotkey: str
    signature: bytes
    nonce: str
    timestamp: str
    window_s: float = DEFAULT_WINDOW_S

    @classmethod
    def parse(cls, headers: Mapping[str, str], window_s: float = DEFAULT_WINDOW_S,
              now: float | None = None) -> SignedHeaders:
        """Cheap checks that need no body, so a stale or malformed request is refused before it is read."""
        missing = [name for name in SIGNED_HEADERS if not headers.get(name)]
        if missing:
            raise AuthError("auth:missing_headers", f"missing {', '.join(missing)}: sign the request (docs/api.md)")
        hotkey, nonce, stamp = headers[HOTKEY_HEADER], headers[NONCE_HEADER], headers[TIMESTAMP_HEADER]
        signature = headers[SIGNATURE_HEADER]
        if not _SIGNATURE.fullmatch(signature):
            raise AuthError("auth:bad_signature", "X-Signature must be 64 bytes of hex (with or without 0x)")
        if not _NONCE.fullmatch(nonce):
            raise AuthError("auth:bad_nonce", "X-Nonce must be 1-128 printable characters")
        if not _TIMESTAMP.fullmatch(stamp):
            raise AuthError("auth:bad_timestamp", "X-Timestamp must be Unix seconds", status=400)
        _check_window(stamp, window_s, now)
        try:
            Keypair(ss58_address=hotkey)
        except ValueError:
            raise AuthError("auth:bad_hotkey", "X-Hotkey is not a valid ss58 address") from None
        return cls(hotkey, bytes.fromhex(signature.removeprefix("0x")), nonce, stamp, window_s)

    def verify(self, body: bytes) -> None:
        message = signing_message(self.hotkey, self.nonce, self.timestamp, body)
        try:
            valid = Keypair(ss58_address=self.hotkey).verify(message, self.signature)
        except ValueError:  # a 64-byte string that is not a point on the curve
            valid = False
        if not valid:
            raise AuthError("auth:bad_signature", "the signature does not match the hotkey, headers and body")

    def authenticate(self, body: bytes, remember_nonce: Callable[[str, str], bool], now: float | None = None) -> str:
        """The verified hotkey; `remember_nonce(hotkey, nonce)` is False for a replay (→ 409). The window is checked
        again once the body is in: nonces are remembered for twice the window from then, and a body trickled in
        over minutes must not outlast that (a red team replayed a captured request so)."""
        self.verify(body)
        _check_window(self.timestamp, self.window_s, now)
        if not remember_nonce(self.hotkey, self.nonce):
            raise AuthError("auth:replayed_nonce", "this nonce was already used by this hotkey; sign with a fresh one",
                            status=409)
        return self.hotkey


def _check_window(stamp: str, window_s: float, now: float | None) -> None:
    skew = float(stamp) - (time.time() if now is None else now)
    if abs(skew) > window_s:
        raise AuthError("auth:stale_timestamp", f"X-Timestamp is {skew:+.0f} s from the server's clock; "
                        f"signatures are valid for ±{window_s:g} s")


def bearer_token_matches(presented: str | None, expected: str) -> bool:
    """The token of `Authorization: Bearer <token>` against the configured one, in constant time."""
    return presented is not None and hmac.compare_digest(presented.encode(), expected.encode())


def load_keypair(wallet: str | None = None, hotkey: str | None = None, wallet_path: str | None = None,
                 key_file: Path | None = None) -> Keypair:
    """The signing key: a bittensor wallet's hotkey (`--wallet/--hotkey [--wallet-path]`) or a key file."""
    if key_file is not None:
        if wallet or hotkey:
            raise KeyLoadError("give either --key-file or --wallet/--hotkey, not both")
        return keypair_from_file(key_file)
    if not (wallet and hotkey):
        raise KeyLoadError("a signing key is needed: --wallet NAME --hotkey NAME, or --key-file PATH")
    options = {"name": wallet, "hotkey": hotkey, **({"path": wallet_path} if wallet_path else {})}
    try:
        return Wallet(**options).hotkey
    except Exception as error:  # the wallet library raises its own error types per failure
        raise KeyLoadError(f"cannot load hotkey {hotkey!r} of wallet {wallet!r}: {type(error).__name__}") from None


def keypair_from_file(path: Path) -> Keypair:
    """A mnemonic, a seed in hex, or a bittensor keyfile (JSON with secretSeed / secretPhrase)."""
    try:
        text = Path(path).read_text().strip()
    except OSError as error:
        raise KeyLoadError(f"cannot read key file {path}: {error.strerror}") from None
    if text.startswith("{"):
        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            raise KeyLoadError(f"{path} is not valid JSON") from None
        text = str(data.get("secretSeed") or data.get("secretPhrase") or "")
    try:
        if _SEED.fullmatch(text):
            return Keypair.create_from_seed(text)
        if len(text.split()) in (12, 15, 18, 21, 24):
            return Keypair.create_from_mnemonic(" ".join(text.split()))
    except ValueError:
        pass
    raise KeyLoadError(f"{path} holds neither a mnemonic nor a 32-byte seed in hex")
