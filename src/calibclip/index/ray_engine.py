"""The Ray engine of `build_index`: Ray Data reads the file list, decodes and preprocesses in
parallel tasks, encodes in a pool of stateful encoder actors (`map_batches` with a callable class:
the model is loaded once per actor; GPU actors when the cluster has GPUs), and hands batches back
to the driver in input order, which commits them to the store exactly as the local engine does
(same records, skipped-file reasons, ids, resume rule, crash safety).

Cluster: ``address=None`` starts a local Ray (``num_cpus``, default 2, no dashboard); an address
(``ray://HOST:10001``, ``HOST:6379`` or ``auto``) joins that cluster. The encoder object is
shipped to the actors as a constructor argument (so models that exist only in this process, e.g.
one passed as an `Encoder`, work too).
"""

from __future__ import annotations

import logging
import os
import re
import socket
import sys
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from calibclip.data.scan import ScannedFile
from calibclip.models.base import Encoder


def _ray() -> Any:
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError as exc:
        raise RuntimeError("the ray engine needs Ray Data: pip install 'calibclip[ray]'") from exc
    return ray


def decode_batch(batch: dict[str, np.ndarray], transform: Any) -> dict[str, np.ndarray]:
    """Ray task: decode + preprocess ``batch["path"]``, then hash each decoded file; bad files get their
    `ImageError` reason, and a file that vanishes (or becomes unreadable) after decoding gets the
    ``missing`` (``unreadable``) reason of `calibclip.index.build.file_facts`, as in the local engine."""
    import torch

    from calibclip.data.images import ImageError
    from calibclip.index.build import file_facts

    torch.set_num_threads(1)
    paths = [str(p) for p in batch["path"]]
    pixels: list[np.ndarray | None] = []
    reason, message, sha, width, height = [], [], [], [], []
    for p in paths:
        facts: dict[str, Any] | tuple[str, str]
        x = None
        try:
            x = np.asarray(transform(p), dtype=np.float32)
            facts = file_facts(p)
        except ImageError as exc:
            facts = (exc.reason, str(exc))
        except MemoryError:
            facts = ("too_large", f"{p}: out of memory while decoding")
        if isinstance(facts, tuple):
            pixels.append(None)
            reason.append(facts[0])
            message.append(facts[1])
            sha.append("")
            width.append(-1)
            height.append(-1)
            continue
        pixels.append(x)
        reason.append("")
        message.append("")
        sha.append(facts["sha256"])
        width.append(-1 if facts["width"] is None else facts["width"])
        height.append(-1 if facts["height"] is None else facts["height"])
    shape = next((x.shape for x in pixels if x is not None), (3, 1, 1))
    stacked = np.stack([x if x is not None else np.zeros(shape, np.float32) for x in pixels])
    return {
        "i": np.asarray(batch["i"], dtype=np.int64),
        "pixels": stacked,
        "reason": np.asarray(reason, dtype=object),
        "message": np.asarray(message, dtype=object),
        "sha256": np.asarray(sha, dtype=object),
        "width": np.asarray(width, dtype=np.int64),
        "height": np.asarray(height, dtype=np.int64),
    }


def good_pixels(pixels: np.ndarray, ok: np.ndarray) -> np.ndarray:
    """The rows of the decoded images. A decode task whose files all failed sends a (3, 1, 1)
    placeholder per row; when Ray Data re-batches it with real images the column arrives as an object
    array of differently shaped rows, of which the good ones are stacked."""
    if pixels.dtype == object:
        return np.stack([np.asarray(x, dtype=np.float32) for x, good in zip(pixels, ok, strict=True) if good])
    return pixels[ok]


class EncoderActor:
    """Ray actor: holds one encoder (and calibrator) and encodes decoded batches."""

    def __init__(
        self, encoder: Encoder, calibrate: bool, calibration: dict[str, Any] | None, method: str | None, threads: int
    ):
        import ray
        import torch

        from calibclip.index.build import _feature_fn

        torch.set_num_threads(max(1, threads))
        if torch.cuda.is_available() and ray.get_gpu_ids():
            encoder = encoder.to("cuda")
        self.encoder = encoder.eval()
        self.fn, _ = _feature_fn(encoder, calibrate, calibration, method)
        self.sets = ["raw", "calibrated"] if calibrate else ["raw"]

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        ok = np.asarray([r == "" for r in batch["reason"]], dtype=bool)
        out = {k: v for k, v in batch.items() if k != "pixels"}
        dim = int(self.encoder.embed_dim)
        for name in self.sets:
            out[name] = np.zeros((len(ok), dim), dtype=np.float32)
        if ok.any():
            with torch.inference_mode():
                px = torch.from_numpy(np.ascontiguousarray(good_pixels(batch["pixels"], ok)))
                feats = self.fn(px.to(self.encoder.device, self.encoder.dtype))
            for name in self.sets:
                out[name][ok] = feats[name].float().cpu().numpy()
        return out


class Watchdog(threading.Thread):
    """Pings the Ray cluster's GCS every ``interval`` s; after ``tries`` failures in a row it calls
    ``on_lost`` while holding ``lock`` (the commit loop holds it while a batch is committed).

    Ray's own driver terminates the process about a minute after its cluster disappears, with a
    message about the GCS; this says first, in one line, what happened and that the work is kept."""

    def __init__(
        self,
        ping: Callable[[], bool],
        on_lost: Callable[[], None],
        lock: threading.Lock,
        interval: float = 2.0,
        tries: int = 3,
    ):
        super().__init__(daemon=True, name="calibclip-ray-watchdog")
        self.ping, self.on_lost, self.lock, self.interval, self.tries = ping, on_lost, lock, interval, tries
        self.stopped = threading.Event()

    def run(self) -> None:
        failures = 0
        while not self.stopped.wait(self.interval):
            failures = 0 if self.ping() else failures + 1
            if failures >= self.tries:
                with self.lock:
                    if not self.stopped.is_set():
                        self.on_lost()
                return

    def stop(self) -> None:
        self.stopped.set()


def gcs_ping(address: str) -> Callable[[], bool]:
    """A TCP connect to the GCS at ``HOST:PORT``."""
    host, _, port = address.rpartition(":")

    def ping() -> bool:
        try:
            socket.create_connection((host, int(port)), timeout=2).close()
            return True
        except OSError:
            return False

    return ping


def _start(ray: Any, options: Mapping[str, Any]) -> bool:
    """Connect to (or start) Ray; True when this call started it (and must shut it down)."""
    logging.getLogger("ray").setLevel(logging.WARNING)
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    if ray.is_initialized():
        return False
    env = {"env_vars": {"PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}}
    address = options.get("address")
    try:
        if address:
            ray.init(address=address, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
        else:
            ray.init(
                address="local",
                num_cpus=int(options.get("num_cpus") or 2),
                include_dashboard=False,
                log_to_driver=False,
                logging_level="ERROR",
                runtime_env=env,
            )
    except Exception as exc:  # ConnectionError, RuntimeError, ... from ray.init
        where = f"the Ray cluster at {address}" if address else "a local Ray cluster"
        raise RuntimeError(
            f"cannot start or join {where} ({str(exc).strip().splitlines()[0] if str(exc) else exc!r})"
        ) from exc
    return True


def ray_batches(
    todo: Sequence[ScannedFile],
    encoder: Encoder,
    calibrate: bool,
    calibration: dict[str, Any] | None,
    calibration_method: str | None,
    batch_size: int,
    options: Mapping[str, Any],
) -> Iterator[tuple[list[dict[str, Any]], list[tuple], dict[str, np.ndarray]]]:
    """Encode ``todo`` with Ray; yields ``(records, skipped, vectors)`` in input order, like
    `calibclip.index.build.local_batches`.

    Raises:
        ValueError: bad ``num_workers`` / ``gpus_per_worker``.
        RuntimeError: Ray missing, unreachable, or lost mid-run (batches already yielded are committed).
    """
    num_workers = int(options.get("num_workers") or 1)
    if num_workers < 1:
        raise ValueError(f"num_workers must be >= 1, got {num_workers}")
    gpus = options.get("gpus_per_worker")
    if gpus is not None and float(gpus) < 0:
        raise ValueError(f"gpus_per_worker must be >= 0, got {gpus}")
    if not todo:
        return
    ray = _ray()
    started = _start(ray, options)
    committed = 0
    lock = threading.Lock()
    where = options.get("address") or "(local)"

    def lost() -> None:
        sys.stderr.write(f"\ncalibclip index: error: {_lost(committed, len(todo), where)}\n")
        sys.stderr.flush()
        os._exit(2)

    watchdog = Watchdog(gcs_ping(ray.get_runtime_context().gcs_address), lost, lock)
    watchdog.start()
    try:
        resources = ray.cluster_resources()
        if gpus is None:
            gpus = 1.0 if resources.get("GPU", 0) >= 1 else 0.0
        cpus = float(resources.get("CPU", 1))
        actor_cpus = 1.0 if gpus else max(0.1, min(1.0, (cpus - 0.5) / num_workers))
        ctx = ray.data.DataContext.get_current()
        ctx.execution_options.preserve_order = True  # ids are given in commit order: keep the scan order
        ctx.enable_progress_bars = False
        ctx.print_on_execution_start = False
        sets = ["raw", "calibrated"] if calibrate else ["raw"]
        ds = ray.data.from_items(
            [{"i": i, "path": str(f.path)} for i, f in enumerate(todo)],
            override_num_blocks=max(1, min(len(todo) // max(batch_size, 1), 1000)),
        )
        ds = ds.map_batches(
            decode_batch,
            batch_size=batch_size,
            batch_format="numpy",
            fn_kwargs={"transform": encoder.preprocess},
            num_cpus=0.5,
        )
        ds = ds.map_batches(
            EncoderActor,
            batch_size=batch_size,
            batch_format="numpy",
            fn_constructor_args=(encoder, calibrate, calibration, calibration_method, max(1, int(actor_cpus))),
            compute=ray.data.ActorPoolStrategy(size=num_workers),
            num_gpus=float(gpus),
            num_cpus=actor_cpus,
        )
        for batch in ds.iter_batches(batch_size=batch_size, batch_format="numpy", prefetch_batches=1):
            records, skipped, keep = [], [], []
            for j, i in enumerate(batch["i"].tolist()):
                f = todo[i]
                if batch["reason"][j]:
                    skipped.append((f.relpath, f.size, f.mtime_ns, str(batch["reason"][j]), str(batch["message"][j])))
                    continue
                w, h = int(batch["width"][j]), int(batch["height"][j])
                records.append(
                    {
                        "path": f.relpath,
                        "size": f.size,
                        "mtime_ns": f.mtime_ns,
                        "sha256": str(batch["sha256"][j]),
                        "width": None if w < 0 else w,
                        "height": None if h < 0 else h,
                    }
                )
                keep.append(j)
            vectors = {name: np.asarray(batch[name][keep], dtype=np.float32) for name in sets} if keep else {}
            with lock:  # the watchdog never ends the process while the caller commits this batch
                yield records, skipped, vectors
            committed += len(records) + len(skipped)
    except Exception as exc:
        if not _is_ray_error(ray, exc):
            raise
        raised = task_exception(exc) if isinstance(exc, ray.exceptions.RayTaskError) else None
        if raised is not None:
            raise RuntimeError(  # our code (decoding / encoding) raised inside a task: not a cluster failure
                f"a Ray task failed after {committed} of {len(todo)} files ({raised}); "
                "everything committed so far is kept"
            ) from exc
        first = (_plain(str(exc)).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise RuntimeError(_lost(committed, len(todo), where, f"{type(exc).__name__}: {first}")) from exc
    finally:
        watchdog.stop()
        if started:
            try:
                ray.shutdown()
            except Exception:  # the cluster is already gone
                pass


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_RAISED = re.compile(r"^([A-Za-z_][\w.]*): (.*)$")


def _plain(text: str) -> str:
    return _ANSI.sub("", text)


def task_exception(exc: BaseException) -> str | None:
    """``"ValueError: message"`` of the exception our code raised inside a Ray task, read from the
    remote traceback a `RayTaskError` carries (Ray Data wraps it in a ``UserCodeException`` and does not
    ship the original object); None when the failure is Ray's own (a worker or node died)."""
    found = None
    for line in _plain(str(exc)).splitlines():
        m = _RAISED.match(line)
        if m and not m.group(1).startswith("ray"):
            found = f"{m.group(1).rpartition('.')[2]}: {m.group(2).strip()[:200]}"
    return found


def _is_ray_error(ray: Any, exc: BaseException) -> bool:
    return isinstance(exc, (ray.exceptions.RayError, ConnectionError)) or type(exc).__module__.startswith("ray")


def _lost(done: int, total: int, where: str, detail: str = "its GCS stopped answering") -> str:
    return (
        f"the Ray cluster {where} failed mid-run after {done} of {total} files ({detail}); "
        "everything committed so far is kept: run the same command again to resume"
    )
