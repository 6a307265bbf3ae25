"""What to compress and how: `TuckerConfig`, read from code, the environment or a model's plans.json.

Sources are partial mappings of config fields. `resolve_config` merges them, later sources
overriding earlier ones, so callers pass them lowest precedence first:
plans.json ``"tucker"`` field < ``TUCKER_*`` environment variables < command-line flags.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

from .errors import TuckerConfigError  # raised here; importable from here as before

POLICIES = ("profiled", "auto", "paper")
BACKENDS = ("auto", "torch", "openvino")
NO_CALIBRATION = "none"  # the `calibration` value that asks for the fit to the weights alone


@dataclass(frozen=True)
class _Field:
    env: str
    parse: Callable[[str], Any]
    check: Callable[[Any], bool]
    allowed: str


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _parse_patterns(text: str) -> tuple[str, ...]:
    return tuple(p.strip() for p in text.split(",") if p.strip())


_FIELDS: dict[str, _Field] = {
    "rank_ratio": _Field(
        "TUCKER_RANK_RATIO", float, lambda v: _is_number(v) and 0 < v <= 1, "a number in (0, 1]"
    ),
    "mac_budget": _Field(
        "TUCKER_MAC_BUDGET", float, lambda v: _is_number(v) and 0 < v <= 1,
        "a number in (0, 1]: the share of the original multiply-accumulates to keep",
    ),
    "policy": _Field(
        "TUCKER_POLICY", str, lambda v: v in POLICIES, "one of " + ", ".join(repr(p) for p in POLICIES)
    ),
    "rank_min": _Field("TUCKER_RANK_MIN", int, lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "rank_multiple": _Field(
        "TUCKER_RANK_MULTIPLE", int, lambda v: _is_int(v) and v >= 1, "an integer >= 1"
    ),
    "hooi_iterations": _Field(
        "TUCKER_HOOI_ITERATIONS", int, lambda v: _is_int(v) and v >= 0, "an integer >= 0"
    ),
    "exclude": _Field(
        "TUCKER_EXCLUDE",
        _parse_patterns,
        lambda v: isinstance(v, tuple) and all(isinstance(p, str) and p for p in v),
        "a list of module-name patterns (fnmatch), comma-separated in the environment",
    ),
    "calibration": _Field(
        "TUCKER_CALIBRATION", str, lambda v: isinstance(v, str) and v.strip() != "",
        f"a folder of images in the model's input format (CASE_0000.nii.gz, ...) or {NO_CALIBRATION!r}",
    ),
    "calibration_patches": _Field(
        "TUCKER_CALIBRATION_PATCHES", int, lambda v: _is_int(v) and v >= 1, "an integer >= 1"
    ),
    "min_agreement": _Field(
        "TUCKER_MIN_AGREEMENT", float, lambda v: _is_number(v) and 0 < v <= 1,
        "a number in (0, 1]: the lowest Dice of any class against the original's segmentation on held-out tiles",
    ),
    "backend": _Field(
        "TUCKER_BACKEND", str, lambda v: v in BACKENDS,
        "one of " + ", ".join(repr(b) for b in BACKENDS) + " (openvino: pip install 'nnunet-tucker[openvino]')",
    ),
}
_OPTIONAL = {"rank_ratio", "mac_budget", "calibration", "calibration_patches", "min_agreement"}
# Where a floor on the agreement is missed, the targets tried instead: the larger of these shares (of ranks, or of
# MACs); after the last, the original network. The last is every rank kept: no loss in the weights, and on networks
# whose small convolutions PyTorch runs slowly, most of the speed (this package's layer forms).
LOOSER_TARGETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
FOLDER_PATCHES = 4  # calibration patches taken from a folder of images, unless asked otherwise
FIRST_CASE_PATCHES = 2  # ... from the first case of a run (each costs about a forward and a backward pass)
_TARGETS = ("rank_ratio", "mac_budget")  # exactly one says how much to compress
_RUN_SETTINGS = {"backend"}  # alone they ask for no compression (a compressed model folder takes them too)


def _checked(name: str, value: Any, where: str) -> Any:
    spec = _FIELDS[name]
    if name == "exclude" and isinstance(value, list):
        value = tuple(value)
    if value is None and name in _OPTIONAL:
        return None
    if not spec.check(value):
        raise TuckerConfigError(f"{where}={value!r} is not allowed: it must be {spec.allowed}")
    return value


@dataclass(frozen=True)
class TuckerConfig:
    """How to Tucker-compress a network.

    rank_ratio: share of each channel mode kept, R = min(C, max(rank_min, ceil(C * rank_ratio))).
    mac_budget: instead of a ratio, the share of the original multiply-accumulates to keep; ranks
        are allocated per layer to lose the least (estimated from calibration data if given).
    policy: ``"paper"`` decomposes every convolution but the 1x1 ones, as in the published method;
        ``"auto"`` also leaves layers as they are where decomposition cannot pay off (single-channel
        stems, full ranks, no multiply-accumulates saved); ``"profiled"`` (default) times every layer
        the published rule would decompose, on the device, against its original and keeps the
        faster form (ranks rounded up to a multiple of 4, 8 or 16, `plan.ALIGNMENTS`, where that costs
        no time); where the input shape is not known it follows the ``auto`` rules.
    rank_min: lower bound of every rank.
    rank_multiple: ranks are rounded up to a multiple of this (hardware alignment, e.g. 8).
    hooi_iterations: HOOI refinement steps after the HOSVD start (0 = plain HOSVD).
    exclude: fnmatch patterns of module names to leave as they are.
    calibration: what the factors are fitted to keep, the network's prediction on data rather than
        the weights (see README): None (default) calibrates on the first image a prediction run
        segments; a folder of unlabelled images in the model's input format calibrates on those;
        ``"none"`` fits the weights alone (quality unverified).
    calibration_patches: network-input patches taken from the calibration images; None (default):
        `FOLDER_PATCHES` from a folder, `FIRST_CASE_PATCHES` from the first case.
    min_agreement: a floor on the measured agreement with the original (the lowest per-class Dice on held-out
        tiles: of the first case, or of the case a calibration folder keeps apart): the rank ratio or MAC budget is
        then a starting point: the least loosened target (`looser`) whose agreement reaches it for every class is kept,
        else the original network.
        None (default): no floor.
    backend: what runs the compressed network: ``"torch"`` (this package's PyTorch forms), ``"openvino"`` (the
        network compiled by OpenVINO, on CPUs; the ``[openvino]`` extra), or ``"auto"`` (default): OpenVINO where it
        is installed, the device is a CPU and it measured faster for this network here (`backend`). Not part of
        what is fitted: every backend runs the same compressed weights.
    """

    rank_ratio: float | None = None
    mac_budget: float | None = None
    policy: str = "profiled"
    rank_min: int = 8
    rank_multiple: int = 1
    hooi_iterations: int = 0
    exclude: tuple[str, ...] = ()
    calibration: str | None = None
    calibration_patches: int | None = None
    min_agreement: float | None = None
    backend: str = "auto"

    def __post_init__(self) -> None:
        for f in fields(self):
            object.__setattr__(self, f.name, _checked(f.name, getattr(self, f.name), f.name))
        given = [name for name in _TARGETS if getattr(self, name) is not None]
        if len(given) != 1:
            raise TuckerConfigError(
                "give exactly one of rank_ratio and mac_budget (TUCKER_RANK_RATIO / TUCKER_MAC_BUDGET, "
                f"-tucker_rank_ratio / -tucker_mac_budget); got {given or 'neither'}"
            )
        if self.min_agreement is not None and self.weights_only:
            raise TuckerConfigError(
                f"min_agreement={self.min_agreement} is measured on images the fit did not see, so it needs "
                f"calibration: leave it unset (the first case a prediction segments) or give a folder of two or more "
                f"cases (TUCKER_CALIBRATION, --calibration), not {NO_CALIBRATION!r}"
            )

    def describe(self) -> str:
        """A short summary such as ``rank_ratio=0.5 policy=auto`` or ``mac_budget=0.2 calibrated``."""
        target = f"rank_ratio={self.rank_ratio}" if self.rank_ratio is not None else f"mac_budget={self.mac_budget}"
        floor = f" min_agreement={self.min_agreement}" if self.min_agreement is not None else ""
        return f"{target} policy={self.policy}{floor}"

    def looser(self) -> list[TuckerConfig]:
        """The same config with each larger rank ratio or MAC budget of `LOOSER_TARGETS`, smallest first (empty
        above the last: only the original network is looser)."""
        target = "rank_ratio" if self.rank_ratio is not None else "mac_budget"
        return [replace(self, **{target: t}) for t in LOOSER_TARGETS if t > getattr(self, target) + 1e-9]

    def patches(self, first_case: bool) -> int:
        """How many calibration patches to take, from the first case or from a folder."""
        default = FIRST_CASE_PATCHES if first_case else FOLDER_PATCHES
        return self.calibration_patches if self.calibration_patches is not None else default

    @property
    def weights_only(self) -> bool:
        """Whether the factors are fitted to the weights alone (``calibration="none"``)."""
        return self.calibration == NO_CALIBRATION

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of every field (``TuckerConfig(**d)`` rebuilds it)."""
        d = asdict(self)
        d["exclude"] = list(self.exclude)
        return d

    def fitted_dict(self) -> dict[str, Any]:
        """`to_dict` without the fields that do not change the fitted weights (the backend): what keys a fit."""
        d = self.to_dict()
        del d["backend"]
        return d

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> TuckerConfig | None:
        """The config the ``TUCKER_*`` environment variables ask for, or None if they ask for none."""
        return resolve_config(read_env(environ))

    @classmethod
    def from_plans(cls, plans: Mapping[str, Any], source: str = "plans.json") -> TuckerConfig | None:
        """The config a plans dict's top-level ``"tucker"`` object asks for, or None without one."""
        return resolve_config(read_plans(plans, source))


def read_env(environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Validated config fields set by ``TUCKER_*`` environment variables (empty if none)."""
    environ = os.environ if environ is None else environ
    found = {}
    for name, spec in _FIELDS.items():
        text = environ.get(spec.env)
        if text is None or text.strip() == "":
            continue
        try:
            found[name] = _checked(name, spec.parse(text.strip()), spec.env)
        except (ValueError, TuckerConfigError):
            raise TuckerConfigError(f"{spec.env}={text!r} is not allowed: it must be {spec.allowed}") from None
    return found


def read_plans(plans: Mapping[str, Any], source: str = "plans.json") -> dict[str, Any]:
    """Validated config fields from the top-level ``"tucker"`` object of a plans dict (empty if absent)."""
    section = plans.get("tucker")
    if section is None:
        return {}
    if not isinstance(section, Mapping):
        raise TuckerConfigError(
            f"{source}: 'tucker' must be an object like {{\"rank_ratio\": 0.5}}, not {section!r}"
        )
    unknown = sorted(set(section) - set(_FIELDS))
    if unknown:
        raise TuckerConfigError(
            f"{source}: unknown key(s) {unknown} in 'tucker'; allowed keys: {sorted(_FIELDS)}"
        )
    return {k: _checked(k, v, f"{source} 'tucker.{k}'") for k, v in section.items()}


def resolve_config(*sources: Mapping[str, Any]) -> TuckerConfig | None:
    """Merge partial configs, later ones winning field by field; None when no source asks for anything but how to
    run a compressed model (the backend)."""
    merged: dict[str, Any] = {}
    for source in sources:
        given = {k: v for k, v in source.items() if v is not None}
        if not all(t in given for t in _TARGETS) and any(t in given for t in _TARGETS):
            for target in _TARGETS:  # a ratio here overrides a budget from a weaker source, and back
                merged.pop(target, None)
        merged.update(given)
    if not set(merged) - _RUN_SETTINGS:  # how to run a compressed model, where one is loaded: no request
        return None
    if not any(t in merged for t in _TARGETS):
        raise TuckerConfigError(
            f"compression settings {sorted(merged)} were given without saying how much to compress: set "
            "TUCKER_RANK_RATIO or TUCKER_MAC_BUDGET, the plans.json field 'tucker.rank_ratio' or "
            "'tucker.mac_budget', or -tucker_rank_ratio / -tucker_mac_budget"
        )
    return TuckerConfig(**merged)


def default_cache_dir() -> Path:
    """``$TUCKER_CACHE_DIR``, else ``$XDG_CACHE_HOME/nnunet_tucker``, else ``~/.cache/nnunet_tucker``."""
    if os.environ.get("TUCKER_CACHE_DIR"):
        return Path(os.environ["TUCKER_CACHE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "nnunet_tucker"


def creation_problem(path: Path) -> str | None:
    """Why a file or folder cannot be created at `path` (a file in the way, no write permission), or None."""
    existing = next(p for p in (path, *path.parents) if p.exists())
    if existing != path and not existing.is_dir():
        return f"{existing} is a file, not a folder"
    parent = path.parent if path.parent.exists() else existing
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"{parent} is not writable"
    return None


def report_path(environ: Mapping[str, str] | None = None) -> Path | None:
    """The file ``$TUCKER_REPORT`` names, checked to be writable, or None when the variable is not set."""
    text = (os.environ if environ is None else environ).get("TUCKER_REPORT", "").strip()
    if not text:
        return None
    path = Path(text).expanduser().absolute()
    problem = f"{path} is a folder" if path.is_dir() else creation_problem(path)
    if problem:
        raise TuckerConfigError(f"TUCKER_REPORT={text!r} is not allowed: {problem}; it must name a JSON file to write")
    return path


def env_variables() -> dict[str, str]:
    """Config field name -> environment variable that sets it (for documentation and CLIs)."""
    return {name: spec.env for name, spec in _FIELDS.items()}


def check_field(name: str, value: Any, where: str) -> Any:
    """`value` for field `name` if allowed, else a `TuckerConfigError` naming `where` (a flag, a key)."""
    return _checked(name, value, where)
