"""The host-side engine is numpy only: importing it must not load jax."""

import subprocess
import sys


def test_importing_the_engine_leaves_jax_unloaded():
    # A fresh interpreter: this test process may have imported jax through other tests.
    code = "import sys, fastgen_jax.engine; print('jax' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"
