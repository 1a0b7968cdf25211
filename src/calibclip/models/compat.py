"""The CalibCLIP reference repository (kane2kang/CalibCLIP) compatibility layer: code written for it
runs after changing only the install. Its names are thin aliases over calibclip's own implementations,
each in the room of the package it mirrors and re-exported where the reference has it:

- `calibclip.data.compat` -> ``calibclip.datasets``: ``SimpleTokenizer``, ``tokenize``,
  ``build_transforms``, ``TrainTransforms``, ``TestTransforms``, ``BaseRetrievalDataset``,
  ``CUHKPEDESDataset``, ``ICFGPEDESDataset``, ``RSTPDataset``, ``DATASET_REGISTRY``, ``build_dataset``
  (``build_dataloader`` accepts the reference's keywords as well).
- `calibclip.evaluation.compat` -> ``calibclip.evaluation``: ``compute_rank``, ``compute_ap``,
  ``compute_map``, ``compute_minp``, ``compute_minp_all``, ``compute_metrics``, ``compute_similarity``,
  ``RetrievalEngine`` (``Evaluator`` accepts the reference's metrics-only form as well).
- ``calibclip.models``: ``CalibCLIP`` and ``build_calibclip`` (resolved lazily from
  `calibclip.calibration`; ``build_calibclip`` accepts the reference's keywords as well).

Where the reference's name has no meaningful counterpart (its trainable ``ContrastiveVisualEnhancer``
/ ``DiscriminativeConceptCalibrator`` modules and its ``VisionEncoder`` / ``TextEncoder``), accessing it
raises an AttributeError that says what to use instead (`UNSUPPORTED`, this module). See docs/compat.md.
"""

from __future__ import annotations

#: Reference names calibclip deliberately does not provide, with what to use instead.
UNSUPPORTED = {
    "ContrastiveVisualEnhancer": (
        "the reference's CVE is a trainable nn.Module with randomly initialised layers; calibclip's CVE is "
        "training-free: use calibclip.calibration.Calibrator(encoder).image_features(pixels) (or "
        "calibclip.calibration.cve.enhance on an encoder's image_tokens)"
    ),
    "DiscriminativeConceptCalibrator": (
        "the reference's DCC is a trainable nn.Module; calibclip's DCC is training-free: use "
        "calibclip.calibration.Calibrator(encoder).text_features(texts) (or calibclip.calibration.dcc)"
    ),
    "VisionEncoder": (
        "calibclip's encoders are whole dual encoders: use calibclip.create_model(name_or_path) and its "
        "encode_image / image_tokens"
    ),
    "TextEncoder": (
        "calibclip's encoders are whole dual encoders: use calibclip.create_model(name_or_path) and its "
        "encode_text / text_tokens"
    ),
}


def unsupported(module: str, name: str) -> AttributeError:
    """The AttributeError raised for a reference name calibclip does not provide.

    Args:
        module: The module the name was looked up in, e.g. ``"calibclip.models"``.
        name: The missing attribute.

    Returns:
        An AttributeError naming the replacement when ``name`` is in `UNSUPPORTED`, else the usual message.
    """
    if name in UNSUPPORTED:
        return AttributeError(f"module {module!r} has no attribute {name!r}: {UNSUPPORTED[name]}")
    return AttributeError(f"module {module!r} has no attribute {name!r}")
