"""`surgeon --help` wall time (a fresh process each run; torch must not be imported)."""
import os
import subprocess
import sys

from _common import median_time, report

exe = os.path.join(os.path.dirname(sys.executable), "surgeon")
cmd = [exe, "--help"] if os.path.exists(exe) else [sys.executable, "-m", "surgeon.cli", "--help"]
help_t, _ = median_time(lambda: subprocess.run(cmd, capture_output=True, check=True), repeat=10)
py_t, _ = median_time(lambda: subprocess.run([sys.executable, "-c", "pass"], capture_output=True), repeat=10)
torch_t, _ = median_time(lambda: subprocess.run([sys.executable, "-c", "import torch"], capture_output=True), repeat=3)
report("surgeon --help wall time (median of fresh processes)", [
    {"what": "python -c pass", "median s": py_t},
    {"what": "surgeon --help", "median s": help_t},
    {"what": "python -c 'import torch' (for scale)", "median s": torch_t},
])
