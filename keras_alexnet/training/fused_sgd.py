"""SGD with momentum whose update of each variable is one TensorFlow kernel.

Keras' `keras.optimizers.SGD` computes the paper's update

    v <- momentum * v - lr * g
    w <- w + v

as five element-wise ops per variable (two products, a difference, an assignment and an
in-place addition), each a pass over the variable's memory: on AlexNet's 61 M weights that
is about 4 % of a CPU training step (bench/profile_step.py). TensorFlow's
``ResourceApplyKerasMomentum`` kernel computes exactly that rule, Keras' sign convention
included, in one pass. `FusedSGD` is Keras' SGD with its ``update_step`` routed through
it; everything else (variables, their names, checkpoints, the learning-rate schedule,
the config) is Keras' own, so a checkpoint written by one loads into the other.

Where the kernel does not apply (the JAX or PyTorch backends, Nesterov momentum, no
momentum, sparse gradients) it falls back to Keras' update.
"""

import keras
import tensorflow as tf


@keras.saving.register_keras_serializable(package="keras_alexnet")
class FusedSGD(keras.optimizers.SGD):
    """`keras.optimizers.SGD` (same arguments) with each variable's momentum update fused
    into one ``ResourceApplyKerasMomentum`` kernel. Its default name is Keras' ``"sgd"``, so
    its variables have the paths Keras' SGD gives them."""

    def __init__(self, *args, name="sgd", **kwargs):
        super().__init__(*args, name=name, **kwargs)

    def update_step(self, gradient, variable, learning_rate):
        if (self.momentum == 0 or self.nesterov or keras.backend.backend() != "tensorflow"
                or isinstance(gradient, tf.IndexedSlices)):
            return super().update_step(gradient, variable, learning_rate)
        momentum = self.momentums[self._get_variable_index(variable)]
        # Under a tf.distribute strategy these are the variables of the device being
        # updated (`extended.update`), whose handles the kernel takes.
        variable = variable.value if isinstance(variable, keras.Variable) else variable
        momentum = momentum.value if isinstance(momentum, keras.Variable) else momentum
        dtype = variable.dtype
        tf.raw_ops.ResourceApplyKerasMomentum(
            var=variable.handle, accum=momentum.handle, lr=tf.cast(learning_rate, dtype),
            grad=tf.cast(gradient, dtype), momentum=tf.cast(self.momentum, dtype),
            use_locking=False, use_nesterov=False)
