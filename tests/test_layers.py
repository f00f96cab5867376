"""passes.layers.computes_as: the torch.nn class a layer computes as."""

from torch import nn

from rewriter.passes.layers import computes_as


class _Made(nn.Conv3d):
    def __init__(self):
        super().__init__(2, 2, 3)

    @staticmethod
    def stride_of(stride):
        return (stride,) * 3


class _Forward(nn.Conv2d):
    def forward(self, x):
        return super().forward(x) + 1


class _ConvForward(nn.Conv2d):
    def _conv_forward(self, x, weight, bias):
        return super()._conv_forward(x, weight * 2, bias)


class _Block(nn.Sequential):
    pass


def test_a_subclass_that_changes_only_how_it_is_made_computes_as_its_base():
    assert computes_as(_Made()) is nn.Conv3d
    assert computes_as(nn.BatchNorm2d(3)) is nn.BatchNorm2d


def test_a_subclass_that_computes_otherwise_or_a_container_is_itself():
    assert computes_as(_Forward(1, 1, 1)) is _Forward
    assert computes_as(_ConvForward(1, 1, 1)) is _ConvForward
    assert computes_as(_Block()) is _Block
    assert computes_as(nn.Sequential()) is nn.Sequential
