"""The README's Python example (examples/quickstart.py) runs as written, and the top-level API is light."""

import os
import re
import subprocess
import sys

ROOT = os.path.join(os.path.dirname(__file__), os.pardir)
QUICKSTART = os.path.join(ROOT, "examples", "quickstart.py")


def _python(args: list[str], **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.path.abspath(os.path.join(ROOT, "src")), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, **kw)


def test_quickstart_runs_as_written_and_tcr_beats_source(tmp_path):
    with open(QUICKSTART, encoding="utf-8") as f:
        assert len(f.read().splitlines()) <= 25  # short enough to paste into the README
    done = _python([QUICKSTART], cwd=tmp_path, timeout=900)
    assert done.returncode == 0, done.stderr
    found = re.fullmatch(r"R@1 under gaussian_noise:5: source (\d+\.\d\d), tcr (\d+\.\d\d) \(([+-]\d+\.\d\d)\)\n",
                         done.stdout)
    assert found, done.stdout
    source, tcr, gain = (float(g) for g in found.groups())
    assert abs(tcr - source - gain) < 0.011 and tcr > source
    assert os.listdir(tmp_path) == []  # a run without an output directory writes nothing


def test_import_queryshift_is_light_and_names_the_api():
    code = ("import sys, queryshift; assert 'torch' not in sys.modules, 'import queryshift imported torch'; "
            "from queryshift import methods, models; assert 'torch' not in sys.modules, 'registries import torch'; "
            "cfg = queryshift.RunConfig(method='tcr', shift='gaussian_noise:5'); "
            "assert callable(queryshift.run) and callable(queryshift.load_model); "
            "assert callable(queryshift.load_dataset); "
            "assert queryshift.methods.get('tcr').__name__ == 'TCR'; assert 'rest' in queryshift.methods.available(); "
            "print(cfg.method, queryshift.__version__)")
    done = _python(["-c", code], timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("tcr ")
