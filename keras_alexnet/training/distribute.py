"""Strategies: data parallelism, the paper's two-tower model parallelism, multi-worker.

`make_strategy` turns the ``--strategy`` choice into a `tf.distribute.Strategy` and,
for ``towers``, the pair of devices `keras_alexnet.AlexNet` places its towers on:

* ``default``: TensorFlow's default strategy (one device).
* ``mirrored``: `tf.distribute.MirroredStrategy` over every visible GPU, or over the
  logical CPUs made by `configure_cpu_devices` when there is no GPU.
* ``towers``: one replica; tower A on the first GPU (or logical CPU), tower B on the
  second.
* ``multiworker``: `tf.distribute.MultiWorkerMirroredStrategy` from ``TF_CONFIG``; each
  worker mirrors over its own GPUs (or logical CPUs). Keras 3 ``fit`` fails under this
  strategy (keras-team/keras#20585), so the project trains every strategy with its
  own loop (`keras_alexnet.training.loop`).

Logical CPU devices can only be made before TensorFlow initialises its runtime (the
first op, or the first device listing); `configure_cpu_devices` is idempotent and says
so when it is too late.
"""

import json
import os

import tensorflow as tf

STRATEGIES = ("default", "mirrored", "towers", "multiworker")


def configure_cpu_devices(count):
    """Splits the host CPU into ``count`` logical devices.

    Call before any TensorFlow op runs (this function itself starts nothing, so a
    `MultiWorkerMirroredStrategy` can still be made afterwards). Calling again with the
    same ``count`` (or once the runtime already has ``count`` logical CPUs) does nothing.
    """
    if not isinstance(count, int) or count < 1:
        raise ValueError(f"`count` must be a positive int. Received: count={count!r}")
    cpu = tf.config.list_physical_devices("CPU")[0]
    current = tf.config.get_logical_device_configuration(cpu)
    if current is not None and len(current) == count:
        return
    try:
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration() for _ in range(count)])
    except RuntimeError as error:
        have = len(tf.config.list_logical_devices("CPU"))
        if have == count:
            return
        raise RuntimeError(
            f"Cannot split the CPU into {count} logical devices: TensorFlow is already "
            f"initialised with {have}. Pass --cpu-devices before anything runs a "
            f"TensorFlow op (a fresh process). Received: count={count}") from error


def logical_cpus():
    return [d.name for d in tf.config.list_logical_devices("CPU")]


def replica_devices():
    """Every visible GPU, else every logical CPU: the devices a machine mirrors over."""
    gpus = [d.name for d in tf.config.list_logical_devices("GPU")]
    return gpus or logical_cpus()


def tf_config():
    """The parsed ``TF_CONFIG`` environment variable, or ``{}``."""
    raw = os.environ.get("TF_CONFIG", "")
    return json.loads(raw) if raw.strip() else {}


def task():
    """``(task_type, task_index)`` from ``TF_CONFIG``; ``(None, 0)`` without one."""
    info = tf_config().get("task", {})
    return info.get("type"), int(info.get("index", 0))


def is_chief(config=None):
    """Whether this process writes checkpoints, logs and the export.

    The chief is the ``chief`` task if the cluster has one, else ``worker`` 0 (the
    `MultiWorkerMirroredStrategy` convention); a process without ``TF_CONFIG`` is
    its own chief.
    """
    config = tf_config() if config is None else config
    cluster = config.get("cluster", {})
    info = config.get("task", {})
    kind, index = info.get("type"), int(info.get("index", 0))
    if kind is None:
        return True
    if kind == "chief":
        return True
    return kind == "worker" and index == 0 and "chief" not in cluster


def make_strategy(name, cpu_devices=None):
    """``(strategy, tower_devices)`` for a ``--strategy`` choice.

    ``cpu_devices`` splits the CPU first (see `configure_cpu_devices`); it is how the
    mirrored and tower strategies run without GPUs. ``tower_devices`` is ``None``
    except for ``towers``.
    """
    if name not in STRATEGIES:
        raise ValueError(f"`strategy` must be one of {STRATEGIES}. Received: {name!r}")
    if cpu_devices:
        configure_cpu_devices(cpu_devices)
    if name == "default":
        return tf.distribute.get_strategy(), None
    if name == "mirrored":
        return tf.distribute.MirroredStrategy(replica_devices()), None
    if name == "towers":
        devices = replica_devices()
        if len(devices) < 2:
            raise ValueError(
                "--strategy towers needs two devices: two GPUs, or --cpu-devices 2. "
                f"Received: devices={devices}")
        return tf.distribute.get_strategy(), tuple(devices[:2])
    if not tf_config():
        raise ValueError("--strategy multiworker needs the TF_CONFIG environment variable "
                         "(cluster and task); see docs/scale.md.")
    # Ring all-reduce runs on CPUs and GPUs alike; NCCL is picked automatically otherwise.
    # (Physical devices only: listing logical ones would start the runtime too early.)
    options = None
    if not tf.config.list_physical_devices("GPU"):
        options = tf.distribute.experimental.CommunicationOptions(
            implementation=tf.distribute.experimental.CommunicationImplementation.RING)
    return tf.distribute.MultiWorkerMirroredStrategy(communication_options=options), None


def num_workers(strategy):
    """Worker processes in ``strategy``'s cluster (1 without a cluster)."""
    resolver = getattr(strategy, "cluster_resolver", None)  # only multi-worker has one
    spec = resolver.cluster_spec().as_dict() if resolver is not None else {}
    return max(1, sum(len(spec.get(kind, [])) for kind in ("chief", "worker")))
