"""Where the daemon lives: runtime directory, socket, token file, executable. These must agree
with tesserad's own choices. Environment variables that are set but empty count as unset."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from typing import Dict, List, Optional

from .errors import DaemonNotFound

DAEMON_NAME = "tesserad"
SOCKET_NAME = "tesserad.sock"
LOG_NAME = "tesserad.log"


def _env(name: str, environ: Optional[Dict[str, str]] = None) -> Optional[str]:
    value = (os.environ if environ is None else environ).get(name)
    return value if value else None


def _uid() -> str:
    getuid = getattr(os, "getuid", None)
    if getuid is not None:
        return str(getuid())
    import getpass
    return getpass.getuser()


def runtime_dir() -> str:
    """``$TESSERA_RUNTIME_DIR``, else ``$XDG_RUNTIME_DIR/tessera``, else
    ``<temp dir>/tessera-<uid>``."""
    explicit = _env("TESSERA_RUNTIME_DIR")
    if explicit:
        return explicit
    xdg = _env("XDG_RUNTIME_DIR")
    if xdg:
        return os.path.join(xdg, "tessera")
    return os.path.join(_temp_dir(), "tessera-" + _uid())


def _temp_dir() -> str:
    """The temp dir exactly as tesserad (Rust's ``std::env::temp_dir``) finds it on Unix:
    ``$TMPDIR``, else ``/tmp``. ``tempfile.gettempdir()`` also reads TEMP and TMP and skips
    unwritable folders, so it could name another directory than the daemon's."""
    if os.name == "nt":
        return tempfile.gettempdir()
    return os.environ.get("TMPDIR") or "/tmp"


def socket_path() -> str:
    """``$TESSERA_SOCKET``, else ``<runtime dir>/tesserad.sock``."""
    return _env("TESSERA_SOCKET") or os.path.join(runtime_dir(), SOCKET_NAME)


def log_path() -> str:
    """Where an autostarted daemon's output goes: ``<runtime dir>/tesserad.log``."""
    return os.path.join(runtime_dir(), LOG_NAME)


def config_dir() -> str:
    """``$XDG_CONFIG_HOME/tessera``, else ``~/.config/tessera``."""
    base = _env("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return os.path.join(base, "tessera")


def token_path() -> str:
    """The daemon's TCP token file: ``<config dir>/token``."""
    return os.path.join(config_dir(), "token")


def read_token() -> Optional[str]:
    """The TCP token: ``$TESSERA_TOKEN``, else the token file's contents (surrounding
    whitespace stripped), else None."""
    env = _env("TESSERA_TOKEN")
    if env:
        return env.strip()
    try:
        with open(token_path(), "r", encoding="utf-8") as f:
            token = f.read().strip()
    except OSError:
        return None
    return token or None


def data_dir() -> str:
    """``$XDG_DATA_HOME/tessera``, else ``~/.local/share/tessera``."""
    base = _env("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return os.path.join(base, "tessera")


def _exe_name() -> str:
    return DAEMON_NAME + (".exe" if sys.platform == "win32" else "")


def daemon_search_dirs() -> List[str]:
    """The folders :func:`find_daemon` looks in before ``PATH``, in order."""
    dirs = []
    bin_dir = _env("TESSERA_BIN_DIR")
    if bin_dir:
        dirs.append(bin_dir)
    installed = _installed_bin_dir()
    if installed:
        dirs.append(installed)
    dirs.append(os.path.join(data_dir(), "bin"))
    return dirs


# `tessera install` writes this beside each copy of the client it puts in place: the bin folder
# of the prefix it installed into (which need not be the default one).
INSTALLED_BIN_DIR_FILE = "installed_bin_dir"


def _installed_bin_dir() -> Optional[str]:
    try:
        with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), INSTALLED_BIN_DIR_FILE), encoding="utf-8") as f:
            path = f.read().strip()
    except OSError:
        return None
    return path or None


def _is_executable(path: str) -> bool:
    return os.path.isfile(path) and os.access(path, os.X_OK)


def find_daemon() -> str:
    """The path of the ``tesserad`` executable: in ``$TESSERA_BIN_DIR``, then in the prefix
    ``tessera install`` put this copy of the client beside, then in
    ``<$XDG_DATA_HOME or ~/.local/share>/tessera/bin``, then on ``PATH``.

    Raises :class:`DaemonNotFound` naming the places searched.
    """
    name = _exe_name()
    for d in daemon_search_dirs():
        candidate = os.path.join(d, name)
        if _is_executable(candidate):
            return candidate
    found = shutil.which(DAEMON_NAME)
    if found:
        return found
    bin_dir = _env("TESSERA_BIN_DIR")
    places = (["$TESSERA_BIN_DIR (%s)" % (bin_dir if bin_dir else "not set")]
              + [d for d in daemon_search_dirs() if d != bin_dir]
              + ["the folders on PATH"])
    raise DaemonNotFound(
        "daemon_not_found",
        "could not find the Tessera daemon `%s`; looked in %s" % (name, ", ".join(places)),
        "install Tessera, or set TESSERA_BIN_DIR to the folder that holds %s" % name,
    )


# A daemon started on demand exits after this many seconds with no clients and no jobs, so none
# lingers after the editor closes (the same figure as the tessera command line's).
AUTOSTART_IDLE_EXIT_SECS = "600"


def start_daemon(exe: Optional[str] = None,
                 socket: Optional[str] = None) -> subprocess.Popen[bytes]:
    """Starts ``tesserad`` detached from this process (own session, no stdin, output appended
    to :func:`log_path`), with this process's environment. When ``socket`` is given it is
    passed on as ``$TESSERA_SOCKET`` so the daemon listens where the caller will connect."""
    if exe is None:
        exe = find_daemon()
    os.makedirs(runtime_dir(), mode=0o700, exist_ok=True)
    env = dict(os.environ)
    if socket is not None:
        env["TESSERA_SOCKET"] = socket
    argv = [exe, "--idle-exit", AUTOSTART_IDLE_EXIT_SECS]
    with open(log_path(), "ab") as log:
        if sys.platform == "win32":
            flags = (getattr(subprocess, "CREATE_NEW_PROCESS_GROUP", 0)
                     | getattr(subprocess, "DETACHED_PROCESS", 0))
            return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                    env=env, close_fds=True, creationflags=flags)
        return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                env=env, close_fds=True, start_new_session=True)
