"""TensorFlow is an optional extra: `import pyddl` and `import pyddl.torch` never import it."""

import subprocess
import sys

import pytest

pytestmark = pytest.mark.timeout(60)


def test_pyddl_and_pyddl_torch_do_not_import_tensorflow_or_keras():
    code = ("import sys, pyddl, pyddl.torch; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'keras')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=50)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
