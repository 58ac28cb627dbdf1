"""``distrain bench loader``: how many images/s can this node feed, against the reference pipeline.

(``distrain bench step`` and ``distrain bench parity`` are further down: the cost of a training
step, and the accuracy of a recipe, each against a plain PyTorch loop.)

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
import json
import random
import statistics
import time
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from distrain.config import Config, ModelConfig
from distrain.data import remote
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


def _distrain_loader(shards: str | Path, res: int, batch: int, workers: int, epoch: int) -> DataLoader:
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
            spec (a shard-set directory, tar, glob or brace pattern, or a URL or ``pipe:`` command)
            whose first ``images`` samples are copied into such a tree; None builds the photo set in
            ``work_dir``. Shards are written from the tree for the distrain stream. Remote shards are
            also streamed by distrain as they are (pipeline ``remote``), next to the local copy.
        workers: DataLoader worker processes for every pipeline.
        resolutions: Training resolutions to measure.
        batch: Batch size for every pipeline.
        rounds: Alternating rounds; each figure is the median over rounds.
        batches: Batches timed per pipeline per round.
        work_dir: Where the generated photo set and the shards go.
        images: Size of the generated photo set, or of the sample of ``data`` given as shards.

    Returns:
        ``{"images_per_s": {pipeline: {res: value}}, "ratios": {"vs_torchvision": {res: r},
        "vs_decode": {res: r}, "remote_vs_local": {res: r} (remote data only)}, "remote": URL or
        None, "workers": workers, "batch": batch, "images": n}``
    """
    from distrain.data.writer import write_folder

    # Remote shards are also streamed as they are, next to the local copy of their sample.
    remote_spec = str(data) if data is not None and remote.is_remote(str(data)) else None
    pipelines = PIPELINES + (("remote",) if remote_spec else ())
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
    results: dict[str, dict[int, list[float]]] = {p: {r: [] for r in resolutions} for p in pipelines}
    for k in range(rounds):
        for res in resolutions:
            order = pipelines if k % 2 == 0 else pipelines[::-1]
            for pipeline in order:
                if pipeline == "remote":
                    loader = _distrain_loader(remote_spec, res, batch, workers, epoch=k)
                elif pipeline == "distrain":
                    loader = _distrain_loader(shards / "train", res, batch, workers, epoch=k)
                elif pipeline == "torchvision":
                    loader = _torchvision_loader(folder, res, batch, workers)
                else:
                    loader = DataLoader(_Decode(files), batch_size=batch, shuffle=True, num_workers=workers)
                results[pipeline][res].append(_rate(loader, batches, batch))
    rates = {p: {r: statistics.median(v) for r, v in by_res.items()} for p, by_res in results.items()}
    ratios = {
        "vs_torchvision": {r: rates["distrain"][r] / rates["torchvision"][r] for r in resolutions},
        "vs_decode": {r: rates["distrain"][r] / rates["decode"][r] for r in resolutions},
    }
    if remote_spec:
        ratios["remote_vs_local"] = {r: rates["remote"][r] / rates["distrain"][r] for r in resolutions}
    return {
        "images_per_s": rates,
        "ratios": ratios,
        "remote": remote_spec,
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
    for r in rates.get("remote", {}):
        lines.append(f"{r:>5}  distrain streaming {result['remote']}: {rates['remote'][r]:.0f} images/s, "
                     f"{ratios['remote_vs_local'][r]:.2f}x distrain on the local copy of its sample")
    lines.append(f"images/s ({result['workers']} workers, batch {result['batch']}, {result['images']} images in "
                 f"{result['data']}, median of alternating rounds); /w = per worker")
    return "\n".join(lines)


def bench_step(model_name: str = "resnet18", res: int = 64, batch: int = 32, updates: int = 30,
               classes: int = 100, teacher: str = "") -> dict:
    """Seconds per optimizer update of distrain's step against a plain PyTorch loop, and the EMA's cost.

    With ``teacher`` (a model name), a further variant adds distillation from that model (randomly
    initialised: the cost does not depend on the weights) as the Distillation objective does it:
    the teacher's forward under ``no_grad`` on the same batch and the soft loss.

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
    from distrain.engine.step import finish_update, micro_batch
    from distrain.models import create_model
    from distrain.optim import create_optimizer
    from distrain.parallel import build_accelerator
    from distrain.parallel.setup import shutdown
    from distrain.tricks.ema import EMA

    cfg = from_dict({"model": {"name": model_name}, "logging": {"wandb": False, "progress": False},
                     "optim": {"lr": 0.01}, "train": {"label_smoothing": 0.1}})
    accelerator = build_accelerator(cfg)
    torch.manual_seed(0)
    ours = create_model(cfg.model, classes)
    plain = create_model(cfg.model, classes)
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

    def label_loss(m, x, y):
        return loss_fn(m(x), y)

    distill_loss = None
    if teacher:
        from distrain.config import ModelConfig
        from distrain.tricks.distill import TeacherView, combine, soft_distill_loss

        view = TeacherView(create_model(ModelConfig(name=teacher), classes).to(accelerator.device).requires_grad_(False),
                           cfg.data.mean, cfg.data.std)

        def distill_loss(m, x, y):
            logits = m(x)
            return combine(loss_fn(logits, y), soft_distill_loss(logits, view(x), 4.0), 0.5)

    loss_sum = torch.zeros((), device=accelerator.device)

    def distrain_update(u: int, with_ema: bool, loss_of=label_loss) -> None:
        with accelerator.accumulate(model):
            loss, _ = micro_batch(accelerator, model, optimizer, loss_of, images, targets, lambda: 0.01)
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
    if distill_loss is not None:
        variants["distrain_teacher"] = lambda u: distrain_update(u, False, distill_loss)
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
        "teacher": teacher, "seconds_per_update": per_update,
        "overhead": {k: v / base - 1 for k, v in per_update.items() if k != "plain"},
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
        *([f"  + teacher {r['teacher']:<12} {s['distrain_teacher'] * 1e3:8.2f} ms/update  "
           f"({s['distrain_teacher'] / s['distrain']:.2f}x the distrain step)"] if r["teacher"] else []),
        f"  one EMA update         {e['update_s'] * 1e3:8.3f} ms  ({e['vs_floor']:.2f}x a foreach copy of the weights, "
        f"{e['floor_s'] * 1e3:.3f} ms)",
        f"  EMA amortized          every 1: {e['amortized']['every_1']:.2%} of a step; every 32: "
        f"{e['amortized']['every_32']:.3%}",
    ])


# ``distrain bench parity``: the recipe of the notes' measurement (ResNet-20, CIFAR, He et al.'s
# batch 128 and LR 0.1 with Nesterov, weight decay 5e-4 off norm/bias, zero-init residual gamma,
# cosine to 0 without warmup, pad-4 crop + flip, no label smoothing), as a distrain recipe.
def parity_config(epochs: int, batch: int, crop: str, pad_fill: str, workers: int) -> Config:
    """The parity recipe as a distrain config (data paths, seed and run dir are set per run)."""
    from distrain.config import from_dict

    return from_dict({
        "name": "parity",
        "data": {"train_crop": 32, "eval_resize": 32, "eval_crop": 32, "crop": crop, "pad": 4, "pad_fill": pad_fill,
                 "scale": [0.64, 1.0], "ratio": [0.75, 1.3333], "hflip": True,
                 "mean": [0.4914, 0.4822, 0.4465], "std": [0.2470, 0.2435, 0.2616],
                 "workers": workers, "shuffle_block": 4096},
        "model": {"name": "cifar_resnet20", "zero_init_residual": True},
        "batch": {"per_device": batch, "accumulation": 1},
        "optim": {"name": "sgd", "lr": 0.1, "base_batch": 128, "momentum": 0.9, "nesterov": True,
                  "weight_decay": 5e-4, "norm_bias_decay": False},
        "schedule": {"epochs": epochs, "warmup_epochs": 0, "decay": "cosine"},
        "train": {"log_every": 50},
        "eval": {"every_epochs": epochs, "batch_size": 500},
        "checkpoint": {"every_epochs": epochs, "keep_last": 1, "keep_best": False},
        "logging": {"wandb": False, "progress": False},
    })


def _split_root(data: Path) -> Path:
    """The folder of an image tree (or extracted archive) that holds ``train/`` and ``test/`` (or ``val/``)."""
    for root in (data, *sorted(p for p in data.iterdir() if p.is_dir())):
        if (root / "train").is_dir() and ((root / "test").is_dir() or (root / "val").is_dir()):
            return root
    raise DistrainError(f"--data {data}: no train/ and test/ (or val/) class-per-folder splits found")


def parity_data(data: str | Path, work_dir: Path, train_samples: int, test_samples: int) -> Path:
    """A class-per-folder tree ``<dir>/train``, ``<dir>/test`` sampled from ``data``, and its shards.

    ``data`` is an image tree with train/ and test/ (or val/) splits, or a ``.tar``/``.tar.gz`` of
    one (the CIFAR-10 JPEG archive), extracted once into ``work_dir``. ``train_samples`` and
    ``test_samples`` (0 = all) images are drawn at random, with a fixed seed, from each split; both
    sides of the bench read exactly these files. Written once and reused.

    Returns:
        The subset's folder: ``tree/{train,test}`` (images) and ``shards/{train,test}``.
    """
    import shutil
    import tarfile

    from distrain.data.writer import write_folder

    data = Path(data)
    if not data.exists():
        raise DistrainError(f"--data {data}: no such file or folder")
    if data.is_file():
        extracted = work_dir / f"extracted-{_slug(data)}"
        if not (extracted / ".complete").is_file():
            shutil.rmtree(extracted, ignore_errors=True)
            try:
                with tarfile.open(data) as tf:
                    tf.extractall(extracted, filter="data")
            except tarfile.TarError as e:
                raise DistrainError(f"--data {data}: not a readable tar archive ({e})") from None
            (extracted / ".complete").touch()
        data = extracted
    root = _split_root(data)
    out = work_dir / f"subset-{_slug(root)}-{train_samples}-{test_samples}"
    if (out / "shards" / "test" / INDEX_NAME).is_file():
        return out
    shutil.rmtree(out, ignore_errors=True)
    rng = random.Random(0)
    for split, count in (("train", train_samples), ("test", test_samples)):
        src = root / split if split == "train" or (root / "test").is_dir() else root / "val"
        files = sorted(p for p in src.glob("*/*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
        if count > len(files):
            raise DistrainError(f"--{split}-samples {count}: {src} holds only {len(files)} images")
        for f in sorted(rng.sample(files, count)) if count else files:
            (out / "tree" / split / f.parent.name).mkdir(parents=True, exist_ok=True)
            shutil.copyfile(f, out / "tree" / split / f.parent.name / f.name)
    write_folder(out / "tree", out / "shards", samples_per_shard=1000, overwrite=True, progress=False)
    return out


def _distrain_run(cfg: Config, subset: Path, seed: int, run_dir: Path) -> dict:
    """Train ``cfg`` with ``distrain train`` in a subprocess, as a user would; its top-1 and seconds."""
    import dataclasses
    import shutil
    import subprocess
    import sys

    from distrain.config import dump

    shutil.rmtree(run_dir, ignore_errors=True)  # a fresh run, not a continuation of an earlier bench's
    run_dir.mkdir(parents=True)
    cfg = dataclasses.replace(cfg, seed=seed, run_dir=str(run_dir), data=dataclasses.replace(
        cfg.data, train=str(subset / "shards" / "train"), eval=str(subset / "shards" / "test")))
    recipe = run_dir / "recipe.yaml"
    recipe.write_text(dump(cfg))
    start, cpu = time.perf_counter(), _children_cpu()
    with open(run_dir / "train.log", "w") as log:
        rc = subprocess.run([sys.executable, "-m", "distrain", "train", str(recipe)], stdout=log,
                            stderr=subprocess.STDOUT).returncode
    cpu = _children_cpu() - cpu
    if rc != 0:
        tail = (run_dir / "train.log").read_text().strip().splitlines()[-1:]
        raise DistrainError(f"distrain train failed (exit {rc}): {' '.join(tail)}; see {run_dir / 'train.log'}")
    summary = json.loads((run_dir / "summary.json").read_text())
    return {"seed": seed, "top1": summary["eval/top1"], "seconds": time.perf_counter() - start, "cpu_seconds": cpu,
            "eval_samples": summary["eval/samples"]}


def _children_cpu() -> float:
    """CPU seconds of the finished child processes (and theirs: the DataLoader workers)."""
    import resource

    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _decoded(folder: Path, classes: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Every image of a class-per-folder tree decoded once: uint8 (N, 3, H, W) and labels (N,).

    Labels index ``classes`` (the training split's sorted class folders, as the shard writer
    numbers them), so a test split that lacks a class keeps the same numbering.
    """
    from torchvision.transforms.v2 import functional as TF

    files = sorted(p for p in folder.glob("*/*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    images = []
    for f in files:
        with Image.open(f) as img:
            images.append(TF.pil_to_tensor(img.convert("RGB")))
    return torch.stack(images), torch.tensor([classes.index(f.parent.name) for f in files])


class _Augmented(Dataset):
    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform):
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        return self.transform(self.images[i]), self.labels[i]


def _plain_run(cfg: Config, train: tuple, test: tuple, num_classes: int, seed: int) -> dict:
    """The same recipe as a plain PyTorch loop, the way a user would write it; its top-1 and seconds.

    Written without distrain's engine, optimizer, schedule or data code: torchvision transforms on
    the decoded images, a shuffling DataLoader, SGD with two parameter groups, CosineAnnealingLR
    stepped per update. Only the model comes from distrain.models, built after the same seeding as
    ``distrain train`` does, so both sides start from the same weights.
    """
    import torch.nn.functional as F
    from torchvision.transforms import v2

    from distrain.models import create_model

    start, cpu = time.perf_counter(), time.process_time()
    d = cfg.data
    torch.manual_seed(seed)
    # The plain loop's model: the recipe's architecture with batch norm, nothing else of distrain's.
    model = create_model(ModelConfig(name=cfg.model.name, zero_init_residual=cfg.model.zero_init_residual), num_classes)
    decay = [p for p in model.parameters() if p.ndim > 1]  # conv and linear weights; not BN or biases
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    lr = cfg.optim.lr * cfg.batch.per_device / cfg.optim.base_batch
    optimizer = torch.optim.SGD([{"params": decay, "weight_decay": cfg.optim.weight_decay},
                                 {"params": no_decay, "weight_decay": 0.0}],
                                lr=lr, momentum=cfg.optim.momentum, nesterov=cfg.optim.nesterov)
    if d.crop == "pad":
        mode = "reflect" if d.pad_fill == "reflect" else "constant"
        crop = v2.RandomCrop(d.train_crop, padding=d.pad, padding_mode=mode)
    else:
        crop = v2.RandomResizedCrop(d.train_crop, scale=tuple(d.scale), ratio=tuple(d.ratio), antialias=True)
    transform = v2.Compose([crop, v2.RandomHorizontalFlip(), v2.ToDtype(torch.float32, scale=True),
                            v2.Normalize(d.mean, d.std)])
    loader = DataLoader(_Augmented(*train, transform), batch_size=cfg.batch.per_device, shuffle=True, drop_last=True)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.schedule.epochs * len(loader))
    for _ in range(cfg.schedule.epochs):
        model.train()
        for x, y in loader:
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
    model.eval()
    normalize = v2.Normalize(d.mean, d.std)
    correct = 0
    with torch.no_grad():
        for x, y in zip(test[0].split(500), test[1].split(500)):
            correct += (model(normalize(x.float() / 255)).argmax(1) == y).sum().item()
    return {"seed": seed, "top1": 100.0 * correct / len(test[1]), "seconds": time.perf_counter() - start,
            "cpu_seconds": time.process_time() - cpu, "eval_samples": len(test[1])}


SIDES = ("distrain", "plain")


def _stats(values: list[float]) -> dict:
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return {"n": len(values), "mean": statistics.fmean(values), "std": std, "min": min(values), "max": max(values)}


def _parity_summary(result: dict) -> dict:
    """``result`` with per-side statistics, the difference of the means and whether it is within the seed spread."""
    runs = result["runs"]
    stats = {s: _stats([r["top1"] for r in runs[s]]) for s in SIDES if runs[s]}
    out = {**result, "summary": stats}
    if len(stats) == 2:
        diff = stats["distrain"]["mean"] - stats["plain"]["mean"]
        spread = max(stats[s]["max"] - stats[s]["min"] for s in SIDES)
        out["difference"] = diff
        out["seed_spread"] = spread
        out["verdict"] = ("one seed: no spread to compare with" if min(st["n"] for st in stats.values()) < 2 else
                          "within the seed spread" if abs(diff) <= spread else "beyond the seed spread")
    return out


def bench_parity(data: str | Path, train_samples: int = 10000, test_samples: int = 0, epochs: int = 5,
                 seeds: list[int] = (0, 1, 2), batch: int = 128, crop: str = "pad", pad_fill: str = "zero",
                 workers: int = 2, work_dir: Path = Path("runs/bench/parity"), json_path: str | None = None,
                 log=print) -> dict:
    """Train the parity recipe through ``distrain train`` and a plain PyTorch loop over several seeds.

    Both sides read the same ``train_samples`` images of ``data`` (see :func:`parity_data`) and are
    evaluated on the same ``test_samples`` test images. Runs go one at a time (two trainings on
    shared cores slow each other down), alternating which side goes first per seed.

    Args:
        data: The CIFAR-10 JPEG archive or any class-per-folder tree with train/ and test/ splits.
        train_samples: Training images drawn from the train split (0 = all).
        test_samples: Test images drawn from the test split (0 = all).
        epochs: Epochs per run.
        seeds: One run per side and seed.
        batch: Batch size (LR 0.1 per 128 images, scaled linearly).
        crop: ``pad`` (pad-4 random crop) or ``rrc`` (RandomResizedCrop 0.64-1), on both sides.
        pad_fill: ``zero`` or ``reflect`` padding of the ``pad`` crop.
        workers: DataLoader workers of the distrain side.
        work_dir: Where the sampled data and the distrain runs go.
        json_path: Rewritten after every run with the figures so far (``"complete": false`` until the end).
        log: Called with one line per finished run.

    Returns:
        ``{"runs": {"distrain": [{"seed", "top1", "seconds", "cpu_seconds", "eval_samples"}], "plain": [...]},
        "summary": {side: {"n", "mean", "std", "min", "max"}}, "difference": distrain - plain mean,
        "seed_spread": the larger min-max range, "verdict": str, ...}`` with top-1 in percent.
    """
    if min(epochs, batch, len(seeds)) <= 0 or min(train_samples, test_samples, workers) < 0:
        raise DistrainError("--epochs, --batch and --seeds must be > 0; --train-samples, --test-samples and "
                            "--workers >= 0")
    if len(set(seeds)) != len(seeds):
        raise DistrainError(f"--seeds: each seed once, got {' '.join(map(str, seeds))}")
    cfg = parity_config(epochs, batch, crop, pad_fill, workers)
    work_dir = Path(work_dir)
    subset = parity_data(data, work_dir, train_samples, test_samples)
    classes = sorted(p.name for p in (subset / "tree" / "train").iterdir() if p.is_dir())
    train, test = _decoded(subset / "tree" / "train", classes), _decoded(subset / "tree" / "test", classes)
    if len(train[1]) < batch:
        raise DistrainError(f"--batch {batch}: larger than the {len(train[1])} training images")
    result = {"data": str(data), "train_samples": len(train[1]), "test_samples": len(test[1]), "epochs": epochs,
              "batch": batch, "crop": crop, "pad_fill": pad_fill, "seeds": list(seeds),
              "recipe": "ResNet-20, SGD Nesterov 0.9, LR 0.1 per 128, wd 5e-4 not on norm/bias, zero-init residual "
                        "gamma, cosine, no warmup, no label smoothing",
              "runs": {s: [] for s in SIDES}, "complete": False}
    run_root = work_dir / f"runs-{subset.name}-e{epochs}-b{batch}-{crop}-{pad_fill}"
    for i, seed in enumerate(seeds):
        for side in SIDES if i % 2 == 0 else SIDES[::-1]:
            if side == "distrain":
                r = _distrain_run(cfg, subset, seed, run_root / f"seed{seed}")
            else:
                r = _plain_run(cfg, train, test, len(classes), seed)
            result["runs"][side].append(r)
            log(f"{side:>8} seed {seed}: top-1 {r['top1']:.2f}% ({r['seconds']:.0f} s, {r['cpu_seconds']:.0f} CPU s)")
            if json_path:
                Path(json_path).write_text(json.dumps(_parity_summary(result), indent=1) + "\n")
    result["complete"] = True
    return _parity_summary(result)


def format_parity(r: dict) -> str:
    """The parity bench as a table: top-1 per side, mean, std and min-max over seeds."""
    lines = [f"{'':>9}  {'mean':>7}  {'std':>5}  {'min':>7}  {'max':>7}  per seed (top-1 %)"]
    for side in SIDES:
        s = r["summary"][side]
        per_seed = "  ".join(f"{x['seed']}: {x['top1']:.2f}" for x in r["runs"][side])
        lines.append(f"{side:>9}  {s['mean']:>7.2f}  {s['std']:>5.2f}  {s['min']:>7.2f}  {s['max']:>7.2f}  {per_seed}")
    lines.append(f"distrain - plain: {r['difference']:+.2f} points; seed spread (larger min-max) "
                 f"{r['seed_spread']:.2f}: {r['verdict']}")
    lines.append(f"{r['recipe']}; {r['crop']} crop ({r['pad_fill']} fill) + flip, batch {r['batch']}, {r['epochs']} "
                 f"epochs, {r['train_samples']} training and {r['test_samples']} test images of {r['data']}")
    return "\n".join(lines)


def bench_lp(samples: list[int], dim: int = 512, classes: int = 10, labeled: float = 0.08, k: int = 50,
             block: int = 1024, seed: int = 0) -> dict:
    """Time and memory of one label propagation (:mod:`distrain.tricks.lp`) at each size in ``samples``.

    The features are synthetic: ``classes`` Gaussian clusters on the unit sphere in ``dim``
    dimensions (the graph's cost depends on N, d and k, not on what the features mean), with a
    ``labeled`` fraction of each class labeled. One process, this machine's threads, the stages
    as the objective runs them on one rank.

    Returns:
        Per size: seconds of the kNN search, the graph, the diffusion and the pseudo-labels; the
        bytes of the features, of one search block and of the graph; the pseudo-labels' accuracy.
    """
    import numpy as np

    from distrain.tricks.lp import diffuse, knn_rows, normalized_affinity, pseudo_labels

    rows = []
    for n in samples:
        g = torch.Generator().manual_seed(seed)
        truth = torch.arange(n) % classes
        centres = torch.nn.functional.normalize(torch.randn(classes, dim, generator=g), dim=1)
        feats = torch.nn.functional.normalize(centres[truth] + 0.06 * torch.randn(n, dim, generator=g), dim=1)
        labels = np.full(n, -2)
        known = np.random.default_rng(seed).random(n) < labeled
        labels[known] = truth.numpy()[known]
        t = [time.perf_counter()]
        sims, idx = knn_rows(feats, k, block=block)
        t.append(time.perf_counter())
        s = normalized_affinity(sims.numpy(), idx.numpy())
        t.append(time.perf_counter())
        z = diffuse(s, labels, range(classes))
        t.append(time.perf_counter())
        out = pseudo_labels(z, labels)
        t.append(time.perf_counter())
        rows.append({
            "samples": n, "labeled": int(known.sum()),
            "seconds": dict(zip(("knn", "graph", "diffusion", "pseudo_labels"), np.diff(t).tolist())),
            "bytes": {"features": feats.numel() * 4, "search_block": 4 * min(block, n) * n,
                      "graph": int(s.data.nbytes + s.indices.nbytes + s.indptr.nbytes)},
            "pseudo_top1": 100 * float((out.labels[~known] == truth.numpy()[~known]).mean()),
        })
    return {"dim": dim, "classes": classes, "k": k, "block": block, "threads": torch.get_num_threads(), "rows": rows}


def format_lp(r: dict) -> str:
    """The label-propagation bench as one line per size."""
    mib = 1 / 2**20
    lines = [f"label propagation, d={r['dim']}, {r['classes']} classes, k={r['k']}, search block {r['block']}, "
             f"{r['threads']} threads",
             f"  {'N':>9} {'kNN s':>8} {'graph s':>8} {'diffuse s':>9} {'total s':>8} {'feat MiB':>9} "
             f"{'block MiB':>9} {'graph MiB':>9} {'pseudo top-1':>12}"]
    for row in r["rows"]:
        s, b = row["seconds"], row["bytes"]
        lines.append(f"  {row['samples']:>9} {s['knn']:>8.2f} {s['graph']:>8.2f} {s['diffusion']:>9.2f} "
                     f"{sum(s.values()):>8.2f} {b['features'] * mib:>9.1f} {b['search_block'] * mib:>9.1f} "
                     f"{b['graph'] * mib:>9.1f} {row['pseudo_top1']:>11.2f}%")
    return "\n".join(lines)
