"""Read back what a run logged to Weights & Biases in offline mode.

Offline runs (``WANDB_MODE=offline``) write no summary/history json; the only
record is the transaction log ``<wandb_dir>/wandb/offline-run-<ts>-<id>/run-<id>.wandb``.
That file is a LevelDB-style log of serialized ``wandb_internal.Record``
protobufs. The framing is decoded here (a few lines, stdlib only) and every
record is parsed with wandb's own generated class
``wandb.proto.wandb_internal_pb2.Record``, so the decoding of fields follows
whatever wandb version is installed. In-process, no network, milliseconds.

(``wandb leet inspect --json RUN_DIR`` prints the same records via the Go
``wandb-core`` binary; it is a handy manual cross-check but costs a
subprocess.)

Framing (wandb ``datastore``, LevelDB log format):
  * file header, 7 bytes: ``b":W&B"`` + magic ``0xBEE1`` (uint16 LE) + version ``0``;
  * 32 KiB blocks (the header counts towards the first one); each chunk is
    ``crc32 (uint32 LE) | length (uint16 LE) | type (uint8)`` + payload, where
    type is FULL=1, FIRST=2, MIDDLE=3, LAST=4 and the crc is
    ``zlib.crc32(payload, zlib.crc32(bytes([type])))``;
  * fewer than 7 bytes left in a block are zero padding.
"""

from __future__ import annotations

import glob
import json
import os
import struct
import zlib
from typing import Any, Iterator

_HEADER = b":W&B" + struct.pack("<HB", 0xBEE1, 0)
_BLOCK_LEN = 32768
_CHUNK_HEADER = struct.Struct("<IHB")  # crc32, length, type
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def iter_records(path: str) -> Iterator[Any]:
    """Yield every ``wandb_internal_pb2.Record`` stored in a ``.wandb`` file, in order.

    A truncated tail (run still writing, or killed mid-write) ends the
    iteration quietly; a checksum mismatch or bad framing raises ValueError.
    """
    from wandb.proto import wandb_internal_pb2 as pb

    with open(path, "rb") as f:
        data = f.read()
    if data[: len(_HEADER)] != _HEADER:
        raise ValueError(f"{path}: not a wandb transaction log (header {data[:7]!r})")
    pos, n = len(_HEADER), len(data)
    pending: bytearray | None = None
    while True:
        left_in_block = _BLOCK_LEN - pos % _BLOCK_LEN
        if left_in_block < _CHUNK_HEADER.size:  # zero padding at end of block
            pos += left_in_block
            continue
        if pos + _CHUNK_HEADER.size > n:
            return
        crc, length, ctype = _CHUNK_HEADER.unpack_from(data, pos)
        if ctype == 0 and length == 0:  # preallocated / zeroed tail
            return
        start = pos + _CHUNK_HEADER.size
        if start + length > n:
            return  # record still being written
        payload = data[start : start + length]
        if zlib.crc32(payload, zlib.crc32(bytes([ctype]))) & 0xFFFFFFFF != crc:
            raise ValueError(f"{path}: checksum mismatch at offset {pos}")
        pos = start + length
        if ctype == _FULL:
            pending, whole = None, payload
        elif ctype == _FIRST:
            pending = bytearray(payload)
            continue
        elif ctype in (_MIDDLE, _LAST) and pending is not None:
            pending += payload
            if ctype == _MIDDLE:
                continue
            whole, pending = bytes(pending), None
        else:
            raise ValueError(f"{path}: bad chunk type {ctype} at offset {pos}")
        record = pb.Record()
        record.ParseFromString(whole)
        yield record


def _path(item) -> list[str]:
    return list(item.nested_key) or [item.key]


def _item_value(item) -> Any:
    """Value of a History/Summary/ConfigItem (value_json, or HistoryItem's typed oneof)."""
    if item.value_json:
        return json.loads(item.value_json)  # accepts NaN / Infinity too
    which = item.WhichOneof("value") if "value" in type(item).DESCRIPTOR.oneofs_by_name else None
    if which is None or which == "none":
        return None
    if which == "json":
        return json.loads(item.json)
    return getattr(item, which)


def _set_nested(d: dict, path: list[str], value: Any) -> None:
    for k in path[:-1]:
        d = d.setdefault(k, {})
    d[path[-1]] = value


def _del_nested(d: dict, path: list[str]) -> None:
    for k in path[:-1]:
        d = d.get(k)
        if not isinstance(d, dict):
            return
    d.pop(path[-1], None)


def _apply_config(config: dict, rec) -> None:
    for item in rec.update:
        _set_nested(config, _path(item), _item_value(item))
    for item in rec.remove:
        _del_nested(config, _path(item))


def _apply_summary(summary: dict, rec) -> None:
    for item in rec.update:
        summary[".".join(_path(item))] = _item_value(item)
    for item in rec.remove:
        summary.pop(".".join(_path(item)), None)


def read_offline_run(path: str) -> dict:
    """Decode one ``run-<id>.wandb`` file (see ``read_offline_runs``)."""
    run: dict = {
        "id": None,
        "name": None,
        "project": None,
        "config": {},
        "history": [],
        "summary": {},
        "exit_code": None,  # None: no exit record (crashed or still running)
        "path": path,
    }
    for record in iter_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            r = record.run
            run["id"] = r.run_id
            run["name"] = r.display_name or None
            run["project"] = r.project or None
            _apply_config(run["config"], r.config)
            _apply_summary(run["summary"], r.summary)
        elif kind == "config":
            _apply_config(run["config"], record.config)
        elif kind == "summary":
            _apply_summary(run["summary"], record.summary)
        elif kind == "history":
            h = record.history
            row = {".".join(_path(item)): _item_value(item) for item in h.item}
            if h.HasField("step"):
                row["_step"] = int(h.step.num)
            elif "_step" in row:
                row["_step"] = int(row["_step"])
            run["history"].append(row)
        elif kind == "exit":
            run["exit_code"] = record.exit.exit_code
    if run["id"] is None:  # no run record: fall back on the file name run-<id>.wandb
        run["id"] = os.path.basename(path)[len("run-") : -len(".wandb")]
    # wandb-internal bookkeeping, not something the run logged
    run["config"].pop("_wandb", None)
    for key in [k for k in run["summary"] if k == "_wandb" or k.startswith("_wandb.")]:
        del run["summary"][key]
    return run


def read_offline_runs(wandb_dir: str | os.PathLike) -> list[dict]:
    """Every offline W&B run under ``wandb_dir``, one dict per ``.wandb`` file.

    Searches ``wandb_dir/**/offline-run-*/run-*.wandb`` (wandb puts them in
    ``<dir>/wandb/offline-run-<YYYYmmdd_HHMMSS>-<id>/``) and returns them sorted
    by path, i.e. by start time per wandb dir. Each dict::

        {"id": run id, "name": display name or None, "project": ...,
         "config": {...},      # as logged: nested dicts stay nested; "_wandb" dropped
         "history": [{key: value, ..., "_step": int}, ...],   # in logged order
         "summary": {...},     # last value of each key ("_wandb.*" dropped)
         "exit_code": int or None, "path": path of the .wandb file}

    Values are decoded from their JSON encoding (float, int, str, bool, None,
    list, dict; NaN/inf as float). History and summary keys are flat: a
    logged nested dict ``{"m": {"a": 1}}`` shows up as ``"m.a"`` (that is how
    wandb stores it). A resumed run (same ``id``) gets one entry per process,
    each with its own offline-run directory.
    """
    pattern = os.path.join(os.fspath(wandb_dir), "**", "offline-run-*", "run-*.wandb")
    return [read_offline_run(p) for p in sorted(glob.glob(pattern, recursive=True))]
