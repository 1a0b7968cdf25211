"""Pretrained-weights declarations, apart from the architectures (`clip_configs`).

Each registered model name with weights has one `PretrainedWeights` entry: where the file comes
from (a URL with its SHA-256, or a file shipped inside calibclip) and the file name it is cached
under. `calibclip.models.download` fetches and verifies the URL entries; the registry marks a
model ``download``, ``built-in`` or ``random`` from this table.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path

_OPENAI = "https://openaipublic.azureedge.net/clip/models"


@dataclass(frozen=True)
class PretrainedWeights:
    """Where a model's weights come from.

    Attributes:
        url: download URL (None for a built-in file).
        sha256: expected SHA-256 of the file (None: taken from the URL path, as OpenAI's URLs carry it).
        builtin: path of a file shipped inside the calibclip package (relative to it), or None.
        source: who published the weights (for listings).
    """

    url: str | None = None
    sha256: str | None = None
    builtin: str | None = None
    source: str = ""

    @property
    def kind(self) -> str:
        """``built-in`` (shipped file) or ``download``."""
        return "built-in" if self.builtin else "download"

    @property
    def filename(self) -> str:
        """The file's name (cache file name for downloads)."""
        return (self.url or self.builtin or "").rsplit("/", 1)[-1]

    def builtin_path(self) -> Path:
        """Absolute path of a built-in file.

        Raises:
            ValueError: the weights are downloaded, not built in.
        """
        if not self.builtin:
            raise ValueError(f"weights {self.filename!r} are downloaded, not built in")
        return Path(str(resources.files("calibclip") / self.builtin))


def _openai(digest: str, filename: str) -> PretrainedWeights:
    return PretrainedWeights(url=f"{_OPENAI}/{digest}/{filename}", sha256=digest, source="OpenAI")


#: Registered model name -> its weights.
PRETRAINED: dict[str, PretrainedWeights] = {
    "RN50": _openai("afeb0e10f9e5a86da6080e35cf09123aca3b358a0c3e3b6c78a7b63bc04b6762", "RN50.pt"),
    "RN101": _openai("8fa8567bab74a42d41c5915025a8e4538c3bdbe8804a470a72f30b0d94fab599", "RN101.pt"),
    "RN50x4": _openai("7e526bd135e493cef0776de27d5f42653e6b4c8bf9e0f653bb11773263205fdd", "RN50x4.pt"),
    "RN50x16": _openai("52378b407f34354e150460fe41077663dd5b39c54cd0bfd2b27167a4a06ec9aa", "RN50x16.pt"),
    "RN50x64": _openai("be1cfb55d75a9666199fb2206c106743da0f6468c9d327f3e0d0a543a9919d9c", "RN50x64.pt"),
    "ViT-B/32": _openai("40d365715913c9da98579312b702a82c18be219cc2a73407c4526f58eba950af", "ViT-B-32.pt"),
    "ViT-B/16": _openai("5806e77cd80f8b59890b7e101eabd078d9fb84e6937f9e85e4ecb61988df416f", "ViT-B-16.pt"),
    "ViT-L/14": _openai("b8cca3fd41ae0c99ba7e8951adf17d267cdb84cd88be6f7c2e0eca1737a03836", "ViT-L-14.pt"),
    "ViT-L/14@336px": _openai("3035c92b350959924f9f00213499208652fc7ea050643e8b385c2dac08641f02", "ViT-L-14-336px.pt"),
    "starter": PretrainedWeights(
        builtin="weights/starter.safetensors", source="calibclip (v2: top blocks + heads fine-tuned on Flickr8k)"
    ),
    "starter-v1": PretrainedWeights(
        builtin="weights/starter-v1.safetensors", source="calibclip (v1: heads trained on Flickr8k)"
    ),
    "starter-person": PretrainedWeights(
        builtin="weights/starter-person.safetensors",
        source="calibclip (starter fine-tuned on a CUHK-PEDES subset; research use only)",
    ),
}


def pretrained_for(name: str) -> PretrainedWeights | None:
    """The weights declared for a registered model name (None: none declared)."""
    return PRETRAINED.get(name)
