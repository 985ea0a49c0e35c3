"""Who may use the page: the logins of `svd-animate ui --auth/--auth-file`, and the rule that a page served beyond
this machine asks for one unless the server was started with `--no-auth` on purpose (anyone who reaches it can
use the GPU and fill the disk). No Gradio here: the command checks all of it before anything loads."""

from __future__ import annotations

import ipaddress
from pathlib import Path

from svd_common.errors import InputError

LOOPBACK_NAMES = ("localhost",)


def is_loopback(host: str) -> bool:
    """Whether `host` serves this machine only (127.0.0.0/8, ::1, localhost); any other name or address may be
    reached from the network."""
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def parse_login(text: str, where: str) -> tuple[str, str]:
    """`user:password` (the password may hold colons); the error names where it came from, never the text, which
    holds a password."""
    user, colon, password = text.strip().partition(":")
    if not (user and colon and password):
        raise InputError(f"{where}: expected user:password (a user name, a colon, a password)")
    return user, password


def read_logins(pairs: list[str] | None = None, file: Path | None = None) -> list[tuple[str, str]]:
    """The logins of `--auth` (repeatable) and `--auth-file` (one user:password a line; blank lines and # comments
    skipped)."""
    logins = [parse_login(pair, "--auth") for pair in pairs or ()]
    if file is not None:
        try:
            lines = Path(file).read_text().splitlines()
        except OSError as error:
            raise InputError(f"--auth-file {file}: {error.strerror or error}") from None
        logins += [parse_login(line, f"--auth-file {file}: line {number}") for number, line in enumerate(lines, 1)
                   if line.strip() and not line.lstrip().startswith("#")]
        if not logins:
            raise InputError(f"--auth-file {file}: no user:password line")
    return logins


def check_exposure(host: str, logins: list, no_auth: bool) -> None:
    """Refuse to serve beyond this machine without a login, unless `--no-auth` says it is meant."""
    if no_auth and logins:
        raise InputError("--no-auth and --auth/--auth-file: choose one")
    if not (logins or no_auth or is_loopback(host)):
        raise InputError(f"--host {host} lets anyone on the network use this GPU and disk: pass --auth user:password "
                         "or --auth-file FILE (or --no-auth to serve it without a login)")
