"""Apache Kafka, single-node KRaft, from the jars on Maven Central (fetched once, cached)."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from qsfraud.stack.service import Service, StackError, run_setup_command

KAFKA_VERSION = "3.9.1"
CLUSTER_ID_FILE = "cluster.id"

# librdkafka logs connection refusals while the broker starts; those are expected.
_PROBE_LOG = logging.getLogger("qsfraud.stack.kafka.probe")
_PROBE_LOG.addHandler(logging.NullHandler())
_PROBE_LOG.propagate = False

LOG4J = """\
log4j.rootLogger=WARN, stdout
log4j.appender.stdout=org.apache.log4j.ConsoleAppender
log4j.appender.stdout.layout=org.apache.log4j.PatternLayout
log4j.appender.stdout.layout.ConversionPattern=[%d] %p %m (%c)%n
log4j.logger.kafka.server.KafkaRaftServer=INFO
"""


def cache_dir() -> Path:
    base = os.environ.get("QSFRAUD_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "qsfraud"
    )
    return Path(base)


def require_java() -> str:
    java = shutil.which("java")
    if java is None:
        raise StackError(
            "Java 17 or newer is needed to run Kafka and `java` is not on PATH; "
            "on Debian: apt-get install -y openjdk-17-jre-headless"
        )
    return java


def kafka_classpath() -> Path:
    """The folder of broker jars, fetched from Maven Central with Maven on first use."""
    target = cache_dir() / f"kafka-{KAFKA_VERSION}"
    if (target / ".complete").exists():
        return target
    mvn = shutil.which("mvn")
    if mvn is None:
        raise StackError(
            "Maven is needed once to fetch the Kafka jars from Maven Central and `mvn` is not "
            "on PATH; on Debian: apt-get install -y maven"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    pom_text = (Path(__file__).with_name("kafka-pom.xml")).read_text()
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        pom = Path(tmp) / "pom.xml"
        pom.write_text(pom_text.replace("@KAFKA_VERSION@", KAFKA_VERSION))
        jars = Path(tmp) / "jars"
        run_setup_command(
            [mvn, "-q", "-B", "-f", str(pom), "dependency:copy-dependencies",
             "-DincludeScope=runtime", f"-DoutputDirectory={jars}"],
            "fetching the Kafka jars from Maven Central (mvn)",
        )
        if not any(jars.glob("kafka_2.13-*.jar")):
            raise StackError(f"Maven finished but no Kafka broker jar is in {jars}")
        (jars / ".complete").touch()
        shutil.rmtree(target, ignore_errors=True)
        jars.rename(target)
    return target


class KafkaService(Service):
    """A single-node KRaft broker+controller on loopback."""

    name = "kafka"
    start_timeout = 90.0

    def __init__(self, root: Path, host: str, port: int, controller_port: int,
                 full_jit: bool = False) -> None:
        super().__init__(root, host)
        self.port = port
        self.controller_port = controller_port
        self.full_jit = full_jit
        self.log_dirs = self.data_dir / "data"
        self.properties = self.data_dir / "server.properties"

    @property
    def bootstrap(self) -> str:
        return f"{self.host}:{self.port}"

    def ports(self) -> dict[str, int]:
        return {"port": self.port, "controller_port": self.controller_port}

    def endpoint(self) -> dict[str, Any]:
        return {"bootstrap_servers": self.bootstrap}

    def _write_config(self) -> None:
        props = {
            "process.roles": "broker,controller",
            "node.id": "1",
            "controller.quorum.voters": f"1@{self.host}:{self.controller_port}",
            "listeners": f"PLAINTEXT://{self.host}:{self.port},"
            f"CONTROLLER://{self.host}:{self.controller_port}",
            "advertised.listeners": f"PLAINTEXT://{self.host}:{self.port}",
            "controller.listener.names": "CONTROLLER",
            "inter.broker.listener.name": "PLAINTEXT",
            "listener.security.protocol.map": "CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT",
            "log.dirs": str(self.log_dirs),
            "num.partitions": "1",
            "offsets.topic.replication.factor": "1",
            "offsets.topic.num.partitions": "8",
            "transaction.state.log.replication.factor": "1",
            "transaction.state.log.min.isr": "1",
            "transaction.state.log.num.partitions": "8",
            "group.initial.rebalance.delay.ms": "0",
            "auto.create.topics.enable": "true",
            "log.retention.hours": "168",
            "log.cleaner.enable": "true",
            "transaction.max.timeout.ms": "900000",
        }
        self.properties.write_text("".join(f"{k}={v}\n" for k, v in props.items()))
        (self.data_dir / "log4j.properties").write_text(LOG4J)

    def prepare(self) -> None:
        java = require_java()
        classpath = kafka_classpath()
        self._write_config()
        if (self.log_dirs / "meta.properties").exists():
            return
        id_file = self.data_dir / CLUSTER_ID_FILE
        if not id_file.exists():
            out = run_setup_command(
                [java, "-cp", f"{classpath}/*", "kafka.tools.StorageTool", "random-uuid"],
                "kafka-storage random-uuid",
            )
            id_file.write_text(out.strip().splitlines()[-1])
        run_setup_command(
            [java, "-cp", f"{classpath}/*", *self._jvm_logging(), "kafka.tools.StorageTool",
             "format", "-t", id_file.read_text().strip(), "-c", str(self.properties)],
            "formatting the Kafka log dir",
        )

    def _jvm_logging(self) -> list[str]:
        return [f"-Dlog4j.configuration=file:{self.data_dir / 'log4j.properties'}",
                f"-Dkafka.logs.dir={self.data_dir}"]

    def command(self) -> list[str]:
        # -XX:TieredStopAtLevel=1 (the C1 compiler only): on the 2-core machines this stack
        # runs on, C2's compiler threads compete with everything else for about a minute after
        # the broker starts, and transaction commits stay slow until they are done. Measured
        # with a transactional producer at 500 records/s: p99 to read_committed 245 vs 561 ms
        # in the first 6 s of a fresh broker, 60-150 vs 120-310 ms after two minutes, a third
        # less broker CPU; plain produce/consume throughput was not lower.
        # A broker that runs for minutes under load (full_jit) is another matter: once C2 has
        # compiled the request path it needs less CPU per request. Measured at a steady 1,000
        # transactions/s through a worker: the broker at 75-78 % of a core with C1 only and
        # 49-52 % with C2 a few minutes after start; decision latency p99 95-101 ms and
        # 58-90 ms. The demo (about 600 transactions/s, minutes long) runs with C2 and warms
        # the broker up (warm_up) while its workers start: 300 s at 200/s per retailer, the
        # broker at 30 % of a core against 46 % with C1 only, commit -> decision p99 77-89 ms
        # against 139-157 (2026-12-07, one run each; without the warm-up, C2's compiler
        # threads had taken 35 % of a core in the first 30 s of writes).
        # The heap and G1 settings are those of Kafka's own start scripts (kafka-run-class.sh,
        # KAFKA_HEAP_OPTS): with -Xms256m G1 kept a ~57 MB eden, a 12-27 ms young pause every
        # ~1.5 s at 1,000 transactions/s; with these, one every 7-10 s.
        jit = [] if self.full_jit else ["-XX:TieredStopAtLevel=1"]
        return [
            require_java(), "-Xms1g", "-Xmx1g", "-XX:+UseG1GC", "-XX:MaxGCPauseMillis=20",
            "-XX:InitiatingHeapOccupancyPercent=35", "-XX:+ExplicitGCInvokesConcurrent", *jit,
            "-Djava.awt.headless=true",
            *self._jvm_logging(), "-cp", f"{kafka_classpath()}/*", "kafka.Kafka",
            str(self.properties),
        ]

    def healthy(self) -> bool:
        from confluent_kafka.admin import AdminClient

        conf: dict[str, Any] = {"bootstrap.servers": self.bootstrap, "socket.timeout.ms": 1000,
                                "logger": _PROBE_LOG}
        admin = AdminClient(conf)
        try:
            md = admin.list_topics(timeout=1.0)
        except Exception:
            return False
        return bool(md.brokers)


WARM_UP_TOPIC = "qsfraud.warm-up"


def warm_up(bootstrap: str, seconds: float = 5.0, records_per_transaction: int = 100,
            until: threading.Event | None = None, longest: float = 60.0) -> int:
    """Run a fresh broker's write and read paths for ``seconds``, and on until ``until`` is set
    (at most ``longest`` seconds in all); returns the records written.

    Transactions of small records back to back (as a CDC source writes them), read back under
    ``read_committed`` by a consumer group that commits its offsets (as a worker reads), on a
    scratch topic deleted afterwards. A fresh broker runs these paths interpreted until its
    JIT has compiled them (the loops over a batch's records only after tens of thousands of
    records): the demo's first second of purchases waited ~130 ms at the median for their
    Kafka transactions, against ~25 ms a few seconds later.
    """
    from confluent_kafka import Consumer, Producer, TopicPartition
    from confluent_kafka.admin import AdminClient

    from streams.topics import TopicSpec, ensure_topics

    # already there if a previous warm-up did not finish: then it is used as it is
    ensure_topics(bootstrap, [TopicSpec(WARM_UP_TOPIC, 1, {})])
    conf: dict[str, Any] = {"bootstrap.servers": bootstrap, "logger": _PROBE_LOG}
    admin = AdminClient(conf)
    producer = Producer({"bootstrap.servers": bootstrap, "transactional.id": "qsfraud-warm-up",
                         "linger.ms": 5, "logger": _PROBE_LOG})
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "qsfraud-warm-up",
                         "isolation.level": "read_committed", "enable.auto.commit": False,
                         "auto.offset.reset": "earliest", "logger": _PROBE_LOG})
    written = 0
    try:
        producer.init_transactions(30)
        consumer.assign([TopicPartition(WARM_UP_TOPIC, 0)])
        value = b"x" * 200
        started = time.monotonic()
        while True:
            elapsed = time.monotonic() - started
            if elapsed >= longest or (elapsed >= seconds
                                      and (until is None or until.is_set())):
                break
            producer.begin_transaction()
            for i in range(records_per_transaction):
                producer.produce(WARM_UP_TOPIC, key=str(i).encode(), value=value)
            producer.commit_transaction(30)
            written += records_per_transaction
            messages = consumer.consume(10 * records_per_transaction, timeout=0.005)
            if messages:
                consumer.commit(message=messages[-1], asynchronous=True)
    finally:
        consumer.close()
        producer.flush(10)
        for future in admin.delete_topics([WARM_UP_TOPIC]).values():
            try:
                future.result(30)
            except Exception:  # the stack is the caller's; a leftover scratch topic is harmless
                _PROBE_LOG.debug("could not delete %s", WARM_UP_TOPIC)
    return written
