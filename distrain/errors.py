"""Exceptions that end a run on purpose, each with its own process exit code.

The CLI prints any of them as a single line ``distrain: ...`` and exits with ``exit_code``;
anything else is a bug and keeps its traceback (exit 1). The codes are documented in the README
("When things go wrong") so that job scripts can react to them.
"""

EXIT_USAGE = 2
"""A mistake in the config, the command line or the input files."""
EXIT_BAD_DATA = 65
"""Bad samples beyond ``data.max_bad_fraction``, or any bad sample under ``data.bad_samples: fail``."""
EXIT_PREEMPTED = 75
"""Stopped by SIGUSR1/SIGTERM after writing a checkpoint; ``--resume auto`` continues exactly."""
EXIT_NONFINITE = 76
"""A non-finite loss or gradient norm under ``train.nonfinite: stop``; the checkpoint is the last good state."""
EXIT_PEER_LOST = 77
"""Another rank died or stopped answering within ``distributed.timeout_s``."""


class DistrainError(Exception):
    """A mistake in the user's config, files or command line, with a one-line explanation."""

    exit_code = EXIT_USAGE


class BadDataError(DistrainError):
    """Too many unreadable samples (or one, under the ``fail`` policy); names shard and key."""

    exit_code = EXIT_BAD_DATA


class RunStopped(Exception):
    """The run stopped early on purpose after saving what can be saved."""

    exit_code = 1


class Preempted(RunStopped):
    """A preemption signal arrived; every rank stopped at the same update and checkpointed."""

    exit_code = EXIT_PREEMPTED


class NonFiniteStop(RunStopped):
    """The loss or gradient norm became non-finite and the policy is to stop."""

    exit_code = EXIT_NONFINITE


class PeerLost(RunStopped):
    """A collective failed: another rank died or hung past the process-group timeout."""

    exit_code = EXIT_PEER_LOST
