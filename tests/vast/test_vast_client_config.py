"""Client configuration: API key lookup order, base URL and a repr without the key."""

from __future__ import annotations

from gpujobs.vast import DEFAULT_URL, VastClient, find_api_key
from gpujobs.vast.transport import api_path, endpoint_key


def write_key(path, key):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(key + "\n")


def test_key_lookup_order(isolated_home, monkeypatch):
    assert find_api_key() is None
    write_key(isolated_home / ".vast_api_key", "legacy-file")
    assert find_api_key() == "legacy-file"
    write_key(isolated_home / ".config" / "vastai" / "vast_api_key", "config-file")
    assert find_api_key() == "config-file"
    monkeypatch.setenv("VAST_API_KEY", "from-env")
    assert find_api_key() == "from-env"
    assert find_api_key("argument") == "argument"


async def test_base_url_from_env(monkeypatch):
    async with VastClient("k") as default:
        assert default.base_url == DEFAULT_URL
    monkeypatch.setenv("VAST_URL", "http://127.0.0.1:9/")
    async with VastClient("k") as from_env:
        assert from_env.base_url == "http://127.0.0.1:9"
    async with VastClient("k", base_url="http://127.0.0.1:8") as explicit:
        assert explicit.base_url == "http://127.0.0.1:8"


async def test_repr_hides_key():
    async with VastClient("super-secret-key", base_url="http://127.0.0.1:9") as vast:
        assert "super-secret-key" not in repr(vast)
        assert "127.0.0.1:9" in repr(vast)


def test_api_path_prefix():
    assert api_path("/bundles/") == "/api/v0/bundles/"
    assert api_path("/api/v1/instances/") == "/api/v1/instances/"
    assert api_path("users/current") == "/api/v0/users/current"


def test_endpoint_key_names():
    assert endpoint_key("put", "/api/v0/asks/123/") == "PUT /asks/{id}/"
    assert endpoint_key("GET", "/api/v0/instances/55?owner=me") == "GET /instances/{id}/"
    assert endpoint_key("GET", "/api/v1/instances/") == "GET /api/v1/instances/"
    assert endpoint_key("PUT", "/api/v0/instances/bid_price/9/") == (
        "PUT /instances/bid_price/{id}/")
