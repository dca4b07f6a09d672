"""`/metrics` on the coordinator: the swarm as Prometheus sees it (models, coverage, nodes, reports, earnings).

Built from the same bounded answers as `/status` and `/leaderboard`; label values come from strangers' records
and are escaped by prometheus_client's exposition format."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Gauge, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from hivegen.coordinator.status import Page


def coordinator_metrics(status: dict[str, Any], leaders: dict[str, Any]) -> Page:
    registry = CollectorRegistry()
    model_labels = ["model"]
    node_labels = ["model", "node", "address"]

    def gauge(name: str, doc: str, labels: list[str] | None = None) -> Gauge:
        return Gauge(f"hivegen_{name}", doc, labels or [], registry=registry)

    gauge("models", "Models registered in the swarm").set(int(status.get("models_total", 0)))
    blocks = gauge("model_blocks", "Blocks of the model", model_labels)
    nodes = gauge("model_nodes", "Nodes serving part of the model", model_labels)
    missing = gauge("model_missing_blocks", "Blocks of the model no node serves", model_labels)
    covered = gauge("model_covered", "1 when every block of the model is served", model_labels)
    bound = gauge("model_steps_per_second_bound", "Decode steps/s the slowest block allows", model_labels)
    throughput = gauge("node_throughput_steps_per_second", "Decode steps/s a node claims over its span", node_labels)
    sessions = gauge("node_active_sessions", "Sessions open on a node", node_labels)
    cache_free = gauge("node_cache_tokens_free", "KV-cache tokens a node can still give", node_labels)
    for model in status.get("models", []):
        key = str(model.get("model_key", ""))
        blocks.labels(key).set(int(model.get("num_blocks", 0)))
        nodes.labels(key).set(int(model.get("nodes_total", 0)))
        missing.labels(key).set(len(model.get("missing_blocks", [])))
        covered.labels(key).set(1 if model.get("covered") else 0)
        bound.labels(key).set(float(model.get("steps_per_second_bound", 0.0)))
        for node in model.get("nodes", []):
            labels = (key, str(node.get("node_id", "")), str(node.get("address", "")))
            throughput.labels(*labels).set(float(node.get("throughput", 0.0)))
            sessions.labels(*labels).set(int(node.get("active_sessions", 0)))
            cache_free.labels(*labels).set(int(node.get("cache_tokens_free", 0)))
    gauge("reported_nodes", "Node keys reported for wrong answers").set(len(status.get("reported_nodes", [])))
    earned = gauge("account_earned_credits", "Credits the top accounts earned serving", ["account"])
    for leader in leaders.get("top", []):
        earned.labels(str(leader.get("account", ""))).set(float(leader.get("earned", 0.0)))
    return Page(generate_latest(registry).decode(), CONTENT_TYPE_LATEST)
