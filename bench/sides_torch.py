"""PyTorch and ONNX Runtime sides of the benchmark (run inside `bench.worker` processes).

Every side runs `bench.torch_alexnet.AlexNet` with the weights `bench.sides_tf.prepare`
wrote (the Keras model's, re-laid out), on the same random inputs as the TensorFlow
sides (NCHW here), with ``BENCH_THREADS`` intra-op threads (the runner's ``--threads``,
default every core: TensorFlow's default):

* `TorchMatmul`: ``torch.matmul`` of two ``n x n`` matrices, for reference beside
  TensorFlow's rate.
* `TorchTrain`: SGD with momentum 0.9 and the paper's weight decay on the weights (not
  the biases; PyTorch's ``weight_decay`` adds it to the gradient before the momentum,
  as the paper does), cross-entropy on random labels, eager or ``torch.compile``;
  ``bfloat16`` runs under ``torch.autocast`` (Keras' ``mixed_bfloat16``: float32
  weights, bfloat16 compute).
* `TorchInfer`: the softmax in eval mode under ``torch.inference_mode``, eager or
  ``torch.compile``.
* `OrtInfer`: ONNX Runtime on `bench.onnx_model`'s file (CPU provider, all graph
  optimisations, ``intra_op_num_threads`` = the threads).
"""

import os

import numpy as np

from bench.inputs import CHECK_BATCH, CHECK_SEED, pixels, training_batch
from bench.worker import Side


def threads():
    return int(os.environ.get("BENCH_THREADS") or os.cpu_count())


def _torch():
    import torch

    torch.set_num_threads(threads())
    return torch


def torch_info(compiled=False):
    torch = _torch()
    info = {"torch_threads": torch.get_num_threads(),
            "torch_interop_threads": torch.get_num_interop_threads(),
            "mkldnn": bool(torch.backends.mkldnn.is_available())}
    if compiled:
        info["compile"] = "torch.compile(model, dynamic=False) (inductor, default mode)"
    return info


def _compiled(torch, net):
    """``torch.compile`` for one shape (``dynamic=False``: each batch size gets its own
    specialised graph, as it would in a server that pads to fixed batches), after
    forgetting what earlier sides of this process compiled (one compiled side per group)."""
    torch._dynamo.reset()
    return torch.compile(net, dynamic=False)


def _network(state, arch):
    torch = _torch()
    from bench.torch_alexnet import AlexNet

    net = AlexNet(**arch)
    with np.load(state) as arrays:
        net.load_state_dict({k: torch.from_numpy(arrays[k]) for k in arrays.files})
    return net


class TorchMatmul(Side):
    def __init__(self, n, dtype="float32"):
        torch = _torch()
        generator = torch.Generator().manual_seed(0)
        self.a = torch.randn(n, n, generator=generator).to(getattr(torch, dtype))
        self.b = torch.randn(n, n, generator=generator).to(getattr(torch, dtype))
        self.torch = torch

    def step(self):
        self.torch.matmul(self.a, self.b)
        return 1

    def info(self):
        return torch_info()


class TorchTrain(Side):
    warmup_steps = 3

    def __init__(self, state, arch, batch, dtype="float32", compile=False):
        torch = self.torch = _torch()
        self.net = _network(state, arch).train()
        self.model = _compiled(torch, self.net) if compile else self.net
        decayed = [p for n, p in self.net.named_parameters() if n.endswith("weight")]
        others = [p for n, p in self.net.named_parameters() if not n.endswith("weight")]
        self.optimizer = torch.optim.SGD(
            [{"params": decayed, "weight_decay": 5e-4}, {"params": others, "weight_decay": 0.0}],
            lr=0.01, momentum=0.9)
        x, y = training_batch(batch, arch["image_size"], arch["num_classes"])  # as KerasTrain
        self.x = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())
        self.y = torch.from_numpy(y)
        self.batch, self.bf16, self.compiled = batch, dtype == "bfloat16", compile

    def step(self):
        torch = self.torch
        self.optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):
            logits = self.model(self.x)
        loss = torch.nn.functional.cross_entropy(logits.float(), self.y)
        loss.backward()
        self.optimizer.step()
        return self.batch

    def info(self):
        return torch_info(self.compiled)


class TorchInfer(Side):
    warmup_steps = 3

    def __init__(self, state, arch, batch, compile=False):
        torch = self.torch = _torch()
        self.net = _network(state, arch).eval()
        self.model = _compiled(torch, self.net) if compile else self.net
        self.size = arch["image_size"]
        self.x = self._nchw(pixels(batch, self.size))
        self.batch, self.compiled = batch, compile

    def _nchw(self, array):
        return self.torch.from_numpy(array.transpose(0, 3, 1, 2).copy())

    def _probabilities(self, x):
        with self.torch.inference_mode():
            return self.torch.softmax(self.model(x), dim=-1)

    def step(self):
        self._probabilities(self.x)
        return self.batch

    def outputs(self):
        # The eager network: a compiled model would recompile for the check's batch size.
        with self.torch.inference_mode():
            x = self._nchw(pixels(CHECK_BATCH, self.size, CHECK_SEED))
            return self.torch.softmax(self.net(x), dim=-1).numpy().tolist()

    def info(self):
        return torch_info(self.compiled)


class OrtInfer(Side):
    warmup_steps = 3

    def __init__(self, path, batch, image_size):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads()
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        self.input = self.session.get_inputs()[0].name
        # The library's file also returns the top-k (classes, scores): time and check the
        # softmax, the output every side computes.
        self.output = "probabilities"
        self.x = pixels(batch, image_size)
        self.size, self.batch = image_size, batch
        self.ort = ort

    def step(self):
        self.session.run([self.output], {self.input: self.x})
        return self.batch

    def outputs(self):
        x = pixels(CHECK_BATCH, self.size, CHECK_SEED)
        return self.session.run([self.output], {self.input: x})[0].tolist()

    def info(self):
        return {"onnxruntime": self.ort.__version__, "ort_intra_op_threads": threads(),
                "ort_inter_op_threads": 1, "providers": self.session.get_providers()}
