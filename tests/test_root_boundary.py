"""The boundary between root (the installer) and the service user, who owns /var/lib/appliance and
/var/log/appliance: a link, FIFO or file the service plants, or swaps in between a check and an act,
never makes root chmod, chown, write or wait anywhere else, and never lowers rollback protection.

The service user is simulated by uid 65534 (tests run as root). Races are made deterministic: a hook
swaps the name right after the code under test first touches it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import stat
import threading
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from appliance.errors import ApplianceError, BundleError, KeyMaterialError, PolicyError, StateError
from appliance.paths import Layout
from appliance.state import load_install_state, save_install_state, with_release
from installer.bundle import reader
from installer.bundle.keys import load_trusted_keys
from installer.bundle.keywrap import read_passphrase_file, site_kek
from installer.bundle.manifest import MANIFEST
from installer.bundle.trust import Policy, host_platform
from installer.steps.context import Context, Options
from installer.system.runner import RecordingRunner
from installer.system.target import Target
from tests.bundle_fixtures import SlimBundle

SERVICE = 65534  # the service user, for these tests
MACHINES = Path(__file__).parent / "fixtures" / "machines"
pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="chown to another uid needs root")


def victim_dir(tmp_path: Path) -> Path:
    """A directory of root's that the service would like root to chmod, chown or write into."""
    v = tmp_path / "victim"
    v.mkdir(mode=0o755)
    v.chmod(0o755)
    (v / "keep").write_text("root's")
    return v


def unchanged(victim: Path) -> None:
    st = victim.stat()
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (0, 0, 0o755)
    assert sorted(p.name for p in victim.iterdir()) == ["keep"] and (victim / "keep").stat().st_uid == 0


def swap_for_link(path: Path, to: Path) -> Callable[[], None]:
    def swap() -> None:
        path.rename(path.with_name(path.name + ".moved"))
        path.symlink_to(to)
    return swap


def after_first_touch(monkeypatch: pytest.MonkeyPatch, name: str, swap: Callable[[], None]) -> list[bool]:
    """Run `swap` right after the first stat, lstat, open or mkdir of a path named `name` returns."""
    done: list[bool] = []
    for fn in ("stat", "lstat", "open", "mkdir"):
        real = getattr(os, fn)

        def hooked(path: object, *a: object, _real: Callable[..., object] = real, **kw: object) -> object:
            result = _real(path, *a, **kw)
            if not done and isinstance(path, (str, os.PathLike)) and os.path.basename(os.fspath(path)) == name:
                done.append(True)
                swap()
            return result
        monkeypatch.setattr(os, fn, hooked)
    return done


def service_tree(root: Path) -> Layout:
    """A host where the appliance was installed before: the service user exists and owns its directories."""
    layout = Layout.at(root)
    (root / "etc").mkdir(parents=True)
    (root / "etc/passwd").write_text(f"root:x:0:0::/root:/bin/sh\nappliance:x:{SERVICE}:{SERVICE}::/var/lib/appliance:/usr/sbin/nologin\n")
    for d in (layout.var, layout.models, layout.adapters, layout.data, layout.data / "inbox", layout.log_dir):
        d.mkdir(parents=True, exist_ok=True)
        os.chown(d, SERVICE, SERVICE)
    return layout


def context(layout: Layout, **opts: object) -> Context:
    return Context(layout=layout, opts=Options(**opts), runner=RecordingRunner(), target=Target(),  # type: ignore[arg-type]
                   emit=lambda e: None, confirm=lambda q: True)


def test_the_user_step_never_chmods_or_chowns_through_a_directory_swapped_for_a_link(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from installer.steps.activate import step_user

    layout, victim = service_tree(tmp_path / "root"), victim_dir(tmp_path)
    done = after_first_touch(monkeypatch, "models", swap_for_link(layout.models, victim))
    with contextlib.suppress(StateError):
        step_user(context(layout), lambda m, f: None)
    monkeypatch.undo()
    assert done, "the hook never fired"
    unchanged(victim)


def test_a_planted_link_is_refused_in_one_sentence(tmp_path: Path) -> None:
    from installer.steps.activate import step_user

    layout, victim = service_tree(tmp_path / "root"), victim_dir(tmp_path)
    shutil.rmtree(layout.models)
    layout.models.symlink_to(victim)
    with pytest.raises(StateError) as e:
        step_user(context(layout), lambda m, f: None)
    assert e.value.message == f"{layout.models} is a symbolic link in a directory another user can write, and root does not follow it."
    unchanged(victim)


def test_chown_tree_does_not_follow_a_directory_swapped_for_a_link(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tree, victim = tmp_path / "tree", victim_dir(tmp_path)
    (tree / "sub").mkdir(parents=True)
    (tree / "sub/file").write_text("x")
    done = after_first_touch(monkeypatch, "sub", swap_for_link(tree / "sub", victim))
    Target().chown_tree(tree, SERVICE, SERVICE)
    monkeypatch.undo()
    assert done, "the hook never fired"
    unchanged(victim)
    assert (tree / "sub.moved/file").stat().st_uid == SERVICE  # the real directory was handed over
    assert tree.stat().st_uid == SERVICE


def test_chown_tree_leaves_a_tree_that_is_not_roots_alone(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "file").write_text("x")
    os.chown(tree, SERVICE, SERVICE)
    assert Target().chown_tree(tree, 0, 4242) is False
    assert (tree / "file").stat().st_gid == 0


def _planned(slim: SlimBundle, layout: Layout) -> Context:
    from installer.steps.prepare import step_plan, step_verify

    ctx = context(layout, bundle=slim.dir, key_file=slim.keys / "model.key", trust=slim.pub, yes=True,
                  machine=MACHINES / "cpu-8c-16g.json", no_systemd=False)
    step_verify(ctx, lambda m, f: None)
    step_plan(ctx, lambda m, f: None)
    return ctx


def test_a_partial_model_directory_swapped_for_a_link_gets_nothing(slim_master: SlimBundle, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from installer.steps.install import step_model

    layout, victim = service_tree(tmp_path / "root"), victim_dir(tmp_path)
    ctx = _planned(slim_master, layout)
    partial = layout.models / f"{ctx.planned().model.key}.partial"
    done = after_first_touch(monkeypatch, partial.name, swap_for_link(partial, victim))
    err: StateError | None = None
    try:
        step_model(ctx, lambda m, f: None)
    except StateError as e:
        err = e
    monkeypatch.undo()
    assert done, "the hook never fired"
    unchanged(victim)  # neither chmodded nor written into
    assert err is not None and "symbolic link" in err.message


def test_the_model_is_decrypted_out_of_reach_then_handed_to_the_service_user(slim_master: SlimBundle, tmp_path: Path) -> None:
    from installer.steps.activate import step_user
    from installer.steps.install import step_model

    layout = service_tree(tmp_path / "root")
    ctx = _planned(slim_master, layout)
    step_model(ctx, lambda m, f: None)
    final = layout.models / ctx.planned().model.key
    st = final.stat()
    assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (0, 0o700)  # root's until the user step: the service cannot reach in
    assert (final / "model.gguf").read_bytes() == slim_master.model_plain
    step_user(ctx, lambda m, f: None)
    assert final.stat().st_uid == SERVICE and (final / "model.gguf").stat().st_uid == SERVICE
    assert stat.S_IMODE((final / "model.gguf").stat().st_mode) == 0o600


def _in_thread(fn: Callable[[], object], deadline: float, fifo: Path) -> BaseException | None:
    """Run `fn` with a deadline; a FIFO it blocks on is opened for writing afterwards so the thread ends."""
    box: list[BaseException | None] = []

    def run() -> None:
        try:
            fn()
            box.append(None)
        except BaseException as e:  # noqa: BLE001 (handed to the test)
            box.append(e)
    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(deadline)
    if t.is_alive():
        with contextlib.suppress(OSError):
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        t.join(5)
        raise AssertionError(f"still blocked on the FIFO {fifo} after {deadline:.0f} s")
    return box[0]


def test_a_listed_file_that_becomes_a_fifo_after_the_tree_check_does_not_hang(slim_master: SlimBundle, tmp_path: Path,
                                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    bundle = tmp_path / "bundle"
    shutil.copytree(slim_master.dir, bundle)
    listed = json.loads((bundle / MANIFEST).read_bytes())["files"][0]["path"]
    real_check = reader.check_tree

    def check_then_swap(b: Path, m: object) -> None:
        real_check(b, m)  # type: ignore[arg-type]
        (bundle / listed).unlink()
        os.mkfifo(bundle / listed)
    monkeypatch.setattr(reader, "check_tree", check_then_swap)
    policy = Policy(datetime.now(timezone.utc), host_platform())
    err = _in_thread(lambda: reader.verify_bundle(bundle, load_trusted_keys([slim_master.pub]), policy), 30, bundle / listed)
    assert isinstance(err, BundleError) and "not a regular file" in err.message, err


def test_key_and_passphrase_files_are_regular_capped_and_not_the_service_users(tmp_path: Path) -> None:
    from installer.bundle.keywrap import KdfParams

    key = tmp_path / "model.key"
    key.write_bytes(os.urandom(32))
    link = tmp_path / "link.key"
    link.symlink_to(key)
    with pytest.raises(KeyMaterialError, match="it is a symbolic link"):
        site_kek(KdfParams("key-file"), link, None)
    fifo = tmp_path / "fifo.key"
    os.mkfifo(fifo)
    err = _in_thread(lambda: site_kek(KdfParams("key-file"), fifo, None), 30, fifo)
    assert isinstance(err, KeyMaterialError) and "not a regular file" in err.message, err
    big = tmp_path / "passphrase.txt"
    big.write_bytes(b"x" * 5000)
    with pytest.raises(KeyMaterialError, match="larger than 4096 bytes"):
        read_passphrase_file(big)
    os.chown(key, SERVICE, SERVICE)
    with pytest.raises(KeyMaterialError, match="owned by the service user"):
        site_kek(KdfParams("key-file"), key, None, refuse_owner=SERVICE)
    os.chown(key, 0, 0)
    assert site_kek(KdfParams("key-file"), key, None, refuse_owner=SERVICE) == key.read_bytes()


def _state(sequence: int) -> dict:
    issued = datetime.now(timezone.utc) - timedelta(days=1)
    return with_release({}, release=f"1.0.0+{sequence}", sequence=sequence, issued_at=issued, action="install",
                        at=issued, info={"version": "1.0.0", "tier": "cpu"})


def _as_service(path: Path, data: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(data)
    os.chown(path, SERVICE, SERVICE)


def _refused(slim: SlimBundle, layout: Layout) -> ApplianceError | None:
    policy = Policy.from_state(load_install_state(layout), host_platform())
    try:
        reader.verify_bundle(slim.dir, load_trusted_keys([slim.pub]), policy)
    except ApplianceError as e:
        return e
    return None


def test_the_service_user_cannot_reset_rollback_protection(slim_master: SlimBundle, tmp_path: Path) -> None:
    layout = Layout.at(tmp_path / "root")
    save_install_state(layout, _state(2))
    _as_service(layout.root / "var/lib/appliance/state.json", "{}")  # where state.json used to live
    assert load_install_state(layout)["highest_sequence"] == 2
    err = _refused(slim_master, layout)  # sequence 1
    assert isinstance(err, PolicyError) and "lower than the installed sequence 2" in err.message
    d, f = os.stat(layout.installer_state), os.stat(layout.state_file)
    assert (d.st_uid, stat.S_IMODE(d.st_mode), f.st_uid, stat.S_IMODE(f.st_mode)) == (0, 0o755, 0, 0o644)


def test_the_old_state_file_is_read_once_and_never_lowers_the_floor(tmp_path: Path) -> None:
    layout = Layout.at(tmp_path / "root")
    old = layout.root / "var/lib/appliance/state.json"
    _as_service(old, json.dumps(_state(3)))
    assert load_install_state(layout)["highest_sequence"] == 3  # migrated: an upgrade keeps the floor
    record = layout.releases / "1.0.0+4" / "release.json"
    record.parent.mkdir(parents=True)
    record.write_text(json.dumps({"id": "1.0.0+4", "version": "1.0.0", "tier": "cpu", "sequence": 4,
                                  "issued_at": "2026-01-01T00:00:00Z"}))
    _as_service(old, "{}")  # the service "resets" it before the first install of this version
    state = load_install_state(layout)
    assert state["highest_sequence"] == 4 and state["time_floor"].startswith("2026-01-01")  # root's records hold the floor
    save_install_state(layout, state)
    _as_service(old, json.dumps({"highest_sequence": 10**9}))  # nor can it block updates once migrated
    assert load_install_state(layout)["highest_sequence"] == 4


def test_a_lock_planted_by_another_user_elsewhere_does_not_block_installs(tmp_path: Path) -> None:
    from installer.steps.lifecycle import install_lock

    layout = Layout.at(tmp_path / "root")
    planted = layout.root / "run/lock/appliance-install.lock"  # world-writable /run/lock, where the lock used to be
    _as_service(planted, "1")
    fd = os.open(planted, os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        with install_lock(layout):
            assert layout.install_lock.read_text().strip() == str(os.getpid())
    finally:
        os.close(fd)


def test_the_lock_and_state_refuse_a_directory_root_does_not_own(tmp_path: Path) -> None:
    from installer.steps.lifecycle import install_lock

    layout = Layout.at(tmp_path / "root")
    layout.installer_state.mkdir(parents=True)
    os.chown(layout.installer_state, SERVICE, SERVICE)
    with pytest.raises(StateError, match="must be a directory owned by root"), install_lock(layout):
        pass
    with pytest.raises(StateError, match="must be a directory owned by root"):
        save_install_state(layout, _state(1))
