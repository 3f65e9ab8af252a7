"""regc.Model: capture, train/eval flags, input checks, verifier, printer."""

import pytest
import torch

import regc
from regc.errors import CaptureError, InputMismatchError, VerifyError
from regc.opclass import OpClass, linear_view, op_class

aten = torch.ops.aten


def test_capture_matches_eager_and_is_trainable(convbn_model):
    from tests.conftest import ConvBnNet

    torch.manual_seed(0)
    eager = ConvBnNet().eval()
    m = regc.capture(eager, (torch.randn(2, 3, 8, 8),))
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(m(x), eager(x), rtol=1e-5, atol=1e-6)
    assert m.input_names == ["x"] and m.output_names == ["output"]
    m(x).sum().backward()
    assert all(p.grad is not None for p in m.parameters())


def test_train_mode_flips_bn_and_dropout(convbn_model):
    m = convbn_model
    x = torch.randn(2, 3, 8, 8)
    assert not m.training
    y_eval = m(x)
    rm = m.get_tensor("bn.running_mean").clone()
    m.train_mode(True)
    assert m.training
    m(x)
    assert not torch.equal(rm, m.get_tensor("bn.running_mean")), "train mode must update BN statistics"
    m.train_mode(False)
    assert not m.training
    assert not torch.equal(y_eval, m(x))  # stats moved
    torch.testing.assert_close(m(x), m(x))  # eval is deterministic (no dropout)


def test_input_checks(convbn_model):
    with pytest.raises(InputMismatchError, match="takes 1 inputs"):
        convbn_model(torch.randn(2, 3, 8, 8), torch.randn(1))
    with pytest.raises(InputMismatchError, match=r"expects \(2, 3, 8, 8\)"):
        convbn_model(torch.randn(2, 3, 9, 8))
    with pytest.raises(InputMismatchError, match="dtype torch.float64"):
        convbn_model(torch.randn(2, 3, 8, 8, dtype=torch.float64))


def test_dynamic_batch():
    lin = torch.nn.Linear(4, 3)
    m = regc.capture(lin, (torch.randn(2, 4),), {"input": {0: torch.export.Dim("batch")}})
    x = torch.randn(7, 4)
    torch.testing.assert_close(m(x), lin(x))


def test_capture_error_is_typed():
    class Bad(torch.nn.Module):
        def forward(self, x):
            if x.sum() > 0:  # data-dependent control flow
                return x
            return -x

    with pytest.raises(CaptureError, match="could not capture Bad"):
        regc.capture(Bad(), (torch.randn(3),))


def test_op_classes_and_linear_views():
    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.randn(8, 4))
            self.b = torch.nn.Parameter(torch.randn(4))
            self.lin = torch.nn.Linear(4, 4)

        def forward(self, x):
            y = torch.matmul(x, self.w)                       # ONNX-style MatMul weight (in, out)
            z = torch.addmm(self.b, x.view(-1, 8), self.w)    # GPT-2 Conv1D
            return self.lin(torch.clamp(y + z.view_as(y), 0, 6))

    m = regc.capture(M(), (torch.randn(2, 8),))
    views = {n.target: linear_view(n, m.gm) for n in m.call_nodes() if op_class(n, m.gm) is OpClass.LINEAR}
    assert views[aten.matmul.default].layout == "in_out" and views[aten.matmul.default].weight == "w"
    assert views[aten.addmm.default].bias == "b"
    assert views[aten.linear.default].layout == "out_in" and views[aten.linear.default].bias == "lin.bias"
    classes = {op_class(n, m.gm) for n in m.call_nodes()}
    assert OpClass.ELEMENTWISE in classes and OpClass.SHAPE in classes


def test_verifier_catches_broken_graphs(convbn_model):
    m = convbn_model.clone()
    m.verify()
    conv = next(n for n in m.call_nodes() if n.target is aten.conv2d.default)
    w = conv.args[1]
    m.set_tensor(w.target, torch.randn(8, 5, 3, 3))  # wrong in-channels
    with pytest.raises(VerifyError, match="shape propagation failed"):
        m.verify()
    m2 = convbn_model.clone()
    m2.output_names.append("extra")
    with pytest.raises(VerifyError, match="outputs"):
        m2.verify()


def test_printer_is_stable_and_informative(convbn_model):
    convbn_model.verify()
    text = convbn_model.print()
    assert text == convbn_model.clone().print()
    assert "inputs: x f32[2, 3, 8, 8]" in text
    assert "aten.conv2d(%x, @conv.weight" in text and "# conv-like" in text
    assert "-> f32[2, 8, 8, 8]" in text


def test_clone_is_deep(convbn_model):
    c = convbn_model.clone()
    c.get_tensor("fc.weight").data.zero_()
    assert convbn_model.get_tensor("fc.weight").abs().sum() > 0
