"""The markdown report of a run (``results.md``): its conditions, then one table per section.

Every table has one row per record of its section, in the order measured, and ends in
the record's status (``ok``, ``failed: ...`` or ``skipped: ...``); figures are medians
over the repetitions with their min-max spread.
"""

SECTION_TITLES = {
    "matmul": "Matrix-multiply limit",
    "train": "Training throughput",
    "infer": "Inference throughput",
    "serving": "Serving (embedded server, end to end)",
    "warmup": "Warm-up: first request after a version loads",
    "pipeline": "Input pipeline",
}


def number(value, digits=3):
    """A figure for a table: ``-`` for none, integers from 100 up, else ``digits``
    significant digits."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (int, float)):
        if abs(value) >= 100:
            return f"{value:,.0f}"
        return f"{value:.{digits}g}"
    return str(value)


def ratio(value):
    return "-" if value is None else f"{value:.2f}x"


def spread(record):
    if record.get("min") is None:
        return "-"
    return f"{number(record['min'])}-{number(record['max'])}"


def cell(text):
    """``text`` as one table cell: no pipes or newlines, at most 160 characters."""
    return str(text).replace("|", "/").replace("\n", " ")[:160]


def _top5(record):
    """``same/photos`` real photos whose bfloat16 top-5 classes are float32's."""
    top5 = record.get("top5_vs_float32")
    return f"{top5['same_top5']}/{top5['photos']}" if top5 else "-"


def _status(record):
    return cell(record["status"])


COLUMNS = {
    "matmul": [
        ("side", lambda r: r["name"]), ("dtype", lambda r: r["dtype"]), ("n", lambda r: r["n"]),
        ("GFLOP/s", lambda r: number(r["value"])), ("min-max", spread),
        ("limit", lambda r: "yes" if r.get("is_limit") else "-"),
    ],
    "train": [
        ("side", lambda r: r["framework"]), ("strategy", lambda r: r.get("strategy", "-")),
        ("dtype", lambda r: r["dtype"]), ("batch", lambda r: r["batch"]),
        ("img/s", lambda r: number(r["value"])), ("min-max", spread),
        ("GFLOP/s", lambda r: number(r.get("gflop_per_s"))),
        ("fraction of limit", lambda r: number(r.get("fraction_of_limit"), 2)),
        ("vs torch eager", lambda r: ratio(r.get("vs_torch_eager"))),
        ("vs torch.compile", lambda r: ratio(r.get("vs_torch_compile"))),
    ],
    "infer": [
        ("side", lambda r: r["framework"]), ("input", lambda r: r["input"].split(" (")[0]),
        ("dtype", lambda r: r["dtype"]),
        ("batch", lambda r: r["batch"]), ("img/s", lambda r: number(r["value"])),
        ("min-max", spread), ("GFLOP/s", lambda r: number(r.get("gflop_per_s"))),
        ("fraction of limit", lambda r: number(r.get("fraction_of_limit"), 2)),
        ("vs torch eager", lambda r: ratio(r.get("vs_torch_eager"))),
        ("vs torch.compile", lambda r: ratio(r.get("vs_torch_compile"))),
        ("vs ONNX Runtime", lambda r: ratio(r.get("vs_onnxruntime"))),
        ("vs float32", lambda r: ratio(r.get("vs_float32")) if r["dtype"] != "float32"
         else "-"),
        ("max diff vs SavedModel", lambda r: number(r.get("max_abs_diff_vs_savedmodel"), 2)),
        ("top-5 as float32", _top5),
    ],
    "serving": [
        ("path", lambda r: r["name"]), ("batch", lambda r: r["batch"]),
        ("clients", lambda r: r["clients"]), ("img/s", lambda r: number(r["value"])),
        ("min-max", spread), ("p50 ms", lambda r: number(r.get("p50_ms"))),
        ("p99 ms", lambda r: number(r.get("p99_ms"))),
        ("vs in-process", lambda r: ratio(r.get("vs_in_process"))),
        ("failed requests", lambda r: r.get("failed_requests", "-")),
    ],
    "warmup": [
        ("export", lambda r: r["name"]), ("first request ms", lambda r: number(r["first_ms"])),
        ("steady-state ms", lambda r: number(r["steady_ms"])),
        ("first / steady", lambda r: ratio(r["value"])), ("min-max", spread),
        ("load s", lambda r: number(r["load_s"])), ("trials", lambda r: r["reps"]),
    ],
    "pipeline": [
        ("stage", lambda r: r["name"]), ("cores", lambda r: r["cores"]),
        ("img/s", lambda r: number(r["value"])), ("min-max", spread),
        ("img per CPU-s", lambda r: number(r.get("per_cpu_second"))),
        ("CPU utilisation", lambda r: number(r.get("cpu_utilisation"), 2)),
        ("images", lambda r: r.get("images", "-")),
    ],
}


def table(section, records):
    """The markdown table of one section's records."""
    columns = COLUMNS[section] + [("oneDNN", lambda r: r["onednn"]), ("status", _status)]
    lines = ["| " + " | ".join(name for name, _ in columns) + " |",
             "|" + "|".join("---" for _ in columns) + "|"]
    for record in records:
        lines.append("| " + " | ".join(cell(get(record)) for _, get in columns) + " |")
    return "\n".join(lines)


def conditions_text(header):
    """The run's conditions as a bullet list (``header``: `bench.run`'s summary dict)."""
    m = header["machine"]
    v = m["versions"]
    model = header.get("model") or {}
    lines = [
        f"- date: {m['date']}; commit {m['commit']}",
        f"- command: `{header['command']}`",
        f"- CPU: {m['cpu_model']}, {m['cores']} cores ({m['usable_cores']} usable), "
        f"flags {', '.join(m['cpu_flags']) or 'none of interest'}; {m['memory_gib']} GiB",
        f"- load average (1 min) at start / end: {header['load_start']} / {header.get('load_end')}",
        "- versions: " + ", ".join(f"{k} {val}" for k, val in v.items() if val),
        f"- threads: {header['threads']} (torch.set_num_threads, ONNX Runtime intra-op; "
        "TensorFlow's default intra-op pool, one thread per core); oneDNN "
        f"(TF_ENABLE_ONEDNN_OPTS): {', '.join(header['onednn'])}",
        f"- model: {header['image_size']}x{header['image_size']}, width {header['width']}, "
        f"{header['num_classes']} classes"
        + (f", {model['parameters']:,} parameters, {model['forward_flop'] / 1e9:.4g} GFLOP "
           f"forward and {model['train_flop'] / 1e9:.4g} GFLOP per training image "
           f"({model['train_factor']}x forward; conv and dense multiply-adds, 2 FLOP each)"
           if model else ""),
        f"- repetitions: {header['reps']} per side, alternating the sides of each comparison; "
        "medians with min-max",
    ]
    if header["quick"]:
        lines.append("- **--quick**: a tiny model and short repetitions, to check that the "
                     "runner works; these are not speed figures")
    return "\n".join(lines)


def markdown(header, records):
    """The whole ``results.md``."""
    parts = ["# Benchmark results", "", conditions_text(header)]
    for section, title in SECTION_TITLES.items():
        rows = [r for r in records if r["section"] == section]
        if rows:
            parts += ["", f"## {title}", "", table(section, rows)]
    return "\n".join(parts) + "\n"
