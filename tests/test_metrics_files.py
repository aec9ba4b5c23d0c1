"""The merged /metrics of a multi-process server: a scrape while a process is creating its
metrics file must not fail (it failed with 500 in CI, polling during a worker's first batch)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_a_scrape_skips_a_metrics_file_still_being_created(tmp_path):
    # A fresh interpreter: prometheus_client picks its multi-process mode at import.
    script = textwrap.dedent(
        """
        from prometheus_client import Counter
        from server.metrics import render_latest

        Counter("cg_test_total", "a counter of this process").inc(3)
        open(sys.argv[1] + "/histogram_999999.db", "wb").close()  # created, not yet sized
        body, content_type = render_latest()
        print(body.decode())
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", "import sys\n" + script, str(tmp_path)],
        env={"PROMETHEUS_MULTIPROC_DIR": str(tmp_path), "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "cg_test_total 3.0" in proc.stdout
