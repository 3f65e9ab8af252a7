"""fold_bn, dce and canonicalize are exact: outputs equal to fp32 tolerance, and they do change the graph."""

import torch

import regc

aten = torch.ops.aten


def _targets(m):
    return [n.target for n in m.call_nodes()]


def test_fold_bn_removes_bn_and_keeps_outputs(convbn_model):
    x = torch.randn(5, 3, 8, 8)
    ref = convbn_model(x).detach()
    before = convbn_model.num_params()
    m = regc.compress(convbn_model.clone(), "fold_bn")
    assert aten.batch_norm.default not in _targets(m)
    assert m.get_tensor("conv.bias").shape == (8,)  # a bias was created for the bias-free conv
    assert m.num_params() == before - 2 * 8 - 2 * 4 + 8  # BN affine params gone, one new bias
    torch.testing.assert_close(m(x), ref, rtol=1e-5, atol=1e-5)


def test_fold_bn_skips_train_mode_bn(convbn_model):
    convbn_model.train_mode(True)
    res = regc.compress(convbn_model, "fold_bn")
    assert aten.batch_norm.default in _targets(res)


def test_canonicalize_rules_and_exactness(convbn_model):
    x = torch.randn(3, 3, 8, 8)
    ref = convbn_model(x).detach()
    m = regc.compress(convbn_model.clone(), "canonicalize")
    t = _targets(m)
    assert aten.clamp.default not in t and aten.hardtanh.default in t
    assert aten.dropout.default not in t and aten.mul.Tensor not in t
    torch.testing.assert_close(m(x), ref, rtol=1e-6, atol=1e-6)


def test_dce_drops_dead_nodes_and_params():
    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.used = torch.nn.Linear(4, 4)
            self.unused = torch.nn.Linear(4, 4)

        def forward(self, x):
            return self.used(x)

    m = regc.capture(M(), (torch.randn(2, 4),))
    assert "unused.weight" in dict(m.named_parameters()) or m.num_params() == 20
    x = torch.randn(2, 4)
    ref = m(x).detach()
    m = regc.compress(m, "dce")
    assert m.num_params() == 20
    torch.testing.assert_close(m(x), ref)
