"""A GRPO reward for tests on random tiny models, where the exact answer is never sampled: every
reward 0 would make every advantage 0 and the adapter never move, so a test comparing two runs'
adapters would pass whatever the runs did. Shorter completions score higher, so the rewards of
a group differ. Given to runs as `grpo.rewards=[BREVITY]` (a file spec, so torchrun's and other
child processes find it too)."""

from pathlib import Path

BREVITY = f"{Path(__file__).resolve()}:brevity"


def brevity(completions):
    return [1.0 / (1 + len(c)) for c in completions]
