"""The run directory's pictures: conv1 filters and training curves after every epoch.

`write_epoch_pictures` (called by the training loop on the chief at every epoch end)
writes ``filters.png`` (`keras_alexnet.plots.filter_grid`: the paper's Figure 3 as the
run goes) and ``curves.png`` (`keras_alexnet.plots.training_curves` of ``history.csv``
and the logged batch loss) into the run directory, each replaced atomically, and the
same two pictures as TensorBoard image summaries ``filters`` and ``curves`` in
``logs/train``. Pictures never stop a run: a failure to draw them is one warning line.

`read_scalars` reads a scalar's values back from TensorBoard event files.
"""

import pathlib
import struct
import sys
import threading

FILTERS_FILE = "filters.png"
CURVES_FILE = "curves.png"
CURVES_SIZE = (800, 600)


# Event files are read incrementally: (path, tag) -> (inode, bytes read, wall time of the
# first event, [(step, value)]), so that each epoch end parses only the events written
# since the last one.
_EVENT_CACHE = {}
_CACHE_LOCK = threading.Lock()


def _read_records(path, offset):
    """``(records, new offset)``: the complete TFRecord payloads of ``path`` after
    ``offset`` (length u64, its CRC u32, data, data CRC u32); a record still being
    written is left for the next call."""
    records = []
    with open(path, "rb") as f:
        f.seek(offset)
        data = f.read()
    position = 0
    while position + 12 <= len(data):
        (length,) = struct.unpack("<Q", data[position:position + 8])
        end = position + 12 + length + 4
        if end > len(data):
            break
        records.append(data[position + 12:position + 12 + length])
        position = end
    return records, offset + position


def _scalars_of_file(path, tag):
    """``(wall time of the file's first event, [(step, value)] of ``tag``)``."""
    import tensorflow as tf

    key = (str(path), tag)
    status = path.stat()
    with _CACHE_LOCK:
        inode, offset, started, found = _EVENT_CACHE.get(key, (None, 0, None, []))
    if inode != status.st_ino or status.st_size < offset:
        offset, started, found = 0, None, []
    records, offset = _read_records(path, offset)
    found = list(found)
    for record in records:
        event = tf.compat.v1.Event.FromString(record)
        if started is None:
            started = event.wall_time
        for value in event.summary.value:
            if value.tag != tag:
                continue
            if value.HasField("tensor"):
                number = float(tf.make_ndarray(value.tensor))
            else:
                number = float(value.simple_value)
            found.append((int(event.step), number))
    with _CACHE_LOCK:
        _EVENT_CACHE[key] = (status.st_ino, offset, started, found)
    return started, found


def read_scalars(log_dir, tag="batch_loss"):
    """``[(step, value)]`` of the scalar ``tag`` in the event files of ``log_dir``.

    Reads both TF2 summaries (tensor events, as ``tf.summary.scalar`` writes) and TF1
    ``simple_value`` ones. A resumed run writes a new event file whose steps repeat
    those the interrupted one logged after its last checkpoint: the files are taken in
    the order they were started (their first event's time), and each replaces the
    steps from its first one on, so every step appears once, as the run that continued
    logged it. What was read of a file is remembered (per process), so a growing log
    costs only its new events.
    """
    log_dir = pathlib.Path(log_dir)
    paths = sorted(log_dir.glob("events.out.tfevents.*")) if log_dir.is_dir() else []
    read = [_scalars_of_file(path, tag) for path in paths]
    values = []
    for _, found in sorted(read, key=lambda item: item[0] or 0.0):
        if found:
            first = min(step for step, _ in found)
            values = [(s, v) for s, v in values if s < first] + found
    return sorted(dict(values).items())  # a step written twice in one file: the last wins


def _png_tensor(data):
    import tensorflow as tf

    return tf.expand_dims(tf.io.decode_png(data, channels=3), 0)


def render_epoch_pictures(run, model):
    """``{file name: PNG bytes}`` of the run's filters (from ``model``) and curves (from
    ``history.csv`` and ``logs/train``'s batch loss); curves only once an epoch is in
    the history."""
    from keras_alexnet import plots

    pictures = {FILTERS_FILE: plots.to_png(plots.filter_grid(model))}
    rows = run.read_history()
    if rows:
        try:
            steps = read_scalars(run.log_dir / "train", "batch_loss")
        except Exception as error:  # the curves do without the batch loss panel
            print(f"Warning: the batch loss of {run.log_dir / 'train'} cannot be read "
                  f"({type(error).__name__}: {error}); curves without it.", file=sys.stderr)
            steps = None
        pictures[CURVES_FILE] = plots.to_png(plots.training_curves(rows, steps, CURVES_SIZE))
    return pictures


def write_epoch_pictures(run, model, writer=None, step=None, strict=False):
    """Writes ``filters.png`` and ``curves.png`` into ``run`` (a `RunDirectory`).

    Each file is replaced atomically (a viewer sees the previous picture or the new
    one). With a ``tf.summary`` ``writer`` the pictures also go to TensorBoard as
    images ``filters`` and ``curves`` at ``step`` (the epoch, counted from 1).

    A failure is printed as one warning line and the run goes on (training matters
    more than its pictures), unless ``strict``, when it is raised.

    Returns:
        ``{file name: path}`` of the files written (empty after a failure).
    """
    from keras_alexnet import files

    try:
        pictures = render_epoch_pictures(run, model)
        written = {name: files.atomic_write(run.path / name, data)
                   for name, data in pictures.items()}
        if writer is not None:
            import tensorflow as tf

            with writer.as_default(step=step):
                for name, data in pictures.items():
                    tf.summary.image(name.removesuffix(".png"), _png_tensor(data))
            writer.flush()
    except Exception as error:
        if strict:
            raise
        message = str(error).splitlines()[0][:200] if str(error) else ""
        print(f"Warning: the epoch pictures of {run.path} were not written "
              f"({type(error).__name__}: {message}); training goes on.", file=sys.stderr,
              flush=True)
        return {}
    return written
