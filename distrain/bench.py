"""``distrain bench loader``: how many images/s can this node feed, against the reference pipeline.

Pipelines, measured with the same DataLoader worker count and batch size, alternating in rounds so
that machine drift hits all of them alike:

- ``distrain``: the training stream (shards, reduced JPEG decode, RandomResizedCrop, flip, uint8
  batches built in the workers) at each resolution;
- ``torchvision``: what users would write otherwise (ImageFolder + RandomResizedCrop +
  RandomHorizontalFlip + PILToTensor + ConvertImageDtype + Normalize, default collate);
- ``decode``: the decode-only floor, a full-size PIL decode to RGB of the same files.

Without ``--data`` it builds an ImageNet-like JPEG set from the real photographs bundled with
scikit-learn: random crops rescaled to a short side of 300-500 px, aspect 3:4 to 4:3, quality 90.
``--data`` given as shards is sampled into such a tree first, so that the three pipelines still
read the same files: the bench measures the CPU cost of the user's own images, not their storage.
"""

from __future__ import annotations

import hashlib
import random
import statistics
import time
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from distrain.data.decode import JPEG_MAGIC, image_size
from distrain.data.index import INDEX_NAME
from distrain.data.shards import reads_for_range, resolve_shards
from distrain.data.stream import Augment, ShardStream, make_loader, read_samples
from distrain.errors import DistrainError

PIPELINES = ("distrain", "torchvision", "decode")


def make_photo_set(out: Path, count: int = 2000, classes: int = 10, seed: int = 0) -> Path:
    """Write ``count`` photo-like JPEGs as ``out/train/<class>/NNNNN.jpg`` (once; reused if complete).

    Returns:
        The folder holding the class folders' parent split (``out``).
    """
    from sklearn.datasets import load_sample_images

    root = out / "train"
    if root.is_dir() and sum(1 for _ in root.glob("*/*.jpg")) == count:
        return out
    photos = [Image.fromarray(a) for a in load_sample_images().images]
    rng = random.Random(seed)
    for c in range(classes):
        (root / f"c{c:02d}").mkdir(parents=True, exist_ok=True)
    for i in range(count):
        photo = photos[i % len(photos)]
        w, h = photo.size
        aspect = rng.uniform(3 / 4, 4 / 3)
        most = min(w, int(h * aspect))  # the widest crop of this aspect that fits
        cw = rng.randint(most // 2, most)
        ch = round(cw / aspect)
        left, top = rng.randint(0, w - cw), rng.randint(0, h - ch)
        crop = photo.crop((left, top, left + cw, top + ch))
        short = rng.randint(300, 500)
        scale = short / min(crop.size)
        img = crop.resize((round(crop.size[0] * scale), round(crop.size[1] * scale)), Image.BILINEAR)
        if rng.random() < 0.5:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        img.save(root / f"c{i % classes:02d}" / f"{i:05d}.jpg", quality=90)
    return out


def sample_shards(spec: str, out: Path, count: int) -> Path:
    """Copy the first ``count`` usable samples of a shard set into ``out/train/<class>/<key>.<ext>``.

    Written once and reused while complete. Bad samples (no image or label, or an image whose
    header no decoder reads) are passed over, as the training stream would skip them.

    Returns:
        ``out``, a tree that :func:`bench_loader` reads like any image folder.

    Raises:
        DistrainError: ``spec`` names no shards, or they hold no usable sample.
    """
    shard_set = resolve_shards(spec)
    root = out / "train"
    if root.is_dir() and sum(1 for _ in root.glob("*/*")) == min(count, shard_set.total):
        return out
    classes = shard_set.classes
    # Without class names in the index any label is accepted; it only names a folder here.
    reads = reads_for_range(list(shard_set.shards), 0, shard_set.total)
    written = 0
    for sample in read_samples(reads, len(classes) or 2**31):
        if sample.bad or not _readable(sample.data):
            continue
        folder = root / (classes[sample.label] if classes else f"c{sample.label}")
        folder.mkdir(parents=True, exist_ok=True)
        ext = "jpg" if sample.data[:2] == JPEG_MAGIC else "png"
        (folder / f"{written:06d}-{sample.key}.{ext}").write_bytes(sample.data)
        written += 1
        if written == count:
            break
    if not written:
        raise DistrainError(f"--data {spec}: the shards hold no usable sample")
    return out


class _Decode(Dataset):
    """Full-size decode to RGB, returning the size only (the floor: no crop, resize or copy)."""

    def __init__(self, files: list[Path]):
        self.files = files

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> torch.Tensor:
        with Image.open(self.files[i]) as im:
            rgb = im.convert("RGB")
        return torch.tensor(rgb.size)


def _torchvision_loader(folder: Path, res: int, batch: int, workers: int) -> DataLoader:
    from torchvision import datasets, transforms

    t = transforms.Compose([
        transforms.RandomResizedCrop(res),
        transforms.RandomHorizontalFlip(),
        transforms.PILToTensor(),
        transforms.ConvertImageDtype(torch.float),
        transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
    ])
    return DataLoader(datasets.ImageFolder(str(folder), t), batch_size=batch, shuffle=True, num_workers=workers,
                      drop_last=True, persistent_workers=False)


def _distrain_loader(shards: Path, res: int, batch: int, workers: int, epoch: int) -> DataLoader:
    shard_set = resolve_shards(str(shards))
    stream = ShardStream(shard_set, rank=0, world_size=1, batch_size=batch, seed=0, num_classes=len(shard_set.classes),
                         augment=Augment(res, (0.08, 1.0), (3 / 4, 4 / 3), True),
                         batches_per_epoch=shard_set.total // batch)
    stream.set_position(epoch)
    return make_loader(stream, workers, prefetch=2, pin_memory=False)


def _rate(loader: DataLoader, batches: int, batch: int) -> float:
    """Images/s over ``batches`` batches, after the first (worker start-up) is discarded."""
    it = iter(loader)
    next(it)
    start = time.perf_counter()
    n = 0
    for _ in range(batches):
        try:
            next(it)
        except StopIteration:
            break
        n += 1
    elapsed = time.perf_counter() - start
    del it
    return n * batch / elapsed


def bench_loader(data: str | Path | None, workers: int, resolutions: list[int], batch: int = 64, rounds: int = 3,
                 batches: int = 20, work_dir: Path = Path("runs/bench"), images: int = 2000) -> dict:
    """Measure the pipelines (see the module docstring) and return images/s and ratios.

    Args:
        data: A class-per-folder tree (``train/<class>/*.jpg`` or ``<class>/*.jpg``), or a shard
            spec (a shard-set directory, tar, glob or brace pattern) whose first ``images`` samples
            are copied into such a tree; None builds the photo set in ``work_dir``. Shards are
            written from the tree for the distrain stream.
        workers: DataLoader worker processes for every pipeline.
        resolutions: Training resolutions to measure.
        batch: Batch size for every pipeline.
        rounds: Alternating rounds; each figure is the median over rounds.
        batches: Batches timed per pipeline per round.
        work_dir: Where the generated photo set and the shards go.
        images: Size of the generated photo set, or of the sample of ``data`` given as shards.

    Returns:
        ``{"images_per_s": {pipeline: {res: value}}, "ratios": {"vs_torchvision": {res: r},
        "vs_decode": {res: r}}, "workers": workers, "batch": batch, "images": n}``
    """
    from distrain.data.writer import write_folder

    if data is None:
        data = make_photo_set(work_dir / f"photos-{images}", count=images)
    elif is_shard_spec(data):
        data = sample_shards(str(data), work_dir / f"sample-{images}-{_slug(data)}", images)
    data = Path(data)
    folder = data / "train" if (data / "train").is_dir() else data
    files = sorted(p for p in folder.glob("*/*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    if len(files) < batch * (batches + 1):
        raise DistrainError(f"--data {data}: {len(files)} images, need at least {batch * (batches + 1)}")
    shards = work_dir / f"shards-{_slug(folder)}-{len(files)}"
    if not (shards / "train" / INDEX_NAME).is_file():
        write_folder(data, shards, samples_per_shard=500, overwrite=True, progress=False)
    results: dict[str, dict[int, list[float]]] = {p: {r: [] for r in resolutions} for p in PIPELINES}
    for k in range(rounds):
        for res in resolutions:
            order = PIPELINES if k % 2 == 0 else PIPELINES[::-1]
            for pipeline in order:
                if pipeline == "distrain":
                    loader = _distrain_loader(shards / "train", res, batch, workers, epoch=k)
                elif pipeline == "torchvision":
                    loader = _torchvision_loader(folder, res, batch, workers)
                else:
                    loader = DataLoader(_Decode(files), batch_size=batch, shuffle=True, num_workers=workers)
                results[pipeline][res].append(_rate(loader, batches, batch))
    rates = {p: {r: statistics.median(v) for r, v in by_res.items()} for p, by_res in results.items()}
    return {
        "images_per_s": rates,
        "ratios": {
            "vs_torchvision": {r: rates["distrain"][r] / rates["torchvision"][r] for r in resolutions},
            "vs_decode": {r: rates["distrain"][r] / rates["decode"][r] for r in resolutions},
        },
        "data": str(folder),
        "workers": workers,
        "batch": batch,
        "images": len(files),
    }


def _readable(data: bytes) -> bool:
    try:
        image_size(data)
    except Exception:  # PIL raises many types for bytes that are no image; all mean the same here
        return False
    return True


def is_shard_spec(data: str | Path) -> bool:
    """Whether ``--data`` names shards (a tar, a pattern, or a directory with a shard index)."""
    path = Path(data)
    return not path.is_dir() or (path / INDEX_NAME).is_file()


def _slug(data: str | Path) -> str:
    return hashlib.sha1(str(Path(data).resolve()).encode()).hexdigest()[:10]


def format_loader(result: dict) -> str:
    """The bench as a table: images/s (per worker) per pipeline and resolution, and the ratios."""
    w = max(result["workers"], 1)
    rates, ratios = result["images_per_s"], result["ratios"]
    lines = [f"{'res':>5}  {'distrain':>16}  {'torchvision':>16}  {'decode-only':>16}  {'vs torchvision':>14}  "
             f"{'vs decode':>9}"]
    for r in rates["distrain"]:
        cells = "  ".join(f"{rates[p][r]:>7.0f} ({rates[p][r] / w:>5.0f}/w)" for p in PIPELINES)
        lines.append(f"{r:>5}  {cells}  {ratios['vs_torchvision'][r]:>13.2f}x  {ratios['vs_decode'][r]:>8.2f}x")
    lines.append(f"images/s ({result['workers']} workers, batch {result['batch']}, {result['images']} images in "
                 f"{result['data']}, median of alternating rounds); /w = per worker")
    return "\n".join(lines)


def bench_step(model_name: str = "resnet18", res: int = 64, batch: int = 32, updates: int = 30,
               classes: int = 100) -> dict:
    """Seconds per optimizer update of distrain's step against a plain PyTorch loop, and the EMA's cost.

    distrain's step is the loop's own code (:func:`~distrain.engine.step.micro_batch` inside
    ``accelerator.accumulate``, :func:`~distrain.engine.step.finish_update`, the device-side loss
    sum, and :meth:`EMA.update` when on) with label smoothing 0.1. The plain loop does the same
    forward, loss, backward, SGD step and zero_grad on an identical model. Data come from memory.
    The variants alternate update by update; each figure is the median over ``updates`` updates.

    Returns:
        ``{"seconds_per_update": {"plain": s, "distrain": s, "distrain_ema": s}, "overhead": {...},
        "ema": {"update_s": s, "floor_s": s, "vs_floor": r, "amortized": {"every_1": f, "every_32": f}}}``
        where the overheads are fractions of the plain step and ``amortized`` the EMA's cost per
        update as a fraction of the plain step.
    """
    import torch.nn.functional as F

    from distrain.config import from_dict
    from distrain.dist import build_accelerator
    from distrain.dist.setup import shutdown
    from distrain.engine.step import finish_update, micro_batch
    from distrain.models import create_model
    from distrain.optim import create_optimizer
    from distrain.tricks.ema import EMA

    cfg = from_dict({"model": {"name": model_name}, "logging": {"wandb": False, "progress": False},
                     "optim": {"lr": 0.01}, "train": {"label_smoothing": 0.1}})
    accelerator = build_accelerator(cfg)
    torch.manual_seed(0)
    ours = create_model(model_name, classes, "batch", False)
    plain = create_model(model_name, classes, "batch", False)
    plain.load_state_dict(ours.state_dict())
    plain.to(accelerator.device).train()
    optimizer = create_optimizer(ours, cfg.optim, 0.01)
    model, optimizer = accelerator.prepare(ours, optimizer)
    model.train()
    plain_optimizer = create_optimizer(plain, cfg.optim, 0.01)
    unwrapped = accelerator.unwrap_model(model)
    ema = EMA(unwrapped, 0.9999, every=1, warmup=True)
    images = torch.randn(batch, 3, res, res, device=accelerator.device)
    targets = torch.randint(0, classes, (batch,), device=accelerator.device)

    def loss_fn(logits, y):
        return F.cross_entropy(logits, y, label_smoothing=0.1)

    loss_sum = torch.zeros((), device=accelerator.device)

    def distrain_update(u: int, with_ema: bool) -> None:
        with accelerator.accumulate(model):
            loss, _ = micro_batch(accelerator, model, optimizer, loss_fn, images, targets, lambda: 0.01)
            loss_sum.add_(loss)  # the loop's device-side window sum (read at log time, not timed here)
            finish_update(accelerator, model, optimizer, None, check_finite=True)
        if with_ema:
            ema.update(unwrapped, u + 1)

    def plain_update(u: int) -> None:
        loss = loss_fn(plain(images), targets)
        loss.backward()
        plain_optimizer.step()
        plain_optimizer.zero_grad(set_to_none=True)

    variants = {"plain": plain_update, "distrain": lambda u: distrain_update(u, False),
                "distrain_ema": lambda u: distrain_update(u, True)}
    for fn in variants.values():  # warm-up: allocator, autotuning, first-call costs
        fn(0)
    # Updates interleave one by one, in a rotating order, so that drift and bursts of other load hit
    # every variant alike; the median per variant drops the updates such bursts slowed down.
    times: dict[str, list[float]] = {k: [] for k in variants}
    names = list(variants)
    for u in range(updates):
        for name in names[u % len(names):] + names[:u % len(names)]:
            _sync(accelerator.device)
            start = time.perf_counter()
            variants[name](u + 1)
            _sync(accelerator.device)
            times[name].append(time.perf_counter() - start)
    per_update = {k: statistics.median(v) for k, v in times.items()}

    ema_times, floor_times = [], []
    params = [t for t in ema._all_model if t.is_floating_point()]
    shadow = [torch.empty_like(t) for t in params]
    for _ in range(max(20, updates)):
        _sync(accelerator.device)
        start = time.perf_counter()
        ema.update(unwrapped, 1)
        _sync(accelerator.device)
        ema_times.append(time.perf_counter() - start)
        start = time.perf_counter()
        torch._foreach_copy_(shadow, params)  # the memory-bandwidth floor: one pass over the weights
        _sync(accelerator.device)
        floor_times.append(time.perf_counter() - start)
    shutdown(accelerator)
    ema_s, floor_s = statistics.median(ema_times), statistics.median(floor_times)
    base = per_update["plain"]
    return {
        "model": model_name, "res": res, "batch": batch, "updates": updates, "device": str(images.device),
        "seconds_per_update": per_update,
        "overhead": {"distrain": per_update["distrain"] / base - 1, "distrain_ema": per_update["distrain_ema"] / base - 1},
        "ema": {"update_s": ema_s, "floor_s": floor_s, "vs_floor": ema_s / floor_s,
                "amortized": {"every_1": ema_s / base, "every_32": ema_s / 32 / base}},
    }


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def format_step(r: dict) -> str:
    """The step bench as a few lines of figures and ratios."""
    s, o, e = r["seconds_per_update"], r["overhead"], r["ema"]
    return "\n".join([
        f"{r['model']} at {r['res']} px, batch {r['batch']}, on {r['device']} (median of {r['updates']} interleaved updates each)",
        f"  plain PyTorch loop     {s['plain'] * 1e3:8.2f} ms/update",
        f"  distrain step          {s['distrain'] * 1e3:8.2f} ms/update  ({o['distrain']:+.1%} vs plain)",
        f"  distrain step + EMA    {s['distrain_ema'] * 1e3:8.2f} ms/update  ({o['distrain_ema']:+.1%} vs plain)",
        f"  one EMA update         {e['update_s'] * 1e3:8.3f} ms  ({e['vs_floor']:.2f}x a foreach copy of the weights, "
        f"{e['floor_s'] * 1e3:.3f} ms)",
        f"  EMA amortized          every 1: {e['amortized']['every_1']:.2%} of a step; every 32: "
        f"{e['amortized']['every_32']:.3%}",
    ])
