"""The generated wire layer is current and wire-compatible with Envoy's own API."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))

import gen_protos  # noqa: E402


def test_generated_code_is_current(tmp_path: Path) -> None:
    fresh = gen_protos.generate(tmp_path)
    committed_root = ROOT / gen_protos.API_PACKAGE
    fresh_rel = {p.relative_to(tmp_path / gen_protos.API_PACKAGE) for p in fresh}
    committed_rel = {p.relative_to(committed_root) for p in committed_root.rglob("*") if p.is_file() and "__pycache__" not in p.parts}
    assert fresh_rel == committed_rel, "run: python scripts/gen_protos.py"
    for rel in sorted(fresh_rel):
        assert (tmp_path / gen_protos.API_PACKAGE / rel).read_bytes() == (committed_root / rel).read_bytes(), (
            f"{rel} is stale: run python scripts/gen_protos.py"
        )


def _describe(pool_module_setup: str) -> str:
    """Describe every message/enum of ours, in a subprocess that imported only one side."""
    script = textwrap.dedent(
        """
        import json, sys
        from google.protobuf import descriptor_pool
        NAMES = json.loads(sys.argv[1])
        %s
        pool = descriptor_pool.Default()
        out = {}
        for name in NAMES:
            try:
                d = pool.FindMessageTypeByName(name)
            except KeyError:
                try:
                    e = pool.FindEnumTypeByName(name)
                except KeyError:
                    out[name] = None
                    continue
                out[name] = {"enum": sorted([v.name, v.number] for v in e.values)}
                continue
            fields = {}
            for f in d.fields:
                fields[f.name] = {
                    "number": f.number,
                    "type": f.type,
                    "type_name": (f.message_type or f.enum_type).full_name if (f.message_type or f.enum_type) else "",
                    "repeated": f.is_repeated,
                    "oneof": f.containing_oneof.name if f.containing_oneof else "",
                }
            out[name] = {"fields": fields, "map_entry": d.GetOptions().map_entry}
        print(json.dumps(out))
        """
    ) % pool_module_setup
    return script


def _our_names() -> list[str]:
    from google.protobuf import descriptor_pool

    from extauthz.api.envoy.service.auth.v3 import external_auth_pb2  # noqa: F401

    pool = descriptor_pool.Default()
    names: list[str] = []

    def walk_message(d) -> None:
        names.append(d.full_name)
        for nested in d.nested_types:
            walk_message(nested)
        for enum in d.enum_types:
            names.append(enum.full_name)

    for file_name in (
        "extauthz/api/envoy/service/auth/v3/external_auth.proto",
        "extauthz/api/envoy/service/auth/v3/attribute_context.proto",
        "extauthz/api/envoy/config/core/v3/base.proto",
        "extauthz/api/envoy/config/core/v3/address.proto",
        "extauthz/api/envoy/type/v3/http_status.proto",
    ):
        fd = pool.FindFileByName(file_name)
        for d in fd.message_types_by_name.values():
            walk_message(d)
        names.extend(e.full_name for e in fd.enum_types_by_name.values())
    return names


#: Envoy's generated protos (the xds-protos wheel), installed apart from the test environment:
#: ``pip install --no-deps --target .xds-protos xds-protos`` (see README). The wheel also ships
#: ``envoy``, ``google``, ``opentelemetry`` and ``cel`` packages that would shadow the real ones.
XDS_PROTOS = Path(os.environ.get("EXTAUTHZ_XDS_PROTOS", ROOT / ".xds-protos"))


def test_messages_match_upstream_envoy_descriptors() -> None:
    """Every message and enum we define has exactly Envoy's field names, numbers, types and labels.

    xds-protos owns the top-level ``envoy`` package and the same full names as ours, so each side is
    described in its own subprocess and never shares a descriptor pool with the other.
    """
    assert (XDS_PROTOS / "envoy" / "service" / "auth" / "v3").is_dir(), (
        f"Envoy's descriptors are not at {XDS_PROTOS}: run "
        "pip install --no-deps --target .xds-protos 'xds-protos>=1.85' (or set EXTAUTHZ_XDS_PROTOS)"
    )
    names = _our_names()
    ours_setup = "from extauthz.api.envoy.service.auth.v3 import external_auth_pb2"
    upstream_setup = (
        "from envoy.service.auth.v3 import external_auth_pb2, attribute_context_pb2; "
        "from envoy.config.core.v3 import base_pb2, address_pb2; "
        "from envoy.type.v3 import http_status_pb2"
    )
    results = []
    for setup, path in ((ours_setup, None), (upstream_setup, XDS_PROTOS)):
        # The upstream side runs with xds-protos first on the path and nothing of ours imported.
        env = {**os.environ, "PYTHONPATH": str(path)} if path else dict(os.environ)
        proc = subprocess.run(
            [sys.executable, "-c", _describe(setup), json.dumps(names)],
            capture_output=True, text=True, cwd=ROOT if path is None else path, timeout=120, env=env,
        )
        assert proc.returncode == 0, proc.stderr
        results.append(json.loads(proc.stdout))
    ours, upstream = results
    assert len(ours) > 15
    for name in names:
        assert upstream[name] is not None, f"{name} does not exist upstream"
        assert ours[name] == upstream[name], f"{name} differs from Envoy's definition"


def test_service_method_path() -> None:
    from extauthz.api.envoy.service.auth.v3 import external_auth_pb2

    method = external_auth_pb2.DESCRIPTOR.services_by_name["Authorization"].methods_by_name["Check"]
    assert f"/{method.containing_service.full_name}/{method.name}" == "/envoy.service.auth.v3.Authorization/Check"


def test_cel_ast_subset_matches_cels_field_numbers() -> None:
    """extauthz.celast reads cel-expr-python's serialized CheckedExpr: every field we declare must be
    CEL's own field, with the same number and a wire-compatible type."""
    assert (XDS_PROTOS / "google" / "api" / "expr").is_dir(), f"CEL's protos are not at {XDS_PROTOS}"
    script = textwrap.dedent(
        """
        import json
        from google.api.expr.v1alpha1 import checked_pb2, syntax_pb2
        out = {}
        def walk(d, ours):
            out[ours] = {f.name: [f.number, f.type, f.is_repeated] for f in d.fields}
            for n in d.nested_types:
                if not n.GetOptions().map_entry:
                    walk(n, ours + "." + n.name)
        walk(checked_pb2.CheckedExpr.DESCRIPTOR, "CheckedExpr")
        walk(syntax_pb2.Expr.DESCRIPTOR, "Expr")
        walk(syntax_pb2.Constant.DESCRIPTOR, "Constant")
        print(json.dumps(out))
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=XDS_PROTOS,
                          env={**os.environ, "PYTHONPATH": str(XDS_PROTOS)}, timeout=120)
    assert proc.returncode == 0, proc.stderr
    upstream = json.loads(proc.stdout)
    from extauthz.api.celast import ast_pb2

    enum, int32 = 14, 5  # CEL's null_value is an enum; an int32 reads the same varint
    checked = 0
    for full_name, descriptor in [("CheckedExpr", ast_pb2.CheckedExpr.DESCRIPTOR), ("Expr", ast_pb2.Expr.DESCRIPTOR),
                                  ("Constant", ast_pb2.Constant.DESCRIPTOR)]:
        stack = [(full_name, descriptor)]
        while stack:
            name, d = stack.pop()
            for f in d.fields:
                number, kind, repeated = upstream[name][f.name]
                assert (f.number, f.is_repeated) == (number, repeated), f"{name}.{f.name}"
                assert f.type == kind or (f.type, kind) == (int32, enum), f"{name}.{f.name}"
                checked += 1
            stack.extend((f"{name}.{n.name}", n) for n in d.nested_types if not n.GetOptions().map_entry)
    assert checked > 30


def test_access_log_subset_matches_envoys_fields() -> None:
    """The access-log protos are a documented SUBSET of Envoy's: every message, enum value and field
    we declare is Envoy's, with the same number, type, label and message type (so Envoy's bytes parse
    into them, the rest skipped as unknown fields)."""
    from google.protobuf import descriptor_pool

    from extauthz.api.envoy.service.accesslog.v3 import als_pb2

    pool = descriptor_pool.Default()
    names: list[str] = []

    def walk(d) -> None:
        names.append(d.full_name)
        names.extend(e.full_name for e in d.enum_types)
        for nested in d.nested_types:
            walk(nested)

    for file_name in ("extauthz/api/envoy/service/accesslog/v3/als.proto",
                      "extauthz/api/envoy/data/accesslog/v3/accesslog.proto"):
        fd = pool.FindFileByName(file_name)
        for d in fd.message_types_by_name.values():
            walk(d)
        names.extend(e.full_name for e in fd.enum_types_by_name.values())
    results = []
    for setup, path in (("from extauthz.api.envoy.service.accesslog.v3 import als_pb2", None),
                        ("from envoy.service.accesslog.v3 import als_pb2", XDS_PROTOS)):
        env = {**os.environ, "PYTHONPATH": str(path)} if path else dict(os.environ)
        proc = subprocess.run([sys.executable, "-c", _describe(setup), json.dumps(names)], capture_output=True,
                              text=True, cwd=ROOT if path is None else path, timeout=120, env=env)
        assert proc.returncode == 0, proc.stderr
        results.append(json.loads(proc.stdout))
    ours, upstream = results
    assert len(names) >= 10
    for name in names:
        assert upstream[name] is not None, f"{name} does not exist upstream"
        if "enum" in ours[name]:
            assert set(map(tuple, ours[name]["enum"])) <= set(map(tuple, upstream[name]["enum"])), name
            continue
        for field_name, field in ours[name]["fields"].items():
            assert upstream[name]["fields"].get(field_name) == field, f"{name}.{field_name} differs from Envoy's"
    method = als_pb2.DESCRIPTOR.services_by_name["AccessLogService"].methods_by_name["StreamAccessLogs"]
    assert (method.client_streaming, method.server_streaming) == (True, False)
    assert f"/{method.containing_service.full_name}/{method.name}" == \
        "/envoy.service.accesslog.v3.AccessLogService/StreamAccessLogs"


def test_envoys_full_access_log_message_parses_into_the_subset() -> None:
    """Bytes of Envoy's full StreamAccessLogsMessage (node, addresses, timings, headers, TCP-free)
    parse into our subset: the fields we read keep their values, the rest is skipped."""
    script = textwrap.dedent(
        """
        import sys
        from envoy.service.accesslog.v3 import als_pb2
        from envoy.data.accesslog.v3 import accesslog_pb2 as a
        m = als_pb2.StreamAccessLogsMessage()
        m.identifier.log_name = "extauthz-outcomes"
        m.identifier.node.id = "envoy-1"
        e = m.http_logs.log_entry.add()
        c = e.common_properties
        c.downstream_remote_address.socket_address.address = "203.0.113.7"
        c.start_time.seconds = 1764900000
        c.duration.nanos = 5000
        c.response_flags.upstream_connection_failure = True
        c.response_flags.unauthorized_details.reason = a.ResponseFlags.Unauthorized.EXTERNAL_SERVICE
        c.access_log_type = a.DownstreamEnd
        c.custom_tags["k"] = "v"
        e.protocol_version = a.HTTPAccessLogEntry.HTTP2
        e.request.path = "/login"
        e.request.request_id = "6b1e0f0c-0000-4000-8000-000000000001"
        e.request.request_headers["x-a"] = "b"
        e.response.response_code.value = 401
        e.response.response_code_details = "via_upstream"
        sys.stdout.write(m.SerializeToString().hex())
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=XDS_PROTOS,
                          env={**os.environ, "PYTHONPATH": str(XDS_PROTOS)}, timeout=120)
    assert proc.returncode == 0, proc.stderr
    from extauthz.api.envoy.service.accesslog.v3 import als_pb2
    from extauthz.outcomes.access_log_service import response_flags

    message = als_pb2.StreamAccessLogsMessage.FromString(bytes.fromhex(proc.stdout))
    assert message.identifier.log_name == "extauthz-outcomes"
    [entry] = message.http_logs.log_entry
    assert entry.request.request_id == "6b1e0f0c-0000-4000-8000-000000000001"
    assert entry.response.response_code.value == 401
    assert entry.common_properties.access_log_type == 6  # DownstreamEnd
    assert response_flags(entry.common_properties.response_flags) == "UF,UAEX"
