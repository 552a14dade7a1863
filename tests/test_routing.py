from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agentworker.config import parse_config
from agentworker.routing import (
    InvalidTenantId,
    jump_consistent_hash,
    route_tenant,
    routing_table,
    routing_table_json,
    shard_of,
    tenant_hash_key,
    validate_tenant_id,
)

VECTORS = json.loads((Path(__file__).parent / "data" / "routing_vectors.json").read_text())
tenant_ids = st.from_regex(r"[a-z0-9][a-z0-9_-]{0,62}", fullmatch=True)


@pytest.mark.parametrize("case", VECTORS["jump_hash_reference"], ids=lambda c: f"{c['key']}-{c['buckets']}")
def test_jump_hash_matches_published_reference_values(case: dict[str, object]) -> None:
    assert jump_consistent_hash(int(str(case["key"])), int(str(case["buckets"]))) == case["bucket"]


def test_vector_file_has_enough_cases() -> None:
    assert len(VECTORS["vectors"]) >= 30
    assert all(set(v["shards"]) == {"1", "2", "8", "16"} for v in VECTORS["vectors"])


@pytest.mark.parametrize("vector", VECTORS["vectors"], ids=lambda v: v["tenant_id"][:20])
def test_routing_vectors(vector: dict[str, object]) -> None:
    tenant = str(vector["tenant_id"])
    # The key, computed independently of the module: BLAKE2b-512, first 8 bytes, big-endian.
    digest = hashlib.new("blake2b", tenant.encode("utf-8")).digest()
    assert len(digest) == 64
    (key,) = struct.unpack(">Q", digest[:8])
    assert str(key) == vector["key"]
    assert f"{key:016x}" == vector["key_hex"]
    assert tenant_hash_key(tenant) == key
    shards = vector["shards"]
    assert isinstance(shards, dict)
    for count, expected in shards.items():
        assert shard_of(tenant, int(count)) == expected


@settings(max_examples=300, deadline=None)
@given(tenant=tenant_ids, shards=st.integers(min_value=1, max_value=512))
def test_shard_is_in_range_and_stable(tenant: str, shards: int) -> None:
    shard = shard_of(tenant, shards)
    assert 0 <= shard < shards
    assert shard_of(tenant, shards) == shard


@pytest.mark.parametrize("n", [1, 2, 3, 7, 8, 15, 31])
def test_growing_by_one_shard_moves_about_one_in_n_plus_one_and_only_to_the_new_shard(n: int) -> None:
    tenants = [f"tenant-{i}" for i in range(20_000)]
    moved = 0
    for tenant in tenants:
        before, after = shard_of(tenant, n), shard_of(tenant, n + 1)
        if before != after:
            moved += 1
            # Never between two old shards: a tenant that moves goes to the new shard.
            assert after == n, f"{tenant} moved from {before} to old shard {after}"
    expected = len(tenants) / (n + 1)
    # Binomial(20000, 1/(n+1)): 6 standard deviations is far beyond chance, far below a real fault.
    sigma = (len(tenants) * (1 / (n + 1)) * (1 - 1 / (n + 1))) ** 0.5
    assert abs(moved - expected) < 6 * sigma + 1, (moved, expected)


@settings(max_examples=200, deadline=None)
@given(tenant=tenant_ids, n=st.integers(min_value=1, max_value=200))
def test_property_a_tenant_only_ever_moves_to_the_newest_shard(tenant: str, n: int) -> None:
    before, after = shard_of(tenant, n), shard_of(tenant, n + 1)
    assert after in (before, n)


def test_shards_are_balanced() -> None:
    counts = [0] * 8
    for i in range(16_000):
        counts[shard_of(f"t{i}", 8)] += 1
    assert min(counts) > 1800 and max(counts) < 2200, counts


@pytest.mark.parametrize("bad", ["Bad Tenant", "", "x" * 80, "../x", "-lead", "_lead", "UPPER", "a/b", "a:b",
                                 "tab\t", "new\n", "é", "x" * 64])
def test_bad_tenant_ids_are_refused_clearly(bad: str) -> None:
    with pytest.raises(InvalidTenantId) as info:
        validate_tenant_id(bad)
    assert repr(bad) in str(info.value)
    assert "must be 1-63 characters" in str(info.value)


def test_non_string_tenant_is_refused() -> None:
    with pytest.raises(InvalidTenantId):
        validate_tenant_id(42)


def test_route_uses_the_tenant_pool_or_the_default() -> None:
    config = parse_config({
        "default_pool": "standard",
        "pools": {"standard": {"shards": 8}, "premium": {"shards": 2}},
        "tenants": {"acme": {"pool": "premium"}, "solo": {"max_pending": 3}},
    })
    acme = route_tenant(config, "acme")
    assert (acme.pool, acme.shard) == ("premium", shard_of("acme", 2))
    assert acme.queue == f"agentworker:queue:premium:{acme.shard}"
    assert route_tenant(config, "solo").pool == "standard"
    other = route_tenant(config, "someone-else")
    assert other.pool == "standard" and other.queue == f"agentworker:queue:standard:{shard_of('someone-else', 8)}"
    with pytest.raises(InvalidTenantId):
        route_tenant(config, "../x")


def test_routing_table_lists_pools_queues_and_explicit_tenants() -> None:
    config = parse_config({"pools": {"standard": {"shards": 3}, "premium": {"shards": 1}},
                           "tenants": {"acme": {"pool": "premium"}}})
    table = routing_table(config)
    assert table["version"] == 2
    assert table["default_pool"] == "standard"
    assert table["pools"]["standard"]["queues"] == [f"agentworker:queue:standard:{i}" for i in range(3)]
    # tenant -> pool, unchanged since version 1 (agentworker.rerouting reads the previous routing from it)
    assert table["tenants"] == {"acme": "premium"}
    assert set(table["tenant_limits"]) == {"acme"}


def test_routing_table_carries_each_tenants_limits_and_the_defaults() -> None:
    config = parse_config({
        "pools": {"standard": {"shards": 4, "job_timeout": 300}, "premium": {"shards": 2}},
        "tenant_defaults": {"max_pending": 100, "rate_limit": "600/m"},
        "tenants": {
            "acme": {"pool": "premium", "max_concurrency": 10, "max_pending": 1000, "job_timeout": 120,
                     "rate_limit": "50/s", "weight": 2},
            "solo": {"max_concurrency": 3},   # the rest from tenant_defaults
            "half": {"rate_limit": "2.5/s"},
        },
    })
    table = routing_table(config)
    assert table["tenants"] == {"acme": "premium", "solo": "standard", "half": "standard"}
    limits = table["tenant_limits"]
    assert limits["acme"] == {"max_pending": 1000, "max_concurrency": 10, "weight": 2, "job_timeout": 120,
                              "rate_limit": {"count": 50, "period_ms": 1000}}
    assert limits["solo"] == {"max_pending": 100, "max_concurrency": 3, "weight": None, "job_timeout": None,
                              "rate_limit": {"count": 600, "period_ms": 60_000}}
    assert limits["half"]["rate_limit"] == {"count": 2.5, "period_ms": 1000}
    assert table["tenant_defaults"] == {"max_pending": 100, "max_concurrency": None,
                                        "rate_limit": {"count": 600, "period_ms": 60_000}, "weight": None,
                                        "job_timeout": None}
    # What is published is what the Python client passes to the enqueue script.
    for tenant in ("acme", "solo", "half"):
        own = config.limits_of(tenant)
        assert limits[tenant]["max_pending"] == own.max_pending
        assert own.rate is not None
        assert limits[tenant]["rate_limit"]["count"] == own.rate.count
        assert limits[tenant]["rate_limit"]["period_ms"] == int(own.rate.period_s * 1000)
    # JSON all the way (what the supervisor writes to Redis).
    assert json.loads(routing_table_json(config)) == table
