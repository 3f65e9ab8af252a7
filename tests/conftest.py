"""Shared fixtures: small captured models built in code (no downloads)."""

import os

# Triton fixes interpreter-vs-GPU when its @jit functions (its own standard library included) are
# defined, so the CPU interpreter must be on before anything in the session imports triton.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

import regc  # noqa: E402


class ConvBnNet(torch.nn.Module):
    """conv -> BN -> ReLU6 (as clamp) -> pool -> dropout -> linear -> BN1d; exercises every lossless pass."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = torch.nn.BatchNorm2d(8)
        self.fc = torch.nn.Linear(8, 4)
        self.bn1 = torch.nn.BatchNorm1d(4)
        self.drop = torch.nn.Dropout(0.2)
        for bn in (self.bn, self.bn1):  # non-trivial statistics, so folding is really tested
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 2)
            bn.weight.data.uniform_(0.5, 2)
            bn.bias.data.uniform_(-1, 1)

    def forward(self, x):
        y = torch.clamp(self.bn(self.conv(x)), 0, 6).mean((2, 3))
        return self.bn1(self.fc(self.drop(y))) * 1


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models train several times faster on one thread when the 2 CI cores are shared."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def convbn_model():
    torch.manual_seed(0)
    return regc.capture(ConvBnNet(), (torch.randn(2, 3, 8, 8),), {"x": {0: torch.export.Dim("batch")}})


def capture_zoo(zoo):
    """Capture a zoo model, by name (``regc.zoo.ZOO``) or as built (``minilm()``), with its names and
    dynamic shapes."""
    from regc.zoo import ZOO

    z = ZOO[zoo]() if isinstance(zoo, str) else zoo
    return regc.capture(z.module, z.example_inputs, z.dynamic_shapes, input_names=z.input_names,
                        output_names=z.output_names)


def zoo_dataset(model, n: int = 16, seed: int = 0):
    """Calibration data shaped like the model's example inputs: float inputs get noise around the
    example, integer inputs are tiled; labels are the model's own argmax when the output is 2-D."""
    g = torch.Generator().manual_seed(seed)
    arrays = {}
    for name, ex in zip(model.input_names, model.example_inputs):
        reps = [-(-n // ex.shape[0])] + [1] * (ex.dim() - 1)
        t = ex.repeat(*reps)[:n]
        if t.is_floating_point():
            t = t + 0.1 * torch.randn(t.shape, generator=g)
        arrays[name] = t
    ds = regc.Dataset(arrays)
    with torch.no_grad():
        out = model.run(*ds.batch(0, n, like=model.example_inputs))[0]
    if out.dim() == 2:
        ds.labels = out.argmax(1)
    return ds
