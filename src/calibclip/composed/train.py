"""Training the Combiner on cached encoder features (CLIP4Cir's second stage).

Features of every train/val image and query text are extracted once through the
`FeatureCache`; an epoch then only runs the small Combiner. Loss: batch-based contrastive loss
with the fixed logit scale 100 (a batch's other queries with the very same target image are not
used as negatives); optimiser: Adam. FashionIQ queries use a random one of their
four caption variants each epoch (both captions in either order, or one alone).

Unset recipe settings (learning rate, sizes, batch, epochs, dropout) come from the encoder's
measured recipe in ``calibclip/configs/composed.yaml`` (`resolve_config`); the run records which
recipe it used (``summary.json`` ``recipe``).

A run directory holds ``last.pt`` (resume point: weights, optimiser, RNG, history), ``best.pt``
(best validation epoch by the dataset's headline metric: FashionIQ ``avg``, CIRR ``avg``, CSS
``R@1``), ``baselines.json`` (sum / image / text on the validation split), ``log.csv``,
``log.json`` and ``curves.png``.
"""

from __future__ import annotations

import csv
import json
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from calibclip.composed.baselines import build_combining
from calibclip.composed.combiner import Combiner, combiner_record
from calibclip.composed.defaults import RECIPE_KEYS, composed_defaults
from calibclip.composed.evaluate import (
    VAL_SPLIT,
    ComposedFeatures,
    composed_spec,
    extract_features,
    headline_metric,
    load_composed,
    metrics_from_features,
)
from calibclip.data.cache import FeatureCache
from calibclip.models.base import Encoder
from calibclip.utils import progress_bar

#: Settings that must match when resuming (the number of epochs may grow).
RESUME_KEYS = ("dataset", "batch_size", "lr", "proj_mult", "hidden_mult", "dropout", "normalize_inputs", "seed")


@dataclass
class TrainConfig:
    """Combiner training settings. ``None`` means the encoder's recipe (`resolve_config`); the
    validation split defaults to the dataset's (``dev`` for pseudo-CIR, else ``val``)."""

    dataset: str
    epochs: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    proj_mult: float | None = None
    hidden_mult: float | None = None
    dropout: float | None = None
    normalize_inputs: bool | None = None
    seed: int = 0
    train_split: str = "train"
    val_split: str | None = None
    #: Filled by `resolve_config`: the composed.yaml entry and the fields it supplied.
    recipe: str = ""
    recipe_fields: tuple[str, ...] = ()


def resolve_config(config: TrainConfig, encoder_name: str | None) -> TrainConfig:
    """``config`` with every unset recipe field taken from the encoder's measured recipe
    (``calibclip/configs/composed.yaml``; the ``"*"`` entry is CLIP4Cir's recipe)."""
    defaults = composed_defaults(encoder_name, config.dataset)
    fields = tuple(k for k in RECIPE_KEYS if getattr(config, k) is None)
    types = (float, float, float, int, int, float, bool)
    values = {k: type_(defaults["recipe"][k]) for k, type_ in zip(RECIPE_KEYS, types) if k in fields}
    return replace(
        config,
        **values,
        val_split=config.val_split or VAL_SPLIT.get(config.dataset, "val"),
        recipe=defaults["key"],
        recipe_fields=fields,
    )


def describe_recipe(config: TrainConfig) -> str:
    """One line: the settings in use and where they came from."""
    settings = ", ".join(
        f"{k} {getattr(config, k)}" if isinstance(getattr(config, k), bool) else f"{k} {getattr(config, k):g}"
        for k in RECIPE_KEYS
    )
    source = (
        f"recipe {config.recipe!r} of calibclip/configs/composed.yaml"
        if config.recipe_fields
        else "all given on the command line"
    )
    given = [k for k in RECIPE_KEYS if k not in config.recipe_fields]
    extra = f" (given: {', '.join(given)})" if config.recipe_fields and given else ""
    return f"Combiner recipe: {settings}; from {source}{extra}"


def _training_tensors(
    datasets: list, features: list[ComposedFeatures]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Concatenate the splits' records: (image features, reference idx, target idx, text options [N, V, D])."""
    images, refs, targets, texts, offset = [], [], [], [], 0
    for ds, f in zip(datasets, features):
        images.append(f.images)
        refs.append(torch.as_tensor(ds.reference) + offset)
        targets.append(torch.as_tensor(ds.target) + offset)
        texts.append(f.variants if f.variants is not None else f.texts[:, None, :])
        offset += len(ds.images)
    return torch.cat(images), torch.cat(refs), torch.cat(targets), torch.cat(texts)


def _write_logs(out: Path, history: list[dict[str, Any]], headline: str, baselines: dict[str, dict]) -> None:
    (out / "log.json").write_text(json.dumps(history, indent=1))
    keys = list(dict.fromkeys(k for row in history for k in row))
    with open(out / "log.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=keys)
        writer.writeheader()
        writer.writerows(history)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [row["epoch"] for row in history]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ax1.plot(epochs, [row["loss"] for row in history], marker="o")
    ax1.set(xlabel="epoch", ylabel="train loss", title="contrastive loss")
    ax2.plot(epochs, [row[headline] for row in history], marker="o", label="combiner")
    for name, metrics in baselines.items():
        ax2.axhline(
            metrics[headline], linestyle="--", color={"sum": "C1", "image": "C2", "text": "C3"}[name], label=name
        )
    ax2.set(xlabel="epoch", ylabel=f"val {headline} (%)", title="validation")
    ax2.legend()
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=100)
    plt.close(fig)


def train_combiner(
    encoder: Encoder,
    data_root: str | Path,
    out_dir: str | Path,
    config: TrainConfig,
    cache: FeatureCache | None = None,
    image_batch_size: int = 32,
    workers: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """Train (or resume training) a Combiner; returns a summary with the best validation metrics,
    the baselines, the recipe used and timings. Re-running with the same ``out_dir`` resumes from ``last.pt``."""
    composed_spec(config.dataset)  # ValueError listing the composed datasets
    config = resolve_config(config, encoder.name)
    assert config.epochs is not None and config.batch_size is not None and config.lr is not None
    if progress:
        print(describe_recipe(config), flush=True)
    if config.epochs < 1 or config.batch_size < 2 or config.lr <= 0:
        raise ValueError("need epochs >= 1, batch size >= 2 and a positive learning rate")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cache = cache or FeatureCache()
    headline = headline_metric(config.dataset)
    fingerprint = encoder.fingerprint()

    t0 = time.perf_counter()
    train_sets = load_composed(config.dataset, data_root, config.train_split)
    val_sets = load_composed(config.dataset, data_root, str(config.val_split))
    if not all(ds.has_targets for ds in train_sets + val_sets):
        raise ValueError(f"the {config.train_split}/{config.val_split} splits of {data_root} must have targets")
    t_feat = time.perf_counter()
    train_feats = [
        extract_features(encoder, ds, cache, image_batch_size, workers, variants=True, progress=progress)
        for ds in train_sets
    ]
    val_feats = [extract_features(encoder, ds, cache, image_batch_size, workers, progress=progress) for ds in val_sets]
    feature_time = time.perf_counter() - t0
    n_images = sum(len(ds.images) for ds in train_sets + val_sets)
    rate = n_images / max(time.perf_counter() - t_feat, 1e-9)
    if progress:
        print(
            f"features: {n_images} images in {time.perf_counter() - t_feat:.1f} s ({rate:.1f} images/s, "
            f"{workers} decoding workers; cached features load instantly)",
            flush=True,
        )
    images, refs, targets, texts = _training_tensors(train_sets, train_feats)
    n = len(refs)

    torch.manual_seed(config.seed)
    assert config.proj_mult is not None and config.hidden_mult is not None and config.dropout is not None
    model = Combiner.for_features(
        images.shape[1],
        config.proj_mult,
        config.hidden_mult,
        dropout=config.dropout,
        normalize_inputs=bool(config.normalize_inputs),
    )
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    generator = torch.Generator().manual_seed(config.seed)
    history: list[dict[str, Any]] = []
    best_value, best_epoch, start_epoch, train_time = float("-inf"), 0, 0, 0.0
    last_path, best_path = out / "last.pt", out / "best.pt"
    if last_path.exists():
        state = torch.load(last_path, map_location="cpu", weights_only=True)
        saved = state["train_config"]
        changed = {k: (saved.get(k), getattr(config, k)) for k in RESUME_KEYS if saved.get(k) != getattr(config, k)}
        if changed or state["encoder_fingerprint"] != fingerprint:
            raise ValueError(
                f"{last_path} belongs to another run (changed: {changed or 'encoder'}); "
                "use a new --out directory or the original settings"
            )
        model.load_state_dict(state["state_dict"])
        optimizer.load_state_dict(state["optimizer"])
        generator.set_state(state["generator"])
        history, start_epoch = list(state["history"]), int(state["epoch"])
        best_value, best_epoch, train_time = (
            float(state["best_value"]),
            int(state["best_epoch"]),
            float(state["train_time"]),
        )
    baselines_path = out / "baselines.json"
    if baselines_path.exists():
        baselines = json.loads(baselines_path.read_text())
    else:
        baselines = {
            name: metrics_from_features(config.dataset, val_sets, val_feats, build_combining(name, encoder=encoder))
            for name in ("sum", "image", "text")
        }
        baselines_path.write_text(json.dumps(baselines, indent=1))

    def combine(image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        return model(image.float(), text.float())

    for epoch in range(start_epoch + 1, config.epochs + 1):
        started = time.perf_counter()
        torch.manual_seed(config.seed * 100003 + epoch)  # dropout noise, reproducible across resumes
        model.train()
        perm = torch.randperm(n, generator=generator)
        choice = torch.randint(texts.shape[1], (n,), generator=generator)
        total, steps = 0.0, 0
        bar = progress_bar(total=n, desc=f"epoch {epoch}/{config.epochs}", disable=not progress)
        for s in range(0, n, config.batch_size):
            idx = perm[s : s + config.batch_size]
            if len(idx) < 2:
                continue
            loss = model.loss(images[refs[idx]], texts[idx, choice[idx]], images[targets[idx]], targets[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total, steps = total + float(loss.item()), steps + 1
            bar.update(len(idx))
            bar.set_postfix(loss=f"{total / steps:.4f}")
        bar.close()
        train_time += time.perf_counter() - started
        model.eval()
        with torch.inference_mode():
            metrics = metrics_from_features(config.dataset, val_sets, val_feats, combine)
        row = {"epoch": epoch, "loss": total / max(steps, 1), "train_time_s": round(train_time, 3), **metrics}
        history.append(row)
        improved = metrics[headline] > best_value
        if improved:
            best_value, best_epoch = metrics[headline], epoch
            torch.save(
                combiner_record(
                    model,
                    fingerprint,
                    epoch=epoch,
                    metrics=metrics,
                    dataset=config.dataset,
                    encoder_name=encoder.name,
                    train_config=asdict(config),
                ),
                best_path.with_suffix(".tmp"),
            )
            best_path.with_suffix(".tmp").replace(best_path)
        record = combiner_record(
            model,
            fingerprint,
            optimizer=optimizer.state_dict(),
            generator=generator.get_state(),
            epoch=epoch,
            history=history,
            best_value=best_value,
            best_epoch=best_epoch,
            train_time=train_time,
            train_config=asdict(config),
        )
        torch.save(record, last_path.with_suffix(".tmp"))
        last_path.with_suffix(".tmp").replace(last_path)
        _write_logs(out, history, headline, baselines)
        if progress:
            print(
                f"epoch {epoch}: loss {row['loss']:.4f}  val {headline} {metrics[headline]:.2f}"
                f"{'  (best)' if improved else ''}",
                flush=True,
            )
    best = next((row for row in history if row["epoch"] == best_epoch), {})
    summary = {
        "dataset": config.dataset,
        "run_dir": str(out),
        "encoder": fingerprint,
        "best_epoch": best_epoch,
        "headline": headline,
        "best": {k: v for k, v in best.items() if k not in ("epoch", "loss", "train_time_s")},
        "baselines": baselines,
        "train_time_s": round(train_time, 2),
        "feature_time_s": round(feature_time, 2),
        "train_pairs": n,
        "config": asdict(config),
        "recipe": config.recipe,
        "recipe_fields": list(config.recipe_fields),
        "feature_images_per_s": round(rate, 2),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary
