"""The Kubernetes manifests (deploy/k8s): rendered, validated against Kubernetes' schemas,
and their wiring checked against the code's configuration.

The kustomization is rendered by a small renderer here (resources, generators, namespace:
all the kustomization may use), after ``gen-secrets.sh`` wrote its secrets into a copy of
the tree; where ``kubectl`` is installed its built-in kustomize must render the same.
Each object is then validated strictly (unknown fields refused) with
``kubernetes-validate``, and the NATS configuration with ``nats-server -t``.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import io
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from gpufaas.embedded import nats_server_binary
from gpufaas.shared import constants as c
from gpufaas.shared import nats_auth
from gpufaas.shared.config import PREFIX, Config

pytestmark = pytest.mark.unit

REPO_ROOT = Path(__file__).resolve().parents[2]
K8S = REPO_ROOT / "deploy" / "k8s"
# Oldest Kubernetes release still maintained upstream, and the newest schema shipped.
K8S_VERSIONS = ("1.33", "1.37")
KUSTOMIZATION_KEYS = {"apiVersion", "kind", "namespace", "resources"} | {
    "configMapGenerator",
    "secretGenerator",
    "generatorOptions",
}
CLUSTER_SCOPED = {"Namespace"}
WORKLOADS = {"Deployment", "DaemonSet", "StatefulSet", "Job"}
SAMPLE_NODE = "gpu-node-1"  # what spec.nodeName stands for in the checks
NATS_CLIENT_LABEL = ("gpufaas/nats-client", "true")
Obj = dict[str, Any]


# --- rendering ----------------------------------------------------------------------------


def _generated(kind: str, spec: Obj, root: Path) -> Obj:
    """A ConfigMap or Secret of a kustomize generator (``files`` and ``envs`` only)."""
    assert set(spec) <= {"name", "files", "envs"}, f"generator {spec['name']}: {set(spec)}"
    data: dict[str, str] = {}
    for entry in spec.get("files", []):
        key, _, path = entry.rpartition("=")
        data[key or PurePosixPath(path).name] = (root / path).read_text()
    for path in spec.get("envs", []):
        for line in (root / path).read_text().splitlines():
            if line.strip() and not line.startswith("#"):
                key, _, value = line.partition("=")
                data[key] = value
    obj: Obj = {"apiVersion": "v1", "kind": kind, "metadata": {"name": spec["name"]}}
    if kind == "Secret":
        obj["type"] = "Opaque"
        data = {k: base64.b64encode(v.encode()).decode() for k, v in data.items()}
    obj["data"] = data
    return obj


def render(root: Path) -> list[Obj]:
    """``kustomize build root`` for the subset of kustomize this tree uses."""
    k = yaml.safe_load((root / "kustomization.yaml").read_text())
    assert set(k) <= KUSTOMIZATION_KEYS, f"unsupported: {set(k) - KUSTOMIZATION_KEYS}"
    assert k.get("generatorOptions") == {"disableNameSuffixHash": True}
    objs: list[Obj] = []
    for res in k["resources"]:
        assert (root / res).is_file(), f"resource {res} is not a file"
        objs += [d for d in yaml.safe_load_all((root / res).read_text()) if d]
    objs += [_generated("ConfigMap", g, root) for g in k.get("configMapGenerator", [])]
    objs += [_generated("Secret", g, root) for g in k.get("secretGenerator", [])]
    for obj in objs:
        if obj["kind"] not in CLUSTER_SCOPED:
            obj["metadata"]["namespace"] = k["namespace"]
    return objs


@dataclasses.dataclass
class Rendered:
    root: Path  # the copy of deploy/k8s with its secrets written
    objs: list[Obj]

    def get(self, kind: str, name: str) -> Obj:
        found = [o for o in self.objs if o["kind"] == kind and o["metadata"]["name"] == name]
        assert len(found) == 1, f"{kind}/{name}: {len(found)} found"
        return found[0]

    def of_kind(self, kind: str) -> list[Obj]:
        return [o for o in self.objs if o["kind"] == kind]

    def data(self, kind: str, name: str) -> dict[str, str]:
        """A ConfigMap's or Secret's data, decoded."""
        d: dict[str, str] = self.get(kind, name).get("data", {})
        if kind == "Secret":
            return {k: base64.b64decode(v).decode() for k, v in d.items()}
        return d

    def workloads(self) -> Iterator[tuple[Obj, Obj]]:
        """(workload, pod spec) of every workload."""
        for o in self.objs:
            if o["kind"] in WORKLOADS:
                yield o, o["spec"]["template"]["spec"]


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> Rendered:
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed: gen-secrets.sh needs it")
    root = tmp_path_factory.mktemp("k8s") / "k8s"
    shutil.copytree(K8S, root, ignore=shutil.ignore_patterns("secrets"))
    subprocess.run(
        ["sh", str(root / "gen-secrets.sh")], check=True, capture_output=True, timeout=60
    )
    return Rendered(root, render(root))


def container_env(r: Rendered, container: Obj) -> dict[str, str]:
    """A container's environment as Kubernetes builds it: envFrom ConfigMaps, then env;
    ``$(VAR)`` expanded; spec.nodeName is SAMPLE_NODE, other references their path."""
    env: dict[str, str] = {}
    for src in container.get("envFrom", []):
        env |= r.data("ConfigMap", src["configMapRef"]["name"])
    for e in container.get("env", []):
        if "value" in e:
            env[e["name"]] = re.sub(r"\$\((\w+)\)", lambda m: env[m[1]], e["value"])
        elif e["valueFrom"].get("fieldRef", {}).get("fieldPath") == "spec.nodeName":
            env[e["name"]] = SAMPLE_NODE
        else:
            env[e["name"]] = f"<{e['valueFrom']}>"
    return env


def platform_containers(r: Rendered) -> Iterator[tuple[str, Obj, Obj]]:
    """(component, pod spec, container) of every gpufaas container."""
    for w, spec in r.workloads():
        for ctr in spec["containers"]:
            if ctr["image"].split(":")[0] == "gpufaas":
                yield w["metadata"]["labels"]["app.kubernetes.io/component"], spec, ctr


def component(r: Rendered, name: str) -> tuple[Obj, dict[str, str]]:
    """(container, environment) of the one gpufaas container of a component."""
    found = [
        (ctr, container_env(r, ctr)) for comp, _, ctr in platform_containers(r) if comp == name
    ]
    assert len(found) == 1, name
    return found[0]


def nats_conf(r: Rendered) -> str:
    return r.data("ConfigMap", "gpufaas-nats-config")["nats.conf"]


def nats_setting(conf: str, key: str) -> str:
    m = re.search(rf"^\s*{key}:\s*(\S+)\s*$", conf, re.MULTILINE)
    assert m, f"nats.conf has no {key}"
    return m[1]


def nats_bytes(value: str) -> int:
    """A size as nats-server reads it (KB/MB/GB: powers of 1024)."""
    m = re.fullmatch(r"(\d+)(KB|MB|GB|TB)?", value, re.IGNORECASE)
    assert m, value
    return int(m[1]) << 10 * ["", "KB", "MB", "GB", "TB"].index((m[2] or "").upper())


def quantity(value: str) -> int:
    """A Kubernetes quantity with a binary suffix (Mi, Gi), in bytes."""
    m = re.fullmatch(r"(\d+)(Ki|Mi|Gi|Ti)?", value)
    assert m, value
    return int(m[1]) << 10 * ["", "Ki", "Mi", "Gi", "Ti"].index(m[2] or "")


# --- rendering and schemas ----------------------------------------------------------------


def test_renders_like_kubectl_kustomize(rendered: Rendered) -> None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed: the renderer here is checked by the others only")
    out = subprocess.run(
        [kubectl, "kustomize", str(rendered.root)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    theirs = [d for d in yaml.safe_load_all(out.stdout) if d]

    def by_name(objs: list[Obj]) -> dict[tuple[str, str], Obj]:
        """By kind and name, a Secret's data decoded (kustomize wraps long base64)."""
        out = {}
        for o in objs:
            key = (o["kind"], o["metadata"]["name"])
            out[key] = o
            if o["kind"] == "Secret":
                out[key] = o | {"data": {k: base64.b64decode(v) for k, v in o["data"].items()}}
        return out

    assert by_name(rendered.objs) == by_name(theirs)


def test_every_object_is_valid_for_kubernetes(rendered: Rendered) -> None:
    kv = pytest.importorskip("kubernetes_validate")
    for version in K8S_VERSIONS:
        for obj in rendered.objs:
            try:
                kv.validate(obj, version, strict=True)
            except kv.ValidationError as exc:
                where = "/".join(str(p) for p in exc.path)
                pytest.fail(
                    f"{obj['kind']}/{obj['metadata']['name']} ({version}) {where}: {exc.message}"
                )
    # Strict means strict: a misspelt field is refused, not ignored.
    bad = rendered.get("Deployment", "gpufaas-gateway") | {"spec": {"replica": 2}}
    with pytest.raises(kv.ValidationError):
        kv.validate(bad, K8S_VERSIONS[-1], strict=True)


def test_nats_server_accepts_its_configuration(rendered: Rendered, tmp_path: Path) -> None:
    """The ConfigMap and Secret as the pods mount them, paths moved under tmp_path."""
    base = "/etc/gpufaas-nats"
    for d, files in (
        ("nats", rendered.data("ConfigMap", "gpufaas-nats-config")),
        ("secrets", rendered.data("Secret", "gpufaas-nats-server")),
    ):
        (tmp_path / d).mkdir()
        for name, text in files.items():
            moved = text.replace(base, str(tmp_path)).replace("/var/run/nats", str(tmp_path))
            (tmp_path / d / name).write_text(moved.replace("/data/", f"{tmp_path}/data/"))
    out = subprocess.run(
        [str(nats_server_binary()), "-c", str(tmp_path / "nats" / "nats.conf"), "-t"],
        env={"POD_NAME": "nats-0"},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert out.returncode == 0, out.stderr + out.stdout


# --- wiring against the code --------------------------------------------------------------


def test_env_names_are_config_fields_and_parse(rendered: Rendered) -> None:
    fields = {PREFIX + f.name.upper() for f in dataclasses.fields(Config)}
    seen = set()
    for comp, _, ctr in platform_containers(rendered):
        env = container_env(rendered, ctr)
        ours = {k: v for k, v in env.items() if k.startswith(PREFIX)}
        assert set(ours) <= fields, f"{comp}: not Config fields: {set(ours) - fields}"
        Config.from_env(environ=ours)  # a malformed value raises, naming it
        seen.add(comp)
    assert seen == {"gateway", "scheduler", "node"}


def test_ports_match_the_constants(rendered: Rendered) -> None:
    gw, env = component(rendered, "gateway")
    ports = {p["name"]: p["containerPort"] for p in gw["ports"]}
    assert ports == {"http": c.DEFAULT_HTTP_PORT, "grpc": c.DEFAULT_GRPC_PORT}
    assert int(env["GPUFAAS_HTTP_PORT"]) == ports["http"]
    assert int(env["GPUFAAS_GRPC_PORT"]) == ports["grpc"]
    assert env["GPUFAAS_HTTP_HOST"] == "0.0.0.0"
    svc = rendered.get("Service", "gpufaas-gateway")["spec"]["ports"]
    assert {p["port"]: ports[p["targetPort"]] for p in svc} == {
        c.DEFAULT_HTTP_PORT: c.DEFAULT_HTTP_PORT,
        c.DEFAULT_GRPC_PORT: c.DEFAULT_GRPC_PORT,
    }
    nats = rendered.get("StatefulSet", "nats")["spec"]["template"]["spec"]["containers"][0]
    nats_ports = {p["name"]: p["containerPort"] for p in nats["ports"]}
    assert nats_ports["client"] == c.DEFAULT_NATS_PORT
    assert nats_setting(nats_conf(rendered), "listen") == f"0.0.0.0:{c.DEFAULT_NATS_PORT}"
    headless = rendered.get("Service", "nats")["spec"]["ports"]
    assert {p["port"] for p in headless} == set(nats_ports.values())


def test_nats_urls_routes_and_certificate_name_every_server(rendered: Rendered) -> None:
    sts = rendered.get("StatefulSet", "nats")
    servers = [f"nats-{i}.{sts['spec']['serviceName']}" for i in range(sts["spec"]["replicas"])]
    urls = [urlsplit(u) for u in component(rendered, "scheduler")[1]["GPUFAAS_NATS_URL"].split(",")]
    assert [(u.scheme, u.hostname, u.port) for u in urls] == [
        ("tls", s, c.DEFAULT_NATS_PORT) for s in servers
    ]
    routes = re.findall(r"nats-route://([\w.-]+):(\d+)", nats_conf(rendered))
    assert routes == [(s, "6222") for s in servers]
    cert = rendered.root / "secrets" / "nats" / "nats-cert.pem"
    sans = subprocess.run(
        ["openssl", "x509", "-in", str(cert), "-noout", "-ext", "subjectAltName"],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout
    for s in servers:
        assert f"DNS:{s}," in sans, sans


def test_nats_users_are_the_roles_of_nats_auth(rendered: Rendered) -> None:
    auth = rendered.data("ConfigMap", "gpufaas-nats-config")["auth.conf"]
    m = re.match(r"# Generated by `python -m gpufaas.shared.nats_auth ([^`]+)`", auth)
    assert m, "auth.conf does not say its node ids"
    nodes = m[1].split()
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        nats_auth.main(nodes)
    assert auth == out.getvalue(), "auth.conf is stale: regenerate it with nats_auth"
    users = nats_auth.users_for(nodes)
    assert {nats_auth.role_of(u)[0] for u in users} == set(nats_auth.ROLES)
    server = rendered.data("Secret", "gpufaas-nats-server")["nats-passwords.conf"]
    assert set(re.findall(r"^(PW_\w+):", server, re.MULTILINE)) == {
        nats_auth.password_variable(u) for u in users
    }
    node_users = [u for u in users if nats_auth.role_of(u)[0] in nats_auth.NODE_ROLES]
    assert set(rendered.data("Secret", "gpufaas-nats-nodes")) == {
        f"{u}.password" for u in node_users
    }


def volume_of(spec: Obj, ctr: Obj, path: str) -> Obj:
    """The pod volume a file of the container lies on (mounted at its directory)."""
    parent = str(PurePosixPath(path).parent)
    (name,) = [m["name"] for m in ctr["volumeMounts"] if m["mountPath"] == parent]
    vols: list[Obj] = [v for v in spec["volumes"] if v["name"] == name]
    assert len(vols) == 1, name
    return vols[0]


def test_each_pod_is_its_role_with_its_own_password(rendered: Rendered) -> None:
    """Each pod connects as its role's user (a node as its node's), with that user's
    password file and the CA, and holds no other user's password."""
    node_roles = [nats_auth.user_name(r, SAMPLE_NODE) for r in nats_auth.NODE_ROLES]
    expected = {"gateway": ["gateway"], "scheduler": ["scheduler"], "node": node_roles}
    for comp, spec, ctr in platform_containers(rendered):
        env = container_env(rendered, ctr)
        users = [env["GPUFAAS_NATS_USER"], env.get("GPUFAAS_WORKER_NATS_USER", "")]
        assert [u for u in users if u] == expected[comp], comp
        files = [env["GPUFAAS_NATS_PASSWORD_FILE"], env.get("GPUFAAS_WORKER_NATS_PASSWORD_FILE")]
        assert [PurePosixPath(f).name for f in files if f] == [f"{u}.password" for u in users if u]
        for path in [env["GPUFAAS_NATS_TLS_CA"], *(f for f in files if f)]:
            vol = volume_of(spec, ctr, path)
            if "emptyDir" in vol:  # the node's: copied there by its init container
                (init,) = spec["initContainers"]
                assert vol["name"] in {m["name"] for m in init["volumeMounts"]}
                continue
            keys = {i["path"]: i["key"] for i in vol["secret"]["items"]}
            assert keys[PurePosixPath(path).name] in rendered.data(
                "Secret", vol["secret"]["secretName"]
            )
            assert all(k in ("ca.pem", *(f"{u}.password" for u in users)) for k in keys.values())
    nodes = rendered.get("DaemonSet", "gpufaas-node")["spec"]["template"]["spec"]
    assert [v["secret"]["secretName"] for v in nodes["volumes"] if "secret" in v] == [
        "gpufaas-nats-nodes",
        "gpufaas-nats-clients",
    ]


def test_references_exist(rendered: Rendered) -> None:
    """Every Secret, ConfigMap, volume, key and port a pod names is there."""
    have = {(o["kind"], o["metadata"]["name"]) for o in rendered.objs}
    for w, spec in rendered.workloads():
        claims = {t["metadata"]["name"] for t in w["spec"].get("volumeClaimTemplates", [])}
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        for v in volumes.values():
            if "secret" in v:
                assert ("Secret", v["secret"]["secretName"]) in have, v
                data = rendered.data("Secret", v["secret"]["secretName"])
                assert {i["key"] for i in v["secret"].get("items", [])} <= set(data), v
            if "configMap" in v:
                assert ("ConfigMap", v["configMap"]["name"]) in have, v
        for ctr in spec["containers"] + spec.get("initContainers", []):
            for m in ctr.get("volumeMounts", []):
                assert m["name"] in volumes.keys() | claims, (w["metadata"]["name"], m["name"])
            for src in ctr.get("envFrom", []):
                assert ("ConfigMap", src["configMapRef"]["name"]) in have
    for hpa in rendered.of_kind("HorizontalPodAutoscaler"):
        ref = hpa["spec"]["scaleTargetRef"]
        assert (ref["kind"], ref["name"]) in have


def shm_volume_bytes(r: Rendered, comp: str) -> int:
    """The size of the memory-backed volume whose root holds GPUFAAS_SHM_DIR."""
    ((spec, ctr),) = [(s, x) for n, s, x in platform_containers(r) if n == comp]
    shm = PurePosixPath(container_env(r, ctr)["GPUFAAS_SHM_DIR"])
    (mount,) = [m for m in ctr["volumeMounts"] if m["mountPath"] == str(shm.parent)]
    (vol,) = [v for v in spec["volumes"] if v["name"] == mount["name"]]
    assert vol["emptyDir"]["medium"] == "Memory", comp
    size = quantity(vol["emptyDir"]["sizeLimit"])
    assert size <= quantity(ctr["resources"]["limits"]["memory"]), f"{comp}: over its limit"
    return size


def test_shared_memory_tiers_sit_on_a_sized_memory_volume(rendered: Rendered) -> None:
    """GPUFAAS_SHM_DIR is a directory the services make (0700) at the root of a tmpfs
    emptyDir (sticky 1777, as their check of its parents requires), sized, and counted
    in the pod's memory limit; the node's tiers leave room in it for tubes."""
    assert shm_volume_bytes(rendered, "gateway") > 0
    size = shm_volume_bytes(rendered, "node")
    env = component(rendered, "node")[1]
    tiers = int(env["GPUFAAS_HOST_POOL_BYTES"]) + int(env["GPUFAAS_HOST_TENSOR_BYTES"])
    assert 0 < tiers < size, "the host pool and the tensor store leave no room for tubes"


def test_node_daemonset_takes_gpus_on_gpu_nodes(rendered: Rendered) -> None:
    ds = rendered.get("DaemonSet", "gpufaas-node")
    spec = ds["spec"]["template"]["spec"]
    node, env = component(rendered, "node")
    assert int(node["resources"]["limits"]["nvidia.com/gpu"]) >= 1
    assert spec["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert any(t["key"] == "nvidia.com/gpu" for t in spec["tolerations"])
    node_id = next(e for e in node["env"] if e["name"] == "GPUFAAS_NODE_ID")
    assert node_id["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    assert env["GPUFAAS_NODE_ID"] == SAMPLE_NODE
    assert env["GPUFAAS_DEVICES"] == "auto"
    # Every process of the node is in this one container: no host IPC needed.
    assert len(spec["containers"]) == 1
    assert not spec.get("hostIPC")
    assert node["args"] == ["node"]


def test_jetstream_and_payload_limits_hold_the_platform(rendered: Rendered) -> None:
    conf = nats_conf(rendered)
    store = nats_bytes(nats_setting(conf, "max_file_store"))
    assert store >= sum(c.DEFAULT_STREAM_MAX_BYTES.values())
    sts = rendered.get("StatefulSet", "nats")
    (claim,) = sts["spec"]["volumeClaimTemplates"]
    assert quantity(claim["spec"]["resources"]["requests"]["storage"]) >= store
    payload = nats_bytes(nats_setting(conf, "max_payload"))
    assert payload == c.NATS_MAX_PAYLOAD
    assert nats_bytes(nats_setting(conf, "max_pending")) == c.NATS_MAX_PENDING
    env = rendered.data("ConfigMap", "gpufaas-platform")
    assert int(env["GPUFAAS_NATS_REPLICAS"]) == sts["spec"]["replicas"] == 3
    # Gateways on other hosts than the node: big tensors through the object tier and
    # fetched from their node, never this host's shared memory (gateway/remote_tubes.py).
    assert env["GPUFAAS_GATEWAY_LOCAL_SHM"] == "0"
    assert int(env.get("GPUFAAS_INLINE_THRESHOLD", c.DEFAULT_INLINE_THRESHOLD)) <= payload // 2


def test_network_policies_expose_only_the_gateway(rendered: Rendered) -> None:
    policies = {p["metadata"]["name"]: p["spec"] for p in rendered.of_kind("NetworkPolicy")}
    assert policies["default-deny"] == {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}
    open_to_all = [
        (name, rule)
        for name, p in policies.items()
        for rule in p.get("ingress", [])
        if "from" not in rule
    ]
    assert [n for n, _ in open_to_all] == ["gateway-ingress"]
    assert {p["port"] for p in open_to_all[0][1]["ports"]} == {
        c.DEFAULT_HTTP_PORT,
        c.DEFAULT_GRPC_PORT,
    }
    (client_rule,) = [
        r for r in policies["nats-ingress"]["ingress"] if r["ports"][0]["port"] == 4222
    ]
    key, value = NATS_CLIENT_LABEL
    assert client_rule["from"] == [{"podSelector": {"matchLabels": {key: value}}}]
    for w, spec in rendered.workloads():
        labels = w["spec"]["template"]["metadata"]["labels"]
        talks_nats = any(
            "GPUFAAS_NATS_URL" in container_env(rendered, x) for x in spec["containers"]
        )
        assert (labels.get(key) == value) == talks_nats, w["metadata"]["name"]
