"""Start and stop a real tesserad for the tests, in a runtime directory of its own."""

import os
import signal
import socket
import subprocess
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def bin_dir():
    """Where the built binaries are: $TESSERA_BIN_DIR, else cargo's debug directory."""
    return os.environ.get("TESSERA_BIN_DIR") or os.path.join(ROOT, "target", "debug")


def exe(name):
    path = os.path.join(bin_dir(), name)
    if not os.access(path, os.X_OK):
        raise RuntimeError("%s is not built: run `cargo build --workspace` first" % path)
    return path


class Daemon(object):
    """A running tesserad. `args` are extra command-line flags (limits, --listen...)."""

    def __init__(self, runtime, args=(), env=None):
        self.runtime = str(runtime)
        self.socket = os.path.join(self.runtime, "tesserad.sock")
        self.buffers = os.path.join(self.runtime, "buffers")
        self.log_path = os.path.join(self.runtime, "tesserad.log")
        self.env = dict(os.environ, TESSERA_RUNTIME_DIR=self.runtime, TESSERA_LOG="debug")
        self.env.pop("TESSERA_SOCKET", None)
        self.env.update(env or {})
        os.makedirs(self.runtime, exist_ok=True)
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([exe("tesserad")] + list(args), env=self.env,
                                     stdin=subprocess.DEVNULL, stdout=self._log, stderr=self._log)
        deadline = time.time() + 20
        while not self._accepts():
            if self.proc.poll() is not None or time.time() > deadline:
                raise RuntimeError("tesserad did not start:\n" + self.log())
            time.sleep(0.02)

    def _accepts(self):
        s = socket.socket(socket.AF_UNIX)
        try:
            s.connect(self.socket)
            return True
        except OSError:
            return False
        finally:
            s.close()

    def log(self):
        with open(self.log_path, "rb") as f:
            return f.read().decode("utf-8", "replace")

    def client(self, **kw):
        from tessera_client import Client
        kw.setdefault("autostart", False)
        return Client.connect(socket=self.socket, **kw)

    def stop(self, sig=signal.SIGTERM, timeout=20):
        """Stops the daemon and returns its exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


def vm_hwm_mib(pid):
    """A process's peak resident memory (VmHWM) in MiB."""
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def tessera_cli(env, *args, timeout=600):
    """Runs the `tessera` command line without starting a daemon."""
    return subprocess.run([exe("tessera"), "--no-start"] + list(args), env=env, capture_output=True, text=True, timeout=timeout)


def raw_socket(path, timeout=10.0):
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(timeout)
    s.connect(path)
    return s


def installed(home, *args, env=None):
    """Runs `tessera install --no-model ARGS` for a user whose HOME is `home` (no XDG
    variables: the defaults under HOME), and returns where the install put the adapters."""
    home = str(home)
    env = user_env(home, env)
    r = subprocess.run([exe("tessera"), "install", "--no-model"] + list(args), env=env, capture_output=True, text=True, timeout=300)
    if r.returncode != 0:
        raise RuntimeError("tessera install failed:\n" + r.stderr)
    return {
        "prefix": os.path.join(home, ".local", "share", "tessera"),
        "gimp_plugins": os.path.join(home, ".config", "GIMP", "3.0", "plug-ins"),
        "pykrita": os.path.join(home, ".local", "share", "krita", "pykrita"),
        "kritarc": os.path.join(home, ".config", "kritarc"),
        "stderr": r.stderr,
    }


def user_env(home, extra=None):
    """The environment of a user whose HOME is `home`, XDG folders at their defaults."""
    env = dict(os.environ, HOME=str(home), TESSERA_RUNTIME_DIR=os.path.join(str(home), "rt"))
    for var in ("XDG_CONFIG_HOME", "XDG_DATA_HOME", "TESSERA_MODEL_DIR", "TESSERA_SOCKET", "TESSERA_BIN_DIR"):
        env.pop(var, None)
    env.update(extra or {})
    return env
