"""ONNX Runtime backend: any CLIP (ViT/ResNet) or starter encoder as an `Encoder` running on ONNX Runtime.

`OnnxEncoder` wraps the torch encoder it was made from (which still provides tokenisation,
preprocessing, ``config`` and ``fingerprint``) and runs every forward pass -- ``encode_image``,
``encode_text`` and the token views ``image_tokens``/``text_tokens`` used by calibration -- in
ONNX Runtime sessions. Each graph is exported once per model fingerprint, lazily on first use, to
``$CALIBCLIP_CACHE/onnx/<fingerprint>/v<FORMAT>/<graph>-<precision>.onnx`` (default cache
``~/.cache/calibclip``) with a dynamic batch axis (and a dynamic sequence axis for text) and re-used
by later runs. ``precision="int8"`` applies ONNX Runtime's dynamic int8 quantisation to the
exported fp32 graph (weights int8, activations quantised per batch).

Export uses the TorchScript-based exporter (``dynamo=False``, opset 17): the torch.export-based
default of torch >= 2.9 needs the extra ``onnxscript`` package and gains nothing here.

The starter's antialiased bilinear resize (Lite2's 260 px input to Lite0's 224 px) has no ONNX
opset-17 equivalent; it is exported as the same linear map, a precomputed ``[224, 260]`` matrix
applied along each axis (equal to ``F.interpolate(..., antialias=True)`` up to float32 rounding, ~1e-5).
"""

from __future__ import annotations

import json
import logging
import os
import threading
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from calibclip.models.base import Encoder, ImageTokens, TextBatch, TextTokens

log = logging.getLogger(__name__)

#: Version of the exported graphs' layout (part of the cache path: bump it when the graphs change).
EXPORT_FORMAT = "1"
OPSET = 17
#: Precisions of the ONNX backend.
ONNX_PRECISIONS = ("fp32", "int8")
#: Graph name -> (input names, output names).
GRAPHS = {
    "image": (("pixels",), ("embedding",)),
    "image_tokens": (("pixels",), ("pooled", "tokens", "attention")),
    "text": (("input_ids", "attention_mask"), ("embedding",)),
    "text_tokens": (("input_ids", "attention_mask"), ("pooled", "tokens", "attention")),
}


def onnx_cache_dir() -> Path:
    """``$CALIBCLIP_CACHE/onnx`` (default ``~/.cache/calibclip/onnx``)."""
    return Path(os.environ.get("CALIBCLIP_CACHE") or Path.home() / ".cache" / "calibclip") / "onnx"


def _require_onnx() -> Any:
    try:
        import onnxruntime
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise RuntimeError(
            "backend 'onnx' needs onnxruntime (and onnx to export): pip install 'calibclip[onnx]'"
        ) from exc
    return onnxruntime


# ----------------------------------------------------------------------------------------------
# Export graphs: plain nn.Modules with traceable forwards over the wrapped encoder's weights
# ----------------------------------------------------------------------------------------------
def _clip_text(model: Any, ids: torch.Tensor, need_tokens: bool) -> tuple[torch.Tensor, ...]:
    """CLIP text tower on ids already trimmed to the longest text (traceable: no Python ints of data)."""
    eot = ids.argmax(-1)
    x = model.token_embedding(ids) + model.positional_embedding[: ids.shape[1]]
    x, probs = model.transformer(x, causal=True, query_index=eot if need_tokens else None)
    rows = torch.arange(x.shape[0], device=x.device)
    pooled = model.ln_final(x[rows, eot]) @ model.text_projection
    if not need_tokens:
        return (pooled,)
    return pooled, model.ln_final(x) @ model.text_projection, probs.mean(1)


class _ClipImage(nn.Module):
    def __init__(self, model: Any, tokens: bool):
        super().__init__()
        self.model, self.tokens = model, tokens

    def forward(self, pixels: torch.Tensor) -> Any:
        out = self.model.visual(pixels, need_tokens=self.tokens)
        return (out.pooled, out.tokens, out.attention) if self.tokens else out.pooled


class _ClipText(nn.Module):
    def __init__(self, model: Any, tokens: bool):
        super().__init__()
        self.model, self.tokens = model, tokens

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> Any:
        out = _clip_text(self.model, ids, self.tokens)
        if not self.tokens:
            return out[0]
        pooled, tokens, attn = out
        return pooled, tokens, attn * mask.to(attn.dtype)


def resize_matrix(n_in: int, n_out: int) -> torch.Tensor:
    """``[n_out, n_in]`` matrix of ``F.interpolate(bilinear, antialias=True, align_corners=False)`` along one
    axis (the resize is separable, so applying it to both axes reproduces the 2-D resize)."""
    # the basis runs along the width: with a height of 1 -> 1 PyTorch takes the same separable path as
    # for a 2-D resize (a width of 1 -> 1 would not; it gives a different kernel)
    basis = torch.eye(n_in, dtype=torch.float64).reshape(n_in, 1, 1, n_in)
    out = F.interpolate(basis, size=(1, n_out), mode="bilinear", align_corners=False, antialias=True)
    return out[:, 0, 0, :].T.contiguous().float()


class _StarterCells(nn.Module):
    """The starter image tower (with flip averaging) with the resize as matrices."""

    def __init__(self, model: Any):
        super().__init__()
        from calibclip.models.starter import GRID, area_matrix

        tower = model.image_tower
        self.model, self.flip = model, model.flip_average
        self.nets = tower.nets
        self.resize = [resize_matrix(tower.image_size, s) if s != tower.image_size else None for s in tower.sizes]
        self.grid, self.area = GRID, area_matrix

    def _cells(self, pixels: torch.Tensor) -> torch.Tensor:
        maps = []
        for net, resize in zip(self.nets, self.resize):
            x = pixels if resize is None else torch.einsum("ih,bchw,jw->bcij", resize, pixels, resize)
            fmap = net.extract_features(x)
            h, w = fmap.shape[-2:]
            if (h, w) != (self.grid, self.grid):
                fmap = torch.einsum("ih,bchw,jw->bcij", self.area(h, self.grid), fmap, self.area(w, self.grid))
            maps.append(fmap)
        return torch.cat(maps, dim=1)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        fmap = self._cells(pixels)
        if self.flip:
            fmap = 0.5 * (fmap + self._cells(pixels.flip(-1)).flip(-1))
        return fmap


class _StarterImage(nn.Module):
    def __init__(self, model: Any, tokens: bool):
        super().__init__()
        self.model, self.tokens, self.cells = model, tokens, _StarterCells(model)

    def forward(self, pixels: torch.Tensor) -> Any:
        fmap = self.cells(pixels)
        pooled = self.model.image_head(fmap.mean((2, 3)))
        if not self.tokens:
            return pooled
        cells = fmap.flatten(2).transpose(1, 2)  # same formulas as Starter.image_tokens
        mass = cells.sum(-1)
        total = mass.sum(-1, keepdim=True)
        n = cells.shape[1]
        attention = torch.where(total > 0, mass / total.clamp(min=1e-12), torch.full_like(mass, 1.0 / n))
        factor = torch.where(mass > 0, total / (n * mass.clamp(min=1e-12)), torch.ones_like(mass))
        return pooled, self.model.image_head(cells * factor[..., None]), attention


class _StarterText(nn.Module):
    def __init__(self, model: Any, tokens: bool):
        super().__init__()
        self.model, self.tokens = model, tokens

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> Any:
        from calibclip.models.starter import minilm_pool

        m = self.model
        hidden, probs = m.text_tower(ids, mask)
        pooled = minilm_pool(hidden, mask)
        if m.text_normalize:
            scale = pooled.norm(dim=-1, keepdim=True).clamp(min=1e-12)
            hidden, pooled = hidden / scale[:, None], pooled / scale
        if not self.tokens:
            return m.text_head(pooled)
        maskf = mask.to(hidden.dtype)
        received = (probs.mean(1) * maskf[:, :, None]).sum(1) / maskf.sum(1, keepdim=True).clamp(min=1)
        return m.text_head(pooled), m.text_head(hidden) * maskf[..., None], received * maskf


def _graph_module(model: Encoder, graph: str) -> nn.Module:
    from calibclip.models.clip import CLIP
    from calibclip.models.starter import Starter

    tokens = graph.endswith("_tokens")
    if isinstance(model, CLIP):
        return _ClipImage(model, tokens) if graph.startswith("image") else _ClipText(model, tokens)
    if isinstance(model, Starter):
        return _StarterImage(model, tokens) if graph.startswith("image") else _StarterText(model, tokens)
    raise ValueError(
        f"backend 'onnx' supports CLIP (ViT/ResNet) and starter encoders, got {type(model).__name__}; "
        "use backend='torch'"
    )


def _example_inputs(model: Encoder, graph: str) -> tuple[torch.Tensor, ...]:
    if graph.startswith("image"):
        size = getattr(model.preprocess, "size", None) or (224, 224)
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        return (torch.randn(2, 3, int(h), int(w)),)
    batch = model.tokenize(["a photo of a dog on the grass", "two people"])
    return batch.input_ids, batch.attention_mask


def export_graph(model: Encoder, graph: str, path: Path) -> None:
    """Export one graph of ``model`` (fp32, CPU) to ``path`` (atomically), dynamic batch/sequence axes."""
    import onnx  # noqa: F401  (the exporter needs it; fail early with a clear error otherwise)

    inputs, outputs = GRAPHS[graph]
    module = _graph_module(model, graph).eval()
    example = _example_inputs(model, graph)
    axes: dict[str, dict[int, str]] = {}
    for name in inputs:
        axes[name] = {0: "batch"} if name == "pixels" else {0: "batch", 1: "sequence"}
    for name in outputs:
        axes[name] = {0: "batch", 1: "sequence"} if graph == "text_tokens" and name != "pooled" else {0: "batch"}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TorchScript exporter deprecation and tracer warnings
        torch.onnx.export(
            module,
            example,
            str(tmp),
            input_names=list(inputs),
            output_names=list(outputs),
            dynamic_axes=axes,
            opset_version=OPSET,
            dynamo=False,
            do_constant_folding=True,
        )
    os.replace(tmp, path)


#: Encoder class -> node-name fragments left in fp32 by int8 quantisation. The starter's MiniLM text tower
#: loses too much under dynamic int8 (cosine to fp32 after the standardising head: 0.970 with every weight
#: matrix quantised, 0.994 with only Q/K/V; the gate is 0.995), so only its linear head is quantised.
INT8_KEEP_FP32: dict[str, tuple[str, ...]] = {"Starter": ("/text_tower/",)}


def quantize_graph(src: Path, dst: Path, keep_fp32: Sequence[str] = ()) -> None:
    """Dynamic int8 quantisation of an fp32 graph (MatMul/Gemm weights int8 per channel, activations per
    batch); nodes whose names contain one of ``keep_fp32`` stay fp32."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    graph = onnx.load(str(src), load_external_data=False).graph
    weights = {t.name for t in graph.initializer}
    weights |= {o for n in graph.node if n.op_type == "Constant" for o in n.output}
    # activation x activation products (attention scores and mixing) stay fp32: quantising them costs
    # accuracy (MiniLM + starter head: cosine 0.979 -> 0.9999) and they hold no weights to shrink
    keep = [n.name for n in graph.node if n.op_type == "MatMul" and n.input[1] not in weights]
    keep += [n.name for n in graph.node if any(part in n.name for part in keep_fp32)]
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp.onnx")
    root = logging.getLogger()
    level = root.level
    root.setLevel(max(level, logging.ERROR))  # the quantiser logs "consider pre-processing" on the root logger
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            quantize_dynamic(
                str(src),
                str(tmp),
                weight_type=QuantType.QInt8,
                per_channel=True,
                op_types_to_quantize=["MatMul", "Gemm"],
                nodes_to_exclude=keep,
            )
    finally:
        root.setLevel(level)
    os.replace(tmp, dst)


class OnnxEncoder(Encoder):
    """An `Encoder` whose forward passes run in ONNX Runtime (see the module docstring).

    Args:
        model: the torch encoder (CLIP or starter, fp32) to export; kept for tokenisation,
            preprocessing, ``config`` and ``fingerprint`` (the same as the torch model's: the
            embeddings are the same up to rounding, so indexes built with either backend are shared).
        precision: ``fp32`` or ``int8`` (dynamic quantisation).
        device: ``cpu`` (CPU execution provider) or ``cuda`` (CUDA execution provider; needs onnxruntime-gpu).
        cache_dir: export cache root (default `onnx_cache_dir`).
        threads: intra-op threads of the sessions (default: torch's thread count).

    Raises:
        ValueError: unsupported encoder type or precision.
        RuntimeError: onnxruntime missing, or CUDA requested without the CUDA execution provider.
    """

    def __init__(
        self,
        model: Encoder,
        precision: str = "fp32",
        device: str | torch.device = "cpu",
        cache_dir: str | os.PathLike | None = None,
        threads: int | None = None,
    ):
        super().__init__()
        if precision not in ONNX_PRECISIONS:
            raise ValueError(f"backend 'onnx' precision must be one of {ONNX_PRECISIONS}, got {precision!r}")
        _graph_module(model, "image")  # type check (raises ValueError for unsupported encoders)
        ort = _require_onnx()
        self.torch_model = model.float().cpu().eval()
        self.name = model.name
        self.embed_dim = model.embed_dim
        self.preprocess = model.preprocess
        self.pad_id = model.pad_id
        self.precision = "fp32"  # what an index records (the torch weights' precision; see `onnx_precision`)
        self.onnx_precision = precision
        self.spec = getattr(model, "spec", None)  # how an index reloads the model (the registry sets it)
        self.backend = "onnx"
        dev = torch.device(device)
        available = ort.get_available_providers()
        if dev.type == "cuda":
            if "CUDAExecutionProvider" not in available:
                raise RuntimeError(
                    f"device {str(device)!r} with backend 'onnx' needs onnxruntime's CUDAExecutionProvider "
                    f"(available: {available}); install onnxruntime-gpu or use --device cpu"
                )
            self.providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
        else:
            self.providers = ["CPUExecutionProvider"]
        self.threads = int(threads or torch.get_num_threads())
        self.cache_root = Path(cache_dir) if cache_dir is not None else onnx_cache_dir()
        self._sessions: dict[str, Any] = {}
        self._lock = threading.Lock()
        self._grid: tuple[int, int] | None = None
        if hasattr(model, "token_strings"):
            self.token_strings = model.token_strings  # type: ignore[method-assign]

    # --- files and sessions ------------------------------------------------------------------
    @property
    def export_dir(self) -> Path:
        """``<cache>/<fingerprint>/v<EXPORT_FORMAT>``: this model's exported graphs."""
        return self.cache_root / self.fingerprint().replace("/", "-") / f"v{EXPORT_FORMAT}"  # ViT-B/16-...

    def graph_path(self, graph: str, precision: str | None = None) -> Path:
        """Path of one exported graph (exported/quantised on first call)."""
        precision = precision or self.onnx_precision
        path = self.export_dir / f"{graph}-{precision}.onnx"
        if path.exists():
            return path
        if precision == "int8":
            keep = INT8_KEEP_FP32.get(type(self.torch_model).__name__, ())
            quantize_graph(self.graph_path(graph, "fp32"), path, keep)
            log.info("quantised %s to int8: %s", graph, path)
        else:
            export_graph(self.torch_model, graph, path)
            log.info("exported %s of %s to %s", graph, self.name, path)
        return path

    def session(self, graph: str) -> Any:
        """The ONNX Runtime session of ``graph`` (created once)."""
        with self._lock:
            sess = self._sessions.get(graph)
            if sess is None:
                ort = _require_onnx()
                opts = ort.SessionOptions()
                opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
                opts.intra_op_num_threads = self.threads
                opts.inter_op_num_threads = 1
                opts.log_severity_level = 3
                sess = ort.InferenceSession(str(self.graph_path(graph)), opts, providers=self.providers)
                self._sessions[graph] = sess
            return sess

    def prepare(self, graphs: Sequence[str] = ("image", "text")) -> OnnxEncoder:
        """Export (if needed) and load ``graphs`` now instead of on first use; returns self."""
        for graph in graphs:
            self.session(graph)
        return self

    def _run(self, graph: str, feeds: dict[str, np.ndarray]) -> list[torch.Tensor]:
        sess = self.session(graph)
        names = {i.name for i in sess.get_inputs()}  # the exporter drops inputs a graph does not use
        outs = sess.run(None, {k: v for k, v in feeds.items() if k in names})
        return [torch.from_numpy(np.ascontiguousarray(o)) for o in outs]

    # --- inputs ------------------------------------------------------------------------------
    def _pixels(self, pixels: torch.Tensor) -> np.ndarray:
        if pixels.ndim != 4 or pixels.shape[1] != 3:
            raise ValueError(f"expected pixels [B, 3, H, W], got {tuple(pixels.shape)}")
        return pixels.detach().to("cpu", torch.float32).contiguous().numpy()

    def _text_batch(self, text: TextBatch | torch.Tensor) -> TextBatch:
        """A `TextBatch` trimmed to its longest text, as the torch models see it."""
        from calibclip.models.clip import CLIP

        model = self.torch_model
        if isinstance(model, CLIP):
            if isinstance(text, TextBatch):
                ids = model._text_ids(text).cpu()
                batch = model.batch_from_ids(ids, text.texts)
            else:
                batch = model.batch_from_ids(model._text_ids(text).cpu())
            return batch
        if isinstance(text, torch.Tensor):
            ids = text.long().cpu()
            return TextBatch(ids, (ids != 0).long(), (ids == 101) | (ids == 102))
        return text.to("cpu")

    def _text_feeds(self, batch: TextBatch) -> dict[str, np.ndarray]:
        return {
            "input_ids": batch.input_ids.long().contiguous().numpy(),
            "attention_mask": batch.attention_mask.long().contiguous().numpy(),
        }

    # --- Encoder API -------------------------------------------------------------------------
    def tokenize(self, texts: Sequence[str]) -> TextBatch:
        return self.torch_model.tokenize(texts)

    @torch.inference_mode()
    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        if pixels.shape[0] == 0:
            return torch.zeros(0, self.embed_dim)
        return self._run("image", {"pixels": self._pixels(pixels)})[0]

    @torch.inference_mode()
    def encode_text(self, text: TextBatch | torch.Tensor) -> torch.Tensor:
        batch = self._text_batch(text)
        if len(batch) == 0:
            return torch.zeros(0, self.embed_dim)
        return self._run("text", self._text_feeds(batch))[0]

    @torch.inference_mode()
    def image_tokens(self, pixels: torch.Tensor) -> ImageTokens:
        if pixels.shape[0] == 0:
            return self.torch_model.image_tokens(pixels)
        pooled, tokens, attention = self._run("image_tokens", {"pixels": self._pixels(pixels)})
        return ImageTokens(pooled, tokens, attention, self._token_grid(tokens.shape[1]))

    @torch.inference_mode()
    def text_tokens(self, text: TextBatch) -> TextTokens:
        batch = self._text_batch(text)
        if len(batch) == 0:
            return self.torch_model.text_tokens(batch)
        pooled, tokens, attention = self._run("text_tokens", self._text_feeds(batch))
        return TextTokens(pooled, tokens, attention, batch)

    def _token_grid(self, n: int) -> tuple[int, int]:
        if self._grid is None:
            meta = self.export_dir / "grid.json"
            if meta.exists():
                self._grid = tuple(json.loads(meta.read_text())["grid"])  # type: ignore[assignment]
            else:
                size = getattr(self.preprocess, "size", (224, 224))
                h, w = (size, size) if isinstance(size, int) else tuple(size)
                grid = self.torch_model.image_tokens(torch.zeros(1, 3, int(h), int(w))).grid
                self._grid = (int(grid[0]), int(grid[1]))
                meta.write_text(json.dumps({"grid": list(self._grid)}))
        if self._grid[0] * self._grid[1] != n:
            raise RuntimeError(
                f"ONNX image_tokens gave {n} tokens but the grid is {self._grid}; delete {self.export_dir} to re-export"
            )
        return self._grid

    def config(self) -> dict[str, Any]:
        return {**self.torch_model.config(), "backend": "onnx", "onnx_precision": self.onnx_precision}

    def fingerprint(self) -> str:
        return self.torch_model.fingerprint()

    def __getattr__(self, name: str) -> Any:
        """Model-specific extras (``logit_scale``, ``context_length``, ...) come from the torch model."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            modules = self.__dict__.get("_modules", {})
            if "torch_model" in modules and not name.startswith("_"):
                return getattr(modules["torch_model"], name)
            raise


def wrap(model: Encoder, precision: str = "fp32", device: str | torch.device = "cpu", **kwargs: Any) -> Encoder:
    """`OnnxEncoder` of ``model`` (the registry's ``backend="onnx"``)."""
    return OnnxEncoder(model, precision=precision, device=device, **kwargs)
