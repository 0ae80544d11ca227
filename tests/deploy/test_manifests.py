"""deploy/k8s, the Dockerfile and constraints.txt, checked offline.

Every manifest is validated against the Kubernetes OpenAPI schemas bundled with kubernetes-validate
(no cluster, no network); the kustomizations' references must resolve; the generated policies
ConfigMap must be policies/ byte for byte (minus the PolicyTest files); and `extauthz validate` must accept the
policy folder exactly as a pod would see it (ConfigMap + Secrets mounted as documented), and exactly as
the image's default command sees it (the Dockerfile's COPY lines applied to the .dockerignore'd context).
"""

from __future__ import annotations

import base64
import fnmatch
import json
import os
import posixpath
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from extauthz.cli import main as extauthz_main

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
BASE = K8S / "base"
ISTIO = K8S / "overlays" / "istio"
#: Oldest Kubernetes the manifests support, and the newest the bundled schemas know.
K8S_VERSIONS = ("1.29", kubernetes_validate.latest_version())
ISTIO_KINDS = {"AuthorizationPolicy", "ServiceEntry", "Telemetry"}

sys.path.insert(0, str(K8S))
import sync  # noqa: E402


def _load_all(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def _kustomizations() -> list[Path]:
    return sorted(K8S.rglob("kustomization.yaml"))


def _render_python(folder: Path) -> list[dict[str, Any]]:
    """What kustomize would produce, for this repository's subset (used when kubectl is absent)."""
    kust = yaml.safe_load((folder / "kustomization.yaml").read_text())
    docs: list[dict[str, Any]] = []
    for entry in kust.get("resources", []):
        target = folder / entry
        docs += _render_python(target) if target.is_dir() else _load_all(target)
    for gen in kust.get("configMapGenerator", []):
        data = {}
        for item in gen["files"]:
            key, _, rel = item.partition("=")
            data[key] = (folder / rel).read_text()
        docs.append({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": gen["name"]}, "data": data})
    for gen in kust.get("secretGenerator", []):
        data = {}
        for item in gen["files"]:
            key, _, rel = item.partition("=")
            data[key] = base64.b64encode((folder / rel).read_bytes()).decode()
        docs.append({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": gen["name"]}, "type": gen.get("type"),
                     "data": data})  # fmt: skip
    for patch in kust.get("patches", []):
        # Only the generated keys-volume patch is applied here: it replaces one volume by name.
        patch_doc = yaml.safe_load((folder / patch["path"]).read_text())
        target = _one(docs, patch_doc["kind"], patch_doc["metadata"]["name"])
        volumes = {v["name"]: v for v in patch_doc["spec"]["template"]["spec"]["volumes"]}
        spec = target["spec"]["template"]["spec"]
        spec["volumes"] = [volumes.get(v["name"], v) for v in spec["volumes"]]
    for doc in docs:
        if "namespace" in kust and doc["kind"] != "Namespace":
            doc["metadata"]["namespace"] = kust["namespace"]
        for image in kust.get("images", []):
            for container in doc.get("spec", {}).get("template", {}).get("spec", {}).get("containers", []):
                if container["image"] == image["name"]:
                    container["image"] = f"{image['newName']}:{image['newTag']}"
    return docs


def _render(folder: Path) -> list[dict[str, Any]]:
    kubectl = shutil.which("kubectl")
    if kubectl is None or folder not in (BASE, ISTIO):
        return _render_python(folder)
    out = subprocess.run([kubectl, "kustomize", str(folder)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc]


@pytest.fixture(scope="module")
def base() -> list[dict[str, Any]]:
    return _render(BASE)


@pytest.fixture(scope="module")
def istio() -> list[dict[str, Any]]:
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl (with its built-in kustomize) is needed to apply the overlay's JSON patches")
    return _render(ISTIO)


def _one(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} found"
    return found[0]


def test_generated_folder_is_current() -> None:
    assert sync.differences() == [], "run: python deploy/k8s/sync.py"


def test_kustomization_references_resolve() -> None:
    assert {p.parent for p in _kustomizations()} == {BASE, BASE / "generated", ISTIO}
    assert yaml.safe_load((BASE / "kustomization.yaml").read_text())["patches"] == [
        {"path": "generated/keys-volume.yaml"}
    ], "the Python fallback renderer applies only this patch"
    for path in _kustomizations():
        folder = path.parent
        kust = yaml.safe_load(path.read_text())
        for entry in kust.get("resources", []):
            target = (folder / entry).resolve()
            assert target.exists(), f"{path}: resource {entry} does not exist"
            if target.is_dir():
                assert (target / "kustomization.yaml").is_file(), f"{path}: {entry} has no kustomization.yaml"
        for patch in kust.get("patches", []):
            assert (folder / patch["path"]).is_file(), f"{path}: patch {patch['path']} does not exist"
        for gen in kust.get("configMapGenerator", []) + kust.get("secretGenerator", []):
            for item in gen["files"]:
                rel = item.partition("=")[2] or item
                source = (folder / rel).resolve()
                assert source.is_file(), f"{path}: {gen['name']} file {rel} does not exist"
                assert folder.resolve() in source.parents, (
                    f"{path}: {rel} is outside the kustomization (kustomize refuses)"
                )


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_every_manifest_validates_against_the_kubernetes_schemas(version: str, base) -> None:
    docs = list(base)
    if shutil.which("kubectl") is not None:
        docs += [d for d in _render(ISTIO) if d["kind"] not in ISTIO_KINDS]
    assert len(docs) >= 19
    for doc in docs:
        kubernetes_validate.validate(doc, version, strict=True)


def test_the_validator_really_rejects_mistakes(base) -> None:
    broken = yaml.safe_load(yaml.safe_dump(_one(base, "Deployment", "orders")))
    broken["spec"]["template"]["spec"]["containers"][0]["readinessProb"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSIONS[0], strict=True)


def _without_schema_line(text: str) -> str:
    """A policy file minus the editors' schema line, whose relative path the copy adjusts."""
    return text.partition("\n")[2] if text.startswith("# yaml-language-server: $schema=") else text


def test_policies_configmap_is_the_policies_folder(base) -> None:
    data = _one(base, "ConfigMap", "extauthz-policies")["data"]
    expected = {name: (ROOT / "policies" / name).read_text() for name in sync.policy_files()}
    assert {k: _without_schema_line(v) for k, v in data.items()} == {
        k: _without_schema_line(v) for k, v in expected.items()}
    assert not [name for name in data if name.endswith("_test.yaml")], "PolicyTests stay in the repository"
    for name, text in data.items():  # the copy's schema line works from where the copy is
        first = text.partition("\n")[0]
        if first.startswith("# yaml-language-server: $schema="):
            schema = ROOT / "deploy" / "k8s" / "base" / "generated" / "policies" / first.split("=", 1)[1]
            assert schema.resolve() == ROOT / "schema" / "extauthz.schema.json", name
    envoy = _one(base, "ConfigMap", "envoy-config")["data"]
    assert envoy == {name: (ROOT / "deploy" / "envoy" / name).read_text() for name in ("envoy.yaml", "envoy-http.yaml")}


def _pod_folder(base: list[dict[str, Any]], root: Path, without: str | None = None) -> Path:
    """Lay out the ConfigMap and Secrets as the extauthz container sees them (minus Secret ``without``)."""
    deployment = _one(base, "Deployment", "orders")
    container = next(c for c in deployment["spec"]["template"]["spec"]["containers"] if c["name"] == "extauthz")
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    policies = root / mounts["policies"].lstrip("/")
    policies.mkdir(parents=True)
    for name, text in _one(base, "ConfigMap", volumes["policies"]["configMap"]["name"])["data"].items():
        (policies / name).write_text(text)
    keys = root / mounts["keys"].lstrip("/")
    keys.mkdir(parents=True)
    for source in volumes["keys"]["projected"]["sources"]:
        if source["secret"]["name"] == without:
            continue
        data = _one(base, "Secret", source["secret"]["name"]).get("data", {})
        items = source["secret"].get("items") or [{"key": k, "path": k} for k in data]
        assert {item["key"] for item in items} == set(data), "every key of the Secret is projected"
        for item in items:
            target = keys / item["path"]
            assert not target.exists(), f"two Secrets project {item['path']}"
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(base64.b64decode(data[item["key"]]))
    return policies


def test_extauthz_accepts_the_mounted_policies(base, tmp_path: Path, capsys) -> None:
    policies = _pod_folder(base, tmp_path)
    assert policies.relative_to(tmp_path).as_posix() == "etc/extauthz/policies"
    assert (tmp_path / "etc/extauthz/examples/keys").is_dir()  # where ../examples/keys/... resolves
    assert extauthz_main(["validate", str(policies)]) == 0, capsys.readouterr().err
    # No PolicyTests in the pod: they and the test keys they sign with stay in the repository.
    assert extauthz_main(["test", str(policies)]) == 1
    assert "no PolicyTest cases" in capsys.readouterr().err


def _key_secrets(base: list[dict[str, Any]]) -> list[str]:
    volumes = _one(base, "Deployment", "orders")["spec"]["template"]["spec"]["volumes"]
    keys = next(v for v in volumes if v["name"] == "keys")
    return [source["secret"]["name"] for source in keys["projected"]["sources"]]


def _secrets_used(deployment: dict[str, Any]) -> set[str]:
    """Secrets a Deployment's containers read: through a mounted volume (secret or projected) or env."""
    pod = deployment["spec"]["template"]["spec"]
    containers = pod["containers"] + pod.get("initContainers", [])
    mounted = {m["name"] for c in containers for m in c.get("volumeMounts", [])}
    used = set()
    for volume in pod.get("volumes", []):
        if volume["name"] not in mounted:
            continue
        if "secret" in volume:
            used.add(volume["secret"]["secretName"])
        used |= {s["secret"]["name"] for s in volume.get("projected", {}).get("sources", []) if "secret" in s}
    for container in containers:
        used |= {e["valueFrom"]["secretKeyRef"]["name"] for e in container.get("env", [])
                 if "secretKeyRef" in e.get("valueFrom", {})}  # fmt: skip
        used |= {e["secretRef"]["name"] for e in container.get("envFrom", []) if "secretRef" in e}
    return used


def test_every_secret_is_used_by_a_deployment_and_vice_versa(base) -> None:
    defined = {d["metadata"]["name"] for d in base if d["kind"] == "Secret"}
    used = set().union(*(_secrets_used(d) for d in base if d["kind"] == "Deployment"))
    assert defined - used == set(), "Secrets no Deployment mounts or reads"
    assert used - defined == set(), "Secrets the Deployments need but the base does not define"


@pytest.mark.parametrize("secret", sorted(sync.secrets()))
def test_every_key_secret_is_needed_by_the_policies(base, secret: str, tmp_path: Path, capsys) -> None:
    """A projected Secret the policies never read (a placeholder) would leave the pod unchanged when
    replaced: without each key Secret, the mounted policies must no longer validate."""
    assert sorted(sync.secrets()) == sorted(_key_secrets(base))
    policies = _pod_folder(base, tmp_path, without=secret)
    assert extauthz_main(["validate", str(policies)]) == 1, f"no policy reads a file of {secret}"
    assert "examples/keys/" in capsys.readouterr().err


def test_kubernetes_doc_names_every_secret_and_file(base) -> None:
    """docs/kubernetes.md says which Secret (and which data key) to replace; it names no other."""
    text = (ROOT / "docs" / "kubernetes.md").read_text()
    section = text.split("## Secrets and key files", 1)[1].split("\n## ", 1)[0]
    secrets = {d["metadata"]["name"]: d for d in base if d["kind"] == "Secret"}
    named = set(re.findall(r"`(extauthz-[a-z0-9-]+)`", section))
    assert named == set(secrets), "the Secrets table must list exactly the base's Secrets"
    for name, secret in secrets.items():
        for key in {**secret.get("data", {}), **secret.get("stringData", {})}:
            assert f"`{key}`" in section, f"docs/kubernetes.md does not say {name} holds {key}"


def _containers(deployment: dict[str, Any]) -> list[dict[str, Any]]:
    return deployment["spec"]["template"]["spec"]["containers"]


def test_pods_are_locked_down(base) -> None:
    for deployment in (d for d in base if d["kind"] == "Deployment"):
        pod = deployment["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
        assert pod["automountServiceAccountToken"] is False
        for container in _containers(deployment):
            where = f"{deployment['metadata']['name']}/{container['name']}"
            sc = container["securityContext"]
            assert sc["readOnlyRootFilesystem"] is True, where
            assert sc["allowPrivilegeEscalation"] is False, where
            assert sc["capabilities"]["drop"] == ["ALL"], where
            assert sc.get("runAsUser", 1) != 0, where
            assert {"cpu", "memory"} <= set(container["resources"]["requests"]), where
            assert {"cpu", "memory"} <= set(container["resources"]["limits"]), where
            assert "livenessProbe" in container and "readinessProbe" in container, where


def test_extauthz_container_probes_metrics_and_mounts(base) -> None:
    deployment = _one(base, "Deployment", "orders")
    template = deployment["spec"]["template"]
    annotations = template["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true" and annotations["prometheus.io/path"] == "/metrics"
    container = next(c for c in _containers(deployment) if c["name"] == "extauthz")
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    port = {p["name"]: p["containerPort"] for p in container["ports"]}[container["readinessProbe"]["httpGet"]["port"]]
    assert annotations["prometheus.io/port"] == str(port) and f"--http-port={port}" in container["args"]
    assert "--listen=127.0.0.1:9191" in container["args"]  # gRPC stays inside the pod
    assert all("subPath" not in m for m in container["volumeMounts"]), "subPath mounts never see ConfigMap updates"
    envoy = yaml.safe_load(_one(base, "ConfigMap", "envoy-config")["data"]["envoy.yaml"])
    cluster = next(c for c in envoy["static_resources"]["clusters"] if c["name"] == "ext_authz")
    address = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"]
    assert f"{address['address']}:{address['port_value']}" == "127.0.0.1:9191"
    images = {c["name"]: c["image"] for c in _containers(deployment)}
    assert images["extauthz"] == "registry.example.com/extauthz:0.1.0"  # the kustomize images: entry applied


def test_cluster_objects_present(base) -> None:
    kinds = {(d["kind"], d["metadata"]["name"]) for d in base}
    for wanted in [("Service", "orders"), ("PodDisruptionBudget", "orders"), ("NetworkPolicy", "default-deny"),
                   ("NetworkPolicy", "orders"), ("Deployment", "extauthz-redis"), ("Service", "extauthz-redis"),
                   ("Secret", "extauthz-keys-identity"), ("Secret", "extauthz-keys-partners"),
                   ("Secret", "extauthz-keys-webhooks"), ("Secret", "extauthz-redis"), ("Secret", "extauthz-subject-key"),
                   ("Namespace", "extauthz-demo")]:  # fmt: skip
        assert wanted in kinds
    pdb = _one(base, "PodDisruptionBudget", "orders")
    assert pdb["spec"]["minAvailable"] < _one(base, "Deployment", "orders")["spec"]["replicas"]
    assert all(d["metadata"].get("namespace", "extauthz-demo") == "extauthz-demo" for d in base)


def test_istio_overlay(istio) -> None:
    deployment = _one(istio, "Deployment", "orders")
    assert [c["name"] for c in _containers(deployment)] == ["app", "extauthz"]
    volumes = {v["name"] for v in deployment["spec"]["template"]["spec"]["volumes"]}
    assert "envoy-config" not in volumes and "envoy-tmp" not in volumes
    policy = _one(istio, "AuthorizationPolicy", "orders-extauthz")
    assert policy["spec"]["action"] == "CUSTOM"
    mesh = yaml.safe_load((ISTIO / "mesh-config.yaml").read_text())
    providers = {p["name"]: p for p in mesh["spec"]["meshConfig"]["extensionProviders"]}
    assert set(providers) == {"extauthz-grpc", "extauthz-http", "extauthz-als"}
    assert policy["spec"]["provider"]["name"] == "extauthz-grpc"
    grpc = providers["extauthz-grpc"]["envoyExtAuthzGrpc"]
    http = providers["extauthz-http"]["envoyExtAuthzHttp"]
    entry = _one(istio, "ServiceEntry", "extauthz-local")
    ports = {p["number"]: p["protocol"] for p in entry["spec"]["ports"]}
    for provider, port, protocol in ((grpc, 9191, "GRPC"), (http, 9192, "HTTP")):
        assert provider["failOpen"] is False and provider["statusOnError"] == "503"
        assert provider["timeout"] == "0.5s"
        assert provider["service"] in entry["spec"]["hosts"] and provider["port"] == port and ports[port] == protocol
    assert entry["spec"]["endpoints"] == [{"address": "127.0.0.1"}]
    sidecar = next(c for c in _containers(deployment) if c["name"] == "extauthz")
    assert {"--listen=127.0.0.1:9191", "--http-authz-listen=127.0.0.1:9192"} <= set(sidecar["args"])
    # The HTTP provider says what deploy/envoy/envoy-http.yaml says, as far as Istio's API reaches.
    envoy_http = yaml.safe_load((ROOT / "deploy" / "envoy" / "envoy-http.yaml").read_text())
    authz = next(f for f in envoy_http["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
                 ["typed_config"]["http_filters"] if f["name"] == "envoy.filters.http.ext_authz")["typed_config"]
    added = {h["key"]: h["value"] for h in authz["http_service"]["authorization_request"]["headers_to_add"]}
    assert http["includeAdditionalHeadersInCheck"] == added
    body = {k: v for k, v in authz["with_request_body"].items()}
    assert http["includeRequestBodyInCheck"] == {"maxRequestBytes": body["max_request_bytes"],
                                                 "allowPartialMessage": body["allow_partial_message"]}
    response = authz["http_service"]["authorization_response"]
    assert set(http["headersToDownstreamOnAllow"]) == {p["exact"] for p in
                                                       response["allowed_client_headers_on_success"]["patterns"]}
    labels = policy["spec"]["selector"]["matchLabels"]
    assert labels.items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    # the access logs (outcomes for the detectors) go to the same sidecar, selected by a Telemetry
    telemetry = _one(istio, "Telemetry", "orders-extauthz-outcomes")
    [logging] = telemetry["spec"]["accessLogging"]
    als = providers[logging["providers"][0]["name"]]["envoyHttpAls"]
    assert (als["service"], als["port"]) == (grpc["service"], grpc["port"])
    assert telemetry["spec"]["selector"]["matchLabels"].items() <= labels.items()


def test_dockerfile_and_constraints() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "-slim" in dockerfile and "--constraint" in dockerfile
    assert "USER 10001:10001" in dockerfile
    assert 'ENTRYPOINT ["extauthz"]' in dockerfile and 'CMD ["serve"]' in dockerfile
    context = _docker_context()
    for stage in _dockerfile_stages():
        for instruction, args in stage:
            sources = []
            if instruction in ("COPY", "ADD") and not any(a.startswith("--from=") for a in args):
                sources = _copy_operands(args)[0]
            for flag in (a for a in args if a.startswith("--mount=") and "type=bind" in a and "from=" not in a):
                sources.append(dict(f.split("=", 1) for f in flag[len("--mount=") :].split(","))["source"])
            for source in sources:
                assert _context_matches(context, source), f"{instruction} {source}: not in the build context"
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            assert version, f"constraints.txt: {line!r} is not an exact pin"
            pins[name.lower().replace("_", "-")] = version
    import tomllib

    from packaging.requirements import Requirement

    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    for dep in deps:
        requirement = Requirement(dep)
        name = requirement.name.lower().replace("_", "-")
        assert name in pins, f"constraints.txt does not pin runtime dependency {name}"
        assert requirement.specifier.contains(pins[name], prereleases=True), f"{name}=={pins[name]} violates {dep}"


# ---- the image's file layout, rebuilt from the Dockerfile and .dockerignore (no docker needed) -----------


def _dockerignore_regex(pattern: str) -> re.Pattern[str]:
    """A .dockerignore pattern compiled as Docker's patternmatcher does (Go filepath.Match, plus **)."""
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**", i):
            i += 2
            if pattern.startswith("/", i):
                out, i = out + "(?:.*/)?", i + 1
            else:
                out += ".*"
            continue
        char = pattern[i]
        assert char not in "[\\", f".dockerignore: {pattern!r} uses syntax this test does not model"
        out += {"*": "[^/]*", "?": "[^/]"}.get(char, re.escape(char))
        i += 1
    return re.compile(out)


def _docker_context() -> dict[str, Path]:
    """Files of the build context (relative path -> file) after .dockerignore: the last matching rule
    wins, and a rule matching a parent folder matches everything below it."""
    rules = []
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            pattern = posixpath.normpath(line.removeprefix("!").strip()).lstrip("/")
            rules.append((not line.startswith("!"), _dockerignore_regex(pattern)))
    context = {}
    for folder, dirs, files in os.walk(ROOT):
        dirs[:] = [d for d in dirs if not (folder == str(ROOT) and d == ".git")]
        for name in files:
            relative = (Path(folder) / name).relative_to(ROOT).as_posix()
            parts = relative.split("/")
            candidates = ["/".join(parts[:n]) for n in range(len(parts), 0, -1)]
            excluded = False
            for exclude, regex in rules:
                if any(regex.fullmatch(c) for c in candidates):
                    excluded = exclude
            if not excluded:
                context[relative] = Path(folder) / name
    return context


def _dockerfile_stages() -> list[list[tuple[str, list[str]]]]:
    """The Dockerfile's instructions (continuations joined, comments dropped), one list per FROM."""
    stages: list[list[tuple[str, list[str]]]] = []
    pending = ""
    for line in (ROOT / "Dockerfile").read_text().splitlines():
        if line.lstrip().startswith("#"):
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        text, pending = (pending + line).strip(), ""
        if not text:
            continue
        instruction, _, rest = text.partition(" ")
        rest = rest.strip()
        args = json.loads(rest) if rest.startswith("[") else shlex.split(rest)
        if instruction.upper() == "FROM":
            stages.append([])
        stages[-1].append((instruction.upper(), args))
    return stages


def _copy_operands(args: list[str]) -> tuple[list[str], str]:
    operands = [a for a in args if not a.startswith("--")]
    return operands[:-1], operands[-1]


def _context_matches(context: dict[str, Path], source: str) -> dict[str, list[str]]:
    """Context files a COPY source names -> the path parts below the source (a folder's contents)."""
    source = posixpath.normpath(source).lstrip("/")
    depth = 0 if source == "." else source.count("/") + 1
    found = {}
    for relative in context:
        parts = relative.split("/")
        if len(parts) >= depth and fnmatch.fnmatchcase("/".join(parts[:depth]), source if depth else ""):
            found[relative] = parts[depth:]
    return found


def _image_layout(root: Path) -> dict[str, Any]:
    """Apply the final stage's COPY lines under root; return its WORKDIR, ENV, ENTRYPOINT and CMD."""
    context = _docker_context()
    image: dict[str, Any] = {"workdir": "/", "env": {}, "entrypoint": [], "cmd": []}
    for instruction, args in _dockerfile_stages()[-1]:
        if instruction == "WORKDIR":
            image["workdir"] = posixpath.join(image["workdir"], args[0])
        elif instruction == "ENV":
            pairs = [a.split("=", 1) for a in args] if "=" in args[0] else [[args[0], " ".join(args[1:])]]
            image["env"].update(dict(pairs))
        elif instruction in ("ENTRYPOINT", "CMD"):
            image[instruction.lower()] = args
        elif instruction in ("COPY", "ADD"):
            assert not any(a.startswith("--from=") for a in args), "this test models COPY from the context only"
            sources, dest = _copy_operands(args)
            dest = posixpath.join(image["workdir"], dest)
            for source in sources:
                matches = _context_matches(context, source)
                assert matches, f"{instruction} {source}: nothing in the build context"
                for relative, below in matches.items():
                    if below:  # a folder: its contents go into dest
                        target = posixpath.join(dest, *below)
                    elif dest.endswith("/") or len(sources) > 1:
                        target = posixpath.join(dest, posixpath.basename(relative))
                    else:
                        target = dest
                    path = root / target.lstrip("/")
                    path.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(context[relative], path)
    return image


def test_image_default_command_serves_the_bundled_policies(tmp_path: Path, capsys) -> None:
    image = _image_layout(tmp_path)
    command = image["entrypoint"] + image["cmd"]
    assert command[:2] == ["extauthz", "serve"], command
    # extauthz serve: --policies, else EXTAUTHZ_POLICIES, else ./policies, relative to the WORKDIR.
    flag = next((a.split("=", 1)[1] for a in command[2:] if a.startswith("--policies=")), None)
    folder = posixpath.join(image["workdir"], flag or image["env"].get("EXTAUTHZ_POLICIES", "policies"))
    policies = tmp_path / folder.lstrip("/")
    assert sorted(p.name for p in policies.glob("*.y*ml")) == sync.policy_files()  # PolicyTests left out
    assert extauthz_main(["validate", str(policies)]) == 0, capsys.readouterr().err
    # The example key material the policies name (../examples/keys/...) is what the pod gets: no
    # private keys, client material or scripts in the image.
    keys = policies.parent / "examples" / "keys"
    assert {p.relative_to(keys).as_posix() for p in keys.rglob("*") if p.is_file()} == set(sync.key_files())


def test_dockerignore_model_matches_docker_semantics() -> None:
    """The rules the context model relies on: ** spans folders, a folder rule covers its contents."""
    assert _dockerignore_regex("**").fullmatch("a/b/c")
    assert _dockerignore_regex("**/__pycache__").fullmatch("__pycache__")
    assert _dockerignore_regex("**/__pycache__").fullmatch("x/y/__pycache__")
    assert _dockerignore_regex("examples/keys/**/*.key").fullmatch("examples/keys/a.key")
    assert _dockerignore_regex("examples/keys/**/*.key").fullmatch("examples/keys/identity/signing-ec.key")
    assert not _dockerignore_regex("*.key").fullmatch("identity/signing-ec.key")
    context = _docker_context()
    assert "extauthz/cli.py" in context and "policies/orders.yaml" in context
    assert not any(r.startswith(("tests/", ".git/", "examples/keys/clients/")) or r.endswith(".pyc") for r in context)
