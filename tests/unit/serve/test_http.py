"""Safe by default without Ray: a public bind needs a token, keys go over plain http only to loopback,
secrets stay out of reprs and Serve configs."""

from __future__ import annotations

from dataclasses import replace

import pytest

from coral import net
from coral.config import ServeConfig, StorageConfig, load_config
from coral.errors import ConfigError
from coral.serve import deploy
from coral.serve.http import token_of


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "10.1.2.3", "my-host.example"])
def test_a_public_host_without_a_token_refuses_to_start_naming_the_variable(host, monkeypatch):
    monkeypatch.delenv("CORAL_SERVE_TOKEN", raising=False)
    with pytest.raises(ConfigError, match="CORAL_SERVE_TOKEN is unset or empty"):
        token_of(ServeConfig(host=host))
    monkeypatch.setenv("CORAL_SERVE_TOKEN", "  ")  # blank is unset
    with pytest.raises(ConfigError, match="allow_unauthenticated"):
        token_of(ServeConfig(host=host))
    monkeypatch.setenv("CORAL_SERVE_TOKEN", "t0ken")
    assert token_of(ServeConfig(host=host)) == "t0ken"


def test_open_on_purpose_or_on_loopback_only(monkeypatch):
    monkeypatch.delenv("CORAL_SERVE_TOKEN", raising=False)
    assert token_of(ServeConfig(host="0.0.0.0", allow_unauthenticated=True)) is None
    for host in ("127.0.0.1", "127.0.0.5", "::1", "localhost"):
        assert token_of(ServeConfig(host=host)) is None
    with pytest.raises(ConfigError, match="serve.token_env"):
        token_of(ServeConfig(host="0.0.0.0", token_env=""))


def test_the_serve_entry_point_exits_2_before_ray_starts(tmp_path, monkeypatch, capsys):
    from coral import ray_runtime
    from ray_jobs import serve

    def no_ray(*_):
        raise AssertionError("Ray was started")

    monkeypatch.setattr(ray_runtime, "connect", no_ray)
    monkeypatch.delenv("CORAL_SERVE_TOKEN", raising=False)
    assert serve.main(["--run-root", str(tmp_path), "serve.host=0.0.0.0"]) == 2
    assert "CORAL_SERVE_TOKEN" in capsys.readouterr().err


def test_keys_go_over_plain_http_only_to_loopback():
    assert net.key_stays_private("https://api.example.com/v1")
    assert net.key_stays_private("http://127.0.0.1:8000/v1") and net.key_stays_private("http://[::1]:80/")
    assert not net.key_stays_private("http://api.example.com/v1")
    assert not net.key_stays_private("http://10.0.0.2:8000/v1")
    assert not net.key_stays_private("ftp://127.0.0.1/")


def test_the_openai_engine_refuses_to_send_a_key_in_the_clear(monkeypatch):
    from coral.annotate.engines import OpenAIEngine
    from coral.config import EngineConfig

    monkeypatch.setenv("CORAL_TEST_KEY", "sk-secret")
    cfg = EngineConfig(
        kind="openai", model="m", base_url="http://llm.internal:8000/v1", api_key_env="CORAL_TEST_KEY"
    )
    with pytest.raises(ConfigError, match="in the clear") as e:
        OpenAIEngine(cfg)
    assert "sk-secret" not in str(e.value)
    OpenAIEngine(replace(cfg, base_url="http://127.0.0.1:8000/v1"))  # loopback: fine
    monkeypatch.delenv("CORAL_TEST_KEY")
    OpenAIEngine(cfg)  # no key, nothing to leak


SECRET = "wJalrXUtnFEMI-never-shown"


def test_storage_keys_appear_in_no_repr_and_no_error():
    cfg = StorageConfig(access_key_id="AKIA-never-shown", secret_access_key=SECRET)
    config = load_config(
        None, ["storage.access_key_id=AKIA-never-shown", f"storage.secret_access_key={SECRET}"]
    )
    for text in (repr(cfg), str(cfg), repr(config), str(config)):
        assert SECRET not in text and "AKIA-never-shown" not in text
    with pytest.raises(ConfigError) as e:
        load_config(None, [f"storage.secret_access_key={SECRET}", "storage.max_attempts=many"])
    assert SECRET not in str(e.value)


def test_a_serve_config_never_carries_a_secret():
    cfg = ServeConfig()
    body = deploy.serve_config(cfg, "workflows/demo.yaml", ["run.run_root=runs/x"])
    assert body["applications"][0]["args"]["overrides"] == ["run.run_root=runs/x"]
    with pytest.raises(ConfigError, match="storage.secret_access_key: a secret is not written") as e:
        deploy.serve_config(cfg, None, ["run.run_root=runs/x", f"storage.secret_access_key={SECRET}"])
    assert SECRET not in str(e.value)
