"""The repository's demo key material (examples/keys), by SHA-256 of each file's bytes (the files
that make credentials acceptable; revocation lists only take them away).

The example policies, the Docker image and the Kubernetes base work out of the box because they
read these files; their private halves and clear secrets are public in the repository, so anyone
can make credentials they accept. A sidecar that loads one of them says so loudly (see watched.py).
tests/unit/test_demo_keys.py keeps this list equal to the files: after changing examples/keys, put
the digests it prints here.
"""

from __future__ import annotations

__all__ = ["DEMO_KEY_DIGESTS"]

DEMO_KEY_DIGESTS = frozenset({
    "8f76b5df08bf3dc708786c23babfa0d50b23c204b74b66ae99140561df5a94c6",  # identity/apikeys/partners.yaml
    "82b7457ef3a20311d152c2183638052409f9c88c02343ef8d5eb6a201cdb2569",  # identity/ca.crt
    "aa948f79255bd4365e3b654ec6c3dd06221a334ac138bd8b03a15ad69c61cfc4",  # identity/client-checkout.crt
    "14cbb4971b275c3e3fee38bee76fce67eb1788273d15b0bfe62acd9f41d4f18f",  # identity/client-reporting.crt
    "4ade7c7563137eb61eb7a4ca533f2fe9aae1d3e1b8d763dc46ab500ac1a7c161",  # identity/htpasswd
    "b7c1d3ee4d2f80981b5f1afc9f9f0ff61eeec0bd5aebd78b8d0e368a0616557b",  # identity/introspection-client-secret
    "3c29738ee204548900775238fc586b5ba21eb78f7ecb1a7dde25cf57668b7010",  # identity/jwks.json
    "ecccddbb86d7225f49724eb4ce85b12bfef2abcd1d2ac7deb222c858d4cc4fc3",  # partners/keys.yaml
    "145a9b1d3fe00bf348475c1981576d7b8cc2f5712c1fe4f58f9e6af8ea14606b",  # partners/partner-a-2025.pem
    "d6ef3666e35cebe87583d76c06d9bf8b394ea499cd6145e8cc7a3fbc0a7c3e19",  # webhooks/github.secret
    "d80564f027e159f564da4bb155cc6be3cf2365f24a8b35f1b72e245377057cae",  # webhooks/payments.secret
})
