"""The calibration-method table and the one factory every caller uses, `create_calibrator`.

A *calibration method* turns an encoder's images and queries into named vector sets (``raw``
plus the method's own, e.g. ``calibrated``) and re-scores the top-K candidates of a search from
them. The training-free CalibCLIP (CVE + DCC + top-K fusion, `Calibrator`) is registered as
``calibclip`` (the default); a trained re-ranker registers beside it with `register_calibration_method`.

The indexer, `Index.calibrator`, the evaluation runner, the web app, ``calibclip explain`` and
`CalibCLIP` all build their calibrator through `create_calibrator`, so they agree on the
settings (the encoder's packaged defaults unless told otherwise).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from calibclip.calibration.config import CalibrationConfig

if TYPE_CHECKING:  # torch stays unloaded until a calibrator is built (the CLI reads the table at start-up)
    import numpy as np
    import torch

    from calibclip.models.base import Encoder, TextBatch

#: Name of the default method (recorded nowhere, so indexes built before the table stay valid).
DEFAULT_METHOD = "calibclip"


@runtime_checkable
class CalibrationMethod(Protocol):
    """What indexing, evaluation, search and the web app need of a calibrator.

    Attributes:
        encoder: the encoder it calibrates.
        config: its `CalibrationConfig` (``top_k`` is the re-ranking depth searches fetch).
    """

    encoder: Encoder
    config: CalibrationConfig

    def config_id(self, part: str = "features") -> str:
        """Stable id of the method, encoder and settings (cache and index keys)."""
        ...

    def image_features(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        """``{"raw": [B, D], "calibrated": [B, D]}`` of preprocessed images."""
        ...

    def text_features(self, text: TextBatch | list[str]) -> dict[str, torch.Tensor]:
        """``{"raw": [B, D], "calibrated": [B, D]}`` of queries."""
        ...

    def fuse(self, sim_raw: torch.Tensor | np.ndarray, sim_cal: torch.Tensor | np.ndarray) -> torch.Tensor:
        """Re-scored ``[Q, G]`` (or ``[Q, K]`` candidates) from raw and calibrated cosine similarities."""
        ...

    def scores(self, queries: dict[str, torch.Tensor], gallery: dict[str, torch.Tensor]) -> torch.Tensor:
        """Re-scored ``[Q, G]`` of every query against the whole gallery from the vector sets."""
        ...

    def rerank(
        self, queries: Mapping[str, torch.Tensor], gallery: Mapping[str, torch.Tensor], candidates: torch.Tensor
    ) -> torch.Tensor:
        """Scores ``[Q, K]`` of each query's ``candidates`` (gallery rows ``[Q, K]``) from the
        query and gallery vector sets; a trained re-ranker implements this from the features."""
        ...


#: ``factory(encoder, config, **options) -> CalibrationMethod`` (options: the method's own arguments,
#: e.g. a trained method's checkpoint).
MethodFactory = Callable[..., CalibrationMethod]


@dataclass(frozen=True)
class MethodSpec:
    """One calibration method of the table.

    Attributes:
        name: the method's name (``--calibration-method NAME``).
        factory: ``factory(encoder, config, **options)`` returning a `CalibrationMethod`.
        description: one line for listings and ``--help``.
        trained: whether it needs trained weights (False: training-free).
    """

    name: str
    factory: MethodFactory
    description: str = ""
    trained: bool = False


_METHODS: dict[str, MethodSpec] = {}


def register_calibration_method(
    name: str,
    factory: MethodFactory | None = None,
    *,
    description: str = "",
    trained: bool = False,
    replace: bool = False,
) -> Any:
    """Register a calibration method; usable as a call or as a class/function decorator.

    Args:
        name: the method's name.
        factory: ``factory(encoder, config, **options) -> CalibrationMethod`` (a class works); omit to
            decorate.
        description: one line for listings.
        trained: whether the method needs trained weights.
        replace: allow replacing an existing registration.

    Returns:
        The `MethodSpec`, or (as a decorator) the factory unchanged.

    Raises:
        ValueError: the name is taken (and not ``replace``).
    """

    def add(fn: MethodFactory) -> MethodSpec:
        if name in _METHODS and not replace:
            raise ValueError(f"calibration method {name!r} is already registered; pass replace=True to override")
        spec = MethodSpec(name, fn, description, trained)
        _METHODS[name] = spec
        return spec

    if factory is None:

        def decorator(fn: MethodFactory) -> MethodFactory:
            add(fn)
            return fn

        return decorator
    return add(factory)


def unregister_calibration_method(name: str) -> None:
    """Remove a registered method (tests, plugins); the default cannot be removed.

    Raises:
        ValueError: unknown name, or the default method.
    """
    if name == DEFAULT_METHOD:
        raise ValueError(f"the default calibration method {DEFAULT_METHOD!r} cannot be unregistered")
    get_calibration_method(name)
    del _METHODS[name]


def get_calibration_method(name: str) -> MethodSpec:
    """The `MethodSpec` of ``name``.

    Raises:
        ValueError: unknown name (the message lists the registered ones).
    """
    if name not in _METHODS:
        raise ValueError(f"unknown calibration method {name!r}; registered: {calibration_methods()}")
    return _METHODS[name]


def calibration_methods() -> list[str]:
    """Registered method names, the default first."""
    return [DEFAULT_METHOD, *sorted(n for n in _METHODS if n != DEFAULT_METHOD)]


def create_calibrator(
    encoder: Encoder,
    method: str | None = None,
    config: CalibrationConfig | None = None,
    settings: Mapping[str, Any] | None = None,
    recorded: Mapping[str, Any] | None = None,
    options: Mapping[str, Any] | None = None,
) -> CalibrationMethod:
    """Build the calibrator of ``encoder``: the one place calibrators are constructed.

    The settings are, in order of precedence: ``recorded`` (what an index stored, used as is),
    else ``config`` with ``settings`` over it, else the encoder's packaged defaults
    (`CalibrationConfig.default_for`) with ``settings`` over them.

    Args:
        encoder: the encoder to calibrate.
        method: a registered method name (default ``calibclip``, or the recorded one).
        config: a full `CalibrationConfig` to start from instead of the encoder's defaults.
        settings: `CalibrationConfig` field overrides (a config's ``calibration:`` section).
        recorded: an index's recorded calibration (``{"config": {...}, "method": ...}``).
        options: the method's own keyword arguments (e.g. ``{"checkpoint": path}`` for a trained
            method); the default method takes none.

    Returns:
        The method's calibrator (a `CalibrationMethod`; for ``calibclip`` a `Calibrator`).

    Raises:
        ValueError: unknown method or invalid settings (the message names them).
    """
    if recorded is not None:
        method = method or recorded.get("method")
        cfg = CalibrationConfig.from_dict(recorded.get("config"))
    else:
        base = config if config is not None else CalibrationConfig.default_for(encoder.name)
        cfg = CalibrationConfig.from_dict(settings or {}, base=base)
    return get_calibration_method(method or DEFAULT_METHOD).factory(encoder, cfg, **dict(options or {}))


def method_record(calibrator: CalibrationMethod, method: str | None = None) -> dict[str, Any]:
    """What an index records about its calibrator: ``config``, ``config_id`` and, for a
    non-default method, ``method``."""
    record: dict[str, Any] = {"config": calibrator.config.to_dict(), "config_id": calibrator.config_id()}
    if method and method != DEFAULT_METHOD:
        record["method"] = method
    return record


def _calibclip(encoder: Encoder, config: CalibrationConfig) -> CalibrationMethod:
    from calibclip.calibration.calibrator import Calibrator

    return Calibrator(encoder, config)


register_calibration_method(
    DEFAULT_METHOD,
    _calibclip,
    description="CalibCLIP, training-free: Contrastive Visual Enhancer + Discriminative Concept Calibrator, "
    "top-K fusion of raw and calibrated similarities",
)
