"""`GET /v1/leaderboard` and `GET /v1/epochs/current`."""

from __future__ import annotations

import time
from typing import Annotated

from fastapi import APIRouter, Query, Response

from prism_ray.backend import Backend
from prism_ray.leaderboard import epoch_of, epoch_seconds_of
from serve_app.errors import responses
from serve_app.models import Epoch, Leaderboard, LeaderboardRow

EpochQuery = Annotated[int | None, Query(ge=0, le=2**53, description="only submissions of this epoch")]


def router(backend: Backend) -> APIRouter:
    board = APIRouter(tags=["results"])

    @board.get("/v1/leaderboard", response_model=Leaderboard, responses=responses(422))
    def get_leaderboard(epoch: EpochQuery = None) -> Response:
        """Best completed submission per hotkey, by final_score; ties → earliest submission."""
        # Serialised once per change of the board: a read is then a cache lookup (`computed_at` says when).
        body = backend.reads.cached(("board", "json", epoch), lambda: _render(backend, epoch))
        return Response(body, media_type="application/json")

    @board.get("/v1/epochs/current", response_model=Epoch)
    def current_epoch() -> Epoch:
        """The current scoring epoch: its number and bounds in Unix seconds."""
        now = time.time()
        seconds = backend.settings.scoring.epoch_seconds
        number = epoch_of(now, backend.settings.scoring)
        return Epoch(epoch=number, starts_at=number * seconds, ends_at=(number + 1) * seconds, epoch_seconds=seconds,
                     now=now)

    return board


def _render(backend: Backend, epoch: int | None) -> bytes:
    entries = [LeaderboardRow(**entry.model_dump(include=set(LeaderboardRow.model_fields) - {"submitted_at", "flags"}),
                              submitted_at=epoch_seconds_of(entry.submitted_at), flags=entry.flags)
               for entry in backend.leaderboard(epoch)]
    return Leaderboard(epoch=epoch, computed_at=time.time(), entries=entries).model_dump_json().encode()
