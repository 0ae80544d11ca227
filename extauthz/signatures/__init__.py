"""Request signatures: RFC 9421 HTTP Message Signatures, RFC 9530 Content-Digest, webhook HMAC presets.

Modules, from the bottom up:

- :mod:`~extauthz.signatures.sf`: Structured Field parsing/serialization with hard limits.
- :mod:`~extauthz.signatures.algorithms`: the RFC 9421 algorithms on ``cryptography``; keys.
- :mod:`~extauthz.signatures.keys`: key folders (JWK / PEM / secrets) reloaded when they change.
- :mod:`~extauthz.signatures.base`: the signature base from a request as Envoy delivers it.
- :mod:`~extauthz.signatures.digest`: Content-Digest against the forwarded body.
- :mod:`~extauthz.signatures.verify`: verification with a policy's requirements.
- :mod:`~extauthz.signatures.webhook`: ``sha256=<hex>`` and ``t=..,v1=..`` webhook presets.
- :mod:`~extauthz.signatures.signer`: the client side, for tests, examples and the benchmark.

The policy section that uses them is :mod:`extauthz.checks.signature`.
"""
