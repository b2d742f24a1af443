import numpy as np
import pytest

from aa_deploy.conversion import filters


@pytest.mark.parametrize("name,row", [("rect", [1, 1]), ("triangle", [1, 2, 1]), ("binomial", [1, 4, 6, 4, 1])])
def test_named_rows_at_stride_2(name, row):
    taps = filters.taps_1d(filters.filter_size(name), 2)
    np.testing.assert_allclose(taps, np.asarray(row) / sum(row))


@pytest.mark.parametrize("size", range(1, 8))
@pytest.mark.parametrize("stride", [1, 2, 3, 4])
def test_taps_are_normalized_symmetric_binomial_widened(size, stride):
    taps = np.asarray(filters.taps_1d(size, stride))
    assert taps.sum() == pytest.approx(1.0)
    np.testing.assert_allclose(taps, taps[::-1])
    assert len(taps) == (size - 1) * (max(stride, 2) - 1) + 1


def test_triangle_widens_to_a_wider_triangle_at_stride_4():
    np.testing.assert_allclose(filters.taps_1d(3, 4), np.asarray([1, 2, 3, 4, 3, 2, 1]) / 16)


def test_widened_filter_attenuates_its_new_nyquist():
    # The response at the new Nyquist frequency pi/s stays as low as the stride-2 row's at pi/2... or lower.
    for size in (3, 5):
        for s in (3, 4):
            taps = np.asarray(filters.taps_1d(size, s))
            response = abs(np.sum(taps * np.exp(-1j * np.pi / s * np.arange(len(taps)))))
            base = np.asarray(filters.taps_1d(size, 2))
            base_response = abs(np.sum(base * np.exp(-1j * np.pi / 2 * np.arange(len(base)))))
            assert response <= base_response + 1e-9


def test_padding_keeps_size_and_centre():
    assert filters.padding(1) == (0, 0)
    assert filters.padding(2) == (0, 1)
    assert filters.padding(3) == (1, 1)
    assert filters.padding(7) == (3, 3)


def test_kernel_is_outer_product_summing_to_one():
    k = filters.kernel([(0.25, 0.5, 0.25), (1.0,)])
    assert k.shape == (3, 1) and k.sum() == pytest.approx(1.0)


@pytest.mark.parametrize("bad", [0, 8, -1])
def test_bad_sizes_are_rejected(bad):
    with pytest.raises(ValueError):
        filters.filter_size(size=bad)


def test_unknown_name_is_rejected():
    with pytest.raises(ValueError, match="unknown filter"):
        filters.filter_size("gaussian")
