"""OpenAPI as a positive security model: only the operations a spec documents, with the parameters,
bodies and credentials it describes, reach the API (the ``openapi:`` policy section, see
extauthz/checks/openapi.py).

- ``document``: spec files, JSON pointers, ``$ref`` resolution (local and beside the spec only)
- ``schema``: Schema Objects (3.0 and 3.1) as one JSON Schema 2020-12 document, compiled by jsonschema-rs
- ``params``: parameter deserialization per style/explode, and typing by schema
- ``routing``: base paths and path templates
- ``security``: security requirements against the established identity
- ``compiler``: a spec file to a CompiledSpec (``model``)
- ``enforce`` and ``body``: one request against a CompiledSpec
- ``inventory``: documented and undocumented (shadow) endpoints seen in traffic
"""

from extauthz.openapi.compiler import compile_spec
from extauthz.openapi.document import SpecError, SpecFiles
from extauthz.openapi.enforce import Outcome, evaluate, operation_view
from extauthz.openapi.model import CompiledSpec, Operation, Settings, Violation

__all__ = [
    "CompiledSpec",
    "Operation",
    "Outcome",
    "Settings",
    "SpecError",
    "SpecFiles",
    "Violation",
    "compile_spec",
    "evaluate",
    "operation_view",
]
