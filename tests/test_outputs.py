"""Where surgeon writes (surgeon.outputs): --force replaces only surgeon saves, concurrent saves never
delete each other, and a save killed at any step leaves the previous save or the new one."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import surgeon
from surgeon import checkpoint, models
from surgeon.errors import OutputError

HERE = Path(__file__).parent
REF = "toy_models:tiny_resnet"


def tiny(value: float):
    """The tiny model with a marker: its classifier bias is `value` everywhere."""
    model = models.load(REF)
    with torch.no_grad():
        model.fc.bias.fill_(value)
    return model


def marker(folder: Path) -> float:
    return float(surgeon.load(folder, trust_code=True).fc.bias[0].detach())


def hidden(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def test_force_replaces_a_save_and_leaves_nothing_beside_it(tmp_path):
    target = tmp_path / "o"
    surgeon.save(tiny(1.0), target)
    surgeon.save(tiny(2.0), target, force=True)
    assert marker(target) == 2.0 and hidden(tmp_path) == []


@pytest.mark.parametrize("make, message", [
    (lambda p: (p.mkdir(), (p / "notes.txt").write_text("mine")), "is not a surgeon save"),
    (lambda p: p.write_text("mine"), "is a file"),
    (lambda p: p.symlink_to(p.parent / "elsewhere", target_is_directory=True), "is a symbolic link"),
])
def test_force_never_replaces_what_is_not_a_save(tmp_path, make, message):
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "recipe.json").write_text("{}")  # a save's marker behind the symlink
    target = tmp_path / "o"
    make(target)
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    with pytest.raises(OutputError, match=message):
        surgeon.save(tiny(1.0), target, force=True)
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before


def test_force_never_replaces_the_working_directory_or_its_parents(tmp_path, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    (work / "recipe.json").write_text("{}")  # even when it looks like a save
    monkeypatch.chdir(work)
    for out in (".", "..", str(work)):
        with pytest.raises(OutputError, match="working directory or one of its parents"):
            surgeon.save(tiny(1.0), out, force=True)
    assert sorted(p.name for p in work.iterdir()) == ["recipe.json"]


def test_a_folder_that_appears_during_a_save_is_left_alone(tmp_path, monkeypatch):
    """Without force, a folder created meanwhile (another process saving there) is never deleted:
    the atomic rename fails and this save reports it."""
    target = tmp_path / "o"
    real = checkpoint.normal_permissions

    def other_process_saves_first(path):
        real(path)
        if path != target:
            target.mkdir()
            (target / "recipe.json").write_text("theirs")

    monkeypatch.setattr(checkpoint, "normal_permissions", other_process_saves_first)
    with pytest.raises(OutputError, match="appeared while saving"):
        surgeon.save(tiny(1.0), target)
    assert (target / "recipe.json").read_text() == "theirs" and hidden(tmp_path) == []


def test_a_failed_save_leaves_no_folder_it_created(tmp_path, monkeypatch):
    def broken(*_a, **_k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("safetensors.torch.save_model", broken)
    with pytest.raises(OSError):
        surgeon.save(tiny(1.0), tmp_path / "a" / "b" / "o")
    assert list(tmp_path.iterdir()) == []


# -- a save killed at each step ------------------------------------------------------------------------
DRIVER = """
import os, shutil, signal, sys
from pathlib import Path

target, point, how = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
real_rename, real_rmtree, done = os.rename, shutil.rmtree, []

def die():
    os.kill(os.getpid(), signal.SIGKILL)

def rename(src, dst):
    if point == "written":
        die()
    real_rename(src, dst)
    done.append(dst)
    if (point, len(done)) in (("aside", 1), ("in", 2)):
        die()

def rmtree(path, *args, **kwargs):
    if point == "discarding" and str(path).endswith(".old"):
        die()
    real_rmtree(path, *args, **kwargs)

if how == "save":  # surgeon.save of the tiny model with marker 2.0
    import torch
    from surgeon import checkpoint, models

    model = models.load("toy_models:tiny_resnet")
    with torch.no_grad():
        model.fc.bias.fill_(2.0)
    os.rename, shutil.rmtree = rename, rmtree
    checkpoint.save(model, target, force=True)
else:  # the same steps on a stand-in save, without importing torch
    from surgeon import outputs

    tmp = outputs.temporary_folder(target)
    (tmp / "weights").write_text("2.0")
    (tmp / "recipe.json").write_text("{}")
    os.rename, shutil.rmtree = rename, rmtree
    outputs.publish(tmp, target, force=True)
sys.exit(3)  # the kill point was never reached
"""
# kill point -> which save must be found afterwards (1.0: the previous one, 2.0: the new one)
POINTS = {"written": 1.0, "aside": 1.0, "in": 2.0, "discarding": 2.0}


def _stand_in(folder: Path, value: float) -> None:
    folder.mkdir()
    (folder / "weights").write_text(str(value))
    (folder / "recipe.json").write_text("{}")


def _kill(tmp_path: Path, how: str, points: dict[str, float]) -> None:
    """Run one driver per kill point (side by side), each replacing a previous save of marker 1.0
    by one of marker 2.0 and killed at that point."""
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE.parent), str(HERE)])}
    procs = {}
    for point in points:
        (tmp_path / point).mkdir()
        target = tmp_path / point / "o"
        surgeon.save(tiny(1.0), target) if how == "save" else _stand_in(target, 1.0)
        procs[point] = subprocess.Popen([sys.executable, str(driver), str(target), point, how], env=env)
    for point, proc in procs.items():
        assert proc.wait(timeout=300) == -signal.SIGKILL, f"{point}: the save was not killed"
        assert hidden(tmp_path / point), f"{point}: the kill left nothing behind, so it tested nothing"


def test_publish_killed_at_any_step_keeps_a_complete_save(tmp_path):
    """SIGKILL after the new folder is written, after the old one is renamed aside, after the new one
    is renamed in, and while the old one is deleted: reading the folder then finds the previous save
    or the new one, and the next save clears whatever was left beside it."""
    from surgeon.outputs import publish, recover, temporary_folder
    from surgeon.recipe import read_recipe

    _kill(tmp_path, "publish", POINTS)
    for point, expected in POINTS.items():
        parent, target = tmp_path / point, tmp_path / point / "o"
        with pytest.raises(Exception, match="surgeon recipe"):  # a stand-in: found, restored if need be
            read_recipe(target)
        assert float((target / "weights").read_text()) == expected, point
        recover(target)  # what the next save does first
        tmp = temporary_folder(target)
        (tmp / "recipe.json").write_text("{}")
        publish(tmp, target, force=True)
        assert hidden(parent) == [], point


@pytest.mark.parametrize("points", [
    {"aside": 1.0},
    pytest.param(POINTS, marks=pytest.mark.slow, id="every-point"),
], ids=["aside", "every-point"])
def test_a_save_killed_midway_loads_as_the_previous_or_the_new_save(tmp_path, points):
    """The same with the real surgeon.save and surgeon.load (a process per point: slow)."""
    _kill(tmp_path, "save", points)
    for point, expected in points.items():
        parent, target = tmp_path / point, tmp_path / point / "o"
        assert marker(target) == expected, point
        surgeon.save(tiny(3.0), target, force=True)
        assert marker(target) == 3.0 and hidden(parent) == [], point


RACER = """
import sys, time
from pathlib import Path
from surgeon import outputs
from surgeon.errors import OutputError

target, name, go = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
outputs.check_folder(target)  # both pass: the folder does not exist yet
tmp = outputs.temporary_folder(target)
(tmp / "weights").write_text(name)
(tmp / "recipe.json").write_text("{}")
(go.parent / f"ready-{name}").touch()
while not go.exists():
    time.sleep(0.01)
try:
    outputs.publish(tmp, target, force=False)
except OutputError as exc:
    import shutil

    shutil.rmtree(tmp)
    print(exc)
    sys.exit(2)
"""


def test_concurrent_saves_to_one_folder_one_wins_the_other_fails_cleanly(tmp_path):
    """Two processes save to the same new folder, both having checked that it does not exist: the
    first rename wins, the second fails in one line, and the winner's save is complete."""
    driver, target, go = tmp_path / "racer.py", tmp_path / "work" / "o", tmp_path / "go"
    driver.write_text(RACER)
    target.parent.mkdir()
    env = {**os.environ, "PYTHONPATH": str(HERE.parent)}
    procs = [subprocess.Popen([sys.executable, str(driver), str(target), name, str(go)], env=env,
                              stdout=subprocess.PIPE, text=True) for name in ("a", "b")]
    while not all((tmp_path / f"ready-{n}").exists() for n in "ab"):
        assert all(p.poll() is None for p in procs), "a racer ended early"
        time.sleep(0.01)
    go.touch()
    codes = sorted(p.wait(timeout=60) for p in procs)
    outs = "".join(p.stdout.read() for p in procs)
    assert codes == [0, 2] and "appeared while saving" in outs, outs
    assert (target / "weights").read_text() in ("a", "b") and (target / "recipe.json").is_file()
    assert hidden(target.parent) == []
