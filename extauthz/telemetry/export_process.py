"""The exporter processes' entry point: ``python -m extauthz.telemetry.export_process [logs]``.

Spans by default (span_export), decision logs with ``logs`` (log_export). A module of its own,
imported by nothing else: run with ``-m``, a module that the package has already imported
(span_export is, through tracing) would make Python warn on every start.
"""

import sys

if __name__ == "__main__":
    if sys.argv[1:2] == ["logs"]:
        from extauthz.telemetry.log_export import main
    else:
        from extauthz.telemetry.span_export import main
    sys.exit(main())
