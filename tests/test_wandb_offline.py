"""The W&B offline reader used by the training tests, on a run logged through Accelerate."""

import os
import subprocess
import sys
import textwrap

from wandb_offline import read_offline_runs

# Logged exactly the way the product logs: through Accelerate's wandb tracker.
# In a subprocess so wandb's process-wide state (wandb.setup, the wandb-core
# service) never leaks into other tests.
_SCRIPT = textwrap.dedent(
    """
    import sys
    from accelerate import Accelerator

    tmp = sys.argv[1]
    accelerator = Accelerator(log_with="wandb", cpu=True)
    accelerator.init_trackers(
        "proj",
        config={"a": {"b": 1}, "lr": 0.1},
        init_kwargs={"wandb": {"dir": tmp, "name": "x"}},
    )
    accelerator.log({"train/loss": 1.5, "train/lr": 0.1}, step=1)
    accelerator.log({"eval/top1": 0.5}, step=2)
    accelerator.end_training()
    """
)


def test_read_offline_run_logged_through_accelerate(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(WANDB_MODE="offline", WANDB_DIR=str(tmp_path), WANDB_SILENT="true")
    proc = subprocess.run(
        [sys.executable, "-c", _SCRIPT, str(tmp_path)],
        env=env, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert list(tmp_path.glob("wandb/offline-run-*/run-*.wandb"))

    runs = read_offline_runs(tmp_path)
    assert len(runs) == 1
    run = runs[0]
    assert run["id"] and run["name"] == "x" and run["project"] == "proj"
    assert run["exit_code"] == 0
    assert run["config"] == {"a": {"b": 1}, "lr": 0.1}

    user = [{k: v for k, v in row.items() if not k.startswith("_") or k == "_step"}
            for row in run["history"]]
    assert user == [
        {"train/loss": 1.5, "train/lr": 0.1, "_step": 1},
        {"eval/top1": 0.5, "_step": 2},
    ]
    assert all(type(row["_step"]) is int for row in run["history"])
    assert run["summary"]["train/loss"] == 1.5
    assert run["summary"]["train/lr"] == 0.1
    assert run["summary"]["eval/top1"] == 0.5
    assert run["summary"]["_step"] == 2
