"""One exception hierarchy: a user-facing one-line message and an exit code."""

from __future__ import annotations


class NagayaError(Exception):
    """An error the user can act on. The CLI prints `nagaya: <message>` and exits with `exit_code`."""

    exit_code = 1

    def __init__(self, message: str, exit_code: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        if exit_code is not None:
            self.exit_code = exit_code

    def __str__(self) -> str:
        return self.message


class UsageError(NagayaError):
    exit_code = 2


class ImageNotFound(NagayaError):
    exit_code = 3


class ImageError(NagayaError):
    """A broken, hostile or unsupported image or image source."""

    exit_code = 4


class RuntimeSetupError(NagayaError):
    """The container could not be set up (before the user's command ran)."""

    exit_code = 125


class CommandNotFound(NagayaError):
    exit_code = 127


class CommandNotExecutable(NagayaError):
    exit_code = 126


class AuthError(NagayaError):
    """Not logged in, bad credentials, or an expired or revoked token."""

    exit_code = 5


class TooManyAttempts(AuthError):
    """Too many failed passwords for this user from this address: try again later (HTTP 429)."""


class PermissionDenied(NagayaError):
    exit_code = 6


class PolicyRefused(PermissionDenied):
    """The site's image policy refuses this image: one line naming the rule (trust/gate.py)."""


class NotFound(NagayaError):
    """A project, member, token or repository that does not exist (or that the caller may not see)."""

    exit_code = 3


class Conflict(NagayaError):
    exit_code = 7


class SiteError(NagayaError):
    """The site (registry + server) could not be started, stopped or reached."""

    exit_code = 8


class RegistryError(NagayaError):
    """A registry answered in a way nagaya cannot use (server errors, protocol violations)."""

    exit_code = 9


class RegistryUnreachable(RegistryError):
    """The registry could not be reached at all (`nagaya run` may then use the cached digest)."""
