"""A ``strategy.run`` training loop, for `tf.distribute.MultiWorkerMirroredStrategy`.

Keras 3 ``fit`` fails under that strategy ("Attempt to convert a value (PerReplica
...)", keras-team/keras#20585), so multi-worker runs train here. It works under any
strategy (the tests also run it mirrored and on one device) and does what ``fit``
would:

* the global batch is ``config.batch_size`` per replica times the replicas in sync;
  each worker reads its own shard of the files through
  ``strategy.distribute_datasets_from_function``;
* the per-example loss is averaged over the *global* batch
  (``tf.nn.compute_average_loss``) and the model's regularisation losses are divided
  by the number of replicas, because the optimiser sums gradients across replicas
  (``fit`` does the same scaling);
* loss, top-1 and top-5 are summed across replicas and workers (``strategy.reduce``),
  so every worker sees the same metrics and takes the same learning-rate decisions;
* every epoch all workers save a ``tf.train.Checkpoint`` (model, optimiser, epoch):
  the chief into ``<run_dir>/backup``, the others into a private temporary folder they
  delete at once. A restarted cluster restores ``<run_dir>/backup`` (a directory every
  worker can read) and continues with the next epoch;
* only the chief writes ``config.json``, ``state.json``, ``history.csv`` and the
  SavedModel export.

Every worker runs the same number of steps per epoch (``num_train // global_batch``
over a repeated dataset), since a collective all-reduce waits for every worker.
"""

import csv
import hashlib
import json
import math
import pathlib
import shutil
import time

import keras
import tensorflow as tf

from keras_alexnet import trainer
from keras_alexnet.training import distribute, input_pipeline

HISTORY_FIELDS = ["epoch", "loss", "lr", "top1", "top5", "val_loss", "val_top1", "val_top5"]


def _per_example_loss(labels, logits):
    return keras.losses.sparse_categorical_crossentropy(labels, logits, from_logits=True)


def _sums(labels, logits, weights):
    """Weighted sums of loss, top-1 hits, top-5 hits and the weights."""
    labels = tf.cast(labels, tf.int32)
    logits = tf.cast(logits, tf.float32)
    loss = _per_example_loss(labels, logits)
    top1 = tf.cast(tf.math.in_top_k(labels, logits, 1), tf.float32)
    top5 = tf.cast(tf.math.in_top_k(labels, logits, 5), tf.float32)
    return tf.stack([tf.reduce_sum(loss * weights), tf.reduce_sum(top1 * weights),
                     tf.reduce_sum(top5 * weights), tf.reduce_sum(weights)])


def make_train_step(model, optimizer, strategy, global_batch, jit_compile=False):
    """A ``tf.function`` taking one distributed batch ``(pixels, labels)``; it updates
    the model and returns the summed ``[loss, top1, top5, count]`` of the batch."""
    replicas = strategy.num_replicas_in_sync
    scales_loss = isinstance(optimizer, keras.optimizers.LossScaleOptimizer)

    def replica_step(pixels, labels):
        with tf.GradientTape() as tape:
            logits = model(pixels, training=True)
            per_example = _per_example_loss(labels, tf.cast(logits, tf.float32))
            loss = tf.nn.compute_average_loss(per_example, global_batch_size=global_batch)
            if model.losses:  # the L2 weight decay; gradients are summed over replicas
                loss += tf.add_n([tf.cast(x, tf.float32) for x in model.losses]) / replicas
            scaled = optimizer.scale_loss(loss) if scales_loss else loss
        grads = tape.gradient(scaled, model.trainable_variables)
        optimizer.apply(grads, model.trainable_variables)
        return _sums(labels, logits, tf.ones_like(per_example))

    if jit_compile:  # XLA compiles each replica's step, as Keras' own train_step does
        replica_step = tf.function(replica_step, jit_compile=True)

    @tf.function
    def step(batch):
        sums = strategy.run(replica_step, args=batch)
        return strategy.reduce(tf.distribute.ReduceOp.SUM, sums, axis=None)

    return step


def make_eval_step(model, strategy):
    def replica_step(pixels, labels, weights):
        return _sums(labels, model(pixels, training=False), weights)

    @tf.function
    def step(batch):
        sums = strategy.run(replica_step, args=batch)
        return strategy.reduce(tf.distribute.ReduceOp.SUM, sums, axis=None)

    return step


def distributed_datasets(strategy, source, config, mean, global_batch):
    """``(train, val, eval_steps)``: per-worker shards of repeated datasets.

    Validation shards are padded with zero-weight examples so that every worker runs
    ``eval_steps`` steps and every real example is counted exactly once.
    """
    size = config.image_size

    def train_fn(ctx):
        batch = ctx.get_per_replica_batch_size(global_batch)
        shard = source.train.shard(ctx.num_input_pipelines, ctx.input_pipeline_id)
        return input_pipeline.training_dataset(
            shard, batch, image_size=size, mean=mean, pca_std=config.pca_std,
            seed=config.seed + ctx.input_pipeline_id).repeat()

    def val_fn(ctx):
        batch = ctx.get_per_replica_batch_size(global_batch)
        shard = source.validation.shard(ctx.num_input_pipelines, ctx.input_pipeline_id)
        real = input_pipeline.evaluation_dataset(shard, batch, image_size=size, mean=mean)
        real = real.unbatch().map(lambda x, y: (x, y, tf.constant(1.0)))
        pad = tf.data.Dataset.from_tensors(
            (tf.zeros([size, size, 3]), tf.constant(0, tf.int64), tf.constant(0.0))).repeat()
        return real.concatenate(pad).batch(batch)

    train = strategy.distribute_datasets_from_function(train_fn)
    val = strategy.distribute_datasets_from_function(val_fn)
    workers = num_workers(strategy)
    per_replica = global_batch // strategy.num_replicas_in_sync
    local_replicas = max(1, strategy.num_replicas_in_sync // workers)
    # Enough steps for the largest shard (the padding makes the rest weightless).
    batches = math.ceil(math.ceil(source.num_validation / workers) / per_replica)
    return train, val, math.ceil(batches / local_replicas)


def num_workers(strategy):
    """Worker processes in ``strategy``'s cluster (1 without a cluster)."""
    resolver = getattr(strategy, "cluster_resolver", None)
    spec = resolver.cluster_spec().as_dict() if resolver is not None else {}
    return max(1, sum(len(spec.get(kind, [])) for kind in ("chief", "worker")))


def _averages(sums, prefix=""):
    loss, top1, top5, count = (float(v) for v in sums)
    count = max(count, 1.0)
    return {f"{prefix}loss": loss / count, f"{prefix}top1": top1 / count,
            f"{prefix}top5": top5 / count}


def run(config, run_dir, export_dir, strategy, *, verbose=1, do_export=True,
        steps_per_epoch=None, force_export=False):
    """Trains (or resumes) ``run_dir`` under ``strategy``; the chief exports.

    Returns the same summary as `keras_alexnet.trainer.run` (``export_path`` is
    ``None`` on workers other than the chief). The same checks come first, before
    anything is written, and a non-finite epoch loss raises
    `keras_alexnet.trainer.NonFiniteLossError` on every worker (the reduced sums are
    the same everywhere) before that epoch is checkpointed or logged.
    """
    start = time.time()
    chief = distribute.is_chief()
    run_dir = pathlib.Path(run_dir)
    backup_dir = run_dir / "backup"
    trainer.read_run(run_dir, config)  # refuses a mismatch before anything is written
    keras.utils.set_random_seed(config.seed)

    replicas = strategy.num_replicas_in_sync
    global_batch = config.batch_size * replicas
    source, mean = trainer.load_data(config)
    trainer.check_source(source)
    steps = steps_per_epoch or source.num_train // global_batch
    if steps < 1:
        raise ValueError(f"The global batch ({global_batch}) is larger than the training "
                         f"set ({source.num_train} images). Received: batch_size="
                         f"{config.batch_size}, replicas={replicas}")
    if chief:
        run_dir.mkdir(parents=True, exist_ok=True)
        for path in trainer.remove_leftovers(run_dir, export_dir if do_export else None):
            print(f"Removed {path}, left by an interrupted run.")
        trainer.write_atomic(run_dir / "config.json", config.to_json())
    train_ds, val_ds, eval_steps = distributed_datasets(strategy, source, config, mean,
                                                        global_batch)

    with trainer.precision_policy(config.mixed_precision), strategy.scope():
        model = trainer.build_model(config, source.num_classes)
        optimizer = trainer.build_optimizer(config, replicas)
        if config.mixed_precision == "mixed_float16":
            optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
        optimizer.build(model.trainable_variables)
        epoch_var = tf.Variable(0, dtype=tf.int64, trainable=False, name="epoch")
    checkpoint = tf.train.Checkpoint(model=model, optimizer=optimizer, epoch=epoch_var)
    latest = tf.train.latest_checkpoint(str(backup_dir))
    schedule = trainer.PlateauSchedule(config.lr_drops, config.plateau_patience)
    model.optimizer = optimizer  # what PlateauSchedule reads; no compile() needed
    schedule.set_model(model)
    if latest:
        checkpoint.restore(latest).assert_existing_objects_matched()
        state_path = run_dir / "state.json"
        if state_path.exists():
            schedule.set_state(json.loads(state_path.read_text())["schedule"])
        print(f"Resuming {run_dir} from {pathlib.Path(latest).name} "
              f"(epoch {int(epoch_var.numpy())}).")
    if chief:  # rows of epochs after the restored checkpoint are written again
        trainer.truncate_history(run_dir / "history.csv", int(epoch_var.numpy()))
    manager = tf.train.CheckpointManager(
        checkpoint, distribute.write_dir(backup_dir, chief), max_to_keep=config.keep_checkpoints)

    train_step = make_train_step(model, optimizer, strategy, global_batch, config.jit_compile)
    eval_step = make_eval_step(model, strategy)

    def evaluate():
        total = tf.zeros([4])
        for _, batch in zip(range(eval_steps), val_ds):
            total += eval_step(batch)
        return _averages(total.numpy(), "val_")

    iterator = iter(train_ds)
    logs = {}
    for epoch in range(int(epoch_var.numpy()), config.epochs):
        total = tf.zeros([4])
        for _ in range(steps):
            total += train_step(next(iterator))
        logs = {"epoch": epoch, **_averages(total.numpy()), **evaluate()}
        for name in ("loss", "val_loss"):
            if not math.isfinite(logs[name]):
                raise trainer.NonFiniteLossError(trainer.non_finite_message(
                    f"Epoch {epoch + 1}", name.replace("val_", "validation "), logs[name],
                    run_dir, config))
        schedule.on_epoch_end(epoch, logs)  # adds "lr" and may divide it by 10
        epoch_var.assign(epoch + 1)
        if chief:  # logged before the checkpoint: a kill in between is truncated on resume
            _append_history(run_dir / "history.csv", logs)
        manager.save(checkpoint_number=epoch + 1)
        if chief:
            state = {"epoch": epoch + 1, "checkpoint": f"ckpt-{epoch + 1}",
                     "schedule": schedule.get_state()}
            trainer.write_atomic(run_dir / "state.json", json.dumps(state, indent=1))
        else:
            shutil.rmtree(manager.directory, ignore_errors=True)
        if verbose:
            print(f"Epoch {epoch + 1}/{config.epochs}: " + ", ".join(
                f"{k} {v:.4f}" for k, v in logs.items() if k != "epoch"), flush=True)

    final = evaluate()
    summary = {"val_loss": final["val_loss"], "val_top1": final["val_top1"],
               "val_top5": final["val_top5"], "epochs": config.epochs, "export_path": None,
               "weights_sha256": weights_digest(model)}
    summary["previous_export"] = None
    if do_export and chief:
        summary["previous_export"] = previous = (
            None if force_export else trainer.previous_export(run_dir, export_dir,
                                                              config.epochs))
        if previous is not None:
            summary["previous_export"] = str(previous)
            print(f"{run_dir} exported epoch {config.epochs} already, to {previous}; nothing "
                  "new exported (force_export=True, or --force-export, exports it again).")
        else:
            path = trainer.export_once(trainer.inference_copy(model), run_dir, export_dir,
                                       source.display_names, mean, config.epochs)
            summary["export_path"] = str(path)
    summary["seconds"] = time.time() - start
    return summary


def weights_digest(model):
    """SHA-256 of every weight's bytes: equal on all workers of an in-sync cluster."""
    digest = hashlib.sha256()
    for weight in model.weights:
        digest.update(keras.ops.convert_to_numpy(weight).tobytes())
    return digest.hexdigest()


def _append_history(path, logs):
    new = not path.exists()
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=HISTORY_FIELDS, extrasaction="ignore")
        if new:
            writer.writeheader()
        writer.writerow(logs)
