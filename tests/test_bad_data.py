"""Bad input to train and convert (the "Bad input" issue): one clear line or a warning that keeps going, never a
traceback, never a lost or poisoned file."""
import glob
import os
import re
import signal
import subprocess
import sys

import torch

from odtk.utils import atomic_save, atomic_write_text

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# 16: temp files of killed saves, and file modes

def test_killed_save_leaves_a_temp_that_the_next_save_removes(tmp_path):
    target = tmp_path / "model.pth"
    code = ("import os, signal, sys\nfrom odtk.utils import atomic_path\n"
            "with atomic_path(sys.argv[1], '.pth') as tmp:\n"
            "    open(tmp, 'wb').write(b'x' * 100000)\n    os.kill(os.getpid(), signal.SIGKILL)\n")
    out = subprocess.run([sys.executable, "-c", code, str(target)], env={**os.environ, "PYTHONPATH": ROOT})
    assert out.returncode == -signal.SIGKILL
    killed = glob.glob(str(tmp_path / ".model.pth.*.tmp-*.pth"))
    assert len(killed) == 1 and os.path.getsize(killed[0]) == 100000 and not target.exists()
    # a save in progress in a live process (this one), and a killed save of another file: both left alone
    owner = re.match(r"(\.model\.pth\.[\w-]+\.)(\d+)\.tmp-", os.path.basename(killed[0]))
    live = str(tmp_path / f"{owner[1]}{os.getpid()}.tmp-live.pth")
    other = killed[0].replace(".model.pth.", ".other.pth.")
    for path in (live, other):
        open(path, "wb").close()
    atomic_save({"weights": torch.ones(2)}, str(target))
    assert not os.path.exists(killed[0]) and os.path.exists(live) and os.path.exists(other)
    assert torch.load(str(target))["weights"].tolist() == [1, 1]


def test_saved_files_get_the_mode_open_gives(tmp_path):
    old = os.umask(0o022)
    try:
        atomic_write_text("{}", str(tmp_path / "a.json"))
        atomic_save({}, str(tmp_path / "m.pth"))
        os.umask(0o002)
        atomic_write_text("{}", str(tmp_path / "b.json"))
        (tmp_path / "c.json").write_text("old")
        os.chmod(tmp_path / "c.json", 0o640)             # an existing file keeps its mode, as with open()
        atomic_write_text("{}", str(tmp_path / "c.json"))
    finally:
        os.umask(old)
    modes = {p: os.stat(tmp_path / p).st_mode & 0o777 for p in ("a.json", "m.pth", "b.json", "c.json")}
    assert modes == {"a.json": 0o644, "m.pth": 0o644, "b.json": 0o664, "c.json": 0o640}
