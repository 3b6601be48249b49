"""Deployment: deploy/prometheus (config, alert rules, their unit tests) and deploy/grafana
(dashboard, provisioning), checked by promtool and run against Debian's real `prometheus`
scraping a real `ingest serve` on loopback.

Needs prometheus and promtool on PATH: `sh tests/install-deps.sh` (as root) installs them.
The Prometheus started here has its own port, data directory and config; a system instance,
if any, is neither used nor disturbed.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import zmq
from prometheus_client.parser import text_string_to_metric_families

from ingest.metrics import CATALOG
from ingest.net import wire
from ingest.shards import batch as batch_codec
from ingest.shards.probe import LATENCY_BUCKETS_S
from tests.kafka_target import Tansu
from tests.support import FAST_HEARTBEATS, Appliance
from tests.test_kafka_listener import KAFKA_PORT_OFFSET

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
PROMETHEUS_DIR = DEPLOY / "prometheus"
DASHBOARD = DEPLOY / "grafana" / "ingest.json"
PROVISIONING = DEPLOY / "grafana" / "provisioning"

# The families the supervisor builds itself; every other family is in CATALOG.
SUPERVISOR_FAMILIES = ("ingest_worker_up", "ingest_worker_restarts_total", "ingest_worker_cpu_seconds_total",
                       "ingest_worker_resident_memory_bytes", "ingest_disk_free_bytes", "ingest_disk_size_bytes")
# One scrape and one rule evaluation a second, so that rates exist within seconds.
SCRAPE_INTERVAL_S = 1
# What Grafana would put in for the dashboard's variables: $__rate_interval is at least four
# scrape intervals; "All" appliances is the instance variable's allValue.
GRAFANA_RATE_INTERVAL = "10s"
PROMETHEUS_READY_TIMEOUT_S = 15
DATA_TIMEOUT_S = 30  # first scrapes, then two samples inside every rate window
TRAFFIC_TICK_S = 0.1
TOPIC = "telemetry"
GROUP = "dashboards"


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not on PATH: run `sh tests/install-deps.sh` as root (Debian's prometheus package)")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PromQLError(Exception):
    """The Prometheus HTTP API refused a query (bad PromQL, bad parameters)."""


class Prometheus:
    """Debian's prometheus on loopback with its own port, data directory and config: the
    shipped prometheus.yml and rules.yml, pointed at `target` and sped up to 1 s."""

    def __init__(self, directory: Path, target: str) -> None:
        self.directory = directory
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None
        directory.mkdir(parents=True)
        shutil.copy(PROMETHEUS_DIR / "rules.yml", directory / "rules.yml")
        text = (PROMETHEUS_DIR / "prometheus.yml").read_text()
        for old, new in (("scrape_interval: 15s", f"scrape_interval: {SCRAPE_INTERVAL_S}s"),
                         ("evaluation_interval: 15s", f"evaluation_interval: {SCRAPE_INTERVAL_S}s"),
                         ('"localhost:9740"', f'"{target}"')):
            if text.count(old) != 1:
                raise AssertionError(f"prometheus.yml no longer holds {old!r} exactly once")
            text = text.replace(old, new)
        (directory / "prometheus.yml").write_text(text)

    def start(self) -> "Prometheus":
        argv = [tool("prometheus"), f"--config.file={self.directory / 'prometheus.yml'}",
                f"--storage.tsdb.path={self.directory / 'data'}", f"--web.listen-address=127.0.0.1:{self.port}",
                "--log.level=warn"]
        log = open(self.directory / "prometheus.log", "ab")
        self.process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        return self

    def wait_ready(self) -> None:
        deadline = time.monotonic() + PROMETHEUS_READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"prometheus exited with {self.process.returncode}:\n{self.log()}")
            try:
                with urllib.request.urlopen(self.url + "/-/ready", timeout=1) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError):
                pass
            time.sleep(0.1)
        raise TimeoutError(f"prometheus not ready in {PROMETHEUS_READY_TIMEOUT_S} s:\n{self.log()}")

    def log(self) -> str:
        return (self.directory / "prometheus.log").read_text(errors="replace")

    def api(self, path: str, **params: str) -> dict:
        """GET /api/v1/<path>; raises PromQLError when Prometheus answers with an error."""
        url = f"{self.url}/api/v1/{path}"
        data = urllib.parse.urlencode(params).encode() if params else None
        try:
            with urllib.request.urlopen(url, data=data, timeout=10) as r:
                body = json.load(r)
        except urllib.error.HTTPError as e:
            body = json.load(e)
        if body.get("status") != "success":
            raise PromQLError(f"{params or path}: {body.get('errorType')}: {body.get('error')}")
        return body["data"]

    def query(self, expr: str) -> list[dict]:
        """The instant vector of `expr` now (a list of {metric, value})."""
        data = self.api("query", query=expr)
        if data["resultType"] != "vector":
            raise PromQLError(f"{expr} is a {data['resultType']}, a panel needs a vector")
        return data["result"]

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


class Traffic(threading.Thread):
    """Everything the dashboard shows, again every tick, until stopped: PUSHed records
    (keyed, so some are forwarded to the other worker), acked batches at acks=1 and
    acks=fsync, a fetch, a malformed frame (invalid), a batch with a broken CRC (a drop)
    and a record produced by a Kafka client through the Kafka listener."""

    def __init__(self, app: Appliance) -> None:
        super().__init__(name="traffic", daemon=True)
        self.app = app
        self.halt = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        push = self.app.ctx.socket(zmq.PUSH)
        push.setsockopt(zmq.LINGER, 0)
        push.connect(self.app.worker_endpoints(0)[0])
        kafka = None
        try:
            from kafka import KafkaProducer  # kafka-python, the `test` extra
            kafka = KafkaProducer(bootstrap_servers=f"127.0.0.1:{self.app.kafka_port}", acks=1)
            tick = 0
            while not self.halt.wait(TRAFFIC_TICK_S):
                self.tick(push, tick)
                kafka.send(TOPIC, b"over kafka %d" % tick, partition=tick % 2).get(timeout=10)
                tick += 1
        except BaseException as e:  # reported by the test that needs the data
            self.error = e
        finally:
            push.close()
            if kafka is not None:
                kafka.close(timeout=5)

    def tick(self, push, tick: int) -> None:
        for i in range(20):
            push.send(wire.RecordMessage(topic=TOPIC, key=b"device-%d" % i, value=b"reading %d" % tick).encode())
        push.send(b"not a frame")
        push.send(wire.BatchMessage(topic=TOPIC, partition=0, batch=corrupt_batch()).encode())
        router = self.app.owner_router(0)
        for acks in (wire.Durability.WRITTEN, wire.Durability.FSYNC):
            reply = self.app.request(router, wire.BatchMessage(topic=TOPIC, partition=0, batch=one_record_batch(),
                                                               acks=acks))
            assert isinstance(reply, wire.ProduceReply), reply
        reply = self.app.request(router, wire.FetchRequest(topic=TOPIC, partition=0, offset=0, max_bytes=4096))
        assert isinstance(reply, wire.FetchReply), reply


def one_record_batch(**idempotence) -> bytes:
    return batch_codec.encode_batch([batch_codec.Record(0, int(time.time() * 1000), None, b"acked")], **idempotence)


def corrupt_batch() -> bytes:
    batch = bytearray(one_record_batch())
    batch[-1] ^= 0xFF  # the CRC no longer matches
    return bytes(batch)


# A processor over the traffic's topic, so the dashboard's processor panels have series.
PROCESSOR = f"""
[[processor]]
name = "deploy-windows"
kind = "aggregate"
source = "{TOPIC}"
sink = "{TOPIC}-windows"
fields = ["temp_c"]
window_ms = 1000
"""


def prepare(app: Appliance) -> None:
    """A topic, one duplicate of an idempotent batch and a consumer group's commit."""
    reply = app.request(app.bootstrap, wire.CreateTopicRequest(topic=TOPIC, partitions=2))
    assert isinstance(reply, wire.CreateTopicReply), reply
    batch = one_record_batch(producer_id=7, producer_epoch=0, base_sequence=0)
    for _ in range(2):  # the second is a retry: answered, counted, not stored again
        reply = app.request(app.owner_router(0), wire.BatchMessage(topic=TOPIC, partition=0, batch=batch,
                                                                   acks=wire.Durability.FSYNC))
        assert isinstance(reply, wire.ProduceReply), reply
    reply = app.request(app.owner_router(0), wire.OffsetCommitRequest(group=GROUP, topic=TOPIC, offsets=((0, 1),)))
    assert isinstance(reply, wire.OffsetCommitReply), reply


def uplink_config(kafka: Tansu) -> str:
    """An uplink of the topic to a real Kafka-protocol broker, so that its metrics exist."""
    return f"""
[[uplink]]
name = "dc"
bootstrap_servers = "{kafka.bootstrap}"
[[uplink.topic]]
name = "{TOPIC}"
"""


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """(appliance, prometheus, traffic): a real appliance under steady traffic, forwarding
    it to a Kafka-protocol broker (Tansu), scraped every second by a real Prometheus that
    evaluates the shipped rules."""
    base = tmp_path_factory.mktemp("deploy")
    kafka = Tansu(base / "tansu").start()
    kafka.create_topic(TOPIC, 2)
    app = Appliance(base / "data", workers=2)
    app.kafka_port = app.port + KAFKA_PORT_OFFSET
    app.config_text = (FAST_HEARTBEATS + uplink_config(kafka) + PROCESSOR
                       + f"\n[kafka]\nenabled = true\nport = {app.kafka_port}\n")
    prometheus = Prometheus(base / "prometheus", f"127.0.0.1:{app.metrics_port}").start()
    traffic = Traffic(app)
    try:
        app.start()
        prometheus.wait_ready()
        prepare(app)
        traffic.start()
        yield app, prometheus, traffic
    finally:
        traffic.halt.set()
        if traffic.is_alive():
            traffic.join(10)
        prometheus.stop()
        app.stop()
        kafka.stop()


def wait_for_values(prometheus: Prometheus, traffic: Traffic, exprs: list[str]) -> dict[str, str]:
    """Poll until every expression returns at least one finite sample; returns what is
    still missing at the deadline (expr -> why), {} when all have data."""
    missing = {e: "never queried" for e in exprs}
    deadline = time.monotonic() + DATA_TIMEOUT_S
    while missing and time.monotonic() < deadline:
        assert traffic.error is None, f"traffic failed: {traffic.error!r}"
        for expr in list(missing):
            result = prometheus.query(expr)  # PromQLError: not valid PromQL, fails the test at once
            values = [float(sample["value"][1]) for sample in result]
            if any(math.isfinite(v) for v in values):
                del missing[expr]
            else:
                missing[expr] = f"result {values}" if values else "empty result"
        if missing:
            time.sleep(0.5)
    return missing


# ---- Prometheus config and alert rules ---------------------------------------------------------

def test_shipped_prometheus_config_and_rules_pass_promtool_checks():
    check = subprocess.run([tool("promtool"), "check", "config", str(PROMETHEUS_DIR / "prometheus.yml")],
                           capture_output=True, text=True)
    output = check.stdout + check.stderr
    assert check.returncode == 0, output
    assert "SUCCESS: 1 rule files found" in output, output
    rules = subprocess.run([tool("promtool"), "check", "rules", str(PROMETHEUS_DIR / "rules.yml")],
                           capture_output=True, text=True)
    assert rules.returncode == 0, rules.stdout + rules.stderr
    assert re.search(r"SUCCESS: \d+ rules found", rules.stdout)
    assert "WARNING" not in output + rules.stdout + rules.stderr


def alert_names() -> list[str]:
    return re.findall(r"^\s*- alert: (\w+)\s*$", (PROMETHEUS_DIR / "rules.yml").read_text(), re.MULTILINE)


def test_alert_unit_tests_pass_and_every_alert_has_a_firing_and_a_quiet_case():
    run = subprocess.run([tool("promtool"), "test", "rules", "rules_test.yml"], cwd=PROMETHEUS_DIR,
                         capture_output=True, text=True)
    assert run.returncode == 0 and "SUCCESS" in run.stdout, run.stdout + run.stderr
    firing, quiet = set(), set()
    text = (PROMETHEUS_DIR / "rules_test.yml").read_text()
    for name, expected in re.findall(r"alertname: (\w+)\n\s*exp_alerts:(.*)\n", text):
        (quiet if expected.strip() == "[]" else firing).add(name)
    names = alert_names()
    assert len(names) >= 9 and len(set(names)) == len(names)
    assert sorted(set(names) - firing) == [], "alerts without a case where they fire"
    assert sorted(set(names) - quiet) == [], "alerts without a case where they must stay quiet"
    assert sorted((firing | quiet) - set(names)) == [], "unit tests of alerts that do not exist"


def test_each_alerts_unit_tests_fail_when_that_alert_can_never_fire(stack, tmp_path):
    """Mutants of rules.yml, one per alert, each with that alert's expression replaced by one
    that never returns anything: the unit tests must catch every one."""
    _, prometheus, _ = stack
    rules = [rule for group in prometheus.api("rules")["groups"] for rule in group["rules"]]
    assert sorted(r["name"] for r in rules) == sorted(alert_names())  # what Prometheus loaded is the file

    def write_rules(directory: Path, never_fires: str | None) -> Path:
        directory.mkdir()
        shutil.copy(PROMETHEUS_DIR / "rules_test.yml", directory / "rules_test.yml")
        group = [{"alert": r["name"], "expr": "vector(1) == 2" if r["name"] == never_fires else r["query"],
                  "for": f"{int(r['duration'])}s", "labels": r["labels"], "annotations": r["annotations"]}
                 for r in rules]
        # JSON is YAML: promtool reads it as a rules file.
        (directory / "rules.yml").write_text(json.dumps({"groups": [{"name": "ingest", "rules": group}]}))
        return directory

    runs = {name: subprocess.Popen([tool("promtool"), "test", "rules", "rules_test.yml"],
                                   cwd=write_rules(tmp_path / str(name), name),
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for name in [None] + alert_names()}
    outputs = {name: (run.communicate(60)[0], run.returncode) for name, run in runs.items()}
    original_output, original_code = outputs.pop(None)
    assert original_code == 0, "the rules as Prometheus loaded them fail their own tests:\n" + original_output
    for name, (output, code) in outputs.items():
        assert code != 0, f"nothing tests that {name} fires"
        assert f"alertname: {name}," in output, output


# ---- A real Prometheus scraping a real appliance -----------------------------------------------

def test_prometheus_scrapes_the_appliance_and_sees_records_and_offsets_move(stack):
    _, prometheus, traffic = stack
    records_rate = f'sum(rate(ingest_records_received_total{{topic="{TOPIC}"}}[{GRAFANA_RATE_INTERVAL}]))'
    end_offsets = f'sum(ingest_log_end_offset{{topic="{TOPIC}"}})'
    assert wait_for_values(prometheus, traffic, ['up{job="ingest"} == 1', records_rate, end_offsets]) == {}
    first = float(prometheus.query(end_offsets)[0]["value"][1])
    deadline = time.monotonic() + 10
    while float(prometheus.query(end_offsets)[0]["value"][1]) <= first:
        assert time.monotonic() < deadline, "log end offsets stood still in Prometheus"
        time.sleep(0.5)
    assert float(prometheus.query(records_rate)[0]["value"][1]) > 0
    lag = prometheus.query(f'ingest_consumer_group_lag_records{{group="{GROUP}", partition="0"}}')
    assert len(lag) == 1 and float(lag[0]["value"][1]) > 0  # committed 1, the log went on


def panel_targets() -> list[tuple[str, str]]:
    """(panel title, expr) of every query of every panel, rows included."""
    dashboard = json.loads(DASHBOARD.read_text())
    out = []
    for panel in dashboard["panels"]:
        for inner in [panel] + panel.get("panels", []):
            out.extend((inner["title"], t["expr"]) for t in inner.get("targets", ()))
    return out


def as_grafana_sends_it(expr: str) -> str:
    dashboard = json.loads(DASHBOARD.read_text())
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    expr = expr.replace("$__rate_interval", GRAFANA_RATE_INTERVAL)
    expr = expr.replace("$instance", variables["instance"]["allValue"])
    assert "$" not in expr, f"a variable this test does not know: {expr}"
    return expr


def test_every_dashboard_query_is_valid_promql_and_returns_data(stack):
    _, prometheus, traffic = stack
    targets = panel_targets()
    assert len(targets) >= 30
    missing = wait_for_values(prometheus, traffic, [as_grafana_sends_it(expr) for _, expr in targets])
    titles = {as_grafana_sends_it(expr): title for title, expr in targets}
    assert {titles[e]: (e, why) for e, why in missing.items()} == {}


def test_every_dashboard_query_follows_the_appliance_variable():
    for title, expr in panel_targets():
        selectors = re.findall(r"\b(ingest_\w+)(\{[^}]*\})?", expr)
        assert selectors, f"{title}: {expr} reads no ingest metric"
        for name, labels in selectors:
            assert 'instance=~"$instance"' in labels, f"{title}: {name} ignores the appliance variable"


def test_the_dashboard_shows_every_metric_family_the_appliance_exposes(stack):
    app, _, _ = stack
    text = "\n".join(expr for _, expr in panel_targets())
    shown = set(re.findall(r"\b(ingest_\w+?)(?:_bucket|_count|_sum)?\{", text))
    exposed = {"ingest_" + name for name in CATALOG} | set(SUPERVISOR_FAMILIES)
    # The live exposition as parsed: counters lose `_total` in the family name.
    for family in text_string_to_metric_families(app.metrics_text()):
        exposed.add(family.name + "_total" if family.type == "counter" else family.name)
    assert sorted(exposed - shown) == []


def test_alert_rules_evaluate_cleanly_and_invalid_input_is_not_a_drop(stack):
    _, prometheus, traffic = stack
    # The traffic sends a broken CRC every tick: counted as invalid input, never as a drop
    # (a device sending garbage must not page the operator about lost records).
    invalid = f"sum(rate(ingest_frames_invalid_total[{GRAFANA_RATE_INTERVAL}])) > 0"
    assert wait_for_values(prometheus, traffic, [invalid]) == {}
    time.sleep(2.0)  # a few more rule evaluations (1 s interval) with invalid input flowing
    rules = [r for g in prometheus.api("rules")["groups"] for r in g["rules"]]
    states = {r["name"]: r["state"] for r in rules}
    assert [(r["name"], r["health"], r.get("lastError")) for r in rules if r["health"] != "ok"] == []
    # A healthy appliance under traffic: none of these may even be pending. (Disk and fsync
    # alerts depend on the machine running the test, not on the appliance.)
    for name in ("IngestApplianceDown", "IngestWorkerDown", "IngestWorkerRestartsLooping", "IngestStalled",
                 "IngestConsumerLagHigh", "IngestDiskFull", "IngestDropsRising"):
        assert states[name] == "inactive", (name, states)


def test_the_appliance_exposition_passes_promtool_check_metrics(stack):
    app, prometheus, traffic = stack
    # Histograms and labelled counters appear with the first traffic: wait until scraped.
    assert wait_for_values(prometheus, traffic, ["ingest_fsync_duration_seconds_count",
                                                 "ingest_produce_latency_seconds_count",
                                                 "ingest_records_dropped_total"]) == {}
    text = app.metrics_text()
    check = subprocess.run([tool("promtool"), "check", "metrics"], input=text, capture_output=True, text=True)
    assert check.returncode == 0 and check.stdout + check.stderr == "", check.stdout + check.stderr


def test_every_histogram_series_exposes_every_bucket_from_its_first_observation(stack):
    """A bucket series born later than its siblings loses its first increments to rate()."""
    app, prometheus, traffic = stack
    assert wait_for_values(prometheus, traffic, ["ingest_fsync_duration_seconds_count",
                                                 "ingest_produce_latency_seconds_count"]) == {}
    every_bucket = {float(b) for b in LATENCY_BUCKETS_S} | {math.inf}
    histograms = [f for f in text_string_to_metric_families(app.metrics_text()) if f.type == "histogram"]
    assert {f.name for f in histograms} == {"ingest_fsync_duration_seconds", "ingest_produce_latency_seconds"}
    for family in histograms:
        bounds: dict[tuple, set] = {}
        for sample in family.samples:
            if sample.name.endswith("_bucket"):
                key = tuple(sorted((k, v) for k, v in sample.labels.items() if k != "le"))
                bounds.setdefault(key, set()).add(float(sample.labels["le"]))
        assert bounds and all(b == every_bucket for b in bounds.values()), (family.name, bounds)


# ---- Grafana -----------------------------------------------------------------------------------

def test_dashboard_panels_tile_the_grid_with_units_and_the_chosen_datasource():
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] and dashboard["title"]
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    taken: set[tuple[int, int]] = set()
    for panel in dashboard["panels"]:
        grid = panel["gridPos"]
        assert 0 <= grid["x"] and grid["x"] + grid["w"] <= 24, panel["title"]
        cells = {(grid["x"] + dx, grid["y"] + dy) for dx in range(grid["w"]) for dy in range(grid["h"])}
        assert not cells & taken, f"{panel['title']} overlaps another panel"
        taken |= cells
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert panel["fieldConfig"]["defaults"].get("unit"), f"{panel['title']} has no unit"
        assert panel.get("description"), f"{panel['title']} has no description"
        assert panel["targets"], panel["title"]


def test_grafana_provisioning_matches_the_prometheus_config():
    prometheus_yml = (PROMETHEUS_DIR / "prometheus.yml").read_text()
    datasource = (PROVISIONING / "datasources" / "ingest.yml").read_text()
    provider = (PROVISIONING / "dashboards" / "ingest.yml").read_text()
    scrape = re.search(r"^\s*scrape_interval: (\S+)", prometheus_yml, re.MULTILINE).group(1)
    # $__rate_interval is derived from timeInterval: it must be the scrape interval.
    assert re.search(r"^\s*timeInterval: (\S+)", datasource, re.MULTILINE).group(1) == scrape
    assert re.search(r"^\s*type: prometheus\s*$", datasource, re.MULTILINE)
    assert re.search(r"^\s*url: http://localhost:9090\s*$", datasource, re.MULTILINE)  # Prometheus' default
    path = re.search(r"^\s*path: (\S+)", provider, re.MULTILINE).group(1)
    assert path in (DEPLOY / "README.md").read_text()  # the README says where to put ingest.json
