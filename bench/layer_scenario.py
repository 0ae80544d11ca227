"""The ``layers-*`` sidecar scenarios of bench/run.py: what a mesh-wide layer costs.

Each serves the bundled orders.yaml (the deciding policies of the default request, GET
orders.example.com/api/orders) from a folder of its own, with:

- ``layers-none``: no layer: the reference;
- ``layers-elsewhere``: one layer whose match names another host, so the request matches no layer
  (issue: a request that matches no layer pays nothing measurable for layers);
- ``layers-one``: one layer for every request, a CIDR denylist and one rule, as a platform team
  would run mesh-wide (the request's client, 127.0.0.1, is not in the list: it passes, then
  orders-api decides).
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

LAYER = """\
apiVersion: extauthz.dev/v1
kind: LayerPolicy
metadata:
  name: mesh-denylist
spec:
  order: -100
{match}  network:
    deny: ["203.0.113.0/24", "198.51.100.0/24", "192.0.2.0/24", "2001:db8:bad::/48"]
  rules:
    - name: no-trace
      when: "request.method in ['TRACE', 'TRACK']"
      decision: deny
      status: 405
"""


@contextlib.contextmanager
def layer_setup(workdir: Path, layer: str) -> Iterator[dict]:
    """``layer``: "none", "elsewhere" or "one"."""
    folder = workdir / f"layers-{layer}"
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(ROOT / "policies" / "orders.yaml", folder / "orders.yaml")
    if layer != "none":
        match = "  match: {hosts: [elsewhere.example.com]}\n" if layer == "elsewhere" else ""
        (folder / "layer.yaml").write_text(LAYER.format(match=match))
    yield {"extra_args": ["--policies", str(folder)]}
