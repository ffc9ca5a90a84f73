"""What every section of a run shares (`Context`), and how a record is built.

A record is one JSON object: the section, the row's name and ``status`` (``"ok"``,
``"failed: <reason>"`` or ``"skipped: <reason>"``), the run's conditions (the machine
of `bench.conditions.machine`, the oneDNN setting asked for and the one in effect, the
threads, the model's size, the load average when the record was made) and the
measurement: ``value`` in ``unit`` (the median over
repetitions), ``min``/``max``, the repetitions, and where it applies GFLOP/s and the
fraction of the matrix-multiply limit measured in the same run.
"""

import dataclasses
import pathlib
import statistics

from bench.conditions import load_average
from bench.workers import Pool, summary


@dataclasses.dataclass
class Context:
    args: object  # the parsed command line (sizes, repetitions, seconds)
    workdir: pathlib.Path
    pool: Pool
    env: dict  # the environment of every worker and server process
    onednn: str  # TF_ENABLE_ONEDNN_OPTS given to them
    threads: int
    machine: dict
    model: dict = None  # bench.sides_tf.prepare's facts
    limits: dict = dataclasses.field(default_factory=dict)  # dtype -> matmul GFLOP/s

    def record(self, section, name, status="ok", **fields):
        args = self.args
        return {
            "section": section, "name": name, "status": status,
            "onednn": self.onednn, "threads": self.threads,
            "image_size": args.image_size, "width": args.width, "num_classes": args.num_classes,
            "quick": bool(args.quick), **fields, "load_avg_1m": load_average(),
            "conditions": self.machine,
        }


def rounded(value, digits=4):
    """``value`` to ``digits`` significant digits (``None`` stays ``None``)."""
    if value is None:
        return None
    return float(f"{value:.{digits}g}")


def rate_record(ctx, section, side, unit="img/s", flop_per_item=None, limit_dtype=None,
                **fields):
    """The record of a measured `bench.workers.Side`: median rate and spread, per-CPU-second
    rate, and with ``flop_per_item`` GFLOP/s and the fraction of ``ctx.limits[limit_dtype]``."""
    stats = summary(side.rates)
    record = ctx.record(
        section, side.name, side.status, **side.fields, **fields, unit=unit,
        value=rounded(stats["median"]), min=rounded(stats["min"]), max=rounded(stats["max"]),
        reps=len(side.rates), per_rep=[rounded(r) for r in side.rates],
        per_cpu_second=rounded(statistics.median(side.cpu_rates)) if side.cpu_rates else None,
        setup_s=side.setup_s, side_info=side.info)
    if flop_per_item is not None:
        limit = ctx.limits.get(limit_dtype)
        gflops = stats["median"] * flop_per_item / 1e9 if stats["median"] else None
        record.update(
            gflop_per_item=rounded(flop_per_item / 1e9, 6), gflop_per_s=rounded(gflops),
            limit_dtype=limit_dtype, limit_gflop_per_s=rounded(limit),
            fraction_of_limit=rounded(gflops / limit, 3) if gflops and limit else None)
    return record
