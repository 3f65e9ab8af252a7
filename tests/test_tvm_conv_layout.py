"""CPU convs on narrow maps run channels-last (regc.backends.tvm_conv_layout): which convs, same outputs."""

import numpy as np
import pytest
import torch
from test_tvm_backend import make_model

from regc.backends.tvm_backend import PRESETS, _weight_names, fuse_kernels, import_relax, lower_tvm
from regc.backends.tvm_conv_layout import narrow_convs_channels_last


class Convs(torch.nn.Module):
    """A 40-wide input: convs whose output is wider than 32 stay NCHW, narrower ones turn NHWC, except
    the grouped and the depthwise conv."""

    def __init__(self):
        super().__init__()
        self.wide = torch.nn.Conv2d(3, 8, 3, padding=1)  # 40 wide: NCHW
        self.strided = torch.nn.Conv2d(8, 16, 3, stride=2, padding=1)  # 20 wide: NHWC
        self.dilated = torch.nn.Conv2d(16, 16, 3, padding=2, dilation=2, bias=False)  # NHWC
        self.rect = torch.nn.Conv2d(16, 12, (1, 3), padding=(0, 1))  # NHWC
        self.down = torch.nn.Conv2d(12, 16, 1, stride=2)  # 10 wide: NHWC
        self.grouped = torch.nn.Conv2d(16, 16, 3, padding=1, groups=4)  # NCHW
        self.depthwise = torch.nn.Conv2d(16, 16, 3, padding=1, groups=16)  # NCHW

    def forward(self, x):
        x = torch.relu(self.wide(x))
        x = self.strided(x)
        x = x + torch.relu(self.dilated(x))
        x = self.down(self.rect(x))
        return self.depthwise(self.grouped(x))


@pytest.fixture(scope="module")
def convs():
    torch.manual_seed(0)
    module = Convs().eval()
    x = torch.randn(2, 3, 15, 40)  # odd height: the width alone decides
    return module, x, make_model(module, (x,))


def conv_layouts(mod):
    calls = [b.value for f in mod.functions.values() if hasattr(f, "body") and hasattr(f.body, "blocks")
             for block in f.body.blocks for b in block.bindings]
    return sorted(str(c.attrs.data_layout) for c in calls
                  if hasattr(c, "op") and getattr(c.op, "name", "") == "relax.nn.conv2d")


def test_narrow_convs_turn_channels_last_and_the_others_stay(convs):
    _, _, model = convs
    mod = import_relax(model).mod
    assert conv_layouts(mod) == ["NCHW"] * 7
    rewritten = narrow_convs_channels_last(_weight_names(mod["main"]))(mod)
    assert conv_layouts(rewritten) == ["NCHW"] * 3 + ["NHWC"] * 4


def test_the_channels_last_region_is_transposed_once_in_and_once_out(convs):
    """Between the four NHWC convs, the bias adds, the ReLU and the residual add run NHWC too: the
    activations are transposed where the region starts (before the strided conv) and where it ends
    (before the grouped conv), not around every conv."""
    _, _, model = convs
    mod = import_relax(model).mod
    rewritten = narrow_convs_channels_last(_weight_names(mod["main"]))(mod)
    transposes = [b.value for block in rewritten["main"].body.blocks for b in block.bindings
                  if hasattr(b.value, "op") and getattr(b.value.op, "name", "") == "relax.permute_dims"]
    # the others transpose a weight or a bias (main_transform_params does, once): the batch is 2
    activations = [t for t in transposes if int(t.args[0].ty.shape[0]) == 2]
    assert [list(map(int, t.attrs.axes)) for t in activations] == [[0, 2, 3, 1], [0, 3, 1, 2]]


def lifted_weight_shapes(model, preset):
    kernels = fuse_kernels(import_relax(model).mod, PRESETS[preset].tvm_target())
    return {tuple(int(d) for d in p.ty.shape) for p in kernels["main"].params[1:]}


def test_weights_are_transposed_once_per_weight_set_and_gpu_builds_keep_nchw(convs):
    _, _, model = convs
    ohwi = {(16, 3, 3, 8), (16, 3, 3, 16), (12, 1, 3, 16), (16, 1, 1, 12)}
    # OHWI weights are main's parameters: main_transform_params transposed them, not every run
    assert ohwi <= lifted_weight_shapes(model, "x86_64")
    assert not ohwi & lifted_weight_shapes(model, "cuda")


def test_channels_last_build_matches_torch(convs):
    module, x, model = convs
    with torch.no_grad():
        want = module(x).numpy()
    got = lower_tvm(model, "x86_64").run(x.numpy())[0]
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(np.abs(want).max()))
