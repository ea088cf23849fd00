import subprocess
import sys

import trajalign


def test_every_public_name_resolves():
    for name in trajalign.__all__:
        assert getattr(trajalign, name) is not None, name


def test_import_is_cheap():
    code = "import sys, trajalign; print('torch' in sys.modules, 'transformers' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.split() == \
        ["False", "False"]
