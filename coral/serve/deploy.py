"""Start and stop the Serve application of a run, and the Serve config YAML for ``serve run`` /
``serve deploy``."""

from __future__ import annotations

import logging
import time

import httpx
from ray import serve
from ray.serve.context import _get_global_client  # the controller's target groups, as HAProxy reads them

from coral.config import Config, ServeConfig, parse_override
from coral.errors import ConfigError
from coral.serve.app import application
from coral.typed import is_secret

log = logging.getLogger(__name__)
BUILDER = "coral.serve.app:build"


def url_of(cfg: ServeConfig) -> str:
    return f"http://{cfg.host}:{cfg.port}{cfg.route_prefix.rstrip('/')}"


def wait_healthy(url: str, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if httpx.get(f"{url}/healthz", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{url}/healthz did not answer 200 within {timeout_s:.0f} s")
        time.sleep(0.5)


def start(config: Config, timeout_s: float = 300.0) -> str:
    """Deploy the run's application (checking the checkpoint/index pair first) and wait until it answers."""
    cfg = config.serve
    target = application(config)  # raises IndexMismatch before anything starts
    serve.start(http_options={"host": cfg.host, "port": cfg.port}, logging_config=logging_config(cfg))
    serve.run(
        target,
        name=cfg.app_name,
        route_prefix=cfg.route_prefix,
        blocking=False,
        logging_config=logging_config(cfg),
    )
    url = url_of(cfg)
    wait_healthy(url, timeout_s)
    direct = direct_url(cfg)
    if direct:
        wait_healthy(direct, timeout_s)
    log.info("serving %s at %s (docs: %s/docs); direct: %s", config.run.run_root, url, url, direct)
    return url


def direct_url(cfg: ServeConfig) -> str | None:
    """The URL straight into the application's ingress replica, when Serve runs direct ingress (Ray
    Serve's throughput-optimized mode, ``ray.serve_throughput_optimized``): the request skips Serve's
    proxy, one hop fewer. ``None`` when Serve proxies every request or the app has several ingress
    replicas (a load balancer, e.g. HAProxy, then spreads over them). The port is Serve's (30000 and
    up) and may change when the replica restarts; ``url_of`` is the stable address."""
    groups = _get_global_client().get_serve_details().get("target_groups", [])
    targets = [
        t
        for g in groups
        if g.get("app_name") == cfg.app_name and str(g.get("protocol")).upper().endswith("HTTP")
        for t in g.get("targets", [])
        if t.get("name", "").startswith("SERVE_REPLICA::")
    ]
    if len(targets) != 1:
        return None
    host = cfg.host if cfg.host not in ("0.0.0.0", "::") else targets[0]["ip"]
    return f"http://{host}:{targets[0]['port']}{cfg.route_prefix.rstrip('/')}"


def stop(config: Config, shutdown: bool = True) -> None:
    """Delete the run's application; ``shutdown``: Serve too (its controller and proxies)."""
    serve.delete(config.serve.app_name)
    if shutdown:
        serve.shutdown()


def logging_config(cfg: ServeConfig) -> dict:
    return {"enable_access_log": cfg.access_log}


def serve_config(cfg: ServeConfig, config_path: str | None, overrides: list[str]) -> dict:
    """The Serve config for ``serve run FILE`` / ``serve deploy FILE`` (run from the repository root).
    A secret among ``overrides`` is a ConfigError: the file would carry it to disk and to Serve's
    controller; the replicas take credentials from their environment (AWS_*), as on a cluster."""
    for text in overrides:
        keys, _ = parse_override(text)
        if is_secret(Config, keys):
            raise ConfigError(
                f"{'.'.join(keys)}: a secret is not written into a Serve config; give it to the replicas "
                "in their environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY) instead"
            )
    return {
        "proxy_location": "HeadOnly",
        "http_options": {"host": cfg.host, "port": cfg.port},
        "logging_config": logging_config(cfg),
        "applications": [
            {
                "name": cfg.app_name,
                "route_prefix": cfg.route_prefix,
                "import_path": BUILDER,
                "args": {"config": config_path, "overrides": list(overrides)},
            }
        ],
    }
