"""Start and stop the Serve application of a run, and the Serve config YAML for ``serve run`` /
``serve deploy``."""

from __future__ import annotations

import logging
import time

from coral.config import Config, ServeConfig

log = logging.getLogger(__name__)
BUILDER = "coral.serve.app:build"


def url_of(cfg: ServeConfig) -> str:
    return f"http://{cfg.host}:{cfg.port}{cfg.route_prefix.rstrip('/')}"


def wait_healthy(url: str, timeout_s: float = 120.0) -> None:
    import httpx

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
    from ray import serve

    from coral.serve.app import application

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
    log.info("serving %s at %s (docs: %s/docs)", config.run.run_root, url, url)
    return url


def stop(config: Config) -> None:
    from ray import serve

    serve.delete(config.serve.app_name)
    serve.shutdown()


def logging_config(cfg: ServeConfig) -> dict:
    return {"enable_access_log": cfg.access_log}


def serve_config(cfg: ServeConfig, config_path: str | None, overrides: list[str]) -> dict:
    """The Serve config for ``serve run FILE`` / ``serve deploy FILE`` (run from the repository root)."""
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
