"""One router per resource: submissions, leaderboard, weights, queue, health, pages."""
