"""infra/: every manifest against its published schema, every `xsam` command it runs against this CLI,
and the security defaults, without a cluster, Docker or the network (a few seconds).

- Schemas (infra/schemas, SOURCES.md says what each is): each kustomize overlay is rendered
  (`kubectl kustomize`; where kubectl is missing, by `KustomizeSubset` below, which implements only what
  these overlays use and is checked against kubectl wherever both exist) and every rendered object is
  validated: RayCluster/RayJob against the KubeRay v1.7.0 CRD's openAPIV3Schema, Secret/ConfigMap/
  ServiceAccount against the Kubernetes JSON schemas. Objects are closed as the API server closes them: a
  field the structural schema does not declare is an error here (kubectl's strict field validation refuses
  it; the API server would silently drop it). infra/ray-cluster.yaml is checked against the installed Ray's
  ray-schema.json, compose.yaml against the compose specification (plus `docker compose config -q` where
  that tool works), the Argo template against Argo's schema. Each check is shown to fail on a broken copy.
- Commands: every `xsam ...` command line a manifest runs (container command/args, the RayJob entrypoint,
  `ray up` setup/start commands, compose commands, Dockerfile RUN/CMD, Argo steps) is a command of this
  CLI: `xsam SUB --help` exits 0, and the whole line with `--help` appended parses (every option exists).
- Security: Ray token auth on (RAY_AUTH_MODE=token, the token from a secretKeyRef, KubeRay's authOptions),
  the Ray head and dashboard on no public address (ClusterIP, no Ingress/LoadBalancer/NodePort; `ray up`'s
  dashboard on 127.0.0.1), MLflow behind basic auth with credentials from secrets / the git-ignored .env,
  no literal credential in any file, S3 policies limited to named bucket ARNs.
"""

from __future__ import annotations

import base64
import copy
import fnmatch
import functools
import hashlib
import json
import re
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Any, Iterator

import jsonschema
import pytest
import yaml
from conftest import REPO, invoke_cli

INFRA = REPO / "infra"
SCHEMAS = INFRA / "schemas"
K8S = INFRA / "k8s"
OVERLAYS = ("dev", "prod")
RAYJOB = K8S / "jobs" / "paper-rayjob.yaml"
RAY_UP = INFRA / "ray-cluster.yaml"
COMPOSE = INFRA / "compose" / "compose.yaml"
DOCKERFILE = INFRA / "compose" / "Dockerfile"
ARGO = INFRA / "argo" / "xsam-paper-workflowtemplate.yaml"
POLICIES = INFRA / "policies"
DEPLOY_DOC = REPO / "docs" / "deploy.md"
PAPER = REPO / "pipelines" / "paper.yaml"
BUCKETS = {"xsam-data", "xsam-mlflow"}
KUBECTL = shutil.which("kubectl")
# names of variables / keys that hold credentials
# (an access key *id* or a user name identifies; the secret key, password or token is the credential)
CREDENTIAL = re.compile(r"PASSWORD|SECRET|TOKEN|ACCESS_KEY(?!_ID)|PRIVATE_KEY|CREDENTIAL|auth_token")
PLACEHOLDER = "change-me"


def _yaml_docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


# ----------------------------------------------------------------------------------------- schemas


def _closed(schema: Any) -> Any:
    """`schema` with every object that lists its properties closed to others (additionalProperties:
    false), unless it says x-kubernetes-preserve-unknown-fields: what Kubernetes does with a structural
    schema (unknown fields are refused by strict field validation, or pruned)."""
    if isinstance(schema, list):
        return [_closed(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out: dict[str, Any] = {}
    for key, value in schema.items():
        if key in ("properties", "patternProperties", "definitions", "$defs") and isinstance(value, dict):
            out[key] = {name: _closed(sub) for name, sub in value.items()}
        elif key in ("items", "additionalProperties", "not", "if", "then", "else") and isinstance(value, (dict, list)):
            out[key] = _closed(value)
        elif key in ("allOf", "anyOf", "oneOf", "prefixItems"):
            out[key] = [_closed(sub) for sub in value]
        else:
            out[key] = value
    if ("properties" in out and "additionalProperties" not in out and "patternProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    return out


def _load_schema(relative: str) -> dict:
    return json.loads((SCHEMAS / relative).read_text())


ARGO_KIND = "io.argoproj.workflow.v1alpha1.WorkflowTemplate"
# (apiVersion, kind) -> how to build its validator
KINDS = {
    ("ray.io/v1", "RayCluster"): "kuberay/ray.io_rayclusters.v1.json",
    ("ray.io/v1", "RayJob"): "kuberay/ray.io_rayjobs.v1.json",
    ("v1", "Secret"): "kubernetes/secret-v1.json",
    ("v1", "ConfigMap"): "kubernetes/configmap-v1.json",
    ("v1", "ServiceAccount"): "kubernetes/serviceaccount-v1.json",
}


@functools.cache
def _validator(api_version: str, kind: str) -> jsonschema.protocols.Validator:
    if (api_version, kind) == ("argoproj.io/v1alpha1", "WorkflowTemplate"):
        whole = _load_schema("argo-workflows/schema.json")
        schema = _closed({"$schema": whole["$schema"], "definitions": whole["definitions"],
                          "$ref": f"#/definitions/{ARGO_KIND}"})
        return jsonschema.Draft202012Validator(schema)
    if (api_version, kind) not in KINDS:
        raise AssertionError(f"{api_version} {kind}: no vendored schema in infra/schemas validates this kind; add "
                             "its published schema there (and to SOURCES.md) or keep the kind out of infra/")
    return jsonschema.Draft7Validator(_closed(_load_schema(KINDS[(api_version, kind)])))


def _schema_errors(doc: dict, where: str) -> list[str]:
    validator = _validator(doc.get("apiVersion", "?"), doc.get("kind", "?"))
    return [f"{where} ({doc.get('kind')} {doc.get('metadata', {}).get('name') or ''}): {err.json_path}: "
            f"{err.message[:300]}" for err in validator.iter_errors(doc)]


@functools.cache
def _compose_validator() -> jsonschema.protocols.Validator:
    return jsonschema.Draft7Validator(_load_schema("compose-spec/compose-spec.json"))


@functools.cache
def _ray_up_validator() -> jsonschema.protocols.Validator:
    import ray.autoscaler

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    return jsonschema.Draft7Validator(schema)


def test_vendored_schemas_are_the_ones_sources_md_names():
    sources = (SCHEMAS / "SOURCES.md").read_text()
    listed = dict(re.findall(r"^\| `([^`]+\.json)` \| `([0-9a-f]{64})` \|$", sources, re.M))
    files = {p.relative_to(SCHEMAS).as_posix() for p in SCHEMAS.rglob("*.json")}
    assert set(listed) == files, f"infra/schemas and the table of SOURCES.md differ: {sorted(set(listed) ^ files)}"
    for name, digest in listed.items():
        assert hashlib.sha256((SCHEMAS / name).read_bytes()).hexdigest() == digest, (
            f"infra/schemas/{name} is not the file SOURCES.md records (sha256 differs): re-vendor it or update "
            "SOURCES.md with its source")
    assert len(re.findall(r"\b[0-9a-f]{40}\b", sources)) >= 4, "SOURCES.md must name the upstream commit of each source"
    assert (SCHEMAS / "LICENSE-Apache-2.0.txt").read_text().lstrip().startswith("Apache License")


# ----------------------------------------------------------------------------------------- kustomize


class Unsupported(Exception):
    pass


class KustomizeSubset:
    """The part of kustomize these overlays use, for machines without kubectl: resources (files and
    folders), namespace, images, configMapGenerator / secretGenerator (literals, env files; name hashes
    off), and JSON 6902 patches (add, replace, remove, test). Anything else is refused, naming the fix."""

    KEYS = {"apiVersion", "kind", "resources", "namespace", "images", "configMapGenerator", "secretGenerator",
            "generatorOptions", "patches"}

    def build(self, folder: Path) -> list[dict]:
        spec = yaml.safe_load((folder / "kustomization.yaml").read_text())
        self._refuse(set(spec) - self.KEYS, folder)
        objects: list[dict] = []
        for entry in spec.get("resources", []):
            path = folder / entry
            objects += self.build(path) if path.is_dir() else _yaml_docs(path)
        generators = spec.get("configMapGenerator", []) + spec.get("secretGenerator", [])
        if generators and spec.get("generatorOptions") != {"disableNameSuffixHash": True}:
            self._refuse({"generatorOptions other than disableNameSuffixHash: true"}, folder)
        for gen in spec.get("configMapGenerator", []):
            objects.append({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": gen["name"]},
                            "data": self._pairs(gen, folder)})
        for gen in spec.get("secretGenerator", []):
            data = {k: base64.b64encode(v.encode()).decode() for k, v in self._pairs(gen, folder).items()}
            objects.append({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": gen["name"]},
                            "type": gen.get("type", "Opaque"), "data": data})
        for patch in spec.get("patches", []):
            self._refuse(set(patch) - {"path", "patch", "target"}, folder)
            ops = yaml.safe_load(patch["patch"] if "patch" in patch else (folder / patch["path"]).read_text())
            if not isinstance(ops, list):
                self._refuse({"strategic-merge patches"}, folder)
            targets = [o for o in objects if self._matches(o, patch.get("target", {}))]
            if not targets:
                raise AssertionError(f"{folder}: patch {patch} matches no object")
            for target in targets:
                for op in ops:
                    _json_patch(target, op)
        for image in spec.get("images", []):
            self._refuse(set(image) - {"name", "newName", "newTag"}, folder)
            for obj in objects:
                _retag(obj, image)
        if "namespace" in spec:
            for obj in objects:
                obj.setdefault("metadata", {})["namespace"] = spec["namespace"]
        return objects

    @staticmethod
    def _refuse(what: set, folder: Path) -> None:
        if what:
            raise Unsupported(f"{folder}/kustomization.yaml uses {sorted(what)}, which the kubectl-less renderer "
                              "of tests/infra/test_manifests.py does not implement: install kubectl (it bundles "
                              "kustomize)")

    def _pairs(self, gen: dict, folder: Path) -> dict[str, str]:
        self._refuse(set(gen) - {"name", "literals", "envs", "type"}, folder)
        pairs = dict(item.split("=", 1) for item in gen.get("literals", []))
        for env in gen.get("envs", []):
            for line in (folder / env).read_text().splitlines():
                line = line.strip()
                if line and not line.startswith("#"):
                    key, _, value = line.partition("=")
                    pairs[key.strip()] = value
        return pairs

    @staticmethod
    def _matches(obj: dict, target: dict) -> bool:
        group, _, version = obj.get("apiVersion", "").rpartition("/")
        return all((key == "kind" and obj.get("kind") == value) or (key == "name" and obj["metadata"]["name"] == value)
                   or (key == "group" and group == value) or (key == "version" and version == value)
                   for key, value in target.items())


def _pointer(path: str) -> list[str]:
    return [p.replace("~1", "/").replace("~0", "~") for p in path.split("/")[1:]]


def _json_patch(doc: Any, op: dict) -> None:
    *parents, last = _pointer(op["path"])
    node = doc
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node[part]
    kind = op["op"]
    if isinstance(node, list):
        index = len(node) if last == "-" else int(last)
        if kind == "add":
            node.insert(index, copy.deepcopy(op["value"]))
        elif kind == "replace":
            node[index] = copy.deepcopy(op["value"])
        elif kind == "remove":
            del node[index]
        elif kind == "test":
            assert node[index] == op["value"], f"JSON patch test failed at {op['path']}"
        else:
            raise Unsupported(f"JSON patch op {kind!r}: install kubectl")
    else:
        if kind == "add":
            node[last] = copy.deepcopy(op["value"])
        elif kind == "replace":
            assert last in node, f"JSON patch replace: {op['path']} does not exist"
            node[last] = copy.deepcopy(op["value"])
        elif kind == "remove":
            del node[last]
        elif kind == "test":
            assert node.get(last) == op["value"], f"JSON patch test failed at {op['path']}"
        else:
            raise Unsupported(f"JSON patch op {kind!r}: install kubectl")


def _retag(node: Any, image: dict) -> None:
    if isinstance(node, list):
        for item in node:
            _retag(item, image)
        return
    if not isinstance(node, dict):
        return
    for key, value in node.items():
        if key in ("containers", "initContainers") and isinstance(value, list):
            for container in value:
                ref = container.get("image", "")
                name, tag = (ref.rsplit(":", 1) if ":" in ref.rsplit("/", 1)[-1] else (ref, None))
                if name == image["name"]:
                    tag = image.get("newTag", tag)
                    container["image"] = image.get("newName", name) + (f":{tag}" if tag else "")
        _retag(value, image)


def _stage(tmp: Path) -> Path:
    """infra/k8s copied with every secret env file made from its committed .example, never from a real
    *.env of this checkout (the copy leaves those out)."""
    staged = tmp / "k8s"
    shutil.copytree(K8S, staged, ignore=shutil.ignore_patterns("*.env"))
    for example in staged.rglob("*.env.example"):
        shutil.copyfile(example, example.with_suffix(""))
    return staged


def _kubectl_render(folder: Path) -> list[dict]:
    proc = subprocess.run([KUBECTL, "kustomize", str(folder)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, f"kubectl kustomize {folder} failed:\n{proc.stderr}"
    return [d for d in yaml.safe_load_all(proc.stdout) if d is not None]


@pytest.fixture(scope="module")
def staged(tmp_path_factory) -> Path:
    return _stage(tmp_path_factory.mktemp("k8s"))


@pytest.fixture(scope="module")
def rendered(staged) -> dict[str, list[dict]]:
    """overlay -> its objects, as `kubectl kustomize` renders them (KustomizeSubset without kubectl)."""
    out = {}
    for overlay in OVERLAYS:
        folder = staged / "overlays" / overlay
        try:
            out[overlay] = _kubectl_render(folder) if KUBECTL else KustomizeSubset().build(folder)
        except Unsupported as exc:
            pytest.fail(str(exc))
    return out


def _by_key(objects: list[dict]) -> dict[tuple, dict]:
    return {(o["apiVersion"], o["kind"], o["metadata"].get("namespace"), o["metadata"]["name"]): o for o in objects}


def _one(objects: list[dict], kind: str) -> dict:
    found = [o for o in objects if o["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders_and_every_object_matches_its_schema(rendered, overlay):
    objects = rendered[overlay]
    kinds = sorted(o["kind"] for o in objects)
    secrets = 3 if overlay == "dev" else 2  # xsam-ray-auth, xsam-mlflow (+ xsam-s3 in dev)
    assert kinds == sorted(["RayCluster", "ServiceAccount", "ConfigMap"] + ["Secret"] * secrets), kinds
    errors = [e for o in objects for e in _schema_errors(o, f"overlays/{overlay}")]
    assert not errors, "\n".join(errors)
    expected_namespace = {"dev": "xsam-dev", "prod": "xsam"}[overlay]
    assert {o["metadata"].get("namespace") for o in objects} == {expected_namespace}


def test_base_and_rayjob_match_their_schemas():
    """The files as written (what the overlays start from, and the RayJob, which no overlay renders)."""
    errors = []
    for path in sorted((K8S / "base").glob("*.yaml")) + [RAYJOB]:
        if path.name == "kustomization.yaml":
            continue
        for doc in _yaml_docs(path):
            errors += _schema_errors(doc, path.relative_to(REPO).as_posix())
    assert not errors, "\n".join(errors)


def test_schema_checks_fail_on_broken_manifests(rendered):
    """The checks above can fail: a misspelt field, a wrong type, an unknown kind are each reported."""
    cluster = copy.deepcopy(_one(rendered["dev"], "RayCluster"))
    cluster["spec"]["headGroupSpec"]["serviceTyp"] = "ClusterIP"
    cluster["spec"]["workerGroupSpecs"][0]["maxReplicas"] = "two"
    errors = _schema_errors(cluster, "broken")
    assert any("serviceTyp" in e for e in errors) and any("maxReplicas" in e for e in errors), errors
    job = _yaml_docs(RAYJOB)[0]
    job["spec"]["entrypoint"] = ["xsam", "pipeline"]
    assert _schema_errors(job, "broken")
    secret = copy.deepcopy(_one(rendered["dev"], "ConfigMap"))
    secret["stringdata"] = {}
    assert _schema_errors(secret, "broken")
    with pytest.raises(AssertionError, match="no vendored schema"):
        _schema_errors({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "x"}}, "broken")


def test_kubectl_less_renderer_agrees_with_kubectl(staged):
    """KustomizeSubset is what renders the overlays where kubectl is missing: it must give what kubectl gives."""
    if not KUBECTL:
        pytest.skip("kubectl is not installed: the overlays were rendered by KustomizeSubset, which this test "
                    "compares with kubectl where kubectl exists (install kubectl to run it)")
    for folder in [staged / "base"] + [staged / "overlays" / o for o in OVERLAYS]:
        ours, theirs = _by_key(KustomizeSubset().build(folder)), _by_key(_kubectl_render(folder))
        assert ours.keys() == theirs.keys(), folder
        for key in theirs:
            assert ours[key] == theirs[key], f"{folder}: {key} differs between KustomizeSubset and kubectl"


# ----------------------------------------------------------------------------------------- other manifests


def test_ray_up_config_matches_the_installed_ray_schema():
    config = yaml.safe_load(RAY_UP.read_text())
    errors = [f"{e.json_path}: {e.message[:300]}" for e in _ray_up_validator().iter_errors(config)]
    assert not errors, "\n".join(errors)
    # what `ray up` itself does with it before any cloud call: fill Ray's defaults, validate again
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(copy.deepcopy(config)))
    broken = copy.deepcopy(config)
    broken["docker"]["run_option"] = []
    broken["max_workers"] = "ten"
    assert len(list(_ray_up_validator().iter_errors(broken))) >= 2


def test_compose_file_matches_the_compose_specification():
    doc = yaml.safe_load(COMPOSE.read_text())
    errors = [f"{e.json_path}: {e.message[:300]}" for e in _compose_validator().iter_errors(doc)]
    assert not errors, "\n".join(errors)
    broken = copy.deepcopy(doc)
    broken["services"]["mlflow"]["port"] = ["5000:5000"]
    assert list(_compose_validator().iter_errors(broken))
    # the tool itself, where it works (not on the CI machines, which have no Docker)
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0:
        proc = subprocess.run([docker, "compose", "--env-file", str(COMPOSE.parent / ".env.example"),
                               "-f", str(COMPOSE), "--profile", "tools", "config", "-q"],
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr


def test_argo_template_matches_the_argo_schema():
    doc = _yaml_docs(ARGO)[0]
    errors = _schema_errors(doc, "argo")
    assert not errors, "\n".join(errors)
    whole = jsonschema.Draft202012Validator(_load_schema("argo-workflows/schema.json"))
    assert not list(whole.iter_errors(doc)), "not valid against the whole Argo schema (oneOf its kinds)"
    broken = copy.deepcopy(doc)
    broken["spec"]["templates"][0]["dag"]["tasks"][0]["dependz"] = "x"
    assert any("dependz" in e for e in _schema_errors(broken, "broken"))


# ----------------------------------------------------------------------------------------- commands


def _script_commands(script: str) -> list[list[str]]:
    """The `xsam ...` simple commands of a shell script (separators ; && || | & ( ) and newlines;
    redirections dropped; leading VAR=value assignments and exec/env skipped)."""
    found = []
    for line in script.replace("\\\n", " ").splitlines():
        lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        lexer.commenters = "#"
        words: list[str] = []
        tokens = list(lexer) + [";"]
        skip_next = False
        for token in tokens:
            if skip_next:
                skip_next = False
                continue
            if token and set(token) <= set("<>&") and set(token) & set("<>"):  # > >> < >& &> and their target
                if words and words[-1].isdigit():
                    words.pop()
                skip_next = True
                continue
            if token and set(token) <= set(";&|()"):
                while words and (re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", words[0]) or words[0] in ("exec", "env")):
                    words.pop(0)
                if words and Path(words[0]).name == "xsam":
                    found.append(words)
                words = []
                continue
            words.append(token)
    return found


def _argv_commands(argv: list[str]) -> list[list[str]]:
    if not argv:
        return []
    head = Path(argv[0]).name
    if head == "xsam":
        return [list(argv)]
    if head in ("sh", "bash") and len(argv) >= 3 and re.fullmatch(r"-[a-z]*c[a-z]*", argv[1]):
        return _script_commands(argv[2])
    return []


def _k8s_commands(node: Any) -> list[list[str]]:
    """Commands of every container (pods, pod templates, Argo templates) and RayJob entrypoint in `node`."""
    found: list[list[str]] = []
    if isinstance(node, list):
        for item in node:
            found += _k8s_commands(item)
    elif isinstance(node, dict):
        for key, value in node.items():
            if key in ("containers", "initContainers", "sidecars") and isinstance(value, list):
                for c in value:
                    found += _argv_commands(list(c.get("command") or []) + list(c.get("args") or []))
            elif key == "container" and isinstance(value, dict):
                found += _argv_commands(list(value.get("command") or []) + list(value.get("args") or []))
            elif key == "script" and isinstance(value, dict):
                found += _script_commands(value.get("source", ""))
            elif key == "entrypoint" and isinstance(value, str) and ("clusterSelector" in node
                                                                     or "rayClusterSpec" in node):
                found += _script_commands(value)  # a RayJob's (Argo's spec.entrypoint names a template)
            found += _k8s_commands(value)
    return found


def _compose_commands(doc: dict) -> list[list[str]]:
    found = []
    for service in doc["services"].values():
        def argv(value: Any) -> list[str]:
            return shlex.split(value) if isinstance(value, str) else list(value or [])
        found += _argv_commands(argv(service.get("entrypoint")) + argv(service.get("command")))
        test = (service.get("healthcheck") or {}).get("test")
        if isinstance(test, list) and test and test[0] == "CMD":
            found += _argv_commands(test[1:])
        elif isinstance(test, list) and test and test[0] == "CMD-SHELL":
            found += _script_commands(test[1])
    return found


def _dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", path.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            instruction, _, rest = line.partition(" ")
            out.append((instruction.upper(), rest.strip()))
    return out


def _dockerfile_commands(path: Path) -> list[list[str]]:
    found = []
    for instruction, rest in _dockerfile_instructions(path):
        if instruction == "RUN":
            found += _script_commands(rest)
        elif instruction in ("CMD", "ENTRYPOINT"):
            found += _argv_commands(json.loads(rest)) if rest.startswith("[") else _script_commands(rest)
    return found


def _ray_up_commands(config: dict) -> list[list[str]]:
    keys = ("initialization_commands", "setup_commands", "head_setup_commands", "worker_setup_commands",
            "head_start_ray_commands", "worker_start_ray_commands")
    scripts = [s for k in keys for s in config.get(k) or []]
    for node_type in config.get("available_node_types", {}).values():
        scripts += [s for k in keys for s in node_type.get(k) or []]
    return [c for s in scripts for c in _script_commands(s)]


def _collect_commands() -> list[tuple[str, list[str]]]:
    out = []
    for path in sorted((K8S / "base").glob("*.yaml")) + [RAYJOB, ARGO]:
        out += [(path.relative_to(INFRA).as_posix(), c) for d in _yaml_docs(path) for c in _k8s_commands(d)]
    out += [("ray-cluster.yaml", c) for c in _ray_up_commands(yaml.safe_load(RAY_UP.read_text()))]
    out += [("compose/compose.yaml", c) for c in _compose_commands(yaml.safe_load(COMPOSE.read_text()))]
    out += [("compose/Dockerfile", c) for c in _dockerfile_commands(DOCKERFILE)]
    return out


COMMANDS = _collect_commands()


@functools.cache
def _cli_root():
    import typer.main

    from pipelines.cli import app

    return typer.main.get_command(app)


def _command_path(words: list[str]) -> list[str]:
    """The leading words of `words` that name (sub-)commands of this CLI (typer's groups have `commands`)."""
    command, path = _cli_root(), []
    for word in words:
        if isinstance(getattr(command, "commands", None), dict) and word in command.commands:
            command = command.commands[word]
            path.append(word)
        else:
            break
    return path


def _cli_problems(argv: list[str]) -> list[str]:
    words = argv[1:]
    if not words or words[0].startswith("-"):  # `xsam --help`
        proc = invoke_cli(*words, "--help", check=False)
        return [] if proc.returncode == 0 else [f"`{shlex.join(argv)} --help` exited {proc.returncode}"]
    path = _command_path(words)
    if not path:
        return [f"`xsam {words[0] if words else ''}` is not a command of this CLI (xsam --help lists them)"]
    problems = []
    proc = invoke_cli(*path, "--help", check=False)
    if proc.returncode != 0:
        problems.append(f"`xsam {' '.join(path)} --help` exited {proc.returncode}: {proc.stdout[-500:]}")
    proc = invoke_cli(*words, "--help", check=False)
    if proc.returncode != 0:
        problems.append(f"`{shlex.join(argv)} --help` exited {proc.returncode} (an option it passes does not exist?): "
                        f"{proc.stdout[-800:]}")
    return problems


def test_manifests_run_xsam_where_they_should():
    sources = {source for source, _ in COMMANDS}
    assert {"k8s/jobs/paper-rayjob.yaml", "argo/xsam-paper-workflowtemplate.yaml", "ray-cluster.yaml",
            "compose/compose.yaml", "compose/Dockerfile"} <= sources, sources
    job = _yaml_docs(RAYJOB)[0]
    assert job["spec"]["entrypoint"] == "xsam pipeline run pipelines/paper.yaml"
    argo = [" ".join(c) for s, c in COMMANDS if s.startswith("argo/")]
    assert ("xsam pipeline run {{workflow.parameters.workflow}} --only {{inputs.parameters.step}} "
            "--address {{workflow.parameters.ray-address}}") in argo, argo


def test_command_extraction_finds_what_a_shell_runs():
    script = ("set -a && . ~/x.env && FOO=1 xsam data lint s3://b/d --verify full > /dev/null 2>&1; "
              "echo ok | xsam runs compare")
    assert _script_commands(script) == [["xsam", "data", "lint", "s3://b/d", "--verify", "full"],
                                        ["xsam", "runs", "compare"]]
    assert _argv_commands(["/bin/sh", "-ec", "exec xsam train r.yaml"]) == [["xsam", "train", "r.yaml"]]
    assert _cli_problems(["xsam", "no-such-command"]) and _cli_problems(["xsam", "data", "lint", "d", "--no-such-flag"])


@pytest.mark.parametrize("source,argv", COMMANDS, ids=[f"{s}: {shlex.join(c)}"[:150] for s, c in COMMANDS])
def test_every_xsam_command_a_manifest_runs_exists(source, argv):
    problems = _cli_problems(argv)
    assert not problems, f"{source}:\n" + "\n".join(problems)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_rendered_overlays_run_no_other_commands(rendered, overlay):
    checked = {tuple(c) for _, c in COMMANDS}
    extra = [c for o in rendered[overlay] for c in _k8s_commands(o) if tuple(c) not in checked]
    problems = [p for c in extra for p in _cli_problems(c)]
    assert not problems, "\n".join(problems)


# ----------------------------------------------------------------------------------------- the workflow


def _argo_tasks(doc: dict) -> tuple[dict[str, list[str]], dict[str, set[str]]]:
    """task -> the workflow steps it runs (`--only`), task -> the tasks it depends on."""
    params = {p["name"]: p.get("value") for p in doc["spec"]["arguments"]["parameters"]}
    templates = {t["name"]: t for t in doc["spec"]["templates"]}
    dag = templates[doc["spec"]["entrypoint"]]["dag"]["tasks"]
    steps, depends = {}, {}
    for task in dag:
        depends[task["name"]] = set(re.findall(r"[A-Za-z0-9-]+", re.sub(r"\.\w+", "", task.get("depends", ""))))
        args = (templates[task["template"]].get("container") or {}).get("args") or []
        if "--only" not in args:
            continue
        value = {p["name"]: p["value"] for p in task["arguments"]["parameters"]}["step"]
        if "withParam" in task:
            items = json.loads(re.sub(r"\{\{workflow\.parameters\.([\w-]+)\}\}", lambda m: params[m.group(1)],
                                      task["withParam"]))
            steps[task["name"]] = [value.replace("{{item}}", item) for item in items]
        else:
            steps[task["name"]] = [value]
    return steps, depends


def _ancestors(depends: dict[str, set[str]], task: str) -> set[str]:
    seen: set[str] = set()
    todo = list(depends[task])
    while todo:
        t = todo.pop()
        if t not in seen:
            seen.add(t)
            todo += depends[t]
    return seen


def _dag_problems(doc: dict, workflow: Any) -> list[str]:
    """Where the Argo DAG does not run exactly the workflow's steps, each after the steps it needs."""
    from pipelines.workflow import dependencies

    steps, depends = _argo_tasks(doc)
    task_of: dict[str, str] = {}
    problems = []
    for task, names in steps.items():
        for name in names:
            if name in task_of:
                problems.append(f"step {name} is run by two Argo tasks: {task_of[name]} and {task}")
            task_of[name] = task
    if set(task_of) != set(workflow.steps):
        problems.append(f"Argo tasks run steps the workflow lacks: {sorted(set(task_of) - set(workflow.steps))}; "
                        f"workflow steps no Argo task runs: {sorted(set(workflow.steps) - set(task_of))} "
                        "(edit the DAG or its convert-steps parameter)")
    for name in workflow.steps:
        for need in dependencies(workflow, name):
            if name not in task_of or need not in task_of:
                continue
            if task_of[need] == task_of[name]:
                problems.append(f"{name} needs {need}, but one Argo task runs both in parallel")
            elif task_of[need] not in _ancestors(depends, task_of[name]):
                problems.append(f"{name} needs {need}: Argo task {task_of[name]} must come after {task_of[need]}")
    return problems


def _with_convert_steps(doc: dict, names: list[str]) -> dict:
    doc = copy.deepcopy(doc)
    for param in doc["spec"]["arguments"]["parameters"]:
        if param["name"] == "convert-steps":
            param["value"] = json.dumps(names)
    return doc


def test_argo_dag_check_on_the_quickstart_workflow():
    """The DAG check below, on the workflow that exists today: the same DAG fits pipelines/quickstart.yaml
    once convert-steps lists its conversions, and misplaced or missing steps are reported."""
    from pipelines.workflow import load_workflow

    workflow = load_workflow(REPO / "pipelines" / "quickstart.yaml")
    converts = [name for name in workflow.steps if name.startswith("convert-")]
    doc = _with_convert_steps(_yaml_docs(ARGO)[0], converts)
    assert not _dag_problems(doc, workflow), _dag_problems(doc, workflow)
    assert _dag_problems(_with_convert_steps(doc, converts[1:]), workflow)
    early = copy.deepcopy(doc)
    next(t for t in early["spec"]["templates"][0]["dag"]["tasks"] if t["name"] == "stage2")["depends"] = "lint"
    assert any("stage2 needs stage1" in p for p in _dag_problems(early, workflow)), _dag_problems(early, workflow)


def test_argo_tasks_are_the_steps_of_the_paper_workflow():
    """Every step of pipelines/paper.yaml is run by exactly one Argo task, after the tasks of the steps it
    needs; the template names no step the workflow lacks."""
    doc = _yaml_docs(ARGO)[0]
    params = {p["name"]: p.get("value") for p in doc["spec"]["arguments"]["parameters"]}
    assert params["workflow"] == "pipelines/paper.yaml"
    if not PAPER.exists():
        pytest.fail("pipelines/paper.yaml does not exist (yet): the Argo template and the RayJob run it")
    from pipelines.workflow import load_workflow

    problems = _dag_problems(doc, load_workflow(PAPER))
    assert not problems, "\n".join(problems)


def test_rayjob_runs_the_paper_workflow_of_the_image():
    job = _yaml_docs(RAYJOB)[0]["spec"]
    cluster = _yaml_docs(K8S / "base" / "raycluster.yaml")[0]
    assert job["clusterSelector"] == {"ray.io/cluster": cluster["metadata"]["name"]}
    assert job["submissionMode"] == "K8sJobMode"
    working_dir = yaml.safe_load(job["runtimeEnvYAML"])["working_dir"]
    workdirs = {c["workingDir"] for group in [cluster["spec"]["headGroupSpec"], *cluster["spec"]["workerGroupSpecs"]]
                for c in group["template"]["spec"]["containers"]}
    dockerfile_workdirs = {rest for instruction, rest in _dockerfile_instructions(DOCKERFILE)
                           if instruction == "WORKDIR"}
    assert workdirs == {working_dir} and dockerfile_workdirs == {working_dir}
    # no settings travel with the job: it gets the cluster's environment (secrets, config map)
    assert yaml.safe_load(job["runtimeEnvYAML"]) == {"working_dir": working_dir}
    assert "submitterPodTemplate" not in job and "rayClusterSpec" not in job
    if not PAPER.exists():
        pytest.fail("pipelines/paper.yaml does not exist (yet): the RayJob's entrypoint runs it")
    from pipelines.workflow import load_workflow

    load_workflow(PAPER)


# ----------------------------------------------------------------------------------------- security


def _containers(node: Any, where: str = "") -> Iterator[tuple[str, dict]]:
    if isinstance(node, list):
        for i, item in enumerate(node):
            yield from _containers(item, f"{where}[{i}]")
    elif isinstance(node, dict):
        for key, value in node.items():
            if key in ("containers", "initContainers") and isinstance(value, list):
                for c in value:
                    yield f"{where}.{key}[{c.get('name')}]", c
            elif key == "container" and isinstance(value, dict):
                yield f"{where}.container", value
            else:
                yield from _containers(value, f"{where}.{key}")


def _env_problems(where: str, container: dict, token_secret: str, dev_s3: bool | None) -> list[str]:
    env = {e["name"]: e for e in container.get("env", [])}
    problems = []
    if env.get("RAY_AUTH_MODE", {}).get("value") != "token":
        problems.append(f"{where}: RAY_AUTH_MODE is not `token`")
    for name, secret, key in [("RAY_AUTH_TOKEN", token_secret, "auth_token"),
                              *[(n, "xsam-mlflow", n) for n in ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME",
                                                                "MLFLOW_TRACKING_PASSWORD")]]:
        ref = env.get(name, {}).get("valueFrom", {}).get("secretKeyRef", {})
        if (ref.get("name"), ref.get("key")) != (secret, key):
            problems.append(f"{where}: {name} does not come from secret {secret} key {key}")
    for name, entry in env.items():
        if CREDENTIAL.search(name) and "value" in entry:
            problems.append(f"{where}: {name} is a literal value; take it from a secretKeyRef")
    aws = {n for n in env if n.startswith("AWS_ACCESS_KEY_ID") or n.startswith("AWS_SECRET_ACCESS_KEY")}
    if dev_s3 is True and aws != {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}:
        problems.append(f"{where}: the dev cluster reads MinIO with the xsam-s3 keys")
    if dev_s3 is False and aws:
        problems.append(f"{where}: prod uses the ServiceAccount's IAM role, not static keys ({sorted(aws)})")
    return problems


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_ray_is_not_exposed_and_needs_its_token(rendered, overlay):
    objects = rendered[overlay]
    public = [o for o in objects if o["kind"] in ("Ingress", "Route", "Gateway", "HTTPRoute", "IngressRoute")
              or (o["kind"] == "Service" and o.get("spec", {}).get("type") in ("LoadBalancer", "NodePort"))]
    assert not public, f"public endpoints: {[(o['kind'], o['metadata']['name']) for o in public]}"
    cluster = _one(objects, "RayCluster")["spec"]
    head = cluster["headGroupSpec"]
    assert head.get("serviceType", "ClusterIP") == "ClusterIP", "the Ray head Service must stay ClusterIP"
    assert not head.get("enableIngress"), "no Ingress for the Ray dashboard"
    assert (head.get("headService") or {}).get("spec", {}).get("type", "ClusterIP") == "ClusterIP"
    auth = cluster["authOptions"]
    assert auth["mode"] == "token" and auth["secretName"] and not auth.get("enableK8sTokenAuth")
    # KubeRay refuses token auth below Ray 2.52; the cluster must run the Ray this project pins
    import ray

    assert cluster["rayVersion"] == ray.__version__
    assert tuple(int(x) for x in ray.__version__.split(".")[:2]) >= (2, 52)
    secrets = {o["metadata"]["name"]: o for o in objects if o["kind"] == "Secret"}
    assert "auth_token" in secrets[auth["secretName"]]["data"]
    assert set(secrets["xsam-mlflow"]["data"]) == {"MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME",
                                                   "MLFLOW_TRACKING_PASSWORD"}
    containers = list(_containers(cluster))
    assert len(containers) == 3, [w for w, _ in containers]
    problems = [p for where, c in containers for p in _env_problems(where, c, auth["secretName"], overlay == "dev")]
    assert not problems, "\n".join(problems)
    account = _one(objects, "ServiceAccount")
    assert account["automountServiceAccountToken"] is False
    role = account["metadata"].get("annotations", {}).get("eks.amazonaws.com/role-arn")
    assert (role is not None) == (overlay == "prod")


def test_security_checks_fail_on_insecure_manifests(rendered):
    cluster = copy.deepcopy(_one(rendered["dev"], "RayCluster"))
    head = cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    head["env"] = [e for e in head["env"] if e["name"] != "RAY_AUTH_TOKEN"]
    head["env"].append({"name": "MLFLOW_TRACKING_PASSWORD", "value": "hunter2hunter2"})
    problems = _env_problems("head", head, "xsam-ray-auth", True)
    assert any("RAY_AUTH_TOKEN" in p for p in problems) and any("literal" in p for p in problems)
    assert _policy_problems({"Version": "2012-10-17", "Statement": [
        {"Effect": "Allow", "Action": "s3:GetObject", "Resource": "*"}]})
    assert _policy_problems({"Version": "2012-10-17", "Statement": [
        {"Effect": "Allow", "Action": "s3:*", "Resource": "arn:aws:s3:::xsam-data/*"}]})
    assert _literal_credentials("x.yaml", "password: 'hunter2hunter2'\nurl: postgresql://u:s3cr3tpw@db/x\n")


def test_argo_steps_hold_the_token_and_mlflow_credentials_from_secrets():
    doc = _yaml_docs(ARGO)[0]
    containers = list(_containers(doc["spec"]["templates"]))
    assert len(containers) == 3
    problems = [p for where, c in containers for p in _env_problems(where, c, "xsam-ray-auth", None)]
    assert not problems, "\n".join(problems)
    for where, c in containers:
        env = {e["name"]: e for e in c["env"]}
        for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):  # dev keys; prod: the ServiceAccount's role
            assert env[name]["valueFrom"]["secretKeyRef"] == {"name": "xsam-s3", "key": name, "optional": True}


def test_ray_up_keeps_the_dashboard_on_localhost_and_token_auth_on():
    config = yaml.safe_load(RAY_UP.read_text())
    starts = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in starts
    everything = json.dumps(config)
    assert "0.0.0.0" not in everything, "nothing of the ray up cluster binds to all interfaces"
    assert "--env RAY_AUTH_MODE=token" in config["docker"]["run_options"]
    assert config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    for name, node_type in config["available_node_types"].items():
        assert "Arn" in node_type["node_config"].get("IamInstanceProfile", {}), (
            f"{name}: set IamInstanceProfile (else ray up gives the head AmazonS3FullAccess)")
    rules = config["provider"].get("security_group", {}).get("IpPermissions", [])
    assert not rules, "no inbound rule beyond ray up's own (SSH and intra-cluster)"
    env_file = config["file_mounts"]["~/xsam.env"]
    assert _git_ignored(env_file) and (REPO / f"{env_file}.example").exists()


def _compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def test_mlflow_server_requires_a_login_and_its_secrets_come_from_env():
    services = _compose()["services"]
    mlflow = services["mlflow"]
    command = " ".join(mlflow["command"])
    assert "--app-name=basic-auth" in command
    env = mlflow["environment"]
    for name in ("MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY", "PGPASSWORD", "AWS_SECRET_ACCESS_KEY"):
        assert re.fullmatch(r"\$\{[A-Z][A-Z0-9_]*:\?[^}]+\}", env[name]), (
            f"mlflow {name} must be a required variable of .env")
    assert "://" in command and not re.search(r"://[^/@\s]+:[^/@\s]+@", command), "no password in the store URIs"
    ini_mount = next(v for v in mlflow["volumes"] if v.endswith(env["MLFLOW_AUTH_CONFIG_PATH"] + ":ro"))
    ini = (COMPOSE.parent / ini_mount.split(":")[0]).read_text()
    assert "admin_password" not in ini and not re.search(r"://[^/@\s]+:[^/@\s]+@", ini)
    # what is published, and where
    for name, service in services.items():
        for port in service.get("ports", []):
            host = str(port).rsplit(":", 2)[0]
            assert host in ("127.0.0.1", "${XSAM_BIND_ADDRESS:-127.0.0.1}"), f"{name} publishes {port}"
    assert "ports" not in services["postgres"]
    assert "127.0.0.1:9001:9001" in services["minio"]["ports"]
    # nothing starts before the secrets check passed
    for name in ("postgres", "minio"):
        assert services[name]["depends_on"]["secrets-check"]["condition"] == "service_completed_successfully"


def test_compose_credentials_are_required_variables_of_the_env_file():
    doc = _compose()
    example = _env_file(COMPOSE.parent / ".env.example")
    for name, service in doc["services"].items():
        for key, value in (service.get("environment") or {}).items():
            if CREDENTIAL.search(key):
                assert re.fullmatch(r"\$\{[A-Z][A-Z0-9_]*(:\?[^}]+|:-[^}]*)?\}", str(value)), (
                    f"compose service {name}: {key} must be interpolated from .env, not written here")
    used = set(re.findall(r"\$\{([A-Z][A-Z0-9_]*)", COMPOSE.read_text()))
    assert used <= set(example), f"variables compose.yaml uses that .env.example lacks: {sorted(used - set(example))}"


def _env_file(path: Path) -> dict[str, str]:
    pairs = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, sep, value = line.partition("=")
            assert sep, f"{path}: {line!r} is not KEY=VALUE"
            pairs[key.strip()] = value
    return pairs


def _git_ignored(relative: str) -> bool:
    proc = subprocess.run(["git", "-C", str(REPO), "check-ignore", "-q", "--no-index", relative], capture_output=True)
    assert proc.returncode in (0, 1), f"git check-ignore failed: {proc.stderr.decode()}"
    return proc.returncode == 0


def _docker_ignored(relative: str) -> bool:
    """Whether .dockerignore keeps `relative` out of the build context (the syntax that file uses: paths,
    `*`, `**`; no `!` exceptions)."""
    patterns = [p.strip() for p in (REPO / ".dockerignore").read_text().splitlines()
                if p.strip() and not p.startswith("#")]
    assert not any(p.startswith("!") for p in patterns)
    parts = relative.split("/")
    prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    return any(fnmatch.fnmatch(prefix, pattern.rstrip("/")) or fnmatch.fnmatch(prefix, pattern.removeprefix("**/"))
               for pattern in patterns for prefix in prefixes)


def test_secret_files_are_examples_with_placeholders_and_the_real_ones_stay_out_of_git_and_images():
    examples = sorted(set(INFRA.rglob("*.env.example")) | {COMPOSE.parent / ".env.example"})
    assert len(examples) >= 7, examples
    for example in examples:
        relative = example.relative_to(REPO).as_posix()
        assert "EXAMPLE ONLY" in example.read_text().splitlines()[0], f"{relative}: say it is an example on line 1"
        for key, value in _env_file(example).items():
            if CREDENTIAL.search(key):
                assert value.startswith(PLACEHOLDER), f"{relative}: {key} must be a {PLACEHOLDER} placeholder"
        real = relative.removesuffix(".example")
        assert _git_ignored(real), f"{real} (real credentials) is not ignored by git"
        assert _docker_ignored(real), f"{real} (real credentials) would enter the image's build context"
    for needed in ("pyproject.toml", "constraints.txt", "README.md", "xsam/__init__.py", "dataprep/__init__.py",
                   "jobs/__init__.py", "pipelines/__init__.py", "configs/benchmarks.yaml",
                   "pipelines/recipes/stage1.yaml"):
        assert not _docker_ignored(needed), f".dockerignore leaves out {needed}, which the image needs"
    for heavy in (".venv/bin/python", ".git/HEAD", "data/x", "runs/x", "mlruns.db", "tests/conftest.py"):
        assert _docker_ignored(heavy), f".dockerignore should leave out {heavy}"


def _manifest_files() -> list[Path]:
    files = [p for p in INFRA.rglob("*") if p.is_file() and SCHEMAS not in p.parents]
    return sorted(files + [REPO / ".dockerignore", DEPLOY_DOC])


def _literal_credentials(where: str, text: str) -> list[str]:
    problems = []
    for pattern, what in [(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b", "an AWS access key id"),
                          (r"-----BEGIN [A-Z ]*PRIVATE KEY-----", "a private key")]:
        if re.search(pattern, text):
            problems.append(f"{where}: {what}")
    for match in re.finditer(r"[a-z][a-z0-9+.-]*://([^/\s:@'\"]+):([^/\s@'\"]+)@", text):
        if not match.group(2).startswith(("$", PLACEHOLDER)):
            problems.append(f"{where}: a password in the URL {match.group(0)}")
    for match in re.finditer(r"^\s*(?:export\s+)?([A-Z][A-Z0-9_]*)\s*[=:]\s*(\S+)", text, re.M):
        key, value = match.groups()
        if CREDENTIAL.search(key) and not value.startswith(("$", "'$", '"$', PLACEHOLDER, "{", "[")):
            problems.append(f"{where}: {key} = {value[:8]}... is a literal credential")
    for match in re.finditer(r"(?i)\b(password|passwd|secret|token)\w*\s*[=:]\s*[\"']([^\"'$]{6,})[\"']", text):
        if not match.group(2).startswith(PLACEHOLDER):
            problems.append(f"{where}: {match.group(1)} = {match.group(2)[:8]}... is a literal credential")
    return problems


def test_no_literal_credentials_in_any_manifest():
    problems = []
    for path in _manifest_files():
        text = path.read_text(errors="replace")
        problems += _literal_credentials(path.relative_to(REPO).as_posix(), text)
        if path.suffix in (".yaml", ".yml") and not path.name.endswith(".example"):
            for doc in yaml.safe_load_all(text):
                if isinstance(doc, dict) and doc.get("kind") == "Secret" and (doc.get("data") or doc.get("stringData")):
                    problems.append(f"{path}: a Secret with data is committed; generate it from a git-ignored env file")
    assert not problems, "\n".join(problems)


def _policy_problems(doc: dict) -> list[str]:
    problems = []
    if doc.get("Version") != "2012-10-17":
        problems.append("Version must be 2012-10-17")
    for i, statement in enumerate(doc.get("Statement", [])):
        actions = statement["Action"] if isinstance(statement["Action"], list) else [statement["Action"]]
        resources = statement.get("Resource")
        resources = resources if isinstance(resources, list) else [resources]
        if "Principal" in statement or "NotResource" in statement or "NotAction" in statement:
            problems.append(f"statement {i}: an identity policy with Action/Resource only")
        s3 = [a for a in actions if a.lower().startswith("s3:") or a == "*"]
        if not s3:
            continue
        if any(a in ("*", "s3:*") or a.endswith(":*") for a in s3):
            problems.append(f"statement {i}: name the S3 actions, not {s3}")
        for resource in resources:
            match = re.fullmatch(r"arn:aws:s3:::([a-z0-9.-]+)(/\*)?", str(resource))
            if not match or match.group(1) not in BUCKETS:
                problems.append(f"statement {i}: S3 resource {resource!r} is not one of the buckets {sorted(BUCKETS)}")
    return problems


def test_s3_policies_name_their_buckets_only():
    policies = {p.name: json.loads(p.read_text()) for p in sorted(POLICIES.glob("*.json"))}
    assert {"s3-xsam-jobs.json", "minio-xsam-jobs.json", "minio-mlflow-server.json"} <= set(policies)
    problems = [f"{name}: {p}" for name, doc in policies.items() for p in _policy_problems(doc)]
    assert not problems, "\n".join(problems)

    def buckets(doc: dict) -> set[str]:
        resources = [r for s in doc["Statement"] for r in (s["Resource"] if isinstance(s["Resource"], list)
                                                          else [s["Resource"]]) if str(r).startswith("arn:aws:s3")]
        return {r.split(":::")[1].split("/")[0] for r in resources}

    assert buckets(policies["s3-xsam-jobs.json"]) == buckets(policies["minio-xsam-jobs.json"]) == {"xsam-data"}
    assert policies["s3-xsam-jobs.json"] == policies["minio-xsam-jobs.json"]
    assert buckets(policies["minio-mlflow-server.json"]) == {"xsam-mlflow"}
    # the jobs write datasets and checkpoints atomically (temporary key, copy, delete) but never make buckets
    actions = {a for s in policies["s3-xsam-jobs.json"]["Statement"] for a in s["Action"]}
    assert {"s3:GetObject", "s3:PutObject", "s3:DeleteObject", "s3:ListBucket"} <= actions
    assert not any(a.startswith(("s3:CreateBucket", "s3:DeleteBucket", "s3:PutBucketPolicy")) for a in actions)
    # the compose stack attaches these very files
    init = " ".join(_compose()["services"]["minio-init"]["command"])
    assert "/policies/minio-xsam-jobs.json" in init and "/policies/minio-mlflow-server.json" in init


# ----------------------------------------------------------------------------------------- the image


def test_dockerfile_builds_a_cuda_or_a_cpu_image_of_the_pinned_versions():
    instructions = _dockerfile_instructions(DOCKERFILE)
    text = DOCKERFILE.read_text()
    args = {rest.split("=")[0]: rest.split("=", 1)[1] for i, rest in instructions if i == "ARG" and "=" in rest}
    assert args["VARIANT"] == "gpu"
    import ray

    constraints = dict(re.findall(r"^([A-Za-z0-9_.-]+)==(\S+)$", (REPO / "constraints.txt").read_text(), re.M))
    assert args["RAY_VERSION"] == ray.__version__ == constraints["ray"]
    assert args["TORCH_VERSION"] == constraints["torch"] == "2.13.0"
    assert '"torch==2.13.0"' in (REPO / "pyproject.toml").read_text()
    froms = [rest for i, rest in instructions if i == "FROM"]
    assert "rayproject/ray:${RAY_VERSION}-py311-gpu AS base-gpu" in froms  # built on nvidia/cuda
    assert "rayproject/ray:${RAY_VERSION}-py311-cpu AS base-cpu" in froms
    assert froms[-1].startswith("base-${VARIANT}")
    stages = re.split(r"^FROM ", text, flags=re.M)
    gpu, cpu = (next(s for s in stages if s.startswith(f"rayproject/ray:${{RAY_VERSION}}-py311-{v}"))
                for v in ("gpu", "cpu"))
    assert "XSAM_TORCH_INDEX=https://download.pytorch.org/whl/cpu" in cpu
    assert "download.pytorch.org/whl/cpu" not in gpu
    # torch comes from the variant's index, before the project; both installs are checked for the variant's build
    runs = [rest for i, rest in instructions if i == "RUN"]
    assert runs[0].startswith('pip install --index-url "${XSAM_TORCH_INDEX}" "torch==${TORCH_VERSION}"')
    assert "pip install -c constraints.txt" in runs[1]
    assert sum("torch.version.cuda" in r for r in runs) == 2
    for package in ("psycopg2-binary",):
        assert f'"{package}=={constraints[package]}"' in runs[1]
    cluster = _yaml_docs(K8S / "base" / "raycluster.yaml")[0]
    context = cluster["spec"]["headGroupSpec"]["template"]["spec"]["securityContext"]
    assert ("USER", f"{context['runAsUser']}:{context['runAsGroup']}") in instructions


# ----------------------------------------------------------------------------------------- docs


def test_deploy_doc_walks_through_every_manifest_and_explains_every_placeholder():
    doc = DEPLOY_DOC.read_text()
    assert re.search(r"^## .*What is exposed and to whom", doc, re.M)
    for path in ("infra/compose/Dockerfile", "infra/compose/compose.yaml", "infra/k8s/overlays/dev",
                 "infra/k8s/overlays/prod", "infra/k8s/jobs/paper-rayjob.yaml", "infra/ray-cluster.yaml",
                 "infra/argo/xsam-paper-workflowtemplate.yaml", "infra/policies/s3-xsam-jobs.json",
                 "xsam pipeline run pipelines/paper.yaml --address http://", "kubectl port-forward", "ray dashboard"):
        assert path in doc, f"docs/deploy.md does not mention {path}"
    placeholders = set()
    for path in _manifest_files():
        placeholders |= set(re.findall(r"REPLACE_[A-Z_]+|registry\.example\.com", path.read_text(errors="replace")))
    missing = sorted(p for p in placeholders if p not in doc)
    assert not missing, f"placeholders the manifests use that docs/deploy.md does not explain: {missing}"
