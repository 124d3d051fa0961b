"""Who may submit: the registry of allowed hotkeys (docs/operator.md, "Registered hotkeys").

The operator picks one source (`PRISM_REGISTRY_MODE`):

- `metagraph`: the hotkeys registered on the subnet (netuid 100 by default), read from a snapshot file that
  `prism-ray registry sync` writes through the bittensor SDK;
- `allowlist`: the hotkeys listed in a text file, one per line (tests, private deployments);
- `open`: any hotkey with a valid signature; only ever when set on purpose.

Unset, it is `metagraph` under signed auth and `open` under dev auth (whose hotkeys are unsigned names, so a list
could not hold them to anything). The file is read again whenever it changes on disk (a sync replaces it in one
rename), so a running server follows it. The SDK is imported only by `sync`: it is not a dependency of prism-ray.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import typer
from bittensor_wallet import Keypair
from pydantic import BaseModel, Field, ValidationError

from prism_ray.config import RegistryMode, RegistrySettings, Settings
from prism_ray.errors import PrismError

SNAPSHOT_FORMAT = "prism-ray/metagraph@1"


class RegistryError(PrismError):
    """A submission the registry refuses (403), or a registry that cannot answer (503); `status` is the HTTP one."""

    def __init__(self, rule: str, message: str, status: int = 503) -> None:
        super().__init__(rule, message)
        self.status = status


class Neuron(BaseModel):
    uid: int
    hotkey: str
    coldkey: str | None = None


class Snapshot(BaseModel):
    """The metagraph snapshot file: every neuron of one subnet at one block."""

    format: Literal["prism-ray/metagraph@1"] = SNAPSHOT_FORMAT
    network: str
    netuid: int
    block: int
    synced_at: float = Field(description="Unix seconds")
    neurons: list[Neuron]


@dataclass(frozen=True)
class _Loaded:
    """What the file said when it was last read; replaced whole, so a reader on another thread never sees half."""

    stamp: tuple[int, int] | None = None  # (mtime_ns, size) of the file as read
    hotkeys: frozenset[str] = frozenset()
    snapshot: Snapshot | None = None
    problem: RegistryError | None = None


class Registry:
    """Admits hotkeys. `admit` raises RegistryError: `registry:unregistered` (403) for a hotkey the source does not
    hold, `registry:unavailable` (503) when the source cannot be read (no snapshot yet, a malformed file)."""

    def __init__(self, mode: RegistryMode, path: Path | None = None) -> None:
        self.mode = mode
        self.path = path
        self._loaded = _Loaded()

    @classmethod
    def from_settings(cls, settings: RegistrySettings, auth_mode: str, cache_dir: Path) -> Registry:
        mode = settings.mode_for(auth_mode)
        return cls(mode, None if mode == "open" else settings.path(cache_dir))

    def admit(self, hotkey: str) -> None:
        if self.mode == "open":
            return
        loaded = self._current()
        if loaded.problem is not None:
            raise loaded.problem
        if hotkey not in loaded.hotkeys:
            where = (f"subnet {loaded.snapshot.netuid} on {loaded.snapshot.network} (metagraph at block "
                     f"{loaded.snapshot.block})" if loaded.snapshot else "this server's allow-list")
            raise RegistryError("registry:unregistered", f"hotkey {hotkey} is not registered on {where}; register "
                                "it on the subnet, then submit again (nothing was stored)", status=403)

    def describe(self) -> dict[str, Any]:
        """For /health: the mode, the file, how many hotkeys it holds, when the snapshot was taken, what is wrong."""
        loaded = _Loaded() if self.mode == "open" else self._current()
        return {"mode": self.mode, "source": None if self.path is None else str(self.path),
                "hotkeys": None if self.mode == "open" or loaded.problem else len(loaded.hotkeys),
                "synced_at": loaded.snapshot and loaded.snapshot.synced_at,
                "problem": loaded.problem and loaded.problem.reasons[0].message}

    def _current(self) -> _Loaded:
        """The file as it is now: read again only when its mtime or size changed."""
        assert self.path is not None
        try:
            stat = self.path.stat()
        except OSError as error:
            hint = "run `prism-ray registry sync`" if self.mode == "metagraph" else "write the allow-list"
            self._loaded = _Loaded(problem=RegistryError(
                "registry:unavailable", f"the {self.mode} file {self.path} cannot be read ({error.strerror}); "
                f"{hint}. No submission is accepted until it can"))
            return self._loaded
        stamp = (stat.st_mtime_ns, stat.st_size)
        if stamp != self._loaded.stamp:
            self._loaded = self._read(stamp)
        return self._loaded

    def _read(self, stamp: tuple[int, int]) -> _Loaded:
        assert self.path is not None
        try:
            text = self.path.read_text()
            if self.mode == "metagraph":
                snapshot = Snapshot.model_validate_json(text)
                return _Loaded(stamp, frozenset(neuron.hotkey for neuron in snapshot.neurons), snapshot)
            return _Loaded(stamp, parse_allowlist(text))
        except (OSError, ValidationError, ValueError) as error:
            return _Loaded(stamp, problem=RegistryError(
                "registry:unavailable", f"{self.path} is not a valid {self.mode} file: {str(error).splitlines()[0]}"))


def parse_allowlist(text: str) -> frozenset[str]:
    """One ss58 hotkey per line; blank lines and `#` comments are skipped. A line that is not an address is an
    error (a typo would otherwise lock its miner out without a word)."""
    hotkeys = set()
    for number, line in enumerate(text.splitlines(), start=1):
        entry = line.split("#", 1)[0].strip()
        if not entry:
            continue
        try:
            Keypair(ss58_address=entry)
        except ValueError:
            raise ValueError(f"line {number}: {entry!r} is not an ss58 address") from None
        hotkeys.add(entry)
    return frozenset(hotkeys)


# --- prism-ray registry sync --------------------------------------------------------------------------------------

def sync(settings: RegistrySettings, out: Path) -> Snapshot:
    """Read the subnet's metagraph through the bittensor SDK and write it to `out` (replaced in one rename)."""
    try:
        import bittensor
    except ImportError:
        raise RegistryError("registry:sdk_missing", "the bittensor SDK is not installed here (`pip install "
                            "bittensor`; it is not a dependency of prism-ray). Or write the snapshot file yourself "
                            "(docs/operator.md) or use an allow-list") from None
    try:
        metagraph = bittensor.Subtensor(network=settings.network).metagraph(netuid=settings.netuid)
    except Exception as error:  # the SDK raises its own error types per failure (connection, substrate, netuid)
        raise RegistryError("registry:network_unreachable", f"cannot read subnet {settings.netuid} from "
                            f"{settings.network}: {type(error).__name__}: {error}") from None
    snapshot = snapshot_of(metagraph, settings)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=out.parent, prefix=f".{out.name}.", delete=False) as temporary:
        temporary.write(snapshot.model_dump_json(indent=1))
    os.replace(temporary.name, out)  # a server reading the old file never sees half of the new one
    return snapshot


def snapshot_of(metagraph: Any, settings: RegistrySettings) -> Snapshot:
    """The SDK's Metagraph (uids, hotkeys, coldkeys, block) as a snapshot."""
    neurons = [Neuron(uid=int(uid), hotkey=str(hotkey), coldkey=str(coldkey)) for uid, hotkey, coldkey
               in zip(metagraph.uids, metagraph.hotkeys, metagraph.coldkeys, strict=True)]
    return Snapshot(network=settings.network, netuid=settings.netuid, block=int(metagraph.block),
                    synced_at=time.time(), neurons=neurons)


registry_app = typer.Typer(help="The registry of hotkeys allowed to submit (docs/operator.md).", no_args_is_help=True)


@registry_app.command("sync")
def sync_command(
    netuid: Annotated[int | None, typer.Option(help="the subnet [default: $PRISM_REGISTRY_NETUID or 100]")] = None,
    network: Annotated[str | None, typer.Option(help="network name or ws:// endpoint [default: "
                                                "$PRISM_REGISTRY_NETWORK or finney]")] = None,
    out: Annotated[Path | None, typer.Option(help="the snapshot file [default: what the server reads: "
                                             "$PRISM_REGISTRY_FILE or <PRISM_CACHE_DIR>/registry/"
                                             "metagraph-<netuid>.json]")] = None,
) -> None:
    """Snapshot the subnet's registered hotkeys through the bittensor SDK; a running server picks it up."""
    overrides = {key: value for key, value in (("netuid", netuid), ("network", network)) if value is not None}
    settings = RegistrySettings(**overrides)
    path = out or settings.path(Settings().cache_dir)
    try:
        snapshot = sync(settings, path)
    except RegistryError as error:
        typer.echo(f"error: [{error.rule}] {error.reasons[0].message}", err=True)
        raise typer.Exit(1) from None
    typer.echo(json.dumps({"file": str(path), "netuid": snapshot.netuid, "network": snapshot.network,
                           "block": snapshot.block, "hotkeys": len(snapshot.neurons)}))
