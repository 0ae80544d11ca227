"""The span exporter process's entry point: ``python -m extauthz.telemetry.export_process``.

A module of its own, imported by nothing else: run with ``-m``, a module that the package has
already imported (span_export is, through tracing) would make Python warn on every start.
"""

import sys

from extauthz.telemetry.span_export import main

if __name__ == "__main__":
    sys.exit(main())
