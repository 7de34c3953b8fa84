#!/usr/bin/env python3
"""Checks that deploy/'s files agree with each other and with shoal's drain.

Run from anywhere: `python3 deploy/check.py` (tests/deploy.rs runs it, with the files' own
validators: check-jsonschema's compose schema, kubernetes-validate, systemd-analyze verify).
It parses every YAML file, then checks what no schema knows: every stop timeout and grace
period exceeds the drain timeout, readiness and health checks look at /health, workers keep
their node key on a volume, and the image runs as a non-root user.

`python3 deploy/check.py env SERVICE` prints the environment a compose service's container
gets (the image's ENV, then the service's `environment`) as JSON, for the test that runs the
containers' commands on this machine.
"""
import json
import re
import sys
from pathlib import Path

import yaml

DEPLOY = Path(__file__).resolve().parent


def fail(msg):
    sys.exit(f"deploy/check.py: {msg}")


def image_env():
    """The ENV of the Dockerfile's runtime stage."""
    text = (DEPLOY / "Dockerfile").read_text()
    runtime = text.split("AS runtime", 1)[1]
    env = {}
    for block in re.findall(r"^ENV ((?:.*\\\n)*.*)$", runtime, re.M):
        for k, v in re.findall(r"(\w+)=(\S+)", block.replace("\\\n", " ")):
            env[k] = v
    return env


def image_user():
    runtime = (DEPLOY / "Dockerfile").read_text().split("AS runtime", 1)[1]
    users = re.findall(r"^USER (\S+)", runtime, re.M)
    return users[-1] if users else None


def seconds(s):
    m = re.fullmatch(r"(\d+)(s|m)?", str(s))
    if not m:
        fail(f"cannot read a duration from {s!r}")
    return int(m.group(1)) * (60 if m.group(2) == "m" else 1)


def compose():
    return yaml.safe_load((DEPLOY / "compose.yaml").read_text())


def service_env(name):
    svc = compose()["services"][name]
    env = image_env()
    env.update({k: str(v) for k, v in (svc.get("environment") or {}).items()})
    return env


def check_compose():
    doc = compose()
    services = doc["services"]
    workers = [n for n, s in services.items() if (s.get("command") or ["worker"])[0] == "worker"]
    apis = [n for n, s in services.items() if (s.get("command") or [""])[0] == "api"]
    if len(workers) != 3 or len(apis) != 1:
        fail(f"compose: expected 3 workers and 1 api, found {workers} and {apis}")
    for name, svc in services.items():
        env = service_env(name)
        drain = float(env.get("SHOAL_DRAIN_TIMEOUT", 30))
        grace = seconds(svc.get("stop_grace_period", "10s"))
        if grace <= drain:
            fail(f"compose {name}: stop_grace_period {grace}s <= drain timeout {drain}s")
    for name in workers:
        mounts = [v.split(":")[1] for v in services[name].get("volumes", [])]
        if "/var/lib/shoal" not in mounts:
            fail(f"compose {name}: the node key's directory /var/lib/shoal is not a volume")


def check_image():
    user = image_user()
    if not user or user.split(":")[0] in ("root", "0"):
        fail(f"Dockerfile: the runtime runs as {user!r}, not a non-root user")
    text = (DEPLOY / "Dockerfile").read_text()
    if "HEALTHCHECK" not in text or 'VOLUME ["/var/lib/shoal"]' not in text:
        fail("Dockerfile: no HEALTHCHECK or no volume for /var/lib/shoal")
    env = image_env()
    if not env.get("SHOAL_KEY_FILE", "").startswith("/var/lib/shoal/"):
        fail("Dockerfile: the node key is not kept in the volume")


def check_k8s():
    for path in sorted((DEPLOY / "k8s").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc["kind"] not in ("StatefulSet", "Deployment"):
                continue
            spec = doc["spec"]["template"]["spec"]
            grace = spec.get("terminationGracePeriodSeconds", 30)
            shoal = next(c for c in spec["containers"] if c["name"] == "shoal")
            env = {e["name"]: e.get("value") for e in shoal.get("env", [])}
            drain = float(env.get("SHOAL_DRAIN_TIMEOUT", image_env().get("SHOAL_DRAIN_TIMEOUT", 30)))
            if grace <= drain:
                fail(f"{path.name}: terminationGracePeriodSeconds {grace} <= drain timeout {drain}")
            probe = shoal.get("readinessProbe", {}).get("httpGet", {})
            if probe.get("path") != "/health":
                fail(f"{path.name} {doc['kind']}: readiness is not on /health")
            if "preStop" not in shoal.get("lifecycle", {}):
                fail(f"{path.name} {doc['kind']}: no preStop")
            if doc["kind"] == "StatefulSet":
                claims = [c["metadata"]["name"] for c in doc["spec"].get("volumeClaimTemplates", [])]
                mounted = {m["name"]: m["mountPath"] for m in shoal["volumeMounts"]}
                if not any(mounted.get(c) == "/var/lib/shoal" for c in claims):
                    fail(f"{path.name}: the node key's directory is not on a claimed volume")


def check_systemd():
    text = (DEPLOY / "systemd" / "shoal-worker.service").read_text()
    stop = re.search(r"^TimeoutStopSec=(\d+)", text, re.M)
    if not stop or int(stop.group(1)) <= 30:
        fail("systemd: TimeoutStopSec must exceed the drain timeout (30 s)")
    for line in ("Restart=on-failure", "DynamicUser=yes", "StateDirectory=shoal"):
        if line not in text:
            fail(f"systemd: {line} missing")


def main():
    if sys.argv[1:2] == ["env"]:
        print(json.dumps(service_env(sys.argv[2])))
        return
    check_image()
    check_compose()
    check_k8s()
    check_systemd()
    print("deploy/check.py: ok")


if __name__ == "__main__":
    main()
