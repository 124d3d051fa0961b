"""Miner signatures (prism_ray/access/auth.py) with real sr25519 keys: valid, forged, stale, replayed, wrong body."""

from __future__ import annotations

import hashlib
import json
import time

import pytest
from bittensor_wallet import Keypair, Wallet

from prism_ray.access.auth import (
    AuthError,
    KeyLoadError,
    SignedHeaders,
    bearer_token_matches,
    load_keypair,
    sign_request,
    signing_message,
)
from prism_ray.store import Store

BODY = b'{"filename": "model.zip", "code": "UEsDBA=="}'


@pytest.fixture(scope="module")
def keypair() -> Keypair:
    return Keypair.create_from_mnemonic(Keypair.generate_mnemonic())


@pytest.fixture
def store(tmp_path):
    with Store(tmp_path / "nonces.duckdb") as store:
        yield store


def remember(store: Store):
    return lambda hotkey, nonce: store.check_nonces([(hotkey, nonce, 600)])[0]


def rejected(headers: dict[str, str], body: bytes = BODY, **parse) -> AuthError:
    with pytest.raises(AuthError) as caught:
        SignedHeaders.parse(headers, **parse).verify(body)
    return caught.value


def test_the_message_is_prisms_format():
    digest = hashlib.sha256(BODY).hexdigest()
    assert signing_message("5Hk", "nonce123", "1700000000", BODY) == f"prism:5Hk:nonce123:1700000000:{digest}".encode()


def test_a_valid_signature_authenticates_its_hotkey(keypair, store):
    headers = sign_request(keypair, BODY)
    assert set(headers) == {"X-Hotkey", "X-Signature", "X-Nonce", "X-Timestamp"}
    assert headers["X-Hotkey"] == keypair.ss58_address
    assert SignedHeaders.parse(headers).authenticate(BODY, remember(store)) == keypair.ss58_address


def test_signatures_verify_with_bittensor_wallet_directly(keypair):
    """Any PRISM verifier (Keypair(ss58_address).verify over the documented message) accepts our headers."""
    headers = sign_request(keypair, BODY, nonce="abcdefgh01", timestamp=1_700_000_000)
    message = f"prism:{keypair.ss58_address}:abcdefgh01:1700000000:{hashlib.sha256(BODY).hexdigest()}"
    assert Keypair(ss58_address=keypair.ss58_address).verify(message, headers["X-Signature"])


def test_signature_hex_is_accepted_with_or_without_0x(keypair):
    headers = sign_request(keypair, BODY)
    bare = {**headers, "X-Signature": headers["X-Signature"].removeprefix("0x")}
    SignedHeaders.parse(bare).verify(BODY)
    SignedHeaders.parse(headers).verify(BODY)


def test_forged_signatures_are_refused(keypair):
    mallory = Keypair.create_from_mnemonic(Keypair.generate_mnemonic())
    stolen_identity = {**sign_request(mallory, BODY), "X-Hotkey": keypair.ss58_address}
    assert rejected(stolen_identity).rule == "auth:bad_signature"
    headers = sign_request(keypair, BODY)
    signature = bytearray(bytes.fromhex(headers["X-Signature"][2:]))
    signature[10] ^= 0x01
    flipped = {**headers, "X-Signature": signature.hex()}
    assert rejected(flipped).rule == "auth:bad_signature"
    assert rejected({**headers, "X-Signature": "0x" + "00" * 64}).status == 401


def test_every_signed_header_is_covered(keypair):
    headers = sign_request(keypair, BODY)
    assert rejected({**headers, "X-Nonce": headers["X-Nonce"] + "x"}).rule == "auth:bad_signature"
    later = str(int(headers["X-Timestamp"]) + 1)
    assert rejected({**headers, "X-Timestamp": later}).rule == "auth:bad_signature"


def test_a_signature_over_another_body_is_refused(keypair):
    headers = sign_request(keypair, BODY)
    error = rejected(headers, body=BODY.replace(b"model", b"other"))
    assert (error.rule, error.status) == ("auth:bad_signature", 401)


def test_stale_and_future_timestamps_are_refused(keypair):
    now = time.time()
    for skew in (-301, 301, -10_000):
        headers = sign_request(keypair, BODY, timestamp=int(now + skew))
        error = rejected(headers, now=now)
        assert (error.rule, error.status) == ("auth:stale_timestamp", 401)
    inside = sign_request(keypair, BODY, timestamp=int(now - 299))
    SignedHeaders.parse(inside, now=now).verify(BODY)
    narrow = sign_request(keypair, BODY, timestamp=int(now - 30))
    assert rejected(narrow, window_s=10, now=now).rule == "auth:stale_timestamp"


def test_a_replayed_nonce_is_refused_with_409(keypair, store):
    headers = sign_request(keypair, BODY)
    SignedHeaders.parse(headers).authenticate(BODY, remember(store))
    with pytest.raises(AuthError) as caught:
        SignedHeaders.parse(headers).authenticate(BODY, remember(store))
    assert (caught.value.rule, caught.value.status) == ("auth:replayed_nonce", 409)
    other = Keypair.create_from_mnemonic(Keypair.generate_mnemonic())  # nonces are per hotkey
    reused = sign_request(other, BODY, nonce=headers["X-Nonce"])
    assert SignedHeaders.parse(reused).authenticate(BODY, remember(store)) == other.ss58_address


def test_the_window_is_checked_again_once_the_body_is_in(keypair, store):
    """Nonces are remembered for twice the window; a body trickled in after the headers must not outlast that (a red
    team replayed a captured request by sending its body slowly)."""
    now = time.time()
    headers = sign_request(keypair, BODY, timestamp=int(now - 250))
    parsed = SignedHeaders.parse(headers, now=now)  # inside the window when the headers arrive
    with pytest.raises(AuthError) as caught:
        parsed.authenticate(BODY, remember(store), now=now + 60)  # outside it once the body is read
    assert caught.value.rule == "auth:stale_timestamp"
    assert parsed.authenticate(BODY, remember(store), now=now + 10) == keypair.ss58_address


@pytest.mark.parametrize("nonce", ["val-n1", "n", "has:colon", "with space", "x" * 128])
def test_any_printable_nonce_of_1_to_128_characters_signs(keypair, nonce):
    """PRISM's rule (its own end-to-end harness signs with `val-n1`)."""
    headers = sign_request(keypair, BODY, nonce=nonce)
    SignedHeaders.parse(headers).verify(BODY)


def test_missing_and_malformed_headers_are_refused(keypair):
    headers = sign_request(keypair, BODY)
    for name in headers:
        assert rejected({k: v for k, v in headers.items() if k != name}).rule == "auth:missing_headers"
    assert rejected({**headers, "X-Hotkey": "not-an-ss58-address"}).rule == "auth:bad_hotkey"
    assert rejected({**headers, "X-Nonce": "n" * 129}).rule == "auth:bad_nonce"
    assert rejected({**headers, "X-Nonce": "tab\there"}).rule == "auth:bad_nonce"
    bad_time = rejected({**headers, "X-Timestamp": "yesterday"})
    assert (bad_time.rule, bad_time.status) == ("auth:bad_timestamp", 400)  # PRISM: 400, unlike a stale one (401)
    assert rejected({**headers, "X-Signature": "0x1234"}).rule == "auth:bad_signature"


def test_bearer_tokens_compare_exactly():
    assert bearer_token_matches("s3cret", "s3cret")
    assert not bearer_token_matches("s3cret ", "s3cret")
    assert not bearer_token_matches(None, "s3cret")
    assert not bearer_token_matches("ünïcode", "s3cret")


def test_keys_load_from_a_wallet_and_from_key_files(tmp_path):
    mnemonic = Keypair.generate_mnemonic()
    expected = Keypair.create_from_mnemonic(mnemonic).ss58_address
    Wallet(name="miner", hotkey="default", path=str(tmp_path)).regenerate_hotkey(
        mnemonic=mnemonic, use_password=False, overwrite=True, suppress=True)
    assert load_keypair("miner", "default", str(tmp_path)).ss58_address == expected

    words = tmp_path / "mnemonic.txt"
    words.write_text(f"  {mnemonic}\n")
    assert load_keypair(key_file=words).ss58_address == expected
    keyfile = tmp_path / "miner" / "hotkeys" / "default"
    seed = json.loads(keyfile.read_text())["secretSeed"]
    for text in (seed, seed.removeprefix("0x"), keyfile.read_text()):
        (tmp_path / "seed").write_text(text)
        assert load_keypair(key_file=tmp_path / "seed").ss58_address == expected


def test_bad_keys_fail_without_echoing_secrets(tmp_path):
    secret = tmp_path / "bad"
    secret.write_text("twelve words that are not a valid bip39 mnemonic at all ok")
    with pytest.raises(KeyLoadError) as caught:
        load_keypair(key_file=secret)
    assert "bip39" not in str(caught.value)
    with pytest.raises(KeyLoadError):
        load_keypair(key_file=tmp_path / "missing")
    with pytest.raises(KeyLoadError):
        load_keypair()
    with pytest.raises(KeyLoadError):
        load_keypair("nowallet", "nohotkey", str(tmp_path))
