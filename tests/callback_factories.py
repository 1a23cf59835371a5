"""One small factory per exported callback class, for the set-up, DDP, resume and compile matrices.

The matrices build their callbacks from ``lightning_interp.callbacks.__all__`` through
:func:`make_callbacks`, so a newly exported callback is covered as soon as it has a factory here,
and ``tests/test_setups.py::test_every_exported_callback_has_a_factory`` fails until it has one.
Factories are sized for ``SimpleCNN(width=(4, 8, 8))`` on 16 x 16 shapes (``model.relu2``/``relu3``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from lightning.pytorch.callbacks import Callback

import lightning_interp.callbacks as callbacks_module
from lightning_interp.callbacks import (
    AnomalyFilterMonitor,
    AttentionGuidance,
    FeatureQuantityMonitor,
    FilterMasking,
    InterpCallback,
    LearningImageLogger,
    PruneFlaggedFilters,
    SampleDynamicsMonitor,
    TIPMonitor,
)

#: Exported base classes that are not used on their own.
ABSTRACT: set[type] = {InterpCallback}

Made = dict[type, Callback]
Factory = Callable[[Made, dict[str, Any]], Callback]


def _anomaly(made: Made, kw: dict[str, Any]) -> Callback:
    return AnomalyFilterMonitor(**{"layers": "model.relu3", "probe_size": 32, "k_max": 3, "num_outlier_images": 2, **kw})


#: Built in this order; later factories may use earlier callbacks (``made[AnomalyFilterMonitor]``).
FACTORIES: dict[type, Factory] = {
    AnomalyFilterMonitor: _anomaly,
    LearningImageLogger: lambda made, kw: LearningImageLogger(
        **{"layers": "model.relu2", "probe_size": 8, "num_images": 2, **kw}),
    TIPMonitor: lambda made, kw: TIPMonitor(
        **{"layers": "model.relu3", "probe_size": 8, "aipc_fractions": [0.5], "top_filters": 1, **kw}),
    FeatureQuantityMonitor: lambda made, kw: FeatureQuantityMonitor(
        **{"layers": "model.relu3", "probe_size": 4, "top_neurons": 2, "num_diverse": 2, **kw}),
    AttentionGuidance: lambda made, kw: AttentionGuidance(
        **{"layer": "model.relu3", "weights": {"attention_supervision": 1.0, "rrr": 0.1}, "probe_size": 8, **kw}),
    FilterMasking: lambda made, kw: FilterMasking(**{"monitor": made[AnomalyFilterMonitor], "start_epoch": 1, **kw}),
    PruneFlaggedFilters: lambda made, kw: PruneFlaggedFilters(**{"monitor": made[AnomalyFilterMonitor], **kw}),
    SampleDynamicsMonitor: lambda made, kw: SampleDynamicsMonitor(**{"track_size": 24, "num_images": 2, **kw}),
}


def _report_factory() -> dict[type, Factory]:
    # InterpReport is new; imported by name so this file works before and after it is exported.
    cls = getattr(callbacks_module, "InterpReport", None)
    return {} if cls is None else {cls: lambda made, kw: cls(**kw)}


FACTORIES.update(_report_factory())


def exported_callback_classes() -> list[type]:
    """Every concrete Callback class in ``lightning_interp.callbacks.__all__``."""
    out = []
    for name in callbacks_module.__all__:
        obj = getattr(callbacks_module, name)
        if isinstance(obj, type) and issubclass(obj, Callback) and obj not in ABSTRACT:
            out.append(obj)
    return out


def make_callbacks(options: dict[type, dict[str, Any]] | None = None) -> dict[type, Callback]:
    """One instance of every exported callback class, ``options[cls]`` overriding its factory's arguments.

    Raises:
        KeyError: an exported callback class has no factory here.
    """
    options = options or {}
    exported = exported_callback_classes()
    missing = [cls.__name__ for cls in exported if cls not in FACTORIES]
    if missing:
        raise KeyError(f"no factory in tests/callback_factories.py for exported callbacks {missing}")
    made: Made = {}
    for cls, factory in FACTORIES.items():
        if cls in exported:
            made[cls] = factory(made, dict(options.get(cls, {})))
    return made
