"""The compute sections: the matrix-multiply limit, training and inference throughput,
and the input pipeline.

Each section builds its comparison's sides (`bench.workers.Side`), measures them
alternately in one group per dtype or batch size, and returns records
(`bench.context.rate_record`). Ratios are paired: the median over repetitions of one
side's rate over the other's in the same repetition.
"""

import statistics

from bench import conditions
from bench.context import rate_record, rounded
from bench.workers import Side, WorkerError, drop, measure, paired_ratio

POLICY_DTYPE = {"float32": "float32", "mixed_bfloat16": "bfloat16"}  # Keras -> compute dtype


def matmul_section(ctx):
    """GFLOP/s of an ``n x n`` matrix product in float32, and in bfloat16 where the CPU
    has AVX512_BF16 or AMX; TensorFlow's rate is the run's limit (``ctx.limits``),
    PyTorch's is shown beside it."""
    n, args, records = ctx.args.matmul_size, ctx.args, []
    flop = 2 * n**3
    dtypes = ["float32"]
    if conditions.has_bf16(ctx.machine["cpu_flags"]):
        dtypes.append("bfloat16")
    for dtype in dtypes:
        sides = [
            Side(f"tf.matmul {dtype}", "tf", "bench.sides_tf:Matmul", {"n": n, "dtype": dtype},
                 {"framework": "tensorflow", "dtype": dtype, "n": n}),
            Side(f"torch.matmul {dtype}", "torch", "bench.sides_torch:TorchMatmul",
                 {"n": n, "dtype": dtype}, {"framework": "torch", "dtype": dtype, "n": n}),
        ]
        measure(ctx.pool, sides, args.reps, args.seconds)
        for side in sides:
            side.rates = [r * flop / 1e9 for r in side.rates]
            side.cpu_rates = [r * flop / 1e9 for r in side.cpu_rates]
            record = rate_record(ctx, "matmul", side, unit="GFLOP/s",
                                 is_limit=side.kind == "tf")
            if side.kind == "tf" and side.ok:
                ctx.limits[dtype] = record["value"]
            records.append(record)
    if "bfloat16" not in dtypes:
        records.append(ctx.record(
            "matmul", "tf.matmul bfloat16", "skipped: the CPU has neither AVX512_BF16 nor AMX",
            framework="tensorflow", dtype="bfloat16", n=n, unit="GFLOP/s", value=None))
    return records


def _compile_side(name, factory, spec, fields, ctx):
    return Side(name, "torch_compile", factory, {**spec, "compile": True},
                {**fields, "framework": "torch.compile"}, setup_timeout=ctx.args.compile_timeout)


def train_section(ctx):
    """Training img/s of the loop's step (default strategy, ``mirrored`` over 2 logical
    CPUs, the paper's ``towers``) against PyTorch eager and ``torch.compile``, in each of
    ``--dtypes``, all at the global ``--batch``."""
    args, model, records = ctx.args, ctx.model, []
    for policy in args.dtypes:
        dtype = POLICY_DTYPE[policy]
        keras = {"policy": policy, "batch": args.batch, "image_size": args.image_size,
                 "width": args.width, "num_classes": args.num_classes}
        torch = {"state": model["torch_state"], "arch": model["arch"], "batch": args.batch,
                 "dtype": dtype}
        fields = {"dtype": policy, "batch": args.batch}
        sides = [
            Side(f"keras default {policy}", "tf", "bench.sides_tf:KerasTrain",
                 {**keras, "strategy": "default"},
                 {**fields, "framework": "keras", "strategy": "default"}),
            Side(f"keras mirrored {policy}", "tf_split2", "bench.sides_tf:KerasTrain",
                 {**keras, "strategy": "mirrored"},
                 {**fields, "framework": "keras", "strategy": "mirrored --cpu-devices 2"}),
            Side(f"keras towers {policy}", "tf_split2", "bench.sides_tf:KerasTrain",
                 {**keras, "strategy": "towers"},
                 {**fields, "framework": "keras", "strategy": "towers --cpu-devices 2"}),
            Side(f"torch eager {dtype}", "torch", "bench.sides_torch:TorchTrain",
                 {**torch, "compile": False}, {**fields, "framework": "torch eager"}),
            _compile_side(f"torch.compile {dtype}", "bench.sides_torch:TorchTrain", torch,
                          fields, ctx),
        ]
        measure(ctx.pool, sides, args.reps, args.train_seconds)
        eager, compiled = sides[3], sides[4]
        for side in sides:
            records.append(rate_record(
                ctx, "train", side, flop_per_item=model["train_flop"], limit_dtype=dtype,
                vs_torch_eager=paired_ratio(side, eager),
                vs_torch_compile=paired_ratio(side, compiled)))
    ctx.pool.close("tf_split2")  # its models are dropped; give its memory back
    return records


def _max_abs_diff(a, b):
    if a is None or b is None:
        return None
    return max(abs(x - y) for row_a, row_b in zip(a, b) for x, y in zip(row_a, row_b))


def infer_section(ctx):
    """Inference img/s at each of ``--infer-batches``: the exported SavedModel's
    ``serving_pixels`` and ``serving_default`` (JPEG photos, decode and resize included)
    against PyTorch eager, ``torch.compile`` and ONNX Runtime on the same weights and
    pixels, and the same weights exported computing in bfloat16 (stored in bfloat16:
    ``loop.inference_copy(model, "bfloat16")``), whose top-5 on the real photos
    `bench.sides_tf.prepare` compares with float32's; every pixel side's probabilities
    are compared with the SavedModel's. The bfloat16 side's fraction is of the bfloat16
    limit where the CPU has one (AVX512_BF16 or AMX), else of float32's."""
    args, model, records = ctx.args, ctx.model, []
    path = model["version_dir"]
    for batch in args.infer_batches:
        fields = {"dtype": "float32", "batch": batch}
        torch = {"state": model["torch_state"], "arch": model["arch"], "batch": batch}
        ort = Side(f"onnxruntime b{batch}", "ort", "bench.sides_torch:OrtInfer",
                   {"path": model["onnx"], "batch": batch, "image_size": args.image_size},
                   {**fields, "framework": "onnxruntime", "input": "pixels",
                    "onnx_source": model["onnx_source"]})
        if model["onnx"] is None:
            ort.status = f"failed: ONNX conversion: {model['onnx_error']}"
        bf16 = Side(f"savedmodel pixels bfloat16 b{batch}", "tf",
                    "bench.sides_tf:SavedModelInfer",
                    {"path": model["bf16_version_dir"], "signature": "serving_pixels",
                     "batch": batch, "image_size": args.image_size},
                    {**fields, "dtype": "bfloat16", "framework": "savedmodel",
                     "input": "pixels (serving_pixels of the bfloat16 export)",
                     "top5_vs_float32": model["bf16_top5"]})
        if model["bf16_version_dir"] is None:
            bf16.status = f"failed: bfloat16 export: {model['bf16_error']}"
        sides = [
            Side(f"savedmodel pixels b{batch}", "tf", "bench.sides_tf:SavedModelInfer",
                 {"path": path, "signature": "serving_pixels", "batch": batch,
                  "image_size": args.image_size},
                 {**fields, "framework": "savedmodel", "input": "pixels (serving_pixels)"}),
            Side(f"savedmodel jpeg b{batch}", "tf", "bench.sides_tf:SavedModelInfer",
                 {"path": path, "signature": "serving_default", "batch": batch,
                  "image_size": args.image_size},
                 {**fields, "framework": "savedmodel",
                  "input": "JPEG photos (serving_default: decode, resize, crop)"}),
            Side(f"torch eager b{batch}", "torch", "bench.sides_torch:TorchInfer",
                 {**torch, "compile": False},
                 {**fields, "framework": "torch eager", "input": "pixels"}),
            _compile_side(f"torch.compile b{batch}", "bench.sides_torch:TorchInfer", torch,
                          {**fields, "input": "pixels"}, ctx),
            ort,
            bf16,
        ]
        measure(ctx.pool, sides, args.reps, args.seconds, keep=True)
        outputs = {}
        for side in sides:
            if side.ok and side.name != sides[1].name:
                try:
                    outputs[side.name] = ctx.pool.get(side.kind).request(
                        120, op="outputs", side=side.name)["outputs"]
                except WorkerError as error:  # recorded with the side, not fatal
                    outputs[side.name] = None
                    side.info = {**side.info, "outputs_error": str(error)[:200]}
        drop(ctx.pool, sides)
        reference = outputs.get(sides[0].name)
        for side in sides:
            limit = "bfloat16" if side is bf16 and "bfloat16" in ctx.limits else "float32"
            records.append(rate_record(
                ctx, "infer", side, flop_per_item=model["forward_flop"], limit_dtype=limit,
                vs_torch_eager=paired_ratio(side, sides[2]),
                vs_torch_compile=paired_ratio(side, sides[3]),
                vs_onnxruntime=paired_ratio(side, sides[4]),
                vs_float32=paired_ratio(side, sides[0]),
                max_abs_diff_vs_savedmodel=_max_abs_diff(outputs.get(side.name), reference)))
    ctx.pool.close("torch_compile")
    return records


def pipeline_section(ctx):
    """`bench.input_pipeline`'s figures (full training pipeline and decode alone, on
    ``--pipeline-cores``), each a fresh process pinned to that many CPUs, alternately
    ``--pipeline-reps`` times."""
    from bench import input_pipeline

    args, runs, errors = ctx.args, {}, {}
    configs = [(stage, cores) for stage in ("train", "decode") for cores in args.pipeline_cores]
    for _ in range(args.pipeline_reps):
        for stage, cores in configs:
            try:
                runs.setdefault((stage, cores), []).append(input_pipeline.run_child(
                    args.pipeline_folder, cores, args.pipeline_seconds, args.pipeline_batch,
                    args.pipeline_max_side, stage, env=ctx.env,
                    timeout=600 + 10 * args.pipeline_seconds))
            except Exception as error:  # recorded; the other configurations go on
                errors.setdefault((stage, cores), []).append(str(error)[:300])
    records = []
    for stage, cores in configs:
        results = runs.get((stage, cores), [])
        rates = [r["img_per_s"] for r in results]
        last = results[-1] if results else {}
        records.append(ctx.record(
            "pipeline", "full training pipeline" if stage == "train" else "decode only",
            "ok" if results else f"failed: {errors.get((stage, cores), ['?'])[0]}",
            stage=stage, cores=cores, batch=args.pipeline_batch, dtype="float32",
            unit="img/s", value=rounded(statistics.median(rates)) if rates else None,
            min=rounded(min(rates)) if rates else None, max=rounded(max(rates)) if rates else None,
            reps=len(rates), per_rep=rates,
            per_cpu_second=rounded(statistics.median(r["img_per_cpu_s"] for r in results))
            if results else None,
            cpu_utilisation=last.get("cpu_utilisation"), images=last.get("images"),
            mean_pixels=last.get("mean_pixels"), max_side=args.pipeline_max_side,
            folder=str(args.pipeline_folder), seconds_per_rep=args.pipeline_seconds))
    return records
