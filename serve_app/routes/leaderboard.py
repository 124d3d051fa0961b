"""`GET /v1/leaderboard` and `GET /v1/epochs/current`."""

from __future__ import annotations

import time
from typing import Annotated

from fastapi import APIRouter, Query, Response

from prism_ray.backend.store_backend import Backend
from prism_ray.ranking.leaderboard import epoch_of, epoch_seconds_of
from serve_app.errors import responses
from serve_app.models import Epoch, Leaderboard, LeaderboardRow

EpochQuery = Annotated[int | None, Query(ge=0, le=2**53, description="only submissions of this epoch")]
EpochIdQuery = Annotated[int | None, Query(ge=0, le=2**53, description="PRISM's name for `epoch`")]
AllEpochsQuery = Annotated[bool, Query(description="rank every epoch's submissions (the default: the current epoch, "
                                       "as PRISM does)")]


def router(backend: Backend) -> APIRouter:
    board = APIRouter(tags=["results"])

    @board.get("/v1/leaderboard", response_model=Leaderboard, responses=responses(422))
    def get_leaderboard(epoch: EpochQuery = None, epoch_id: EpochIdQuery = None,
                        all_epochs: AllEpochsQuery = False) -> Response:
        """Best completed submission per hotkey in the decided order (a later submission passes an earlier one only
        when a paired bootstrap finds it better, else by the margin ε, docs/scoring.md); ties → earliest submission.
        The current epoch unless `?epoch=` (or `?epoch_id=`) names another or `?all_epochs=true`."""
        current = epoch_of(time.time(), backend.settings.scoring)
        shown = None if all_epochs else next((e for e in (epoch, epoch_id) if e is not None), current)
        # Serialised once per change of the board: a read is then a cache lookup (`computed_at` says when).
        body = backend.reads.cached(("board", "json", shown, current),
                                    lambda: _render(backend, shown, current if shown is None else shown))
        return Response(body, media_type="application/json")

    @board.get("/v1/epochs/current", response_model=Epoch)
    def current_epoch() -> Epoch:
        """The current scoring epoch: its number and bounds in Unix seconds."""
        now = time.time()
        seconds = backend.settings.scoring.epoch_seconds
        number = epoch_of(now, backend.settings.scoring)
        return Epoch(epoch=number, epoch_id=number, starts_at=number * seconds, ends_at=(number + 1) * seconds,
                     epoch_seconds=seconds, now=now)

    return board


def _render(backend: Backend, epoch: int | None, epoch_id: int) -> bytes:
    fields = set(LeaderboardRow.model_fields) - {"submitted_at", "flags"}
    entries = [LeaderboardRow(**entry.model_dump(include=fields), submitted_at=epoch_seconds_of(entry.submitted_at),
                              score=entry.final_score, flags=entry.flags)
               for entry in backend.leaderboard(epoch)]
    noise = backend.seed_noise(epoch)
    return Leaderboard(epoch=epoch, epoch_id=epoch_id, all_epochs=epoch is None, computed_at=time.time(),
                       sigma_seed=noise.used, sigma_seed_measured=noise.measured, sigma_seed_dof=noise.dof,
                       entries=entries).model_dump_json().encode()
