"""Conversion settings: one validated dataclass, presets by name ("S3A3E8")."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, replace

_PRESET = re.compile(r"^S(\d+)A(\d+)E(\d+)$", re.IGNORECASE)


class ConfigError(ValueError):
    """A conversion setting is invalid; the message says which and how to fix it."""


@dataclass(frozen=True)
class CMoEConfig:
    """How to carve each FFN.

    ``shared`` of ``experts`` equal groups of neurons form the always-on shared expert;
    ``active`` of the other ``experts - shared`` routed experts are chosen per token.
    """

    shared: int = 3
    active: int = 3
    experts: int = 8
    k_act: int = 10  # K_a of the ATopK markers
    calib_samples: int = 8
    calib_seqlen: int = 2048
    kmeans_iters: int | None = 1  # None: iterate until the assignment stops changing
    seed: int = 0
    router: str = "analytical"

    def __post_init__(self):
        if self.experts < 1:
            raise ConfigError(f"experts must be >= 1, got {self.experts}")
        if not 0 <= self.shared <= self.experts:
            raise ConfigError(f"shared experts s={self.shared} must be in [0, e={self.experts}]")
        if not 0 <= self.active <= self.experts - self.shared:
            raise ConfigError(
                f"active routed experts a={self.active} must be in [0, e - s = {self.experts - self.shared}]"
            )
        if self.shared + self.active == 0:
            raise ConfigError("s + a must be >= 1: every token needs at least one expert")
        if self.k_act < 1:
            raise ConfigError(f"k_act must be >= 1, got {self.k_act}")
        if self.calib_samples < 1 or self.calib_seqlen < 2:
            raise ConfigError(
                f"need at least 1 calibration sample of >= 2 tokens, got {self.calib_samples} x {self.calib_seqlen}"
            )
        if self.kmeans_iters is not None and self.kmeans_iters < 1:
            raise ConfigError(f"kmeans_iters must be >= 1 or None (to convergence), got {self.kmeans_iters}")

    @classmethod
    def parse(cls, name: str, **overrides) -> "CMoEConfig":
        """``CMoEConfig.parse("S3A3E8", k_act=10)``."""
        match = _PRESET.match(name.strip())
        if not match:
            raise ConfigError(f"config {name!r} is not of the form S{{s}}A{{a}}E{{e}}, e.g. S3A3E8")
        s, a, e = map(int, match.groups())
        return cls(shared=s, active=a, experts=e, **overrides)

    @property
    def name(self) -> str:
        return f"S{self.shared}A{self.active}E{self.experts}"

    @property
    def active_fraction(self) -> float:
        return (self.shared + self.active) / self.experts

    def check_layer(self, intermediate_size: int) -> None:
        """Settings that depend on the FFN width f."""
        f = intermediate_size
        if f % self.experts:
            divisors = [e for e in range(2, 65) if f % e == 0]
            raise ConfigError(
                f"{self.name}: e={self.experts} does not divide the FFN width f={f}; "
                f"choose e among {divisors}"
            )
        if self.k_act > f:
            raise ConfigError(f"k_act={self.k_act} exceeds the FFN width f={f}")

    def replace(self, **changes) -> "CMoEConfig":
        return replace(self, **changes)

    def to_dict(self) -> dict:
        return asdict(self)
