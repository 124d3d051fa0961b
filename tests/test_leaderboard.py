"""Leaderboard, weights and architecture fingerprints (docs/architecture.md, "Scoring contract"): pure, total, order-independent."""

from __future__ import annotations

import textwrap
from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import given
from hypothesis import strategies as st

from prism_ray.config import ScoringSettings
from prism_ray.errors import BundleError
from prism_ray.intake.fingerprint import architecture_family
from prism_ray.ranking.leaderboard import ScoreRow, epoch_of, epoch_seconds_of, leaderboard, priority_margin, weights

TWO_TIER = ScoringSettings(weights_mode="two_tier")
DAY = 86_400.0


def row(submission_id: str, hotkey: str, score: float | None, at: float = 0.0, status: str = "completed",
        family: str | None = "arch-x") -> ScoreRow:
    return ScoreRow(submission_id=submission_id, hotkey=hotkey, submitted_at=at, status=status, final_score=score,
                    architecture_family=family)


def board_ids(rows, **kwargs) -> list[str]:
    return [entry.submission_id for entry in leaderboard(rows, **kwargs)]


def test_best_submission_per_hotkey_ranked_from_one():
    rows = [row("a1", "alice", 0.30, at=1), row("a2", "alice", 0.45, at=2), row("b1", "bob", 0.40, at=3)]
    board = leaderboard(rows)
    assert [(entry.rank, entry.hotkey, entry.submission_id) for entry in board] == [(1, "alice", "a2"),
                                                                                    (2, "bob", "b1")]


def test_only_completed_scored_rows_reach_the_board():
    rows = [row("a", "alice", 0.9, status="failed"), row("b", "bob", None, status="running"),
            row("c", "carol", 0.2), row("d", "dave", None)]
    assert board_ids(rows) == ["c"]


def test_order_is_score_then_earliest_then_id():
    rows = [row("z", "h1", 0.5, at=10), row("y", "h2", 0.5, at=5), row("b", "h3", 0.5, at=10),
            row("a", "h4", 0.6, at=99), row("c", "h5", 0.5, at=10)]
    assert board_ids(rows) == ["a", "y", "b", "c", "z"]


def test_within_a_hotkey_a_tie_keeps_the_earliest_submission():
    assert board_ids([row("late", "alice", 0.5, at=20), row("early", "alice", 0.5, at=10)]) == ["early"]


def test_datetimes_and_epoch_seconds_order_alike():
    start = datetime(2025, 1, 1, tzinfo=UTC)
    rows = [ScoreRow(submission_id="x", hotkey="h1", submitted_at=start + timedelta(seconds=5), status="completed",
                     final_score=0.5),
            ScoreRow(submission_id="y", hotkey="h2", submitted_at=start.timestamp() + 1, status="completed",
                     final_score=0.5)]
    assert board_ids(rows) == ["y", "x"]


def test_duplicate_submission_ids_are_refused():
    with pytest.raises(ValueError, match="unique"):
        leaderboard([row("a", "alice", 0.5), row("a", "bob", 0.4)])


row_lists = st.lists(
    st.builds(lambda hotkey, score, at, status, family: (hotkey, score, at, status, family),
              st.sampled_from(["h1", "h2", "h3", "h4"]), st.sampled_from([0.0, 0.2, 0.5, 0.5, 0.8]),
              st.sampled_from([0.0, 10.0, DAY + 1, 2 * DAY]), st.sampled_from(["completed", "completed", "failed"]),
              st.sampled_from(["arch-x", "arch-y", None])),
    max_size=12,
).map(lambda specs: [row(f"s{index:02d}", *spec) for index, spec in enumerate(specs)])


@given(data=st.data(), rows=row_lists)
def test_board_and_weights_do_not_depend_on_row_order(data, rows):
    shuffled = data.draw(st.permutations(rows))
    for epoch in (None, 0, 1):
        assert leaderboard(shuffled, epoch) == leaderboard(rows, epoch)
        for settings in (ScoringSettings(), TWO_TIER):
            assert weights(shuffled, settings, epoch) == weights(rows, settings, epoch)


@given(rows=row_lists)
def test_weights_sum_to_one_or_are_empty(rows):
    for settings in (ScoringSettings(), TWO_TIER):
        result = weights(rows, settings)
        board = leaderboard(rows)
        if not board or board[0].final_score == 0:
            assert result == {}
        else:
            assert sum(result.values()) == pytest.approx(1.0)
            assert all(value >= 0 for value in result.values())
            assert set(result) <= {entry.hotkey for entry in board}


def test_per_hotkey_weights_are_normalised_best_scores():
    rows = [row("a1", "alice", 0.2), row("a2", "alice", 0.6), row("b1", "bob", 0.2), row("c1", "carol", 0.0)]
    assert weights(rows) == pytest.approx({"alice": 0.75, "bob": 0.25, "carol": 0.0})


@pytest.mark.parametrize("rows", [[], [row("a", "alice", 0.0), row("b", "bob", 0.0)],
                                  [row("a", "alice", 0.7, status="failed")]])
def test_an_all_zero_or_empty_board_gives_no_weights(rows):
    assert weights(rows) == {} and weights(rows, TWO_TIER) == {}


def test_two_tier_pays_the_family_inventor_and_its_best_variant():
    rows = [row("a1", "alice", 0.30, at=1, family="arch-x"), row("b1", "bob", 0.50, at=5, family="arch-x"),
            row("c1", "carol", 0.45, at=0, family="arch-y"), row("d1", "dave", 0.40, at=3, family="arch-x")]
    assert weights(rows, TWO_TIER) == pytest.approx({"alice": 0.60, "bob": 0.40})


def test_two_tier_one_hotkey_can_take_both_shares():
    rows = [row("a1", "alice", 0.50, at=1), row("b1", "bob", 0.40, at=2)]
    assert weights(rows, TWO_TIER) == pytest.approx({"alice": 1.0})


def test_two_tier_owner_is_the_first_completed_submitter_of_the_family():
    # alice's first submission failed and her completed one came after bob's, so bob owns the family.
    rows = [row("a0", "alice", None, at=0, status="failed"), row("b1", "bob", 0.10, at=2),
            row("a1", "alice", 0.50, at=3)]
    assert weights(rows, TWO_TIER) == pytest.approx({"bob": 0.60, "alice": 0.40})


def test_two_tier_a_zeroed_run_owns_nothing():
    rows = [row("m0", "mallory", 0.0, at=0), row("b1", "bob", 0.5, at=2)]
    assert weights(rows, TWO_TIER) == pytest.approx({"bob": 1.0})


def test_two_tier_unfingerprinted_top_is_its_own_family():
    rows = [row("a1", "alice", 0.2, at=0, family=None), row("b1", "bob", 0.5, at=2, family=None)]
    assert weights(rows, TWO_TIER) == pytest.approx({"bob": 1.0})


def test_two_tier_split_is_configurable():
    rows = [row("a1", "alice", 0.3, at=1), row("b1", "bob", 0.5, at=2)]
    settings = ScoringSettings(weights_mode="two_tier", two_tier_split=(0.7, 0.3))
    assert weights(rows, settings) == pytest.approx({"alice": 0.7, "bob": 0.3})


def test_epochs_have_configurable_length_and_filter_the_board():
    assert epoch_of(0.0) == 0 and epoch_of(DAY - 1e-3) == 0 and epoch_of(DAY) == 1 and epoch_of(-1.0) == -1
    assert epoch_of(7200.0, ScoringSettings(epoch_seconds=3600)) == 2
    naive = datetime(2025, 3, 1, 23, 59)
    assert epoch_of(naive) == epoch_of(naive.replace(tzinfo=UTC)) == epoch_of(naive.replace(tzinfo=UTC).timestamp())
    assert epoch_of(datetime(2025, 3, 2, 1, 0, tzinfo=timezone(timedelta(hours=2)))) == epoch_of(naive)
    rows = [row("a", "alice", 0.9, at=10), row("b", "bob", 0.5, at=DAY + 10), row("c", "alice", 0.4, at=DAY + 20)]
    assert board_ids(rows, epoch=0) == ["a"]
    assert board_ids(rows, epoch=1) == ["b", "c"]
    assert board_ids(rows, epoch=5) == []
    assert weights(rows, epoch=1) == pytest.approx({"bob": 5 / 9, "alice": 4 / 9})



# --- time priority (docs/scoring.md, "The leaderboard") -------------------------------------------------------------

PRIORITY = ScoringSettings(priority_epsilon=0.01, priority_decay_seconds=10 * DAY)


@pytest.mark.parametrize(("later_score", "expected"), [(0.5044, ["early", "late"]), (0.5046, ["late", "early"])],
                         ids=["by-less-than-the-margin", "by-more"])
def test_a_later_submission_passes_an_earlier_one_only_by_the_margin(later_score, expected):
    # bob's run comes 1 day after alice's: the margin is 0.01 · (1 − 1/10) = 0.9%, i.e. a score above 0.5045.
    rows = [row("early", "alice", 0.5, at=0), row("late", "bob", later_score, at=DAY)]
    assert priority_margin(DAY, PRIORITY) == pytest.approx(0.009)
    assert board_ids(rows, settings=PRIORITY) == expected
    assert board_ids(rows, settings=ScoringSettings(priority_epsilon=0)) == ["late", "early"]  # no priority: by score


def test_the_margin_decays_with_the_earlier_submissions_head_start():
    assert [priority_margin(age, PRIORITY) for age in (0, DAY, 5 * DAY, 10 * DAY, 30 * DAY)] == pytest.approx(
        [0.0, 0.009, 0.005, 0.0, 0.0])  # 0 at age 0: rows submitted together are compared on score alone
    late = 0.5 * 1.006  # 0.6% better: enough against a head start of 5 days (0.5%), not of 2 days (0.8%)
    assert board_ids([row("early", "alice", 0.5, at=0), row("late", "bob", late, at=2 * DAY)],
                     settings=PRIORITY) == ["early", "late"]
    assert board_ids([row("early", "alice", 0.5, at=0), row("late", "bob", late, at=5 * DAY + 1)],
                     settings=PRIORITY) == ["late", "early"]
    assert board_ids([row("early", "alice", 0.5, at=0), row("late", "bob", 0.5000001, at=10 * DAY)],
                     settings=PRIORITY) == ["late", "early"]  # once fully decayed, any better score passes


def test_the_default_margin_protects_an_original_from_a_slightly_better_perturbed_copy():
    rows = [row("original", "alice", 0.40, at=0), row("perturbed", "bob", 0.40 * 1.004, at=3600)]
    assert board_ids(rows) == ["original", "perturbed"]
    assert board_ids(rows, settings=TWO_TIER)[0] == "original" and weights(rows, TWO_TIER) == {"alice": 1.0}


def test_a_hotkeys_own_resubmission_replaces_its_entry_only_by_the_margin():
    # alice's tweak is 0.2% better than her first run: her entry stays the first run, which keeps its place
    # above bob's (submitted between the two), as her tweak would not.
    rows = [row("a1", "alice", 0.500, at=0), row("b1", "bob", 0.5009, at=DAY), row("a2", "alice", 0.501, at=2 * DAY)]
    assert board_ids(rows, settings=PRIORITY) == ["a1", "b1"]
    assert board_ids([*rows, row("a3", "alice", 0.52, at=3 * DAY)], settings=PRIORITY) == ["a3", "b1"]


def test_a_later_row_cannot_jump_a_row_it_does_not_beat():
    # carol beats alice's old run by its (decayed) margin but not bob's fresh one, which sits below alice's:
    # she stays below bob, so every later row above an earlier one has beaten it by the margin.
    rows = [row("a", "alice", 0.500, at=0), row("b", "bob", 0.499, at=9 * DAY), row("c", "carol", 0.5008, at=9 * DAY + 1)]
    assert board_ids(rows, settings=PRIORITY) == ["a", "b", "c"]


scores = st.sampled_from([0.0, 0.3, 0.5, 0.5005, 0.502, 0.51, 0.6])
timed_rows = st.lists(st.tuples(st.sampled_from(["h1", "h2", "h3", "h4", "h5"]), scores,
                                st.sampled_from([0.0, 3600.0, DAY, 4 * DAY, 12 * DAY])), max_size=10).map(
    lambda specs: [row(f"s{index:02d}", *spec) for index, spec in enumerate(specs)])


@given(data=st.data(), rows=timed_rows)
def test_time_priority_is_order_independent_and_never_lets_a_later_row_pass_without_the_margin(data, rows):
    board = leaderboard(rows, settings=PRIORITY)
    assert leaderboard(data.draw(st.permutations(rows)), settings=PRIORITY) == board
    for high, entry in enumerate(board):
        for below in board[high + 1:]:
            head_start = epoch_seconds_of(entry.submitted_at) - epoch_seconds_of(below.submitted_at)
            if head_start > 0:  # a later row above an earlier one
                assert entry.final_score > below.final_score * (1 + priority_margin(head_start, PRIORITY))


@given(rows=timed_rows)
def test_without_a_margin_the_order_is_score_then_earliest_then_id(rows):
    best: dict[str, ScoreRow] = {}
    plain = sorted(rows, key=lambda r: (-r.final_score, epoch_seconds_of(r.submitted_at), r.submission_id))
    for candidate in plain:
        best.setdefault(candidate.hotkey, candidate)
    expected = [r.submission_id for r in plain if best[r.hotkey] is r]
    assert board_ids(rows, settings=ScoringSettings(priority_epsilon=0)) == expected


ARCHITECTURE = '''
import torch
from torch import nn
import torch.nn.functional as F

DIM = 128


class Block(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.fc = nn.Linear(dim, dim, bias=False)

    def forward(self, x):
        return x + F.gelu(self.fc(x))


def build_model(ctx):
    return nn.Sequential(nn.Embedding(ctx.vocab_size, DIM), Block(dim=DIM), nn.Linear(DIM, ctx.vocab_size))
'''

RESTYLED = '''
"""My model."""
import torch
from torch import nn
import torch.nn.functional as F
DIM = 128   # width of the residual stream
class Block( nn.Module ):
    """One residual MLP block."""
    def __init__(self, dim: int) -> None:
        super().__init__(); self.fc = nn.Linear(
            dim, dim,
            bias=False,
        )
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # residual
        return (x + F.gelu(self.fc(x)))
def build_model(ctx):
    """Entry point."""
    return nn.Sequential(nn.Embedding(ctx.vocab_size, DIM), Block(dim=DIM), nn.Linear(DIM, ctx.vocab_size))
'''


def family(text: str, path: str = "architecture.py") -> str:
    return architecture_family({path: textwrap.dedent(text)})


def test_fingerprint_ignores_formatting_comments_docstrings_and_annotations():
    assert family(RESTYLED) == family(ARCHITECTURE)
    assert len(family(ARCHITECTURE)) == 64


def test_fingerprint_ignores_renames_and_hyperparameter_numbers():
    renamed = (ARCHITECTURE.replace("Block", "Layer").replace("dim", "width").replace("self.fc", "self.proj")
               .replace("DIM = 128", "DIM = 512").replace("as F", "as fn").replace("F.gelu", "fn.gelu"))
    assert renamed != ARCHITECTURE
    assert family(renamed, path="model.py") == family(ARCHITECTURE)


@pytest.mark.parametrize("change", [("F.gelu", "F.relu"), ("x + F.gelu", "F.gelu"), ("bias=False", "bias=True"),
                                    ("Block(dim=DIM), ", "Block(dim=DIM), Block(dim=DIM), ")])
def test_fingerprint_changes_with_the_architecture(change):
    assert family(ARCHITECTURE.replace(*change)) != family(ARCHITECTURE)


def test_fingerprint_of_several_files_is_independent_of_dict_order():
    layers = "from torch import nn\nclass Block(nn.Module):\n    pass\n"
    main = "from layers import Block\ndef build_model(ctx):\n    return Block()\n"
    assert architecture_family({"layers.py": layers, "architecture.py": main}) == architecture_family(
        {"architecture.py": main, "layers.py": layers})
    assert architecture_family({"layers.py": layers, "architecture.py": main}) != architecture_family(
        {"architecture.py": main})


def test_fingerprint_reports_syntax_errors_as_contract_reasons():
    with pytest.raises(BundleError) as raised:
        family("def build_model(ctx):\n    return (\n")
    assert raised.value.rule == "contract:syntax" and raised.value.reasons[0].file == "architecture.py"
