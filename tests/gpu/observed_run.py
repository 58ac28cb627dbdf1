"""Run ``distrain ARGS`` in this process and report what a GPU test cannot see from outside.

Usage: ``python observed_run.py REPORT.json ARGS...``. The report (JSON) holds the exit code; the
synchronising CUDA calls (torch's sync debug mode, counted, with the distrain line that made each);
and what the model's convolutions received: input and weight layout, device, autocast dtype.
"""

from __future__ import annotations

import json
import sys
import traceback
import warnings
from pathlib import Path

import torch

SYNC = "called a synchronizing CUDA operation"


def main(report_path: str, args: list[str]) -> int:
    from distrain.cli import main as distrain

    report = {"syncs": 0, "sync_sites": {}, "probe_counted": None, "conv": {}}
    show = warnings.showwarning

    def count(message, category, filename, lineno, file=None, line=None):
        if SYNC not in str(message):
            return show(message, category, filename, lineno, file, line)
        report["syncs"] += 1
        ours = [f for f in traceback.extract_stack() if "/distrain/" in f.filename]
        site = f"{Path(ours[-1].filename).name}:{ours[-1].lineno} {ours[-1].name}" if ours else "outside distrain"
        report["sync_sites"][site] = report["sync_sites"].get(site, 0) + 1

    warnings.showwarning = count
    warnings.filterwarnings("always", message=SYNC)
    if torch.cuda.is_available():
        torch.cuda.set_sync_debug_mode("warn")
        torch.ones(1, device="cuda").item()  # one known sync: proves the counting works
        report["probe_counted"], report["syncs"], report["sync_sites"] = report["syncs"] == 1, 0, {}

    def observe(module, inputs):
        if isinstance(module, torch.nn.Conv2d) and inputs and isinstance(inputs[0], torch.Tensor):
            x = inputs[0]
            seen = {"input_channels_last": x.is_contiguous(memory_format=torch.channels_last),
                    "weight_channels_last": module.weight.is_contiguous(memory_format=torch.channels_last),
                    "device": x.device.type,
                    "autocast": str(torch.get_autocast_dtype(x.device.type))
                    if torch.is_autocast_enabled(x.device.type) else "off"}
            for key, value in seen.items():
                values = report["conv"].setdefault(key, [])
                if value not in values:
                    values.append(value)

    torch.nn.modules.module.register_module_forward_pre_hook(observe)
    try:
        report["rc"] = distrain(args)
    except SystemExit as e:
        report["rc"] = e.code
    Path(report_path).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2:]))
