"""The error hierarchy of the core.

The core raises these; only the CLI turns them into messages and exit codes
(`Error: <what> (<where>)` then `Hint: <hint>`), and the server into HTTP statuses.
"""

from __future__ import annotations


class FwbuildError(Exception):
    """A failure the user can understand and usually fix.

    `what` says what went wrong, `where` names the file, key path or offset,
    `hint` says how to fix it. `exit_code` is what the CLI exits with.
    """

    exit_code = 1

    def __init__(self, what: str, where: str | None = None, hint: str | None = None) -> None:
        super().__init__(what)
        self.what = what
        self.where = where
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.what} ({self.where})" if self.where else self.what


class UsageError(FwbuildError):
    """Bad command-line usage or a bad input document (exit 2)."""

    exit_code = 2


class ConfigError(UsageError):
    """A configuration document that cannot be accepted: a recipe, `--set`, `server.toml`.

    Raised by the one config model (fwbuild/configmodel.py) and the documents' semantic
    checks; `where` is `FILE: key.path` (or `--set key=value`, or `FILE:LINE`).
    """


# The former name of ConfigError, kept as an alias so that code and tests written against
# it keep working; new code says ConfigError.
RecipeError = ConfigError


class FormatError(FwbuildError):
    """Bytes that do not follow the expected binary or text format."""


class BootconfError(FwbuildError):
    """A bootconf.txt value that the bootloader would reject or ignore (an image's content)."""


class SignatureError(FwbuildError):
    """A signature that is missing, malformed or does not verify."""


class SourceError(FwbuildError):
    """A pinned input that cannot be fetched, or whose bytes do not match its pin."""


class KeyFileError(FwbuildError):
    """A key file that is missing, unreadable or of the wrong type."""


class BuildError(FwbuildError):
    """A build step that failed."""


class ToolError(FwbuildError):
    """An external program (apt-get, qemu, sshd ...) that is missing or failed."""
