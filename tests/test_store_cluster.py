"""The Redis store on a real three-master Redis Cluster (``redis+cluster://``).

The store's rules run against the cluster in the parametrised store suite
(``tests/test_stores.py``, the ``redis-cluster`` parameter); here, what only a
cluster shows: every key a namespace uses lies in the one hash slot of its tag,
whichever master serves it, and a server pointed at a cluster caches.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis
import redis.cluster
import requests
from redis.crc import key_slot

from runcache.errors import ConfigError, StoreError
from runcache.stores import open_store
from runcache.stores.redis import RedisStore

from conftest import LiveServer, RedisCluster, free_port


@pytest.fixture
def connection(redis_cluster: RedisCluster) -> Iterator[redis.cluster.RedisCluster]:
    client = redis.cluster.RedisCluster(host="127.0.0.1", port=redis_cluster.nodes[0].port)
    yield client
    client.close()


def _namespaces_on_every_master(connection: redis.cluster.RedisCluster) -> dict[str, int]:
    """A namespace for each master, one whose tag's slot that master serves, with the slot."""
    prefix = f"slots-{uuid.uuid4().hex[:8]}-"
    masters = 3  # the fixture's, no replicas
    found: dict[str, str] = {}  # a master's name: the first namespace it serves
    for index in range(1000):
        namespace = f"{prefix}{index}"
        slot = key_slot(namespace.encode())
        found.setdefault(connection.nodes_manager.get_node_from_slot(slot).name, namespace)
        if len(found) == masters:
            return {name: key_slot(name.encode()) for name in found.values()}
    raise AssertionError("no namespace found for some master")


def _every_operation(store: RedisStore) -> None:
    """Each call of the store, so each script and pipeline runs at least once."""
    epoch = store.epoch()
    for index in range(4):
        assert store.put(f"k{index}", b"v", 60, epoch, command=f"echo {index}")
    assert store.get("k0") == b"v"
    assert store.get_stale("k1", 30) == (b"v", False)
    assert store.peek("k2") == b"v"

    async def hits() -> list[bytes | None]:
        # At once, so they go to Redis together (one pipeline of the get script).
        try:
            return await asyncio.gather(*(store.get_async(f"k{i}") for i in range(4)))
        finally:
            await store.aclose()

    assert asyncio.run(hits()) == [b"v"] * 4
    token = store.acquire("k9", 5)
    assert token is not None and store.acquire("k9", 5) is None
    store.release("k9", token)
    store.record_coalesced()
    assert [info.key for info in store.entries("echo", 0, 10)] == ["k3", "k2", "k1", "k0"]
    assert store.entry("k3") is not None
    assert store.delete("k3")
    assert store.delete_matching(lambda command: command == "echo 2") == 1
    assert store.stats().size == 2
    cleared = store.clear()
    assert (cleared.size, cleared.coalesced) == (2, 1)
    assert store.get("k0") is None


def test_every_key_of_a_namespace_is_in_its_tags_slot_on_every_master(
    redis_cluster: RedisCluster, connection: redis.cluster.RedisCluster
) -> None:
    """A script or pipeline touching a key outside the namespace's slot fails on a
    cluster (the node does not serve it, or a transaction spans two slots), for a
    namespace on at least two of the three masters; and no key is left elsewhere."""
    namespaces = _namespaces_on_every_master(connection)
    assert len(namespaces) == len(redis_cluster.nodes) == 3
    for namespace in namespaces:
        store = open_store(f"{redis_cluster.url}?namespace={namespace}", 100, 1 << 20)
        assert isinstance(store, RedisStore)
        try:
            _every_operation(store)
        finally:
            store.close()
    for namespace, slot in namespaces.items():
        keys = []
        for node in redis_cluster.nodes:
            with redis.Redis(port=node.port) as one:
                keys += one.scan_iter(match=f"*{namespace}*", count=1000)
        assert keys, "the operations leave the counts behind"
        assert {key_slot(key) for key in keys} == {slot}, keys


def test_a_script_that_touches_two_slots_is_refused_by_the_cluster(
    redis_cluster: RedisCluster, connection: redis.cluster.RedisCluster
) -> None:
    """What the test above stands on: a master refuses a script whose keys lie in two
    slots, declared or not, as it would refuse one of the store's. (Sent to the master
    directly: the cluster client refuses declared keys of two slots before sending.)"""
    one, two = list(_namespaces_on_every_master(connection))[:2]
    master = connection.nodes_manager.get_node_from_slot(key_slot(one.encode()))
    with redis.Redis(host=master.host, port=master.port) as node:
        with pytest.raises(redis.ResponseError, match="don't hash to the same slot"):
            node.eval(
                "redis.call('SET', KEYS[1], 1); return redis.call('SET', KEYS[2], 1)",
                2,
                f"runcache:{{{one}}}:counts",
                f"runcache:{{{two}}}:counts",
            )
        with pytest.raises(redis.ResponseError, match="non local key"):
            node.eval(
                f"return redis.call('SET', 'runcache:{{{two}}}:counts', 1)",
                1,
                f"runcache:{{{one}}}:counts",
            )


def test_a_server_on_the_cluster_answers_a_miss_then_a_hit(
    redis_cluster: RedisCluster, live_server_factory: Callable[..., LiveServer]
) -> None:
    url = f"{redis_cluster.url}?namespace=serve-{uuid.uuid4().hex}"
    server = live_server_factory("--store", url)
    answers: list[dict[str, Any]] = []
    for _ in range(2):
        response = requests.post(
            server.url + "/api/command", json={"command": "echo on-a-cluster"}, timeout=60
        )
        assert response.status_code == 200, response.text
        answers.append(response.json())
    assert [answer["cached"] for answer in answers] == [False, True]
    assert answers[1]["stdout"] == "on-a-cluster\n"
    health = requests.get(server.url + "/health", timeout=30).json()
    assert health["status"] == "healthy", health
    stats = requests.get(server.url + "/api/cache/stats", timeout=30).json()
    assert (stats["hits"], stats["misses"]) == (1, 1)


def test_a_cluster_has_database_0_only() -> None:
    with pytest.raises(ConfigError, match="database 0 only"):
        open_store("redis+cluster://127.0.0.1:7000/3", 10, 100)


def test_an_unreachable_cluster_is_a_store_error_on_use_not_on_opening() -> None:
    store = open_store(f"redis+cluster://127.0.0.1:{free_port()}?namespace=gone", 10, 100)
    assert store.description.startswith("redis+cluster://127.0.0.1:")
    for call in (lambda: store.get("k"), store.stats, lambda: store.acquire("k", 1)):
        with pytest.raises(StoreError, match="redis\\+cluster://"):
            call()
    store.close()
