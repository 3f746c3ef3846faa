"""lasp-train's default XLA flags: added unless the user's XLA_FLAGS names them."""

from __future__ import annotations

from models.cli import DEFAULT_XLA_FLAGS, set_default_xla_flags

LHS = "--xla_gpu_enable_latency_hiding_scheduler"


def test_latency_hiding_scheduler_on_unless_the_user_says_otherwise():
    assert LHS + "=true" in DEFAULT_XLA_FLAGS
    env = {}
    assert set_default_xla_flags(env) == LHS + "=true" == env["XLA_FLAGS"]
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    assert set_default_xla_flags(env).split() == ["--xla_force_host_platform_device_count=8", LHS + "=true"]
    env = {"XLA_FLAGS": LHS + "=false"}
    assert set_default_xla_flags(env) == LHS + "=false"  # the user's choice stands
    assert set_default_xla_flags(env) == LHS + "=false"  # and calling it again changes nothing
