"""Checkpoint loaders for CLIP weights; none of them executes code from the file.

Supported (detected automatically):

1. OpenAI TorchScript archives (``ViT-B-16.pt`` ...): the zip's ``data.pkl`` is read by a
   restricted unpickler that only rebuilds tensors and plain containers (``__torch__`` module
   objects become inert attribute bags); the ``code/`` is never loaded.
2. Plain state dicts (``.pt/.pth/.bin``) with OpenAI key names, also nested/prefixed ones
   (``{"state_dict": ...}``, ``{"model": {"base_model.<key>": ...}}``, ``module.``): read with
   ``torch.load(weights_only=True)``.
3. open_clip checkpoints (``open_clip_pytorch_model.bin``, ``open_clip_model.safetensors``).
4. Hugging Face ``CLIPModel`` directories (``config.json`` + ``model.safetensors``/``pytorch_model.bin``).

The architecture is inferred from the weights. Activation (QuickGELU vs GELU) is explicit:
``quick_gelu=True/False`` wins; otherwise HF configs and ``open_clip_config.json`` say it, OpenAI
archives and OpenAI-named state dicts mean QuickGELU, and open_clip files without a config mean
GELU (open_clip's default for names without ``-quickgelu``), with a warning.
"""

from __future__ import annotations

import json
import os
import pickle
import warnings
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from calibclip.models.clip import CLIP, config_from_state_dict
from calibclip.models.tokenizer import EOT_TOKEN

#: The key that anchors an OpenAI-named state dict (any prefix before it is stripped).
OPENAI_ANCHOR = "token_embedding.weight"
#: The key that anchors a Hugging Face CLIPModel state dict.
HF_ANCHOR = "text_model.embeddings.token_embedding.weight"

_EXPECTED = (
    "expected OpenAI/open_clip CLIP keys (token_embedding.weight, positional_embedding, text_projection, "
    "transformer.resblocks.N..., visual.conv1.weight + visual.proj [ViT] or visual.layer1... + visual.attnpool... "
    "[ResNet]) or Hugging Face CLIPModel keys (text_model.embeddings..., vision_model..., visual_projection.weight)"
)


class CheckpointError(ValueError):
    """A file that is not a loadable CLIP checkpoint (wrong format, unsafe pickle, missing keys)."""


def looks_like_text(path: str | os.PathLike, probe: int = 4096) -> str | None:
    """The first line of ``path`` when its first bytes are UTF-8 text without NUL bytes (a README, a
    config, an HTML error page saved as a checkpoint), else None."""
    try:
        with open(path, "rb") as f:
            head = f.read(probe)
    except OSError:
        return None
    if not head or b"\0" in head:
        return None
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as exc:
        if exc.start < len(head) - 4:  # not just a multi-byte character cut at the probe's end
            return None
        text = head[: exc.start].decode("utf-8")
    first = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
    return first[:60]


def not_a_checkpoint_if_text(path: str | os.PathLike) -> None:
    """Raise `CheckpointError` "not a checkpoint (looks like text)" when ``path`` is a text file."""
    first = looks_like_text(path)
    if first is not None:
        raise CheckpointError(
            f"{path}: not a checkpoint (looks like text: {first!r}), so not a readable PyTorch checkpoint; expected "
            "a torch.save() state dict, a TorchScript archive, a .safetensors file or a Hugging Face directory"
        )


def check_finite(tensors: Mapping[str, torch.Tensor], source: str) -> None:
    """Refuse weights holding NaN or infinite values (they would make every score NaN).

    Raises:
        CheckpointError: naming the first affected tensors.
    """
    bad = [k for k, t in tensors.items() if t.is_floating_point() and t.numel() and not bool(torch.isfinite(t).all())]
    if bad:
        raise CheckpointError(
            f"{source}: refused: {len(bad)} weight tensor(s) hold NaN or infinite values (e.g. {bad[:3]}); the file "
            "is corrupt or comes from a diverged training run: use another checkpoint"
        )


# ----------------------------------------------------------------------------------------------
# safe readers
# ----------------------------------------------------------------------------------------------
class _ScriptObject:
    """Inert stand-in for a pickled ``__torch__`` (TorchScript) object: keeps its attributes."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.state: Any = None

    def __setstate__(self, state: Any) -> None:
        self.state = state


_STORAGE_DTYPES = {
    "FloatStorage": torch.float32,
    "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16,
    "DoubleStorage": torch.float64,
    "LongStorage": torch.int64,
    "IntStorage": torch.int32,
    "ShortStorage": torch.int16,
    "CharStorage": torch.int8,
    "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
}


def _rebuild_tensor(storage: torch.Tensor, offset: int, size: tuple, stride: tuple, *_: Any) -> torch.Tensor:
    return storage.as_strided(tuple(size), tuple(stride), offset)


def _identity(value: Any, *_: Any) -> Any:
    return value


#: TorchScript's typed-container markers (``torch.jit._pickle``): all return their data unchanged.
_JIT_BUILDERS = {
    name: _identity
    for name in ("build_intlist", "build_tensorlist", "build_doublelist", "build_boollist", "restore_type_tag")
}


class _TorchScriptUnpickler(pickle.Unpickler):
    """Resolves only tensor rebuilding, storages, OrderedDict, TorchScript's typed-container markers
    (identity functions here) and inert ``__torch__`` objects; any other global is refused."""

    def __init__(self, file: Any, archive: zipfile.ZipFile, prefix: str):
        super().__init__(file)
        self._archive, self._prefix = archive, prefix
        self._storages: dict[str, torch.Tensor] = {}

    def find_class(self, module: str, name: str) -> Any:
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return _rebuild_tensor
        if module == "torch" and name in _STORAGE_DTYPES:
            return _STORAGE_DTYPES[name]
        if module == "torch.jit._pickle" and name in _JIT_BUILDERS:
            return _JIT_BUILDERS[name]
        if module == "collections" and name == "OrderedDict":
            from collections import OrderedDict

            return OrderedDict
        if module == "__torch__" or module.startswith("__torch__."):
            return _ScriptObject
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a weights-only read")

    def persistent_load(self, pid: Any) -> torch.Tensor:
        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"unsupported persistent id {pid!r}")
        dtype, key = pid[1], str(pid[2])
        if not isinstance(dtype, torch.dtype):
            raise pickle.UnpicklingError(f"unsupported storage type {dtype!r}")
        if key not in self._storages:
            data = bytearray(self._archive.read(f"{self._prefix}data/{key}"))
            self._storages[key] = torch.frombuffer(data, dtype=dtype) if data else torch.empty(0, dtype=dtype)
        return self._storages[key]


def _flatten_script(obj: Any, prefix: str, out: dict[str, torch.Tensor]) -> None:
    if isinstance(obj, _ScriptObject):
        obj = obj.state
    if isinstance(obj, torch.Tensor):
        out[prefix[:-1]] = obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            if isinstance(k, str) and not k.startswith("_"):
                _flatten_script(v, f"{prefix}{k}.", out)


def is_torchscript_archive(path: str | os.PathLike) -> bool:
    """A zip whose entries include TorchScript ``code/`` or ``constants.pkl``."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any("/code/" in n or n.endswith("/constants.pkl") for n in z.namelist())


def read_torchscript_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Parameters and buffers of a TorchScript archive as a flat state dict, without loading its code."""
    with zipfile.ZipFile(path) as z:
        names = [n for n in z.namelist() if n.endswith("data.pkl") and n.count("/") == 1]
        if not names:
            raise CheckpointError(f"{path}: TorchScript archive without a data.pkl entry")
        prefix = names[0][: -len("data.pkl")]
        with z.open(names[0]) as f:
            try:
                root = _TorchScriptUnpickler(f, z, prefix).load()
            except (pickle.UnpicklingError, AttributeError, EOFError, KeyError, ValueError, TypeError) as exc:
                raise CheckpointError(
                    f"{path}: refused to read the TorchScript archive's data.pkl ({exc}); calibclip reads only "
                    "tensors and never executes code from checkpoints"
                ) from exc
    out: dict[str, torch.Tensor] = {}
    _flatten_script(root, "", out)
    return out


def _torch_load(path: Path) -> Any:
    not_a_checkpoint_if_text(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"{path}: refused to load: the pickle references objects that a weights-only load does not allow "
            f"({str(exc).splitlines()[0] if str(exc) else exc}). calibclip never executes code from checkpoints; "
            "if you trust the file, re-save it as a plain state dict (torch.save(model.state_dict(), ...)) or "
            "as safetensors"
        ) from exc
    except Exception as exc:  # a non-pickle file fails anywhere inside the unpickler (IndexError, EOFError ...)
        raise CheckpointError(
            f"{path}: not a readable PyTorch checkpoint ({type(exc).__name__}: {exc}); expected a torch.save() "
            "state dict, a TorchScript archive, a .safetensors file or a Hugging Face directory"
        ) from exc


def read_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint file as a flat ``{dotted.key: tensor}`` dict (nested dicts flattened)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        not_a_checkpoint_if_text(path)
        try:
            return load_file(str(path))
        except Exception as exc:  # safetensors raises its own SafetensorError
            raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from exc
    if is_torchscript_archive(path):
        return read_torchscript_weights(path)
    out: dict[str, torch.Tensor] = {}
    _flatten(_torch_load(path), "", out)
    return out


def _flatten(obj: Any, prefix: str, out: dict[str, torch.Tensor]) -> None:
    if isinstance(obj, torch.Tensor):
        out[prefix[:-1]] = obj
    elif isinstance(obj, Mapping):
        for k, v in obj.items():
            _flatten(v, f"{prefix}{k}.", out)


def _describe(tensors: Mapping[str, torch.Tensor], limit: int = 8) -> str:
    shown = [f"{k} {tuple(v.shape)}" for k, v in list(tensors.items())[:limit]]
    more = f" ... ({len(tensors)} tensors in all)" if len(tensors) > limit else ""
    return ", ".join(shown) + more if shown else "no tensors at all"


def _select(tensors: Mapping[str, torch.Tensor], anchor: str) -> dict[str, torch.Tensor] | None:
    """Keys under the shortest prefix that precedes ``anchor``, with that prefix stripped."""
    prefixes = [k[: -len(anchor)] for k in tensors if k.endswith(anchor)]
    prefixes = [p for p in prefixes if p == "" or p.endswith(".")]
    if not prefixes:
        return None
    prefix = min(prefixes, key=len)
    return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}


# ----------------------------------------------------------------------------------------------
# Hugging Face
# ----------------------------------------------------------------------------------------------
_HF_BLOCK = {
    "self_attn.out_proj": "attn.out_proj",
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
}


#: Hugging Face CLIPModel key -> OpenAI key for the tensors that map one to one.
_HF_SIMPLE = {
    "vision_model.embeddings.class_embedding": "visual.class_embedding",
    "vision_model.embeddings.patch_embedding.weight": "visual.conv1.weight",
    "vision_model.embeddings.position_embedding.weight": "visual.positional_embedding",
    "vision_model.pre_layrnorm.weight": "visual.ln_pre.weight",
    "vision_model.pre_layrnorm.bias": "visual.ln_pre.bias",
    "vision_model.post_layernorm.weight": "visual.ln_post.weight",
    "vision_model.post_layernorm.bias": "visual.ln_post.bias",
    "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
    "text_model.embeddings.position_embedding.weight": "positional_embedding",
    "text_model.final_layer_norm.weight": "ln_final.weight",
    "text_model.final_layer_norm.bias": "ln_final.bias",
    "logit_scale": "logit_scale",
}


def hf_to_openai(hf: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Convert Hugging Face ``CLIPModel`` keys to OpenAI names (q/k/v fused into ``in_proj``)."""
    out: dict[str, torch.Tensor] = {}
    for src, dst in _HF_SIMPLE.items():
        if src in hf:
            out[dst] = hf[src]
    if "visual_projection.weight" in hf:
        out["visual.proj"] = hf["visual_projection.weight"].t().contiguous()
    if "text_projection.weight" in hf:
        out["text_projection"] = hf["text_projection.weight"].t().contiguous()
    for tower, dst_prefix in (("vision_model", "visual.transformer"), ("text_model", "transformer")):
        start = f"{tower}.encoder.layers."
        layers = sorted({int(k[len(start) :].split(".")[0]) for k in hf if k.startswith(start)})
        for i in layers:
            src, dst = f"{start}{i}.", f"{dst_prefix}.resblocks.{i}."
            for kind in ("weight", "bias"):
                qkv = [hf.get(f"{src}self_attn.{p}_proj.{kind}") for p in "qkv"]
                if all(t is not None for t in qkv):
                    out[f"{dst}attn.in_proj_{kind}"] = torch.cat(qkv, dim=0)  # type: ignore[arg-type]
                for a, b in _HF_BLOCK.items():
                    if f"{src}{a}.{kind}" in hf:
                        out[f"{dst}{b}.{kind}"] = hf[f"{src}{a}.{kind}"]
    return out


def openai_to_hf(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of `hf_to_openai` for ViT models (e.g. to export weights into ``transformers.CLIPModel``)."""
    if "visual.proj" not in state:
        raise ValueError("only ViT CLIP models have a Hugging Face CLIPModel equivalent (ResNet towers do not)")
    inverse = {v: k for k, v in _HF_SIMPLE.items()}
    out: dict[str, torch.Tensor] = {}
    for key, t in state.items():
        if key in inverse:
            out[inverse[key]] = t
        elif key == "visual.proj":
            out["visual_projection.weight"] = t.t().contiguous()
        elif key == "text_projection":
            out["text_projection.weight"] = t.t().contiguous()
        elif ".resblocks." in key:
            tower = "vision_model" if key.startswith("visual.") else "text_model"
            i, rest = key.split(".resblocks.")[1].split(".", 1)
            dst = f"{tower}.encoder.layers.{i}."
            if rest.startswith("attn.in_proj_"):
                kind = rest.rsplit("_", 1)[-1]
                for name, part in zip("qkv", t.chunk(3, dim=0)):
                    out[f"{dst}self_attn.{name}_proj.{kind}"] = part.contiguous()
                continue
            for hf_name, ours in _HF_BLOCK.items():
                if rest.startswith(ours + "."):
                    out[dst + hf_name + rest[len(ours) :]] = t
                    break
    return out


def _hf_settings(config: Any, where: str) -> dict[str, Any]:
    if not isinstance(config, dict):
        raise CheckpointError(
            f"{where}/config.json: expected a JSON object (a CLIPModel config), got {type(config).__name__}"
        )
    for key in ("vision_config", "text_config"):
        if config.get(key) is not None and not isinstance(config[key], dict):
            raise CheckpointError(
                f"{where}/config.json: {key} is a {type(config[key]).__name__} ({str(config[key])[:40]!r}), expected "
                "an object of settings (hidden_size, num_attention_heads, ...) as transformers writes it"
            )
    vision, text = config.get("vision_config") or {}, config.get("text_config") or {}
    acts = {vision.get("hidden_act", "quick_gelu"), text.get("hidden_act", "quick_gelu")}
    if not acts <= {"quick_gelu", "gelu"} or len(acts) != 1:
        raise CheckpointError(
            f"{where}: unsupported hidden_act {sorted(acts)}; expected quick_gelu or gelu, the same in both towers"
        )
    for tower in (vision, text):
        eps = tower.get("layer_norm_eps", 1e-5)
        if abs(float(eps) - 1e-5) > 1e-12:
            raise CheckpointError(f"{where}: layer_norm_eps {eps} is not supported (CLIP uses 1e-5)")
    settings: dict[str, Any] = {"act": acts.pop()}
    trained = config.get("calibclip") or {}  # written by `calibclip train`: input geometry and preprocessing
    for key in ("image_size", "image_mean", "image_std", "resize_mode"):
        if trained.get(key) is not None:
            settings[key] = tuple(trained[key]) if isinstance(trained[key], list) else trained[key]
    for tower, key, name in ((vision, "vision_heads", "vision_config"), (text, "text_heads", "text_config")):
        if "num_attention_heads" in tower:
            heads = tower["num_attention_heads"]
            if isinstance(heads, bool) or not isinstance(heads, int) or heads < 1:
                raise CheckpointError(
                    f"{where}/config.json: {name}.num_attention_heads is {heads!r}; expected a whole number >= 1 "
                    "that divides hidden_size"
                )
            settings[key] = heads
    return settings


def _hf_config(path: Path) -> Any:
    """The parsed ``config.json`` of a Hugging Face directory (CheckpointError when it is not JSON)."""
    try:
        return json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}/config.json is not valid JSON ({exc}); re-download the model folder") from None


def _read_hf_dir(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    settings = _hf_settings(_hf_config(path), str(path))
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (path / name).exists():
            tensors = read_tensors(path / name)
            break
    else:
        raise CheckpointError(
            f"{path}: Hugging Face config.json found but no model.safetensors or pytorch_model.bin "
            f"(found: {sorted(p.name for p in path.iterdir())}); sharded checkpoints are not supported"
        )
    return tensors, settings


# ----------------------------------------------------------------------------------------------
# entry point
# ----------------------------------------------------------------------------------------------
_OPEN_CLIP_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")


def _open_clip_settings(path: Path) -> dict[str, Any] | None:
    """``{"act": ..., mean/std}`` from an adjacent ``open_clip_config.json`` (None when absent)."""
    cfg_path = path.parent / "open_clip_config.json"
    if not cfg_path.exists():
        return None
    cfg = json.loads(cfg_path.read_text())
    model_cfg, pre = cfg.get("model_cfg", {}), cfg.get("preprocess_cfg", {})
    settings: dict[str, Any] = {"act": "quick_gelu" if model_cfg.get("quick_gelu") else "gelu"}
    if "mean" in pre and "std" in pre:
        settings["image_mean"], settings["image_std"] = tuple(pre["mean"]), tuple(pre["std"])
    return settings


def detect_format(path: str | os.PathLike) -> str:
    """``hf``, ``open_clip``, ``torchscript`` or ``state_dict`` (by layout, not by content)."""
    path = Path(path)
    if path.is_dir():
        if (path / "config.json").exists():
            return "hf"
        if any((path / n).exists() for n in _OPEN_CLIP_FILES):
            return "open_clip"
        raise CheckpointError(
            f"{path}: directory holds neither a Hugging Face CLIPModel (config.json + model.safetensors) nor an "
            f"open_clip checkpoint ({', '.join(_OPEN_CLIP_FILES)}); found {sorted(p.name for p in path.iterdir())[:10]}"
        )
    if path.name.startswith("open_clip") or (path.parent / "open_clip_config.json").exists():
        return "open_clip"
    if is_torchscript_archive(path):
        return "torchscript"
    return "state_dict"


def load_checkpoint(
    path: str | os.PathLike,
    *,
    image_size: int | tuple[int, int] | None = None,
    quick_gelu: bool | None = None,
    name: str | None = None,
    vision_heads: int | None = None,
    text_heads: int | None = None,
    **kwargs: Any,
) -> CLIP:
    """Build a `CLIP` from a checkpoint file or directory (format and architecture inferred).

    ``image_size``: input ``(H, W)`` (or int); positional embeddings are interpolated when it
    differs from the checkpoint's grid. ``quick_gelu``: force the activation (see module doc).
    ``name``: the model's display name. Returns an fp32 CPU model in eval mode.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such checkpoint file or directory")
    if kwargs:
        raise TypeError(f"load_checkpoint() got unexpected arguments {sorted(kwargs)}")
    fmt = detect_format(path)
    if fmt == "hf" and (path / "model.safetensors").exists():
        config = _hf_config(path)
        arch = config.get("architecture") if isinstance(config, dict) else None
        if arch == "starter":  # a starter fine-tuned by `calibclip train` (OUT/best, OUT/last)
            from calibclip.models.starter import Starter

            return Starter(weights=path / "model.safetensors")  # type: ignore[return-value]
    settings: dict[str, Any] = {}
    if fmt == "hf":
        tensors, settings = _read_hf_dir(path)
    else:
        if fmt == "open_clip" and path.is_dir():
            path = next(path / n for n in _OPEN_CLIP_FILES if (path / n).exists())
        tensors = read_tensors(path)
    state = _select(tensors, OPENAI_ANCHOR)
    if state is None or not any(k.startswith("visual.") for k in state):
        hf_state = _select(tensors, HF_ANCHOR)
        if hf_state is None:
            raise CheckpointError(f"{path}: no CLIP weights recognised. Found: {_describe(tensors)}; {_EXPECTED}")
        state = hf_to_openai(hf_state)
    if fmt == "open_clip":
        settings.update(_open_clip_settings(path) or {})
        if "act" not in settings and quick_gelu is None:
            warnings.warn(
                f"{path.name}: open_clip checkpoint without open_clip_config.json; assuming GELU (open_clip's default "
                "for model names without '-quickgelu'). Pass quick_gelu=True if it was trained with QuickGELU "
                "(e.g. OpenAI weights or '*-quickgelu' models).",
                stacklevel=2,
            )
            settings["act"] = "gelu"
    settings.setdefault("act", "quick_gelu")
    if quick_gelu is not None:
        settings["act"] = "quick_gelu" if quick_gelu else "gelu"
    for key, value in (("vision_heads", vision_heads), ("text_heads", text_heads)):
        if value is not None:
            settings[key] = value
    stored_size = settings.pop("image_size", None)
    try:
        cfg = config_from_state_dict(state, image_size=image_size or stored_size, name=name or path.name, **settings)
    except KeyError as exc:
        raise CheckpointError(
            f"{path}: incomplete CLIP weights, {exc} is missing. Found: {_describe(state)}; {_EXPECTED}"
        ) from exc
    except ValueError as exc:
        raise CheckpointError(f"{path}: {exc}") from None
    if cfg.vocab_size <= EOT_TOKEN:
        raise CheckpointError(
            f"{path}: the text tower's vocabulary has {cfg.vocab_size} tokens, but the CLIP tokenizer produces ids up "
            f"to {EOT_TOKEN} (vocabulary {EOT_TOKEN + 1}): every text query would fail. This checkpoint was trained "
            "with another tokenizer; calibclip's CLIP loader needs the OpenAI CLIP vocabulary"
        )
    check_finite(state, str(path))
    try:
        model = CLIP(cfg)
    except ValueError as exc:  # e.g. a head count that does not divide the width
        raise CheckpointError(f"{path}: the weights and settings do not make a CLIP model ({exc})") from None
    model.load_openai_state_dict(state, source=str(path))
    model.checkpoint_format = fmt
    return model.eval()
