"""Device-side runtime (no torch): sessions over a bundle, tokenizer, generation.

``Runtime``, ``Result`` and ``Timings`` are loaded on first use, so importing a
small module such as ``inducekv.runtime.errors`` does not pull in onnxruntime.
"""
__all__ = ["Runtime", "Result", "Timings"]


def __getattr__(name):
    if name in __all__:
        from inducekv.runtime import api

        return getattr(api, name)
    raise AttributeError(f"module 'inducekv.runtime' has no attribute {name!r}")
