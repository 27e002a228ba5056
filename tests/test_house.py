"""The house rules that keep the project easy to carry on: inference code does not import the training loop,
and nothing in the repository points outside it."""
import json
import os
import subprocess

import pytest

from helpers import ROOT, run_script

PROBE = """
import json, runpy, sys
sys.argv = ["x"]
runpy.run_path({path!r}, run_name="not_main")
print(json.dumps(sorted(m for m in sys.modules if m.startswith("nanococa"))))
"""


@pytest.mark.slow
@pytest.mark.parametrize("script", ["sample.py", "eval_length.py", "-m nanococa.bench"])
def test_inference_scripts_do_not_import_the_training_loop(script):
    if script.startswith("-m"):
        code = ("import json, sys, nanococa.bench; "
                "print(json.dumps(sorted(m for m in sys.modules if m.startswith('nanococa'))))")
    else:
        code = PROBE.format(path=os.path.join(ROOT, script))
    out = run_script("-c", code)
    assert out.returncode == 0, out.stderr[-2000:]
    modules = json.loads(out.stdout)
    assert "nanococa.common" in modules and "nanococa.trainer" not in modules, modules


def test_nothing_refers_to_files_outside_the_repository():
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True).stdout.split()
    if not tracked:
        pytest.skip("not a git checkout")
    offenders = []
    for path in tracked:
        if path.startswith(".ci/") or not path.endswith((".py", ".md", ".sh")):
            continue
        with open(os.path.join(ROOT, path), encoding="utf-8", errors="replace") as f:
            if "shared" + "/" in f.read():
                offenders.append(path)
    assert offenders == [], offenders


def test_training_does_not_import_plotting_or_reports():
    code = ("import json, sys, nanococa.trainer; "
            "print(json.dumps(sorted(m for m in sys.modules if m.startswith(('nanococa', 'matplotlib')))))")
    out = run_script("-c", code)
    assert out.returncode == 0, out.stderr[-2000:]
    modules = json.loads(out.stdout)
    assert "nanococa.report" not in modules and not any(m.startswith("matplotlib") for m in modules), modules


def test_no_line_is_longer_than_110_characters():
    """As in the model file, everywhere: code, scripts, and the prose of the docs (a Markdown table row is one
    line by the format's rule, so tables are left out)."""
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True).stdout.split()
    if not tracked:
        pytest.skip("not a git checkout")
    long = []
    for path in tracked:
        if not (path.endswith((".py", ".sh", ".md")) or path == ".ci/run"):
            continue
        with open(os.path.join(ROOT, path), encoding="utf-8") as f:
            long += [f"{path}:{i}" for i, line in enumerate(f, 1)
                     if len(line.rstrip("\n")) > 110 and not line.lstrip().startswith("|")]
    assert long == [], long
