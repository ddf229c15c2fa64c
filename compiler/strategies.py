"""The bit-width search strategies by name, as an explicit table.

``assign-bit-widths{strategy=NAME}`` (``--strategy NAME``) runs ``STRATEGIES[NAME]``:
a function ``(SearchContext, start BitConfig) -> BitConfig``.

* ``threshold``, ``min-influence``, ``influence-update``: layer influence, US 2021/0201141 A1
  (``compiler/bitsearch.py``; docs/LAYER_INFLUENCE.md);
* ``weight-diff-bsearch``, ``weight-diff-topk``: the weight-difference statistic, US 12,393,828 B2
  (``compiler/weight_diff.py``; docs/WEIGHT_DIFFERENCE.md).
"""
from __future__ import annotations

from typing import Callable

from ..core.errors import OptionError
from .bitsearch import INFLUENCE_STRATEGIES, SearchContext, influence_update, min_influence, threshold
from .quant import BitConfig
from .weight_diff import weight_diff_bsearch, weight_diff_topk

Strategy = Callable[[SearchContext, BitConfig], BitConfig]

STRATEGIES: dict[str, Strategy] = {
    "threshold": threshold,
    "min-influence": min_influence,
    "influence-update": influence_update,
    "weight-diff-bsearch": weight_diff_bsearch,
    "weight-diff-topk": weight_diff_topk,
}
assert set(INFLUENCE_STRATEGIES) <= set(STRATEGIES)


def get_strategy(name: str) -> Strategy:
    if name not in STRATEGIES:
        raise OptionError(f"unknown strategy {name!r}; choose one of {', '.join(sorted(STRATEGIES))}")
    return STRATEGIES[name]
