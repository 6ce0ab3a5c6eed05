"""The deployment (docker-compose.yml and scripts/deploy/): what can be checked without a Docker
engine. The Compose file validates against the compose specification's JSON schema
(scripts/deploy/compose-spec.json: schema/compose-spec.json of github.com/compose-spec/compose-spec
at 170098ba07d9f53c383a41bfd4c5166b0a4529a6, Apache-2.0) and, where
`docker compose` or `docker-compose` is installed, with `config`; every service runs as a
non-root user, has a health check or says why not, and takes its secrets as Docker secrets; the
proxy routes WebSocket upgrades and the unbuffered event stream; the Grafana dashboard queries
only metrics a real gateway exposes."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import pytest
import yaml
from test_gateway import env_for, running_gateway

from app.settings import ConfigError, mongodb_uri_with_password

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "scripts" / "deploy"
# The settings Compose requires (${VAR:?...}); public values, never secrets.
COMPOSE_ENV = {
    "RXLEDGER_JWT_ISSUER": "https://idp.example.org",
    "RXLEDGER_JWT_AUDIENCE": "rxledger",
    "RXLEDGER_ORIGIN": "rx.example.org/log",
    "RXLEDGER_LOG_VKEY": "rx.example.org+01020304+AQ==",
    "RXLEDGER_WITNESS_NAME": "witness.example.org/w1",
    "RXLEDGER_WITNESSES": "witness.example.org/w1+01020304+BA==",
}


def compose() -> dict[str, Any]:
    data = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    assert isinstance(data, dict)
    return data


def services() -> dict[str, dict[str, Any]]:
    found: dict[str, dict[str, Any]] = compose()["services"]
    return found


def test_the_compose_file_validates_against_the_compose_specification():
    schema = json.loads((DEPLOY / "compose-spec.json").read_text())
    jsonschema.Draft7Validator(schema).validate(compose())


def test_the_compose_file_is_refused_by_the_specification_when_broken():
    # The schema check can fail: a misspelt key is an error, not ignored.
    schema = json.loads((DEPLOY / "compose-spec.json").read_text())
    broken = compose()
    broken["services"]["gateway-1"]["helthcheck"] = {"test": ["NONE"]}
    with pytest.raises(jsonschema.ValidationError, match="helthcheck"):
        jsonschema.Draft7Validator(schema).validate(broken)


def compose_command() -> list[str] | None:
    """`docker compose` if the plugin answers, else `docker-compose`, else None."""
    docker = shutil.which("docker")
    if docker:
        probe = subprocess.run(
            [docker, "compose", "version"], capture_output=True, text=True, timeout=30
        )
        if probe.returncode == 0:
            return [docker, "compose"]
    legacy = shutil.which("docker-compose")
    return [legacy] if legacy else None


def test_docker_compose_config_accepts_the_file_and_demands_the_required_settings(tmp_path):
    command = compose_command()
    if command is None:
        pytest.skip(
            "neither `docker compose` nor `docker-compose` is installed (the schema test ran)"
        )
    base = [*command, "--project-directory", str(ROOT), "-f", str(ROOT / "docker-compose.yml")]
    env = {"PATH": "/usr/bin:/bin:/usr/local/bin", "HOME": str(tmp_path), **COMPOSE_ENV}
    ok = subprocess.run(
        [*base, "config", "-q"], env=env, capture_output=True, text=True, timeout=120
    )
    assert ok.returncode == 0, ok.stderr
    env.pop("RXLEDGER_JWT_AUDIENCE")
    refused = subprocess.run(
        [*base, "config", "-q"], env=env, capture_output=True, text=True, timeout=120
    )
    assert refused.returncode != 0
    assert "set RXLEDGER_JWT_AUDIENCE" in refused.stderr


def test_the_deployment_has_the_replica_set_two_gateways_proxy_witness_mirror_and_monitoring():
    found = services()
    assert {"mongo-1", "mongo-2", "mongo-3", "mongo-init", "gateway-1", "gateway-2"} <= set(found)
    assert {"proxy", "witness", "mirror", "prometheus", "grafana"} <= set(found)
    init = (DEPLOY / "mongo-init.js").read_text()
    for member in ("mongo-1:27017", "mongo-2:27017", "mongo-3:27017"):
        assert f'host: "{member}"' in init
    assert found["mirror"]["command"][:2] == ["rxledger", "mirror"]
    assert "--follow" in found["mirror"]["command"]
    assert found["witness"]["command"][:2] == ["rxledger", "witness"]
    for name in ("gateway-1", "gateway-2"):
        assert found[name]["depends_on"]["mongo-init"]["condition"] == (
            "service_completed_successfully"
        )


def test_the_gateways_run_in_production_writing_with_majority_and_journal():
    for name in ("gateway-1", "gateway-2"):
        environment = services()[name]["environment"]
        assert environment["RXLEDGER_MODE"] == "production"
        options = environment["MONGODB_URI"].split("?", 1)[1].split("&")
        assert {"replicaSet=rs0", "w=majority", "journal=true"} <= set(options)
        assert environment["MONGODB_PASSWORD_FILE"].startswith("/run/secrets/")


def test_every_service_runs_as_a_non_root_user():
    for name, service in services().items():
        user = str(service.get("user", ""))
        assert user, f"{name} has no user: its image's default may be root"
        uid = user.split(":")[0]
        assert uid not in ("0", "root"), f"{name} runs as {user}"


def test_every_service_has_a_health_check_or_says_why_not():
    for name, service in services().items():
        check = service.get("healthcheck")
        if check is None:
            assert service.get("x-healthcheck-reason"), f"{name}: no healthcheck and no reason"
            continue
        assert check["test"][0] in ("CMD", "CMD-SHELL") and len(check["test"]) > 1, name


SECRET_WORDS = re.compile(r"PASSWORD|SECRET|TOKEN|PRIVATE|_KEY$", re.IGNORECASE)


def test_no_secret_is_in_the_environment_only_paths_to_docker_secrets():
    data = compose()
    declared = set(data["secrets"])
    for name, service in data["services"].items():
        mounted = {s if isinstance(s, str) else s["source"] for s in service.get("secrets", [])}
        assert mounted <= declared, name
        for key, value in (service.get("environment") or {}).items():
            text = str(value)
            assert "://" not in text or not re.search(r"://[^/@]*:[^/@]*@", text), (
                f"{name}: {key} carries a password in a URI"
            )
            if SECRET_WORDS.search(key.removesuffix("__FILE").removesuffix("_FILE")):
                assert text.startswith("/run/secrets/"), (
                    f"{name}: {key}={text!r} is not a secret path"
                )
                assert text.removeprefix("/run/secrets/") in mounted, f"{name}: {key}"
    for secret in data["secrets"].values():
        assert set(secret) == {"file"} and secret["file"].startswith("./var/keys/")


def nginx_locations(text: str) -> dict[str, str]:
    """Each `location [=|~] PATH {` of the TLS server, mapped to its body (nested blocks kept)."""
    server = text[text.index("listen 8443 ssl") :]
    found: dict[str, str] = {}
    for match in re.finditer(r"location\s+(?:[=~]\s+)?(\S+)\s*\{", server):
        depth, end = 1, match.end()
        while depth:
            depth += {"{": 1, "}": -1}.get(server[end], 0)
            end += 1
        found.setdefault(match.group(1), server[match.end() : end - 1])
    return found


def directives(body: str) -> set[str]:
    return {" ".join(line.split()) for line in body.split(";")}


def test_the_proxy_upgrades_websockets_on_graphql_and_does_not_buffer_events():
    text = (DEPLOY / "nginx.conf").read_text()
    assert re.search(r"map \$http_upgrade \$connection_upgrade \{\s*default upgrade;", text)
    locations = nginx_locations(text)
    graphql = directives(locations["/graphql"])
    assert {
        "proxy_pass http://gateways",
        "proxy_http_version 1.1",
        "proxy_set_header Upgrade $http_upgrade",
        "proxy_set_header Connection $connection_upgrade",
    } <= graphql
    events = directives(locations["/events"])
    assert {"proxy_pass http://gateways", "proxy_buffering off", "proxy_http_version 1.1"} <= events
    assert "gzip off" in events
    assert {"proxy_buffering on", "gzip on"}.isdisjoint(events)
    upstream = re.search(r"upstream gateways \{([^}]*)\}", text)
    assert upstream and {"gateway-1:8000", "gateway-2:8000"} <= set(upstream.group(1).split())
    assert "alias /srv/mirror/" in locations["/mirror/"]
    assert "return 404" in locations["/metrics"]
    mounts = services()["proxy"]["volumes"]
    assert "mirror-data:/srv/mirror:ro" in mounts
    assert "mirror-data:/srv/rxledger/mirror" in services()["mirror"]["volumes"]


def test_the_gateways_trust_forwarded_headers_from_the_proxy_only():
    proxy = services()["proxy"]["networks"]["backend"]["ipv4_address"]
    for name in ("gateway-1", "gateway-2"):
        assert services()[name]["environment"]["FORWARDED_ALLOW_IPS"] == proxy
    text = (DEPLOY / "nginx.conf").read_text()
    assert text.count("proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;") >= 4


def test_prometheus_scrapes_each_gateway():
    config = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    job = next(j for j in config["scrape_configs"] if j["job_name"] == "rxledger")
    assert job["metrics_path"] == "/metrics"
    assert set(job["static_configs"][0]["targets"]) == {"gateway-1:8000", "gateway-2:8000"}


def dashboard_expressions() -> list[str]:
    dashboard = json.loads((DEPLOY / "grafana" / "dashboards" / "rxledger.json").read_text())
    return [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]


PROMQL_WORDS = {"sum", "by", "rate", "max", "histogram_quantile", "le", "path", "status"}
PROMQL_WORDS |= {"type", "outcome", "instance", "job", "time", "max_over_time", "timestamp"}
PROMQL_WORDS |= {"changes"}


def test_the_dashboard_covers_requests_latency_lag_checkpoints_and_witnesses():
    text = "\n".join(dashboard_expressions())
    for name in (
        "rxledger_http_requests_total",
        "rxledger_http_request_seconds_bucket",
        "rxledger_tree_size",
        "rxledger_checkpoint_size",
        "rxledger_checkpoint_published_size",
    ):
        assert name in text
    provisioned = yaml.safe_load(
        (DEPLOY / "grafana/provisioning/dashboards/rxledger.yml").read_text()
    )
    assert provisioned["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards"
    assert (
        "./scripts/deploy/grafana/dashboards:/var/lib/grafana/dashboards:ro"
        in (services()["grafana"]["volumes"])
    )


def exposed_names(metrics: str) -> set[str]:
    names = set()
    for line in metrics.splitlines():
        if line and not line.startswith("#"):
            names.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    return names


def test_every_dashboard_query_names_a_metric_a_real_gateway_exposes(mongo_uri, db_name, tmp_path):
    # Two workers, as in docker-compose.yml: the scrape a Prometheus there would see.
    env = env_for(mongo_uri, db_name, tmp_path, RXLEDGER_WORKERS="2")
    with running_gateway(env, tmp_path / "gateway.log") as base:
        answer = httpx.post(f"{base}/graphql", json={"query": "{ ledger { size } }"}, timeout=10)
        assert answer.status_code == 200, answer.text
        scraped = httpx.get(f"{base}/metrics", timeout=10).text
    exposed = exposed_names(scraped) | {"up"}  # `up` is Prometheus's own, per target
    for expr in dashboard_expressions():
        stripped = re.sub(r'"[^"]*"|\[[^\]]*\]|\{\{[^}]*\}\}', "", expr)
        words = set(re.findall(r"[a-zA-Z_:][a-zA-Z0-9_:]*", stripped)) - PROMQL_WORDS
        assert words <= exposed, f"{expr}: {sorted(words - exposed)} not in /metrics"


def test_promtool_parses_every_dashboard_query_and_the_prometheus_config(tmp_path: Path):
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (Debian: prometheus)")
    rules = {
        "groups": [
            {
                "name": "dashboard",
                "rules": [
                    {"record": f"dashboard:query{i}", "expr": expr}
                    for i, expr in enumerate(dashboard_expressions())
                ],
            }
        ]
    }
    (tmp_path / "rules.yml").write_text(yaml.safe_dump(rules))
    for args in (
        ["check", "rules", str(tmp_path / "rules.yml")],
        ["check", "config", "--syntax-only", str(DEPLOY / "prometheus.yml")],
    ):
        checked = subprocess.run([promtool, *args], capture_output=True, text=True, timeout=60)
        assert checked.returncode == 0, checked.stdout + checked.stderr


# --- MONGODB_PASSWORD_FILE -------------------------------------------------------------------


def test_the_database_password_file_is_percent_encoded_into_the_uri(tmp_path: Path):
    secret = tmp_path / "password"
    secret.write_text("p@ss:w/rd%\n")
    uri = "mongodb://rxledger@mongo-1:27017,mongo-2:27017/?replicaSet=rs0&w=majority"
    assert mongodb_uri_with_password(uri, str(secret)) == (
        "mongodb://rxledger:p%40ss%3Aw%2Frd%25@mongo-1:27017,mongo-2:27017/?replicaSet=rs0&w=majority"
    )
    assert mongodb_uri_with_password(uri, None) == uri


@pytest.mark.parametrize(
    ("uri", "content", "message"),
    [
        ("mongodb://mongo-1:27017/", "pw", "needs a MONGODB_URI that names its user"),
        ("mongodb://u:old@mongo-1:27017/", "pw", "has a password and MONGODB_PASSWORD_FILE"),
        ("mongodb://u@mongo-1:27017/", "\n", "is empty"),
        ("mongodb://u@mongo-1:27017/", None, "No such file"),
    ],
)
def test_a_database_password_file_that_cannot_be_used_is_a_config_error(
    tmp_path: Path, uri: str, content: str | None, message: str
):
    secret = tmp_path / "password"
    if content is not None:
        secret.write_text(content)
    with pytest.raises(ConfigError, match=message):
        mongodb_uri_with_password(uri, str(secret))
