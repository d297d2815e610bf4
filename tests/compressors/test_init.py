"""Pins the public API of fedjax_lab.compressors."""

import importlib

import fedjax_lab.compressors as compressors

PUBLIC = [
    "Compressor",
    "ErrorFeedbackState",
    "TreeLayout",
    "identity",
    "masked",
    "per_leaf",
    "qsgd",
    "rand_k",
    "scaled_sign",
    "sign",
    "sstc",
    "stc",
    "terngrad",
    "top_k",
    "with_error_feedback",
]


def test_all_is_pinned():
    assert sorted(compressors.__all__) == sorted(PUBLIC)
    for name in PUBLIC:
        assert hasattr(compressors, name)


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
    for name in PUBLIC:
        obj = getattr(compressors, name)
        if callable(obj) and name[0].islower():
            assert obj.__doc__ and any(str(y) in obj.__doc__ for y in range(2012, 2024)), name


def test_testing_module_is_public():
    testing = importlib.import_module("fedjax_lab.compressors.testing")
    assert callable(testing.check_compressor)
