"""The core leaf: what the workstation side and the device side both import.

- ``errors``: the error tiers (one-line messages; the CLIs exit 2 on them)
- ``contract``: the bundle's file and tensor names
- ``manifest``: the bundle manifest (schema, write, read-and-check)
- ``cli``: the CLIs' shared plumbing (bad input -> one line and exit 2, byte sizes, progress)

It imports nothing else of inducekv, and no torch, onnx or onnxruntime.
"""
