"""The serving engine from Python: an embedded two-worker cluster (TCP on loopback)."""

import threading

import pytest

import genie


@pytest.fixture(scope="module")
def engine():
    e = genie.Engine.embedded(workers=2, model="gpt2-small", seed=3)
    yield e
    e.shutdown()


def test_tokens_stream_with_timings(engine):
    stream = engine.submit([1, 2, 3, 4], max_tokens=6)
    tokens = list(stream)
    assert len(tokens) == 6
    assert all(0 <= t < 4096 for t in tokens)
    assert stream.finish_reason == "length"
    t = stream.timings
    assert t["kv_bytes"] > 0 and len(t["token_s"]) == 6
    assert t["prefill_worker"] == 0  # the embedded engine prefills on worker 0
    assert t["prefill_batch"] >= 1
    assert 0 < t["first_token_s"] <= t["token_s"][-1]
    # The same prompt again gives the same greedy tokens.
    assert list(engine.submit([1, 2, 3, 4], max_tokens=6)) == tokens


def test_many_threads_at_once_equal_one_at_a_time(engine):
    prompts = [[7 * i + 1, 2, 3 + i] for i in range(6)]
    alone = [list(engine.submit(p, max_tokens=5)) for p in prompts]
    got = [None] * len(prompts)

    def serve(i):
        got[i] = list(engine.submit(prompts[i], max_tokens=5))

    threads = [threading.Thread(target=serve, args=(i,)) for i in range(len(prompts))]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=120)
    assert got == alone


def test_stop_tokens_seeded_sampling_and_cancel(engine):
    greedy = list(engine.submit([5, 6, 7], max_tokens=6))
    stopped = engine.submit([5, 6, 7], max_tokens=6, stop=[greedy[1]])
    assert list(stopped) == greedy[: greedy.index(greedy[1]) + 1]
    assert stopped.finish_reason == "stop"
    a = list(engine.submit([5, 6, 7], max_tokens=8, temperature=0.8, top_k=40, top_p=0.9, seed=11))
    b = list(engine.submit([5, 6, 7], max_tokens=8, temperature=0.8, top_k=40, top_p=0.9, seed=11))
    assert a == b
    long = engine.submit([1, 2], max_tokens=200)
    assert long.next_token(timeout=60) is not None
    long.cancel()
    assert long.finish_reason == "cancelled"
    assert long.next_token(timeout=1) is None


def test_bad_requests_and_a_full_pool_raise_typed_errors():
    with pytest.raises(ValueError):
        genie.Engine.embedded(workers=0)
    with genie.Engine.embedded(workers=2, model="gpt2-small", kv_pool_mb=1) as small:
        with pytest.raises(ValueError):
            small.submit([], max_tokens=4)
        with pytest.raises(ValueError):
            small.submit([1, 2], max_tokens=10_000)
        # gpt2-small: 4 layers x 128 hidden -> 4 KiB of KV per position; 1 MiB holds 256.
        with pytest.raises(genie.KvPoolFullError) as err:
            small.submit(list(range(1, 300)), max_tokens=10)
        assert isinstance(err.value, genie.GenieError)
        assert err.value.kind == "kv_pool_full" and err.value.need > err.value.free
    with pytest.raises(genie.EngineShutDownError):
        small.submit([1, 2], max_tokens=2)
