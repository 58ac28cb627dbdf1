"""The ``distrain`` command: train, launch, eval, export, plan, data, plot.

User mistakes (a :class:`DistrainError`) print one line ``distrain: error: ...`` and a run that
stops on purpose (:class:`RunStopped`) one line ``distrain: stopped: ...``, each with its exit code
(see :mod:`distrain.errors`); everything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

from distrain.errors import DistrainError, RunStopped


def _quiet_cpu_deepspeed() -> None:
    """Name DeepSpeed's accelerator on a machine without CUDA, which it otherwise announces on import."""
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


def _cmd_train(args: argparse.Namespace) -> int:
    _quiet_cpu_deepspeed()
    from distrain.config import load_config

    cfg = load_config(args.config, args.overrides)
    from distrain.engine.loop import train

    train(cfg, resume=args.resume, allow_config_change=args.allow_config_change)
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    import dataclasses

    _quiet_cpu_deepspeed()
    from distrain.engine.standalone import evaluate_checkpoint, format_sweep

    resizes = None
    if args.resize_sweep or args.resizes:
        try:
            resizes = [int(r) for r in args.resizes.split(",")] if args.resizes else []
        except ValueError:
            raise DistrainError(f"--resizes: expected comma-separated integers, got {args.resizes!r}") from None
    if args.confusion and resizes is not None:
        raise DistrainError("--confusion: not with a resize sweep (evaluate the picked resize on its own)")
    result = evaluate_checkpoint(args.target, args.overrides, resizes)
    if result is None:
        return 0
    if "sweep" in result:
        text = format_sweep(result)
        result = {**result, "sweep": dataclasses.asdict(result["sweep"])}
    else:
        text = _format_eval(result)
    if args.confusion:
        from pathlib import Path

        from distrain.track.confusion import plot_confusion

        title = (f"{'/'.join(Path(result['checkpoint']).parts[-3:])}: top-1 {result['eval/top1']:.2f}%, "
                 f"balanced {result['eval/balanced_top1']:.2f}% ({result['eval/samples']} samples)")
        print(f"confusion: {plot_confusion(result['confusion'], result['classes'], args.confusion, title)}")
    print(json.dumps(result) if args.json else text)
    return 0


def _cmd_launch(args: argparse.Namespace) -> int:
    import signal

    from distrain.config import load_config
    from distrain.launch import launch_command, resolve_spec, shown

    overrides = list(args.overrides)
    if args.backend:
        overrides.append(f"distributed.backend={args.backend}")
    if args.zero_stage:
        overrides.append(f"distributed.zero_stage={args.zero_stage}")
    load_config(args.config, overrides)  # a bad key fails here, before any process starts
    spec = resolve_spec(args.nproc_per_node, args.nodes, args.node_rank, args.master_addr, args.master_port,
                        os.environ)
    cmd = launch_command(spec, args.config, overrides)
    if args.resume:
        cmd += ["--resume", args.resume]
    print(f"distrain: launch: node {spec.node_rank} of {spec.nodes}: {shown(cmd)}", file=sys.stderr, flush=True)
    if args.dry_run:
        return 0
    # The launcher (torchrun's agent) would die of SIGUSR1, which SLURM sends to every process of
    # the step before a time limit; ignored here, the ignore survives exec, and the training
    # ranks install their own handler (checkpoint and stop).
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    os.execvp(cmd[0], cmd)


def _print_bench(table: str, result: dict, json_path: str | None) -> None:
    """Print a bench's table and, when asked, write its figures as JSON."""
    print(table)
    if json_path:
        with open(json_path, "w") as f:
            f.write(json.dumps(result, indent=1) + "\n")
        print(f"json: {json_path}")


def _cmd_bench_step(args: argparse.Namespace) -> int:
    from distrain.bench import bench_step, format_step

    _quiet_cpu_deepspeed()
    if min(args.res, args.batch, args.updates) <= 0:
        raise DistrainError("--res, --batch and --updates must be > 0")
    from distrain.models.factory import check_model_name

    check_model_name(args.model)
    if args.teacher:
        check_model_name(args.teacher)
    result = bench_step(args.model, args.res, args.batch, args.updates, teacher=args.teacher)
    _print_bench(format_step(result), result, args.json)
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from distrain.bench import bench_loader, format_loader

    try:
        resolutions = [int(r) for r in args.res.split(",")]
    except ValueError:
        raise DistrainError(f"--res: expected comma-separated integers, got {args.res!r}") from None
    if args.workers < 0 or min(resolutions) <= 0:
        raise DistrainError("--workers must be >= 0 and --res values > 0")
    result = bench_loader(args.data, args.workers, resolutions, batch=args.batch, rounds=args.rounds,
                          batches=args.batches, images=args.images)
    _print_bench(format_loader(result), result, args.json)
    return 0


def _cmd_bench_parity(args: argparse.Namespace) -> int:
    from distrain.bench import bench_parity, format_parity

    _quiet_cpu_deepspeed()
    result = bench_parity(args.data, args.train_samples, args.test_samples, args.epochs, args.seeds, args.batch,
                          args.crop, args.pad_fill, args.workers, args.work_dir, args.json,
                          log=lambda line: print(line, flush=True))
    _print_bench(format_parity(result), result, args.json)
    return 0


def _cmd_bench_lp(args: argparse.Namespace) -> int:
    from distrain.bench import bench_lp, format_lp

    try:
        samples = [int(n) for n in args.samples.split(",")]
    except ValueError:
        raise DistrainError(f"--samples: expected comma-separated integers, got {args.samples!r}") from None
    if min(samples) <= args.k or min(args.dim, args.classes, args.k, args.block) <= 0:
        raise DistrainError("--samples must exceed --k, and --dim, --classes, --k and --block must be > 0")
    if not 0 < args.labeled < 1:
        raise DistrainError(f"--labeled: a fraction in (0, 1), got {args.labeled}")
    result = bench_lp(samples, args.dim, args.classes, args.labeled, args.k, args.block)
    _print_bench(format_lp(result), result, args.json)
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from distrain.engine.standalone import export_checkpoint

    print(f"exported: {export_checkpoint(args.target, args.out)}")
    return 0


def _format_eval(m: dict) -> str:
    worst = m["eval/worst_class"]
    worst = f"  worst class {m['classes'][worst]} {m['eval/worst_class_top1']:.2f}%" if worst >= 0 else ""
    return (
        f"eval top-1 {m['eval/top1']:.2f}%  balanced top-1 {m['eval/balanced_top1']:.2f}%  top-5 {m['eval/top5']:.2f}%  "
        f"loss {m['eval/loss']:.4f}{worst}  ({m['eval/samples']} samples, checkpoint {m['checkpoint']})"
    )


def _cmd_plan(args: argparse.Namespace) -> int:
    from distrain.config import load_config, phase_configs
    from distrain.plan import make_plan

    cfg = load_config(args.config, args.overrides)
    phases = phase_configs(cfg) or [cfg]
    world = args.nodes * args.gpus_per_node
    # A resampled epoch's length comes from the index's class counts, so it needs the data.
    plans = [make_plan(c, world, c.data.train_samples if c.data.train_samples and not _resampled(c)
                       else _indexed_train_samples(c)) for c in phases]
    if args.json:
        docs = []
        for c, p in zip(phases, plans):
            train = _train_shards(c)
            docs.append({**p.as_dict(), "class_imbalance": _class_imbalance(train),
                         "warnings": [note for _, note in _crowding_rows(c, train, p.per_device)]})
        doc = docs[0] if not cfg.phases else {c.out_dir.name: d for c, d in zip(phases, docs)}
        print(json.dumps(doc, indent=1))
        return 0
    for i, (phase_cfg, plan) in enumerate(zip(phases, plans)):
        if cfg.phases:
            print(("\n" if i else "") + f"phase {i + 1}/{len(phases)}: {phase_cfg.out_dir.name}")
        rows = _plan_rows(phase_cfg, plan, args)
        if args.png and i == len(phases) - 1:
            from distrain.track.schedule_plot import plot_schedules

            rows.append(("schedules PNG", plot_schedules(phase_cfg, plan, args.png)))
        width = max(len(k) for k, _ in rows)
        for k, v in rows:
            print(f"{k:<{width}}  {v}")
    return 0


def _plan_rows(cfg, plan, args: argparse.Namespace) -> list[tuple[str, object]]:
    """The rows ``distrain plan`` prints for one phase."""
    from distrain.plan import make_plan

    train = _train_shards(cfg)  # once: a remote set's index is a request
    rows = [
        ("processes", f"{args.nodes} node(s) x {args.gpus_per_node} = {plan.world_size}"),
        *([("target global batch", cfg.batch.global_batch)] if cfg.batch.global_batch else []),
        ("per-device batch", plan.per_device),
        ("accumulation", plan.accumulation),
        ("global batch", plan.global_batch),
        ("training samples", f"{plan.train_samples}{_resampled(cfg)}"),
        *_imbalance_rows(train),
        *_crowding_rows(cfg, train, plan.per_device),
        ("updates per epoch", plan.updates_per_epoch),
        ("samples per epoch", plan.samples_per_epoch),
        *([("distinct samples per epoch", f"{plan.unique_samples_per_epoch} ({plan.repeats} repeats)")]
          if plan.repeats > 1 else []),
        ("epochs", plan.epochs),
        ("total updates", plan.total_updates),
        ("base LR", f"{plan.base_lr:g} per {plan.base_batch}"),
        ("peak LR", f"{plan.peak_lr:g} ({plan.scaling} scaling)"),
        ("warmup updates", f"{plan.warmup_updates} from LR {plan.warmup_start_lr:g}" if plan.warmup_updates else 0),
        ("decay", cfg.schedule.decay),
    ]
    if cfg.schedule.decay == "multistep":
        rows.append(("milestone updates", ", ".join(map(str, plan.milestone_updates)) + f" (x{cfg.schedule.gamma:g})"))
    if cfg.progressive.start_size:
        from distrain.tricks.progressive import train_size

        sizes = [train_size(cfg, e) for e in range(plan.epochs)]
        changes = [f"{s} px from epoch {e}" for e, s in enumerate(sizes) if e == 0 or s != sizes[e - 1]]
        rows.append(("train resolution", ", ".join(changes)))
    if cfg.ema.decay:
        horizon = 1 / (1 - cfg.ema.decay)
        rows.append(("EMA", f"decay {cfg.ema.decay:g} per update, every {cfg.ema.every} update(s): horizon ~{horizon:.0f} updates"))
    if cfg.model.pretrained:
        rows.append(("starts from", cfg.model.pretrained + (" (classifier re-initialised)" if cfg.model.reset_classifier else "")))
    if cfg.optim.layer_decay != 1 or cfg.optim.head_lr_scale != 1 or cfg.transfer.mode != "full":
        from distrain.models.factory import create_meta_model
        from distrain.tricks.transfer import describe_groups

        model = create_meta_model(cfg.model, cfg.data.num_classes or 1000)  # names and shapes, no memory
        groups = describe_groups(model, cfg.optim, cfg.transfer, plan.peak_lr)
        rows += [("parameter groups" if i == 0 else "", line) for i, line in enumerate(groups)]
    if cfg.distill.teacher:
        d = cfg.distill
        how = f"soft at temperature {d.temperature:g}" if d.kind == "soft" else "hard (the teacher's top-1)"
        rows.append(("distillation", f"{how}, loss = {1 - d.alpha:g} x label + {d.alpha:g} x distillation; "
                                     f"teacher {d.teacher}"))
    if cfg.early_stopping.patience:
        es = cfg.early_stopping
        rows.append(("early stopping", f"after {es.patience} evaluations (every {cfg.eval.every_epochs} epoch(s)) "
                                       f"without {es.metric} improving by more than {es.min_delta:g}"))
    if cfg.fixres.epochs:
        from distrain.tricks.fixres import fixres_config

        fixres = fixres_config(cfg)
        fplan = make_plan(fixres, plan.world_size, plan.train_samples)
        what = (f"{fplan.total_updates} updates ({cfg.fixres.epochs} epochs) at {cfg.data.eval_resize}/"
                f"{cfg.data.eval_crop} px, peak LR {fplan.peak_lr:g}, training the classifier and "
                f"{cfg.fixres.adapt} norm layer(s)")
        rows.append(("FixRes phase", what))
    return rows


def _resampled(cfg) -> str:
    """What expands the phase's epochs, as the plan's row says it ("" when nothing does)."""
    if cfg.lp.epoch_share:
        return f" per epoch after lp.labeled_share: {cfg.lp.epoch_share:g} (labeled samples oversampled)"
    if cfg.data.resample != "none":
        return f" per epoch after data.resample: {cfg.data.resample}"
    return ""


def _indexed_train_samples(cfg) -> int:
    from distrain.data.resample import epoch_samples
    from distrain.data.shards import resolve_shards

    if not cfg.data.train:
        raise DistrainError("data.train_samples: set it (or data.train) so the plan knows the dataset size")
    try:
        return epoch_samples(resolve_shards(cfg.data.train), cfg.data.resample, cfg.data.repeat_threshold,
                             cfg.lp.epoch_share)
    except DistrainError as e:
        if _resampled(cfg):
            raise DistrainError(f"{e} (resampling sizes epochs from the shard index's class counts)") from None
        raise DistrainError(f"{e}; or set data.train_samples to plan without the data") from None


def _train_shards(cfg):
    """The training shard set, or None when data.train is unset or its index cannot be read."""
    from distrain.data.shards import resolve_shards

    if not cfg.data.train:
        return None
    try:
        return resolve_shards(cfg.data.train)
    except DistrainError:
        return None  # the plan is for data not present here; other rows need only data.train_samples


def _class_imbalance(shardset) -> dict | None:
    """Largest and smallest class sizes in the shards' index and their ratio (None when a class has
    no sample); None when the data or the index's class counts are missing."""
    counts = shardset.class_counts if shardset is not None else ()
    if not counts:
        return None
    largest, smallest = max(counts), min(counts)
    return {"ratio": largest / smallest if smallest else None, "largest": largest, "smallest": smallest}


def _imbalance_rows(shardset) -> list[tuple[str, str]]:
    """The plan's class imbalance row: nothing without the data, a hint when its index lacks counts."""
    if shardset is None:
        return []
    imbalance = _class_imbalance(shardset)
    if imbalance is None:
        dirs = " ".join(sorted({os.path.dirname(s.url) for s in shardset.shards if not s.class_counts}))
        return [("class imbalance", f"unknown: run `distrain data index {dirs or 'DIR'}` to count classes")]
    ratio = f"{imbalance['ratio']:.1f}" if imbalance["ratio"] is not None else "infinite"
    return [("class imbalance", f"{ratio} ({imbalance['largest']} / {imbalance['smallest']} samples per class)")]


def _crowding_rows(cfg, shardset, batch: int) -> list[tuple[str, str]]:
    """The plan's warning when oversampling puts several copies of a sample in one batch."""
    from distrain.data.resample import training_resampling

    if shardset is None or not _resampled(cfg):
        return []
    rs = training_resampling(shardset, cfg.data.resample, cfg.data.repeat_threshold, cfg.lp.epoch_share, cfg.seed)
    note = rs.crowding(cfg.data.shuffle_block, batch) if rs is not None else ""
    return [("warning", note)] if note else []


def _cmd_data(args: argparse.Namespace) -> int:
    from distrain.data import remote

    out = getattr(args, "out", None)
    if out and remote.is_remote(out):
        # Written locally first (the writer checks every image), then uploaded, index last.
        with tempfile.TemporaryDirectory(prefix="distrain-data-") as tmp:
            sets = _write_data(args, tmp)
            root = out if out.endswith("/") else out + "/"
            for name, path in sets.items():
                rel = os.path.relpath(path, tmp)
                print(f"{name}: {remote.upload_set(path, root if rel == '.' else root + rel, args.overwrite)}")
        return 0
    for name, path in _write_data(args, out).items():
        print(f"{name}: {path}")
    return 0


def _write_data(args: argparse.Namespace, out: str | None) -> dict:
    from distrain.data import writer

    if args.source == "digits":
        out = writer.write_digits(
            out, samples_per_shard=args.samples_per_shard or 256, seed=args.seed, overwrite=args.overwrite,
            labeled_per_class=args.labeled_per_class,
        )
    elif args.source == "folder":
        out = writer.write_folder(
            args.src,
            out,
            samples_per_shard=args.samples_per_shard or 1000,
            shuffle_seed=None if args.no_shuffle else args.seed,
            overwrite=args.overwrite,
            classes=args.classes.split(",") if args.classes else None,
            train_per_class=args.train_per_class,
            imbalance_ratio=args.imbalance_ratio,
            imbalance_seed=args.seed,
            labeled_per_class=args.labeled_per_class,
            labeled_fraction=args.labeled_fraction,
            labeled_seed=args.seed,
        )
    else:
        out = {"index": writer.index_shards(args.dir)}
    return out


def _cmd_plot(args: argparse.Namespace) -> int:
    from distrain.track.plot import plot_run

    print(plot_run(args.run_dir, args.out))
    return 0


def _one_line(error: DistrainError) -> str:
    """The user's message; a DataLoader worker's error arrives wrapped with the worker traceback."""
    lines = str(error).strip().splitlines()
    if len(lines) > 1 and lines[-1].startswith("distrain.errors."):
        return lines[-1].split(": ", 1)[-1]
    return lines[0] if lines else type(error).__name__


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``distrain`` command."""
    p = argparse.ArgumentParser(prog="distrain", description="Distributed image-classification training.")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train from a YAML recipe (run it under accelerate launch for N processes)")
    t.add_argument("config", help="YAML recipe, e.g. configs/quickstart.yaml")
    t.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. batch.per_device=64")
    t.add_argument("--resume", metavar="auto|PATH", help="continue from the newest checkpoint of the run dir, or PATH")
    t.add_argument("--allow-config-change", action="store_true",
                   help="resume even if settings that decide the data, augmentation, loss or LR differ "
                        "from the checkpoint's (not exact)")
    t.set_defaults(func=_cmd_train)

    e = sub.add_parser("eval", help="evaluate a checkpoint on its eval shards (1 or N processes)")
    e.add_argument("target", help="a run dir (newest checkpoint) or a checkpoint dir")
    e.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. data.eval=other/shards")
    e.add_argument("--json", action="store_true", help="print the metrics as JSON")
    e.add_argument("--resize-sweep", action="store_true",
                   help="evaluate several eval resizes (same crop): pick one on half of the eval set, report it "
                        "on the other half")
    e.add_argument("--resizes", metavar="R1,R2,...", help="the resizes to sweep (implies --resize-sweep; default: "
                                                           "crop x 1.0 .. 1.28 and the configured resize)")
    e.add_argument("--confusion", metavar="PNG", help="also draw the confusion matrix (rows: true class, normalised "
                                                      "to 100%%) to this PNG; --json holds its raw counts")
    e.set_defaults(func=_cmd_eval)

    la = sub.add_parser("launch", help="start `distrain train` on N processes per node (and M nodes) through "
                                       "accelerate launch, printing the exact command")
    la.add_argument("config")
    la.add_argument("overrides", nargs="*")
    la.add_argument("--nproc-per-node", type=int, help="processes (GPUs) per node (SLURM: SLURM_GPUS_ON_NODE; else 1)")
    la.add_argument("--nodes", type=int, help="nodes (SLURM: SLURM_JOB_NUM_NODES; else 1)")
    la.add_argument("--node-rank", type=int, help="this node's index (SLURM: SLURM_NODEID; else 0)")
    la.add_argument("--master-addr", help="address of node 0 (SLURM: first host of the allocation; else 127.0.0.1)")
    la.add_argument("--master-port", type=int, help="rendezvous port (SLURM: 20000 + job id %% 20000; else 29500)")
    la.add_argument("--resume", metavar="auto|PATH", help="passed to distrain train")
    la.add_argument("--backend", choices=["ddp", "deepspeed"], help="overrides distributed.backend")
    la.add_argument("--zero-stage", type=int, choices=[1, 2, 3], help="overrides distributed.zero_stage")
    la.add_argument("--dry-run", action="store_true", help="print the command without running it")
    la.set_defaults(func=_cmd_launch)

    b = sub.add_parser("bench", help="benchmarks (side by side, ratios in one run)")
    bsub = b.add_subparsers(dest="bench", required=True)
    bl = bsub.add_parser("loader", help="images/s of distrain's loader vs torchvision's reference and decode-only")
    bl.add_argument("--data", help="shards (a shard-set folder, tar, glob or brace pattern; the first --images "
                                   "samples are used) or a class-per-folder JPEG tree (default: a photo-like set "
                                   "made from scikit-learn's bundled photographs)")
    bl.add_argument("--workers", type=int, default=2, help="DataLoader workers for every pipeline")
    bl.add_argument("--res", default="128,176,224", help="training resolutions")
    bl.add_argument("--batch", type=int, default=64)
    bl.add_argument("--rounds", type=int, default=3, help="alternating rounds (the median is reported)")
    bl.add_argument("--batches", type=int, default=20, help="batches timed per pipeline and round")
    bl.add_argument("--images", type=int, default=2000, help="size of the generated photo set (without --data)")
    bl.add_argument("--json", metavar="PATH", help="also write the figures as JSON")
    bl.set_defaults(func=_cmd_bench)
    bs = bsub.add_parser("step", help="time per update of distrain's step vs a plain PyTorch loop, and the EMA's cost")
    bs.add_argument("--model", default="resnet18")
    bs.add_argument("--res", type=int, default=64)
    bs.add_argument("--batch", type=int, default=32)
    bs.add_argument("--updates", type=int, default=30, help="updates timed per variant (interleaved; median)")
    bs.add_argument("--teacher", default="", help="also time the step with distillation from this model")
    bs.add_argument("--json", metavar="PATH", help="also write the figures as JSON")
    bs.set_defaults(func=_cmd_bench_step)

    bp = bsub.add_parser("parity", help="top-1 of the same CIFAR recipe through distrain train and a plain PyTorch "
                                        "loop, over several seeds")
    bp.add_argument("--data", required=True,
                    help="the CIFAR-10 JPEG archive (.tar.gz) or a class-per-folder tree with train/ and test/")
    bp.add_argument("--train-samples", type=int, default=10000, help="training images drawn from train/ (0 = all)")
    bp.add_argument("--test-samples", type=int, default=0, help="test images drawn from test/ (0 = all)")
    bp.add_argument("--epochs", type=int, default=5)
    bp.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="one run per side and seed")
    bp.add_argument("--batch", type=int, default=128, help="batch size (LR 0.1 per 128, scaled linearly)")
    bp.add_argument("--crop", choices=["pad", "rrc"], default="pad",
                    help="pad-4 random crop, or RandomResizedCrop(0.64-1); + flip, on both sides")
    bp.add_argument("--pad-fill", choices=["zero", "reflect"], default="zero")
    bp.add_argument("--workers", type=int, default=2, help="DataLoader workers of the distrain side")
    bp.add_argument("--work-dir", default="runs/bench/parity", help="where the sampled data and the runs go")
    bp.add_argument("--json", metavar="PATH", help="also write the figures as JSON (rewritten after every run)")
    bp.set_defaults(func=_cmd_bench_parity)

    blp = bsub.add_parser("lp", help="time and memory of one label propagation (kNN graph, diffusion) per "
                                     "number of samples, on synthetic clustered features")
    blp.add_argument("--samples", default="10000,50000", help="comma-separated numbers of samples")
    blp.add_argument("--dim", type=int, default=512, help="feature width (ResNet-18: 512, ResNet-50: 2048)")
    blp.add_argument("--classes", type=int, default=10)
    blp.add_argument("--labeled", type=float, default=0.08, help="fraction of labeled samples")
    blp.add_argument("--k", type=int, default=50)
    blp.add_argument("--block", type=int, default=1024, help="query rows per block of the exact kNN search")
    blp.add_argument("--json", metavar="PATH", help="also write the figures as JSON")
    blp.set_defaults(func=_cmd_bench_lp)

    x = sub.add_parser("export", help="write a checkpoint's model weights (DeepSpeed ZeRO partitions merged) "
                                      "as one fp32 state dict for plain PyTorch")
    x.add_argument("target", help="a run dir (newest checkpoint) or a checkpoint dir")
    x.add_argument("--out", required=True, help="output file: .safetensors, or anything else for torch.save")
    x.set_defaults(func=_cmd_export)

    pl = sub.add_parser("plan", help="show the batch maths of a recipe for a cluster shape (no GPU or data needed)")
    pl.add_argument("config")
    pl.add_argument("overrides", nargs="*")
    pl.add_argument("--nodes", type=int, default=1)
    pl.add_argument("--gpus-per-node", type=int, default=1, help="processes per node")
    pl.add_argument("--json", action="store_true")
    pl.add_argument("--png", metavar="PATH", help="also draw the LR, resolution and EMA schedules to this PNG")
    pl.set_defaults(func=_cmd_plan)

    d = sub.add_parser("data", help="write webdataset shards with an index")
    dsub = d.add_subparsers(dest="source", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--out", required=True, help="output directory, or s3://bucket/prefix (written locally, "
                        "then uploaded with the index last)")
    common.add_argument("--samples-per-shard", type=int, default=0)
    common.add_argument("--seed", type=int, default=0, help="seed of the shuffle before sharding")
    common.add_argument("--overwrite", action="store_true", help="replace shards already in --out")
    dg = dsub.add_parser("digits", parents=[common], help="scikit-learn's handwritten digits (32x32 RGB PNG; train/test)")
    dg.add_argument("--labeled-per-class", type=int, metavar="N",
                    help="semi-supervised: as for `data folder` (default: all labeled)")
    f = dsub.add_parser("folder", parents=[common], help="a class-per-folder image tree (train/ val/ test/ splits)")
    f.add_argument("src")
    f.add_argument("--no-shuffle", action="store_true", help="keep sorted order instead of shuffling")
    f.add_argument("--classes", help="comma-separated class folders to write (default: all)")
    f.add_argument("--train-per-class", type=int, default=0,
                   help="keep this many training images per class, chosen by --seed (default: all)")
    f.add_argument("--imbalance-ratio", type=float, default=1.0, metavar="R",
                   help="make the train split long-tailed (CIFAR-10-LT profile): class i keeps "
                        "n_max * R^(-i/(C-1)) images, chosen by --seed (default 1: all)")
    # Not an argparse mutually exclusive group: write_folder's error is one line naming both flags.
    f.add_argument("--labeled-per-class", type=int, metavar="N",
                   help="semi-supervised: N training images per class keep their label, chosen by --seed; the "
                        "others are written without .cls (their label only as .withheld.cls, to score "
                        "pseudo-labels) and the labeled ones also to OUT/labeled (default: all labeled)")
    f.add_argument("--labeled-fraction", type=float, metavar="F",
                   help="like --labeled-per-class, with round(F * n) (at least 1) of a class's n; 0 < F <= 1")
    ix = dsub.add_parser("index", help="write index.json for a directory of existing webdataset tars")
    ix.add_argument("dir")
    d.set_defaults(func=_cmd_data)

    pt = sub.add_parser("plot", help="draw a run's loss, learning-rate and accuracy curves to a PNG")
    pt.add_argument("run_dir", help="a run dir holding metrics.jsonl")
    pt.add_argument("--out", help="PNG path (default RUN_DIR/curves.png)")
    pt.set_defaults(func=_cmd_plot)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``distrain`` console script."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # Overrides may come after options (`train R --resume auto a.b=1`), which argparse leaves over.
    if extra:
        if not hasattr(args, "overrides") or any(x.startswith("-") or "=" not in x for x in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides += extra
    if getattr(args, "samples_per_shard", 0) < 0:
        print("distrain: error: --samples-per-shard must be > 0", file=sys.stderr)
        return 2
    try:
        return args.func(args)
    except DistrainError as e:
        print(f"distrain: error: {_one_line(e)}", file=sys.stderr)
        return e.exit_code
    except RunStopped as e:
        print(f"distrain: stopped: {e}", file=sys.stderr, flush=True)
        return e.exit_code
    except KeyboardInterrupt:
        print("distrain: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
