"""The one exception type that means "the user can fix this": the CLI turns it into a short
message and exit code 2, without a traceback."""


class DistmlError(Exception):
    """A problem with the user's input (settings, data, checkpoint, device) and how to fix it."""

    exit_code = 2
    label = "error"  # how the CLI introduces the message: "distml: error: ..."


class SettingsError(DistmlError):
    """Invalid settings: a field out of range, an unknown key, a broken config file."""
