"""The training loop: one ``strategy.run`` loop for every strategy, with exact resume.

`train` builds the model under the strategy's scope, runs ``steps_per_epoch`` steps per
epoch, evaluates after each epoch, and leaves everything in the `RunDirectory`. The
same loop serves one device, `MirroredStrategy`, the paper's two towers and
`MultiWorkerMirroredStrategy` (for which Keras 3 ``fit`` fails: keras-team/keras#20585):

* the global batch is ``config.batch_size`` per replica times the replicas in sync;
  each input pipeline (one per worker) reads its own shard through
  ``strategy.distribute_datasets_from_function``, and every worker runs the same number
  of steps per epoch (a collective all-reduce waits for all of them);
* the per-example loss is averaged over the *global* batch
  (``tf.nn.compute_average_loss``) and the model's regularisation losses are divided
  by the number of replicas, because gradients are summed across replicas (``fit``
  scales the same way);
* loss, top-1 and top-5 are summed across replicas and workers (``strategy.reduce``),
  so every worker sees the same numbers and takes the same decisions.

**Exact resume.** A checkpoint is committed every ``config.checkpoint_every`` steps and
at every epoch end: model variables (including the dropout layers' random state),
optimiser variables, and in ``state.json`` the epoch, the step within it, the epoch's
partial sums and the schedule's state. The input pipeline is a pure function of
``(seed, epoch)`` (`keras_alexnet.training.input_pipeline`), so a resumed run skips to
the step it stopped at and sees exactly the batches it would have. Rerunning the same
command after a kill at any point (SIGKILL included) ends with the same weights and the
same ``history.csv`` as an uninterrupted run; with ``config.deterministic`` the ops are
deterministic too and the weights are bit-identical (tests/test_exact_resume.py).

A non-finite training loss (checked every step) or validation loss raises
`NonFiniteLossError` before anything of that step or epoch is committed.

**Fine-tuning** (``config.init_from``, `keras_alexnet.training.finetune`) is this same
loop: a new run starts from the source's weights with a new fc8, and each epoch trains
the variables of its phase (fc8 alone, then the unfrozen layers) with that phase's
optimiser; every checkpoint holds all of them.
"""

import contextlib
import dataclasses
import hashlib
import math
import time

import keras
import numpy as np
import tensorflow as tf

from keras_alexnet import datasets, export, faults, preprocessing
from keras_alexnet.model import AlexNet
from keras_alexnet.training import distribute, finetune, input_pipeline, pictures
from keras_alexnet.training.fused_sgd import FusedSGD
from keras_alexnet.training.run_dir import RunDirectory, RunState, checkpoint_object
from keras_alexnet.training.schedule import PlateauSchedule


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite: training diverged and was stopped."""


def non_finite_message(where, name, value, run_dir, config):
    return (
        f"{where}: the {name} is {value}, not a finite number; training diverged and was "
        f"stopped. Nothing of these weights was saved or exported; {run_dir} keeps the "
        f"last good checkpoint. Retry with a lower learning rate (it was "
        f"{config.learning_rate:g}) in a new --run-dir."
    )


# Building blocks ----------------------------------------------------------------------

def build_model(config, num_classes, tower_devices=None):
    """The `AlexNet` a configuration describes (towers placed on ``tower_devices``)."""
    return AlexNet(num_classes=num_classes, seed=config.seed, tower_devices=tower_devices,
                   **config.model_kwargs())


def build_optimizer(config, replicas=1, lr_factor=1.0):
    """SGD with momentum (the paper, as `FusedSGD`: Keras' rule, one kernel per variable;
    decay comes from the model's L2 terms) or Adam, wrapped in a ``LossScaleOptimizer``
    under mixed_float16.

    With ``config.scale_lr`` the learning rate is multiplied by ``replicas``, as the
    global batch is (the linear scaling rule of Goyal et al., 2017); ``lr_factor``
    multiplies it too (fine-tuning's unfrozen phase).
    """
    lr = config.learning_rate * (replicas if config.scale_lr else 1) * lr_factor
    if config.optimizer == "sgd":
        optimizer = FusedSGD(learning_rate=lr, momentum=config.momentum)
    elif config.optimizer == "adam":
        optimizer = keras.optimizers.Adam(learning_rate=lr)
    else:
        raise ValueError(f"`optimizer` must be 'sgd' or 'adam'. Received: {config.optimizer!r}")
    if config.mixed_precision == "mixed_float16":
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    return optimizer


TRAINING_POLICIES = (None, "float32", "mixed_float16", "mixed_bfloat16")
INFERENCE_POLICIES = ("float32", "mixed_bfloat16", "bfloat16")


@contextlib.contextmanager
def precision_policy(name, allowed=TRAINING_POLICIES):
    """Sets Keras' global dtype policy (``None`` leaves it) and restores it on exit;
    ``ValueError`` for a name not in ``allowed``."""
    if name not in allowed:
        choices = ", ".join(repr(a) for a in allowed if a is not None)
        raise ValueError(f"The precision policy must be one of {choices}. Received: {name!r}")
    previous = keras.config.dtype_policy()
    if name is not None:
        keras.config.set_dtype_policy(name)
    try:
        yield
    finally:
        keras.config.set_dtype_policy(previous)


def inference_copy(model, policy="float32"):
    """An unplaced, strategy-free copy of an `AlexNet` with the same weights: what gets
    exported (a SavedModel of it carries no mirrored variables).

    ``policy`` (`INFERENCE_POLICIES`) is its dtype policy: ``"float32"`` (the default);
    ``"bfloat16"``, a copy that computes in bfloat16 and stores its weights rounded to
    bfloat16 (fc8, LRN and the softmax stay float32); or ``"mixed_bfloat16"``, the same
    arithmetic from float32 weights, which every call rounds to bfloat16 again: the same
    outputs, but at batch 1 those casts of 61 M weights cost more than bfloat16 saves
    (BENCHMARKS.md).
    """
    with precision_policy(policy, allowed=INFERENCE_POLICIES):
        copy = AlexNet.from_config(model.get_config())
    copy.set_weights([keras.ops.convert_to_numpy(w) for w in model.weights])
    return copy


def load_data(config):
    """``(source, mean)``: the dataset splits and the mean the pipelines subtract."""
    source = datasets.load(config.dataset, data_dir=config.data_dir,
                           manual_dir=config.manual_dir, val_split=config.val_split,
                           seed=config.seed)
    if config.mean == "image":
        from keras_alexnet.training import mean_image

        mean = mean_image.compute_or_load(source, config.data_dir, config.image_size)
    else:
        mean = preprocessing.resolve_mean(config.mean, config.image_size, config.resize)
    return source, mean


def check_source(source):
    """Checks a loaded dataset before training: at least 2 classes, and the first image
    of each split decodes. Raises ValueError naming the problem."""
    if source.num_classes < 2:
        raise ValueError(
            f"Dataset {source.name!r} has {source.num_classes} class(es): classification "
            "needs at least 2 (one sub-folder per class for folder datasets).")
    export.top_k_for(source.num_classes)
    for split, ds in (("training", source.train), ("validation", source.validation)):
        try:
            image_bytes, _ = next(iter(ds.take(1)))
            preprocessing.decode_image(image_bytes)
        except StopIteration:
            raise ValueError(f"The {split} split of {source.name!r} is empty.") from None
        except Exception as error:
            raise ValueError(
                f"The first {split} image of {source.name!r} cannot be read or decoded "
                f"({type(error).__name__}: {str(error).splitlines()[0][:200]}).") from error


def weights_digest(model):
    """SHA-256 of every weight's bytes: equal on all workers of an in-sync cluster."""
    digest = hashlib.sha256()
    for weight in model.weights:
        digest.update(keras.ops.convert_to_numpy(weight).tobytes())
    return digest.hexdigest()


# Steps ----------------------------------------------------------------------------------

def _sums(labels, logits, weights):
    """Weighted sums of loss, top-1 hits, top-5 hits and the weights."""
    labels = tf.cast(labels, tf.int32)
    logits = tf.cast(logits, tf.float32)
    loss = keras.losses.sparse_categorical_crossentropy(labels, logits, from_logits=True)
    top1 = tf.cast(tf.math.in_top_k(labels, logits, 1), tf.float32)
    top5 = tf.cast(tf.math.in_top_k(labels, logits, 5), tf.float32)
    return tf.stack([tf.reduce_sum(loss * weights), tf.reduce_sum(top1 * weights),
                     tf.reduce_sum(top5 * weights), tf.reduce_sum(weights)])


def make_train_step(model, optimizer, strategy, global_batch, jit_compile=False,
                    variables=None):
    """A ``tf.function`` taking one distributed batch ``(pixels, labels)``; it updates
    ``variables`` (default: the model's trainable variables) and returns the summed
    ``[loss, top1, top5, count]`` of the batch. Other variables stay bit for bit."""
    replicas = strategy.num_replicas_in_sync
    scales_loss = isinstance(optimizer, keras.optimizers.LossScaleOptimizer)

    def replica_step(pixels, labels):
        with tf.GradientTape() as tape:
            logits = model(pixels, training=True)
            per_example = keras.losses.sparse_categorical_crossentropy(
                labels, tf.cast(logits, tf.float32), from_logits=True)
            loss = tf.nn.compute_average_loss(per_example, global_batch_size=global_batch)
            if model.losses:  # the L2 weight decay; gradients are summed over replicas
                loss += tf.add_n([tf.cast(x, tf.float32) for x in model.losses]) / replicas
            scaled = optimizer.scale_loss(loss) if scales_loss else loss
        trained = model.trainable_variables if variables is None else variables
        grads = tape.gradient(scaled, trained)
        optimizer.apply(grads, trained)
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


def _averages(sums, prefix=""):
    loss, top1, top5, count = (float(v) for v in sums)
    count = max(count, 1.0)
    return {f"{prefix}loss": loss / count, f"{prefix}top1": top1 / count,
            f"{prefix}top5": top5 / count}


# Data -----------------------------------------------------------------------------------

class Data:
    """The run's input: per-epoch distributed training data and the validation data.

    ``steps_per_epoch`` is ``num_train // global_batch`` for every worker; each input
    pipeline feeds its local replicas ``local_replicas`` per-replica batches per step.
    Validation shards are padded with zero-weight examples so that every worker runs
    ``eval_steps`` steps and every real example is counted exactly once.
    """

    def __init__(self, strategy, source, config, mean, global_batch):
        self.strategy, self.source, self.config, self.mean = strategy, source, config, mean
        self.global_batch = global_batch
        self.workers = distribute.num_workers(strategy)
        self.local_replicas = max(1, strategy.num_replicas_in_sync // self.workers)
        self.per_replica = global_batch // strategy.num_replicas_in_sync
        self.steps_per_epoch = source.num_train // global_batch
        if self.steps_per_epoch < 1:
            raise ValueError(
                f"The global batch ({global_batch}) is larger than the training set "
                f"({source.num_train} images). Received: batch_size={config.batch_size}, "
                f"replicas={strategy.num_replicas_in_sync}")
        batches = math.ceil(math.ceil(source.num_validation / self.workers) / self.per_replica)
        self.eval_steps = math.ceil(batches / self.local_replicas)

    def train_epoch(self, epoch, skip_steps=0):
        """The distributed batches of ``epoch`` from step ``skip_steps`` on."""
        config, size = self.config, self.config.image_size
        per_pipeline = self.local_replicas  # per-replica batches each pipeline feeds a step

        def train_fn(ctx):
            batch = ctx.get_per_replica_batch_size(self.global_batch)
            order = self.source.train_in_order(input_pipeline.epoch_seed(config.seed, epoch))
            shard = order.shard(ctx.num_input_pipelines, ctx.input_pipeline_id)
            return input_pipeline.training_dataset(
                shard, batch, image_size=size, mean=self.mean, pca_std=config.pca_std,
                seed=config.seed + ctx.input_pipeline_id, epoch=epoch,
                num_batches=self.steps_per_epoch * per_pipeline,
                skip_batches=skip_steps * per_pipeline, resize=config.resize,
                augment=config.augment)

        return self.strategy.distribute_datasets_from_function(train_fn)

    def validation(self):
        size = self.config.image_size

        def val_fn(ctx):
            batch = ctx.get_per_replica_batch_size(self.global_batch)
            shard = self.source.validation.shard(ctx.num_input_pipelines,
                                                 ctx.input_pipeline_id)
            real = input_pipeline.evaluation_dataset(shard, batch, image_size=size,
                                                     mean=self.mean,
                                                     resize=self.config.resize)
            real = real.unbatch().map(lambda x, y: (x, y, tf.constant(1.0)))
            pad = tf.data.Dataset.from_tensors(
                (tf.zeros([size, size, 3]), tf.constant(0, tf.int64), tf.constant(0.0)))
            return real.concatenate(pad.repeat()).batch(batch)

        return self.strategy.distribute_datasets_from_function(val_fn)


# Logging --------------------------------------------------------------------------------

class Logger:
    """Progress on stdout and TensorBoard scalars (``logs/train``, ``logs/validation``),
    written by the chief only; other workers get no-op writers. The epoch pictures
    (`keras_alexnet.training.pictures`) go to the train writer too."""

    def __init__(self, run, config, steps_per_epoch, verbose):
        self.config, self.steps, self.verbose = config, steps_per_epoch, verbose if run.chief else 0
        if run.chief:
            self.train_writer = tf.summary.create_file_writer(str(run.log_dir / "train"))
            self.val_writer = tf.summary.create_file_writer(str(run.log_dir / "validation"))
        else:
            self.train_writer = self.val_writer = tf.summary.create_noop_writer()
        self.bar = None

    def start_epoch(self, epoch, step):
        if self.verbose == 1:
            print(f"Epoch {epoch + 1}/{self.config.epochs}")
            self.bar = keras.utils.Progbar(self.steps, stateful_metrics=["loss", "top1"])
            self.bar.update(step)

    def step(self, global_step, step, logs):
        if self.bar is not None:
            self.bar.update(step, values=[(k, logs[k]) for k in ("loss", "top1")])
        if global_step % 10 == 0:
            with self.train_writer.as_default(step=global_step):
                # The epoch's running mean loss so far (the tag predates the name).
                tf.summary.scalar("batch_loss", logs["loss"])

    def end_epoch(self, epoch, logs):
        with self.train_writer.as_default(step=epoch + 1):
            for k in ("loss", "top1", "top5", "lr"):
                tf.summary.scalar(f"epoch_{k}", logs[k])
        with self.val_writer.as_default(step=epoch + 1):
            for k in ("loss", "top1", "top5"):
                tf.summary.scalar(f"epoch_{k}", logs[f"val_{k}"])
        self.train_writer.flush()
        self.val_writer.flush()
        if self.verbose:
            print(f"Epoch {epoch + 1}/{self.config.epochs}: " + ", ".join(
                f"{k} {v:.4f}" for k, v in logs.items() if k != "epoch"), flush=True)


# The run --------------------------------------------------------------------------------

def train(config, run_dir, export_dir="models/alexnet", *, verbose=1, do_export=True,
          force_export=False):
    """Trains (or resumes) the run in ``run_dir`` and exports a SavedModel version.

    With ``config.init_from`` (see `keras_alexnet.training.finetune.prepare_config`) the
    run fine-tunes that model: a new run loads it (after the strategy is made, before
    anything is written) and starts from its weights with a new fc8; a resumed one
    reads only its own checkpoints.

    A finished run that already exported its final epoch into ``export_dir`` exports
    nothing new unless ``force_export``.

    Returns a dict with the final validation ``val_top1``/``val_top5`` (accuracies),
    ``val_loss``, the ``epochs`` trained, ``seconds`` of wall time, ``export_path``
    (``None`` when nothing was exported, and on workers other than the chief),
    ``previous_export`` (the version this run had exported already, when that made the
    export unnecessary) and ``weights_sha256``.

    Raises:
        ValueError: before anything is written, for a configuration the run directory
            cannot resume, ``epochs`` below the epochs trained, a dataset that does
            not load or decode or has fewer than 2 classes, or a fine-tuning source that
            does not load or is not the model the configuration describes.
        NonFiniteLossError: the loss diverged (the last good checkpoint is kept).
    """
    start = time.time()
    finetune.check_config(config)
    run = RunDirectory(run_dir, chief=distribute.is_chief())
    _, state = run.check_resumable(config)  # refuses a mismatch before anything is written
    strategy, tower_devices = distribute.make_strategy(config.strategy, config.cpu_devices)
    if config.deterministic:
        tf.config.experimental.enable_op_determinism()
    resuming = state is not None and state.checkpoint is not None
    init = None  # the fine-tuning source, read for a new run only (before the seed is set)
    if config.init_from is not None and not resuming:
        init = finetune.load_source(config)
    keras.utils.set_random_seed(config.seed)
    replicas = strategy.num_replicas_in_sync
    global_batch = config.batch_size * replicas
    source, mean = load_data(config)
    check_source(source)
    data = Data(strategy, source, config, mean, global_batch)
    if state is not None and state.global_batch not in (0, global_batch):
        raise ValueError(
            f"{run.path} was trained with a global batch of {state.global_batch} "
            f"(batch_size {config.batch_size} x {state.global_batch // config.batch_size} "
            f"replicas); this process has {replicas} replicas, a global batch of "
            f"{global_batch}. Resume with the same number of devices and workers, or "
            "choose a new --run-dir.")

    if run.chief:
        for path in run.clean(state, export_dir if do_export else None):
            print(f"Removed {path}, left by an interrupted run.")
        run.write_config(config)

    with precision_policy(config.mixed_precision):
        with strategy.scope():
            model = build_model(config, source.num_classes, tower_devices)
            phases = finetune.phase_optimizers(config, model, build_optimizer, replicas)
        optimizers = [optimizer for optimizer, _ in phases.values()]
        if len(optimizers) == 1:  # a training run (or fc8 alone): one optimiser, as ever
            optimizers = optimizers[0]
        checkpoint = checkpoint_object(model, optimizers)
        schedule = PlateauSchedule(config.lr_drops, config.plateau_patience)
        if resuming:
            path = run.restore(model, optimizers)
            schedule.set_state(state.schedule)
            print(f"Resuming {run.path} from {path.name} (epoch {state.epoch + 1}, step "
                  f"{state.step} of {data.steps_per_epoch}).")
        else:
            if init is not None:
                finetune.copy_source_weights(init.model, model)
                print(f"Fine-tuning {config.init_source['path']} ({config.init_source['origin']}"
                      f"): every layer's weights but fc8's, a new fc8 of "
                      f"{source.num_classes} classes.", flush=True)
                init = None
            state = RunState(num_classes=source.num_classes, global_batch=global_batch,
                             schedule=schedule.get_state())
        logs = _train_epochs(config, run, data, model, phases, checkpoint, schedule, state,
                             verbose)
        if logs is None:  # nothing left to train (a finished run rerun): measure again
            logs = _evaluate(make_eval_step(model, strategy), data)
    summary = {"val_loss": logs["val_loss"], "val_top1": logs["val_top1"],
               "val_top5": logs["val_top5"], "epochs": config.epochs, "export_path": None,
               "previous_export": None, "weights_sha256": weights_digest(model)}
    if do_export and run.chief:
        previous = None if force_export else run.previous_export(export_dir, config.epochs)
        if previous is not None:
            summary["previous_export"] = str(previous)
            print(f"{run.path} exported epoch {config.epochs} already, to {previous}; nothing "
                  "new exported (force_export=True, or --force-export, exports it again).")
        else:
            metadata = ({"fine_tuned_from": {**config.init_source, "given": config.init_from}}
                        if config.init_from is not None else None)
            path = run.export(inference_copy(model), export_dir, source.display_names, mean,
                              config.epochs, resize=config.resize, metadata=metadata)
            summary["export_path"] = str(path)
    summary["seconds"] = time.time() - start
    return summary


def _evaluate(eval_step, data):
    total = np.zeros(4)
    for _, batch in zip(range(data.eval_steps), data.validation()):
        total += eval_step(batch).numpy()
    return _averages(total, "val_")


def _train_epochs(config, run, data, model, phases, checkpoint, schedule, state, verbose):
    """Runs the epochs left after ``state``; returns the last epoch's logs (``None`` when
    none was left). ``phases`` maps each phase (`TrainConfig.phase`) to its optimiser
    and the variables it trains."""
    strategy, steps = data.strategy, data.steps_per_epoch
    train_steps = {}  # one traced step per phase, made when the phase is first reached

    def phase_step(phase):
        if phase not in train_steps:
            optimizer, variables = phases[phase]
            train_steps[phase] = make_train_step(model, optimizer, strategy, data.global_batch,
                                                 config.jit_compile, variables)
        return train_steps[phase]

    eval_step = make_eval_step(model, strategy)
    logger = Logger(run, config, steps, verbose)
    logs = None

    def commit(state):
        return run.save(checkpoint, state, config.keep_checkpoints, before_commit=lambda:
                        faults.crash_point("checkpoint", state.global_step))

    # A mid-epoch checkpoint is written at once but committed only after the next step's
    # loss is finite: that loss is the first to measure the checkpoint's weights.
    pending = None
    for epoch in range(state.epoch, config.epochs):
        phase = config.phase(epoch)
        optimizer, train_step = phases[phase][0], phase_step(phase)
        if phase == "unfrozen" and epoch == config.head_epochs and state.step == 0 \
                and epoch > 0:
            # Entering the unfrozen phase: the head's learning rate (after any plateau
            # drops) times the factor. Recomputed identically by a resume at this point;
            # a resume later restores it from the checkpoint.
            head_lr = float(keras.ops.convert_to_numpy(phases["head"][0].learning_rate))
            optimizer.learning_rate.assign(head_lr * config.unfreeze_lr_factor)
            print(f"Epoch {epoch + 1}: unfreezing {config.unfreeze} and up "
                  f"({len(phases[phase][1])} variables), learning rate "
                  f"{head_lr * config.unfreeze_lr_factor:.2e}.", flush=True)
        sums = np.asarray(state.train_sums, np.float64)
        logger.start_epoch(epoch, state.step)
        batches = iter(data.train_epoch(epoch, skip_steps=state.step))
        for step in range(state.step + 1, steps + 1):
            sums += train_step(next(batches)).numpy()
            global_step = epoch * steps + step
            loss = float(sums[0] / max(sums[3], 1.0))
            if not math.isfinite(loss):
                raise NonFiniteLossError(non_finite_message(
                    f"Epoch {epoch + 1}, step {step}", "loss", loss, run.path, config))
            if pending is not None:
                state, pending = run.commit(pending, config.keep_checkpoints), None
            logger.step(global_step, step, _averages(sums))
            faults.crash_point("step", global_step)
            if config.checkpoint_every and global_step % config.checkpoint_every == 0 \
                    and step < steps:
                pending = dataclasses.replace(
                    state, epoch=epoch, step=step, global_step=global_step,
                    train_sums=tuple(float(s) for s in sums), schedule=schedule.get_state())
                run.write(checkpoint, pending)
                faults.crash_point("checkpoint", global_step)
        lr = float(keras.ops.convert_to_numpy(optimizer.learning_rate))
        logs = {"epoch": epoch, **_averages(sums), "lr": lr, **_evaluate(eval_step, data)}
        if not math.isfinite(logs["val_loss"]):
            raise NonFiniteLossError(non_finite_message(
                f"Epoch {epoch + 1}", "validation loss", logs["val_loss"], run.path, config))
        new_lr = schedule.update(logs[schedule.monitor], lr)
        if new_lr != lr:
            optimizer.learning_rate.assign(new_lr)
            print(f"Epoch {epoch + 1}: validation top-1 plateaued; learning rate "
                  f"{lr:.2e} -> {new_lr:.2e} (drop {schedule.drops})")
        if run.chief:  # logged before the commit: a kill in between is truncated on resume
            run.append_history(logs)
        logger.end_epoch(epoch, logs)
        state = commit(dataclasses.replace(
            state, epoch=epoch + 1, step=0, global_step=(epoch + 1) * steps,
            train_sums=(0.0, 0.0, 0.0, 0.0), schedule=schedule.get_state()))
        if run.chief:  # after the commit: the pictures never delay or endanger a checkpoint
            pictures.write_epoch_pictures(run, model, writer=logger.train_writer,
                                          step=epoch + 1)
    return logs
