"""A short `raymoe bench soak` on the test session's Ray: every request gets the outcome its kind expects.

The server (bundled model: it has a tokenizer and a chat template) runs with Ray experts under an app and
route prefix of its own, deleted afterwards. Only outcomes are asserted; times and memory are the bench's to
report (the full run is `raymoe bench soak`, 10,000 requests at concurrency 64).
"""

from bench.leaks import serve_apps
from bench.soak import SoakBenchOptions, report, soak


def test_short_soak_has_no_unexpected_outcome(ray_session):
    o = SoakBenchOptions(requests=160, concurrency=24, min_tokens=2, max_tokens=6, window=60, num_shards=2,
                         expert_num_cpus=0.25, router_num_cpus=0.5, timeout_s=120, seed=1)
    r = soak(o, name="raymoe-soak-test", route_prefix="/soak-test")
    report(r)  # shown with -s, or when an assertion fails
    assert r["unexpected"] == 0, r["unexpected_examples"]
    assert r["requests"] == sum(k["requests"] for k in r["kinds"].values()) == 160  # every request has an outcome
    assert set(r["kinds"]) == {"completion", "completion-stream", "chat", "chat-stream", "cancel", "invalid"}
    assert r["cancelled_mid_stream"] > 0 and r["health_after"] == 200
    assert {label.split("#")[0] for label in r["rss"]} == {"Router", "ExpertShard-0", "ExpertShard-1"}
    assert "raymoe-soak-test" not in serve_apps()
