"""fused_moe and the routing map at shapes drawn by hypothesis, against the reference and the torch twin.

Skipped where hypothesis is not installed. The skip is the test's, not the module's: benchmarks/gpu_check.sh runs the
GPU tier in several pytest processes, each collecting every module, and a module skip would be counted once in each.
On a GPU every drawn shape compiles four or five kernel variants (about 3 s), so it draws fewer shapes there.
"""

import pytest
from kernel_cases import DEVICE, assert_close_to_reference, assert_same_routing, moe_layer

from phixtral_kernels import fused_moe, moe_routing, moe_routing_torch

try:
    from hypothesis import given, settings
    from hypothesis import strategies as st
except ImportError:
    given = None

if given is None:

    @pytest.mark.skip(reason="needs hypothesis")
    def test_fused_moe_random_shapes():
        pass

else:

    @settings(max_examples=25 if DEVICE == "cpu" else 6, deadline=None)
    @given(
        T=st.integers(0, 40),
        D=st.integers(8, 80),
        F=st.integers(8, 100),
        E=st.sampled_from([1, 2, 3, 4, 8]),
        data=st.data(),
    )
    def test_fused_moe_random_shapes(T, D, F, E, data):
        top_k = data.draw(st.integers(1, E), label="top_k")
        seed = data.draw(st.integers(0, 2**16), label="seed")
        layer = moe_layer(T, D, F, E, seed=seed)
        logits = layer[0] @ layer[1].t()
        block_m = data.draw(st.sampled_from([16, 32]), label="block_m")
        assert_same_routing(moe_routing(logits, top_k, block_m), moe_routing_torch(logits, top_k, block_m))
        assert_close_to_reference(fused_moe(*layer, top_k, backend="triton"), *layer, top_k)
