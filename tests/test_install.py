"""`tessera install`, `doctor` and `uninstall` for a user of their own (a temporary HOME with
GIMP profiles, a kritarc and other people's plug-ins in it): every file and mode, the kritarc
entry, twice = once, a newer install replacing an older, doctor on a healthy and a broken
install, and an uninstall that leaves exactly what was there before.
(The GIMP and Krita rig tests load the plug-ins from such an install: plugin_dir there.)"""

import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys

import pytest

from harness import Daemon, bin_dir, exe, installed, user_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def a_users_home(tmp_path):
    """A HOME as a GIMP and Krita user has it before Tessera: GIMP 2.10 and 3.0 and 3.2
    profiles with a plug-in of someone else's, a kritarc with settings and another enabled
    plugin, and that plugin in pykrita."""
    home = tmp_path / "home"
    for profile in ("2.10", "3.0", "3.2"):
        other = home / ".config" / "GIMP" / profile / "plug-ins" / "someone-elses"
        other.mkdir(parents=True)
        (other / "someone-elses.py").write_text("# not ours\n")
        os.chmod(other / "someone-elses.py", 0o755)
    (home / ".config" / "kritarc").write_text("[General]\nLanguage=en\n\n[python]\nenable_other_plugin=true\n\n[MainWindow]\nState=AAA\n")
    pykrita = home / ".local" / "share" / "krita" / "pykrita"
    (pykrita / "other_plugin").mkdir(parents=True)
    (pykrita / "other_plugin.desktop").write_text("[Desktop Entry]\n")
    (pykrita / "other_plugin" / "__init__.py").write_text("")
    (home / "Pictures").mkdir()
    (home / "Pictures" / "holiday.ora").write_bytes(b"a user document")
    return home


def tree(root):
    """Every path under `root` with its mode and (for files) content digest."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            digest = hashlib.sha256(open(p, "rb").read()).hexdigest() if stat.S_ISREG(st.st_mode) else None
            out[os.path.relpath(p, root)] = (stat.S_IMODE(st.st_mode), digest)
    return out


def tessera(home, *args, env=None):
    return subprocess.run([exe("tessera"), "--no-start"] + list(args), env=user_env(home, env), capture_output=True, text=True, timeout=300)


def test_install_puts_every_file_in_place_and_twice_is_once(tmp_path):
    home = a_users_home(tmp_path)
    before = tree(home)
    got = installed(home)
    prefix = got["prefix"]
    for exe_name in ("tesserad", "tessera"):
        assert stat.S_IMODE(os.stat(os.path.join(prefix, "bin", exe_name)).st_mode) == 0o755
    libs = sorted(os.listdir(os.path.join(prefix, "lib", "tessera", "plugins")))
    assert libs == sorted(f for f in os.listdir(bin_dir()) if f.startswith("libtessera_") and f.endswith(".so")) and len(libs) == 3
    assert os.path.isfile(os.path.join(prefix, "python", "tessera_client", "client.py"))
    # GIMP: every 3.x profile, not 2.10 (no Python 3 plug-ins there); the exec bit GIMP needs.
    for profile in ("3.0", "3.2"):
        plug = home / ".config" / "GIMP" / profile / "plug-ins" / "tessera-upscale"
        assert stat.S_IMODE(os.stat(plug / "tessera-upscale.py").st_mode) == 0o755
        assert (plug / "tessera_client" / "client.py").is_file()
        assert not list(plug.rglob("__pycache__"))
    assert not (home / ".config" / "GIMP" / "2.10" / "plug-ins" / "tessera-upscale").exists()
    # Krita: the plugin, its client, and enabled beside the other plugin, all else kept.
    pykrita = home / ".local" / "share" / "krita" / "pykrita"
    assert (pykrita / "tessera_krita.desktop").is_file() and (pykrita / "tessera_krita" / "tessera_client" / "client.py").is_file()
    assert (home / ".config" / "kritarc").read_text() == (
        "[General]\nLanguage=en\n\n[python]\nenable_other_plugin=true\nenable_tessera_krita=true\n\n[MainWindow]\nState=AAA\n")
    # Nothing that was there changed.
    after = tree(home)
    assert {k: v for k, v in after.items() if k in before and k != ".config/kritarc"} == {k: v for k, v in before.items() if k != ".config/kritarc"}
    # Twice is once: the same files, modes and contents.
    installed(home)
    assert tree(home) == after
    record = json.load(open(os.path.join(prefix, "installed.json")))
    assert record["version"] and len(record["files"]) == 2 + 3 + 1


def test_a_newer_install_replaces_the_older_cleanly(tmp_path):
    home = a_users_home(tmp_path)
    got = installed(home)
    # Pretend the install was an older version that shipped an engine since dropped.
    path = os.path.join(got["prefix"], "installed.json")
    record = json.load(open(path))
    stale = os.path.join(got["prefix"], "lib", "tessera", "plugins", "libtessera_dropped.so")
    open(stale, "wb").write(b"old engine")
    record["version"], record["files"] = "0.0.1", record["files"] + [[stale, 0o644]]
    json.dump(record, open(path, "w"))
    installed(home)
    assert not os.path.exists(stale)
    assert json.load(open(path))["version"] != "0.0.1"


def srgan_store(tmp_path, store):
    """A store with a copy of the fetched srgan-pair (the test may damage it)."""
    mine = tmp_path / "models"
    shutil.copytree(os.path.join(str(store), "srgan-pair"), mine / "srgan-pair")
    return mine


def test_doctor_on_a_healthy_install_then_names_each_problem_and_its_fix(tmp_path, store):
    home = a_users_home(tmp_path)
    models = srgan_store(tmp_path, store)
    env = {"TESSERA_MODEL_DIR": str(models)}
    got = installed(home, env=env)
    r = tessera(home, "doctor", env=env)
    assert r.returncode == 0, r.stdout
    assert "no problems found" in r.stdout
    assert "srgan-pair: verified" in r.stdout and "enabled in %s" % got["kritarc"] in r.stdout
    assert "GIMP sees the plug-in in %s" % (home / ".config" / "GIMP" / "3.2" / "plug-ins" / "tessera-upscale") in r.stdout

    # With the daemon running: its version, engines and the workers' devices.
    with Daemon(home / "rt", env=env):
        r = tessera(home, "doctor", env=env)
        assert r.returncode == 0, r.stdout
        assert "tesserad %s running" % record_version(got) in r.stdout
        assert "cpu: worker" in r.stdout

    # Broken three ways: doctor names each, with its fix, and fails.
    script = home / ".config" / "GIMP" / "3.0" / "plug-ins" / "tessera-upscale" / "tessera-upscale.py"
    os.chmod(script, 0o644)
    kritarc = home / ".config" / "kritarc"
    kritarc.write_text(kritarc.read_text().replace("enable_tessera_krita=true", "enable_tessera_krita=false"))
    weights = next(p for p in (models / "srgan-pair").iterdir() if p.suffix == ".safetensors")
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    r = tessera(home, "doctor", env=env)
    assert r.returncode != 0
    out = r.stdout
    assert "3 problem(s) found" in out, out
    assert "%s is not executable" % script in out and "fix: chmod +x %s" % script in out
    assert "the Krita plugin is disabled in %s" % kritarc in out and "fix: tessera install" in out
    assert "model `srgan-pair` is damaged" in out and "fix: tessera models fetch srgan-pair" in out
    r = tessera(home, "models", "verify", env=env)
    assert r.returncode != 0 and "srgan-pair" in r.stdout and "tessera models fetch srgan-pair" in r.stdout
    # The fixes doctor names fix it (the model's, a fetch, is the fetch tests' matter).
    installed(home, env=env)
    r = tessera(home, "doctor", env=env)
    assert "1 problem(s) found" in r.stdout, r.stdout


def record_version(got):
    return json.load(open(os.path.join(got["prefix"], "installed.json")))["version"]


def test_doctor_with_nothing_installed_says_how_to_install(tmp_path):
    home = a_users_home(tmp_path)
    r = tessera(home, "doctor")
    assert r.returncode != 0
    assert "not installed under %s" % (home / ".local" / "share" / "tessera") in r.stdout
    assert "fix: tessera install" in r.stdout
    assert "the GIMP profile %s has no Tessera plug-in" % (home / ".config" / "GIMP" / "3.2") in r.stdout
    assert "the Krita plugin is not in" in r.stdout and "not enabled in" in r.stdout


@pytest.mark.parametrize("with_models", [False, True])
def test_uninstall_removes_ours_and_nothing_else(tmp_path, store, with_models):
    home = a_users_home(tmp_path)
    before = tree(home)
    models = home / ".local" / "share" / "tessera" / "models"  # the default store, in the prefix
    installed(home)
    shutil.copytree(os.path.join(str(store), "srgan-pair"), models / "srgan-pair")
    r = tessera(home, "uninstall", *(["--models"] if with_models else []))
    assert r.returncode == 0, r.stderr
    after = tree(home)
    if with_models:
        assert after == before
    else:
        kept = {k: v for k, v in after.items() if k not in before}
        assert all(k.startswith(".local/share/tessera") for k in kept), sorted(kept)
        assert (models / "srgan-pair" / "manifest.json").is_file()
        assert {k: v for k, v in after.items() if k in before} == before
    r = tessera(home, "uninstall")
    assert r.returncode != 0 and "nothing of Tessera is installed" in r.stderr


@pytest.fixture(scope="module")
def packages(tmp_path_factory):
    """installer/package.sh's tarball and Debian package, made from the test build."""
    out = tmp_path_factory.mktemp("dist")
    r = subprocess.run(["bash", os.path.join(ROOT, "installer", "package.sh"), "--no-build", "--bin-dir", bin_dir(), "--out", str(out)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    tarball, deb = r.stdout.split()
    return tarball, deb


def test_the_release_tarball_installs_without_a_toolchain(tmp_path, packages):
    tarball, _ = packages
    subprocess.run(["tar", "-xzf", tarball, "-C", str(tmp_path)], check=True)
    (top,) = [p for p in tmp_path.iterdir() if p.name.startswith("tessera-")]
    home = a_users_home(tmp_path)
    # No cargo on PATH: the tarball's own binaries are installed.
    r = subprocess.run(["bash", str(top / "install.sh"), "--no-model"], env=user_env(home, {"PATH": "/usr/bin:/bin"}),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    prefix = home / ".local" / "share" / "tessera"
    assert (prefix / "bin" / "tesserad").is_file() and len(os.listdir(prefix / "lib" / "tessera" / "plugins")) == 3
    assert (home / ".config" / "GIMP" / "3.2" / "plug-ins" / "tessera-upscale" / "tessera-upscale.py").is_file()
    r = tessera(home, "doctor")
    assert "Tessera %s installed in %s" % (record_version({"prefix": str(prefix)}), prefix) in r.stdout, r.stdout


def test_the_debian_package_holds_the_same_tree_and_its_tessera_installs(tmp_path, packages):
    _, deb = packages
    info = subprocess.run(["dpkg-deb", "--field", deb, "Package", "Version", "Depends"], capture_output=True, text=True, check=True).stdout
    assert "Package: tessera" in info and "libc6" in info
    root = tmp_path / "root"
    subprocess.run(["dpkg-deb", "-x", deb, str(root)], check=True)
    lib = root / "usr" / "lib" / "tessera"
    assert os.readlink(root / "usr" / "bin" / "tessera") == "../lib/tessera/bin/tessera"
    assert len(os.listdir(lib / "lib" / "tessera" / "plugins")) == 3
    assert (lib / "share" / "tessera" / "adapters" / "krita" / "tessera_krita.desktop").is_file()
    home = a_users_home(tmp_path)
    # Run through the /usr/bin symlink, as users do: the tree is found where the link points.
    r = subprocess.run([str(root / "usr" / "bin" / "tessera"), "install", "--no-model"], env=user_env(home),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert installed_kritarc_enabled(home)


def installed_kritarc_enabled(home):
    return "enable_tessera_krita=true" in (home / ".config" / "kritarc").read_text()


def test_the_service_unit_is_installed_and_removed(tmp_path):
    home = a_users_home(tmp_path)
    before = tree(home)
    got = installed(home, "--service")
    unit = home / ".config" / "systemd" / "user" / "tesserad.service"
    text = unit.read_text()
    assert "ExecStart=%s" % os.path.join(got["prefix"], "bin", "tesserad") in text and "WantedBy=default.target" in text
    r = tessera(home, "uninstall")
    assert r.returncode == 0, r.stderr
    assert not unit.exists() and tree(home) == before


def test_adapters_find_the_daemon_of_an_install_to_another_prefix(tmp_path):
    """--prefix elsewhere (relative, as typed): each adapter's copy of the client starts the
    tesserad of that install, with nothing on PATH and no TESSERA_BIN_DIR."""
    home = a_users_home(tmp_path)
    r = subprocess.run([exe("tessera"), "install", "--no-model", "--prefix", "opt/tessera"], cwd=str(tmp_path),
                       env=user_env(home), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    prefix = tmp_path / "opt" / "tessera"
    probe = "import sys; sys.path.insert(0, sys.argv[1]); from tessera_client import paths; print(paths.find_daemon())"
    for client_parent in (home / ".config" / "GIMP" / "3.0" / "plug-ins" / "tessera-upscale",
                          home / ".local" / "share" / "krita" / "pykrita" / "tessera_krita",
                          prefix / "python"):
        out = subprocess.run([sys.executable, "-c", probe, str(client_parent)], env=user_env(home, {"PATH": "/nonexistent"}),
                             capture_output=True, text=True, timeout=60)
        assert out.stdout.strip() == str(prefix / "bin" / "tesserad"), out.stdout + out.stderr
    r = tessera(home, "uninstall", "--prefix", str(prefix))
    assert r.returncode == 0, r.stderr
    assert not prefix.exists()
