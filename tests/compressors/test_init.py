"""The compressor contract's shape and documentation (the API itself: tests/test_public_api.py)."""

import importlib

import fedjax_lab.compressors as compressors


def test_compressor_fields_in_order():
    assert compressors.Compressor._fields == (
        "init",
        "encode",
        "decode",
        "bits",
        "to_bytes",
        "from_bytes",
    )


def test_factories_have_docstrings_citing_papers():
    # random_bits/random_uniform are jax.random's draws, not compressor factories.
    for name in compressors.__all__:
        obj = getattr(compressors, name)
        if callable(obj) and name[0].islower() and not name.startswith("random_"):
            assert obj.__doc__ and any(str(y) in obj.__doc__ for y in range(2012, 2024)), name


def test_testing_module_is_public():
    testing = importlib.import_module("fedjax_lab.compressors.testing")
    assert callable(testing.check_compressor)
