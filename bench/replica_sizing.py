"""What seed replicas add to GPU time per epoch (docs/operator.md, "Sizing"), for a given submission rate.

Replicas go to each epoch's top k and to every submission that would enter it (docs/scoring.md, "Seed replicas"),
R runs each. How many submissions enter the top k depends on the order scores arrive in; for scores in random
order the n-th submission is in the top k of the first n with probability min(1, k/n), so an epoch of N submissions
has about k · (1 + H(N) − H(k)) entrants (H: harmonic numbers), each getting R replicas.

The bench checks that estimate against the real policy (prism_ray.ranking.replicas.select over in-memory score rows, the
decided order with the ε fallback): N submissions arrive, each learner's bpb drawn from a spread of learner quality
plus seed noise σ; after each completion the policy is asked, and every replica it queues is run at once with a fresh
seed. It prints replica runs per epoch and the GPU time they add at T seconds per run.

    python bench/replica_sizing.py [--rates 10,50,200] [--top-k 3] [--count 2] [--seconds 120] [--trials 5]
"""

from __future__ import annotations

import argparse
import math
import random

from prism_ray.config import ReplicaSettings, ScoringSettings
from prism_ray.ranking import replicas
from prism_ray.ranking.leaderboard import ScoreRow


def expected_runs(submissions: int, top_k: int, count: int) -> float:
    """R · Σ_{n ≤ N} min(1, k/n): the replicas of every submission that entered the top k when it arrived."""
    return count * math.fsum(min(1.0, top_k / n) for n in range(1, submissions + 1))


def simulated_runs(submissions: int, settings: ReplicaSettings, scoring: ScoringSettings, sigma: float,
                   rng: random.Random) -> int:
    rows: dict[str, ScoreRow] = {}
    runs = 0
    for n in range(submissions):
        quality = rng.gauss(1.30, 0.05)  # the learner's true bpb
        bpb = quality + rng.gauss(0.0, sigma)
        submission_id = f"sub_{n:06d}"
        rows[submission_id] = ScoreRow(submission_id=submission_id, hotkey=f"h{n}", submitted_at=float(n),
                                       status="completed", bpb=bpb, final_score=1 / (1 + bpb), seed_bpbs=(bpb,),
                                       replicas="none")
        for chosen in replicas.select(list(rows.values()), scoring, settings):
            row = rows[chosen]
            seeds = row.seed_bpbs + tuple(quality + rng.gauss(0.0, sigma) for _ in range(settings.count))
            rows[chosen] = row.model_copy(update={"seed_bpbs": seeds, "replicas": "done"})
            runs += settings.count
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rates", default="10,50,200", help="submissions per epoch, comma-separated")
    parser.add_argument("--top-k", type=int, default=ReplicaSettings().top_k)
    parser.add_argument("--count", type=int, default=ReplicaSettings().count, help="R: replicas per entry")
    parser.add_argument("--seconds", type=float, default=120.0, help="GPU seconds of one run (docs/operator.md)")
    parser.add_argument("--sigma", type=float, default=0.012, help="seed noise of bpb")
    parser.add_argument("--trials", type=int, default=5)
    args = parser.parse_args()
    settings = ReplicaSettings(top_k=args.top_k, count=args.count)
    scoring = ScoringSettings()
    rng = random.Random(0)
    print(f"top k {args.top_k}, R {args.count}, {args.seconds:g} GPU s per run, σ_seed {args.sigma:g}")
    print(f"{'submissions':>12} {'expected':>9} {'simulated':>10} {'replica GPU h':>14} {'+ of base':>10}")
    for rate in (int(part) for part in args.rates.split(",")):
        simulated = [simulated_runs(rate, settings, scoring, args.sigma, rng) for _ in range(args.trials)]
        mean = math.fsum(simulated) / len(simulated)
        hours = mean * args.seconds / 3600
        print(f"{rate:>12} {expected_runs(rate, args.top_k, args.count):>9.1f} {mean:>10.1f} {hours:>14.2f} "
              f"{mean / rate:>10.0%}")


if __name__ == "__main__":
    main()
