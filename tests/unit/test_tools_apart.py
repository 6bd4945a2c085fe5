"""The product does not import the tools (services/tools/) when it starts."""

from __future__ import annotations

import subprocess
import sys

from tests.support import ROOT


def test_product_imports_no_tool() -> None:
    """`ridethrough worker`, `prober`, `replayer` and the operator commands load the CLI app
    (every command module), the runner and the services; none of that loads a module of
    services/tools/ (the dev, demo, bench and fake-provider commands import them lazily)."""
    code = (
        "import sys\n"
        "import services.cli.app, services.runner\n"
        "import services.worker, services.prober, services.replayer, services.ops\n"
        "print(sorted(m for m in sys.modules if m.startswith('services.tools')))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "[]"
