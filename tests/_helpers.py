"""Assertions shared by the tests."""

import numpy as np


def to_numpy(t):
    return t.numpy() if hasattr(t, "numpy") else np.asarray(t)


def assert_close(actual, expected, rtol=1e-5, atol=1e-6, what=""):
    a, e = to_numpy(actual), to_numpy(expected)
    assert a.shape == e.shape, f"{what}: shape {a.shape} != {e.shape}"
    np.testing.assert_allclose(a, e, rtol=rtol, atol=atol, err_msg=what)


def assert_equal(actual, expected, what=""):
    a, e = to_numpy(actual), to_numpy(expected)
    assert a.shape == e.shape, f"{what}: shape {a.shape} != {e.shape}"
    np.testing.assert_array_equal(a, e, err_msg=what)
