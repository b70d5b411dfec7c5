"""The shipped cluster configs are valid and safe by default, checked offline in a few seconds.

`ray up` configs (ray_cluster.yaml, clusters/gcp.yaml, clusters/onprem.yaml): Ray's own autoscaler schema; no
service bound to 0.0.0.0 (dashboard on 127.0.0.1, MLflow on the head's private address, with basic auth on a
PostgreSQL store on 127.0.0.1); token auth on every node; the head trains nothing (CPU 0, a `trial_driver`
resource); Ray started from the project's venv with UV_PROJECT_ENVIRONMENT exported, so `uv run` in a job's
working dir reuses it. The KubeRay manifest: KubeRay's own CRD schema (tests/schemas/kuberay), strictly
(unknown fields rejected, as `kubectl apply`'s strict field validation does), with a broken copy shown to fail;
no Service exposed outside the cluster; token auth from a Secret.
"""

import copy
import json
import re
import shlex
from pathlib import Path

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

ROOT = Path(__file__).resolve().parents[1]
RAY_UP_CONFIGS = ["ray_cluster.yaml", "clusters/gcp.yaml", "clusters/onprem.yaml"]
KUBERAY = ROOT / "clusters/kuberay.yaml"
KUBERAY_CRD = ROOT / "tests/schemas/kuberay/ray.io_rayclusters.yaml"  # KubeRay's own, vendored (README there)
COMMAND_KEYS = [
    "initialization_commands",
    "setup_commands",
    "head_setup_commands",
    "worker_setup_commands",
    "head_start_ray_commands",
    "worker_start_ray_commands",
]
EVERY_INTERFACE = {"0.0.0.0", "::", "[::]", "*"}
DRIVER_RESOURCE = "trial_driver"  # what the usage comments pass as scaling.driver_resources={trial_driver:1}
# Names whose value must never be written into a config (they travel as files or come from Secrets).
SECRET_NAMES = re.compile(r"TOKEN|PASSWORD|SECRET|ACCESS_KEY|CREDENTIAL", re.IGNORECASE)


def load(name):
    return yaml.safe_load((ROOT / name).read_text())


def commands(config):
    return [c for key in COMMAND_KEYS for c in config.get(key, [])]


def strings(node):
    """Every string in a parsed YAML tree, keys included (comments are not part of it)."""
    if isinstance(node, dict):
        for k, v in node.items():
            yield from strings(k)
            yield from strings(v)
    elif isinstance(node, list):
        for v in node:
            yield from strings(v)
    elif isinstance(node, str):
        yield node


def protect(command):
    """`command` with each `$(...)` swapped for a placeholder (restored by `words`), so splitting on blanks,
    `&&` or `;` leaves command substitutions whole."""
    out, subs, i = [], [], 0
    while i < len(command):
        if command.startswith("$(", i):
            depth, j = 0, i + 1
            while j < len(command):
                depth += {"(": 1, ")": -1}.get(command[j], 0)
                if depth == 0:
                    break
                j += 1
            subs.append(command[i : j + 1])
            out.append(f"__SUBST{len(subs) - 1}__")
            i = j + 1
        else:
            out.append(command[i])
            i += 1
    return "".join(out), subs


def words(command, subs=None):
    if subs is None:
        command, subs = protect(command)
    return [re.sub(r"__SUBST(\d+)__", lambda m: subs[int(m.group(1))], tok) for tok in shlex.split(command)]


def flag_values(tokens, *flags):
    """Values of `--flag=value` / `--flag value` in a token list."""
    found = []
    for i, tok in enumerate(tokens):
        for flag in flags:
            if tok == flag and i + 1 < len(tokens):
                found.append(tokens[i + 1])
            elif tok.startswith(flag + "="):
                found.append(tok.split("=", 1)[1])
    return found


def env_before(command, marker):
    """The variables a shell command exports (or sets inline) before the part that contains `marker`."""
    env = {}
    protected, subs = protect(command)
    for part in re.split(r"&&|\|\||;", protected):
        tokens = words(part, subs)
        if marker in " ".join(tokens):
            for tok in tokens:  # inline `VAR=value cmd ...`
                if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", tok, re.DOTALL):
                    break
                env.update([tok.split("=", 1)])
            return env
        if tokens[:1] == ["export"]:
            env.update(t.split("=", 1) for t in tokens[1:] if "=" in t)
    raise AssertionError(f"{marker!r} not in {command!r}")


def ray_starts(config):
    return [c for c in commands(config) if "ray start" in c]


def head_resources(config):
    """The head's Ray resources: its node type's, overridden by flags of its `ray start --head`."""
    node_types = config.get("available_node_types", {})
    resources = dict(node_types.get(config.get("head_node_type"), {}).get("resources", {}))
    for command in config["head_start_ray_commands"]:
        tokens = words(command)
        if "--head" not in tokens:
            continue
        for value in flag_values(tokens, "--num-cpus"):
            resources["CPU"] = float(value)
        for value in flag_values(tokens, "--resources"):
            resources.update(json.loads(value))
    return resources


def mlflow_server(config):
    (command,) = [c for c in config["head_start_ray_commands"] if "mlflow server" in c]
    return command


# --- `ray up` configs -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", RAY_UP_CONFIGS)
def test_ray_up_config_is_valid(name):
    config = load(name)
    validate_config(prepare_config(config))  # raises on schema violations
    assert all("uv run ray" in c for c in ray_starts(config) + [c for c in commands(config) if "ray stop" in c]), (
        "Ray must be started from the project's venv"
    )
    assert any("uv sync --locked" in c for c in config["setup_commands"])


def test_docker_images_match_locked_ray():
    import ray

    for name in ("ray_cluster.yaml", "clusters/gcp.yaml"):
        image = load(name)["docker"]["image"]
        assert image.startswith(f"rayproject/ray:{ray.__version__}-py311"), image


@pytest.mark.parametrize("name", RAY_UP_CONFIGS)
def test_nothing_listens_on_every_interface(name):
    config = load(name)
    everywhere = [s for s in strings(config) if "0.0.0.0" in s]
    assert not everywhere, f"{name}: 0.0.0.0 outside comments: {everywhere}"
    for command in commands(config):
        tokens = words(command)
        for flag in ("--dashboard-host", "--host", "-h", "--node-ip-address", "--ray-client-server-host"):
            bad = [v for v in flag_values(tokens, flag) if v in EVERY_INTERFACE]
            assert not bad, f"{name}: {flag} {bad[0]} in {command!r}"
    (head_start,) = [c for c in config["head_start_ray_commands"] if "--head" in words(c)]
    assert flag_values(words(head_start), "--dashboard-host") == ["127.0.0.1"], (
        "the dashboard accepts jobs: bind it to 127.0.0.1 (reach it with `ray dashboard`)"
    )
    hosts = flag_values(words(mlflow_server(config)), "--host", "-h")
    assert hosts == ["$(hostname -I | awk '{print $1}')"], f"MLflow binds the head's private address, got {hosts}"


@pytest.mark.parametrize("name", RAY_UP_CONFIGS)
def test_mlflow_server_has_basic_auth_and_postgresql_on_localhost(name):
    config, text = load(name), (ROOT / name).read_text()
    server = mlflow_server(config)
    tokens = words(server)
    assert flag_values(tokens, "--app-name") == ["basic-auth"]
    (store,) = flag_values(tokens, "--backend-store-uri")
    assert re.fullmatch(r"postgresql\+psycopg2://\w+@127\.0\.0\.1/mlflow", store), (
        store
    )  # password: ~/.pgpass, not here
    (artifacts,) = flag_values(tokens, "--artifacts-destination")
    assert re.fullmatch(r"(s3|gs)://YOUR-BUCKET/mlflow", artifacts), artifacts
    env = env_before(server, "mlflow server")
    assert env["MLFLOW_AUTH_CONFIG_PATH"].endswith("/basic_auth.ini")
    for var in ("MLFLOW_AUTH_ADMIN_USERNAME", "MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY"):
        assert env[var].startswith("$("), f"{var} must be read from a file at start, never written here"
    head_setup = " ".join(config["head_setup_commands"])
    assert "install -y -qq postgresql" in head_setup
    assert "listen_addresses = '127.0.0.1'" in head_setup, "PostgreSQL listens on 127.0.0.1 only"
    assert "docs/mlflow_load.md" in text, "say why PostgreSQL (the SQLite vs PostgreSQL benchmark)"
    assert "~/.mlflow/credentials" in config["file_mounts"], "every node's MLflow client needs the login"
    # docs/mlflow_load.md: MLflow's default pool of 15 failed a quarter of 200 writers' batches.
    workers = int(flag_values(tokens, "--workers")[0])
    assert int(env["MLFLOW_SQLALCHEMYSTORE_POOL_SIZE"]) >= 40 and int(env["MLFLOW_SQLALCHEMYSTORE_MAX_OVERFLOW"]) >= 40
    (connections,) = re.findall(r"max_connections = (\d+)", head_setup)
    assert int(connections) >= workers * 80, "PostgreSQL must take every worker's whole pool"


@pytest.mark.parametrize("name", RAY_UP_CONFIGS)
def test_token_auth_on_every_node_and_no_secret_in_the_config(name):
    config = load(name)
    starts = ray_starts(config)
    assert {("--head" in words(c)) for c in starts} == {True, False}, "a head and a worker start"
    for command in starts:
        assert env_before(command, "ray start").get("RAY_AUTH_MODE") == "token", command
    # The token travels as a file to Ray's default path; a token in a command would land in the autoscaler's logs.
    assert config["file_mounts"].get("~/.ray/auth_token") == "~/.ray/auth_token"
    assert "aws_credentials" not in config["provider"], "AWS credentials come from the standard chain"
    for command in commands(config):
        for tok in words(command):
            if "=" in tok and SECRET_NAMES.search(tok.split("=", 1)[0]):
                assert tok.split("=", 1)[1].startswith("$("), f"{name}: a secret's value in {command!r}"


@pytest.mark.parametrize("name", RAY_UP_CONFIGS)
def test_head_trains_nothing(name):
    config, text = load(name), (ROOT / name).read_text()
    resources = head_resources(config)
    assert resources.get("CPU") == 0, f"head resources {resources}: no CPU, so no trial or worker lands there"
    assert resources.get("GPU", 0) == 0
    assert resources.get(DRIVER_RESOURCE, 0) >= 1, f"head resources {resources}: trial drivers need {DRIVER_RESOURCE}"
    assert f"scaling.driver_cpus=0 'scaling.driver_resources={{{DRIVER_RESOURCE}:1}}'" in text, (
        "the usage comment places trial drivers on the head"
    )
    for node_type, spec in config.get("available_node_types", {}).items():
        if node_type != config["head_node_type"]:
            assert DRIVER_RESOURCE not in spec["resources"], f"{node_type}: drivers belong on the head"


@pytest.mark.parametrize("name", RAY_UP_CONFIGS)
def test_uv_project_environment_exported_before_ray_start(name):
    config = load(name)
    assert "~/ebm_scale" in config["file_mounts"]
    assert any(c.startswith("cd ~/ebm_scale &&") and "uv sync --locked" in c for c in config["setup_commands"])
    for command in ray_starts(config) + [mlflow_server(config)]:
        env = env_before(command, "ray start" if "ray start" in command else "mlflow server")
        assert env.get("UV_PROJECT_ENVIRONMENT") == "$HOME/ebm_scale/.venv", command  # the venv uv sync made
        assert env.get("UV_NO_SYNC") == "1", f"uv must not re-sync the shared venv from a job folder: {command}"


def test_env_parsing_sees_only_what_comes_before():
    command = "cd x && export A=1 B=$(cat f) && C=3 uv run ray start --head && export D=4"
    assert env_before(command, "ray start") == {"A": "1", "B": "$(cat f)", "C": "3"}
    with pytest.raises(AssertionError):
        env_before("uv run ray start --head", "mlflow server")


# --- KubeRay ----------------------------------------------------------------------------------------------------


def strict(schema):
    """The schema with unknown fields rejected wherever it lists properties (`kubectl apply` rejects them too)."""
    schema = copy.deepcopy(schema)

    def walk(node):
        if isinstance(node, dict):
            if (
                "properties" in node
                and "additionalProperties" not in node
                and not node.get("x-kubernetes-preserve-unknown-fields")
            ):
                node["additionalProperties"] = False
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(schema)
    return schema


@pytest.fixture(scope="module")
def crd():
    if not KUBERAY_CRD.exists():
        pytest.fail(f"KubeRay's CRD schema is missing: {KUBERAY_CRD}")
    return yaml.load(KUBERAY_CRD.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))  # 17k lines


@pytest.fixture(scope="module")
def manifest():
    (doc,) = [d for d in yaml.safe_load_all(KUBERAY.read_text()) if d]
    return doc


@pytest.fixture(scope="module")
def spec_validator(crd, manifest):
    group, version = manifest["apiVersion"].split("/")
    assert (group, manifest["kind"]) == (crd["spec"]["group"], crd["spec"]["names"]["kind"])
    (served,) = [v for v in crd["spec"]["versions"] if v["name"] == version and v.get("served")]
    schema = strict(served["schema"]["openAPIV3Schema"]["properties"]["spec"])
    jsonschema.Draft4Validator.check_schema(schema)
    return jsonschema.Draft4Validator(schema)


def test_kuberay_spec_validates_against_the_crd(spec_validator, manifest):
    import ray

    errors = [
        f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in spec_validator.iter_errors(manifest["spec"])
    ]
    assert not errors, errors
    assert manifest["spec"]["rayVersion"] == ray.__version__


@pytest.mark.parametrize(
    "path, value",
    [
        (["workerGroupSpecs", 0, "maxReplicas"], "8"),  # a string where the CRD wants an integer
        (["headGroupSpec", "rayStartParams", "num-cpus"], 0),  # rayStartParams values are strings
        (["authOptions", "mode"], "on"),  # not in the enum
        (["headGroupSpec", "serviceTyp"], "ClusterIP"),  # a typo: an unknown field
        (["headGroupSpec", "template", "spec", "containers", 0, "env", 0], {"value": "token"}),  # env needs a name
    ],
)
def test_a_broken_kuberay_spec_fails_validation(spec_validator, manifest, path, value):
    broken = copy.deepcopy(manifest["spec"])
    node = broken
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    assert not spec_validator.is_valid(broken), f"the validator let {path} = {value!r} through"


def ray_containers(spec):
    pods = [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec.get("workerGroupSpecs", [])]
    return [pod["spec"]["containers"][0] for pod in pods]  # KubeRay runs Ray in each pod's first container


def test_kuberay_exposes_no_service_outside_the_cluster(manifest):
    head = manifest["spec"]["headGroupSpec"]
    assert head.get("serviceType") == "ClusterIP"
    assert head.get("headService", {}).get("spec", {}).get("type", "ClusterIP") == "ClusterIP"
    assert not head.get("enableIngress", False)
    for doc in yaml.safe_load_all(KUBERAY.read_text()):
        if doc and doc.get("kind") == "Service":
            assert doc.get("spec", {}).get("type", "ClusterIP") == "ClusterIP", doc["metadata"]["name"]
    # 0.0.0.0 only for the dashboard, which listens on the pod network behind that Service, with token auth on.
    everywhere = [s for s in strings(manifest) if "0.0.0.0" in s]
    assert everywhere == [head["rayStartParams"]["dashboard-host"]] == ["0.0.0.0"], everywhere
    assert "kubectl port-forward svc/ebm-scale-head-svc 8265:8265" in KUBERAY.read_text()


def test_kuberay_token_auth_from_a_secret(manifest):
    spec = manifest["spec"]
    assert spec["authOptions"]["mode"] == "token" and spec["authOptions"]["secretName"]
    autoscaler = {"name": "autoscaler", **spec["autoscalerOptions"]}
    for container in ray_containers(spec) + [autoscaler]:
        env = {e["name"]: e for e in container.get("env", [])}
        assert env["RAY_AUTH_MODE"]["value"] == "token", container["name"]
        ref = env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]
        assert (ref["name"], ref["key"]) == (spec["authOptions"]["secretName"], "auth_token")
        for name, var in env.items():
            if SECRET_NAMES.search(name) and name != "RAY_AUTH_MODE":
                assert "value" not in var and "secretKeyRef" in var.get("valueFrom", {}), f"{name}: a literal"
    for container in ray_containers(spec):
        env = {e["name"]: e.get("value") for e in container["env"]}
        assert (env["UV_PROJECT_ENVIRONMENT"], env["UV_NO_SYNC"]) == ("/ebm_scale/.venv", "1"), container["name"]


def test_kuberay_head_trains_nothing(manifest):
    params = manifest["spec"]["headGroupSpec"]["rayStartParams"]
    assert params["num-cpus"] == "0"
    resources = json.loads(json.loads(params["resources"]))  # KubeRay's quoting: a JSON string holding JSON
    assert resources.get(DRIVER_RESOURCE, 0) >= 1
    for group in manifest["spec"]["workerGroupSpecs"]:
        assert DRIVER_RESOURCE not in group.get("rayStartParams", {}).get("resources", "")
