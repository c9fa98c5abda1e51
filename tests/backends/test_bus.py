"""The Bus contract: a message published to a topic reaches every instance
subscribed to it, in publish order per publisher; publish counts those
instances; a subscription is in effect once ``subscribe`` returns."""

from __future__ import annotations

import asyncio

from herald_presence.server.backends.base import Backend
from herald_presence.server.model.names import group_topic, visitor_topic

from .conftest import REDIS_ONLY, RecordingListener, StartBackend


async def test_publish_reaches_a_subscriber_in_publish_order_and_counts_instances(
    backend: Backend, listener: RecordingListener
) -> None:
    topic = group_topic("acme")
    await backend.subscribe(topic)
    counts = [await backend.publish(topic, f"m{n}".encode()) for n in range(20)]
    assert counts == [1] * 20  # one instance: this one
    received = [await listener.next_message() for _ in range(20)]
    assert received == [(topic, f"m{n}".encode()) for n in range(20)]


async def test_concurrent_publishes_arrive_in_call_order(backend: Backend, listener: RecordingListener) -> None:
    topic = group_topic("acme")
    await backend.subscribe(topic)
    counts = await asyncio.gather(*(backend.publish(topic, n.to_bytes(2, "big")) for n in range(100)))
    assert counts == [1] * 100
    assert await listener.messages_so_far(backend) == [(topic, n.to_bytes(2, "big")) for n in range(100)]


async def test_publish_to_a_topic_nobody_watches_reaches_no_one(backend: Backend, listener: RecordingListener) -> None:
    await backend.subscribe(group_topic("acme"))
    assert await backend.publish(group_topic("other"), b"lost") == 0
    assert await backend.publish(group_topic("acm"), b"lost") == 0  # a prefix of a watched topic is another topic
    assert await listener.messages_so_far(backend) == []


async def test_messages_keep_their_topic_and_bytes(backend: Backend, listener: RecordingListener) -> None:
    topics = [visitor_topic("acme", "v1"), visitor_topic("acme", "v1:x"), "i:ünïcode", group_topic("acme")]
    for topic in topics:
        await backend.subscribe(topic)
    payloads = [b"", b"\x00\xff\x00", bytes(range(256)), b"x" * 100_000]
    for topic, payload in zip(topics, payloads, strict=True):
        assert await backend.publish(topic, payload) == 1
    assert await listener.messages_so_far(backend) == list(zip(topics, payloads, strict=True))


async def test_subscribing_twice_delivers_each_message_once(backend: Backend, listener: RecordingListener) -> None:
    topic = group_topic("acme")
    await backend.subscribe(topic)
    await backend.subscribe(topic)
    assert await backend.publish(topic, b"once") == 1
    assert await listener.messages_so_far(backend) == [(topic, b"once")]


async def test_unsubscribed_topic_stops_delivering(backend: Backend, listener: RecordingListener) -> None:
    kept, dropped = group_topic("kept"), group_topic("dropped")
    await backend.subscribe(kept)
    await backend.subscribe(dropped)
    await backend.publish(dropped, b"before")
    assert await listener.messages_so_far(backend) == [(dropped, b"before")]

    await backend.unsubscribe(dropped)
    assert await backend.publish(dropped, b"after") == 0
    assert await backend.publish(kept, b"still") == 1
    assert await listener.messages_so_far(backend) == [(kept, b"still")]

    await backend.unsubscribe("t:never-subscribed")  # harmless
    await backend.subscribe(dropped)  # and it can be watched again
    assert await backend.publish(dropped, b"again") == 1
    assert await listener.messages_so_far(backend) == [(dropped, b"again")]


@REDIS_ONLY
async def test_publish_counts_every_subscribed_instance(
    backend: Backend, listener: RecordingListener, another_instance: StartBackend
) -> None:
    other_listener = RecordingListener()
    other = await another_instance(other_listener)
    publisher = await another_instance()
    topic = group_topic("acme")
    await backend.subscribe(topic)
    assert await publisher.publish(topic, b"one") == 1
    await other.subscribe(topic)
    counts = [await publisher.publish(topic, f"m{n}".encode()) for n in range(10)]
    assert counts == [2] * 10

    expected = [(topic, f"m{n}".encode()) for n in range(10)]
    assert [await listener.next_message() for _ in range(11)] == [(topic, b"one"), *expected]
    assert [await other_listener.next_message() for _ in range(10)] == expected


@REDIS_ONLY
async def test_a_message_published_elsewhere_right_after_subscribe_returns_is_delivered(
    backend: Backend, listener: RecordingListener, another_instance: StartBackend
) -> None:
    other = await another_instance()
    for n in range(30):
        topic = visitor_topic("acme", f"v{n}")
        await backend.subscribe(topic)
        assert await other.publish(topic, b"first") == 1
        assert await listener.next_message() == (topic, b"first")


@REDIS_ONLY
async def test_publish_order_holds_per_publisher_across_instances(
    backend: Backend, listener: RecordingListener, another_instance: StartBackend
) -> None:
    a, b = await another_instance(), await another_instance()
    topic = group_topic("acme")
    await backend.subscribe(topic)
    await asyncio.gather(
        *(a.publish(topic, b"a%d" % n) for n in range(50)),
        *(b.publish(topic, b"b%d" % n) for n in range(50)),
    )
    received = [message for _, message in await listener.messages_so_far(backend)]
    assert sorted(received) == sorted([b"a%d" % n for n in range(50)] + [b"b%d" % n for n in range(50)])
    assert [m for m in received if m.startswith(b"a")] == [b"a%d" % n for n in range(50)]
    assert [m for m in received if m.startswith(b"b")] == [b"b%d" % n for n in range(50)]
