"""`LoraSpec`: which weights get adapters, at what rank and loudness, and how they start."""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax.numpy as jnp

from lora_jax.errors import LoraError

_SCALINGS = ("standard", "rslora")
_INITS = ("kaiming", "gaussian", "pissa", "pissa_niter_K", "olora")
_NITER = re.compile(r"pissa_niter_(\d+)")


def pissa_niter(init: str) -> int | None:
    """K of "pissa_niter_K" (randomised SVD with K subspace iterations); None for other inits."""
    match = _NITER.fullmatch(init)
    return None if match is None else int(match.group(1))


def changes_base(init: str) -> bool:
    """Whether `init` starts from W's own structure (PiSSA, OLoRA), so the adapters belong on the
    residual base W − s·A₀·B₀ (lora_jax.variants.pissa) rather than on W."""
    return init in ("pissa", "olora") or pissa_niter(init) is not None


def known_init(init: object) -> bool:
    return isinstance(init, str) and (init in ("kaiming", "gaussian") or changes_base(init))


@dataclasses.dataclass(frozen=True)
class LoraSpec:
    """What to adapt and how.

    targets: regex (or list of regexes) matched with re.fullmatch against "/"-joined param paths.
    rank, alpha: default rank r and loudness α; the branch is scaled by α/r ("standard") or
      α/√r ("rslora", which keeps the update's size stable as r grows).
    init: A is "kaiming"-uniform (PEFT's default) or "gaussian" N(0, 1/r) and B starts at 0, so
      the adapted model equals the base at init. "pissa" (top-r SVD of W), "pissa_niter_K"
      (randomised SVD, K subspace iterations) and "olora" (QR of W) take A, B from W itself and
      need the residual base `lora_jax.residual_base(params, adapters)` (lora_jax/variants/pissa.py).
    dropout: dropout rate on the LoRA branch's input (only with an rng and deterministic=False).
    dtype: dtype of A and B.
    rank_pattern / alpha_pattern: {path regex: rank or alpha} overrides; the first match wins.
    dora: DoRA (lora_jax/variants/dora.py): each adapter also trains a magnitude m, started at
      W's norm over its input axes, and the adapted weight is m/‖W + ΔW‖ · (W + ΔW).
    """

    targets: str | Sequence[str]
    rank: int = 8
    alpha: float = 8.0
    scaling: str = "standard"
    init: str = "kaiming"
    dropout: float = 0.0
    dtype: Any = jnp.float32
    rank_pattern: Mapping[str, int] = dataclasses.field(default_factory=dict)
    alpha_pattern: Mapping[str, float] = dataclasses.field(default_factory=dict)
    dora: bool = False

    def __post_init__(self):
        if isinstance(self.targets, str):
            object.__setattr__(self, "targets", (self.targets,))
        object.__setattr__(self, "targets", tuple(self.targets))
        object.__setattr__(self, "rank_pattern", dict(self.rank_pattern))
        object.__setattr__(self, "alpha_pattern", dict(self.alpha_pattern))
        if not self.targets:
            raise LoraError("LoraSpec.targets is empty; expected a regex or a list of regexes")
        for pattern in (*self.targets, *self.rank_pattern, *self.alpha_pattern):
            try:
                re.compile(pattern)
            except re.error as e:
                raise LoraError(f"target pattern {pattern!r} is not a valid regex: {e}") from None
        _check_rank(self.rank, "rank")
        _check_alpha(self.alpha, "alpha")
        for pattern, r in self.rank_pattern.items():
            _check_rank(r, f"rank_pattern[{pattern!r}]")
        for pattern, a in self.alpha_pattern.items():
            _check_alpha(a, f"alpha_pattern[{pattern!r}]")
        if self.scaling not in _SCALINGS:
            raise LoraError(f"scaling={self.scaling!r}; expected one of {_SCALINGS}")
        if not known_init(self.init):
            raise LoraError(f"init={self.init!r}; expected one of {_INITS}")
        if not 0.0 <= self.dropout < 1.0:
            raise LoraError(f"dropout={self.dropout}; expected 0 <= dropout < 1")
        if not isinstance(self.dora, bool):
            raise LoraError(f"dora={self.dora!r}; expected True or False")
        if self.dora and changes_base(self.init):
            raise LoraError(f"init={self.init!r} with dora=True is not supported: DoRA's magnitude would "
                            "be taken from W, not from the residual W − s·A₀·B₀ the adapters start on")

    def matches(self, path: str) -> bool:
        return any(re.fullmatch(t, path) for t in self.targets)

    def rank_for(self, path: str) -> int:
        return _first_match(self.rank_pattern, path, self.rank)

    def alpha_for(self, path: str) -> float:
        return _first_match(self.alpha_pattern, path, self.alpha)

    def scale_for(self, path: str) -> float:
        r, alpha = self.rank_for(path), self.alpha_for(path)
        return alpha / (math.sqrt(r) if self.scaling == "rslora" else r)

    def select(self, paths: Sequence[str]) -> list[str]:
        """The targeted paths; refuses targets or patterns that match none of `paths`."""
        chosen = [p for p in paths if self.matches(p)]
        for t in self.targets:
            if not any(re.fullmatch(t, p) for p in paths):
                raise LoraError(f"target {t!r} matches no parameter; closest paths: {_closest(t, paths)}")
        for name, patterns in (("rank_pattern", self.rank_pattern), ("alpha_pattern", self.alpha_pattern)):
            for pat in patterns:
                if not any(re.fullmatch(pat, p) for p in chosen):
                    raise LoraError(
                        f"{name} key {pat!r} matches no targeted parameter; "
                        f"targeted: {_closest(pat, chosen)}"
                    )
        return chosen


def _check_rank(r: Any, what: str) -> None:
    if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
        raise LoraError(f"{what}={r!r}; expected a positive integer")


def _check_alpha(a: Any, what: str) -> None:
    if not isinstance(a, (int, float)) or isinstance(a, bool) or not a > 0:
        raise LoraError(f"{what}={a!r}; expected a number > 0")


def _first_match(patterns: Mapping[str, Any], path: str, default: Any) -> Any:
    for pat, value in patterns.items():
        if re.fullmatch(pat, path):
            return value
    return default


def _closest(pattern: str, paths: Sequence[str], n: int = 3) -> str:
    plain = re.sub(r"[.*+?^$()\[\]{}|\\]", "", pattern)
    close = difflib.get_close_matches(plain, list(paths), n=n, cutoff=0.0)
    return ", ".join(close) if close else "(no parameters)"
