"""`cast_relay`: an offered low-precision copy goes only to a cast of the very data it was made from,
unmodified, and only once; everything else is an ordinary cast."""

import pytest
import torch

from moeut.ops import cast_relay


@pytest.fixture(autouse=True)
def _empty_relay():
    cast_relay.clear()
    yield
    cast_relay.clear()


def _offer_marked(x):
    """Offer a copy that differs from x.to(bf16) (x + 1), so a test can tell which one a cast returned."""
    copy = (x + 1).to(torch.bfloat16)
    cast_relay.offer(x, copy)
    return copy


def test_the_offered_tensor_and_its_reshapes_get_the_copy_once():
    x = torch.randn(4, 6)
    copy = _offer_marked(x)
    taken = cast_relay.taken
    got = cast_relay.cast(x.view(2, 12), torch.bfloat16)  # a reshape of the same data
    assert got.shape == (2, 12) and torch.equal(got, copy.view(2, 12))
    assert cast_relay.taken == taken + 1
    again = cast_relay.cast(x, torch.bfloat16)  # taken already: an ordinary cast
    assert torch.equal(again, x.to(torch.bfloat16))


@pytest.mark.parametrize(
    "case", ["other tensor", "modified in place", "other dtype", "offset view", "transposed", "cleared"]
)
def test_anything_else_gets_an_ordinary_cast(case):
    x = torch.randn(4, 6)
    _offer_marked(x)
    t, dtype = x, torch.bfloat16
    if case == "other tensor":
        t = x.clone()
    elif case == "modified in place":
        x.mul_(2)
    elif case == "other dtype":
        dtype = torch.float16
    elif case == "offset view":
        t = x[1:]
    elif case == "transposed":
        t = x.t()
    elif case == "cleared":
        cast_relay.clear()
    assert torch.equal(cast_relay.cast(t, dtype), t.to(dtype))
    # the offer stays for the data it was made from, unless that data changed or the offers were dropped
    kept = cast_relay.take(x, torch.bfloat16) is not None
    assert kept == (case not in ("modified in place", "cleared"))


def test_offers_wait_side_by_side_up_to_the_limit_and_a_same_dtype_cast_is_a_no_op():
    xs = [torch.randn(3, 5) for _ in range(cast_relay.MAX_OFFERS + 1)]
    copies = [_offer_marked(x) for x in xs]
    # the oldest was dropped; the others are each taken by their own tensor, in any order
    assert torch.equal(cast_relay.cast(xs[0], torch.bfloat16), xs[0].to(torch.bfloat16))
    for i in reversed(range(1, len(xs))):
        assert torch.equal(cast_relay.cast(xs[i], torch.bfloat16), copies[i])
    b = torch.randn(3, dtype=torch.bfloat16)
    assert cast_relay.cast(b, torch.bfloat16) is b


def test_offer_rejects_a_copy_of_another_shape():
    with pytest.raises(ValueError, match="shaped like"):
        cast_relay.offer(torch.randn(4, 6), torch.randn(6, 4).to(torch.bfloat16))
