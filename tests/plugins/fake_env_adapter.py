"""The fake adapter declaring another environment (``stardist``'s), for testing how the runner picks it."""

from __future__ import annotations

from bench.adapters.registry import register

from cellbench_plugin_fake_adapter import FakeAdapter  # loaded first: CELLBENCH_PLUGINS lists it before


@register("fake-env")
class FakeEnvAdapter(FakeAdapter):
    environment = "stardist"
