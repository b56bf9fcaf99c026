"""snpd.files: atomic_write and its helpers are safe in a directory another user can
write (issue 10, item 3). Every test plants what such a user could plant, a symlink
to a "victim" file outside the directory, and checks that the victim's content and
mode are unchanged and that no new file appeared where the link pointed."""

from __future__ import annotations

import errno
import json
import os
import socket
import stat
from pathlib import Path
from typing import Callable, Iterator, List, Tuple

import pytest

from snpd import daemon, files
from snpd.files import (
    atomic_write,
    chmod_own,
    open_directory,
    remove_stale_temporaries,
    temporary_name,
    unlink_within,
)

VICTIM_DATA = b"root-only secret\n"


@pytest.fixture
def victim(tmp_path: Path) -> Path:
    """A 0600 file in a directory of its own, outside the one being written."""
    vault = tmp_path / "vault"
    vault.mkdir(mode=0o700)
    path = vault / "secret"
    path.write_bytes(VICTIM_DATA)
    path.chmod(0o600)
    return path


@pytest.fixture
def umask() -> Iterator[Callable[[int], None]]:
    old = os.umask(0o022)
    os.umask(old)
    yield os.umask
    os.umask(old)


def assert_untouched(victim: Path) -> None:
    st = os.lstat(victim)
    assert victim.read_bytes() == VICTIM_DATA
    assert stat.S_IMODE(st.st_mode) == 0o600 and stat.S_ISREG(st.st_mode)


def listing(directory: Path) -> List[str]:
    return sorted(os.listdir(directory))


def forced_names(monkeypatch: pytest.MonkeyPatch, names: List[str]) -> None:
    """Make temporary_name return ``names`` first (as if an attacker had guessed them),
    then random names again."""
    queue = list(names)
    monkeypatch.setattr(files, "temporary_name",
                        lambda name: queue.pop(0) if queue else temporary_name(name))


# -- atomic_write ------------------------------------------------------------------------------


def test_writes_and_replaces(tmp_path: Path) -> None:
    path = tmp_path / "out.bin"
    atomic_write(path, b"one")
    atomic_write(path, b"two" * 100000)
    assert path.read_bytes() == b"two" * 100000
    assert listing(tmp_path) == ["out.bin"]


def test_temporary_names_are_unpredictable_and_recognised() -> None:
    names = {temporary_name("probe.json") for _ in range(1000)}
    assert len(names) == 1000
    assert all(files._TMP_RE.match(n) and n.startswith(".probe.json.") for n in names)
    assert str(os.getpid()) not in {n.split(".")[-2] for n in names}


def test_a_symlink_at_the_final_name_is_replaced_not_followed(tmp_path: Path,
                                                              victim: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    path = out / "probe.json"
    path.symlink_to(victim)
    atomic_write(path, b"{}", mode=0o644, exact_mode=True)
    assert_untouched(victim)
    st = os.lstat(path)
    assert stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o644
    assert path.read_bytes() == b"{}"


def test_a_dangling_symlink_at_the_final_name_creates_nothing(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    target = tmp_path / "created-by-root"
    (out / "f").symlink_to(target)
    atomic_write(out / "f", b"x")
    assert not target.exists() and not target.is_symlink()
    assert stat.S_ISREG(os.lstat(out / "f").st_mode)


@pytest.mark.parametrize("dangling", [False, True], ids=["to-victim", "dangling"])
def test_symlinks_at_temporary_names_are_not_followed(
        tmp_path: Path, victim: Path, monkeypatch: pytest.MonkeyPatch,
        dangling: bool) -> None:
    out = tmp_path / "out"
    out.mkdir()
    target = tmp_path / "vault" / "new" if dangling else victim
    # The old predictable name, and two names the writer is made to draw first.
    planted = [f".f.{os.getpid()}.tmp", ".f.1.tmp", ".f.2.tmp"]
    for name in planted:
        (out / name).symlink_to(target)
    forced_names(monkeypatch, planted[1:])
    atomic_write(out / "f", b"data", mode=0o644, exact_mode=True)
    assert (out / "f").read_bytes() == b"data"
    assert_untouched(victim)
    assert not (tmp_path / "vault" / "new").exists()
    for name in planted:  # left as they were: not followed, not removed
        assert os.readlink(out / name) == str(target)
    assert listing(out) == sorted([*planted, "f"])


def test_every_temporary_name_taken_fails_cleanly(tmp_path: Path, victim: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / ".f.taken.tmp").symlink_to(victim)
    monkeypatch.setattr(files, "temporary_name", lambda name: ".f.taken.tmp")
    with pytest.raises(FileExistsError):
        atomic_write(tmp_path / "f", b"data")
    assert_untouched(victim)
    assert not (tmp_path / "f").exists()


def test_a_symlinked_directory_is_refused(tmp_path: Path, victim: Path) -> None:
    link = tmp_path / "run"
    link.symlink_to(victim.parent)
    with pytest.raises(OSError) as raised:
        atomic_write(link / "secret", b"overwritten")
    assert raised.value.errno == errno.ELOOP
    assert "symbolic link" in str(raised.value)
    assert_untouched(victim)
    assert listing(victim.parent) == ["secret"]


def test_within_creates_directories_and_refuses_links_below_it(tmp_path: Path,
                                                               victim: Path) -> None:
    cache = tmp_path / "cache"
    cache.mkdir()
    atomic_write(cache / "Milan" / "vcek" / "ark.pem", b"cert", within=cache)
    assert (cache / "Milan" / "vcek" / "ark.pem").read_bytes() == b"cert"
    # A planted link in the middle of the path: refused, nothing written through it.
    (cache / "Genoa").symlink_to(tmp_path)
    (tmp_path / "vcek").mkdir()
    with pytest.raises(OSError) as raised:
        atomic_write(cache / "Genoa" / "vcek" / "ark.pem", b"cert", within=cache)
    assert raised.value.errno == errno.ELOOP
    assert listing(tmp_path / "vcek") == []
    with pytest.raises(ValueError):
        atomic_write(cache / ".." / "x", b"", within=cache)
    # ``within`` itself is the caller's trusted choice and may be a link.
    alias = tmp_path / "alias"
    alias.symlink_to(cache)
    atomic_write(alias / "Milan" / "vcek" / "ask.pem", b"ask", within=alias)
    assert (cache / "Milan" / "vcek" / "ask.pem").read_bytes() == b"ask"
    assert_untouched(victim)


def test_mode_honours_the_umask_unless_exact(tmp_path: Path,
                                             umask: Callable[[int], None]) -> None:
    umask(0o077)
    atomic_write(tmp_path / "narrowed", b"", mode=0o644)
    atomic_write(tmp_path / "exact", b"", mode=0o644, exact_mode=True)
    atomic_write(tmp_path / "key", b"", mode=0o600, exact_mode=True)
    assert stat.S_IMODE(os.stat(tmp_path / "narrowed").st_mode) == 0o600
    assert stat.S_IMODE(os.stat(tmp_path / "exact").st_mode) == 0o644
    assert stat.S_IMODE(os.stat(tmp_path / "key").st_mode) == 0o600


def test_mode_is_set_on_the_descriptor(tmp_path: Path, victim: Path,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """No chmod by any path, so a link swapped in cannot redirect it."""
    def no_path_chmod(*args: object, **kwargs: object) -> None:
        raise AssertionError("chmod by path")

    monkeypatch.setattr(os, "chmod", no_path_chmod)
    monkeypatch.setattr(os, "chown", no_path_chmod)
    (tmp_path / "f").symlink_to(victim)
    atomic_write(tmp_path / "f", b"x", mode=0o640, exact_mode=True)
    assert stat.S_IMODE(os.lstat(tmp_path / "f").st_mode) == 0o640
    assert_untouched(victim)


def needs_root(why: str) -> None:
    """These tests need root (scripts/test runs the suites as root): a failure, never a
    skip, when it is missing."""
    if os.geteuid() != 0:
        pytest.fail(f"{why}: run the suite as root (scripts/test does)")


def test_owner_is_set_on_the_descriptor(tmp_path: Path) -> None:
    needs_root("fchown to another uid needs root")
    atomic_write(tmp_path / "f", b"x", mode=0o640, exact_mode=True, owner=(65534, 65534))
    st = os.stat(tmp_path / "f")
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (65534, 65534, 0o640)


@pytest.mark.parametrize("failing", ["write", "fsync", "replace"])
def test_failure_removes_only_its_own_temporary(tmp_path: Path, failing: str,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "f"
    atomic_write(path, b"old")

    def fail(*args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, "no space")

    monkeypatch.setattr(os, failing, fail)
    with pytest.raises(OSError, match="no space"):
        atomic_write(path, b"new")
    monkeypatch.undo()
    assert path.read_bytes() == b"old"
    assert listing(tmp_path) == ["f"]


def test_failure_leaves_a_file_swapped_in_at_the_temporary_name(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Cleanup unlinks the temporary only while it is still the file it created: if
    another user replaced it, theirs stays (and nothing of it is followed)."""
    real_replace = os.replace

    def swap_then_fail(src: str, dst: str, **kwargs: int) -> None:
        real_replace(src, "moved-away", **kwargs)
        with open(tmp_path / src, "wb") as f:
            f.write(b"theirs")
        raise OSError(errno.EIO, "rename failed")

    monkeypatch.setattr(os, "replace", swap_then_fail)
    with pytest.raises(OSError, match="rename failed"):
        atomic_write(tmp_path / "f", b"mine")
    monkeypatch.undo()
    left = [n for n in listing(tmp_path) if n.startswith(".f.")]
    assert len(left) == 1 and (tmp_path / left[0]).read_bytes() == b"theirs"
    assert (tmp_path / "moved-away").read_bytes() == b"mine"


def test_open_directory_refuses_a_symlink_at_the_last_component(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    fd = open_directory(tmp_path / "real")
    os.close(fd)
    with pytest.raises(OSError) as raised:
        open_directory(tmp_path / "link")
    assert raised.value.errno == errno.ELOOP
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(NotADirectoryError):
        open_directory(tmp_path / "file")


def test_unlink_within_removes_a_link_never_through_one(tmp_path: Path, victim: Path) -> None:
    cache = tmp_path / "cache"
    (cache / "Milan").mkdir(parents=True)
    (cache / "Milan" / "ark.pem").symlink_to(victim)
    unlink_within(cache / "Milan" / "ark.pem", cache)
    assert listing(cache / "Milan") == []
    (cache / "Genoa").symlink_to(victim.parent)
    with pytest.raises(OSError) as raised:
        unlink_within(cache / "Genoa" / "secret", cache)
    assert raised.value.errno == errno.ELOOP
    with pytest.raises(FileNotFoundError):  # and nothing is created on the way
        unlink_within(cache / "Turin" / "vcek" / "ark.pem", cache)
    assert not (cache / "Turin").exists()
    assert_untouched(victim)


# -- remove_stale_temporaries ------------------------------------------------------------------


def test_stale_temporaries_are_removed_without_following_links(tmp_path: Path) -> None:
    tree = tmp_path / "cache"
    (tree / "Milan" / "vcek").mkdir(parents=True)
    stale = [tree / ".ark.pem.1234.tmp", tree / "Milan" / "vcek" / f".x.{1 << 63}.tmp"]
    for path in stale:
        path.write_bytes(b"half")
    kept = [tree / "ark.pem", tree / ".hidden", tree / "notes.tmp", tree / "..tmp"]
    for path in kept:
        path.write_bytes(b"keep")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / ".victim.1.tmp").write_bytes(b"not ours")
    (tree / "link").symlink_to(elsewhere)
    assert remove_stale_temporaries(tree) == 2
    assert not any(p.exists() for p in stale)
    assert all(p.exists() for p in kept)
    assert (elsewhere / ".victim.1.tmp").exists()
    assert remove_stale_temporaries(tmp_path / "missing") == 0


# -- chmod_own ---------------------------------------------------------------------------------


def _bound(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    return sock


def test_chmod_own_changes_a_socket_it_made(tmp_path: Path) -> None:
    with _bound(tmp_path / "s"):
        chmod_own(tmp_path / "s", 0o660, stat.S_IFSOCK)
        assert stat.S_IMODE(os.lstat(tmp_path / "s").st_mode) == 0o660


def test_chmod_own_refuses_a_link_swapped_in(tmp_path: Path, victim: Path) -> None:
    with _bound(tmp_path / "s"):
        os.rename(tmp_path / "s", tmp_path / "moved")
        (tmp_path / "s").symlink_to(victim)
        with pytest.raises(OSError) as raised:
            chmod_own(tmp_path / "s", 0o666, stat.S_IFSOCK)
    assert raised.value.errno == errno.EPERM
    assert_untouched(victim)
    # A hard link to someone else's file (without fs.protected_hardlinks) is refused too.
    os.link(victim, tmp_path / "hard")
    with pytest.raises(OSError):
        chmod_own(tmp_path / "hard", 0o666, stat.S_IFREG)
    assert_untouched(victim)


def test_chmod_own_refuses_another_users_file(tmp_path: Path) -> None:
    needs_root("a file of another uid needs root to make")
    with _bound(tmp_path / "s"):
        os.chown(tmp_path / "s", 65534, 65534)
        before = stat.S_IMODE(os.lstat(tmp_path / "s").st_mode)
        with pytest.raises(OSError):
            chmod_own(tmp_path / "s", 0o666, stat.S_IFSOCK)
        assert stat.S_IMODE(os.lstat(tmp_path / "s").st_mode) == before


# -- the probe's output ------------------------------------------------------------------------


def probe_into(path: Path) -> Tuple[int, str]:
    """write_probe as snpd-probe runs it, on a root with no kernel log."""
    try:
        daemon.write_probe(path, root=path.parent / "no-such-root")
    except OSError as exc:
        return 1, str(exc)
    return 0, ""


def test_probe_output_replaces_a_planted_link(tmp_path: Path, victim: Path,
                                              umask: Callable[[int], None]) -> None:
    umask(0o077)  # the unit's UMask=
    run = tmp_path / "run"
    run.mkdir()
    (run / "probe.json").symlink_to(victim)
    (run / f".probe.json.{os.getpid()}.tmp").symlink_to(victim)
    assert probe_into(run / "probe.json") == (0, "")
    assert_untouched(victim)
    st = os.lstat(run / "probe.json")
    assert stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o644
    assert "kernel_lines" in json.loads((run / "probe.json").read_text())


def test_probe_refuses_a_symlinked_output_directory(tmp_path: Path, victim: Path) -> None:
    (tmp_path / "run").symlink_to(victim.parent)
    code, why = probe_into(tmp_path / "run" / "secret")
    assert code == 1 and "symbolic link" in why
    assert_untouched(victim)
    assert listing(victim.parent) == ["secret"]


def test_probe_creates_only_its_own_directory(tmp_path: Path) -> None:
    assert probe_into(tmp_path / "run" / "probe.json") == (0, "")
    assert probe_into(tmp_path / "a" / "b" / "probe.json")[0] == 1


# -- files a user names (snpctl) ---------------------------------------------------------------


def test_a_directory_the_user_names_may_be_their_symlink(tmp_path: Path, victim: Path) -> None:
    """snpctl writes as the user into the directory they chose: their own symlink there
    is followed, while a link at the file's name is still replaced."""
    from snpd.cli.common import write_file

    (tmp_path / "real").mkdir()
    (tmp_path / "mine").symlink_to(tmp_path / "real")
    (tmp_path / "real" / "report.bin").symlink_to(victim)
    write_file(str(tmp_path / "mine" / "report.bin"), b"report")
    assert (tmp_path / "real" / "report.bin").read_bytes() == b"report"
    assert not (tmp_path / "real" / "report.bin").is_symlink()
    assert_untouched(victim)


# -- the emulator's state directory ------------------------------------------------------------


@pytest.mark.parametrize("planted", [".lock", "keys", "certs"])
def test_emulator_state_refuses_links_planted_in_its_directory(
        tmp_path: Path, victim: Path, planted: str) -> None:
    """Root may run snpd-emu or snpctl --direct on the daemon's emulator directory."""
    import datetime

    from snpd.emulator.launch import EmulatorConfig
    from snpd.emulator.state import EmulatorState

    state_dir = tmp_path / "emulator"
    state_dir.mkdir()
    (state_dir / planted).symlink_to(victim if planted == ".lock" else victim.parent)
    with pytest.raises(OSError):
        EmulatorState.load_or_create(
            state_dir, EmulatorConfig(), rsa_bits=2048,
            now=lambda: datetime.datetime.now(datetime.timezone.utc))
    assert_untouched(victim)
    assert listing(victim.parent) == ["secret"]
