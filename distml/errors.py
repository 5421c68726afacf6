"""Every distml exception and its exit code, in one place.

A ``DistmlError`` means "the user can fix this": the CLI prints its one-paragraph message
(introduced by ``label``) and exits with ``exit_code``, without a traceback. A DDP rank that
stops on one hands it to the launcher, which raises the same class again in the parent
(``error_for_exit_code``), so the user sees one message whichever process found the problem.
"""

from __future__ import annotations

import signal


class DistmlError(Exception):
    """A problem with the user's input (settings, data, checkpoint, device) and how to fix it."""

    exit_code = 2
    label = "error"  # how the CLI introduces the message: "distml: error: ..."


class SettingsError(DistmlError):
    """Invalid settings: a field out of range, an unknown key, a broken config file."""


class TrainingDiverged(DistmlError):
    """The loss stayed non-finite: lower the learning rate or use bf16 / fp32."""

    exit_code = 3


class Interrupted(DistmlError):
    """SIGINT / SIGTERM: the run saved its state and stopped; it can be resumed.
    Exits 128 + the signal number (130 for SIGINT, 143 for SIGTERM), as a shell expects."""

    exit_code = 130
    label = "stopped"
    signal_exit_codes = (130, 143)

    @classmethod
    def after_signal(cls, signum: int, run_dir: object, where: str = "") -> Interrupted:
        """The error of a run stopped by ``signum`` (its state saved): exit 128 + signum."""
        error = cls(
            f"{signal.Signals(signum).name} received{where}: the training state is saved. "
            f"Resume with: distml train --resume {run_dir}"
        )
        error.exit_code = 128 + signum
        return error


class RankFailure(DistmlError):
    """A rank died: the message names it and its error. Not a settings problem: exit 1."""

    exit_code = 1


# the exceptions a rank may stop on that the user can act on: the launcher gives them back
# unchanged (same class, same exit code) instead of reporting a crashed rank
USER_ERRORS: tuple[type[DistmlError], ...] = (DistmlError, TrainingDiverged, Interrupted)


def user_exit_codes() -> tuple[int, ...]:
    """The exit codes of USER_ERRORS (a rank exiting with one of these stopped on purpose)."""
    codes = {code for kind in USER_ERRORS for code in exit_codes_of(kind)}
    return tuple(sorted(codes))


def exit_codes_of(kind: type[DistmlError]) -> tuple[int, ...]:
    return getattr(kind, "signal_exit_codes", None) or (kind.exit_code,)


def error_for_exit_code(exit_code: int, message: str) -> DistmlError | None:
    """The user error a rank stopped on, rebuilt from its exit code and message (None when
    the exit code is not a user error's)."""
    for kind in reversed(USER_ERRORS):  # the most specific class first
        if exit_code in exit_codes_of(kind):
            error = kind(message)
            error.exit_code = exit_code
            return error
    return None
