"""Step 5, account: what a compression changed, parameters and multiply-accumulates per layer and in
total, as a `CompressionReport` (one stderr line, JSON, a table)."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from .counting import Measurement

if TYPE_CHECKING:
    from .config import TuckerConfig
    from .plan import LayerPlan


@dataclass(frozen=True)
class LayerRecord:
    """One convolution: its shape, its ranks (None if kept) and what it costs before and after."""

    name: str
    kind: str
    in_channels: int
    out_channels: int
    kernel_size: tuple[int, ...]
    stride: tuple[int, ...]
    ranks: tuple[int, int] | None
    reason: str
    params_before: int
    params_after: int
    macs_before: int | None
    macs_after: int | None
    relative_error: float | None
    in_residual_block: bool = False  # inside a residual block (e.g. ResEnc's BasicBlockD: conv1, conv2, skip)


def _macs_of(aliases: Sequence[str], measured: Measurement) -> int | None:
    """A layer's MACs; 0 for a layer the forward pass does not run (e.g. deep-supervision heads)."""
    if measured.macs is None:
        return None
    return next((measured.macs_by_module[a] for a in aliases if a in measured.macs_by_module), 0)


def _layer_params(layer: LayerPlan) -> tuple[int, int]:
    s, bias = layer.spec, layer.bias
    k = math.prod(s.kernel_size)
    before = s.in_channels * s.out_channels * k // s.groups + (s.out_channels if bias else 0)
    if layer.ranks is None:
        return before, before
    r_in, r_out = layer.ranks
    after = s.in_channels * r_in + r_in * r_out * k + r_out * s.out_channels + (s.out_channels if bias else 0)
    return before, after


@dataclass
class CompressionReport:
    """Per-layer records and totals of one compression; `to_json()` for machines, `to_table()` for people."""

    config: dict[str, Any]
    input_shape: tuple[int, ...] | None
    layers: list[LayerRecord]
    params_before: int
    params_after: int
    macs_before: int | None
    macs_after: int | None
    decomposition_seconds: float
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def build(
        cls,
        plan: Sequence[LayerPlan],
        errors: dict[str, float],
        before: Measurement,
        after: Measurement,
        config: TuckerConfig,
        seconds: float,
        input_shape: Sequence[int] | None = None,
        in_residual_blocks: frozenset[str] = frozenset(),
    ) -> CompressionReport:
        """`in_residual_blocks`: names of the modules inside residual blocks (a layer counts if any alias is one)."""
        records = []
        for layer in plan:
            params_before, params_after = _layer_params(layer)
            records.append(
                LayerRecord(
                    name=layer.name,
                    kind=("ConvTranspose" if layer.spec.transposed else "Conv") + f"{len(layer.spec.kernel_size)}d",
                    in_channels=layer.spec.in_channels,
                    out_channels=layer.spec.out_channels,
                    kernel_size=layer.spec.kernel_size,
                    stride=layer.spec.stride,
                    ranks=layer.ranks,
                    reason=layer.reason,
                    params_before=params_before,
                    params_after=params_after,
                    macs_before=_macs_of(layer.aliases, before),
                    macs_after=_macs_of(layer.aliases, after),
                    relative_error=errors.get(layer.name),
                    in_residual_block=any(a in in_residual_blocks for a in (layer.name, *layer.aliases)),
                )
            )
        return cls(
            config=config.to_dict(),
            input_shape=tuple(input_shape) if input_shape is not None else None,
            layers=records,
            params_before=before.params,
            params_after=after.params,
            macs_before=before.macs,
            macs_after=after.macs,
            decomposition_seconds=seconds,
        )

    @property
    def decomposed_layers(self) -> int:
        return sum(1 for layer in self.layers if layer.ranks is not None)

    def summary(self) -> str:
        """One line: ratio, policy, convolutions decomposed (and of those in residual blocks, where the network
        has any), parameters and MACs before → after."""
        from .config import TuckerConfig

        residual = [layer for layer in self.layers if layer.in_residual_block]
        text = (
            f"{TuckerConfig(**self.config).describe()}: "
            f"{self.decomposed_layers}/{len(self.layers)} convolutions decomposed, "
            + (f"{sum(1 for layer in residual if layer.ranks is not None)}/{len(residual)} in residual blocks, "
               if residual else "")
            + f"parameters {self.params_before / 1e6:.2f}M → {self.params_after / 1e6:.2f}M "
            f"({_pct(self.params_after, self.params_before)})"
        )
        if self.macs_before is not None and self.macs_after is not None:
            text += (
                f", MACs {self.macs_before / 1e9:.1f}G → {self.macs_after / 1e9:.1f}G "
                f"({_pct(self.macs_after, self.macs_before)}) per {'×'.join(map(str, self.input_shape[2:]))} patch"
            )
        return text

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["decomposed_layers"] = self.decomposed_layers
        return d

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    def to_table(self) -> str:
        """A fixed-width table of every layer, then the totals."""
        head = (
            f"{'layer':<48} {'type':<15} {'in':>4} {'out':>4} {'kernel':<8} {'stride':<8} "
            f"{'ranks':<9} {'params':>17} {'GMACs':>15} {'rel.err':>7}  note"
        )
        rows = [head, "-" * len(head)]
        for r in self.layers:
            ranks = f"{r.ranks[0]},{r.ranks[1]}" if r.ranks else "-"
            macs = (
                f"{r.macs_before / 1e9:.2f}→{r.macs_after / 1e9:.2f}"
                if r.macs_before is not None and r.macs_after is not None
                else ""
            )
            err = f"{r.relative_error:.3f}" if r.relative_error is not None else ""
            rows.append(
                f"{_shorten(r.name, 48):<48} {r.kind:<15} {r.in_channels:>4} {r.out_channels:>4} "
                f"{'x'.join(map(str, r.kernel_size)):<8} {'x'.join(map(str, r.stride)):<8} {ranks:<9} "
                f"{f'{r.params_before}→{r.params_after}':>17} {macs:>15} {err:>7}  {'' if r.ranks else r.reason}"
            )
        rows += ["-" * len(head), self.summary()]
        return "\n".join(rows)


def _pct(after: float, before: float) -> str:
    return f"{100 * after / before:.1f}%" if before else "n/a"


def _shorten(text: str, width: int) -> str:
    return text if len(text) <= width else "…" + text[-(width - 1) :]
