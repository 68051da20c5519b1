"""How cluster.yaml sets up its nodes: every node type runs in the pinned Ray image that cluster/Dockerfile
starts FROM (Ray at requirements.txt's pin, a Python that pyproject.toml accepts), and every setup and start
command is one that image can run. The install command itself runs here under bash, with a stub `python3`
and a local repository in place of CORAL_REPO. No Docker, no network, no cloud."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

from tests.dockerfile import base_images

REPO = Path(__file__).resolve().parents[2]
CLUSTER_YAML = REPO / "cluster.yaml"
DOCKERFILE = REPO / "cluster" / "Dockerfile"
KUBERAY = REPO / "cluster" / "kuberay"

# What the Ray image offers a setup or start command: bash builtins, coreutils, git, its Python and Ray.
# Not here on purpose: versioned pythons (python3.10 is the AMI's), pip without `python3 -m`, conda, apt,
# sudo; a command that needs one of them does not belong in this file.
IMAGE_COMMANDS = {"cd", "export", "test", "ulimit", "mkdir", "grep", "git", "python3", "ray"}
RAY_TAG = re.compile(r"(?P<ray>\d+\.\d+\.\d+)-py(?P<major>3)(?P<minor>\d+)(?:-(?P<flavour>[a-z0-9]+))?")
SETTING = re.compile(r"(?<![\w$])(CORAL_REPO|CORAL_REF)=(\S+?);")


def cluster_yaml() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


def pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def pins() -> dict[str, str]:
    """name -> pinned version of every `==` requirement in pyproject.toml, extras included."""
    project = pyproject()
    reqs = [
        *project["dependencies"],
        *(r for extra in project["optional-dependencies"].values() for r in extra),
    ]
    out = {}
    for raw in reqs:
        req = Requirement(raw)
        specs = list(req.specifier)
        if len(specs) == 1 and specs[0].operator == "==":
            out[req.name] = specs[0].version
    return out


def dockerfile_from() -> list[str]:
    return base_images(DOCKERFILE)


def ray_image(image: str) -> re.Match:
    name, _, tag = image.partition(":")
    assert name == "rayproject/ray", f"{image}: not the Ray project's image"
    m = RAY_TAG.fullmatch(tag)
    assert m, f"{image}: tag is not <ray version>-py<python>[-<flavour>]"
    return m


def node_setup(spec: dict) -> dict[str, list[str]]:
    """The setup commands each node type runs, as Ray's launcher picks them: the head runs setup_commands then
    head_setup_commands; a worker type's own worker_setup_commands replace setup_commands and the top-level
    worker_setup_commands (ray.autoscaler: merge_setup_commands, _get_node_type_specific_fields)."""
    common = spec.get("setup_commands", [])
    head = common + spec.get("head_setup_commands", [])
    worker = common + spec.get("worker_setup_commands", [])
    return {
        name: head if name == spec["head_node_type"] else node.get("worker_setup_commands", worker)
        for name, node in spec["available_node_types"].items()
    }


def simple_commands(command: str) -> list[list[str]]:
    """The simple commands of a shell line: words split at ; && || | and parentheses, leading VAR=value
    assignments dropped."""
    lexer = shlex.shlex(command, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    out, words = [], []
    for token in lexer:
        if token and set(token) <= set("();&|<>"):
            if words:
                out.append(words)
            words = []
        elif words or not re.fullmatch(r"[A-Za-z_]\w*=.*", token):
            words.append(token)
    if words:
        out.append(words)
    return out


def all_commands(spec: dict) -> list[str]:
    return [
        *(c for commands in node_setup(spec).values() for c in commands),
        *spec["head_start_ray_commands"],
        *spec["worker_start_ray_commands"],
    ]


def install_command(spec: dict) -> str:
    (install,) = [c for c in spec["setup_commands"] if "CORAL_REPO=" in c]
    return install


def nodes_gpu(spec: dict, name: str) -> bool:
    return spec["available_node_types"][name]["resources"].get("GPU", 0) > 0


def torch_line(requirements: Path) -> str:
    (line,) = [x.strip() for x in requirements.read_text().splitlines() if x.startswith("torch==")]
    return line


def test_dockerfile_base_is_the_pinned_ray_on_a_supported_python():
    (image,) = dockerfile_from()
    m = ray_image(image)
    assert m["ray"] == pins()["ray"], f"FROM {image}: Ray {m['ray']}, pyproject.toml pins {pins()['ray']}"
    python = f"{m['major']}.{m['minor']}"
    requires = SpecifierSet(pyproject()["requires-python"])
    assert requires.contains(python), f"FROM {image}: Python {python} is outside requires-python {requires}"
    assert m["flavour"] and m["flavour"].startswith("cu"), f"FROM {image}: the GPU image (faiss-gpu, vLLM)"


def test_every_node_type_runs_in_the_dockerfiles_base_image():
    spec = cluster_yaml()
    docker = spec.get("docker")
    assert docker, "cluster.yaml has no docker: section; its commands would run on the AMI's Python"
    (base,) = dockerfile_from()
    assert docker["image"] == base, f"docker.image {docker['image']} is not cluster/Dockerfile's FROM {base}"
    assert docker["container_name"] and docker.get("pull_before_run") is True
    for key in ("head_image", "worker_image"):
        assert docker.get(key, base) == base, f"docker.{key}: {docker[key]} is not {base}"
    nodes = spec["available_node_types"]
    for name, node in nodes.items():
        assert node["node_config"]["ImageId"].startswith("ami-"), name
        image = node.get("docker", {}).get("worker_image", base)
        assert image == base, f"{name} runs {image}, not {base}"
        assert not node.get("docker", {}).get("disable_automatic_runtime_detection"), name
    # a GPU node type gets its GPUs in the container
    gpu_types = [name for name, node in nodes.items() if node["resources"].get("GPU", 0) > 0]
    assert gpu_types
    for name in gpu_types:
        assert "--gpus all" in nodes[name]["docker"]["worker_run_options"], name


def test_ray_prepares_the_docker_config_for_every_node():
    from coral import cluster

    prepared = cluster.load(CLUSTER_YAML)  # Ray's schema, defaults and docker checks
    (base,) = dockerfile_from()
    assert prepared["docker"]["image"] == base
    assert prepared["docker"]["container_name"]


def test_open_files_limit_fits_the_container():
    spec = cluster_yaml()
    options = " ".join(spec["docker"].get("run_options", []))
    m = re.search(r"--ulimit nofile=(\d+):(\d+)", options)
    assert m, f"docker.run_options set no nofile limit: {options!r}"
    hard = int(m[2])
    for command in (*spec["head_start_ray_commands"], *spec["worker_start_ray_commands"]):
        for wanted in re.findall(r"ulimit -n (\d+)", command):
            assert int(wanted) <= hard, f"`ulimit -n {wanted}` above the container's hard limit {hard}"


def test_every_command_is_one_the_image_runs():
    spec = cluster_yaml()
    for command in all_commands(spec):
        assert not re.search(r"\bpython3\.\d+|\bconda\b|\bapt(-get)?\b|\bsudo\b", command), command
        for words in simple_commands(command):
            assert words[0] in IMAGE_COMMANDS, f"{words[0]!r} in {command!r}: not a command of the image"
            if words[0] == "python3":
                assert words[1:3] == ["-m", "pip"], f"python3 {' '.join(words[1:])}: only pip runs here"
        result = subprocess.run(["bash", "-n", "-c", command], capture_output=True, text=True)
        assert result.returncode == 0, f"{command!r}: {result.stderr}"


def test_every_node_type_installs_the_project():
    spec = cluster_yaml()
    install = install_command(spec)
    for name, commands in node_setup(spec).items():
        assert commands and commands[0] == install, f"{name} does not start with the project's install"


def test_gpu_extras_match_the_pins():
    spec = cluster_yaml()
    nodes = spec["available_node_types"]
    pinned = pins()
    for name, commands in node_setup(spec).items():
        text = " ".join(commands)
        has_gpu = nodes[name]["resources"].get("GPU", 0) > 0
        assert ("faiss-gpu" in text) == has_gpu, name
        for package, version in re.findall(r"\b(faiss-gpu|faiss-cpu|vllm|torch)==([0-9][\w.]*)", text):
            assert version == pinned[package], (
                f"{name}: {package}=={version}, pyproject.toml: {pinned[package]}"
            )
        if has_gpu:
            assert text.index("uninstall -y -q faiss-cpu") < text.index("faiss-gpu=="), name
    assert f"ray[llm]=={pinned['ray']}" in " ".join(node_setup(spec)["gpu_inference"])  # vLLM, Ray's pin


def test_repository_and_ref_are_settings_defined_once_and_used():
    spec = cluster_yaml()
    text = CLUSTER_YAML.read_text()
    header = text.split("\ncluster_name:")[0]
    what_to_change = header.split("What to change:")[1]
    for name in ("CORAL_REPO", "CORAL_REF", "docker.image"):
        assert name in what_to_change, f"{name} is not under 'What to change'"
    install = install_command(spec)
    settings = dict(SETTING.findall(install))
    assert set(settings) == {"CORAL_REPO", "CORAL_REF"}
    assert len(SETTING.findall(install)) == 2, "each setting defined once"
    assert settings["CORAL_REPO"].startswith("https://") and settings["CORAL_REPO"].endswith(".git")
    assert settings["CORAL_REF"] == f"v{pyproject()['version']}", "nodes install the project's version"
    assert re.search(r'git fetch\b[^&;]*"\$CORAL_REPO" "\$CORAL_REF"', install), install
    assert "coral-retrieval/coral.git" not in install.split(";", 2)[2], (
        "the URL is written only in CORAL_REPO"
    )
    for commands in node_setup(spec).values():
        assert sum("CORAL_REPO=" in c for c in commands) == 1  # no node type redefines them


def test_kuberay_runs_the_dockerfiles_ray_version():
    (base,) = dockerfile_from()
    ray = ray_image(base)["ray"]
    manifests = sorted(KUBERAY.glob("*.yaml"))
    assert manifests
    for path in manifests:
        versions = re.findall(r"\brayVersion:\s*\"?([\d.]+)", path.read_text())
        assert versions and set(versions) == {ray}, f"{path.name}: rayVersion {versions}, image Ray {ray}"


@pytest.fixture
def stub_node(tmp_path):
    """A home, and a PATH whose `python3` logs its arguments: the setup commands run as on a node."""
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("needs git and this repository's history")
    home, bin_dir = tmp_path / "home", tmp_path / "bin"
    home.mkdir()
    bin_dir.mkdir()
    log = tmp_path / "python3.log"
    (bin_dir / "python3").write_text(f'#!/bin/sh\necho "$*" >> {shlex.quote(str(log))}\n')
    (bin_dir / "python3").chmod(0o755)
    keep = ("LANG", "LC_ALL", "TMPDIR")
    env = {k: v for k, v in os.environ.items() if k in keep}
    git_dir = Path(shutil.which("git")).parent
    env.update(HOME=str(home), PATH=f"{bin_dir}:{git_dir}:/usr/bin:/bin", GIT_CONFIG_NOSYSTEM="1")
    env.update(GIT_CONFIG_GLOBAL=str(tmp_path / "gitconfig"))
    (tmp_path / "gitconfig").write_text(f"[safe]\n\tdirectory = {REPO}\n\tdirectory = {REPO}/.git\n")
    return home, env, log


def test_setup_commands_run_under_bash(stub_node):
    """Each node type's commands, CORAL_REPO and CORAL_REF pointed at this repository and a commit that is
    not its HEAD (HEAD~1 where there is one: a ref the command ignored would check out HEAD): the checkout
    lands in ~/coral, torch is installed before requirements.txt, then the project; a second run (`ray up`
    again) succeeds too."""
    home, env, log = stub_node
    git = ["git", "-C", str(REPO), "rev-parse", "--verify", "-q"]
    head = subprocess.run([*git, "HEAD~1"], capture_output=True, text=True)
    if head.returncode != 0:
        head = subprocess.run([*git, "HEAD"], capture_output=True, text=True)
    assert head.returncode == 0, head.stderr
    sha = head.stdout.strip()
    spec = cluster_yaml()
    install = install_command(spec)
    local, n = SETTING.subn(
        lambda m: f"{m[1]}={'file://' + str(REPO) if m[1] == 'CORAL_REPO' else sha};", install
    )
    assert n == 2
    pinned = pins()
    for name, commands in node_setup(spec).items():
        for _ in range(2):
            log.write_text("")
            for command in commands:
                command = local if command == install else command
                result = subprocess.run(
                    ["bash", "-c", command], env=env, cwd=home, capture_output=True, text=True
                )
                assert result.returncode == 0, f"{name}: {command!r}\n{result.stderr}"
            checkout = subprocess.run(
                ["git", "-C", str(home / "coral"), "rev-parse", "HEAD"],
                env=env,
                capture_output=True,
                text=True,
            )
            assert checkout.stdout.strip() == sha, name
            calls = log.read_text().splitlines()
            assert calls[:3] == [
                f"-m pip install -q {torch_line(home / 'coral' / 'requirements.txt')}",
                "-m pip install -q -r requirements.txt",
                "-m pip install -q --no-deps -e .",
            ], f"{name}: {calls}"
            if nodes_gpu(spec, name):
                assert calls[3] == "-m pip uninstall -y -q faiss-cpu", f"{name}: {calls}"
                assert f"faiss-gpu=={pinned['faiss-gpu']}" in calls[4], f"{name}: {calls}"
                assert ("ray[llm]" in " ".join(calls[5:])) == (name == "gpu_inference"), f"{name}: {calls}"
            else:
                assert len(calls) == 3, f"{name}: {calls}"


def exported_before_ray_start(command: str) -> list[dict[str, str]]:
    """For each `ray start` in a shell line: the variables exported (or assigned in front of it) before it."""
    lexer = shlex.shlex(command, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    exported: dict[str, str] = {}
    out, words = [], []
    for token in [*lexer, ";"]:
        if not (token and set(token) <= set("();&|<>")):
            words.append(token)
            continue
        assignments = {}
        while words and re.fullmatch(r"[A-Za-z_]\w*=.*", words[0]):
            key, _, value = words.pop(0).partition("=")
            assignments[key] = value
        if words[:1] == ["export"]:
            exported |= dict(w.partition("=")[::2] for w in words[1:] if "=" in w)
        elif words[:2] == ["ray", "start"]:
            out.append(exported | assignments)
        words = []
    return out


def test_ray_token_auth_and_a_local_dashboard():
    """Every node starts Ray with token auth (the token file the launcher copies to every node); the head's
    dashboard and job API listen on 127.0.0.1 only (reached through `ray dashboard`'s SSH tunnel); no security
    group of this file opens a Ray port."""
    spec = cluster_yaml()
    assert spec["file_mounts"].get("~/.ray/auth_token") == "~/.ray/auth_token", (
        "the token is not on the nodes"
    )
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        starts = [env for command in spec[key] for env in exported_before_ray_start(command)]
        assert starts, f"{key} start no Ray"
        for env in starts:
            assert env.get("RAY_AUTH_MODE") == "token", f"{key}: ray start without RAY_AUTH_MODE=token"
            assert "RAY_AUTH_TOKEN" not in env, f"{key}: the token written in cluster.yaml"
    (head,) = [c for c in spec["head_start_ray_commands"] if "ray start" in c]
    assert re.findall(r"--dashboard-host[= ](\S+)", head) == ["127.0.0.1"], head
    text = CLUSTER_YAML.read_text()
    assert "0.0.0.0" not in text and not re.search(r"RAY_AUTH_MODE\W+disabled", text)
    for rule in spec["provider"].get("security_group", {}).get("IpPermissions", []):
        everything = str(rule.get("IpProtocol")) == "-1"
        lo, hi = rule.get("FromPort", 0), rule.get("ToPort", 65535)
        ray_ports = [p for p in (6379, 8265, 10001) if everything or lo <= p <= hi]
        anyone = any(r.get("CidrIp") == "0.0.0.0/0" for r in rule.get("IpRanges", []))
        assert not (ray_ports and anyone), f"the security group opens {ray_ports} to anyone: {rule}"
