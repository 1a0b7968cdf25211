"""The ``reranker`` training target: the cross-modal re-ranker (README's Calibrated Vision Encoder,
`calibclip.calibration.reranker`) trained over a frozen dual encoder's token views.

Each training caption comes with its ``top_k`` hardest candidates, mined once from the frozen dual
encoder's own ranking of the training gallery (the true image put in place of the last candidate when
it is missing: every list holds exactly one positive). The loss is a listwise softmax over those
candidates of the fused score ``sim_dual + fusion_weight * match`` (what re-ranking uses), so the
re-ranker learns exactly the correction of the dual encoder's top-K it is applied to. The dual
encoder never trains; its token views are cached once in fp16 (`calibclip.data.tokens`).

The trainer's dual curriculum applies unchanged: its neighbour tables come from the frozen pooled
embeddings (`item_embeddings`), so at higher hardness a batch holds captions of look-alike images,
whose candidate lists overlap.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from calibclip.calibration.reranker import CrossModalReranker, RerankerConfig, Reranking, listwise_loss
from calibclip.data.records import RetrievalDataset
from calibclip.data.tokens import TokenViews, cache_key, extract_token_views
from calibclip.evaluation.evaluator import cosine_similarity, dataset_metrics, rerank_similarity
from calibclip.models.base import Encoder
from calibclip.training.rerank_data import mine_candidates
from calibclip.training.targets import Target, TrainData

#: ``model.cve`` keys that are architecture/ranking settings of the re-ranker (``enabled`` is not).
ARCH_KEYS = ("num_heads", "num_layers", "dropout", "width", "top_k", "fusion_weight")


def token_folder(root: Path, encoder: Encoder, dataset: RetrievalDataset) -> Path:
    key = cache_key(encoder, dataset.images, dataset.captions)
    return Path(root) / hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]


class RerankerTarget(Target):
    """Trains a `CrossModalReranker` on ``data`` over ``encoder``'s cached token views.

    Args:
        encoder: the frozen dual encoder.
        settings: the run's `TrainSettings` (``cve`` holds ``model.cve``; ``temperature`` the softmax's).
        data: the training split.
        cache_root: where token views are cached (one folder per encoder and split).
        progress: show extraction progress.
    """

    name = "reranker"

    def __init__(self, encoder: Encoder, settings: Any, data: TrainData, cache_root: Path, progress: bool = True):
        self.encoder = encoder
        self.settings = settings
        self.data = data
        self.cache_root = Path(cache_root)
        self.progress = progress
        cve = {k: v for k, v in (settings.cve or {}).items() if k in ARCH_KEYS}
        self.config = RerankerConfig(
            token_dim=int(encoder.embed_dim), encoder=encoder.fingerprint(), encoder_name=encoder.name, **cve
        )
        torch.manual_seed(settings.seed)
        self.model = CrossModalReranker(self.config)
        self.options = settings.reranker
        ds = data.dataset
        self.views: TokenViews = self._views(ds)
        positives = torch.as_tensor(ds.caption_image, dtype=torch.long)
        pool = self.options.train_top_k or self.config.top_k
        self.list_size = self.options.list_size or pool
        need = self.list_size - 1 - self.options.random_negatives
        if need > pool - 1:
            raise ValueError(
                f"training.reranker: list_size {self.list_size} needs {need} mined negatives but train_top_k {pool} "
                f"gives {pool - 1}"
            )
        self.positives = positives
        self.gallery = F.normalize(self.views.image_pooled.float(), dim=-1)
        self.queries = F.normalize(self.views.text_pooled.float(), dim=-1)
        generator = torch.Generator().manual_seed(int(settings.seed))
        self.candidates = mine_candidates(
            self.views.text_pooled,
            self.views.image_pooled,
            positives,
            pool,
            noise=self.options.mine_noise,
            generator=generator,
        )
        self.generator = generator
        self._val: dict[str, Any] = {}

    def _views(self, dataset: RetrievalDataset) -> TokenViews:
        """Token views of a split: for the starter computed from its lower-activation cache under the cache
        root (`calibclip.training.starter_tokens`, upper part only), else from the full forward, cached."""
        from calibclip.models.starter import Starter

        if isinstance(self.encoder, Starter):
            from calibclip.training.starter_tokens import starter_token_views

            return starter_token_views(
                self.encoder,
                dataset,
                self.cache_root,
                extract_batch_size=self.settings.starter.extract_batch_size,
                progress=self.progress,
            )
        return extract_token_views(
            self.encoder,
            dataset.images,
            dataset.captions,
            token_folder(self.cache_root, self.encoder, dataset),
            progress=self.progress,
        )

    # --- Target ------------------------------------------------------------------------------
    def parameter_groups(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        return [], [p for p in self.model.parameters() if p.requires_grad]

    def loss(
        self, items: torch.Tensor, captions: torch.Tensor, flips: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, float]]:
        cand, target = self.training_lists(captions)
        sim = (self.queries[captions][:, None, :] * self.gallery[cand]).sum(-1)
        tokens, mask = self.views.texts(captions, self.config.max_text_tokens)
        text, pad = self.model.project_text(tokens, mask)
        images = self.model.project_image(self.views.image_tokens[cand.flatten()].float())
        match, _ = self.model.score_candidates(text, pad, images.reshape(*cand.shape, *images.shape[1:]))
        fused = self.options.dual_weight * sim + self.config.fusion_weight * match
        loss = listwise_loss(fused, target, self.settings.temperature)
        with torch.no_grad():
            hit = float((self.model.fuse(sim, match).argmax(1) == target).float().mean())
            base = float((sim.argmax(1) == target).float().mean())
        return loss, {"listwise": float(loss.detach()), "top1": hit, "dual_top1": base}

    def training_lists(self, captions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Candidate images ``[B, L]`` of each caption's training list and the column of its true image ``[B]``:
        all mined candidates (the default), or the positive, a fresh random draw of ``list_size - 1 -
        random_negatives`` mined negatives and ``random_negatives`` random gallery images (never the positive)."""
        mined = self.candidates[captions]
        pos = self.positives[captions]
        opts = self.options
        if self.list_size == mined.shape[1] and not opts.random_negatives:
            return mined, (mined == pos[:, None]).float().argmax(1)
        n_mined = self.list_size - 1 - opts.random_negatives
        keys = torch.rand(mined.shape, generator=self.generator).masked_fill(mined == pos[:, None], 2.0)
        picked = torch.gather(mined, 1, torch.topk(keys, n_mined, dim=1, largest=False).indices)
        n_gallery = len(self.gallery)
        rand = torch.randint(0, max(n_gallery - 1, 1), (len(pos), opts.random_negatives), generator=self.generator)
        rand = rand + (rand >= pos[:, None]).long()  # skip the positive
        cand = torch.cat([pos[:, None], picked, rand.clamp(max=n_gallery - 1)], dim=1)
        return cand, torch.zeros(len(pos), dtype=torch.long)

    def item_embeddings(self, captions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.views.image_pooled.float(), self.views.text_pooled[captions].float()

    @torch.no_grad()
    def validate(self, dataset: RetrievalDataset) -> dict[str, float]:
        key = (dataset.name, dataset.split, len(dataset.images), len(dataset.captions))
        if self._val.get("key") != key:
            views = self._views(dataset)
            self._val = {"key": key, "views": views, "sim": cosine_similarity(views.text_pooled, views.image_pooled)}
        was = self.model.training
        self.model.eval()
        try:
            sim = rerank_similarity(self._val["sim"], self._val["views"], Reranking(self.encoder, self.model))
        finally:
            self.model.train(was)
        metrics = dataset_metrics(sim, dataset)
        if any(k.startswith("i2t") for k in metrics):  # text queries are re-ranked; i2t keeps the dual ranking
            metrics.update({k: v for k, v in dataset_metrics(self._val["sim"], dataset).items() if k.startswith("i2t")})
        return {k: float(v) for k, v in metrics.items()}

    def state(self) -> dict[str, torch.Tensor]:
        return {f"reranker.{k}": v.detach().clone() for k, v in self.model.state_dict().items()}

    def load_state(self, tensors: dict[str, torch.Tensor]) -> None:
        expected = {f"reranker.{k}" for k in self.model.state_dict()}
        if set(tensors) != expected:
            raise ValueError(f"training state does not fit this re-ranker (e.g. {sorted(expected ^ set(tensors))[:3]})")
        own = self.model.state_dict()
        bad = [k for k in own if tuple(own[k].shape) != tuple(tensors[f"reranker.{k}"].shape)]
        if bad:
            raise ValueError(f"training state: re-ranker tensors of another shape (e.g. {bad[:3]})")
        self.model.load_state_dict({k: tensors[f"reranker.{k}"] for k in own})

    def export(self, folder: Path, info: dict[str, Any]) -> None:
        self.model.save(folder, card=info)

    def train(self, mode: bool = True) -> None:
        self.model.train(mode)

    def describe(self) -> dict[str, Any]:
        return {"target": self.name, "reranker": self.config.to_dict(), "encoder": self.encoder.name}
