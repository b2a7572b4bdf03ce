"""The persistent compilation cache's directory: the variable, the user cache dir, off."""

import pytest

from gradalign_jax import compilation


@pytest.mark.parametrize("env,xdg,want", [
    ({compilation.ENV: "/x/cache"}, None, "/x/cache"),
    ({compilation.ENV: "off"}, None, None),
    ({compilation.ENV: "0"}, None, None),
    ({}, "/xdg", "/xdg/gradalign_jax/xla"),
], ids=["variable", "off", "zero", "xdg"])
def test_cache_dir(monkeypatch, env, xdg, want):
  monkeypatch.delenv(compilation.ENV, raising=False)
  monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
  for k, v in env.items():
    monkeypatch.setenv(k, v)
  if xdg:
    monkeypatch.setenv("XDG_CACHE_HOME", xdg)
  assert compilation.cache_dir() == want


def test_off_leaves_jax_alone(monkeypatch):
  monkeypatch.setenv(compilation.ENV, "off")
  assert compilation.enable() is None
