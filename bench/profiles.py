"""How big and how long: `quick` keeps the script exercised in CI, `full` is for numbers people quote."""

from __future__ import annotations

from dataclasses import dataclass

KiB = 1 << 10
MiB = 1 << 20


@dataclass(frozen=True)
class Profile:
    name: str
    rounds: int  # every system runs every workload once per round, systems interleaved
    small_bytes: int
    small_calls: int  # timed calls per round of the single-client small-assign workload
    large_bytes: int
    large_calls: int  # timed calls per round of each large workload
    clients: int  # concurrent client processes
    window: float  # seconds each concurrent measurement counts calls
    scaling_rounds: int
    models: tuple[str, ...]  # keys of bench.models.MODELS for the model-step workload
    model_rounds: int  # timed steps of each push kind per system and model, one per round


PROFILES = {
    "quick": Profile(
        name="quick",
        rounds=2,
        small_bytes=4 * KiB,
        small_calls=100,
        large_bytes=1 * MiB,
        large_calls=2,
        clients=8,
        window=0.25,
        scaling_rounds=2,
        models=("tiny_cnn",),
        model_rounds=2,
    ),
    "full": Profile(
        name="full",
        rounds=5,
        small_bytes=4 * KiB,
        small_calls=2000,
        large_bytes=64 * MiB,
        large_calls=3,
        clients=8,
        window=3.0,
        scaling_rounds=6,
        models=("resnet50", "small_cnn"),
        model_rounds=7,
    ),
}
