"""Conversion settings: one validated dataclass, presets by name ("S3A3E8")."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, fields, replace

_PRESET = re.compile(r"^S(\d+)A(\d+)E(\d+)$", re.IGNORECASE)


class ConfigError(ValueError):
    """A conversion setting is invalid; the message says which and how to fix it."""


# Named bundles of algorithm choices. A field left at None in CMoEConfig takes its recipe's value.
#   paper: method.md exactly (ATopK markers, one k-means step, analytical router, uniform layers).
#   plus:  issue 5: neurons described by their output contribution |h_i| |W_down[:, i]|,
#          balanced k-means to convergence, closed-form ridge linear router, least-squares
#          down refit (half-way toward the dense model's stream), the preset's fraction spread
#          over layers by sensitivity.
RECIPES: dict[str, dict] = {
    "paper": dict(features="markers", kmeans_iters=1, router="analytical", refit="none", allocation="uniform",
                  refit_stream=0.0),
    "plus": dict(features="contrib", kmeans_iters=0, router="linear", refit="down", allocation="sensitivity",
                 refit_stream=0.5),
}
DEFAULT_RECIPE = "plus"  # measured better (docs/benchmarks/quality.md); "paper" reproduces the paper
FEATURES = ("markers", "contrib")
REFITS = ("none", "down")
ALLOCATIONS = ("uniform", "sensitivity")


@dataclass(frozen=True)
class CMoEConfig:
    """How to carve each FFN.

    ``shared`` of ``experts`` equal groups of neurons form the always-on shared expert;
    ``active`` of the other ``experts - shared`` routed experts are chosen per token.

    ``recipe`` ("paper" or "plus", see ``RECIPES``) fills every algorithm field left at None:
    ``features`` ("markers": the paper's binary ATopK columns; "contrib": per-token output
    contribution of each neuron), ``kmeans_iters`` (0: until the assignment stops changing),
    ``router`` ("analytical" or "linear": ridge-fitted to the experts' output norms),
    ``refit`` ("none" or "down": least-squares down projections for the neurons each calibration
    token uses under the routing, ``cmoe.refit``); ``refit_stream`` (in [0, 1]): how far the
    refit's target moves from the dense FFN's output toward the dense model's next hidden state.
    ``allocation`` ("uniform": every layer S{s}A{a}E{e}; "sensitivity": the model-wide fraction
    ``budget``, by default (s + a) / e, spread over the layers by measured sensitivity, see
    ``cmoe.allocation``); ``budget``: that activated fraction of all FFN neurons of the model
    (setting it implies allocation "sensitivity");
    ``min_active``/``max_active`` bound each layer's activated fraction under a budget.
    """

    shared: int = 3
    active: int = 3
    experts: int = 8
    k_act: int = 10  # K_a of the ATopK markers
    calib_samples: int = 8
    calib_seqlen: int = 2048
    kmeans_iters: int | None = None  # 0: iterate until the assignment stops changing
    seed: int = 0
    router: str | None = None
    recipe: str = DEFAULT_RECIPE
    features: str | None = None
    refit: str | None = None
    allocation: str | None = None
    ridge: float = 1e-2  # linear router: ridge strength relative to the mean diagonal of x^T x
    cluster_tokens: int = 4096  # "contrib" features: calibration tokens (evenly strided) used for the partition
    fit_tokens: int = 16384  # calibration tokens (evenly strided) for the router fit, the refit and the agreement statistic
    refit_ridge: float = 0.6  # refit="down": ridge strength relative to the mean diagonal of the masked activations' Gram
    refit_stream: float | None = None  # refit="down": weight of the dense model's stream in the target (cmoe.refit)
    budget: float | None = None
    min_active: float = 0.125
    max_active: float = 1.0

    def __post_init__(self):
        if self.recipe not in RECIPES:
            raise ConfigError(f"unknown recipe {self.recipe!r}; available: {sorted(RECIPES)}")
        if self.budget is not None and self.allocation is None:
            object.__setattr__(self, "allocation", "sensitivity")
        for key, value in RECIPES[self.recipe].items():
            if getattr(self, key) is None:
                object.__setattr__(self, key, value)
        from .moe import ROUTERS

        if self.router not in ROUTERS:
            raise ConfigError(f"unknown router {self.router!r}; available: {sorted(ROUTERS)}")
        if self.features not in FEATURES:
            raise ConfigError(f"unknown features {self.features!r}; available: {list(FEATURES)}")
        if self.allocation not in ALLOCATIONS:
            raise ConfigError(f"unknown allocation {self.allocation!r}; available: {list(ALLOCATIONS)}")
        if self.allocation == "uniform" and self.budget is not None:
            raise ConfigError(f"budget={self.budget} spreads neurons over layers: it needs allocation='sensitivity'")
        if self.refit not in REFITS:
            raise ConfigError(f"unknown refit {self.refit!r}; available: {list(REFITS)}")
        if self.refit_ridge < 0:
            raise ConfigError(f"refit_ridge={self.refit_ridge} must be >= 0")
        if not 0 <= self.refit_stream <= 1:
            raise ConfigError(f"refit_stream={self.refit_stream} must be in [0, 1] (0: fit the dense FFN's output, "
                              f"1: fit the dense model's next hidden state)")
        if self.ridge < 0 or self.cluster_tokens < 1 or self.fit_tokens < 1:
            raise ConfigError(
                f"ridge={self.ridge} must be >= 0, cluster_tokens={self.cluster_tokens} and "
                f"fit_tokens={self.fit_tokens} >= 1"
            )
        if self.budget is not None and not 0 < self.budget <= 1:
            raise ConfigError(f"budget={self.budget} must be an activated fraction in (0, 1]")
        if not 0 < self.min_active <= self.max_active <= 1:
            raise ConfigError(f"need 0 < min_active={self.min_active} <= max_active={self.max_active} <= 1")
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
        if self.kmeans_iters < 0:
            raise ConfigError(f"kmeans_iters must be >= 1, or 0 (to convergence), got {self.kmeans_iters}")

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
        """The model-wide activated fraction of FFN neurons: the budget, or (s + a) / e."""
        return self.budget if self.budget is not None else (self.shared + self.active) / self.experts

    @property
    def label(self) -> str:
        """e.g. "S3A3E8 plus", "E8 plus budget 0.5"."""
        base = self.name if self.allocation == "uniform" else f"E{self.experts} budget {self.active_fraction:g}"
        return f"{base} {self.recipe}"

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

    @classmethod
    def from_dict(cls, d: dict) -> "CMoEConfig":
        """Inverse of ``to_dict``; keys this version does not know are ignored. A dict saved before
        recipes existed is the paper's algorithm (kmeans_iters None meant "to convergence")."""
        known = {f.name for f in fields(cls)}
        d = {k: v for k, v in d.items() if k in known}
        if "recipe" not in d:
            d["recipe"] = "paper"
            d["kmeans_iters"] = 0 if d.get("kmeans_iters", 1) is None else d.get("kmeans_iters", 1)
        return cls(**d)
