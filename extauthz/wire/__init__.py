"""Transports that feed the decision pipeline besides the gRPC Check service (extauthz.server).

``http_authz``: Envoy's HTTP ext_authz protocol (``serve --http-authz-listen``).
"""
