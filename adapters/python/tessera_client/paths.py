"""Where the daemon lives: runtime directory, socket, token file, executable. These must agree
with tesserad's own choices. Environment variables that are set but empty count as unset."""

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


def _env(name, environ=None):
    # type: (str, Optional[Dict[str, str]]) -> Optional[str]
    value = (os.environ if environ is None else environ).get(name)
    return value if value else None


def _uid():
    # type: () -> str
    getuid = getattr(os, "getuid", None)
    if getuid is not None:
        return str(getuid())
    import getpass
    return getpass.getuser()


def runtime_dir():
    # type: () -> str
    """``$TESSERA_RUNTIME_DIR``, else ``$XDG_RUNTIME_DIR/tessera``, else
    ``<temp dir>/tessera-<uid>``."""
    explicit = _env("TESSERA_RUNTIME_DIR")
    if explicit:
        return explicit
    xdg = _env("XDG_RUNTIME_DIR")
    if xdg:
        return os.path.join(xdg, "tessera")
    return os.path.join(tempfile.gettempdir(), "tessera-" + _uid())


def socket_path():
    # type: () -> str
    """``$TESSERA_SOCKET``, else ``<runtime dir>/tesserad.sock``."""
    return _env("TESSERA_SOCKET") or os.path.join(runtime_dir(), SOCKET_NAME)


def log_path():
    # type: () -> str
    """Where an autostarted daemon's output goes: ``<runtime dir>/tesserad.log``."""
    return os.path.join(runtime_dir(), LOG_NAME)


def config_dir():
    # type: () -> str
    """``$XDG_CONFIG_HOME/tessera``, else ``~/.config/tessera``."""
    base = _env("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return os.path.join(base, "tessera")


def token_path():
    # type: () -> str
    """The daemon's TCP token file: ``<config dir>/token``."""
    return os.path.join(config_dir(), "token")


def read_token():
    # type: () -> Optional[str]
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


def data_dir():
    # type: () -> str
    """``$XDG_DATA_HOME/tessera``, else ``~/.local/share/tessera``."""
    base = _env("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return os.path.join(base, "tessera")


def _exe_name():
    # type: () -> str
    return DAEMON_NAME + (".exe" if sys.platform == "win32" else "")


def daemon_search_dirs():
    # type: () -> List[str]
    """The folders :func:`find_daemon` looks in before ``PATH``, in order."""
    dirs = []
    bin_dir = _env("TESSERA_BIN_DIR")
    if bin_dir:
        dirs.append(bin_dir)
    dirs.append(os.path.join(data_dir(), "bin"))
    return dirs


def _is_executable(path):
    # type: (str) -> bool
    return os.path.isfile(path) and os.access(path, os.X_OK)


def find_daemon():
    # type: () -> str
    """The path of the ``tesserad`` executable: in ``$TESSERA_BIN_DIR``, then in
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
    places = [
        "$TESSERA_BIN_DIR (%s)" % (bin_dir if bin_dir else "not set"),
        os.path.join(data_dir(), "bin"),
        "the folders on PATH",
    ]
    raise DaemonNotFound(
        "daemon_not_found",
        "could not find the Tessera daemon `%s`; looked in %s" % (name, ", ".join(places)),
        "install Tessera, or set TESSERA_BIN_DIR to the folder that holds %s" % name,
    )


def start_daemon(exe=None, socket=None):
    # type: (Optional[str], Optional[str]) -> subprocess.Popen
    """Starts ``tesserad`` detached from this process (own session, no stdin, output appended
    to :func:`log_path`), with this process's environment. When ``socket`` is given it is
    passed on as ``$TESSERA_SOCKET`` so the daemon listens where the caller will connect."""
    if exe is None:
        exe = find_daemon()
    run_dir = runtime_dir()
    os.makedirs(run_dir, mode=0o700, exist_ok=True)
    env = dict(os.environ)
    if socket is not None:
        env["TESSERA_SOCKET"] = socket
    kwargs = {}  # type: Dict[str, object]
    if sys.platform == "win32":
        kwargs["creationflags"] = getattr(subprocess, "CREATE_NEW_PROCESS_GROUP", 0) | getattr(
            subprocess, "DETACHED_PROCESS", 0)
    else:
        kwargs["start_new_session"] = True
    with open(log_path(), "ab") as log:
        return subprocess.Popen(  # type: ignore[call-overload]
            [exe], stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env, close_fds=True,
            **kwargs)
