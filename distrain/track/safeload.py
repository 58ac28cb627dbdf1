"""Reading checkpoints without running code from them.

A ``torch.load(weights_only=False)`` runs whatever a pickle names: DeepSpeed's checkpoint engine and
``zero_to_fp32`` load that way, and Accelerate loads ``custom_checkpoint_*.pkl`` that way. Every
distrain load of a checkpoint therefore goes through :func:`refusing_pickled_code`, which makes each
``torch.load`` inside it a ``weights_only=True`` load that knows only tensors, plain containers and
the few types of :func:`allowed_globals` (what DeepSpeed and Accelerate checkpoints legitimately
hold). A file naming anything else is refused with a one-line :class:`DistrainError` naming it;
nothing in it runs.

A refusal on one rank must not leave the others waiting in a collective, so a resume first checks
the checkpoint's files, spread over the ranks, and all ranks agree on the outcome
(:func:`check_checkpoint`) before anything is loaded.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import pickletools
import re
import sys
import warnings
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from distrain.errors import DistrainError

# Files that Accelerate and DeepSpeed read with torch.load (safetensors and JSON are safe by format).
TORCH_SUFFIXES = (".bin", ".pt", ".pth", ".pkl")
_ZIP_MAGIC = b"PK\x03\x04"


def allowed_globals() -> list:
    """The non-tensor types a distrain checkpoint may hold, besides torch's own weights_only set.

    NumPy arrays and dtypes are the Python/NumPy RNG states (``random_states_<rank>.pkl``). The
    DeepSpeed types are in its ZeRO optimizer files; they are only allowed where DeepSpeed is
    loaded, which every DeepSpeed resume, export and eval does before reading.
    """
    multiarray = np._core.multiarray if hasattr(np, "_core") else np.core.multiarray  # NumPy 2 / 1
    # The MT19937 key is a uint32 array; BUILD on its dtype needs the dtype's own class (NumPy >= 1.25).
    found = [multiarray._reconstruct, np.ndarray, np.dtype]
    if hasattr(np, "dtypes"):
        found.append(np.dtypes.UInt32DType)
    if "deepspeed" in sys.modules:
        from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
        from deepspeed.runtime.zero.config import ZeroStageEnum
        from deepspeed.utils.tensor_fragment import fragment_address

        found += [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]
    return found


def _pickled_globals(path: Path) -> list[str]:
    """The callables a pickle (or a torch.save zip's ``data.pkl``) names, read without unpickling."""
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as z:
                data = z.read(next(n for n in z.namelist() if n.endswith("data.pkl")))
        else:
            data = path.read_bytes()
        found, strings = [], []
        for op, arg, _ in pickletools.genops(data):
            if op.name in ("GLOBAL", "INST"):
                found.append(arg.replace(" ", "."))
            elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                found.append(".".join(strings[-2:]))
            elif isinstance(arg, str):
                strings.append(arg)
        return found
    except (OSError, ValueError, StopIteration, zipfile.BadZipFile, KeyError):
        return []


def _refusal(what: str, path: Path, error: Exception) -> DistrainError:
    """The one-line error for a file that weights_only loading refused."""
    named = re.search(r"GLOBAL ([\w.]+)", str(error))
    if named:
        code = [named.group(1)]
    else:  # e.g. a protocol-4 pickle, whose opcodes torch's safe unpickler stops at before any global
        allowed = {f"{g.__module__}.{g.__qualname__}" for g in allowed_globals()}
        allowed |= set(getattr(torch._weights_only_unpickler, "_get_allowed_globals", dict)())  # torch's own
        code = sorted({g for g in _pickled_globals(path) if g not in allowed})
    if code:
        return DistrainError(
            f"{what}: cannot load {path}: it contains pickled code ({', '.join(code)}); nothing from it was run"
        )
    reason = next((line.strip() for line in reversed(str(error).splitlines()) if line.strip()
                   and not line.startswith("Check the documentation")), type(error).__name__)
    return DistrainError(f"{what}: cannot load {path} ({reason[:200]})")


def _load(load, f, map_location=None, **kwargs):
    with torch.serialization.safe_globals(allowed_globals()), warnings.catch_warnings():
        # torch.save writes protocol 2; torch warns about any other before refusing it, which the
        # refusal says better.
        warnings.filterwarnings("ignore", "Detected pickle protocol", UserWarning)
        return load(f, map_location=map_location, weights_only=True, **kwargs)


@contextlib.contextmanager
def refusing_pickled_code(what: str) -> Iterator[None]:
    """Within the block, every ``torch.load`` is a weights_only load with :func:`allowed_globals`.

    A file that names anything else raises a :class:`DistrainError` ``WHAT: cannot load FILE: it
    contains pickled code (NAMES); nothing from it was run``. Where the caller swallows that error
    (Accelerate ignores RNG states it cannot read), the block still ends with it.

    Args:
        what: How the user asked for the load (``--resume``, ``export``, ``eval``): the message's start.
    """
    original = torch.load
    refused: list[DistrainError] = []

    def safe_load(f, map_location=None, pickle_module=None, *, weights_only=None, **kwargs):
        # Callers' weights_only=False and their pickle_module are exactly what must not apply here.
        try:
            return _load(original, f, map_location, **kwargs)
        except pickle.UnpicklingError as e:
            path = Path(f) if isinstance(f, (str, os.PathLike)) else Path(getattr(f, "name", "<stream>"))
            refused.append(_refusal(what, path, e))
            raise refused[-1] from None

    torch.load = safe_load
    try:
        yield
    except Exception:
        if refused:  # the refusal, not whatever the caller made of it
            raise refused[0] from None
        raise
    finally:
        torch.load = original
    if refused:
        raise refused[0]


def check_file(path: Path, what: str) -> str | None:
    """Why ``path`` must not be loaded (the one-line message), or None if it is a plain weights file.

    Loads it as the real load will, but memory-maps zip files, so tensor data is not read.
    """
    try:
        with path.open("rb") as f:
            mmap = f.read(4) == _ZIP_MAGIC
        _load(torch.serialization.load, path, "cpu", mmap=mmap)
    except pickle.UnpicklingError as e:
        return str(_refusal(what, path, e))
    except (OSError, RuntimeError, EOFError, ValueError) as e:
        return f"{what}: cannot load {path} ({str(e).splitlines()[0][:200] if str(e) else type(e).__name__})"
    return None


def check_checkpoint(checkpoint: Path, what: str, rank: int, world: int) -> None:
    """Check every torch-loaded file of ``checkpoint`` before loading it; all ranks call this together.

    Each rank checks its share of the files, then all ranks learn of any refusal and raise the same
    error, so none is left in a collective of the load while another exits.

    Raises:
        DistrainError: on every rank, naming the first refused file.
    """
    files = sorted(p for p in checkpoint.rglob("*") if p.suffix in TORCH_SUFFIXES and p.is_file())
    problems = [m for m in (check_file(p, what) for p in files[rank::world]) if m]
    if world > 1:
        from accelerate.utils import gather_object

        problems = gather_object(problems[:1])
    if problems:
        raise DistrainError(problems[0])
