"""The training loop of `calibclip train`: data, target, Adam + warm-up/cosine schedule, dual-curriculum
batches, AMP (CUDA), optional ``torchrun`` data parallelism, per-epoch validation on the validation split,
best/last checkpoints, crash-safe resume, logs and curves.

Output folder::

    OUT/resume.pt        training state (weights that train, optimiser, schedule, RNG, sampler plan, history),
                         replaced atomically after every completed step group; `--resume` continues from it
    OUT/best/, OUT/last/ model.safetensors + config.json: `calibclip.create_model("OUT/best")`
    OUT/train_log.csv, OUT/train_log.json, OUT/train_curves.png
"""

from __future__ import annotations

import csv
import json
import math
import os
import time
from pathlib import Path
from typing import Any

import torch

from calibclip.data.records import RetrievalDataset
from calibclip.training.config import TrainSettings
from calibclip.training.sampler import neighbour_table, plan_epoch
from calibclip.training.targets import Target, TrainData, train_data
from calibclip.utils import progress_bar

STATE_FORMAT = 1
#: Default validation split per dataset (model selection only ever uses it).
VAL_SPLITS = {"flickr8k": "dev", "karpathy": "val", "cuhkpedes": "val", "rstpreid": "val"}


def select_key(dataset: RetrievalDataset) -> str:
    """The validation metric that picks ``best``: person ``R@1``, captions ``t2i_R@1``."""
    return "R@1" if dataset.info.get("task") == "person" else "t2i_R@1"


# --------------------------------------------------------------------------------------------
# building blocks
# --------------------------------------------------------------------------------------------
def lr_lambda(total_steps: int, warmup_steps: int, warmup_factor: float, min_factor: float):
    """Linear warm-up from ``warmup_factor`` to 1 over ``warmup_steps``, then cosine to ``min_factor``."""

    def f(step: int) -> float:
        if step < warmup_steps:
            return warmup_factor + (1.0 - warmup_factor) * step / max(1, warmup_steps)
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return min_factor + (1.0 - min_factor) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return f


def build_optimizer(target: Target, s: TrainSettings) -> torch.optim.Optimizer:
    """Adam; new modules at ``lr * new_module_lr_mult``; no weight decay on biases and norms."""
    base, new = target.parameter_groups()
    if not base and not new:
        raise ValueError("nothing to train: the trainable selection is empty")
    groups = []
    for params, lr in ((base, s.lr), (new, s.lr * s.new_module_lr_mult)):
        decay = [p for p in params if p.ndim >= 2]
        plain = [p for p in params if p.ndim < 2]
        if decay:
            groups.append({"params": decay, "lr": lr, "weight_decay": s.weight_decay})
        if plain:
            groups.append({"params": plain, "lr": lr, "weight_decay": 0.0})
    return torch.optim.Adam(groups, lr=s.lr, betas=(0.9, 0.999), eps=1e-8)


def _atomic_torch_save(obj: Any, path: Path) -> None:
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_state(path: Path) -> dict[str, Any]:
    """Read a resume state; any damage is a clear error (never a silent restart)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise RuntimeError(
            f"{path} is corrupt or not a calibclip training state ({type(exc).__name__}: {exc}); "
            "restore it or start a new run in another --output-dir"
        ) from exc
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise RuntimeError(f"{path} is not a calibclip training state of format {STATE_FORMAT}")
    return state


def _plot(history: list[dict[str, Any]], key: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ax1.plot(epochs, [h["train_loss"] for h in history], marker="o")
    ax1.set_xlabel("epoch")
    ax1.set_ylabel("train loss")
    metric_keys = [k for k in history[0] if k.startswith("val_") and ("R@" in k or k in ("val_mAP", "val_mINP"))]
    for k in metric_keys:
        ax2.plot(epochs, [h[k] for h in history], marker=".", label=k[4:], linewidth=2 if k == f"val_{key}" else 1)
    ax2.set_xlabel("epoch")
    ax2.set_ylabel("validation (%)")
    ax2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# --------------------------------------------------------------------------------------------
# the run
# --------------------------------------------------------------------------------------------
class Trainer:
    """One training run (see the module doc). ``target_factory(settings, data, eval_sets, out) -> Target``
    lets callers (tests, the re-ranker) supply their own target; the default builds one from the model."""

    def __init__(
        self,
        settings: TrainSettings,
        output_dir: str | Path,
        checkpoint: str | None = None,
        resume: bool = False,
        progress: bool = True,
        command: str = "",
        target_factory: Any = None,
    ):
        self.s = settings
        self.out = Path(output_dir)
        self.checkpoint = checkpoint
        self.resume = resume
        self.progress = progress
        self.command = command
        self.target_factory = target_factory or default_target
        self.state_path = self.out / "resume.pt"
        self.world, self.rank = 1, 0

    # --- set-up ----------------------------------------------------------------------------
    def _check_output(self) -> dict[str, Any] | None:
        if self.resume:
            if not self.state_path.exists():
                raise FileNotFoundError(
                    f"--resume: {self.state_path} does not exist (nothing to resume); run without --resume to start"
                )
            state = load_state(self.state_path)
            if state["fingerprint"] != self.s.fingerprint() or state.get("checkpoint") != self.checkpoint:
                old = state["settings"]
                new = self.s.to_dict()
                diff = sorted(
                    k
                    for k in set(old) | set(new)
                    if old.get(k) != new.get(k)
                    and k not in ("eval_test", "eval_batch_size", "checkpoint_every", "device", "data_root")
                )
                if state.get("checkpoint") != self.checkpoint:
                    diff.append("checkpoint")
                raise RuntimeError(
                    f"--resume: {self.state_path} was written with other settings ({diff}); resume "
                    "with the same config and flags, or start a new run in another --output-dir"
                )
            return state
        if self.state_path.exists():
            raise RuntimeError(
                f"{self.out} already holds a training run ({self.state_path.name}); pass --resume to "
                "continue it or choose another --output-dir"
            )
        return None

    def _datasets(self) -> tuple[TrainData, RetrievalDataset, RetrievalDataset | None]:
        from calibclip.datasets import canonical_dataset, dataset_task, load_dataset

        if not self.s.dataset or not self.s.data_root:
            raise ValueError("give a dataset and its folder (config dataset:/data_root: or --dataset/--data-root)")
        name = canonical_dataset(self.s.dataset)
        if dataset_task(name) == "composed":
            raise ValueError(
                f"{name} is a composed-retrieval dataset: train its Combiner with calibclip train-combiner"
            )
        val_split = self.s.val_split or VAL_SPLITS.get(name)
        if not val_split:
            raise ValueError(f"{name} has no validation split; set training.val_split (never the test split)")
        if val_split == "test":
            raise ValueError("model selection uses a validation split only: training.val_split must not be 'test'")
        if val_split == self.s.train_split:
            raise ValueError(f"training.val_split and train_split are both {val_split!r}")
        train_split = load_dataset(name, self.s.data_root, self.s.train_split)
        if self.s.max_train_images:
            train_split = train_split.first_images(self.s.max_train_images)
        train = train_data(train_split)
        val = load_dataset(name, self.s.data_root, val_split)
        test = load_dataset(name, self.s.data_root, "test") if self.s.eval_test else None
        return train, val, test

    def _setup_distributed(self) -> None:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world > 1:  # torchrun: one process per GPU, batches split by rank, gradients averaged
            import torch.distributed as dist

            if not dist.is_initialized():
                dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
            self.world, self.rank = world, dist.get_rank()
            if torch.cuda.is_available():
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", self.rank)))

    # --- main ------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        s = self.s
        self._setup_distributed()
        self.out.mkdir(parents=True, exist_ok=True)
        state = self._check_output()
        torch.manual_seed(s.seed)
        data, val, test = self._datasets()
        eval_sets = [val] + ([test] if test is not None else [])
        target = self.target_factory(s, data, eval_sets, self.out, self.checkpoint)
        device = _target_device(target)
        use_amp = device.type == "cuda" and s.precision != "fp32"
        amp_dtype = torch.bfloat16 if s.precision == "bf16" else torch.float16
        if s.precision != "fp32" and device.type != "cuda":
            raise ValueError(f"training.precision {s.precision} (AMP) needs CUDA; use fp32 on {device.type}")
        scaler = torch.amp.GradScaler("cuda", enabled=use_amp and s.precision == "fp16")
        optimizer = build_optimizer(target, s)
        steps_per_epoch = data.size // s.batch_size
        if steps_per_epoch < 1:
            raise ValueError(f"the training split has {data.size} images, fewer than the batch size {s.batch_size}")
        total = steps_per_epoch * s.epochs
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lr_lambda(total, round(s.warmup_epochs * steps_per_epoch), s.warmup_factor, s.min_lr_factor)
        )
        key = select_key(val)
        history: list[dict[str, Any]] = []
        best = {"epoch": 0, "value": -1.0, "metrics": {}}
        epoch, step, plan = 1, 0, None
        sums: dict[str, float] = {}
        if state is not None:
            target.load_state(state["target"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            scaler.load_state_dict(state["scaler"])
            torch.set_rng_state(state["rng"])
            if torch.cuda.is_available() and state.get("cuda_rng") is not None:
                torch.cuda.set_rng_state_all(state["cuda_rng"])
            history, best = list(state["history"]), dict(state["best"])
            epoch, step, plan, sums = int(state["epoch"]), int(state["step"]), state["plan"], dict(state["sums"])
        t_run = time.perf_counter()

        def save(ep: int, st: int, pl: Any, sm: dict[str, float]) -> None:
            if self.rank != 0:
                return
            _atomic_torch_save(
                {
                    "format": STATE_FORMAT,
                    "fingerprint": s.fingerprint(),
                    "settings": s.to_dict(),
                    "checkpoint": self.checkpoint,
                    "epoch": ep,
                    "step": st,
                    "plan": pl,
                    "sums": sm,
                    "target": target.state(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "scaler": scaler.state_dict(),
                    "rng": torch.get_rng_state(),
                    "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
                    "history": history,
                    "best": best,
                },
                self.state_path,
            )

        while epoch <= s.epochs:
            t_epoch = time.perf_counter()
            if plan is None:
                plan = self._plan(target, data, epoch)
                step, sums = 0, {}
                save(epoch, 0, plan, sums)
            items_all, kinds_all = plan["items"], plan["kinds"]
            target.train(True)
            bar = progress_bar(
                total=steps_per_epoch,
                desc=f"epoch {epoch}/{s.epochs}",
                initial=step,
                disable=not self.progress or self.rank != 0,
            )
            while step < steps_per_epoch:
                if step % self.world == self.rank:
                    items = items_all[step]
                    captions = plan["captions"][items]
                    flips = plan["flips"][step]
                    with torch.autocast(device_type="cuda", dtype=amp_dtype, enabled=use_amp):
                        loss, parts = target.loss(items, captions, flips)
                    if not torch.isfinite(loss):
                        raise RuntimeError(
                            f"training loss became {float(loss.detach())} at epoch {epoch} step {step + 1} "
                            f"({parts}); stopped. "
                            f"The last good state is {self.state_path} and {self.out / 'last'}: lower --lr, use fp32, "
                            "or check the data"
                        )
                    optimizer.zero_grad(set_to_none=True)
                    scaler.scale(loss).backward()
                    if self.world > 1:
                        _average_gradients(optimizer, self.world)
                    if s.max_grad_norm > 0:
                        scaler.unscale_(optimizer)
                        torch.nn.utils.clip_grad_norm_(
                            [p for g in optimizer.param_groups for p in g["params"]], s.max_grad_norm
                        )
                    scaler.step(optimizer)
                    scaler.update()
                    sums["loss"] = sums.get("loss", 0.0) + float(loss.detach())
                    for k, v in parts.items():
                        sums[k] = sums.get(k, 0.0) + v
                    sums["count"] = sums.get("count", 0.0) + 1
                    sums["neighbours"] = sums.get("neighbours", 0.0) + float((kinds_all[step] > 0).float().mean())
                elif self.world > 1:
                    optimizer.zero_grad(set_to_none=True)
                scheduler.step()
                step += 1
                bar.update(1)
                bar.set_postfix(loss=f"{sums.get('loss', 0) / max(1, sums.get('count', 1)):.4f}")
                if s.checkpoint_every and step % s.checkpoint_every == 0 and step < steps_per_epoch:
                    save(epoch, step, plan, sums)
            bar.close()
            target.train(False)
            if self.rank == 0:
                row = self._epoch_row(target, val, key, epoch, sums, optimizer, plan, time.perf_counter() - t_epoch)
                history.append(row)
                info = {
                    "epoch": epoch,
                    "val_split": val.split,
                    "val_metrics": {k[4:]: v for k, v in row.items() if k.startswith("val_")},
                    "settings": s.to_dict(),
                    "command": self.command,
                    "select": key,
                }
                if row[f"val_{key}"] > best["value"]:
                    best = {"epoch": epoch, "value": row[f"val_{key}"], "metrics": info["val_metrics"]}
                    target.export(self.out / "best", info)
                target.export(self.out / "last", info)
                self._write_logs(history, key, best, None, time.perf_counter() - t_run)
            epoch, step, plan, sums = epoch + 1, 0, None, {}
            save(epoch, 0, None, sums)
        summary = self._write_logs(history, key, best, None, time.perf_counter() - t_run)
        if test is not None and self.rank == 0:
            # opt-in and reported only: the best epoch was chosen on the validation split before this
            from calibclip.models.registry import create_model

            best_model = create_model(self.out / "best")
            summary["test_metrics"] = _validate_encoder(best_model, test, s.eval_batch_size)
            summary = self._write_logs(history, key, best, summary["test_metrics"], summary["train_seconds"])
        return summary

    def _plan(self, target: Target, data: TrainData, epoch: int) -> dict[str, torch.Tensor]:
        """The epoch's caption choice, flips and batches (deterministic in (seed, epoch, model))."""
        s = self.s
        gen = torch.Generator().manual_seed(s.seed * 1_000_003 + epoch)
        counts = torch.tensor([len(c) for c in data.captions_of])
        pick = (torch.rand(data.size, generator=gen) * counts).long().clamp(max=counts - 1)
        captions = torch.tensor([data.captions_of[i][int(pick[i])] for i in range(data.size)])
        schedule = s.schedule()
        n_img, n_txt = schedule.counts(epoch, s.batch_size)
        img_table = txt_table = None
        if n_img or n_txt:
            target.train(False)
            img_emb, txt_emb = target.item_embeddings(captions)
            ids = data.identities
            img_table = neighbour_table(img_emb, schedule.neighbours, ids) if n_img else None
            txt_table = neighbour_table(txt_emb, schedule.neighbours, ids) if n_txt else None
        items, kinds = plan_epoch(data.size, s.batch_size, n_img, n_txt, gen, img_table, txt_table)
        flips = (
            (torch.rand(items.shape, generator=gen) < 0.5)
            if s.augment_flip
            else torch.zeros(items.shape, dtype=torch.bool)
        )
        return {
            "items": items,
            "kinds": kinds,
            "flips": flips,
            "captions": captions,
            "levels": torch.tensor(schedule.levels(epoch), dtype=torch.float64),
        }

    def _epoch_row(
        self,
        target: Target,
        val: RetrievalDataset,
        key: str,
        epoch: int,
        sums: dict[str, float],
        optimizer: torch.optim.Optimizer,
        plan: dict[str, torch.Tensor],
        seconds: float,
    ) -> dict[str, Any]:
        count = max(1.0, sums.get("count", 1.0))
        t0 = time.perf_counter()
        metrics = target.validate(val)
        row: dict[str, Any] = {"epoch": epoch, "train_loss": sums.get("loss", 0.0) / count}
        for k in ("infonce", "sdm", "id"):
            if k in sums:
                row[f"loss_{k}"] = sums[k] / count
        objective = getattr(target, "objective", None)
        row["temperature"] = objective.temperature() if objective is not None else float("nan")
        row["lr"] = float(optimizer.param_groups[0]["lr"])
        row["hardness_image"], row["hardness_text"] = (float(v) for v in plan["levels"])
        row["neighbour_share"] = sums.get("neighbours", 0.0) / count
        row.update({f"val_{k}": float(v) for k, v in metrics.items()})
        row["train_seconds"] = seconds
        row["validation_seconds"] = time.perf_counter() - t0
        return row

    def _write_logs(
        self,
        history: list[dict[str, Any]],
        key: str,
        best: dict[str, Any],
        test_metrics: dict[str, float] | None,
        seconds: float,
    ) -> dict[str, Any]:
        summary: dict[str, Any] = {
            "settings": self.s.to_dict(),
            "checkpoint": self.checkpoint,
            "command": self.command,
            "select": f"val_{key}",
            "best_epoch": best["epoch"],
            "best_val": best["metrics"],
            "train_seconds": seconds,
            "history": history,
        }
        if test_metrics is not None:
            summary["test_metrics"] = test_metrics
        if self.rank != 0 or not history:
            return summary
        fields = list(dict.fromkeys(k for row in history for k in row))
        tmp = self.out / ".train_log.csv.tmp"
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields)
            writer.writeheader()
            writer.writerows(history)
        os.replace(tmp, self.out / "train_log.csv")
        tmp = self.out / ".train_log.json.tmp"
        tmp.write_text(json.dumps(summary, indent=1, default=str))
        os.replace(tmp, self.out / "train_log.json")
        _plot(history, key, self.out / "train_curves.png")
        return summary


def _average_gradients(optimizer: torch.optim.Optimizer, world: int) -> None:
    import torch.distributed as dist

    for group in optimizer.param_groups:
        for p in group["params"]:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            dist.all_reduce(p.grad)
            p.grad /= world


def _target_device(target: Target) -> torch.device:
    enc = getattr(target, "encoder", None)
    return enc.device if enc is not None else torch.device("cpu")


def _validate_encoder(encoder: Any, dataset: RetrievalDataset, batch_size: int) -> dict[str, float]:
    from calibclip.evaluation.evaluator import cosine_similarity, dataset_metrics

    img = encoder.encode(images=list(dataset.images), batch_size=batch_size)
    txt = encoder.encode(texts=list(dataset.captions), batch_size=batch_size)
    return {k: float(v) for k, v in dataset_metrics(cosine_similarity(txt, img), dataset).items()}


def default_target(
    s: TrainSettings, data: TrainData, eval_sets: list[RetrievalDataset], out: Path, checkpoint: str | None
) -> Target:
    """A CLIP or starter target for the configured model (``checkpoint`` overrides ``model.name``)."""
    from calibclip.models.registry import create_model
    from calibclip.training.targets import CLIPTarget, StarterTarget

    source = checkpoint or s.model
    device = s.device
    if s.target == "reranker":
        from calibclip.training.reranker_target import RerankerTarget

        encoder = create_model(source, device=device)
        cache = Path(s.starter.cache_dir) if s.starter.cache_dir else out / "cache"
        return RerankerTarget(encoder, s, data, cache)
    person = data.dataset.info.get("task") == "person"
    size = tuple(int(v) for v in s.clip_image_size) if s.clip_image_size and person else None
    try:
        encoder = create_model(source, device=device)
    except ValueError as exc:  # e.g. an IRRA checkpoint trained at 384x128 (non-square position grid)
        if size is None or "square grid" not in str(exc):
            raise
        encoder = create_model(source, device=device, image_size=size)
    arch = encoder.config().get("arch")
    if arch == "CLIP" and size is not None and tuple(encoder.config().get("image_size", ())) != size:
        encoder = create_model(source, device=device, image_size=size)
    if arch == "CLIP":
        return CLIPTarget(encoder, s, data)
    if encoder.name == "starter":
        if s.starter.image_size is not None or s.starter.image_mode is not None:  # another input geometry
            encoder = create_model(
                source, device=device, image_hw=s.starter.image_size, image_mode=s.starter.image_mode
            )
        cache = Path(s.starter.cache_dir) if s.starter.cache_dir else out / "cache"
        return StarterTarget(encoder, s, data, cache, eval_sets)
    raise ValueError(f"{source}: training supports CLIP checkpoints and the starter, not {type(encoder).__name__}")


def train(
    settings: TrainSettings,
    output_dir: str | Path,
    checkpoint: str | None = None,
    resume: bool = False,
    progress: bool = True,
    command: str = "",
) -> dict[str, Any]:
    """Run (or resume) a training run; returns the summary written to ``OUT/train_log.json``."""
    return Trainer(settings, output_dir, checkpoint, resume, progress, command).run()
