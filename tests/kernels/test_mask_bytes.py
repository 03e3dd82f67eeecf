"""foldops.kernels._utils.mask_bytes: the keep-mask bytes handed to the kernels."""

import torch

from foldops.kernels._utils import mask_bytes


def test_real_bool_mask_is_a_free_view_and_others_convert():
    mask = torch.tensor([[True, False], [False, True]])
    raw = mask_bytes(mask)
    assert raw.dtype == torch.uint8 and raw.data_ptr() == mask.data_ptr()
    assert raw.tolist() == [[1, 0], [0, 1]]
    assert mask_bytes(torch.tensor([0.0, 1.0])).tolist() == [0, 1]


def test_traced_bool_mask_is_converted_not_viewed():
    """Under torch.compile (fake tensors) a bool -> uint8 view is not lowered by Inductor
    on the GPU (a reinterpreted bool buffer); the traced graph converts instead."""
    from torch._dynamo.backends.common import aot_autograd

    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return gm

    def body(x):
        return mask_bytes(x > 0).to(torch.int32) + 1

    compiled = torch.compile(body, fullgraph=True, backend=aot_autograd(fw_compiler=capture))
    assert compiled(torch.tensor([-1.0, 2.0])).tolist() == [1, 2]
    targets = [str(node.target) for gm in graphs for node in gm.graph.nodes]
    assert not any("view.dtype" in t for t in targets), targets
